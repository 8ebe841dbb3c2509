"""Packing: a step's samples laid out as one flattened row per micro-batch, never seeing each other.

A packed step holds exactly the samples the `StepSampler` gives that step (so a packed run
and a padded run see the same samples in the same steps, and step N stays a pure function of
(seed, N) for resume). Only their layout changes:

1. the step's samples go into bins of `seq_len` tokens by best-fit decreasing;
2. bins go to ranks, then to each rank's `grad_accum_steps` micro-batches, longest first onto
   the least-loaded slot, so ranks get near-equal tokens; every rank runs every micro-step
   (ZeRO-3 gathers weights inside each forward, so a missing rank would hang the others) and
   a slot without a bin runs a 1-token filler row that adds nothing to the loss;
3. each micro-batch's bins are concatenated into ONE row (batch 1) with no padding at all: the
   bins only decide which samples share a micro-step. The row holds no more tokens than its
   bins (so never more than the rows x widest-bin tensor a padded layout of the same bins
   would compute).

Isolation: `collate_packed` returns, next to the row, the samples' cumulative lengths
(`cu_seq_lens`, int32) and the longest sample (`max_length`), computed here once on the host;
the engine passes them to the model and `harness.attention` runs each sample's causal attention
over that sample alone on every kernel (flash-attn's and torch's varlen kernels on a GPU, a
per-sample SDPA reference on the CPU). Position ids restart at 0 for every sample (RoPE sees each
sample at its own positions). The first label of every sample is masked: the token before it
belongs to the previous sample. `tests/test_packing.py` checks logits and gradients against
each sample run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


def pack_step(samples: list[int], lengths, seq_len: int, world_size: int, grad_accum_steps: int) -> PackedStep:
    """Lay the samples of one step out as bins per rank and micro-step (see module docstring).

    `lengths[i]` is row i's length (a list or a numpy array); only the step's rows are read.
    """
    own = [int(lengths[s]) for s in samples]
    packed = best_fit_decreasing(own, seq_len)
    bins = [[samples[i] for i in b] for b in packed]
    fill = [sum(own[i] for i in b) for b in packed]
    per_rank = least_loaded(fill, world_size)
    micro = []
    for rank_bins in per_rank:
        per_micro = least_loaded([fill[b] for b in rank_bins], grad_accum_steps)
        micro.append([[bins[rank_bins[j]] for j in sorted(slot)] for slot in per_micro])
    return PackedStep(micro)


def collate_packed(samples: list[tuple], pad_id: int) -> dict:
    """(input_ids, labels) samples (lists or numpy arrays) -> one packed micro-batch, built with
    numpy (nothing per token in Python).

    Tensors (CPU; `Engine` moves them): input_ids, labels, position_ids as (1, T) int64,
    cu_seq_lens (n + 1,) int32, loss_index (the flattened positions t whose next token is a target,
    int64: the chunked loss gathers them without a device-side nonzero). Host values: max_length
    (int) and seq_lens (tuple of ints). No samples gives the filler: one pad token, no label, still a
    forward (ZeRO-3).
    """
    if not samples:
        samples = [([pad_id], [IGNORE_INDEX])]
    lengths = np.fromiter((len(ids) for ids, _ in samples), dtype=np.int64, count=len(samples))
    input_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in samples])
    labels = np.concatenate([np.asarray(labs, dtype=np.int64) for _, labs in samples])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    # Unpacked, a row's first label is never a target (nothing precedes it); here the previous
    # sample's last token precedes it, so mask it to keep the same loss.
    labels[starts] = IGNORE_INDEX
    position_ids = np.arange(len(input_ids), dtype=np.int64) - np.repeat(starts, lengths)
    cu_seq_lens = np.concatenate([[0], ends]).astype(np.int32)
    loss_index = np.flatnonzero(labels[1:] != IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(input_ids)[None], "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(position_ids)[None], "cu_seq_lens": torch.from_numpy(cu_seq_lens),
            "loss_index": torch.from_numpy(loss_index), "max_length": int(lengths.max()),
            "seq_lens": tuple(lengths.tolist())}
