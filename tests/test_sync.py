"""The sync budget: device-to-host reads per optimizer step of the training loop.

On a GPU every read of a device value (`.item()`, `.tolist()`, `float(t)`, `if t:`, `nonzero`, ...)
stalls the host until the device has caught up, so the host can no longer queue work ahead of
it. The loop's budget (harness/train.py says why each read is there):

    harness       1 per step: the all-reduced [loss sum, stop votes (+ grad norm on log steps)], one copy
    transformers  0 on packed rows (they carry their boundaries; no mask is built, nothing is
                  rediscovered); on padded micro-batches (--packing False) transformers' own 2 per
                  forward (masking_utils asks whether the padding mask lets SDPA use is_causal)
    DeepSpeed     its own, measured here (deepspeed 0.19.8) and documented in docs/performance.md:
                  ZeRO-2: 2 (`is_invalid_grad_norm` on the overflow check and on the clipping norm)
                  ZeRO-3: 1 (`is_invalid_grad_norm`)
                  + 1 in both: torch's AdamW reads its step counter (`_get_value`), a host tensor
                  unless the optimizer is fused or capturable

On the CPU every tensor is a host tensor, so the test counts the calls that WOULD read the device
on a GPU, by patching those methods during a real in-process run, per step (the step comes from the
`dist.heartbeat` seam, as in tests/faults.py), on the main thread only (the prefetch thread does
host-side numpy work by design). Reads inside C++ ops (boolean-mask indexing, masked_select) are
invisible to the patch; the CUDA test below catches those with torch's sync debug mode.
"""

import collections
import json
import sys
import threading
import warnings

import pytest
import torch

from conftest import parity_flags
from harness import dist, ds_config
from harness.config import TrainConfig

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero", "numpy", "cpu")
TORCH_READS = ("nonzero", "equal", "allclose", "is_nonzero")
BUDGET = {"harness": 1, "transformers": 0, "other": 0}
DEEPSPEED = {"zero2": 3, "zero3": 2}


def origin(filename: str) -> str:
    for name in ("harness", "deepspeed", "transformers"):
        if f"/{name}/" in filename:
            return name
    return "other"


def count_reads(monkeypatch, flags: dict) -> dict[int, collections.Counter]:
    """Run training with `flags`; step -> Counter of (origin, where) of every device read on the main thread."""
    from harness.train import run

    main = threading.main_thread()
    current = {"step": 0}
    reads: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def counted(name, original):
        def read(*args, **kwargs):
            if threading.current_thread() is main:
                frame = sys._getframe(1)
                caller = frame
                while frame is not None and "/torch/" in frame.f_code.co_filename:
                    frame = frame.f_back  # torch calling itself (its optimizer): charge whoever called torch
                where = frame.f_code.co_filename if frame is not None else "?"
                reads[current["step"]][(origin(where), f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")] += 1
            return original(*args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in TORCH_READS:
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    heartbeat = dist.heartbeat

    def beat(step: int) -> None:
        current["step"] = step
        heartbeat(step)

    monkeypatch.setattr(dist, "heartbeat", beat)
    run(TrainConfig(**flags))
    monkeypatch.undo()
    return reads


def check_budget(reads: dict, steps: range, stage: str, padded_forwards: int = 0) -> None:
    for step in steps:  # not the first (warm-up) nor the last step (the final export follows it)
        by_origin = collections.Counter()
        for (who, _), n in reads[step].items():
            by_origin[who] += n
        detail = "\n".join(f"  {n} x {who}: {where}" for (who, where), n in reads[step].items())
        for who, limit in {**BUDGET, "transformers": 2 * padded_forwards}.items():
            assert by_origin[who] <= limit, f"step {step}: {by_origin[who]} {who} reads, budget {limit}:\n{detail}"
        assert by_origin["deepspeed"] <= DEEPSPEED[stage], f"step {step}: DeepSpeed reads grew:\n{detail}"
        assert by_origin["harness"] == 1, detail  # the loss is read every step (NaN guard, stop vote)


@pytest.mark.parametrize("stage, packing, chunked_ce", [
    ("zero2", True, 16),
    pytest.param("zero3", True, 16, marks=pytest.mark.slow),
    pytest.param("zero2", False, 0, marks=pytest.mark.slow),
])
def test_one_device_read_per_optimizer_step(stage, packing, chunked_ce, tiny_model, parity_data, tmp_path, monkeypatch):
    # Two micro-steps of two samples: the 4 short samples fit one bin, so the second micro-step is a
    # filler row; log every 2nd step, so steps with and without a log line are both counted.
    flags = parity_flags(tiny_model, parity_data, tmp_path / "run", ds_config=stage, packing=packing,
                         chunked_ce=chunked_ce, micro_batch_size=2, grad_accum_steps=2, log_every=2, max_steps=5)
    reads = count_reads(monkeypatch, flags)
    assert sum(reads[1].values()) > 0  # the patch sees reads at all: the test could fail
    check_budget(reads, range(2, 5), stage, padded_forwards=0 if packing else 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode needs a CUDA GPU")
def test_no_hidden_synchronisation_on_the_gpu(tiny_model, parity_data, tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode warns on every synchronising CUDA call, C++ ones included."""
    from harness.train import run

    current = {"step": 0}
    heartbeat = dist.heartbeat

    def beat(step: int) -> None:
        current["step"] = step
        heartbeat(step)

    monkeypatch.setattr(dist, "heartbeat", beat)
    syncs: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    # torch's fused AdamW through DeepSpeed: no FusedAdam build, and no host-side step counter.
    raw = ds_config.load("zero2")
    raw["optimizer"]["params"].update(torch_adam=True, fused=True)
    (tmp_path / "zero2.json").write_text(json.dumps(raw))
    flags = parity_flags(tiny_model, parity_data, tmp_path / "run", dtype="bf16", packing=True, chunked_ce=16,
                         micro_batch_size=2, grad_accum_steps=2, log_every=2, max_steps=5,
                         ds_config=str(tmp_path / "zero2.json"))
    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            syncs[current["step"]][(origin(filename), f"{filename}:{lineno}")] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(TrainConfig(**flags))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert sum(syncs[1].values()) > 0  # the debug mode reports at all: the test could fail
    for step in range(2, 5):
        mine = {k: n for k, n in syncs[step].items() if k[0] in ("harness", "transformers")}
        assert sum(n for (who, _), n in mine.items() if who == "harness") <= BUDGET["harness"], mine
        assert not [k for k in mine if k[0] == "transformers"], mine
