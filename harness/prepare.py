"""Tokenize ahead of time (a CPU-only cluster step) into a folder `--data` accepts.

The folder holds the tokenized dataset and `prepared.json` with the key inputs it was made
with; a training run refuses it if its tokenizer, template, task, masking policy, seq_len or
harness version differ. Bins are not stored: they depend on the run's global batch and seed
and cost milliseconds per step, so `launch/train.py` computes them; this step reports the fill
rate they will have for the given batch.

Its flags (`harness.config.PrepareConfig`) are training's: the run that reads the folder must be
given the same --model, --task, field flags, --template and --seq_len, and every task's field
flags are accepted here as they are there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness import data, data_cache, default_assets, model as model_mod, packing, tasks
from harness.config import TASK_FIELDS, PrepareConfig, TrainConfig
from harness.errors import HarnessError
from harness.tasks.common import load_template

# The flags that decide the tokens, passed to training's own tokenization (harness.data_cache).
TOKENIZATION_FLAGS = ("task", "template", *TASK_FIELDS, "trust_remote_code", "seq_len", "num_proc")


def prepare(pc: PrepareConfig) -> dict:
    out = Path(pc.output)
    if out.exists():
        if not pc.overwrite:
            raise HarnessError(f"--output {out} exists; choose another folder or pass --overwrite")
        if not data_cache.is_prepared(str(out)):
            raise HarnessError(f"--output {out} was not written by prepare_data; refusing to delete it")
        shutil.rmtree(out)
    model_path = pc.model or str(default_assets.default_model_dir())
    cfg = TrainConfig(**{f: getattr(pc, f) for f in TOKENIZATION_FLAGS}, data=pc.data, model=model_path)
    model_config = model_mod.check_model_dir(model_path, cfg.trust_remote_code)
    seq_len = model_mod.resolve_seq_len(cfg.seq_len, model_config)
    tokenizer = model_mod.load_tokenizer(model_path, cfg.trust_remote_code)
    template = load_template(cfg.template)
    tokenized = data_cache.build(pc.data, cfg, tasks.get(cfg.task), template, tokenizer, seq_len, cfg.num_proc, "--data")
    inputs = data_cache.key_inputs(pc.data, model_path, cfg, template, seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_cache.write_entry(out, tokenized, inputs, str(Path(pc.data).resolve()))

    rows, stats = data.rows_from_dataset(tokenized, tokenizer.eos_token_id)
    data.check_supervised(stats, f"--data {pc.data}")
    sampler = data.StepSampler(len(rows), pc.micro_batch_size, pc.grad_accum_steps, pc.world_size, pc.seed)
    lengths = [len(r.input_ids) for r in rows]
    fill = [sum(lengths[i] for i in b)
            for step in range(sampler.steps_per_epoch)
            for b in packing.pack_step(sampler.step_rows(step), lengths, seq_len, pc.world_size, pc.grad_accum_steps).bins()]
    summary = {"output": str(out), "rows_read": stats.rows, "rows_kept": len(rows), "seq_len": seq_len,
               "prompt_truncated": stats.prompt_truncated, "target_truncated": stats.target_truncated,
               "bins_per_epoch": len(fill), "bin_fill_rate": sum(fill) / (len(fill) * seq_len)}
    print(json.dumps(summary, indent=2), flush=True)
    return summary

