"""Fault injection for tests: crash, full disk, hang or NaN at a chosen place, without a hook in
the harness itself.

The harness has seams the faults wrap from outside:
  - `harness.dist.heartbeat(step)`, called once at the start of every optimizer step, before any
    of its work: it tells the faults which step runs, and `at="step"` fires just before it;
  - the stages of `harness.checkpoint.save` (SAVE_STAGES), one function each: `at=<stage>`
    fires just before that stage of the save of the step that is running;
  - `harness.engine.Engine.forward_loss_sum`: `nan_at_steps` poisons the training loss there.

In-process tests call `install(monkeypatch.setattr, ...)`. Subprocess tests run
`tests/train_with_faults.py` instead of `launch/train.py`, with the fault in the TEST_FAULT
environment variable (JSON of `install`'s keyword arguments); only that script reads it.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import sys

from harness import checkpoint, dist
from harness.engine import Engine

SAVE_STAGES = ("write_engine_state", "write_rank_files", "write_manifest", "commit", "point_latest")
ENV = "TEST_FAULT"


def install(patch, at: str = "", action: str = "", step: int | None = None, rank: int | None = None,
            nan_at_steps: tuple[int, ...] = ()) -> None:
    """Arm one fault: `action` (crash: like kill -9, enospc: "No space left on device", hang:
    block until killed) just before `at` ("step" or a save stage) of optimizer step `step`
    (1-based, as logged; None: every step) on rank `rank` (None: every rank); and/or a NaN loss
    in the steps `nan_at_steps`. `patch` is monkeypatch.setattr in-process, setattr in a subprocess."""
    current = {"step": None}
    here = rank is None or rank == int(os.environ.get("RANK", 0))

    def fire(where: str) -> None:
        if not (here and where == at and step in (None, current["step"])):
            return
        if action == "crash":
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if action == "hang":
            signal.pause()  # like a stuck kernel or a dead NFS mount: only the launcher can end us
        raise ValueError(f"unknown fault action {action!r}")

    heartbeat = dist.heartbeat

    def heartbeat_with_faults(n: int) -> None:
        current["step"] = n
        fire("step")
        heartbeat(n)

    patch(dist, "heartbeat", heartbeat_with_faults)

    for name in SAVE_STAGES:
        def stage_with_faults(*args, _stage=getattr(checkpoint, name), _name=name, **kwargs):
            fire(_name)
            return _stage(*args, **kwargs)

        patch(checkpoint, name, stage_with_faults)

    if nan_at_steps:
        forward_loss_sum = Engine.forward_loss_sum

        def poisoned(self, batch):
            loss_sum = forward_loss_sum(self, batch)
            if current["step"] in nan_at_steps and loss_sum.requires_grad:  # training, not evaluation
                loss_sum = loss_sum * float("nan")
            return loss_sum

        patch(Engine, "forward_loss_sum", poisoned)


def env(**fault) -> dict[str, str]:
    """The environment variable that makes tests/train_with_faults.py arm `fault`."""
    return {ENV: json.dumps(fault)}


def install_from_env() -> None:
    fault = json.loads(os.environ.get(ENV, "{}"))
    if fault:
        install(builtins.setattr, **fault)
