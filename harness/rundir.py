"""The run directory: refuse one that is not ours, prepare it, write what describes the run.

    output_dir/
      config.json          flags, resolved settings and the filled DeepSpeed config (`TrainSetup.resolved`)
      data_report.json     what the data looks like after tokenization (harness.report)
      metrics.jsonl        one record per logged step and per evaluation (harness.metrics)
      tensorboard/         the same numbers for TensorBoard
      checkpoints/         step-N/ folders and `latest` (harness.checkpoint)
      eval/                step-N.json and step-N.predictions.jsonl per evaluation
      best/, final/        Hugging Face folders (harness.export)
      .lock                who runs in this folder now (`RunLock`)
      .requeue             left after a stop request's checkpoint committed (harness.checkpoint.mark_requeue)

Rank 0 takes the lock first, before any other check (one run per folder); preflight then calls
the checks (nothing else is written or deleted before every input has passed); `prepare` runs on
rank 0 once the model has loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from harness import dist
from harness.checkpoint import replace_atomically
from harness.config import TrainConfig
from harness.errors import HarnessError

# What this harness writes at the top of a run directory (plus `<name>.tmp` / `<name>.old` while
# replacing one); anything else there is the user's, and --overwrite names it before deleting it.
RUN_DIR_ENTRIES = ("config.json", "data_report.json", "metrics.jsonl", "tensorboard", "checkpoints", "eval", "best",
                   "final", ".lock", ".requeue")

# Checkpoint bytes per parameter. A trained parameter: fp32 master weight and two fp32 Adam moments
# (12 bytes) plus the module weight (up to 4). A frozen one (LoRA's base weights) has no optimizer
# state, only its module weight in the training precision. RNG, config and tokenizer are small.
TRAINED_BYTES_PER_PARAM = 16
FROZEN_BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}


def check_output_dir(out: Path, overwrite: bool, resume: str = "", resume_from: Path | None = None) -> None:
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--output_dir {out} exists and is not a folder")
    check_writable(out)
    if not out.exists() or not entries(out):
        return
    if not is_run_dir(out):
        raise HarnessError(f"--output_dir {out} is not empty and was not written by this harness "
                           f"(no config.json with harness_version); refusing to {'delete' if overwrite else 'use'} it")
    if resume_from is not None and continues_in_place(out, resume_from):
        return
    if resume == "auto" and not (out / "final").exists():
        return  # an earlier attempt died before its first checkpoint: nothing to keep, start again
    if not overwrite:
        raise HarnessError(f"--output_dir {out} is not empty; choose another folder, pass --overwrite, "
                           f"or --resume auto to continue from its newest checkpoint")
    foreign = not_ours(out)
    if foreign:
        dist.print0(f"warning: --overwrite deletes {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} of {out} "
                    f"that this harness did not write: {', '.join(foreign[:20])}{' ...' if len(foreign) > 20 else ''}")


def entries(out: Path) -> list[Path]:
    """What the folder holds, its lock aside (the lock is how this run holds it, not content)."""
    return [p for p in out.iterdir() if p.name != LOCK_FILE]


def not_ours(out: Path) -> list[str]:
    """Top-level entries of a run directory that this harness never writes."""
    ours = {*RUN_DIR_ENTRIES, *(f"{n}.tmp" for n in RUN_DIR_ENTRIES), *(f"{n}.old" for n in RUN_DIR_ENTRIES)}
    return sorted(p.name + ("/" if p.is_dir() else "") for p in entries(out) if p.name not in ours)


def check_writable(out: Path) -> None:
    """The run directory, or the folder it will be created in, must take files (checked without
    writing: the lock, taken right after by rank 0, is the first write)."""
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise HarnessError(f"--output_dir {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"--output_dir {out}: {existing} is not writable (read-only file system or no permission)")


def continues_in_place(out: Path, resume_from: Path | None) -> bool:
    return resume_from is not None and out.resolve() in resume_from.resolve().parents


def is_run_dir(out: Path) -> bool:
    try:
        return "harness_version" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False


def check_checkpoint_room(out: Path, cfg: TrainConfig, total_steps: int, trained_params: int, frozen_params: int,
                          dtype: str) -> None:
    """Refuse to start a run whose checkpoints cannot fit, instead of failing hours in."""
    saves = -(-total_steps // cfg.save_steps)
    kept = min(saves, cfg.keep_last + 1 if cfg.keep_last else saves)  # +1: the new one before pruning
    need = kept * (trained_params * TRAINED_BYTES_PER_PARAM + frozen_params * FROZEN_BYTES_PER_PARAM[dtype])
    existing = next(p for p in [out, *out.resolve().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        model = f"{(trained_params + frozen_params) / 1e9:.2f}B-parameter model"
        if frozen_params:
            model += f" ({trained_params / 1e6:.1f}M of them trained)"
        raise HarnessError(f"--save_steps {cfg.save_steps} with --keep_last {cfg.keep_last} needs about "
                           f"{readable_bytes(need)} for {kept} checkpoints of a {model}, "
                           f"but {existing} has {readable_bytes(free)} free; lower --keep_last or free space")


def readable_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def prepare(out: Path, resume_from: Path | None, resume_step: int, info: dist.DistInfo) -> None:
    """Rank 0 empties a run directory that will be replaced (preflight proved it is ours) or, on a
    resume in place, drops the metrics of steps that will run again; every rank waits for it."""
    if info.is_rank0:
        if continues_in_place(out, resume_from):
            drop_metrics_after(out / "metrics.jsonl", resume_step)
        elif out.exists():
            for entry in entries(out):  # everything but the lock this run holds
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def drop_metrics_after(path: Path, step: int) -> None:
    """Steps logged after the checkpoint we resume from will be run (and logged) again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        replace_atomically(path, "".join(line + "\n" for line in kept))


def write_run_files(out: Path, resolved: dict, data_report: dict, info: dist.DistInfo) -> None:
    """config.json (preflight's TrainSetup.resolved()) and data_report.json, on rank 0."""
    if info.is_rank0:
        (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        (out / "data_report.json").write_text(json.dumps(data_report, indent=2) + "\n")


# -- one run per folder -----------------------------------------------------------------------------
#
# The lock is a file created with O_EXCL (atomic on local file systems and on NFSv3+), holding who
# took it; its holder refreshes its mtime every LOCK_BEAT_S seconds from a thread. No flock/fcntl:
# their semantics on network file systems vary. A lock is stale, and the next run takes it over
# with a warning, when
#   - its holder ran on this host and that process is gone (checked at once, by pid and the
#     process's start time, so a reused pid does not count), or
#   - it was taken by an earlier attempt of this very Slurm job (same SLURM_JOB_ID, another
#     SLURM_RESTART_COUNT): Slurm ends every task of a job before it requeues it, or
#   - it has not been refreshed for LOCK_STALE_S seconds (a holder on another host that died).
#     This compares the file's mtime with this host's clock: hosts must agree on the time to well
#     under LOCK_STALE_S (NTP does).
LOCK_FILE = ".lock"
LOCK_BEAT_S = 30.0
LOCK_STALE_S = 300.0


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid, started: str | None) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except (TypeError, ValueError, OverflowError):
        return False
    return started is None or process_start(int(pid)) in (None, started)


def stale_reason(holder: dict, age_s: float) -> str | None:
    """Why the lock `holder` took, last refreshed `age_s` ago, no longer holds; None if it holds."""
    if holder.get("host") == socket.gethostname():
        if process_alive(holder.get("pid"), holder.get("pid_start")):
            return None
        return f"its process {holder.get('pid')} on this host has ended"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("job") == job and holder.get("attempt") != os.environ.get("SLURM_RESTART_COUNT", "0"):
        return f"an earlier attempt ({holder.get('attempt')}) of this Slurm job {job} took it"
    if age_s > LOCK_STALE_S:
        return f"its holder has not refreshed it for {age_s:.0f} s (more than {LOCK_STALE_S:.0f} s)"
    return None


def describe_holder(holder: dict) -> str:
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}{job}"


class RunLock:
    """The lock on a run directory for the life of a run (rank 0 holds it); a context manager.

    `RunLock(out)` takes it or raises HarnessError naming the holder. Leaving the context (any
    exit that runs Python: return, error, signal turned exception) releases it; a process killed
    outright leaves a lock that the rules above declare stale.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "job": os.environ.get("SLURM_JOB_ID"),
                   "attempt": os.environ.get("SLURM_RESTART_COUNT", "0"), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._created_dir = False
        if out.exists() and not out.is_dir():
            raise HarnessError(f"--output_dir {out} exists and is not a folder")
        try:
            if not out.exists():
                out.mkdir(parents=True)
                self._created_dir = True
            self._take()
        except OSError as err:
            self._remove_created_dir()
            raise HarnessError(f"--output_dir {out}: cannot write there ({err.strerror or err})") from None
        except HarnessError:
            self._remove_created_dir()
            raise
        self._thread = threading.Thread(target=self._refresh, name="harness-run-lock", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        for _ in range(3):
            if self._create():
                return
            holder, age = self._read()
            if holder is None:
                continue  # it vanished between our attempt and the read: try again
            why = stale_reason(holder, age)
            if why is None:
                raise HarnessError(
                    f"--output_dir {self.path.parent} is in use by another run ({describe_holder(holder)}; lock "
                    f"{self.path}, refreshed {age:.0f} s ago). Wait for it to end or choose another --output_dir; "
                    f"the lock of a run that died is taken over by the next run (at once on the same host, "
                    f"else after {LOCK_STALE_S:.0f} s without refresh)")
            print(f"warning: taking over the lock of {self.path.parent} from {describe_holder(holder)}: {why}",
                  file=sys.stderr, flush=True)
            self._remove_stale(holder)
        raise HarnessError(f"--output_dir {self.path.parent}: could not take its lock {self.path}: other runs keep taking it")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(self.me) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _read(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, 0.0
        try:
            return json.loads(text), age
        except ValueError:
            # Created but not written yet (the O_EXCL create and the write are two steps), or
            # damaged: held while fresh, stale by age like any other.
            return {"host": "?", "pid": "?", "started": "?", "token": None}, age

    def _remove_stale(self, holder: dict) -> None:
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run removed it first
        try:
            if json.loads(aside.read_text()).get("token") != holder.get("token"):
                # A newer lock replaced the stale one between our read and the rename: put it back.
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
        except (OSError, ValueError):
            pass
        aside.unlink(missing_ok=True)

    def _holder_token(self) -> str | None:
        try:
            return json.loads(self.path.read_text()).get("token")
        except (OSError, ValueError):
            return None

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_BEAT_S):
            if self._holder_token() != self.me["token"]:
                print(f"warning: the lock {self.path} is no longer this run's (taken over after this process was "
                      f"silent for {LOCK_STALE_S:.0f} s?); another run may now write into {self.path.parent}",
                      file=sys.stderr, flush=True)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a transient file-system error: the next beat tries again

    def _remove_created_dir(self) -> None:
        if self._created_dir:
            try:
                self.path.parent.rmdir()  # only if still empty: a failed start leaves no trace
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._holder_token() == self.me["token"]:
            self.path.unlink(missing_ok=True)
        self._remove_created_dir()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
