"""GPU checks (marked `cuda`, skipped without a CUDA GPU): `bash scripts/gpu/run_checks.sh` runs them
on the lent GPU together with the benchmarks, with DeepSpeed's CUDA accelerator. On CPU machines they
skip themselves.

- bf16 ZeRO-2 and ZeRO-3 training runs end to end on the GPU, packed rows on the varlen kernel
  harness.attention picks (config.json names it, and it is the one that ran), gradients
  accumulated in fp32;
- MFU is accounted sanely on the GPU: the peak comes from the device's row of the table, and the
  logged FLOPs per token are the model's 6 N plus attention, never more than the device can do.

Isolation of packed samples on each GPU kernel (torch's varlen_attn; flash-attn's when installed)
is tested in tests/test_packing.py, the GPU sync budget in tests/test_sync.py.

The runs use DeepSpeed's `torch_adam` with torch's fused AdamW: the default FusedAdam is a CUDA op
compiled with nvcc on first use, one to two minutes of a short GPU loan for nothing the tests check.
"""

import json

import pytest
import torch

from conftest import ROOT, parity_flags, read_metrics
from harness import attention
from harness.config import TrainConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def fused_adamw_config(tmp_path, name: str) -> str:
    """The shipped config `name` with torch's fused AdamW (no DeepSpeed op build)."""
    raw = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    raw["optimizer"]["params"].update(torch_adam=True, fused=True)
    path = tmp_path / f"{name}-fused-adamw.json"
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_bf16_training_smoke(ds_config, tiny_model, parity_data, tmp_path):
    from harness.train import run

    flags = parity_flags(tiny_model, parity_data, tmp_path / "run", dtype="bf16",
                         ds_config=fused_adamw_config(tmp_path, ds_config), max_steps=20, lr=3e-3, packing=True)
    result = run(TrainConfig(**flags))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["resolved"]["dtype"] == "bf16" and config["ds_config"]["bf16"]["enabled"] is True
    assert config["ds_config"]["data_types"] == {"grad_accum_dtype": "fp32"}
    kernel = config["resolved"]["attn_kernel"]
    assert kernel in ("flash_attn_varlen", "torch_varlen_attn") and attention.kernels_run[kernel] > 0
    assert all(m["tokens_per_s"] > 0 for m in read_metrics(result.output_dir) if "loss" in m)

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(result.output_dir / "final")
    assert final.dtype == torch.bfloat16


def test_mfu_is_accounted_against_the_devices_peak(tiny_model, parity_data, tmp_path):
    """A ~100M-parameter model (wide enough to keep the GPU busy for a moment), 6 bf16 steps."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from harness.throughput import flop_model, peak_flops
    from harness.train import run

    config = AutoConfig.from_pretrained(tiny_model)
    config.update(dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=64))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = tmp_path / "model-100m"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)

    flags = parity_flags(folder, parity_data, tmp_path / "run", dtype="bf16",
                         ds_config=fused_adamw_config(tmp_path, "zero2"), max_steps=6, micro_batch_size=32,
                         packing=True)
    result = run(TrainConfig(**flags))
    peak, name = peak_flops(torch.device("cuda", 0), "bf16")
    assert peak is not None, f"{name}: the lent GPU must be in harness.throughput.PEAK_FLOPS"
    per_token_linear = flop_model(model).linear_flops_per_token
    for m in [m for m in read_metrics(result.output_dir) if "loss" in m][1:]:  # step 1 includes warm-up
        assert 0 < m["mfu"] < 1, m
        assert m["mfu"] == pytest.approx(m["model_tflops_per_s"] * 1e12 / peak, rel=1e-6)
        flops_per_token = m["model_tflops_per_s"] * 1e12 / m["tokens_per_s"]
        # 6 N per token from the matmuls, plus attention's s^2 term: short samples add a few percent.
        assert per_token_linear <= flops_per_token <= 1.5 * per_token_linear, (flops_per_token, per_token_linear)

