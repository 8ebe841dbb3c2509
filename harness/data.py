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

Storage at scale: the training rows (`TokenizedRows`) are the cache's Arrow files, memory-mapped,
read as numpy views (`ListColumn`), so the ranks of a node share one copy in the page cache and no
token is a Python object. Per-row lengths and supervised counts are numpy arrays; mixing, repeats
and the eval split are index arrays (source, row), never copies of rows. The step sampler computes
an epoch's permutation once and hands out slices of it.
"""

from __future__ import annotations

import bisect
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
# --eval_split shuffles source i's rows with seed + i x this (source 0: the seed itself).
EVAL_SPLIT_SEED_STRIDE = 104_729


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
    # Added beside the old columns first: a table whose only column was removed has no rows left.
    for name in mixed:
        rows = rows.add_column(f"{name}.raw", values[name], feature=rows.features[name])
    return rows.remove_columns(mixed).rename_columns({f"{name}.raw": name for name in mixed})


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
    """One row as Python lists: for eval sets, tests and forensics. Training reads `TokenizedRows`."""

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
    # Lengths before truncation (BOS and EOS included), for the preflight report (numpy arrays).
    prompt_lengths: np.ndarray | list[int] = field(default_factory=list)
    target_lengths: np.ndarray | list[int] = field(default_factory=list)
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


# How tokenize_batch's output is stored: 4-byte token ids (every vocabulary fits) halve the cache
# and the page cache the ranks of a node share, against Arrow's default of 8.
TOKENIZED_FEATURES = datasets.Features({
    "row": datasets.Value("int64"),
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "prompt_len": datasets.Value("int32"),
    "target_len": datasets.Value("int32"),
    "prompt_truncated": datasets.Value("bool"),
    "target_truncated": datasets.Value("bool"),
    "chars_cut": datasets.Value("bool"),
})


def examples_dataset(examples: list[Example]):
    return datasets.Dataset.from_dict({"row": [e.row for e in examples], "prompt": [e.prompt for e in examples],
                                       "target": [e.target for e in examples]})


def tokenize_dataset(examples, tokenizer, seq_len: int, num_proc: int = 1):
    """Examples dataset -> tokenized dataset (one row per example, dropped rows included)."""
    if tokenizer.eos_token_id is None:
        raise HarnessError("the tokenizer has no EOS token; the model could never learn to stop")
    return examples.map(tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "max_chars": char_limit(tokenizer, seq_len)},
                        features=TOKENIZED_FEATURES,
                        remove_columns=["prompt", "target"], desc="tokenize")


# -- tokenized rows as numpy views of Arrow columns ----------------------------------------------


class ListColumn:
    """A list<int> column (input_ids or labels) as numpy views, one per Arrow record batch.

    A dataset loaded from disk is a memory-mapped Arrow table: each record batch holds an offsets
    buffer and a values buffer, and `to_numpy` on them copies nothing. Row i is then a slice of
    its batch's values, read from the page cache that every rank of a node shares; no token ever
    becomes a Python object. An in-memory dataset (eval sets, tests) is read the same way.
    """

    def __init__(self, offsets: list[np.ndarray], values: list[np.ndarray]):
        self.offsets, self.values = offsets, values  # per batch; offsets index that batch's values
        self.starts = [0]  # first row of each batch, for bisect (a Python list: faster per lookup)
        for o in offsets:
            self.starts.append(self.starts[-1] + len(o) - 1)

    @classmethod
    def from_arrow(cls, column) -> ListColumn:
        """A pyarrow ChunkedArray of lists. Offsets are absolute into the batch's (unsliced) values,
        so a sliced batch reads right too."""
        chunks = [c for c in column.chunks if len(c)]
        return cls([c.offsets.to_numpy() for c in chunks], [c.values.to_numpy(zero_copy_only=True) for c in chunks])

    @classmethod
    def from_lists(cls, lists: list) -> ListColumn:
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        values = np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(offsets[-1]))
        return cls([offsets], [values])

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> np.ndarray:
        b = bisect.bisect_right(self.starts, i) - 1
        offsets, j = self.offsets[b], i - self.starts[b]
        return self.values[b][offsets[j]: offsets[j + 1]]

    def lengths(self) -> np.ndarray:
        if not self.offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o) for o in self.offsets]).astype(np.int64)

    def batches(self):
        """(lengths, values) of each record batch, values cut to the batch's rows."""
        for offsets, values in zip(self.offsets, self.values):
            yield np.diff(offsets), values[offsets[0]: offsets[-1]]


def row_counts(labels: ListColumn, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: supervised positions (t >= 1 with labels[t] != -100, what the loss counts after
    its shift) and whether the last label is the EOS (a trained EOS). Vectorized per batch."""
    supervised, ends_with_eos = [], []
    for lengths, values in labels.batches():
        end = np.cumsum(lengths)
        start = end - lengths
        trained = np.concatenate([[0], np.cumsum(values != IGNORE_INDEX)])
        # Position 0 of a row is never a target (nothing precedes it): count from start + 1.
        supervised.append(trained[end] - trained[np.minimum(start + 1, end)])
        last = values[np.maximum(end - 1, 0)] if len(values) else np.zeros(len(end), dtype=values.dtype)
        ends_with_eos.append((lengths > 0) & (last == eos_id))
    if not supervised:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(supervised).astype(np.int64), np.concatenate(ends_with_eos)


def column(table, name: str) -> np.ndarray:
    """A scalar column as one numpy array (one copy of a few bytes per row)."""
    return table.column(name).to_numpy()


class TokenizedSource:
    """One tokenized data file: its token columns (memory-mapped) and per-row numpy arrays."""

    def __init__(self, input_ids: ListColumn, labels: ListColumn, rows: np.ndarray, supervised: np.ndarray,
                 ends_with_eos: np.ndarray, source: int = 0, digest: str = ""):
        self.input_ids, self.labels, self.rows = input_ids, labels, np.asarray(rows, dtype=np.int64)
        self.lengths = input_ids.lengths()
        self.supervised, self.ends_with_eos = supervised, ends_with_eos
        self.source = source  # which --data file (index into the mix)
        self._digest = digest

    @classmethod
    def from_dataset(cls, dataset, eos_id: int, source: int = 0, digest: str = "") -> TokenizedSource:
        """`digest`: the tokens digest recorded when the dataset was written (else computed on demand).
        The per-row columns `supervised` and `ends_with_eos` are read when the cache stored them
        (harness.data_cache), else derived from the labels here."""
        if dataset._indices is not None:  # a select()/shuffle() view: make the rows contiguous first
            dataset = dataset.flatten_indices()
        table = dataset.data.table  # memory-mapped when the dataset was loaded from disk
        labels = ListColumn.from_arrow(table.column("labels"))
        if "supervised" in table.column_names:
            supervised, ends = column(table, "supervised").astype(np.int64), column(table, "ends_with_eos")
        else:
            supervised, ends = row_counts(labels, eos_id)
        return cls(ListColumn.from_arrow(table.column("input_ids")), labels, column(table, "row"), supervised, ends,
                   source, digest)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def digest(self) -> str:
        """sha256 of every row's tokens, labels and data-file row, independent of how the rows are
        batched or which integer width stores them."""
        if not self._digest:
            parts = [hashlib.sha256() for _ in range(4)]
            for col, (h_len, h_val) in ((self.input_ids, parts[:2]), (self.labels, parts[2:])):
                for lengths, values in col.batches():
                    h_len.update(lengths.astype("<i8").tobytes())
                    h_val.update(values.astype("<i8").tobytes())
            total = hashlib.sha256(b"tokens-v1")
            for h in parts:
                total.update(h.digest())
            total.update(self.rows.astype("<i8").tobytes())
            self._digest = total.hexdigest()
        return self._digest


class TokenizedRows:
    """The rows a run trains on: (source, row of that source) index arrays over memory-mapped sources.

    Mixing, up-sampling and the eval split select and repeat rows by index; no row is copied.
    `lengths` and `supervised` are numpy arrays (int64) over the rows; `tokens(i)` gives row i's
    (input_ids, labels) as numpy views; `origin(i)` its (--data index, row in that file).
    `rows[i]` builds a `TokenizedRow` of Python lists: for eval sets, tests and forensics only.
    """

    def __init__(self, sources: list[TokenizedSource], part: np.ndarray, index: np.ndarray):
        self.sources = sources
        self.part = np.asarray(part, dtype=np.int32)  # into self.sources
        self.index = np.asarray(index, dtype=np.int64)  # row of that source
        self.lengths = np.zeros(len(self.index), dtype=np.int64)
        self.supervised = np.zeros(len(self.index), dtype=np.int64)
        for p, src in enumerate(sources):
            mine = self.part == p
            self.lengths[mine] = src.lengths[self.index[mine]]
            self.supervised[mine] = src.supervised[self.index[mine]]

    @classmethod
    def of(cls, source: TokenizedSource, index: np.ndarray) -> TokenizedRows:
        return cls([source], np.zeros(len(index), dtype=np.int32), index)

    @classmethod
    def from_rows(cls, rows: list[TokenizedRow]) -> TokenizedRows:
        """Rows given as Python lists (small sets: eval, tests), one source per `source` value."""
        ids = sorted({r.source for r in rows})
        sources, part, index = [], np.zeros(len(rows), dtype=np.int32), np.zeros(len(rows), dtype=np.int64)
        for p, sid in enumerate(ids):
            mine = [i for i, r in enumerate(rows) if r.source == sid]
            labels = ListColumn.from_lists([rows[i].labels for i in mine])
            supervised = np.array([rows[i].supervised for i in mine], dtype=np.int64)
            sources.append(TokenizedSource(ListColumn.from_lists([rows[i].input_ids for i in mine]), labels,
                                           np.array([rows[i].row for i in mine]), supervised,
                                           np.zeros(len(mine), dtype=bool), source=sid))
            part[mine], index[mine] = p, np.arange(len(mine))
        return cls(sources, part, index)

    @staticmethod
    def concat(parts: list[TokenizedRows]) -> TokenizedRows:
        sources: list[TokenizedSource] = []
        part, index = [], []
        for rows in parts:
            remap = []
            for src in rows.sources:
                found = next((k for k, s in enumerate(sources) if s is src), None)
                if found is None:
                    sources.append(src)
                    found = len(sources) - 1
                remap.append(found)
            part.append(np.asarray(remap, dtype=np.int32)[rows.part] if len(rows) else rows.part)
            index.append(rows.index)
        return TokenizedRows(sources, np.concatenate(part) if part else [], np.concatenate(index) if index else [])

    def take(self, positions) -> TokenizedRows:
        """These rows, in this order (repeats allowed): index arrays only."""
        positions = np.asarray(positions, dtype=np.int64)
        return TokenizedRows(self.sources, self.part[positions], self.index[positions])

    def __len__(self) -> int:
        return len(self.index)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of row i: views of the memory-mapped columns, never written to."""
        src, j = self.sources[self.part[i]], int(self.index[i])
        return src.input_ids[j], src.labels[j]

    def origin(self, i: int) -> tuple[int, int]:
        src = self.sources[self.part[i]]
        return src.source, int(src.rows[self.index[i]])

    def __getitem__(self, i: int) -> TokenizedRow:
        i = range(len(self))[i]  # IndexError past the end, negative indices from the end
        ids, labels = self.tokens(i)
        source, row = self.origin(i)
        return TokenizedRow(row, ids.tolist(), labels.tolist(), source)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def rows_from_dataset(tokenized, eos_id: int, source: int = 0, digest: str = "") -> tuple[TokenizedRows, TokenizeStats]:
    """Tokenized dataset -> training rows (rows without a supervised token dropped) + stats.
    Reads only per-row columns: the tokens stay where they are (memory-mapped)."""
    if tokenized._indices is not None:  # a select()/shuffle() view: make the rows contiguous first
        tokenized = tokenized.flatten_indices()
    src = TokenizedSource.from_dataset(tokenized, eos_id, source, digest)
    table = tokenized.data.table
    kept = np.flatnonzero(src.supervised > 0)
    stats = TokenizeStats(rows=len(src), prompt_truncated=int(column(table, "prompt_truncated").sum()),
                          target_truncated=int(column(table, "target_truncated").sum()),
                          cut_by_chars=int(column(table, "chars_cut").sum()) if "chars_cut" in table.column_names else 0,
                          zero_supervised=src.rows[src.supervised == 0].tolist(),
                          prompt_lengths=column(table, "prompt_len"), target_lengths=column(table, "target_len"),
                          ends_with_eos=int(src.ends_with_eos[kept].sum()))
    return TokenizedRows.of(src, kept), stats


def tokenize(examples: list[Example], tokenizer, seq_len: int, num_proc: int = 1) -> tuple[TokenizedRows, TokenizeStats]:
    """Examples -> training rows, uncached (harness.data_cache adds the cache)."""
    tokenized = tokenize_dataset(examples_dataset(examples), tokenizer, seq_len, num_proc)
    rows, stats = rows_from_dataset(tokenized, tokenizer.eos_token_id)
    check_supervised(stats)
    return rows, stats


def fingerprint(rows: TokenizedRows) -> str:
    """Identity of the tokenized training data; a resumed run must see the same rows.

    The tokens digest of each source (recorded once when the cache entry was written) and the
    index arrays that select, repeat and order its rows: O(rows) per rank, never O(tokens).
    """
    digest = hashlib.sha256(b"rows-v2")
    for src in rows.sources:
        digest.update(src.digest.encode())
    digest.update(rows.part.astype("<i4").tobytes())
    digest.update(rows.index.astype("<i8").tobytes())
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
    return collate_tokens([(r.input_ids, r.labels) for r in rows], pad_id)


def collate_tokens(samples: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """(input_ids, labels) pairs (numpy arrays or lists) -> one right-padded micro-batch.
    Assembled in numpy, one copy per row, then handed to torch without another copy."""
    width = max(len(ids) for ids, _ in samples)
    input_ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(samples), width), dtype=np.int64)
    for i, (ids, labs) in enumerate(samples):
        n = len(ids)
        input_ids[i, :n] = ids
        labels[i, :n] = labs
        attention_mask[i, :n] = 1
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(attention_mask)}


class StepSampler:
    """Which rows each rank reads in each micro-step of each optimizer step.

    Every epoch is one seeded permutation of all rows, cut into global batches of
    `global_batch_size` rows; a last incomplete global batch is dropped so every rank runs the
    same number of micro-steps. Inside a global batch, rank r takes a contiguous block and
    micro-step m a slice of it. The set of rows in a step therefore depends only on the seed
    and the global batch size, which is what makes grad-accum, world-size and ZeRO-stage
    variants comparable step by step.

    The permutation is computed once per epoch (and kept until the next epoch is asked for), so
    a step costs a slice, whatever the row count. It is Python's `random.Random(seed * 1_000_003
    + epoch).shuffle` of the row indices, the order every earlier version produced, so a
    checkpoint's data position keeps its meaning (about 1 s per million rows, once per epoch).

    `group_by_length` > 0 (unpacked path): each window of that many global batches of the
    permutation is sorted by length, longest first, cut into global batches, and the batches
    of the window are shuffled, so a micro-batch holds rows of similar length and pads less.
    Steps are still a pure function of (seed, step) for the same data.
    """

    def __init__(self, n_rows: int, micro_batch_size: int, grad_accum_steps: int, world_size: int, seed: int,
                 lengths=None, group_by_length: int = 0):
        self.n_rows, self.mb, self.ga, self.ws, self.seed = n_rows, micro_batch_size, grad_accum_steps, world_size, seed
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.group_by_length = group_by_length
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = n_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise HarnessError(f"the training data has {n_rows} usable rows, fewer than one global batch of "
                               f"{self.global_batch} (micro_batch_size {micro_batch_size} x grad_accum_steps "
                               f"{grad_accum_steps} x world size {world_size})")
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices of `epoch` in training order (computed on the first call for the epoch)."""
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.permutation(epoch)
        return self._order

    def permutation(self, epoch: int) -> np.ndarray:
        order = list(range(self.n_rows))
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rng.shuffle(order)
        if not self.group_by_length:
            return np.asarray(order, dtype=np.int64)
        gb, window = self.global_batch, self.group_by_length * self.global_batch
        used = np.asarray(order[: self.steps_per_epoch * gb], dtype=np.int64)  # the dropped tail must not land mid-epoch
        grouped = []
        for w in range(0, len(used), window):
            chunk = used[w: w + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # stable: ties keep shuffled order
            batches = [chunk[i: i + gb] for i in range(0, len(chunk), gb)]
            rng.shuffle(batches)
            grouped += batches
        return np.concatenate(grouped)

    def step_rows(self, step: int) -> list[int]:
        """Every row of global optimizer step `step` (0-based), all ranks together."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        start = in_epoch * self.global_batch
        return self.epoch_order(epoch)[start: start + self.global_batch].tolist()

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


def mix(sources: list[TokenizedRows], weights: list[float | None], seed: int) -> tuple[TokenizedRows, list[int]]:
    """Rows of several sources in proportion to their weights, deterministic by seed.

    An epoch keeps the total row count of all sources; source i contributes round(w_i x total)
    rows: whole copies of itself, then a seeded sample without repetition for the remainder.
    Without weights every row is used once. Returns the rows (index arrays: a copy of a row is
    its index again) and the count per source.
    """
    if all(w is None for w in weights):
        return TokenizedRows.concat(sources), [len(rows) for rows in sources]
    total, weight_sum = sum(len(rows) for rows in sources), sum(weights)
    mixed, counts = [], []
    for i, (rows, weight) in enumerate(zip(sources, weights)):
        want = round(weight / weight_sum * total)
        copies, rest = divmod(want, len(rows))
        sample = sorted(random.Random(seed * 7919 + i).sample(range(len(rows)), rest))
        picked = np.concatenate([np.tile(np.arange(len(rows), dtype=np.int64), copies), np.asarray(sample, dtype=np.int64)])
        mixed.append(rows.take(picked))
        counts.append(want)
    return TokenizedRows.concat(mixed), counts


def split_rows(rows: TokenizedRows, fraction: float, seed: int, source: int, what: str) -> tuple[TokenizedRows, TokenizedRows]:
    """--eval_split on one source's rows, before any mixing: (train, held out), each in file order.

    Splitting per source row (not after mixing) is what keeps every copy of a held-out row out of
    training when up-sampling repeats rows. The first source uses the seed as it is, so a single
    --data file holds out exactly the rows `evaluation.split` would pick.
    """
    n = len(rows)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise HarnessError(f"--eval_split {fraction} of {n} rows of {what} leaves nothing to train on")
    order = list(range(n))
    random.Random(seed + EVAL_SPLIT_SEED_STRIDE * source).shuffle(order)
    held = np.zeros(n, dtype=bool)
    held[order[:n_eval]] = True
    return rows.take(np.flatnonzero(~held)), rows.take(np.flatnonzero(held))


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
