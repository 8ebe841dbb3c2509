"""The training loop's data: each step's micro-batches for one rank, padded or packed, and the
step's token counts, all built on the host ahead of the device.

`data.StepSampler` decides which rows make up each step (a pure function of seed and step);
this module only lays those rows out as tensors: one padded micro-batch per sampler slice
(`data.collate`), or one flattened packed row per micro-batch (`harness.packing`). Either way a
step holds the same samples, which is what lets a packed run equal a padded one. A step reads
only its own rows (numpy views of the memory-mapped cache): its cost does not grow with the data.

Every rank knows every row of every step, so the step's counts (supervised tokens, which scale
the loss; real tokens and slots, which the throughput figures need) come from the rows' lengths
on every rank alike: no collective, no device read. `Prefetcher` builds step s + 1 on a
background thread (in pinned memory on a GPU machine) while the device runs step s.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from harness.data import StepSampler, TokenizedRow, TokenizedRows, collate_tokens
from harness.loss import loss_index
from harness.packing import collate_packed, pack_step


@dataclass(frozen=True)
class StepData:
    """One optimizer step as one rank runs it, with the counts of the whole step (all ranks)."""

    micro_batches: list[dict]  # this rank's, in micro-step order
    slots: int  # token positions the forwards compute, padding and filler rows included
    real: int  # sample tokens
    supervised: int  # loss targets (labels != -100 after the shift): the loss is divided by it
    sample_lengths: tuple[int, ...]  # every sample's length (attention FLOPs)


class StepBatches:
    """The tensors of each micro-batch of a rank in a step: padded or packed, same samples."""

    def __init__(self, rows: TokenizedRows | list[TokenizedRow], sampler: StepSampler, pad_id: int, packing: bool,
                 seq_len: int):
        self.rows = rows if isinstance(rows, TokenizedRows) else TokenizedRows.from_rows(rows)
        self.sampler, self.pad_id, self.packing, self.seq_len = sampler, pad_id, packing, seq_len
        self.lengths = self.rows.lengths

    def layout(self, step: int) -> list[list[list[list[int]]]]:
        """[rank][micro-step] -> row-index groups: the packed bins of a micro-batch, or its one padded group."""
        if self.packing:
            return pack_step(self.sampler.step_rows(step), self.lengths, self.seq_len,
                             self.sampler.ws, self.sampler.ga).micro
        return [[[micro] for micro in self.sampler.step(step, rank)] for rank in range(self.sampler.ws)]

    def step(self, step: int, rank: int) -> StepData:
        layout = self.layout(step)
        rows = [i for r in layout for m in r for g in m for i in g]
        lengths = self.lengths[rows]
        return StepData([self.collate(groups) for groups in layout[rank]], self._slots(layout), int(lengths.sum()),
                        int(self.rows.supervised[rows].sum()), tuple(lengths.tolist()))

    def __call__(self, step: int, rank: int) -> list[dict]:
        return self.step(step, rank).micro_batches

    def collate(self, groups: list[list[int]]) -> dict:
        if self.packing:
            return collate_packed([self.rows.tokens(i) for g in groups for i in g], self.pad_id)
        (rows,) = groups
        batch = collate_tokens([self.rows.tokens(i) for i in rows], self.pad_id)
        batch["loss_index"] = loss_index(batch["labels"])
        return batch

    def _slots(self, layout) -> int:
        if self.packing:  # one flattened row per micro-batch; an empty one runs a 1-token filler
            return sum(int(self.lengths[[i for g in m for i in g]].sum()) or 1 for r in layout for m in r)
        return sum(len(rows) * int(self.lengths[rows].max()) for r in layout for (rows,) in r)

    def slots(self, step: int) -> tuple[int, int]:
        """(real tokens, token slots computed) of a step on all ranks, without building tensors."""
        layout = self.layout(step)
        return int(self.lengths[[i for r in layout for m in r for g in m for i in g]].sum()), self._slots(layout)


class Prefetcher:
    """Builds the next step's `StepData` on one background thread while the current step runs.

    Building is host work (sampling, packing, numpy concatenation); on a GPU machine the tensors
    are also pinned, so the engine's non_blocking copies overlap with compute. The thread never
    touches the device or the model.
    """

    def __init__(self, batches: StepBatches, rank: int, last_step: int, pin: bool):
        self.batches, self.rank, self.last_step, self.pin = batches, rank, last_step, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.pending: dict[int, Future] = {}

    def build(self, step: int) -> StepData:
        data = self.batches.step(step, self.rank)
        if self.pin:
            for batch in data.micro_batches:
                for key, value in batch.items():
                    if isinstance(value, torch.Tensor):
                        batch[key] = value.pin_memory()
        return data

    def get(self, step: int) -> StepData:
        """Step `step` (0-based), then start building the one after it."""
        future = self.pending.pop(step, None) or self.pool.submit(self.build, step)
        if step + 1 < self.last_step:
            self.pending[step + 1] = self.pool.submit(self.build, step + 1)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
