"""Packing: several samples share one row of at most `seq_len` tokens, and never see each other.

A packed step holds exactly the samples the `StepSampler` gives that step (so a packed run
and a padded run see the same samples in the same steps, and step N stays a pure function of
(seed, N) for resume). Only their layout changes:

1. the step's samples go into bins of `seq_len` tokens by best-fit decreasing;
2. bins go to ranks, then to each rank's `grad_accum_steps` micro-batches, longest first onto
   the least-loaded slot, so ranks get near-equal tokens; every rank runs every micro-step
   (ZeRO-3 gathers weights inside each forward, so a missing rank would hang the others) and
   a slot without a bin runs a 1-token filler row that adds nothing to the loss;
3. each micro-batch is one tensor as wide as its fullest bin (not `seq_len`): trailing padding
   that nothing reads is not computed.

Isolation: position ids restart at 0 for every sample and the batch carries no 2D attention
mask. transformers then derives segment boundaries from the position ids: FlashAttention-2 runs
its variable-length kernel (cu_seqlens), SDPA and eager get a block-diagonal causal mask. Pad
slots at the end of a row form their own segment, labelled -100. This detection is skipped when
a KV cache is passed, so the engine always calls the model with use_cache=False. The test
`tests/test_packing.py` checks every sample's logits against the sample run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.labels import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths` grouped into bins of total length <= capacity.

    Longest first, each into the fullest bin it still fits (ties: the earlier bin), so the
    result depends only on the lengths and their order, never on hash order or timing.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample of {n} tokens exceeds the bin capacity {capacity}")
        best = -1
        for b, room in enumerate(free):
            if n <= room and (best < 0 or room < free[best]):
                best = b
        if best < 0:
            bins.append([i])
            free.append(capacity - n)
        else:
            bins[best].append(i)
            free[best] -= n
    return bins


def least_loaded(weights: list[int], n_slots: int) -> list[list[int]]:
    """Items (indices into `weights`) onto n_slots, heaviest first onto the lightest slot."""
    slots: list[list[int]] = [[] for _ in range(n_slots)]
    load = [0] * n_slots
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        s = min(range(n_slots), key=lambda s: (load[s], s))
        slots[s].append(i)
        load[s] += weights[i]
    return slots


@dataclass(frozen=True)
class PackedStep:
    """One optimizer step: `micro[rank][m]` is a list of bins, each a list of sample indices."""

    micro: list[list[list[list[int]]]]

    def bins(self) -> list[list[int]]:
        return [b for rank in self.micro for m in rank for b in m]


def pack_step(samples: list[int], lengths: list[int], seq_len: int, world_size: int,
              grad_accum_steps: int) -> PackedStep:
    """Lay the samples of one step out as bins per rank and micro-step (see module docstring)."""
    bins = [[samples[i] for i in b] for b in best_fit_decreasing([lengths[s] for s in samples], seq_len)]
    fill = [sum(lengths[s] for s in b) for b in bins]
    per_rank = least_loaded(fill, world_size)
    micro = []
    for rank_bins in per_rank:
        per_micro = least_loaded([fill[b] for b in rank_bins], grad_accum_steps)
        micro.append([[bins[rank_bins[j]] for j in sorted(slot)] for slot in per_micro])
    return PackedStep(micro)


def collate_packed(bins: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Bins (each a list of (input_ids, labels) samples) -> one packed micro-batch.

    `attention_mask` marks real tokens for token accounting only; the engine does not pass it
    to the model for packed batches, since a 2D mask would switch segment detection off.
    An empty list gives the filler: one pad token, no label, still a forward (ZeRO-3).
    """
    filler = not bins
    if filler:
        bins = [[([pad_id], [IGNORE_INDEX])]]
    width = max(sum(len(ids) for ids, _ in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    attention_mask = torch.zeros((len(bins), width), dtype=torch.long)
    for r, b in enumerate(bins):
        off = 0
        for ids, labs in b:
            n = len(ids)
            input_ids[r, off:off + n] = torch.tensor(ids)
            labels[r, off:off + n] = torch.tensor(labs)
            # Unpacked, a row's first label is never a target (nothing precedes it); here the
            # previous sample's last token precedes it, so mask it to keep the same loss.
            labels[r, off] = IGNORE_INDEX
            position_ids[r, off:off + n] = torch.arange(n)
            off += n
        # The pad tail restarts at 0 too: a segment of its own that attends to nothing real.
        position_ids[r, off:] = torch.arange(width - off)
        if not filler:
            attention_mask[r, :off] = 1
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}
