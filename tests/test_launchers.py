"""Real launchers, real ranks: deepspeed and torchrun start 2 CPU ranks over gloo.

Every layout runs the same global batch of 4 rows per step, so its per-step losses must equal
the 1-process reference (fp32, 1e-5): this is 2 ranks vs 1, ZeRO-3 vs ZeRO-2, and the
launchers against each other, at once.
"""

import json

import pytest
import torch

from conftest import as_argv, launch, launch_ok, parity_flags, read_metrics, train_losses

TOL = 1e-5
pytestmark = pytest.mark.slow  # every test here starts real launchers and ranks


@pytest.mark.parametrize("launcher, ds_config, micro, accum", [
    ("torchrun", "zero2", 2, 1),
    ("torchrun", "zero3", 1, 2),
    ("deepspeed", "zero2", 1, 2),
    ("deepspeed", "zero3", 2, 1),
])
def test_two_ranks_equal_one(launcher, ds_config, micro, accum, reference_run, tiny_model, parity_data, tmp_path):
    ref_losses, ref_weights, _ = reference_run
    out = tmp_path / "run"
    launch_ok(launcher, 2, as_argv(parity_flags(tiny_model, parity_data, out, ds_config=ds_config,
                                                micro_batch_size=micro, grad_accum_steps=accum)))
    assert train_losses(out) == pytest.approx(ref_losses, abs=TOL)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["resolved"]["world_size"] == 2
    assert resolved["ds_config"]["zero_optimization"]["stage"] == int(ds_config[-1])
    assert resolved["ds_config"]["train_batch_size"] == 4

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")  # gathered from shards under ZeRO-3
    for name, value in final.state_dict().items():
        assert torch.allclose(value, ref_weights[name], atol=TOL), name


def test_plain_python_is_one_process(reference_run, tiny_model, parity_data, tmp_path):
    ref_losses, _, _ = reference_run
    out = tmp_path / "run"
    launch_ok("python", 1, as_argv(parity_flags(tiny_model, parity_data, out)))
    assert train_losses(out) == pytest.approx(ref_losses, abs=TOL)


@pytest.mark.parametrize("ds_config", ["zero2_offload", "zero3_offload"])
def test_offload_configs_run(ds_config, reference_run, tiny_model, parity_data, tmp_path):
    # Offload steps the optimizer with DeepSpeedCPUAdam instead of torch's AdamW: the same
    # update rule in another implementation, so the losses agree closely but not bit for bit.
    ref_losses, _, _ = reference_run
    out = tmp_path / "run"
    launch_ok("deepspeed", 2, as_argv(parity_flags(tiny_model, parity_data, out, ds_config=ds_config,
                                                   micro_batch_size=1, grad_accum_steps=2)))
    assert train_losses(out) == pytest.approx(ref_losses, abs=1e-4)
    offload = json.loads((out / "config.json").read_text())["ds_config"]["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu"


def test_run_directory_contract(tmp_path):
    """The README's multi-rank command on the embedded default leaves the whole contract."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "X"
    launch_ok("deepspeed", 2, ["--ds_config", "ds_configs/zero3.json", "--max_steps", "30", "--output_dir", str(out),
                               "--lr", "3e-3", "--log_every", "5"])
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["max_steps"] == 30 and config["ds_config"]["zero_optimization"]["stage"] == 3
    assert config["resolved"]["attn_implementation"] == "sdpa" and config["resolved"]["dtype"] == "fp32"
    train = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in train] == [5, 10, 15, 20, 25, 30]
    for m in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s"} <= m.keys()
        assert m["tokens_per_s"] > 0 and m["step_time_s"] > 0 and m["grad_norm"] > 0
        # Throughput accounting under 2 ranks: the four counts are all-reduced together.
        assert m["slot_tokens_per_s"] >= m["tokens_per_s"] >= m["supervised_tokens_per_s"] > 0
        assert m["model_tflops_per_s"] > 0 and m["time_backward_s"] > 0 and m["peak_host_rss_gib"] > 0
    assert train[-1]["tokens"] > train[0]["tokens"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in train])
    assert "eval/loss" in events.Tags()["scalars"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = torch.tensor([tokenizer("### Response:\n")["input_ids"]])
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    assert not (out / "final.tmp").exists()


def test_bad_input_under_two_ranks_stops_all_ranks_cleanly(tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    proc = launch("torchrun", 2, as_argv(parity_flags(tiny_model, parity_data, out, seq_len=100000)))
    assert proc.returncode != 0
    assert "--seq_len 100000 exceeds the model's maximum of 512" in proc.stderr
    assert not out.exists()
