"""The run directory: refuse one that is not ours, prepare it, write what describes the run.

    output_dir/
      config.json          flags, resolved settings and the filled DeepSpeed config (`TrainSetup.resolved`)
      data_report.json     what the data looks like after tokenization (harness.report)
      metrics.jsonl        one record per logged step and per evaluation (harness.metrics)
      tensorboard/         the same numbers for TensorBoard
      checkpoints/         step-N/ folders and `latest` (harness.checkpoint)
      eval/                step-N.json and step-N.predictions.jsonl per evaluation
      best/, final/        Hugging Face folders (harness.export)

Preflight calls the checks (nothing is written or deleted before every input has passed);
`prepare` runs on rank 0 once training starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness import dist
from harness.checkpoint import replace_atomically
from harness.config import TrainConfig
from harness.errors import HarnessError

# Checkpoint bytes per parameter. A trained parameter: fp32 master weight and two fp32 Adam moments
# (12 bytes) plus the module weight (up to 4). A frozen one (LoRA's base weights) has no optimizer
# state, only its module weight in the training precision. RNG, config and tokenizer are small.
TRAINED_BYTES_PER_PARAM = 16
FROZEN_BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}


def check_output_dir(out: Path, overwrite: bool, resume: str = "", resume_from: Path | None = None) -> None:
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--output_dir {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
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
                           f"{need / 2**30:.1f} GiB for {kept} checkpoints of a {model}, "
                           f"but {existing} has {free / 2**30:.1f} GiB free; lower --keep_last or free space")


def prepare(out: Path, resume_from: Path | None, resume_step: int, info: dist.DistInfo) -> None:
    """Rank 0 empties a run directory that will be replaced (preflight proved it is ours) or, on a
    resume in place, drops the metrics of steps that will run again; every rank waits for it."""
    if info.is_rank0:
        if continues_in_place(out, resume_from):
            drop_metrics_after(out / "metrics.jsonl", resume_step)
        elif out.exists() and any(out.iterdir()):
            shutil.rmtree(out)
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
