"""Data: read rows with `datasets`, tokenize with prompt masking, truncate, batch.

Truncation policy (stated once, here): a row longer than `seq_len` loses prompt tokens first,
from the middle of the prompt, so both its start (BOS, the instruction) and its end (the
"### Response:" header the target follows) survive. The prompt never shrinks below half of
`seq_len` (or its own length); if the row is still too long, the target is cut at the end, and
that row loses its EOS. The target is therefore never removed entirely.

Batches are padded on the right to the longest row in the micro-batch; pad positions carry
label -100 and attention mask 0, so they change neither the loss nor any real token's logits.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.tasks.common import Example, name_rows

IGNORE_INDEX = -100
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
# GLUE-style .tsv files are tab-separated with literal quote characters inside fields.
FORMAT_OPTIONS = {".tsv": {"sep": "\t", "quoting": 3}}
# A row whose truncated form has no supervised token teaches nothing; a few are dropped and
# reported, more than this share means the data or seq_len is wrong and we stop.
MAX_ZERO_SUPERVISED_SHARE = 0.01


def read_rows(path_str: str, what: str = "--data"):
    """Load a local file or a `save_to_disk` folder as a `datasets.Dataset`; never the hub."""
    import datasets

    path = Path(path_str)
    if not path.exists():
        raise HarnessError(f"{what} {path_str}: no such file or folder")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises several types for "not a saved dataset"
            raise HarnessError(f"{what} {path_str}: not a datasets.save_to_disk folder ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise HarnessError(f"{what} {path_str}: a DatasetDict with splits {list(loaded)} and no 'train'")
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        rows = loaded
    else:
        kind = FILE_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise HarnessError(f"{what} {path_str}: unsupported file type {path.suffix!r} "
                               f"(supported: {', '.join(FILE_FORMATS)} or a save_to_disk folder)")
        if path.stat().st_size == 0:
            raise HarnessError(f"{what} {path_str}: the file is empty")
        try:
            rows = datasets.load_dataset(kind, data_files=str(path), split="train",
                                         **FORMAT_OPTIONS.get(path.suffix.lower(), {}))
        except Exception as err:  # parse errors surface as several exception types
            cause = err.__cause__ or err
            raise HarnessError(f"{what} {path_str}: cannot be read as {kind}: {type(cause).__name__}: {cause}") from None
    if len(rows) == 0:
        raise HarnessError(f"{what} {path_str}: the dataset is empty")
    return rows


@dataclass
class TokenizedRow:
    row: int
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        # Labels are shifted by one inside the loss: the first position never counts.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    rows: int = 0
    prompt_truncated: int = 0
    target_truncated: int = 0  # these rows also lost their EOS
    zero_supervised: list[int] = field(default_factory=list)


def truncate(prompt: list[int], target: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """Apply the truncation policy in the module docstring."""
    if len(prompt) + len(target) <= seq_len:
        return prompt, target
    prompt_floor = min(len(prompt), seq_len // 2)
    keep_prompt = max(prompt_floor, seq_len - len(target))
    if keep_prompt < len(prompt):
        head = (keep_prompt + 1) // 2
        tail = keep_prompt - head
        prompt = prompt[:head] + (prompt[len(prompt) - tail:] if tail else [])
    return prompt, target[: seq_len - len(prompt)]


def tokenize(examples: list[Example], tokenizer, seq_len: int) -> tuple[list[TokenizedRow], TokenizeStats]:
    """Prompt and target are tokenized separately so the mask boundary is exact.

    BOS (if the tokenizer has one) opens the prompt, EOS closes the target and is trained, so
    the model learns to stop. Tokenizers differ on whether they add these themselves, so we
    add them explicitly and ask the tokenizer for none.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise HarnessError("the tokenizer has no EOS token; the model could never learn to stop")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    targets = tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]

    stats = TokenizeStats(rows=len(examples))
    rows: list[TokenizedRow] = []
    for example, prompt, target in zip(examples, prompts, targets):
        prompt, target = bos + prompt, target + [eos]
        kept_prompt, kept_target = truncate(prompt, target, seq_len)
        stats.prompt_truncated += len(kept_prompt) < len(prompt)
        stats.target_truncated += len(kept_target) < len(target)
        tokenized = TokenizedRow(example.row, kept_prompt + kept_target,
                                 [IGNORE_INDEX] * len(kept_prompt) + kept_target)
        if tokenized.supervised == 0:
            stats.zero_supervised.append(example.row)
        else:
            rows.append(tokenized)
    check_supervised(stats)
    return rows, stats


def check_supervised(stats: TokenizeStats) -> None:
    bad = stats.zero_supervised
    if bad and len(bad) > MAX_ZERO_SUPERVISED_SHARE * stats.rows:
        raise HarnessError(f"{name_rows(bad)} ({len(bad)} of {stats.rows}) have no supervised token after "
                           f"truncation to --seq_len; more than {MAX_ZERO_SUPERVISED_SHARE:.0%} means the "
                           f"data or --seq_len is wrong")


def collate(rows: list[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class StepSampler:
    """Which rows each rank reads in each micro-step of each optimizer step.

    Every epoch is one seeded permutation of all rows, cut into global batches of
    `global_batch_size` rows; a last incomplete global batch is dropped so every rank runs the
    same number of micro-steps. Inside a global batch, rank r takes a contiguous block and
    micro-step m a slice of it. The set of rows in a step therefore depends only on the seed
    and the global batch size, which is what makes grad-accum, world-size and ZeRO-stage
    variants comparable step by step.
    """

    def __init__(self, n_rows: int, micro_batch_size: int, grad_accum_steps: int, world_size: int, seed: int):
        self.n_rows, self.mb, self.ga, self.ws, self.seed = n_rows, micro_batch_size, grad_accum_steps, world_size, seed
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = n_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise HarnessError(f"the training data has {n_rows} usable rows, fewer than one global batch of "
                               f"{self.global_batch} (micro_batch_size {micro_batch_size} x grad_accum_steps "
                               f"{grad_accum_steps} x world size {world_size})")

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.n_rows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def step(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of each micro-batch of `rank` for global optimizer step `step` (0-based)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        start = in_epoch * self.global_batch + rank * self.mb * self.ga
        block = order[start: start + self.mb * self.ga]
        return [block[m * self.mb: (m + 1) * self.mb] for m in range(self.ga)]


def total_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))


def filler_row(like: TokenizedRow) -> TokenizedRow:
    """A row that runs through the model but adds nothing to the loss (all labels masked)."""
    return TokenizedRow(-1, like.input_ids, [IGNORE_INDEX] * len(like.input_ids))


def eval_batches(n_rows: int, batch_size: int, rank: int, world_size: int) -> list[list[int | None]]:
    """This rank's share of eval rows in batches; every rank gets the same number of batches.

    Under ZeRO-3 each forward needs every rank, so a rank with fewer rows runs filler slots
    (None) that the caller turns into rows with no supervised tokens.
    """
    per_rank = math.ceil(n_rows / world_size)
    mine: list[int | None] = list(range(rank * per_rank, min(n_rows, (rank + 1) * per_rank)))
    mine += [None] * (per_rank - len(mine))
    return [mine[i: i + batch_size] for i in range(0, per_rank, batch_size)]
