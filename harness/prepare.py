"""Tokenize ahead of time (a CPU-only cluster step) into a folder `--data` accepts.

The folder holds the tokenized dataset and `prepared.json` with the key inputs it was made
with; a training run refuses it if its tokenizer, template, task, masking policy, seq_len or
harness version differ. Bins are not stored: they depend on the run's global batch and seed
and cost milliseconds per step, so `launch/train.py` computes them; this step reports the fill
rate they will have for the given batch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness import data, data_cache, model as model_mod, packing, tasks
from harness.config import TrainConfig, _coerce_types, flag
from harness.errors import HarnessError
from harness.tasks.common import load_template

SHARED = ("task", "template", "instruction_field", "input_field", "output_field", "trust_remote_code",
          "seq_len", "num_proc", "micro_batch_size", "grad_accum_steps", "seed")


@dataclass(frozen=True)
class PrepareConfig:
    data: str = flag("", "Data file to tokenize (.json/.jsonl/.csv/.parquet or a save_to_disk folder).")
    output: str = flag("", "Folder to write; pass it to launch/train.py --data.")
    world_size: int = flag(1, "Ranks of the training run, for the fill-rate estimate of its bins.")
    overwrite: bool = flag(False, "Replace an existing output folder written by this step.")
    model: str = flag("", "Local model folder whose tokenizer to use. Empty: the embedded tiny default model.")
    task: str = flag("instruction", "Task that turns a row into (prompt, target): instruction.")
    template: str = flag("", "Prompt template or a file holding one. Empty: the task's default template.")
    instruction_field: str = flag("instruction", "Row field holding the instruction.")
    input_field: str = flag("input", "Row field holding the optional input.")
    output_field: str = flag("output", "Row field holding the target response.")
    trust_remote_code: bool = flag(False, "Allow the model folder to run its own Python code.")
    seq_len: int = flag(0, "Maximum tokens per row, as in training. 0: min(2048, the model's maximum).")
    num_proc: int = flag(0, "Processes that tokenize (datasets.map num_proc); 0: 1 for small data, else one per core up to 8.")
    micro_batch_size: int = flag(4, "Samples per micro-batch of the training run (fill-rate estimate).")
    grad_accum_steps: int = flag(1, "Micro-batches per step of the training run (fill-rate estimate).")
    seed: int = flag(42, "Seed of the training run (fill-rate estimate).")

    def __post_init__(self):
        _coerce_types(self)  # fire parses values as Python literals


def prepare(pc: PrepareConfig) -> dict:
    if not pc.data or not pc.output:
        raise HarnessError("--data and --output are both required")
    out = Path(pc.output)
    if out.exists():
        if not pc.overwrite:
            raise HarnessError(f"--output {out} exists; choose another folder or pass --overwrite")
        if not data_cache.is_prepared(str(out)):
            raise HarnessError(f"--output {out} was not written by prepare_data; refusing to delete it")
        shutil.rmtree(out)
    model_path = pc.model
    if not model_path:
        from harness import default_assets

        model_path = str(default_assets.default_model_dir())
    cfg = TrainConfig(**{f: getattr(pc, f) for f in SHARED}, data=pc.data, model=model_path)
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

