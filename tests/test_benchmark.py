"""launch/benchmark.py: the harness side gets the flags given, the summary arithmetic, and both sides end to end
on the tiny model (the JSON holds positive figures)."""

import json

import pytest

from conftest import launch_ok
from harness.benchmark import summarize, table, train_config
from harness.config import BenchConfig


def test_the_harness_side_trains_with_the_flags_given(tmp_path):
    cfg = BenchConfig(task="classification", labels="a,b", text_field="sentence", max_steps=3, seq_len=64, lr=1e-3)
    train = train_config(cfg, tmp_path / "run", packing=True)
    assert (train.task, train.labels, train.text_field, train.max_steps, train.seq_len, train.lr) == (
        "classification", "a,b", "sentence", 3, 64, 1e-3)
    assert train.lr_schedule == "constant" and train.grad_accum_steps == 1 and train.packing


def test_summary_takes_medians_and_the_ratio_of_real_token_rates():
    def side(real_tokens, seconds, slots):
        return {"real_tokens": real_tokens, "slot_tokens": slots, "loop_s": seconds, "model_flops": 0.0,
                "losses": [2.0, 1.0], "mfu": None, "mfu_note": "MFU omitted: cpu", "device": "cpu",
                "peak_host_rss_gib": 1.5}

    cfg = BenchConfig(max_steps=2, micro_batch_size=4)
    report = summarize(cfg, {"harness": [side(100, 1.0, 100), side(100, 2.0, 100), side(100, 4.0, 100)],
                             "baseline": [side(100, 2.0, 200)]})
    assert report["harness"]["real_tokens_per_s"] == 50.0 and report["baseline_results"]["real_tokens_per_s"] == 50.0
    assert report["ratio_real_tokens_per_s"] == 1.0
    assert report["baseline_results"]["padding_efficiency"] == 0.5 and report["harness"]["samples"] == 8
    assert "**1.00x**" in table(report)


@pytest.mark.slow
def test_benchmark_smoke(tiny_model, parity_data, tmp_path):
    out = tmp_path / "bench.json"
    launch_ok("python", 1, [f"--model={tiny_model}", f"--data={parity_data}", "--max_steps=3", "--repeats=1",
                            "--micro_batch_size=4", "--seq_len=128", f"--output={out}"], script_name="benchmark.py")
    report = json.loads(out.read_text())
    assert "transformers.Trainer" in report["baseline"] and report["device"] == "cpu"
    for side in (report["harness"], report["baseline_results"]):
        assert side["real_tokens_per_s"] > 0 and 0 < side["padding_efficiency"] <= 1
        assert side["peak_memory_gib"] > 0 and side["peak_memory_kind"].startswith("host")
        assert side["mfu"] is None and "MFU omitted" in side["mfu_note"]
        assert side["samples"] == 12 and side["final_loss"] > 0
    # Same samples' worth of training from the same initial weights: the losses agree in trend.
    assert abs(report["harness"]["final_loss"] - report["baseline_results"]["final_loss"]) < 0.5
    assert report["ratio_real_tokens_per_s"] > 0
    assert "harness / baseline" in out.with_suffix(".md").read_text()
