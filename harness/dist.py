"""Who am I in the job: rank, world size, device. Rank-0 gating lives here, not in the loop.

Works the same under the deepspeed launcher, torchrun, Slurm (via either) and as one plain
process: for the latter we set the environment a launcher would, so torch.distributed (and
DeepSpeed, which otherwise reaches for mpi4py) initialise a world of one.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from harness.errors import HarnessError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def ensure_launcher_env() -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def info() -> DistInfo:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # Each rank would otherwise start one thread per core: with several ranks on one
            # machine they oversubscribe the cores and run ~10x slower (measured, 2 ranks, 2 cores).
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, local_rank, world_size, device)


def world_size_and_rank() -> tuple[int, int]:
    """(world size, rank) of the process group; (1, 0) before it exists."""
    if torch_dist.is_initialized():
        return torch_dist.get_world_size(), torch_dist.get_rank()
    return 1, 0


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (one collective), in float64 so token counts stay exact."""
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t)
    return t.tolist()


def sum_and_read(summed: list, extra: list = ()) -> list[float]:
    """Sum `summed` (device tensors or Python numbers) over all ranks in one all-reduce on the
    device, then bring them and `extra` (device tensors or numbers, not summed) to the host in ONE
    device-to-host copy, in float64. Numbers become device tensors by a fill, not a host copy
    (a pageable host-to-device copy would wait for the device too)."""
    device = _device()

    def on_device(v) -> torch.Tensor:
        if torch.is_tensor(v):
            return v.detach().to(device=device, dtype=torch.float64).reshape(())
        return torch.full((), float(v), dtype=torch.float64, device=device)

    t = torch.stack([on_device(v) for v in summed])
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t)
    if extra:
        t = torch.cat([t, torch.stack([on_device(v) for v in extra])])
    return t.tolist()


def agree(error: str | None) -> str | None:
    """Every rank learns whether any rank failed a check, so all stop together instead of
    the healthy ranks hanging in the next collective. Returns the first error, if any."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return error
    gathered: list[str | None] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, error)
    return next((e for e in gathered if e), None)


def checked_on_every_rank(check, *args):
    """`check(*args)` on every rank; if it raises HarnessError on any rank, every rank raises the
    first such error, so no healthy rank is left waiting in the next collective."""
    result, error = None, None
    try:
        result = check(*args)
    except HarnessError as err:
        error = str(err)
    error = agree(error)
    if error:
        raise HarnessError(error)
    return result


def shared_nonce() -> str:
    """A random string that every rank of this job receives from rank 0 (one small collective)."""
    nonce = [uuid.uuid4().hex]
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.broadcast_object_list(nonce, src=0)
    return nonce[0]


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return [obj]
    gathered: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# Heartbeats: every rank records the step it is on in the job's rendezvous store, so that a
# rank whose collective times out can name the rank that stopped making progress. A rank stopped
# mid-step (SIGSTOP, a frozen host) is at the same step as the ranks waiting for it, so each rank
# also records a timestamp from a background thread ("alive"): a stopped process's threads stop
# too, and its timestamp falls behind the others'.
HEARTBEAT_KEY = "harness/heartbeat/{}"
ALIVE_KEY = "harness/alive/{}"
ALIVE_STALE_BEATS = 3  # missed beats after which a rank counts as stopped


def heartbeat(step: int) -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.distributed_c10d._get_default_store().set(HEARTBEAT_KEY.format(torch_dist.get_rank()), str(step))


def last_heartbeats() -> dict[int, int | None]:
    """rank -> the last step it reported (None: never reported)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return {}
    store = torch_dist.distributed_c10d._get_default_store()
    beats: dict[int, int | None] = {}
    for rank in range(torch_dist.get_world_size()):
        key = HEARTBEAT_KEY.format(rank)
        beats[rank] = int(store.get(key)) if store.check([key]) else None
    return beats


class Liveness:
    """A daemon thread that writes this rank's wall-clock time into the store every `every_s`."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = None
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            self._store, self._key = torch_dist.distributed_c10d._get_default_store(), ALIVE_KEY.format(torch_dist.get_rank())
            self._beat()  # the first beat before any collective can wait for this rank
            self._thread = threading.Thread(target=self._run, name="harness-liveness", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        self._store.set(self._key, f"{time.time():.3f}")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._beat()
            except Exception:  # the store is gone (process group destroyed, rank 0's host down): stop quietly
                return

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> Liveness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StepDeadline:
    """Ends the process when one phase of a training step (a micro-step's forward and backward, the
    optimizer step, the step's loss read) runs longer than `timeout_s`, after `on_expiry` has said
    which rank the job waited for.

    A collective waiting for a hung rank must fail the job within --collective_timeout_s. The
    backends' own timeouts do not cover every wait: DeepSpeed's shared-memory all-reduce (the CPU
    accelerator's) spins with none, and NCCL's watchdog tears the process down without naming the
    rank it waited for. The main thread is then stuck inside the collective, where no exception
    can reach it, so this thread watches from outside. Each phase re-arms it: a long step of many
    micro-steps never counts against the limit as a whole.
    """

    def __init__(self, timeout_s: float, on_expiry):
        self.timeout_s, self.on_expiry = timeout_s, on_expiry
        self._since: float | None = None
        self._stop = threading.Event()
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:  # one process waits on no one
            threading.Thread(target=self._run, name="harness-step-deadline", daemon=True).start()

    def arm(self) -> None:
        self._since = time.monotonic()

    def disarm(self) -> None:
        self._since = None

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout_s:
                self.on_expiry()
                return

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> StepDeadline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def liveness_interval(timeout_s: float) -> float:
    """Beat often enough that a stopped rank is told apart well within the collective timeout,
    rarely enough that thousands of ranks do not load the store (at most 1 per 30 s each)."""
    return min(30.0, max(1.0, timeout_s / 10))


def last_alive() -> dict[int, float | None]:
    """rank -> the wall-clock time of its last liveness beat (None: never)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return {}
    store = torch_dist.distributed_c10d._get_default_store()
    beats: dict[int, float | None] = {}
    for rank in range(torch_dist.get_world_size()):
        key = ALIVE_KEY.format(rank)
        beats[rank] = float(store.get(key)) if store.check([key]) else None
    return beats
