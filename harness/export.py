"""Writing model folders (final/, best/) from any ZeRO stage, with or without LoRA.

A folder is written to `<name>.tmp/` and renamed into place, so a crash never leaves a
half-written final/ or best/. With --lora the folder holds the peft adapter (adapter_config.json,
adapter_model.safetensors) and the tokenizer; with --merge_lora also `merged/`, a full model with
the adapter folded into the base weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness import dist, model as model_mod
from harness.evaluation import replace_folder


def save_model(engine, plan, out: Path, name: str, info: dist.DistInfo) -> Path:
    state_dict = engine.full_state_dict()  # collective under ZeRO-3: every rank takes part
    final, staging = out / name, out / f"{name}.tmp"
    if info.is_rank0:
        shutil.rmtree(staging, ignore_errors=True)
        # For a peft model save_pretrained keeps only the adapter entries of the full state dict.
        engine.module.save_pretrained(staging, state_dict=state_dict)
        plan.tokenizer.save_pretrained(staging)
        if plan.cfg.lora and plan.cfg.merge_lora:
            merged = model_mod.merge_adapter(plan.model_path, staging, plan.dtype, plan.cfg.trust_remote_code)
            merged.save_pretrained(staging / "merged")
            plan.tokenizer.save_pretrained(staging / "merged")
        replace_folder(staging, final)
    dist.barrier()
    return final
