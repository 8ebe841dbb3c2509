"""DeepSpeed configs: every shipped one fills from the flags; contradictions are errors."""

import json

import pytest

from harness import ds_config
from harness.config import TrainConfig
from harness.ds_config import BatchSizes
from harness.errors import HarnessError

SHIPPED = sorted(p.stem for p in ds_config.SHIPPED_DIR.glob("*.json"))


def test_the_four_configs_ship():
    assert SHIPPED == ["zero2", "zero2_offload", "zero3", "zero3_offload"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_opens_with_its_command_and_fills(name):
    raw = ds_config.load(name)
    assert next(iter(raw)) == "_usage" and f"--ds_config ds_configs/{name}.json" in raw["_usage"]
    cfg = TrainConfig(micro_batch_size=3, grad_accum_steps=5, lr=1e-4, weight_decay=0.1, max_grad_norm=0.5)
    filled = ds_config.fill(raw, cfg, BatchSizes(3, 5, 4), dtype="bf16", on_cpu=False)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"], filled["train_batch_size"]) == (3, 5, 60)
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"] == {"enabled": True} and filled["fp16"] == {"enabled": False}
    assert filled["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    assert not any(k.startswith("_") for k in filled) and "auto" not in json.dumps(filled)
    assert filled["zero_optimization"]["stage"] == (3 if "zero3" in name else 2)
    offload = filled["zero_optimization"].get("offload_optimizer", {})
    assert (offload.get("device") == "cpu" and offload.get("pin_memory") is True) == name.endswith("offload")
    if name == "zero3_offload":
        assert filled["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_cpu_uses_torch_adam_unless_offloading():
    cfg = TrainConfig()
    assert ds_config.fill(ds_config.load("zero2"), cfg, BatchSizes(1, 1, 1), "fp32", on_cpu=True)["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in ds_config.fill(ds_config.load("zero2_offload"), cfg, BatchSizes(1, 1, 1), "fp32", on_cpu=True)["optimizer"]["params"]
    assert "torch_adam" not in ds_config.fill(ds_config.load("zero2"), cfg, BatchSizes(1, 1, 1), "bf16", on_cpu=False)["optimizer"]["params"]


def test_explicit_values_that_agree_are_accepted():
    raw = ds_config.load("zero3")
    raw.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4, train_batch_size=16, gradient_clipping=1.0)
    raw["optimizer"]["params"]["lr"] = 2e-5
    filled = ds_config.fill(raw, TrainConfig(micro_batch_size=2, grad_accum_steps=4), BatchSizes(2, 4, 2), "fp32", on_cpu=True)
    assert filled["train_batch_size"] == 16


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.update(train_micro_batch_size_per_gpu=8), ["train_micro_batch_size_per_gpu=8", "--micro_batch_size"]),
    (lambda d: d.update(train_batch_size=64), ["train_batch_size=64", "--micro_batch_size 2 x --grad_accum_steps 4 x world size 2"]),
    (lambda d: d.update(gradient_accumulation_steps=1), ["gradient_accumulation_steps=1", "--grad_accum_steps"]),
    (lambda d: d.update(gradient_clipping=0.3), ["gradient_clipping=0.3", "--max_grad_norm"]),
    (lambda d: d["bf16"].update(enabled=True), ["bf16.enabled=true", "--dtype fp32"]),
    (lambda d: d["optimizer"]["params"].update(lr=0.1), ["optimizer.params.lr=0.1", "--lr"]),
    (lambda d: d["optimizer"]["params"].update(weight_decay=0.5), ["weight_decay=0.5", "--weight_decay"]),
    (lambda d: d.update(scheduler={"type": "WarmupLR"}), ["scheduler", "--lr_schedule"]),
    (lambda d: d.pop("optimizer"), ["no \"optimizer\" block"]),
    (lambda d: d.update(optimizer={"type": "Lamb", "params": {}}), ["only AdamW/Adam"]),
    (lambda d: d["zero_optimization"].update(reduce_bucket_size="auto"), ["zero_optimization.reduce_bucket_size"]),
])
def test_contradictions_name_both_sides(edit, named):
    raw = ds_config.load("zero3")
    edit(raw)
    with pytest.raises(HarnessError) as err:
        ds_config.fill(raw, TrainConfig(micro_batch_size=2, grad_accum_steps=4), BatchSizes(2, 4, 2), "fp32", on_cpu=True)
    for text in named:
        assert text in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(HarnessError, match="no such file.*shipped configs: zero2, zero2_offload, zero3, zero3_offload"):
        ds_config.load(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": "auto",}')
    with pytest.raises(HarnessError, match="invalid JSON"):
        ds_config.load(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(HarnessError, match="expected a JSON object"):
        ds_config.load(str(bad))


def test_batch_sizes_are_the_one_computation():
    sizes = BatchSizes(micro_batch_size=3, grad_accum_steps=2, world_size=4)
    assert sizes.global_batch_size == 24 and sizes.rows_per_rank_step == 6


@pytest.mark.parametrize("name", SHIPPED)
def test_bf16_accumulates_gradients_in_fp32(name):
    cfg = TrainConfig(micro_batch_size=2, grad_accum_steps=8)
    bf16 = ds_config.fill(ds_config.load(name), cfg, BatchSizes(2, 8, 1), "bf16", on_cpu=False)
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = ds_config.fill(ds_config.load(name), cfg, BatchSizes(2, 8, 1), "fp32", on_cpu=False)
    assert "data_types" not in fp32  # nothing to widen
    raw = ds_config.load(name)
    raw["data_types"] = {"grad_accum_dtype": "bf16"}  # a user's explicit choice stays
    assert ds_config.fill(raw, cfg, BatchSizes(2, 8, 1), "bf16", on_cpu=False)["data_types"]["grad_accum_dtype"] == "bf16"


def test_a_bf16_run_accumulates_in_fp32_and_says_so(tiny_model, parity_data, tmp_path):
    import torch

    from conftest import parity_flags
    from harness.train import run

    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", dtype="bf16", max_steps=2,
                                            micro_batch_size=2, grad_accum_steps=2)))
    written = json.loads((result.output_dir / "config.json").read_text())
    assert written["ds_config"]["data_types"] == {"grad_accum_dtype": "fp32"}
    # DeepSpeed's ZeRO optimizer took it: bf16 weights, fp32 gradient accumulation buffers.
    assert result.engine.optimizer.gradient_accumulation_dtype == torch.float32
    assert result.engine.optimizer.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(result.losses)))
