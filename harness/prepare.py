"""Tokenize ahead of time (a CPU-only cluster step) into a folder `--data` accepts.

The folder holds the tokenized dataset and `prepared.json` with the key inputs it was made
with; a training run refuses it if its tokenizer, template, task, masking policy, seq_len or
harness version differ. Bins are not stored: they depend on the run's global batch and seed
and cost milliseconds per step, so `launch/train.py` computes them; this step reports the fill
rate they will have for the given batch (measured as the training run's data report does: on
every step of an epoch, or on a seeded sample of its steps when it is long).

Its flags (`harness.config.PrepareConfig`) are training's: the run that reads the folder must be
given the same --model, --task, field flags, --template and --seq_len, and every task's field
flags are accepted here as they are there.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from harness import data, data_cache, default_assets, model as model_mod, report, tasks
from harness.batches import StepBatches
from harness.config import PrepareConfig, TrainConfig
from harness.errors import HarnessError
from harness.tasks.common import load_template



def prepare(pc: PrepareConfig) -> dict:
    out = Path(pc.output)
    if out.exists():
        if not pc.overwrite:
            raise HarnessError(f"--output {out} exists; choose another folder or pass --overwrite")
        if not data_cache.is_prepared(str(out)):
            raise HarnessError(f"--output {out} was not written by prepare_data; refusing to delete it")
        shutil.rmtree(out)
    model_path = pc.model or str(default_assets.default_model_dir())
    # Every flag this step shares with training (PrepareConfig is derived from TrainConfig), so the
    # tokens are made exactly as the training run with the same flags would make them.
    train_flags = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{**{f.name: getattr(pc, f.name) for f in dataclasses.fields(pc) if f.name in train_flags},
                         "model": model_path})
    model_config = model_mod.check_model_dir(model_path, cfg.trust_remote_code)
    seq_len = model_mod.resolve_seq_len(cfg.seq_len, model_config)
    tokenizer = model_mod.load_tokenizer(model_path, cfg.trust_remote_code)
    task = tasks.get(cfg.task)
    tasks.setup_tokenizer(task, cfg, tokenizer)
    template = load_template(cfg.template)
    tokenized = data_cache.build(pc.data, cfg, task, template, tokenizer, seq_len, cfg.num_proc, "--data")
    inputs = data_cache.key_inputs(pc.data, model_path, cfg, template, seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_cache.write_entry(out, tokenized, inputs, str(Path(pc.data).resolve()), tokenizer.eos_token_id)

    # The fill estimate reads the folder as training will: memory-mapped, per-row counts stored.
    rows, stats = data.rows_from_dataset(data_cache.load_prepared(out, None, "--output"), tokenizer.eos_token_id)
    data.check_supervised(stats, f"--data {pc.data}")
    sampler = data.StepSampler(len(rows), pc.micro_batch_size, pc.grad_accum_steps, pc.world_size, pc.seed)
    layout = report.layout_entry(StepBatches(rows, sampler, data.pad_id(tokenizer), True, seq_len),
                                 sampler.steps_per_epoch, seq_len)
    summary = {"output": str(out), "rows_read": stats.rows, "rows_kept": len(rows), "seq_len": seq_len,
               "prompt_truncated": stats.prompt_truncated, "target_truncated": stats.target_truncated,
               "steps_per_epoch": sampler.steps_per_epoch, "steps_measured": layout["steps_measured"],
               "bins_per_step": layout["bins_per_step"], "bin_fill_rate": layout["bin_fill_rate"]}
    print(json.dumps(summary, indent=2), flush=True)
    return summary
