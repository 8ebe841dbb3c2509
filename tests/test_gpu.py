"""GPU checks (marked `cuda`, skipped without a CUDA GPU): `bash scripts/gpu/run_checks.sh` runs them
on the lent H100 together with the benchmarks. On CPU machines they skip themselves.

- bf16 ZeRO-2 and ZeRO-3 training runs end to end on the GPU with the kernel `--attn auto` picks;
- packed rows on the GPU attention path do not attend across samples (SDPA in bf16 here;
  FlashAttention-2 varlen is tested in tests/test_packing.py when flash_attn is installed).
"""

import json

import pytest
import torch

from conftest import parity_flags, read_metrics
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
    assert all(m["tokens_per_s"] > 0 for m in read_metrics(result.output_dir) if "loss" in m)

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(result.output_dir / "final")
    assert final.dtype == torch.bfloat16


def test_packed_rows_are_isolated_on_the_gpu_sdpa_path(tiny_model):
    from transformers import AutoModelForCausalLM

    from test_packing import check_isolation

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    assert check_isolation(model, torch.device("cuda")) < 2e-2  # bf16 rounding, not leakage (leakage is ~0.5)
