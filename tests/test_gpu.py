"""GPU checks (marked `cuda`, skipped without a CUDA GPU): `bash scripts/gpu/run_checks.sh` runs them
on the lent H100 together with the benchmarks. On CPU machines they skip themselves.

- bf16 ZeRO-2 and ZeRO-3 training runs end to end on the GPU, packed rows on the varlen kernel
  harness.attention picks (config.json names it, and it is the one that ran).

Isolation of packed samples on each GPU kernel (torch's varlen_attn; flash-attn's when installed)
is tested in tests/test_packing.py, the GPU sync budget in tests/test_sync.py.
"""

import json

import pytest
import torch

from conftest import parity_flags, read_metrics
from harness import attention
from harness.config import TrainConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_bf16_training_smoke(ds_config, tiny_model, parity_data, tmp_path):
    from harness.train import run

    flags = parity_flags(tiny_model, parity_data, tmp_path / "run", dtype="bf16", ds_config=ds_config, max_steps=20,
                         lr=3e-3, packing=True)
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
