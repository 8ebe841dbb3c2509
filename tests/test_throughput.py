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
    batch = packing.collate_packed([(s[0].tolist(), s[0].tolist()) for s in samples], pad_id=0)
    fm = flop_model(eager_model)
    assert sample_lengths(batch) == lengths
    assert count_tokens([batch], fm, supervised_tokens).flops == alone
    # The same row attended as one sequence computes one 19 x 19 square: more than the useful work.
    assert counted_flops(eager_model, input_ids=batch["input_ids"], position_ids=batch["position_ids"]) > alone


def test_sample_lengths_of_collated_rows():
    batch = packing.collate_packed([([1] * 4, [1] * 4), ([2] * 6, [2] * 6), ([3] * 3, [3] * 3)], pad_id=0)
    assert sample_lengths(batch) == [4, 6, 3] and batch["input_ids"].shape == (1, 13)
    padded = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert sample_lengths(padded) == [3, 2]


def test_chunked_ce_counts_the_head_on_supervised_tokens_only(eager_model):
    from harness.labels import IGNORE_INDEX
    from harness.loss import chunked_token_loss_sum, loss_index

    ids = torch.randint(3, 500, (1, 23), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :15] = IGNORE_INDEX  # a long prompt: 7 of 22 positions are targets
    index = loss_index(labels)
    eager_model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        out = eager_model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        chunked_token_loss_sum(out.hidden_states[-1], eager_model.lm_head, labels, 3, index).backward()
    head = eager_model.lm_head
    fm = flop_model(eager_model, head_on_supervised=True)
    expected = fm.step_flops(23, [23], supervised_tokens=index.numel())
    assert fm.head_flops_per_token == 6 * head.in_features * head.out_features
    # Counted by torch beyond the model FLOPs: each chunk's forward again in backward (recomputation)
    # and the one position the model's own head still computes; neither is useful work.
    assert counter.get_total_flops() == expected + 2 * head.in_features * head.out_features * (index.numel() + 1)
    # Without --chunked_ce the head counts every real token.
    plain = flop_model(eager_model).step_flops(23, [23], supervised_tokens=index.numel())
    assert plain - expected == fm.head_flops_per_token * (23 - index.numel())


def test_packed_rows_run_the_head_on_supervised_positions_only(tiny_model):
    from transformers import AutoModelForCausalLM

    from harness import attention
    from harness.engine import model_inputs
    from harness.labels import IGNORE_INDEX
    from harness.loss import selected_token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    lengths = [5, 11, 3]
    samples = [(list(range(5, 5 + n)), [IGNORE_INDEX] * (n // 2) + list(range(5 + n // 2, 5 + n))) for n in lengths]
    batch = packing.collate_packed(samples, pad_id=0)
    attention.use_packed(model, True, "sdpa")
    with FlopCounterMode(display=False) as counter:  # as Engine.forward_loss_sum runs a packed row
        logits = model(**model_inputs(batch), logits_to_keep=batch["loss_index"]).logits
        selected_token_loss_sum(logits, batch["labels"], batch["loss_index"]).backward()
    fm = flop_model(model, head_on_supervised=True)
    supervised = batch["loss_index"].numel()
    assert 0 < supervised < sum(lengths) - 3
    # torch counts the matmuls (its counter has no entry for the CPU attention kernel): exactly the
    # formula's Linear part, the head on supervised positions only.
    linear = fm.step_flops(sum(lengths), lengths, supervised) - fm.step_flops(0, lengths, 0)
    assert counter.get_total_flops() == linear
    attention.use_packed(model, False, "sdpa")


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
    from harness.loss import chunked_token_loss_sum, loss_index

    # In float64 the two paths differ only by summation order (~1e-15), so a 1e-6 tolerance tests
    # the identity itself; in fp32 the embedding gradient's rounding alone reaches ~1e-6 relative.
    model = copy.deepcopy(eager_model).double()
    ids = torch.randint(3, 500, (3, 21), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # prompts
    labels[2, 15:] = IGNORE_INDEX  # padding
    params = list(model.parameters())

    def loss_and_grads(chunks: int | None):
        model.zero_grad()
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        loss = (token_loss_sum(out.logits, labels) if chunks is None else
                chunked_token_loss_sum(out.hidden_states[-1], model.lm_head, labels, 7, loss_index(labels), chunks))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    plain, plain_grads = loss_and_grads(None)
    # Chunks of 7 targets; and a fixed count of 5 or 40 chunks (ceil(n / count) each, some empty).
    for chunks in (0, 5, 40):
        chunked, chunked_grads = loss_and_grads(chunks)
        assert torch.allclose(chunked, plain, rtol=0, atol=1e-6)
        for a, b in zip(chunked_grads, plain_grads):
            assert torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ds_config, packing", [("zero2", False), ("zero3", False), ("zero3", True)])
def test_chunked_ce_run_equals_the_reference(ds_config, packing, reference_run, tiny_model, parity_data, tmp_path):
    from conftest import parity_flags
    from harness.config import TrainConfig
    from harness.train import run

    losses, _, _ = reference_run
    # Packed, 2 micro-steps of 2 samples: the second micro-step is a filler row without targets.
    layout = dict(micro_batch_size=2, grad_accum_steps=2) if packing else {}
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "run", ds_config=ds_config,
                                            chunked_ce=64, packing=packing, **layout)))
    assert result.losses == pytest.approx(losses, abs=1e-5)
