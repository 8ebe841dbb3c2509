"""The training loop in one process (real DeepSpeed engine, world of 1): parity and artifacts."""

import json

import pytest
import torch

from conftest import PARITY_STEPS, parity_flags, read_metrics
from harness import data
from harness.config import TrainConfig
from harness.train import run

TOL = 1e-5


def test_reference_losses_are_finite_and_logged(reference_run):
    losses, _, out = reference_run
    assert len(losses) == PARITY_STEPS and all(torch.isfinite(torch.tensor(losses)))
    logged = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert logged == pytest.approx(losses, abs=0)


def test_the_parity_data_would_expose_a_mean_of_means(reference_run, parity_data):
    # The micro-batches of step 0 under grad_accum 4 x micro 1 hold rows whose supervised
    # token counts differ, so averaging per-micro-batch means would give another loss.
    losses, _, out = reference_run
    plan_rows = json.loads((out / "config.json").read_text())["resolved"]
    sampler = data.StepSampler(64, 1, 4, 1, seed=3)
    rows = [json.loads(line) for line in parity_data.read_text().splitlines()]
    lengths = {len(rows[i]["output"]) for micro in sampler.step(0, 0) for i in micro}
    assert len(lengths) > 1 and plan_rows["world_size"] == 1


def test_grad_accum_equals_big_batch(reference_run, tiny_model, parity_data, tmp_path):
    losses, weights, _ = reference_run
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", micro_batch_size=1, grad_accum_steps=4)))
    assert result.losses == pytest.approx(losses, abs=TOL)
    for name, value in result.engine.module.state_dict().items():
        assert torch.allclose(value, weights[name], atol=TOL), name


def test_zero3_equals_zero2_in_one_process(reference_run, tiny_model, parity_data, tmp_path):
    losses, _, _ = reference_run
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", ds_config="zero3", micro_batch_size=2, grad_accum_steps=2)))
    assert result.engine.zero_stage == 3
    assert result.losses == pytest.approx(losses, abs=TOL)


@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_final_folder_round_trips(ds_config, tiny_model, parity_data, tmp_path):
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", ds_config=ds_config, max_steps=3)))
    module = result.engine.module
    params = list(module.parameters())
    # Read the engine's weights through DeepSpeed's own gather, not through the export path.
    with deepspeed.zero.GatheredParameters(params, enabled=ds_config == "zero3"):
        engine_weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir / "final")
    loaded_weights = dict(loaded.named_parameters())
    assert engine_weights.keys() == loaded_weights.keys()
    for name, value in engine_weights.items():
        assert torch.equal(value, loaded_weights[name]), name
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(original.model.embed_tokens.weight, loaded.model.embed_tokens.weight)  # it trained
    assert AutoTokenizer.from_pretrained(result.output_dir / "final")("hello")["input_ids"]


@pytest.mark.slow
def test_loss_falls_on_the_embedded_default(tmp_path):
    result = run(TrainConfig(output_dir=str(tmp_path / "run"), max_steps=60, lr=3e-3, micro_batch_size=8,
                             lr_schedule="constant", warmup_steps=5))
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < first - 0.5, (first, last)
    metrics = read_metrics(result.output_dir)
    assert "eval/loss" in metrics[-1] and metrics[-1]["eval/loss"] < result.losses[0]


def test_lr_logged_is_the_rate_each_step_used(tiny_model, parity_data, tmp_path):
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", warmup_steps=4, lr_schedule="constant")))
    lrs = [m["lr"] for m in read_metrics(result.output_dir) if "lr" in m]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_grad_ckpt_and_eager_attention_give_the_same_losses(reference_run, tiny_model, parity_data, tmp_path):
    losses, _, _ = reference_run
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", grad_ckpt=True, attn="eager")))
    module = result.engine.module
    assert getattr(module, "is_activation_checkpointing", None) or module.is_gradient_checkpointing
    assert json.loads((result.output_dir / "config.json").read_text())["resolved"]["attn_implementation"] == "eager"
    assert result.losses == pytest.approx(losses, abs=TOL)
    # Packed rows under checkpointing: backward recomputes each layer with the packed attention too.
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "packed", grad_ckpt=True, attn="eager",
                                            packing=True, seq_len=128, micro_batch_size=2, grad_accum_steps=2)))
    assert result.losses == pytest.approx(losses, abs=TOL)


def test_zero3_shards_at_load_time(tiny_model):
    # from_pretrained inside the ZeRO-3 context builds the model under deepspeed.zero.Init:
    # parameters come back as ZeRO-partitioned placeholders before any engine exists, so a
    # model larger than one device never has to fit on one.
    from harness import ds_config, engine, model
    from harness.ds_config import BatchSizes

    engine.init_distributed()
    filled = ds_config.fill(ds_config.load("zero3"), TrainConfig(), BatchSizes(1, 1, 1), "fp32", on_cpu=True)
    ctx = engine.Zero3LoadContext(filled)
    loaded = model.load_model(str(tiny_model), "fp32", "sdpa", grad_ckpt=False, trust_remote_code=False)
    ctx.release()
    params = list(loaded.parameters())
    assert params and all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
    plain = model.load_model(str(tiny_model), "fp32", "sdpa", grad_ckpt=False, trust_remote_code=False)
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())



def test_eval_split_holds_rows_out_of_training(tiny_model, parity_data, tmp_path):
    from conftest import parity_flags

    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", eval_split=0.25, max_steps=2)))
    train_rows = {r.row for r in result.setup.train_rows}
    eval_rows = {e.row for e in result.setup.eval_set.examples}
    assert len(eval_rows) == 16 and len(train_rows) == 48 and not train_rows & eval_rows
    # The held-out examples are the very rows of the file (prompt and reference), not re-drawn ones.
    lines = [json.loads(line) for line in parity_data.read_text().splitlines()]
    assert all(e.target == lines[e.row]["output"] for e in result.setup.eval_set.examples)
    assert "eval/loss" in read_metrics(result.output_dir)[-1]
