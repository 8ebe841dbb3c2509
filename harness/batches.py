"""The training loop's data: each step's micro-batches for one rank, padded or packed.

`data.StepSampler` decides which rows make up each step (a pure function of seed and step);
this module only lays those rows out as tensors: one padded micro-batch per sampler slice
(`data.collate_tokens`), or the step's samples packed into bins (`harness.packing`). Either way a
step holds the same samples, which is what lets a packed run equal a padded one. A step reads
only its own rows (numpy views of the memory-mapped cache): its cost does not grow with the data.
"""

from __future__ import annotations

import torch

from harness.data import StepSampler, TokenizedRow, TokenizedRows, collate_tokens
from harness.packing import collate_packed, pack_step


class StepBatches:
    """The tensors of each micro-batch of a rank in a step: padded or packed, same samples."""

    def __init__(self, rows: TokenizedRows | list[TokenizedRow], sampler: StepSampler, pad_id: int, packing: bool,
                 seq_len: int):
        self.rows = rows if isinstance(rows, TokenizedRows) else TokenizedRows.from_rows(rows)
        self.sampler, self.pad_id, self.packing, self.seq_len = sampler, pad_id, packing, seq_len
        self.lengths = self.rows.lengths

    def layout(self, step: int) -> list[list[list[list[int]]]]:
        """[rank][micro-step] -> row-index groups: one group per packed bin, or one per micro-batch."""
        if self.packing:
            return pack_step(self.sampler.step_rows(step), self.lengths, self.seq_len,
                             self.sampler.ws, self.sampler.ga).micro
        return [[[micro] for micro in self.sampler.step(step, rank)] for rank in range(self.sampler.ws)]

    def __call__(self, step: int, rank: int) -> list[dict[str, torch.Tensor]]:
        if not self.packing:
            return [collate_tokens([self.rows.tokens(i) for i in rows], self.pad_id)
                    for rows in self.sampler.step(step, rank)]
        return [collate_packed([[self.rows.tokens(i) for i in b] for b in bins], self.pad_id)
                for bins in self.layout(step)[rank]]

    def slots(self, step: int) -> tuple[int, int]:
        """(real tokens, token slots computed) of a step on all ranks, without building tensors."""
        real = slots = 0
        for rank in self.layout(step):
            for groups in rank:
                if self.packing:
                    widths = [int(self.lengths[g].sum()) for g in groups] or [1]  # filler: 1 slot
                    slots += len(widths) * max(widths)
                    real += sum(widths) if groups else 0
                else:
                    (rows,) = groups
                    slots += len(rows) * int(self.lengths[rows].max())
                    real += int(self.lengths[rows].sum())
        return real, slots
