"""Memory planner: DeepSpeed's estimators on meta-device shapes, checked against hand arithmetic."""

import json

import pytest

from conftest import read_metrics
from harness.config import PlanConfig
from harness.memory_plan import GiB, estimate, load_config, model_shape, plan

LLAMA2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
             "vocab_size": 32000}
# By hand: per layer 4 x 4096^2 (attention) + 3 x 4096 x 11008 (MLP) + 2 x 4096 (norms) = 202,383,360;
# x 32 layers + 2 x 32000 x 4096 (embeddings, lm_head untied) + 4096 (final norm).
LLAMA2_7B_PARAMS = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096


def test_llama2_7b_shape_on_meta_device():
    shape = model_shape(load_config(model_config=json.dumps(LLAMA2_7B)))
    assert shape.total_params == LLAMA2_7B_PARAMS == 6_738_415_616
    assert shape.largest_layer_params == 32000 * 4096  # the embedding (and lm_head) matrix


def test_llama2_7b_on_one_80gb_gpu_needs_offload():
    best, text = plan(PlanConfig(model_config=json.dumps(LLAMA2_7B), world_size=1, gpu_gib=80, host_gib=128,
                                 micro_batch_size=1, seq_len=2048, grad_ckpt=True))
    by = {e.choice: e for e in estimate(model_shape(load_config(model_config=LLAMA2_7B)), 1, 1, 80 * GiB, 128 * GiB,
                                        1, 2048, True)}
    n = LLAMA2_7B_PARAMS
    # Without offload the states alone (2 N 16-bit weights + 18 N grads, fp32 weights, Adam) exceed 80 GiB.
    assert by["zero2"].gpu_states == 20 * n and not by["zero2"].fits_gpu
    assert by["zero3"].gpu_states == 18 * n + 4 * 32000 * 4096 and not by["zero3"].fits_gpu
    # Offloaded: host holds fp32 weights + Adam moments + fp32 grads (16 N), ZeRO-3 the 16-bit weights too.
    assert by["zero2_offload"].gpu_states == 2 * n and by["zero2_offload"].host_states == 16 * n
    assert by["zero3_offload"].gpu_states == 4 * 32000 * 4096 and by["zero3_offload"].host_states == 18 * n
    # 16 N = 100.4 GiB and 18 N = 113.0 GiB both fit in 90% of 128 GiB; ZeRO-2 offload is the faster.
    assert by["zero2_offload"].fits and by["zero3_offload"].fits
    assert best.choice == "zero2_offload" and "--ds_config zero2_offload" in text


def test_llama2_7b_on_a_small_gpu_streams_weights_from_host():
    # 2 N = 12.55 GiB of 16-bit weights exceed 90% of a 12 GiB GPU: only ZeRO-3 + offload is left.
    best, _ = plan(PlanConfig(model_config=json.dumps(LLAMA2_7B), world_size=1, gpu_gib=12, host_gib=128,
                              micro_batch_size=1, seq_len=512, grad_ckpt=True))
    assert best.choice == "zero3_offload"
    best, text = plan(PlanConfig(model_config=json.dumps(LLAMA2_7B), world_size=1, gpu_gib=12, host_gib=64,
                                 micro_batch_size=1, seq_len=512, grad_ckpt=True))
    assert best is None and "none fits" in text


def test_llama2_7b_on_eight_gpus_needs_no_offload():
    best, _ = plan(PlanConfig(model_config=json.dumps(LLAMA2_7B), world_size=8, gpu_gib=80, host_gib=1024,
                              micro_batch_size=1, seq_len=2048, grad_ckpt=True))
    assert best.choice == "zero2"  # 2 N + 18 N / 8 = 4.25 N = 26.7 GiB per GPU


def test_tiny_model_plan_and_ds_config_auto(tiny_model, parity_data, tmp_path):
    from conftest import parity_flags
    from harness.config import TrainConfig
    from harness.train import run

    best, text = plan(PlanConfig(model=str(tiny_model), world_size=1, gpu_gib=1, host_gib=1))
    shape = model_shape(load_config(str(tiny_model)))
    assert best.choice == "zero2" and best.gpu_states == 20 * shape.total_params
    assert shape.total_params == sum(p.numel() for p in _loaded(tiny_model).parameters())
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", ds_config="auto", max_steps=2)))
    assert result.engine.zero_stage == 2 and len(read_metrics(result.output_dir)) == 2


def test_plan_reads_seq_len_as_training_does(tiny_model):
    from harness.errors import HarnessError

    # 0: min(2048, the model's maximum), as in training; the tiny model has 512 positions.
    assert plan(PlanConfig(model=str(tiny_model)))[1] == plan(PlanConfig(model=str(tiny_model), seq_len=512))[1]
    assert plan(PlanConfig(model=str(tiny_model)))[1] != plan(PlanConfig(model=str(tiny_model), seq_len=256))[1]
    with pytest.raises(HarnessError, match="--seq_len 1024 exceeds the model's maximum of 512"):
        plan(PlanConfig(model=str(tiny_model), seq_len=1024))


def test_plan_refuses_ambiguous_input():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="exactly one"):
        PlanConfig(model="x", model_config="{}")


def _loaded(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
