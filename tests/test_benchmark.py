"""launch/benchmark.py: the harness side gets the flags given, the baselines count only what they
trained on, the summary arithmetic, and every side end to end on the tiny model (the JSON holds
positive figures, the losses after the same samples agree in trend)."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import launch_ok
from harness.benchmark import Tally, sides, summarize, table, train_config
from harness.config import BenchConfig
from harness.errors import HarnessError
from harness.throughput import FlopModel


def test_the_harness_side_trains_with_the_flags_given(tmp_path):
    cfg = BenchConfig(task="classification", labels="a,b", text_field="sentence", max_steps=3, seq_len=64, lr=1e-3)
    train = train_config(cfg, tmp_path / "run", packing=True)
    assert (train.task, train.labels, train.text_field, train.max_steps, train.seq_len, train.lr) == (
        "classification", "a,b", "sentence", 3, 64, 1e-3)
    assert train.lr_schedule == "constant" and train.grad_accum_steps == 1 and train.packing


def test_baselines_flag_picks_the_sides_and_refuses_unknown_ones():
    assert sides(BenchConfig(baselines="trainer")) == ["harness", "trainer"]
    assert sides(BenchConfig(baselines="trl, trainer")) == ["harness", "trl", "trainer"]
    trl = ["trl"] if importlib.util.find_spec("trl") else []
    assert sides(BenchConfig()) == ["harness", "trainer", *trl]
    for bad in ("accelerate", "trainer,trainer", ","):
        with pytest.raises(HarnessError, match="--baselines"):
            BenchConfig(baselines=bad)


def test_tally_counts_only_the_batches_trained_on_and_stops_nearest_the_target():
    # The Trainer's loader builds one batch ahead of the step that uses it: the last one built is not trained on.
    tally = Tally(lambda features: ({"input_ids": torch.zeros(1, sum(features))}, features),
                  FlopModel(linear_flops_per_token=10, n_layers=1, attn_width=1), stop_after_samples=12,
                  samples_per_step=4)
    control = SimpleNamespace(should_training_stop=False)
    for step, lengths in enumerate([[5, 5, 5], [7, 7, 7, 7], [2, 2, 2, 2], [9, 9, 9, 9, 9]], start=1):
        tally(lengths)  # step `step` collates its batch ...
        if step > 1:  # ... while step - 1 runs
            tally.on_step_end(None, SimpleNamespace(global_step=step - 1), control)
            if control.should_training_stop:
                break
    # 3 + 4 = 7 samples after step 2 (more than 2 short of 12), 11 after step 3: the nearest boundary.
    assert tally.steps == 3 and control.should_training_stop
    assert [b[2] for b in tally.trained()] == [3, 4, 4] and len(tally.batches) == 4
    # real tokens, slots, samples, model FLOPs: 10 per token + 12 x layers x width x sum of s^2
    assert tally.trained()[0] == (15, 15, 3, 10 * 15 + 12 * 1 * 1 * (3 * 5**2))


def test_summary_takes_medians_and_the_ratio_of_real_token_rates():
    def side(real_tokens, seconds, slots):
        return {"real_tokens": real_tokens, "slot_tokens": slots, "loop_s": seconds, "model_flops": 0.0,
                "losses": [2.0, 1.0], "mfu": None, "mfu_note": "MFU omitted: cpu", "device": "cpu",
                "peak_host_rss_gib": 1.5, "samples": 8, "steps": 2, "attn": "sdpa", "versions": {"torch": "x"}}

    cfg = BenchConfig(max_steps=2, micro_batch_size=4)
    report = summarize(cfg, {"harness": [side(100, 1.0, 100), side(100, 2.0, 100), side(100, 4.0, 100)],
                             "trainer": [side(100, 2.0, 200)], "trl": [side(100, 0.5, 100)]})
    assert report["sides"]["harness"]["real_tokens_per_s"] == 50.0
    assert report["sides"]["trainer"]["real_tokens_per_s"] == 50.0 and report["sides"]["trl"]["real_tokens_per_s"] == 200
    assert report["ratios"] == {"trainer": 1.0, "trl": 0.25}
    assert report["sides"]["trainer"]["padding_efficiency"] == 0.5 and report["sides"]["harness"]["samples"] == 8
    text = table(report)
    assert "harness / Trainer real tokens/s: **1.00x**" in text and "harness / TRL SFTTrainer real tokens/s: **0.25x**" in text


@pytest.mark.slow
def test_benchmark_smoke(tiny_model, parity_data, tmp_path):
    out = tmp_path / "bench.json"
    launch_ok("python", 1, [f"--model={tiny_model}", f"--data={parity_data}", "--max_steps=3", "--repeats=1",
                            "--micro_batch_size=4", "--seq_len=128", "--baselines=trainer", f"--output={out}"],
              script_name="benchmark.py")
    report = json.loads(out.read_text())
    assert "transformers.Trainer" in report["sides"]["trainer"]["description"] and report["device"] == "cpu"
    assert set(report["sides"]) == {"harness", "trainer"} and set(report["ratios"]) == {"trainer"}
    for side in report["sides"].values():
        assert side["real_tokens_per_s"] > 0 and 0 < side["padding_efficiency"] <= 1
        assert side["peak_memory_gib"] > 0 and side["peak_memory_kind"].startswith("host")
        assert side["mfu"] is None and "MFU omitted" in side["mfu_note"]
        assert side["samples"] == 12 and side["steps"] == 3 and side["final_loss"] > 0
    # Same samples' worth of training from the same initial weights: the losses agree in trend.
    assert abs(report["sides"]["harness"]["final_loss"] - report["sides"]["trainer"]["final_loss"]) < 0.5
    assert report["ratios"]["trainer"] > 0
    assert "harness / Trainer" in out.with_suffix(".md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is a dev extra: pip install -e '.[dev]'")
def test_trl_side_trains_packed_padding_free_on_the_same_samples(tiny_model, parity_data, tmp_path):
    out = tmp_path / "bench.json"
    launch_ok("python", 1, [f"--model={tiny_model}", f"--data={parity_data}", "--max_steps=4", "--repeats=1",
                            "--micro_batch_size=8", "--seq_len=256", "--baselines=trl", f"--output={out}"],
              script_name="benchmark.py")
    report = json.loads(out.read_text())
    trl, harness = report["sides"]["trl"], report["sides"]["harness"]
    assert "SFTTrainer" in trl["description"] and report["versions"]["trl"]
    # Padding-free: every position computed on is a sample's token.
    assert trl["padding_efficiency"] == 1.0 and trl["real_tokens_per_s"] > 0
    # It stops at the first step boundary past 32 - 8 / 2 samples; its steps hold 8 samples on average.
    assert harness["samples"] == 32 and 28 <= trl["samples"] <= 48, trl
    assert trl["rows_per_step"] >= 1 and trl["attn"] == "sdpa"
    # The same rows, model and optimizer: the loss after the same samples agrees in trend.
    assert abs(trl["final_loss"] - harness["final_loss"]) < 0.5 and report["ratios"]["trl"] > 0
