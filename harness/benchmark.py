"""Side by side: this harness against the baseline a user would otherwise run, on the same
model, data, hardware and DeepSpeed config.

    python launch/benchmark.py --data $DATA/alpaca_subset_2k --max_steps 30 --repeats 2

Baseline: `transformers.Trainer` with `TrainingArguments(deepspeed=<the same filled config>)`,
each micro-batch padded to its longest row, no packing. Both sides see the same tokenized rows
(the harness's own preflight tokenizes them), the same micro batch of samples, optimizer
hyper-parameters, constant LR and precision; each side runs in its own process, so peak
memory is per side, and the sides alternate (H B, B H, ...) so a machine that gets busier
over time does not favour one.

Measured per run: real (non-pad) tokens per second of the training loop only (model loading
and tokenization excluded on both sides), the padding efficiency, MFU where the device has a
known peak (harness.throughput), peak memory (CUDA max_memory_allocated, or the process's peak
RSS on the CPU) and the training loss after the same number of samples. The two sides draw
samples in different orders (the harness's seeded sampler vs the Trainer's), so losses agree
in trend, not to the digit.
"""

from __future__ import annotations

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
from transformers import AutoModelForCausalLM

from harness import data, dist, throughput
from harness.config import TASK_FIELDS, BenchConfig, TrainConfig
from harness.engine import init_distributed
from harness.errors import HarnessError
from harness.loss import supervised_tokens
from harness.preflight import preflight
from harness.train import run as train_run

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("harness", "baseline")
BASELINE = "transformers.Trainer + DeepSpeed (same ds_config), pad to longest in batch, no packing"


def train_config(cfg: BenchConfig, out: Path, packing: bool) -> TrainConfig:
    return TrainConfig(model=cfg.model, data=cfg.data, task=cfg.task, template=cfg.template,
                       **{name: getattr(cfg, name) for name in TASK_FIELDS}, ds_config=cfg.ds_config,
                       max_steps=cfg.max_steps, micro_batch_size=cfg.micro_batch_size, grad_accum_steps=1,
                       seq_len=cfg.seq_len, dtype=cfg.dtype, lr=cfg.lr, lr_schedule="constant", seed=cfg.seed,
                       output_dir=str(out), overwrite=True, packing=packing)


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
    return {"real_tokens": sum(real), "slot_tokens": slots, "loop_s": elapsed, "model_flops": flops,
            "losses": result.losses, "dtype": result.setup.dtype}


def run_baseline(cfg: BenchConfig, out: Path) -> dict:
    # Only the baseline's process loads Trainer and what it pulls in: peak memory is measured per side.
    from transformers import Trainer, TrainerCallback, TrainingArguments

    info = init_distributed()
    # The harness's preflight gives the very rows, pad id and filled DeepSpeed config the harness trains on.
    setup = preflight(train_config(cfg, out / "preflight", packing=False), info)
    rows = setup.train_rows
    counts = {"real": 0, "slots": 0, "flops": 0.0}
    flop_model: list = []

    def collate(features):
        batch = data.collate([data.TokenizedRow(-1, f["input_ids"], f["labels"]) for f in features],
                             data.pad_id(setup.tokenizer))
        counts["real"] += int(batch["attention_mask"].sum())
        counts["slots"] += batch["input_ids"].numel()
        if flop_model:
            counts["flops"] += throughput.count_tokens([batch], flop_model[0], supervised_tokens).flops
        return batch

    class LoopClock(TrainerCallback):
        """Times trainer.train()'s loop only, as the harness side times its own."""

        def on_train_begin(self, args, state, control, **kwargs):
            counts["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            counts["end"] = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=1, max_steps=cfg.max_steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
        weight_decay=setup.cfg.weight_decay, adam_beta1=setup.cfg.adam_beta1, adam_beta2=setup.cfg.adam_beta2,
        adam_epsilon=setup.cfg.adam_eps, max_grad_norm=setup.cfg.max_grad_norm, bf16=cfg.dtype == "bf16",
        logging_steps=1, save_strategy="no", report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=0, remove_unused_columns=False, deepspeed=setup.ds_config,
        # Both sides keep only what the model needs; Trainer's length grouping is off by default.
    )
    # After TrainingArguments: under ZeRO-3 it registers the config that from_pretrained reads.
    model = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
                                                 attn_implementation=setup.attn)
    model.config.use_cache = False
    flop_model.append(throughput.flop_model(model))
    dataset = Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[LoopClock()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"real_tokens": counts["real"], "slot_tokens": counts["slots"], "loop_s": counts["end"] - counts["start"],
            "model_flops": counts["flops"], "losses": losses, "dtype": setup.dtype}


def side_main(which: str, cfg_json: str, result_path: str) -> None:
    """One side in this process (the parent runs each side in a fresh one)."""
    cfg = BenchConfig(**json.loads(cfg_json))
    out = Path(result_path).with_suffix("")
    result = (run_harness if which == "harness" else run_baseline)(cfg, out)
    info = dist.info()
    peak, why = throughput.peak_flops(info.device, result["dtype"])
    result.update(throughput.peak_memory(info.device), device=torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
                  peak_flops=peak, mfu_note="" if peak else why,
                  mfu=result["model_flops"] / (result["loop_s"] * peak) if peak else None)
    Path(result_path).write_text(json.dumps(result))


def run(cfg: BenchConfig) -> dict:
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each side is its own world of one
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for r in range(cfg.repeats):
            for which in (SIDES if r % 2 == 0 else SIDES[::-1]):
                path = Path(tmp) / f"{which}-{r}.json"
                proc = subprocess.run([sys.executable, "-m", "harness.benchmark", which, json.dumps(asdict(cfg)), str(path)],
                                      cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise HarnessError(f"benchmark side {which} (repeat {r}) failed:\n{proc.stderr[-4000:]}")
                runs[which].append(json.loads(path.read_text()))
    report = summarize(cfg, runs)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(report) + "\n")
    print(table(report))
    return report


def summarize(cfg: BenchConfig, runs: dict[str, list[dict]]) -> dict:
    sides = {}
    for which, rs in runs.items():
        rates = [r["real_tokens"] / r["loop_s"] for r in rs]
        sides[which] = {
            "real_tokens_per_s": statistics.median(rates), "real_tokens_per_s_runs": rates,
            "padding_efficiency": statistics.median(r["real_tokens"] / r["slot_tokens"] for r in rs),
            "mfu": statistics.median(r["mfu"] for r in rs) if rs[0]["mfu"] is not None else None,
            "mfu_note": rs[0]["mfu_note"],
            "peak_memory_gib": max(r.get("peak_device_mem_gib", r.get("peak_host_rss_gib", 0.0)) for r in rs),
            "peak_memory_kind": "cuda max_memory_allocated" if "peak_device_mem_gib" in rs[0] else "host peak RSS (process)",
            "samples": cfg.max_steps * cfg.micro_batch_size,
            "final_loss": statistics.mean(r["losses"][-1] for r in rs),
            "loss_last5_mean": statistics.mean(statistics.mean(r["losses"][-5:]) for r in rs),
            "loop_s": [r["loop_s"] for r in rs],
        }
    return {
        "config": asdict(cfg), "device": runs["harness"][0]["device"], "baseline": BASELINE,
        "harness": sides["harness"], "baseline_results": sides["baseline"],
        "ratio_real_tokens_per_s": sides["harness"]["real_tokens_per_s"] / sides["baseline"]["real_tokens_per_s"],
        "date": time.strftime("%Y-%m-%d"),
    }


def table(report: dict) -> str:
    h, b = report["harness"], report["baseline_results"]

    def mfu(s):
        return f"{s['mfu']:.1%}" if s["mfu"] is not None else "n/a (" + s["mfu_note"].split(": ", 1)[-1] + ")"

    rows = [("real tokens/s (median)", f"{h['real_tokens_per_s']:,.0f}", f"{b['real_tokens_per_s']:,.0f}"),
            ("padding efficiency", f"{h['padding_efficiency']:.1%}", f"{b['padding_efficiency']:.1%}"),
            ("MFU", mfu(h), mfu(b)),
            (f"peak memory, GiB ({h['peak_memory_kind']})", f"{h['peak_memory_gib']:.2f}", f"{b['peak_memory_gib']:.2f}"),
            (f"loss after {h['samples']} samples (last step / mean of last 5)",
             f"{h['final_loss']:.4f} / {h['loss_last5_mean']:.4f}", f"{b['final_loss']:.4f} / {b['loss_last5_mean']:.4f}")]
    lines = [f"baseline: {report['baseline']}", "| | harness | baseline |", "| --- | --- | --- |"]
    lines += [f"| {a} | {x} | {y} |" for a, x, y in rows]
    lines.append(f"harness / baseline real tokens/s: **{report['ratio_real_tokens_per_s']:.2f}x**")
    return "\n".join(lines)


if __name__ == "__main__":
    side_main(*sys.argv[1:4])
