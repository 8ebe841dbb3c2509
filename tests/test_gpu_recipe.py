"""The GPU recipe's helpers, on the CPU (scripts/gpu/): what a short GPU loan depends on must not
first fail there.

- ds_configs.py writes configs the harness accepts, with torch's fused AdamW (no op build);
- make_model.py --weights False gives a folder the harness refuses (every weight missing) and that
  train_wrapped.py lets through, the harness's own loading code then initialising it randomly;
- the profiler table counts each kernel once (a CPU operator's device time is its kernels' time);
- collect.py turns a run's metrics into the figures (MFU time-weighted, profiled steps left out) and
  reports a missing artifact as missing;
- bench_ce_memory.py (the `ce` step) runs every variant through the harness's losses to one loss.
"""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from harness import ds_config, model as model_mod
from harness.config import TrainConfig
from harness.ds_config import BatchSizes
from harness.errors import HarnessError


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_ds_configs_use_torch_fused_adamw_and_pass_the_harness_checks(tmp_path):
    script("ds_configs").main(str(tmp_path))
    shipped = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == shipped
    for name in shipped:
        raw = ds_config.load(str(tmp_path / name))
        filled = ds_config.fill(raw, TrainConfig(), BatchSizes(4, 1, 1), "bf16", on_cpu=False)
        assert filled["optimizer"]["params"]["torch_adam"] is True and filled["optimizer"]["params"]["fused"] is True
        offload = ds_config.offloads_optimizer(raw)
        assert filled.get("zero_force_ds_cpu_optimizer", True) is (not offload), name
        assert filled["zero_optimization"] == json.loads((ROOT / "ds_configs" / name).read_text())["zero_optimization"]


def test_a_folder_without_weights_is_refused_by_the_harness_and_loads_random_in_the_wrapper(tiny_model, tmp_path,
                                                                                          monkeypatch):
    out = tmp_path / "tiny-7b"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu" / "make_model.py"), "tiny-7b", str(out),
                    f"--tokenizer={tiny_model}", "--weights=False"], check=True, capture_output=True, cwd=ROOT)
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) < 1024  # no weights written
    with pytest.raises(HarnessError, match=r"weight\(s\) missing from the folder"):
        model_mod.check_model_dir(str(out), False)
    wrapped = script("train_wrapped")
    assert wrapped.placeholder_only(str(out)) and not wrapped.placeholder_only(str(tiny_model))
    monkeypatch.setattr(model_mod, "check_load_report", wrapped.random_init_check(model_mod.check_load_report))
    model_mod.check_model_dir(str(out), False)
    model = model_mod.load_model(str(out), "fp32", "sdpa", False, False)
    shape = script("make_model").SHAPES["tiny-7b"]
    assert model.config.hidden_size == shape["hidden_size"] and model.config.vocab_size == shape["vocab_size"]
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and p.abs().sum() > 0, name
        if name.endswith("proj.weight"):
            assert 0.005 < p.std() < 0.05, (name, p.std())  # the model's own init (std 0.02), not garbage


def fake_event(key, device, self_device_us, self_cpu_us=0, count=1):
    device_type = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(key=key, count=count, device_type=device_type, self_device_time_total=self_device_us,
                           self_cpu_time_total=self_cpu_us)


def test_profile_table_counts_each_kernel_once_and_by_category():
    wrapped = script("train_wrapped")
    averages = [fake_event("aten::mm", False, 900, 50), fake_event("sm90_xmma_gemm_bf16bf16_bf16f32", True, 900, count=4),
                fake_event("aten::_flash_attention_forward", False, 300, 20), fake_event("flash_fwd_kernel", True, 300),
                fake_event("ProfilerStep#5", False, 1200, 10), fake_event("void at::native::vectorized_elementwise", True, 100),
                fake_event("Memcpy HtoD (Pageable -> Device)", True, 50)]
    rows, on_device = wrapped.kernel_rows(averages)
    assert on_device and sorted(r[0] for r in rows) == sorted(["sm90_xmma_gemm_bf16bf16_bf16f32", "flash_fwd_kernel",
                                                                "void at::native::vectorized_elementwise",
                                                                "Memcpy HtoD (Pageable -> Device)"])
    lines = wrapped.kernel_table(rows, on_device, steps=2, spans=[(0, 10), (5, 15), (20, 30)])
    text = "\n".join(lines)
    assert "1.4 ms in all, 0.7 ms per step" in text  # 900 + 300 + 100 + 50 us, not 2,700 with the operators
    assert "| matmul | 0.45 | 66.7% |" in text and "| attention | 0.15 | 22.2% |" in text
    assert "| copies, fills, casts | 0.03 | 3.7% |" in text
    assert "device busy 83.3% of the 0.0 ms" in text  # 25 of 30 us covered by a kernel
    # A CPU-only run: the operators by their own CPU time, the step markers left out.
    rows, on_device = wrapped.kernel_rows([fake_event("aten::mm", False, 0, 70), fake_event("ProfilerStep#1", False, 0, 9)])
    assert not on_device and rows == [("aten::mm", 1, 70.0)]


def metrics_line(step, seconds, tokens, mfu):
    return {"step": step, "loss": 2.0 - step / 100, "tokens_per_s": tokens / seconds, "step_time_s": seconds,
            "padding_efficiency": 1.0, "mfu": mfu, "model_tflops_per_s": mfu * 989.5, "peak_device_mem_gib": 40.0 + step,
            "time_forward_s": seconds / 3}


def test_collect_weights_mfu_by_time_leaves_out_warm_up_and_profiled_steps(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    run = runs / "mfu" / "run"
    run.mkdir(parents=True)
    lines = [metrics_line(1, 10.0, 1000, 0.01), metrics_line(2, 2.0, 1000, 0.2)]
    lines += [metrics_line(s, 1.0 if s % 2 else 3.0, 1000, 0.5 if s % 2 else 0.1) for s in range(3, 7)]
    lines += [metrics_line(7, 9.0, 1000, 0.05), metrics_line(8, 9.0, 1000, 0.05)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 9, "lo')  # cut by a kill
    (run / "config.json").write_text(json.dumps({"resolved": {"attn_implementation": "sdpa"},
                                                 "ds_config": {"optimizer": {"type": "AdamW"}}}))
    monkeypatch.setenv("RUNS", str(runs))
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("PROFILE_STEPS", "5:2")
    collect = script("collect")
    collect.main("mfu", "0", "42")
    collect.main("bench", "124", "200")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    mfu = records[0]["figures"]
    # Steps 1-2 warm up, 5 warms the profiler up and 6-7 are profiled: the timed ones are 3 (1 s, MFU 0.5),
    # 4 (3 s, 0.1) and 8 (9 s, 0.05).
    assert mfu["timed_steps"] == [3, 8] and mfu["steps_logged"] == 8
    assert mfu["mfu"] == pytest.approx((0.5 * 1 + 0.1 * 3 + 0.05 * 9) / 13)
    assert mfu["tokens_per_s"] == pytest.approx(3000 / 13) and mfu["peak_mem_gib"] == 48.0 and mfu["attn"] == "sdpa"
    assert mfu["profile_categories"] == "missing"
    assert records[1]["status"] == "timeout" and "bench-1b.json" in records[1]["figures"]["missing"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("mfu    ok") and "mfu=0.09615" in summary[0] and "MISSING" in summary[1]


def test_ce_memory_script_runs_each_variant_to_the_same_loss(tmp_path):
    """scripts/bench_ce_memory.py (the recipe's `ce` step) at toy shapes: every variant runs through
    the harness's own loss functions and gives the plain loss."""
    out = tmp_path / "ce.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ce_memory.py"), "--device", "cpu",
                           "--seq_len", "2048", "--hidden", "32", "--vocab", "1000", "--dtype", "float32",
                           "--chunks", "0,256", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, chunked = [json.loads(line) for line in out.read_text().splitlines()]
    assert plain["chunked_ce"] == 0 and chunked["chunked_ce"] == 256 and plain["supervised"] > 0
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-5)
