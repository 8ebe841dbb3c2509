"""Fault injection for tests: crash, full disk, hang or NaN at a chosen place, without a hook in
the harness itself.

The harness has seams the faults wrap from outside:
  - `harness.dist.heartbeat(step)`, called once at the start of every optimizer step, before any
    of its work: it tells the faults which step runs, and `at="step"` fires just before it;
  - the stages of `harness.checkpoint.save` (SAVE_STAGES), one function each: `at=<stage>`
    fires just before that stage of the save of the step that is running;
  - `harness.engine.Engine.forward_loss_sum`: `nan_at_steps` poisons the training loss there, and
    `at="forward"` fires just before it (inside a step, after its heartbeat);
  - `harness.model.load_model`: `at="load_model"` fires just before the model loads;
  - `harness.dist.all_reduce_sum` and `harness.dist.sum_and_read`: `at="collective"` fires just
    before either (in a training step, sum_and_read's all-reduce is the step's own, after its
    optimizer step);
  - `harness.engine.Engine.optimizer_step`: `nan_weights_at_steps` writes a NaN into a weight
    right after the update of those steps (into this rank's shard under ZeRO-3).

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

import torch

from harness import checkpoint, dist, model
from harness.engine import Engine

SAVE_STAGES = ("write_engine_state", "write_rank_files", "write_manifest", "commit", "point_latest")
ENV = "TEST_FAULT"


def install(patch, at: str = "", action: str = "", step: int | None = None, rank: int | None = None,
            nan_at_steps: tuple[int, ...] = (), nan_weights_at_steps: tuple[int, ...] = ()) -> None:
    """Arm one fault: `action` (crash: like kill -9, enospc: "No space left on device", hang:
    block until killed, stop: SIGSTOP itself, usr1: send itself SIGUSR1) just before `at`
    ("step", "collective", "forward", "load_model" or a save stage) of optimizer step `step` (1-based, as
    logged; None: every step) on rank `rank` (None: every rank); and/or a NaN loss in the steps
    `nan_at_steps`, a NaN weight after the update of the steps `nan_weights_at_steps`. `patch` is
    monkeypatch.setattr in-process, setattr in a subprocess."""
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
            while True:  # like a stuck kernel or a dead NFS mount: only a kill ends us, not a handled signal
                signal.pause()
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)  # like ^Z or a frozen host: every thread stops
            return
        if action == "usr1":
            os.kill(os.getpid(), signal.SIGUSR1)
            return
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

    forward_loss_sum = Engine.forward_loss_sum

    def forward_with_faults(self, batch):
        fire("forward")
        loss_sum = forward_loss_sum(self, batch)
        if current["step"] in nan_at_steps and loss_sum.requires_grad:  # training, not evaluation
            loss_sum = loss_sum * float("nan")
        return loss_sum

    patch(Engine, "forward_loss_sum", forward_with_faults)

    load_model = model.load_model

    def load_model_with_faults(*args, **kwargs):
        fire("load_model")
        return load_model(*args, **kwargs)

    patch(model, "load_model", load_model_with_faults)

    all_reduce_sum = dist.all_reduce_sum

    def all_reduce_sum_with_faults(values):
        fire("collective")
        return all_reduce_sum(values)

    patch(dist, "all_reduce_sum", all_reduce_sum_with_faults)
    sum_and_read = dist.sum_and_read

    def sum_and_read_with_faults(*args, **kwargs):
        fire("collective")
        return sum_and_read(*args, **kwargs)

    patch(dist, "sum_and_read", sum_and_read_with_faults)

    if nan_weights_at_steps:
        optimizer_step = Engine.optimizer_step

        def step_then_poison(self, *args, **kwargs):
            updated = optimizer_step(self, *args, **kwargs)
            if here and current["step"] in nan_weights_at_steps:
                weight = next(p for p in self.module.parameters())
                with torch.no_grad():
                    getattr(weight, "ds_tensor", weight).view(-1)[0] = float("nan")
            return updated

        patch(Engine, "optimizer_step", step_then_poison)


def env(**fault) -> dict[str, str]:
    """The environment variable that makes tests/train_with_faults.py arm `fault`."""
    return {ENV: json.dumps(fault)}


def install_from_env() -> None:
    fault = json.loads(os.environ.get(ENV, "{}"))
    if fault:
        install(builtins.setattr, **fault)
