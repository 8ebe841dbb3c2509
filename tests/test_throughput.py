"""Throughput accounting: the FLOP formula against torch's own FLOP counter, and the logged rates."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import read_metrics
from harness import packing
from harness.loss import supervised_tokens, token_loss_sum
from harness.throughput import PHASES, count_tokens, flop_model, peak_flops, sample_lengths


@pytest.fixture(scope="module")
def eager_model(tiny_model):
    from transformers import AutoModelForCausalLM

    # Eager attention runs its two matmuls as plain bmm, which the counter sees; fp32 keeps it exact.
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager", dtype=torch.float32)
    model.train()
    return model


def counted_flops(model, **inputs) -> int:
    """FLOPs torch counts for one forward + backward of the summed loss."""
    model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        logits = model(**inputs, use_cache=False).logits
        token_loss_sum(logits, inputs["input_ids"]).backward()
    return counter.get_total_flops()


def test_dense_batch_matches_flop_counter(eager_model):
    ids = torch.randint(3, 500, (3, 17))
    counted = counted_flops(eager_model, input_ids=ids, attention_mask=torch.ones_like(ids))
    expected = flop_model(eager_model).step_flops(ids.numel(), [17, 17, 17])
    assert expected == counted


def test_packed_row_counts_each_sample_as_if_run_alone(eager_model):
    lengths = [5, 11, 3]
    samples = [torch.randint(3, 500, (1, n)) for n in lengths]
    alone = sum(counted_flops(eager_model, input_ids=s, attention_mask=torch.ones_like(s)) for s in samples)
    ids = torch.cat(samples, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    batch = {"input_ids": ids, "labels": ids, "position_ids": position_ids, "attention_mask": torch.ones_like(ids)}
    fm = flop_model(eager_model)
    assert sample_lengths(batch) == lengths
    assert count_tokens([batch], fm, supervised_tokens).flops == alone
    # The packed row itself computes one 19 x 19 attention square: more than the useful work.
    assert counted_flops(eager_model, input_ids=ids, position_ids=position_ids) > alone


def test_sample_lengths_of_collated_rows():
    bins = [[([1] * 4, [1] * 4), ([2] * 6, [2] * 6)], [([3] * 3, [3] * 3)]]
    batch = packing.collate_packed(bins, pad_id=0)  # rows padded to width 10
    assert sample_lengths(batch) == [4, 6, 3]
    padded = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert sample_lengths(padded) == [3, 2]


def test_frozen_weights_need_no_weight_gradient(eager_model):
    full = flop_model(eager_model).linear_flops_per_token
    lm_head = eager_model.lm_head
    lm_head.weight.requires_grad_(False)
    try:
        frozen = flop_model(eager_model).linear_flops_per_token
    finally:
        lm_head.weight.requires_grad_(True)
    assert full - frozen == 2 * lm_head.in_features * lm_head.out_features


def test_peak_table():
    value, why = peak_flops(torch.device("cpu"), "fp32")
    assert value is None and "MFU omitted" in why


def test_run_logs_three_token_rates_and_breakdown(reference_run):
    _, _, out = reference_run
    logged = [m for m in read_metrics(out) if "loss" in m]
    assert logged
    for m in logged:
        assert m["slot_tokens_per_s"] >= m["tokens_per_s"] >= m["supervised_tokens_per_s"] > 0
        assert 0 < m["padding_efficiency"] <= 1
        assert m["model_tflops_per_s"] > 0 and m["peak_host_rss_gib"] > 0
        assert "mfu" not in m  # CPU: no peak FLOP/s to divide by
        phases = [m[f"time_{p}_s"] for p in PHASES]
        assert all(t >= 0 for t in phases) and m["time_forward_s"] > 0 and m["time_backward_s"] > 0
        # log_every 1: the phases of one step cannot take longer than the step itself.
        assert sum(phases) - m["time_checkpoint_s"] <= m["step_time_s"] + 1e-3


def test_chunked_cross_entropy_matches_the_plain_loss_and_gradients(eager_model):
    import copy

    from harness.labels import IGNORE_INDEX
    from harness.loss import chunked_token_loss_sum

    # In float64 the two paths differ only by summation order (~1e-15), so a 1e-6 tolerance tests
    # the identity itself; in fp32 the embedding gradient's rounding alone reaches ~1e-6 relative.
    model = copy.deepcopy(eager_model).double()
    ids = torch.randint(3, 500, (3, 21), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # prompts
    labels[2, 15:] = IGNORE_INDEX  # padding
    params = list(model.parameters())

    def loss_and_grads(chunked: bool):
        model.zero_grad()
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        loss = (chunked_token_loss_sum(out.hidden_states[-1], model.lm_head, labels, 7) if chunked
                else token_loss_sum(out.logits, labels))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    plain, plain_grads = loss_and_grads(False)
    chunked, chunked_grads = loss_and_grads(True)
    assert torch.allclose(chunked, plain, rtol=0, atol=1e-6)
    for a, b in zip(chunked_grads, plain_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_chunked_ce_run_equals_the_reference(ds_config, reference_run, tiny_model, parity_data, tmp_path):
    from conftest import parity_flags
    from harness.config import TrainConfig
    from harness.train import run

    losses, _, _ = reference_run
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", ds_config=ds_config,
                                            chunked_ce=64)))
    assert result.losses == pytest.approx(losses, abs=1e-5)
