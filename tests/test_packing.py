"""Packing: bins, isolation of samples inside a packed row, packed = padded training, determinism."""

import random

import pytest
import torch

from conftest import as_argv, launch_ok, parity_flags, train_losses
from harness import data, packing
from harness.batches import StepBatches
from harness.config import TrainConfig
from harness.labels import IGNORE_INDEX
from harness.engine import model_inputs
from harness.errors import HarnessError
from harness.train import run

TOL = 1e-5


def random_samples(n: int, seed: int, low: int = 1, high: int = 60) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        length = rng.randint(low, high)
        ids = [rng.randrange(4, 500) for _ in range(length)]
        cut = rng.randint(0, length - 1)
        samples.append((ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return samples


# -- bins and batches ------------------------------------------------------------------------

def test_best_fit_decreasing_fills_bins_and_keeps_every_sample_once():
    lengths = [random.Random(1).randint(1, 300) for _ in range(200)]
    bins = packing.best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound + 2, (len(bins), lower_bound)  # within 2 bins of the optimum here
    # Best fit, not first fit: the 1 goes into the fullest bin that fits (room 1), not the first (room 2).
    assert packing.best_fit_decreasing([8, 6, 3, 1], 10) == [[0], [1, 2, 3]]
    with pytest.raises(ValueError):
        packing.best_fit_decreasing([11], 10)


def test_collate_packed_restarts_positions_and_masks_each_first_label():
    batch = packing.collate_packed([[([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5], [4, 5])], [([6], [6])]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    # 4 would be predicted from 3, the previous sample's last token: never a target.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100] * 5]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    filler = packing.collate_packed([], pad_id=0)
    assert filler["input_ids"].shape == (1, 1) and filler["attention_mask"].sum() == 0


def test_packed_steps_hold_the_sampler_rows_and_balance_ranks():
    rows = [data.TokenizedRow(i, ids, labels) for i, (ids, labels) in enumerate(random_samples(300, 2, 5, 200))]
    sampler = data.StepSampler(300, 8, 2, 2, seed=5)
    batches = StepBatches(rows, sampler, 0, packing=True, seq_len=256)
    for step in range(10):
        layout = batches.layout(step)
        assert len(layout) == 2 and all(len(rank) == 2 for rank in layout)  # every rank, every micro-step
        placed = sorted(i for rank in layout for micro in rank for b in micro for i in b)
        assert placed == sorted(sampler.step_rows(step))
        loads = [sum(batches.lengths[i] for micro in rank for b in micro for i in b) for rank in layout]
        assert max(loads) - min(loads) <= 256  # least-loaded assignment: within one bin
        for rank in range(2):
            for mb in batches(step, rank):
                assert mb["input_ids"].shape[1] <= 256


def test_packing_is_deterministic_by_seed():
    rows = [data.TokenizedRow(i, ids, labels) for i, (ids, labels) in enumerate(random_samples(100, 3))]

    def layout(seed):
        batches = StepBatches(rows, data.StepSampler(100, 4, 2, 2, seed=seed), 0, packing=True, seq_len=128)
        return [batches.layout(step) for step in range(12)]

    assert layout(1) == layout(1)
    assert layout(1) != layout(2)


# -- no cross-contamination ------------------------------------------------------------------

def check_isolation(model, device):
    samples = random_samples(12, seed=11)
    bins = [samples[0:5], samples[5:9], samples[9:12]]
    batch = {k: v.to(device) for k, v in packing.collate_packed(bins, pad_id=0).items()}
    assert batch["input_ids"].shape[1] > 100  # several samples per row: the test could fail
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits.float()
        worst = 0.0
        for r, b in enumerate(bins):
            off = 0
            for ids, _ in b:
                alone = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits.float()[0]
                worst = max(worst, (packed[r, off:off + len(ids)] - alone).abs().max().item())
                off += len(ids)
    return worst


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_token_attends_across_samples(attn, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn, dtype=torch.float32)
    assert check_isolation(model, torch.device("cpu")) < TOL
    # The same rows without position ids (one long sequence) would leak: the check has teeth.
    samples = random_samples(2, seed=11)
    joined = torch.tensor([samples[0][0] + samples[1][0]])
    with torch.no_grad():
        leaked = model(input_ids=joined, use_cache=False).logits[0, len(samples[0][0]):]
        alone = model(input_ids=torch.tensor([samples[1][0]]), use_cache=False).logits[0]
    assert (leaked - alone).abs().max() > 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention-2 needs a CUDA GPU")
def test_no_token_attends_across_samples_flash_attention_2(tiny_model):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("flash_attn")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda()
    assert check_isolation(model, torch.device("cuda")) < 2e-2  # bf16: FA2 has no fp32 kernel


# -- packed training = padded training at the same samples per step --------------------------

def test_packed_training_equals_padded(reference_run, tiny_model, parity_data, tmp_path):
    losses, weights, _ = reference_run  # padded, micro batch 4
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "a", packing=True)))
    assert result.setup.report["steps"]["layout"] == "packed"
    assert result.losses == pytest.approx(losses, abs=TOL)
    for name, value in result.engine.module.state_dict().items():
        assert torch.allclose(value, weights[name], atol=TOL), name
    # Short seq_len: each step's 4 samples spread over several bins and 2 micro-steps.
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "b", packing=True, seq_len=128,
                                            micro_batch_size=2, grad_accum_steps=2)))
    assert result.setup.report["steps"]["bins_per_step"] > 1
    assert result.losses == pytest.approx(losses, abs=TOL)


@pytest.mark.slow
def test_packed_two_ranks_zero3_equal_one(reference_run, tiny_model, parity_data, tmp_path):
    # 4 short samples fill one bin: rank 1 runs the filler row in every step, as ZeRO-3 needs.
    losses, _, _ = reference_run
    out = tmp_path / "run"
    launch_ok("torchrun", 2, as_argv(parity_flags(tiny_model, parity_data, out, packing=True, ds_config="zero3",
                                                  micro_batch_size=2)))
    assert train_losses(out) == pytest.approx(losses, abs=TOL)


def test_group_by_length_needs_the_unpacked_path():
    with pytest.raises(HarnessError, match="--group_by_length .* needs --packing False"):
        TrainConfig(group_by_length=4)
