"""Side by side: this harness against what a user would otherwise run, on the same model, data,
hardware and DeepSpeed config.

    python launch/benchmark.py --data $DATA/alpaca_subset_2k/alpaca_data.json --max_steps 20 --repeats 2

Sides (`--baselines`; `auto` is the Trainer, plus TRL when `trl` is installed):
  harness  this harness's training loop with these flags, packing on.
  trainer  `transformers.Trainer` with `TrainingArguments(deepspeed=<the same filled config>)`,
           each micro-batch padded to its longest row, no packing.
  trl      TRL's `SFTTrainer` with the same DeepSpeed config, `packing=True` (best-fit decreasing
           into rows of seq_len) and padding-free (a step's packed rows flattened into one row
           with cumulative sequence lengths): TRL's fastest documented SFT layout.

Every side trains on the very rows the harness's preflight tokenizes (same template, prompt
masking and truncation: completion-only loss everywhere), with the same optimizer
hyper-parameters, constant LR, precision and DeepSpeed config, and on the same number of
samples: the harness and the Trainer take `micro_batch_size` samples per optimizer step for
`max_steps` steps. TRL packs the whole data set before it samples, so its step is B packed rows;
B is chosen so that a step holds `micro_batch_size` samples on average, and the run stops once it
has trained on as many samples as the others (the samples and steps each side actually took are
reported). The baselines use `--baseline_attn` (auto: FlashAttention-2 when installed, else SDPA,
what a user of those tools gets by default); the harness uses its own `--attn auto` choice.

Each side runs in its own fresh process (peak memory is per side; only the TRL process imports
trl), alternating the order between repeats (H T L, L T H, ...) so a machine that gets busier over
time favours none. Measured per run: real (non-pad) tokens per second of the training loop only
(model loading, tokenization and TRL's packing excluded on every side), padding efficiency, MFU
where the device has a known peak (harness.throughput), peak memory (CUDA max_memory_allocated,
or the process's peak RSS on the CPU) and the training loss after the same samples. The sides draw
samples in different orders, so losses agree in trend, not to the digit.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from harness import data, dist, model as model_mod, throughput
from harness.config import TASK_FIELDS, BenchConfig, TrainConfig
from harness.engine import init_distributed
from harness.errors import HarnessError
from harness.preflight import TrainSetup, preflight
from harness.train import run as train_run

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ("trainer", "trl")
DESCRIPTIONS = {
    "harness": "this harness, packed",
    "trainer": "transformers.Trainer + DeepSpeed (same ds_config), pad to longest in batch, no packing",
    "trl": "TRL SFTTrainer + DeepSpeed (same ds_config), packing=True (bfd), padding-free",
}
TITLES = {"harness": "harness", "trainer": "Trainer", "trl": "TRL SFTTrainer"}


def train_config(cfg: BenchConfig, out: Path, packing: bool) -> TrainConfig:
    return TrainConfig(model=cfg.model, data=cfg.data, task=cfg.task, template=cfg.template,
                       **{name: getattr(cfg, name) for name in TASK_FIELDS}, ds_config=cfg.ds_config,
                       max_steps=cfg.max_steps, micro_batch_size=cfg.micro_batch_size, grad_accum_steps=1,
                       seq_len=cfg.seq_len, dtype=cfg.dtype, lr=cfg.lr, lr_schedule="constant", seed=cfg.seed,
                       output_dir=str(out), overwrite=True, packing=packing)


def sides(cfg: BenchConfig) -> list[str]:
    """The sides to run, the harness first; `auto` adds TRL only where it is installed."""
    if cfg.baselines == "auto":
        names = ["trainer"] + (["trl"] if importlib.util.find_spec("trl") else [])
    else:
        names = [s.strip() for s in cfg.baselines.split(",") if s.strip()]
    if "trl" in names and importlib.util.find_spec("trl") is None:
        raise HarnessError("--baselines trl: the trl package is not installed (pip install -e '.[dev]')")
    return ["harness", *names]


# -- one side, in its own process ------------------------------------------------------------


def run_harness(cfg: BenchConfig, out: Path) -> dict:
    result = train_run(train_config(cfg, out, packing=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    # log_every 1: each record's rates cover exactly its own step, so elapsed = tokens / rate.
    totals = [r["tokens"] for r in records]
    real = [b - a for a, b in zip([0] + totals, totals)]
    elapsed = sum(n / r["tokens_per_s"] for n, r in zip(real, records))
    slots = sum(n / r["padding_efficiency"] for n, r in zip(real, records))
    flops = sum(r["model_tflops_per_s"] * 1e12 * n / r["tokens_per_s"] for n, r in zip(real, records))
    attn = json.loads((out / "config.json").read_text())["resolved"]["attn_implementation"]
    return {"real_tokens": sum(real), "slot_tokens": slots, "loop_s": elapsed, "model_flops": flops,
            "losses": result.losses, "dtype": result.setup.dtype, "attn": attn, "steps": len(records),
            "samples": len(records) * cfg.micro_batch_size}


class Tally(TrainerCallback):
    """Counts what the Trainer's steps trained on and times its loop, as the harness times its own.

    The collator records every batch it builds; the Trainer's data loader builds one batch ahead of
    the step that uses it, so a step's figures are read by step index, and the batch built last
    (never trained on) is left out. `stop_after_samples` ends training at the step boundary nearest
    to that many samples (TRL's steps hold a varying number).
    """

    def __init__(self, collate, flop_model: throughput.FlopModel, stop_after_samples: int = 0,
                 samples_per_step: int = 0):
        self.collate, self.flop_model = collate, flop_model
        # Stop once less than half a step's worth is missing: the boundary nearest to the target.
        self.stop_after = stop_after_samples - samples_per_step // 2
        self.batches: list[tuple[int, int, int, float]] = []  # (real tokens, slots, samples, model FLOPs)
        self.start = self.end = 0.0
        self.steps = 0

    def __call__(self, features):
        batch, lengths = self.collate(features)
        real = sum(lengths)
        self.batches.append((real, batch["input_ids"].numel(), len(lengths), self.flop_model.step_flops(real, lengths)))
        return batch

    def trained(self) -> list[tuple[int, int, int, float]]:
        return self.batches[:self.steps]

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step
        if self.stop_after > 0 and sum(b[2] for b in self.trained()) >= self.stop_after:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()
        self.steps = state.global_step


def baseline_attention(cfg: BenchConfig, info: dist.DistInfo, dtype: str) -> str:
    """--baseline_attn: auto is what a user of the Trainer or TRL gets by default on this machine."""
    if cfg.baseline_attn == "auto":
        return "flash_attention_2" if model_mod.flash_attn_usable(info.device, dtype) is None else "sdpa"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # the kernels registered by now

    if cfg.baseline_attn != "eager" and cfg.baseline_attn not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise HarnessError(f"--baseline_attn {cfg.baseline_attn!r} is not a registered attention kernel "
                           f"(eager, {', '.join(sorted(ALL_ATTENTION_FUNCTIONS.valid_keys()))})")
    return cfg.baseline_attn


def baseline_setup(cfg: BenchConfig, out: Path) -> tuple[dist.DistInfo, TrainSetup, str]:
    """The harness's preflight gives the very rows, pad id and filled DeepSpeed config the harness trains on."""
    info = init_distributed()
    setup = preflight(train_config(cfg, out / "preflight", packing=False), info)
    return info, setup, baseline_attention(cfg, info, setup.dtype)


def training_arguments(cfg: BenchConfig, setup: TrainSetup, info: dist.DistInfo, out: Path, batch_size: int,
                       max_steps: int, ds_config: dict) -> dict:
    """TrainingArguments fields shared by the Trainer and TRL sides: optimizer, precision, schedule, logging."""
    return dict(
        # use_cpu: transformers 5.17 refuses bf16 on a machine without a GPU unless told it is meant.
        use_cpu=info.device.type == "cpu",
        output_dir=str(out), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        max_steps=max_steps, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=setup.cfg.weight_decay, adam_beta1=setup.cfg.adam_beta1, adam_beta2=setup.cfg.adam_beta2,
        adam_epsilon=setup.cfg.adam_eps, max_grad_norm=setup.cfg.max_grad_norm, bf16=cfg.dtype == "bf16",
        fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], seed=cfg.seed,
        data_seed=cfg.seed, dataloader_num_workers=0, deepspeed=ds_config)


def load_baseline_model(setup: TrainSetup, cfg: BenchConfig, attn: str):
    # Called after TrainingArguments: under ZeRO-3 they register the config that from_pretrained reads.
    model = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=model_mod.DTYPES[cfg.dtype],
                                                 attn_implementation=attn, local_files_only=True, use_safetensors=True)
    model.config.use_cache = False
    return model


def baseline_result(tally: Tally, trainer, setup: TrainSetup) -> dict:
    trained = tally.trained()
    return {"real_tokens": sum(b[0] for b in trained), "slot_tokens": sum(b[1] for b in trained),
            "samples": sum(b[2] for b in trained), "model_flops": sum(b[3] for b in trained),
            "loop_s": tally.end - tally.start, "steps": tally.steps, "dtype": setup.dtype,
            "attn": trainer.model.config._attn_implementation,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def run_trainer(cfg: BenchConfig, out: Path) -> dict:
    # Only this side's process loads Trainer and what it pulls in: peak memory is measured per side.
    from transformers import Trainer, TrainingArguments

    info, setup, attn = baseline_setup(cfg, out)
    rows = setup.train_rows
    pad = data.pad_id(setup.tokenizer)

    def collate(features):
        batch = data.collate([data.TokenizedRow(-1, f["input_ids"], f["labels"]) for f in features], pad)
        return batch, [len(f["input_ids"]) for f in features]

    # The harness's own checks allow exactly this side's flags; Trainer's length grouping is off by default.
    args = TrainingArguments(**training_arguments(cfg, setup, info, out / "trainer", cfg.micro_batch_size,
                                                  cfg.max_steps, setup.ds_config), remove_unused_columns=False)
    model = load_baseline_model(setup, cfg, attn)
    tally = Tally(collate, throughput.flop_model(model))
    dataset = Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=tally, callbacks=[tally])
    trainer.train()
    return baseline_result(tally, trainer, setup)


def run_trl(cfg: BenchConfig, out: Path) -> dict:
    # Only this side's process imports trl (seconds, and its memory is measured per side).
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import pack_dataset  # trl as well

    info, setup, attn = baseline_setup(cfg, out)
    rows = setup.train_rows
    # Tokenized rows with labels: SFTTrainer keeps them as they are (no re-tokenizing, no EOS added)
    # and packs them itself; pack_dataset here is the same deterministic call, to count its bins.
    dataset = Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})
    bins = len(pack_dataset(dataset, setup.seq_len, "bfd"))
    per_step = max(1, round(cfg.micro_batch_size * bins / len(rows)))
    target = cfg.max_steps * cfg.micro_batch_size
    # The same DeepSpeed config; its batch fields count TRL's packed rows, which is what TRL hands DeepSpeed.
    ds = {**setup.ds_config, "train_micro_batch_size_per_gpu": per_step, "train_batch_size": per_step * info.world_size}
    # max_steps is only a bound: the tally stops the run at `target` samples.
    args = SFTConfig(**training_arguments(cfg, setup, info, out / "trl", per_step, 4 * cfg.max_steps + 10, ds),
                     max_length=setup.seq_len, packing=True, packing_strategy="bfd", padding_free=True)
    model = load_baseline_model(setup, cfg, attn)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=setup.tokenizer)
    trl_collate = trainer.data_collator

    def collate(features):
        return trl_collate(features), [n for f in features for n in f["seq_lengths"]]

    # TRL refuses a custom collator with padding-free; wrapping its own one after construction
    # counts what it builds and changes nothing in it.
    tally = Tally(collate, throughput.flop_model(model), stop_after_samples=target,
                  samples_per_step=cfg.micro_batch_size)
    trainer.data_collator = tally
    trainer.add_callback(tally)
    trainer.train()
    return {**baseline_result(tally, trainer, setup), "rows_per_step": per_step, "packed_rows": bins}


RUNNERS = {"harness": run_harness, "trainer": run_trainer, "trl": run_trl}


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "deepspeed", "trl"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def side_main(which: str, cfg_json: str, result_path: str) -> None:
    """One side in this process (the parent runs each side in a fresh one)."""
    cfg = BenchConfig(**json.loads(cfg_json))
    out = Path(result_path).with_suffix("")
    result = RUNNERS[which](cfg, out)
    info = dist.info()
    peak, why = throughput.peak_flops(info.device, result["dtype"])
    result.update(throughput.peak_memory(info.device), versions=versions(), peak_flops=peak,
                  device=torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
                  mfu_note="" if peak else why, mfu=result["model_flops"] / (result["loop_s"] * peak) if peak else None)
    Path(result_path).write_text(json.dumps(result))


# -- the parent: alternate the sides, summarize ------------------------------------------------


def run(cfg: BenchConfig) -> dict:
    names = sides(cfg)
    runs: dict[str, list[dict]] = {s: [] for s in names}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each side is its own world of one
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for r in range(cfg.repeats):
            for which in (names if r % 2 == 0 else names[::-1]):
                path = Path(tmp) / f"{which}-{r}.json"
                proc = subprocess.run([sys.executable, "-m", "harness.benchmark", which, json.dumps(asdict(cfg)), str(path)],
                                      cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise HarnessError(f"benchmark side {which} (repeat {r}) failed:\n{proc.stderr[-4000:]}")
                runs[which].append(json.loads(path.read_text()))
                print(f"{which} (repeat {r}): {runs[which][-1]['real_tokens'] / runs[which][-1]['loop_s']:,.0f} "
                      "real tokens/s", flush=True)
    report = summarize(cfg, runs)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(report) + "\n")
    print(table(report))
    return report


def summarize(cfg: BenchConfig, runs: dict[str, list[dict]]) -> dict:
    summary = {}
    for which, rs in runs.items():
        rates = [r["real_tokens"] / r["loop_s"] for r in rs]
        summary[which] = {
            "description": DESCRIPTIONS[which],
            "real_tokens_per_s": statistics.median(rates), "real_tokens_per_s_runs": rates,
            "padding_efficiency": statistics.median(r["real_tokens"] / r["slot_tokens"] for r in rs),
            "mfu": statistics.median(r["mfu"] for r in rs) if rs[0]["mfu"] is not None else None,
            "mfu_note": rs[0]["mfu_note"],
            "peak_memory_gib": max(r.get("peak_device_mem_gib", r.get("peak_host_rss_gib", 0.0)) for r in rs),
            "peak_memory_kind": "cuda max_memory_allocated" if "peak_device_mem_gib" in rs[0] else "host peak RSS (process)",
            "samples": statistics.median(r["samples"] for r in rs),
            "steps": statistics.median(r["steps"] for r in rs),
            "attn": rs[0]["attn"],
            "final_loss": statistics.mean(r["losses"][-1] for r in rs),
            "loss_last5_mean": statistics.mean(statistics.mean(r["losses"][-5:]) for r in rs),
            "loop_s": [r["loop_s"] for r in rs],
        }
        if "rows_per_step" in rs[0]:
            summary[which]["rows_per_step"] = rs[0]["rows_per_step"]
    harness = summary["harness"]["real_tokens_per_s"]
    first = runs["harness"][0]
    return {"config": asdict(cfg), "device": first["device"], "versions": first["versions"],
            "date": time.strftime("%Y-%m-%d"), "sides": summary,
            "ratios": {which: harness / summary[which]["real_tokens_per_s"] for which in summary if which != "harness"}}


def table(report: dict) -> str:
    names = list(report["sides"])
    s = report["sides"]

    def mfu(x):
        return f"{x['mfu']:.1%}" if x["mfu"] is not None else "n/a (" + x["mfu_note"].split(": ", 1)[-1] + ")"

    def loss(x):
        return f"{x['final_loss']:.4f} / {x['loss_last5_mean']:.4f}"

    def samples(x):
        per_step = x["samples"] / x["steps"] if x["steps"] else float("nan")
        return f"{x['samples']:.0f} in {x['steps']:.0f} steps ({per_step:.1f}/step)"

    rows = [("real tokens/s (median)", lambda x: f"{x['real_tokens_per_s']:,.0f}"),
            ("padding efficiency", lambda x: f"{x['padding_efficiency']:.1%}"),
            ("MFU", mfu),
            (f"peak memory, GiB ({s['harness']['peak_memory_kind']})", lambda x: f"{x['peak_memory_gib']:.2f}"),
            ("samples trained on", samples),
            ("loss after them (last step / mean of last 5)", loss),
            ("attention kernel", lambda x: str(x["attn"]))]
    lines = [f"{TITLES[n]}: {s[n]['description']}" for n in names if n != "harness"]
    lines += ["| | " + " | ".join(TITLES[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt(s[n]) for n in names) + " |" for label, fmt in rows]
    lines += [f"harness / {TITLES[n]} real tokens/s: **{r:.2f}x**" for n, r in report["ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    side_main(*sys.argv[1:4])
