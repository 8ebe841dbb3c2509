"""Hugging Face model folders: from the live engine (final/, best/) and from a checkpoint.

`save_model` writes final/ or best/ from any ZeRO stage, with or without LoRA: the folder is
written to `<name>.tmp/` and renamed into place, so a crash never leaves a half-written one.
With --lora it holds the peft adapter and the tokenizer; with --merge_lora also `merged/`, a full
model with the adapter folded into the base weights.

`export` turns a training checkpoint into an HF folder, without the ranks that wrote it:

    python launch/export.py runs/exp1/checkpoints/step-1000 exported/ [--dtype bf16] [--max_shard_size 5GB]

Any checkpoint (ZeRO-2 or ZeRO-3, any world size) is consolidated in one process on CPU by
DeepSpeed's own converter, shard by shard from memory-mapped files, into sharded safetensors;
config and tokenizer come from the checkpoint's `hf/` folder. The result is then reloaded with
`from_pretrained` and compared tensor by tensor with the checkpoint before it is published
(written to `OUT.tmp`, renamed to `OUT`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from harness import checkpoint, dist, engine as engine_mod, model as model_mod
from harness.config import ExportConfig
from harness.errors import HarnessError, NonFiniteWeights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(cfg: ExportConfig) -> Path:
    ckpt = checkpoint.resolve_resume(cfg.checkpoint, Path(cfg.checkpoint), content=True)
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HarnessError(f"{out} exists and is not empty; choose another folder")
    state = json.loads((ckpt / checkpoint.STATE).read_text())
    dtype_name = state["config"]["resolved"]["dtype"] if cfg.dtype == "auto" else cfg.dtype
    dtype = DTYPES[dtype_name]

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    engine_mod.consolidate_checkpoint(ckpt / "ds", staging, dtype, cfg.max_shard_size)
    for item in (ckpt / "hf").iterdir():
        shutil.copy2(item, staging / item.name)
    set_config_dtype(staging / "config.json", dtype_name)
    mismatches = compare_with_checkpoint(staging, ckpt, dtype)
    if mismatches:
        raise HarnessError(f"the exported weights differ from the checkpoint in {mismatches}; nothing published")
    if out.exists():
        out.rmdir()
    staging.rename(out)
    print(f"exported {ckpt} -> {out} ({dtype_name}, verified against the checkpoint)")
    return out


def set_config_dtype(path: Path, dtype_name: str) -> None:
    config = json.loads(path.read_text())
    config["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype_name]
    path.write_text(json.dumps(config, indent=2) + "\n")


def compare_with_checkpoint(folder: Path, ckpt: Path, dtype: torch.dtype) -> list[str]:
    """Reload the export through transformers and compare every tensor with the checkpoint's."""
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()
    expected = engine_mod.lazy_checkpoint_tensors(ckpt / "ds")
    bad = [name for name in expected if name not in loaded]
    for name, lazy in expected.items():
        if name in loaded and not torch.equal(loaded[name], lazy.contiguous().to(dtype)):
            bad.append(name)
    return bad


def save_model(engine: engine_mod.Engine, setup, out: Path, name: str, info: dist.DistInfo) -> Path:
    """`out/<name>/` (final/ or best/) from the live engine; `setup` is the run's preflight.TrainSetup.

    Never from non-finite weights: every rank checks what it holds first (a collective), and a NaN
    or Inf anywhere fails the run (exit 3) with nothing published and an existing folder kept."""
    bad = engine.non_finite_weights()
    if bad:
        raise NonFiniteWeights(f"the weights hold NaN or Inf ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); "
                               f"{out / name} was not written. Newest checkpoint that verifies by content: "
                               f"{checkpoint.newest_verified(out / 'checkpoints', warn=lambda _: None, content=True) or 'none'}")
    state_dict = engine.full_state_dict()  # collective under ZeRO-3: every rank takes part
    final, staging = out / name, out / f"{name}.tmp"
    if info.is_rank0:
        shutil.rmtree(staging, ignore_errors=True)
        # For a peft model save_pretrained keeps only the adapter entries of the full state dict.
        engine.module.save_pretrained(staging, state_dict=state_dict)
        setup.tokenizer.save_pretrained(staging)
        if setup.cfg.lora and setup.cfg.merge_lora:
            merged = model_mod.merge_adapter(setup.model_path, staging, setup.dtype, setup.cfg.trust_remote_code)
            merged.save_pretrained(staging / "merged")
            setup.tokenizer.save_pretrained(staging / "merged")
        replace_folder(staging, final)
    dist.barrier()
    return final


def replace_folder(staging: Path, final: Path) -> None:
    """Put a fully written `staging` folder in place of `final` (which may exist, e.g. best/)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)  # a crash before this leaves <name>.tmp, never a half-written <name>/
    shutil.rmtree(old, ignore_errors=True)
