"""Packing: bins, isolation of samples inside a packed row, packed = padded training, determinism."""

import json
import random

import pytest
import torch

from conftest import as_argv, launch_ok, parity_flags, train_losses
from harness import attention, data, packing
from harness.batches import StepBatches
from harness.config import TrainConfig
from harness.engine import model_inputs, to_device
from harness.errors import HarnessError
from harness.labels import IGNORE_INDEX
from harness.loss import token_loss_sum
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


def test_collate_packed_is_one_flat_row_with_host_boundaries():
    batch = packing.collate_packed([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5], [4, 5]), ([6], [6])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]  # batch 1, no padding slot
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # 4 would be predicted from 3, the previous sample's last token: never a target.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100]]
    assert batch["cu_seq_lens"].dtype == torch.int32 and batch["cu_seq_lens"].tolist() == [0, 3, 5, 6]
    assert batch["max_length"] == 3 and type(batch["max_length"]) is int and batch["seq_lens"] == (3, 2, 1)
    assert batch["loss_index"].tolist() == [0, 1, 3]  # positions whose next token is a target
    filler = packing.collate_packed([], pad_id=0)
    assert filler["input_ids"].shape == (1, 1) and filler["cu_seq_lens"].tolist() == [0, 1]
    assert filler["labels"].tolist() == [[IGNORE_INDEX]] and filler["loss_index"].numel() == 0


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
        fillers = 0
        for rank in range(2):
            built = batches.step(step, rank)
            for groups, mb in zip(layout[rank], built.micro_batches):
                lengths = tuple(int(batches.lengths[i]) for g in groups for i in g)
                if groups:  # one flattened row per micro-batch, exactly as long as its samples: no padding
                    assert mb["input_ids"].shape == (1, sum(lengths)) and mb["seq_lens"] == lengths
                else:  # the filler
                    fillers += 1
                    assert mb["input_ids"].shape == (1, 1)
            # The step's counts are the same on every rank and cover every rank's rows.
            assert built.real == sum(len(rows[i].input_ids) for i in sampler.step_rows(step))
            assert built.supervised == sum(rows[i].supervised for i in sampler.step_rows(step))
        assert built.slots == built.real + fillers == batches.slots(step)[1]
        assert sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for r in range(2)
                   for mb in batches(step, r)) == built.supervised


def test_packing_is_deterministic_by_seed():
    rows = [data.TokenizedRow(i, ids, labels) for i, (ids, labels) in enumerate(random_samples(100, 3))]

    def layout(seed):
        batches = StepBatches(rows, data.StepSampler(100, 4, 2, 2, seed=seed), 0, packing=True, seq_len=128)
        return [batches.layout(step) for step in range(12)]

    assert layout(1) == layout(1)
    assert layout(1) != layout(2)


# -- no cross-contamination, through the registered entry point -----------------------------

def packed_micro_batch(seed: int = 11):
    """A real micro-batch of the packer: several bins, several samples per bin, one flat row."""
    samples = random_samples(14, seed=seed)
    rows = [data.TokenizedRow(i, ids, labels) for i, (ids, labels) in enumerate(samples)]
    batches = StepBatches(rows, data.StepSampler(14, 14, 1, 1, seed=seed), 0, packing=True, seq_len=128)
    (groups,) = batches.layout(0)[0]
    assert len(groups) >= 3 and max(len(g) for g in groups) >= 3  # the test could fail
    order = [i for g in groups for i in g]
    return batches.collate(groups), [rows[i] for i in order]


def packed_against_alone(model, batch, samples, device, base="sdpa"):
    """(worst logit difference, worst gradient difference) between the packed row through the
    engine's inputs and each sample run alone with the model's own kernel; loss = summed token loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    batch = to_device(batch, device)
    model.zero_grad()
    attention.use_packed(model, True, base)
    packed = model(**model_inputs(batch)).logits
    token_loss_sum(packed, batch["labels"]).backward()
    packed_grads = [p.grad.clone() for p in params]
    packed = packed.detach().float()[0]

    model.zero_grad()
    attention.use_packed(model, False, base)
    worst, off = 0.0, 0
    for row in samples:
        n = len(row.input_ids)
        ids = torch.tensor([row.input_ids], device=device)
        alone = model(input_ids=ids, use_cache=False).logits
        token_loss_sum(alone, torch.tensor([row.labels], device=device)).backward()
        worst = max(worst, (packed[off:off + n] - alone.detach().float()[0]).abs().max().item())
        off += n
    assert off == packed.shape[0]
    grad_worst = max(((a - p.grad) / p.grad.abs().max().clamp_min(1e-12)).abs().max().item()
                     for a, p in zip(packed_grads, params))
    return worst, grad_worst


def test_packed_logits_and_gradients_equal_each_sample_alone(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    batch, samples = packed_micro_batch()
    assert batch["input_ids"].shape[1] > 100 and len(batch["seq_lens"]) == len(samples) >= 6
    before = attention.kernels_run["sdpa_per_sample"]
    logits, grads = packed_against_alone(model, batch, samples, torch.device("cpu"))
    assert logits < TOL and grads < TOL, (logits, grads)
    # The registered entry point ran (once per layer), not the model's own SDPA.
    assert attention.kernels_run["sdpa_per_sample"] == before + model.config.num_hidden_layers


def test_dropping_the_boundaries_breaks_isolation(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    batch, samples = packed_micro_batch()
    total = batch["input_ids"].shape[1]
    one_segment = {**batch, "cu_seq_lens": torch.tensor([0, total], dtype=torch.int32), "max_length": total,
                   "seq_lens": (total,)}
    logits, grads = packed_against_alone(model, one_segment, samples, torch.device("cpu"))
    assert logits > 1e-2 and grads > 1e-2  # the check above has teeth


def test_padded_batches_keep_the_models_own_kernel(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager", dtype=torch.float32)
    attention.use_packed(model, True, "eager")
    attention.use_packed(model, False, "eager")
    assert model.config._attn_implementation == "eager"
    # A packed row without boundaries is refused, never silently attended across.
    attention.use_packed(model, True, "eager")
    with pytest.raises(ValueError, match="packed rows only"):
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)


def test_packing_refuses_attention_it_does_not_implement():
    from transformers import MistralConfig

    attention.check_model(MistralConfig(sliding_window=4096), seq_len=4096)  # the window never bites
    with pytest.raises(HarnessError, match="sliding window of 1024 tokens"):
        attention.check_model(MistralConfig(sliding_window=1024), seq_len=2048)


def cuda_check(tiny_model, kernel, monkeypatch):
    """Packed bf16 on the GPU kernel vs each sample alone (the model's SDPA) and vs the reference kernel."""
    from transformers import AutoModelForCausalLM

    if kernel == "torch_varlen_attn":
        monkeypatch.setattr(attention, "_flash_attn_varlen", lambda: None)  # force torch's kernel
    attention._kernel_for.cache_clear()
    try:
        assert attention.kernel_for(torch.device("cuda"), torch.bfloat16) == kernel
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
        batch, samples = packed_micro_batch()
        before = attention.kernels_run[kernel]
        logits, _ = packed_against_alone(model, batch, samples, torch.device("cuda"))
        assert attention.kernels_run[kernel] == before + model.config.num_hidden_layers  # it really ran
        assert logits < 2e-2  # bf16 rounding; leakage is ~0.5
        # Gradients against the exact reference on the same bf16 model.
        params = [p for p in model.parameters()]
        grads = {}
        for name in (kernel, "sdpa_per_sample"):
            monkeypatch.setattr(attention, "kernel_for", lambda device, dtype, _n=name: _n)
            model.zero_grad()
            attention.use_packed(model, True, "sdpa")
            b = to_device(batch, torch.device("cuda"))
            token_loss_sum(model(**model_inputs(b)).logits, b["labels"]).backward()
            grads[name] = torch.cat([p.grad.float().flatten() for p in params])
        rel = (grads[kernel] - grads["sdpa_per_sample"]).norm() / grads["sdpa_per_sample"].norm()
        assert rel < 2e-2, rel
    finally:
        attention._kernel_for.cache_clear()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen attention needs a CUDA GPU")
def test_torch_varlen_attn_isolates_samples_on_the_gpu(tiny_model, monkeypatch):
    if attention._torch_varlen() is None:
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10")
    cuda_check(tiny_model, "torch_varlen_attn", monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs a CUDA GPU")
def test_flash_attn_varlen_isolates_samples_on_the_gpu(tiny_model, monkeypatch):
    if attention._flash_attn_varlen() is None:
        pytest.skip("flash-attn is not installed")
    cuda_check(tiny_model, "flash_attn_varlen", monkeypatch)


# -- packed training = padded training at the same samples per step --------------------------

def test_packed_training_equals_padded(reference_run, tiny_model, parity_data, tmp_path):
    losses, weights, reference_out = reference_run  # padded, micro batch 4
    before = attention.kernels_run["sdpa_per_sample"]
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "a", packing=True)))
    assert result.setup.report["steps"]["layout"] == "packed"
    # config.json names the kernel packed rows ran on; the padded run has none.
    assert json.loads((tmp_path / "a" / "config.json").read_text())["resolved"]["attn_kernel"] == "sdpa_per_sample"
    assert attention.kernels_run["sdpa_per_sample"] > before
    assert json.loads((reference_out / "config.json").read_text())["resolved"]["attn_kernel"] is None
    assert result.losses == pytest.approx(losses, abs=TOL)
    for name, value in result.engine.module.state_dict().items():
        assert torch.allclose(value, weights[name], atol=TOL), name
    # Short seq_len: each step's 4 samples spread over several bins and 2 micro-steps.
    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "b", packing=True, seq_len=128,
                                            micro_batch_size=2, grad_accum_steps=2)))
    assert result.setup.report["steps"]["bins_per_step"] > 1
    assert result.losses == pytest.approx(losses, abs=TOL)


def test_packed_resume_equals_the_uninterrupted_run(tiny_model, parity_data, tmp_path):
    import shutil

    from safetensors.torch import load_file

    # 2 micro-steps of 2 samples (one a filler row), a checkpoint every 3 steps.
    flags = parity_flags(tiny_model, parity_data, tmp_path / "full", packing=True, micro_batch_size=2,
                         grad_accum_steps=2, save_steps=3, keep_last=0)
    full = run(TrainConfig(**flags))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    for leftover in ("final", "checkpoints/step-6"):
        shutil.rmtree(resumed_dir / leftover)
    resumed = run(TrainConfig(**{**flags, "output_dir": str(resumed_dir),
                                 "resume": str(resumed_dir / "checkpoints" / "step-3")}))
    assert resumed.losses == full.losses[3:]  # bitwise: the same rows, layout and kernel after the resume
    assert train_losses(resumed_dir) == train_losses(tmp_path / "full")
    a, b = load_file(str(tmp_path / "full" / "final" / "model.safetensors")), load_file(
        str(resumed_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
