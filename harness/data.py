"""Data: read rows with `datasets`, tokenize with prompt masking, truncate, batch.

Truncation policy (stated once, here): a row longer than `seq_len` loses prompt tokens first,
from the middle of the prompt, so both its start (BOS, the instruction) and its end (the
"### Response:" header the target follows) survive. The prompt never shrinks below half of
`seq_len` (or its own length); if the row is still too long, the target is cut at the end, and
that row loses its EOS. The target is therefore never removed entirely.

Before tokenization, a prompt or target longer than `char_limit(tokenizer, seq_len)` characters
is cut by characters the same way (prompt: its middle; target: its end). The limit is twice the
characters that seq_len tokens could ever cover, so the cut never removes a character that token
truncation would keep; it only spares the tokenizer (and memory) text that could never fit: a
200 MB row would otherwise be tokenized whole. Such rows are counted in the data report.

Unpacked batches are padded on the right to the longest row in the micro-batch; pad positions
carry label -100 and attention mask 0, so they change neither the loss nor any real token's
logits. Packed batches are built by `harness.packing` from the same steps' samples, and
`harness.batches` hands each step's micro-batches, padded or packed, to the training loop.

Tokenization runs through `datasets.map(batched=True)`; `harness.data_cache` stores its result
under a key of everything that changes the tokens.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch

from harness.errors import HarnessError
from harness.labels import IGNORE_INDEX
from harness.tasks.common import Example, name_rows

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
# GLUE-style .tsv files are tab-separated with literal quote characters inside fields.
FORMAT_OPTIONS = {".tsv": {"sep": "\t", "quoting": 3}}
# Part of the tokenization cache key: change it whenever tokenize_batch or truncate changes
# what tokens or labels a row gets.
MASKING_POLICY = ("bos+prompt masked, target+eos trained; truncate prompt middle (floor seq_len/2), then target end; "
                  "texts first cut to char_limit (prompt middle, target end); v2")
# Characters cut before tokenization (see char_limit): twice what seq_len tokens can ever cover.
CHAR_LIMIT_SLACK = 2
UTF8_BLOCK = 16 << 20
# A row whose truncated form has no supervised token teaches nothing; a few are dropped and
# reported, more than this share means the data or seq_len is wrong and we stop.
MAX_ZERO_SUPERVISED_SHARE = 0.01


def check_data_path(path_str: str, what: str = "--data") -> None:
    """The cheap checks of a data path (no content read): it exists, has a supported type, is not empty."""
    path = Path(path_str)
    if not path.exists():
        raise HarnessError(f"{what} {path_str}: no such file or folder")
    if path.is_dir():
        return
    if FILE_FORMATS.get(path.suffix.lower()) is None:
        raise HarnessError(f"{what} {path_str}: unsupported file type {path.suffix!r} "
                           f"(supported: {', '.join(FILE_FORMATS)} or a save_to_disk folder)")
    if path.stat().st_size == 0:
        raise HarnessError(f"{what} {path_str}: the file is empty")


def check_utf8(path: Path, what: str) -> None:
    """Text formats must be UTF-8; name the first line that is not (datasets would fail later,
    with a traceback, when the row is read). Streams the file: memory stays at one block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, consumed, last_newline = 1, 0, -1  # absolute byte offsets
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(UTF8_BLOCK), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                # err.start counts from what the decoder held: up to 3 bytes of a character left
                # open by the previous block, then this block.
                at = max(0, err.start - (len(err.object) - len(block)))
                newline = block.rfind(b"\n", 0, at)
                column = at - newline if newline >= 0 else consumed + at - last_newline
                line += block.count(b"\n", 0, at)
                raise HarnessError(f"{what} {path}: line {line} is not valid UTF-8 "
                                   f"(byte 0x{err.object[err.start]:02x} at byte {column} of the line); "
                                   f"save the file as UTF-8") from None
            line += block.count(b"\n")
            newline = block.rfind(b"\n")
            if newline >= 0:
                last_newline = consumed + newline
            consumed += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise HarnessError(f"{what} {path}: line {line} is not valid UTF-8 (the file ends inside a character); "
                               f"save the file as UTF-8") from None


def read_rows(path_str: str, what: str = "--data"):
    """Load a local file or a `save_to_disk` folder as a `datasets.Dataset`; never the hub.

    Values keep the types the file gives them: CSV has none, so every CSV column is text (pandas
    would turn a column of "51"s into numbers); a JSON field that holds text in some rows and
    numbers or lists in others is re-read from the file (`raw_json_columns`).
    """
    path = Path(path_str)
    check_data_path(path_str, what)
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
        kind = FILE_FORMATS[path.suffix.lower()]
        options = dict(FORMAT_OPTIONS.get(path.suffix.lower(), {}))
        if kind != "parquet":
            check_utf8(path, what)
        try:
            if kind == "csv":
                header = pd.read_csv(path, nrows=0, **options).columns
                options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
            rows = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
        except Exception as err:  # parse errors surface as several exception types
            cause = err.__cause__ or err
            raise HarnessError(f"{what} {path_str}: cannot be read as {kind}: {type(cause).__name__}: {cause}") from None
        if kind == "json":
            rows = raw_json_columns(rows, path)
    if len(rows) == 0:
        raise HarnessError(f"{what} {path_str}: the dataset is empty")
    return rows


def raw_json_columns(rows, path: Path):
    """Re-encode the mixed-type fields of a JSON/JSONL file from the file's own values.

    datasets stores a field that holds text in some rows and numbers, lists or objects in others
    as JSON text (a `Json` feature), but leaves a string that is itself valid JSON ("51", "true",
    "[1]") unquoted, so it reads back as a number or a list, and a task would then call valid rows
    bad. The file is streamed again, one record at a time, and each such field rebuilt from the
    values as written; rows then hold exactly the file's types.
    """
    mixed = [name for name, feature in rows.features.items() if type(feature).__name__ == "Json"]
    if not mixed:
        return rows
    values: dict[str, list] = {name: [] for name in mixed}
    for record in json_records(path):
        if not isinstance(record, dict):
            return rows  # a layout datasets read otherwise: keep its reading
        for name in mixed:
            value = record.get(name)
            # Already JSON text: the feature keeps valid JSON as it is, so strings stay strings.
            values[name].append(None if value is None else json.dumps(value, ensure_ascii=False))
    if any(len(v) != len(rows) for v in values.values()):
        return rows
    for name in mixed:
        feature = rows.features[name]
        rows = rows.remove_columns(name).add_column(name, values[name], feature=feature)
    return rows


def json_records(path: Path):
    """The records of a JSON Lines file (one per non-blank line) or of a JSON array."""
    with open(path, encoding="utf-8") as f:
        if path.suffix.lower() == ".jsonl":
            for line in f:
                if line.strip():
                    yield json.loads(line)
            return
        loaded = json.load(f)  # a JSON document is one value: datasets reads it whole as well
    yield from (loaded if isinstance(loaded, list) else [loaded])


@dataclass
class TokenizedRow:
    row: int
    input_ids: list[int]
    labels: list[int]
    source: int = 0  # which --data file (index into the mix), for reports

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
    # Lengths before truncation (BOS and EOS included), for the preflight report.
    prompt_lengths: list[int] = field(default_factory=list)
    target_lengths: list[int] = field(default_factory=list)
    ends_with_eos: int = 0  # kept rows whose last token is a supervised EOS
    cut_by_chars: int = 0  # rows whose prompt or target was cut by characters before tokenization (char_limit)


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


def char_limit(tokenizer, seq_len: int) -> int:
    """Characters of a prompt or target kept before tokenization.

    No token covers more characters than its vocabulary entry is long (byte-level BPE spells each
    byte as one character, SentencePiece a space as one), so seq_len tokens never cover more than
    seq_len x the longest entry: 16 characters for Llama-2's vocabulary, 128 for GPT-2's (runs of
    64 two-byte characters). Twice that leaves room for normalizers that drop characters.
    """
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    return CHAR_LIMIT_SLACK * seq_len * longest


def cut_chars(text: str, limit: int, middle: bool) -> str:
    """`text` cut to `limit` characters: its middle (a prompt: start and end survive) or its end."""
    if len(text) <= limit:
        return text
    if not middle:
        return text[:limit]
    head = (limit + 1) // 2
    return text[:head] + text[len(text) - (limit - head):]


def tokenize_batch(batch: dict, tokenizer, seq_len: int, max_chars: int | None = None) -> dict:
    """`datasets.map(batched=True)` function: prompt/target columns -> tokens, labels, lengths.

    Prompt and target are tokenized separately so the mask boundary is exact. BOS (if the
    tokenizer has one) opens the prompt, EOS closes the target and is trained, so the model
    learns to stop. Tokenizers differ on whether they add these themselves, so we add them
    explicitly and ask the tokenizer for none.
    """
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    limit = max_chars or char_limit(tokenizer, seq_len)
    cut = [len(p) > limit or len(t) > limit for p, t in zip(batch["prompt"], batch["target"])]
    prompts = tokenizer([cut_chars(p, limit, middle=True) for p in batch["prompt"]], add_special_tokens=False)["input_ids"]
    targets = tokenizer([cut_chars(t, limit, middle=False) for t in batch["target"]], add_special_tokens=False)["input_ids"]
    out = {k: [] for k in ("input_ids", "labels", "prompt_len", "target_len", "prompt_truncated", "target_truncated")}
    out["chars_cut"] = cut
    for prompt, target in zip(prompts, targets):
        prompt, target = bos + prompt, target + [eos]
        kept_prompt, kept_target = truncate(prompt, target, seq_len)
        out["input_ids"].append(kept_prompt + kept_target)
        out["labels"].append([IGNORE_INDEX] * len(kept_prompt) + kept_target)
        out["prompt_len"].append(len(prompt))
        out["target_len"].append(len(target))
        out["prompt_truncated"].append(len(kept_prompt) < len(prompt))
        out["target_truncated"].append(len(kept_target) < len(target))
    return out


def examples_dataset(examples: list[Example]):
    return datasets.Dataset.from_dict({"row": [e.row for e in examples], "prompt": [e.prompt for e in examples],
                                       "target": [e.target for e in examples]})


def tokenize_dataset(examples, tokenizer, seq_len: int, num_proc: int = 1):
    """Examples dataset -> tokenized dataset (one row per example, dropped rows included)."""
    if tokenizer.eos_token_id is None:
        raise HarnessError("the tokenizer has no EOS token; the model could never learn to stop")
    return examples.map(tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len,
                                   "max_chars": char_limit(tokenizer, seq_len)},
                        remove_columns=["prompt", "target"], desc="tokenize")


def rows_from_dataset(tokenized, eos_id: int, source: int = 0) -> tuple[list[TokenizedRow], TokenizeStats]:
    """Tokenized dataset -> training rows (rows without a supervised token dropped) + stats."""
    columns = tokenized.to_dict()
    stats = TokenizeStats(rows=len(tokenized), prompt_truncated=sum(columns["prompt_truncated"]),
                          target_truncated=sum(columns["target_truncated"]), cut_by_chars=sum(columns.get("chars_cut", ())),
                          prompt_lengths=columns["prompt_len"], target_lengths=columns["target_len"])
    rows: list[TokenizedRow] = []
    for row, input_ids, labels in zip(columns["row"], columns["input_ids"], columns["labels"]):
        tokenized_row = TokenizedRow(row, input_ids, labels, source)
        if tokenized_row.supervised == 0:
            stats.zero_supervised.append(row)
        else:
            rows.append(tokenized_row)
            stats.ends_with_eos += labels[-1] == eos_id
    return rows, stats


def tokenize(examples: list[Example], tokenizer, seq_len: int, num_proc: int = 1) -> tuple[list[TokenizedRow], TokenizeStats]:
    """Examples -> training rows, uncached (harness.data_cache adds the cache)."""
    tokenized = tokenize_dataset(examples_dataset(examples), tokenizer, seq_len, num_proc)
    rows, stats = rows_from_dataset(tokenized, tokenizer.eos_token_id)
    check_supervised(stats)
    return rows, stats


def fingerprint(rows: list[TokenizedRow]) -> str:
    """Identity of the tokenized training data; a resumed run must see the same rows."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update(len(r.input_ids).to_bytes(8, "little"))
        digest.update(np.asarray(r.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(r.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def check_supervised(stats: TokenizeStats, what: str = "") -> None:
    bad = stats.zero_supervised
    if bad and len(bad) > MAX_ZERO_SUPERVISED_SHARE * stats.rows:
        raise HarnessError(f"{what + ': ' if what else ''}{name_rows(bad)} ({len(bad)} of {stats.rows}) have no supervised token after "
                           f"truncation to --seq_len; more than {MAX_ZERO_SUPERVISED_SHARE:.0%} means the "
                           f"data or --seq_len is wrong")


def pad_id(tokenizer) -> int:
    # Pad positions are masked by label and attention mask, never by id, so EOS works as pad.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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

    `group_by_length` > 0 (unpacked path): each window of that many global batches of the
    permutation is sorted by length, longest first, cut into global batches, and the batches
    of the window are shuffled, so a micro-batch holds rows of similar length and pads less.
    Steps are still a pure function of (seed, step) for the same data.
    """

    def __init__(self, n_rows: int, micro_batch_size: int, grad_accum_steps: int, world_size: int, seed: int,
                 lengths: list[int] | None = None, group_by_length: int = 0):
        self.n_rows, self.mb, self.ga, self.ws, self.seed = n_rows, micro_batch_size, grad_accum_steps, world_size, seed
        self.lengths, self.group_by_length = lengths, group_by_length
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = n_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise HarnessError(f"the training data has {n_rows} usable rows, fewer than one global batch of "
                               f"{self.global_batch} (micro_batch_size {micro_batch_size} x grad_accum_steps "
                               f"{grad_accum_steps} x world size {world_size})")

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.n_rows))
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rng.shuffle(order)
        if not self.group_by_length:
            return order
        gb, window = self.global_batch, self.group_by_length * self.global_batch
        used = order[: self.steps_per_epoch * gb]  # the dropped tail must not land mid-epoch
        grouped: list[int] = []
        for w in range(0, len(used), window):
            chunk = sorted(used[w: w + window], key=lambda i: -self.lengths[i])  # stable: ties keep shuffled order
            batches = [chunk[i: i + gb] for i in range(0, len(chunk), gb)]
            rng.shuffle(batches)
            grouped += [i for b in batches for i in b]
        return grouped

    def step_rows(self, step: int) -> list[int]:
        """Every row of global optimizer step `step` (0-based), all ranks together."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        start = in_epoch * self.global_batch
        return self.epoch_order(epoch)[start: start + self.global_batch]

    def step(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of each micro-batch of `rank` for global optimizer step `step` (0-based)."""
        rows = self.step_rows(step)
        block = rows[rank * self.mb * self.ga: (rank + 1) * self.mb * self.ga]
        return [block[m * self.mb: (m + 1) * self.mb] for m in range(self.ga)]


def parse_data_spec(spec: str) -> list[tuple[str, float | None]]:
    """`a.jsonl:0.7,b.jsonl:0.3` -> [(path, weight)]; a single path or a list without weights
    gives weight None (every row once)."""
    sources = []
    for part in spec.split(","):
        path, sep, weight = part.strip().rpartition(":")
        try:
            value = float(weight) if sep else None
        except ValueError:
            value, path = None, part.strip()  # a colon inside the path, no weight
        if not sep:
            path = weight
        if not path:
            raise HarnessError(f"--data {spec!r}: an empty path in the list")
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise HarnessError(f"--data {spec!r}: weight {weight} of {path} must be a positive number")
        sources.append((path, value))
    weighted = [w is not None for _, w in sources]
    if any(weighted) and not all(weighted):
        raise HarnessError(f"--data {spec!r}: give every file a weight (a.jsonl:0.7,b.jsonl:0.3) or none")
    return sources


def mix(sources: list[list[TokenizedRow]], weights: list[float | None], seed: int) -> tuple[list[TokenizedRow], list[int]]:
    """Rows of several sources in proportion to their weights, deterministic by seed.

    An epoch keeps the total row count of all sources; source i contributes round(w_i x total)
    rows: whole copies of itself, then a seeded sample without repetition for the remainder.
    Without weights every row is used once. Returns the rows and the count per source.
    """
    if all(w is None for w in weights):
        return [r for rows in sources for r in rows], [len(rows) for rows in sources]
    total, weight_sum = sum(len(rows) for rows in sources), sum(weights)
    mixed, counts = [], []
    for i, (rows, weight) in enumerate(zip(sources, weights)):
        want = round(weight / weight_sum * total)
        copies, rest = divmod(want, len(rows))
        picked = list(range(len(rows))) * copies + sorted(random.Random(seed * 7919 + i).sample(range(len(rows)), rest))
        mixed += [rows[j] for j in picked]
        counts.append(want)
    return mixed, counts


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
