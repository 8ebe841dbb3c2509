"""launch/benchmark.py end to end on the tiny model: both sides run, the JSON holds positive figures."""

import json

from conftest import launch_ok


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
