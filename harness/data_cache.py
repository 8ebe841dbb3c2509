"""Tokenized data cached on disk, under a key of everything that changes the tokens.

The key hashes: the data file's bytes (every file of a folder), the tokenizer's files, the
resolved template, the task and its field names, the masking/truncation policy, seq_len, the
harness version and the storage format. Same key: the saved dataset is loaded (memory-mapped)
and nothing is tokenized. Any change: a new key, a new tokenization. Entries are written to a
temporary folder and renamed into place, so a crash never leaves a half-written entry that
looks complete. An entry stores, besides the tokens, each row's supervised-token count and
whether it ends with a trained EOS (so no rank reads the tokens to count them), and a digest of
its tokens (the data fingerprint a resume checks is built from it, not from the tokens).

One rank per node does the O(data) work: local rank 0 hashes the data file for the key (and
tokenizes on a miss); the other ranks of the node poll the filesystem, first for the key rank 0
leaves under `.jobs/<this job's nonce>/`, then for the entry (or for an error file naming what
went wrong) instead of waiting in a collective, which would time out on a large dataset.
`launch/prepare_data.py` writes the same entry into a folder of your choice, which `--data`
accepts directly; such a folder is trusted by the key it records: its tokens are not hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from harness import __version__, data, tasks
from harness.config import TASK_FIELDS
from harness.errors import HarnessError

DEFAULT_CACHE = "~/.cache/llm-ft-harness"  # shared with harness.default_assets
PREPARED_FILE = "prepared.json"  # marks a folder written by prepare_data (or a cache entry)
TOKENIZER_FILE_HINTS = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece", ".model", ".tiktoken",
                        "chat_template")
WAIT_REPORT_S = 60.0
AUTO_NUM_PROC_MIN_ROWS = 20_000
# Part of the key: how an entry is stored (see the module docstring). A folder prepared in another
# format is refused with a message to prepare it again.
STORAGE_FORMAT = "arrow, int32 tokens, per-row supervised and ends_with_eos columns, tokens digest; v2"
JOBS_DIR = ".jobs"  # per-job hand-off files between the local ranks of a node
JOBS_KEEP_S = 7 * 86400  # hand-off folders of older jobs are removed by the next job's local rank 0


def cache_root(flag: str) -> Path:
    if flag:
        return Path(flag).expanduser()
    return Path(os.environ.get("HARNESS_CACHE", DEFAULT_CACHE)).expanduser() / "tokenized"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_digest(model_path: str) -> str:
    """The tokenizer's files in the model folder; weights and model config do not change tokens."""
    h = hashlib.sha256()
    folder = Path(model_path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and any(k in p.name for k in TOKENIZER_FILE_HINTS))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class KeyInputs:
    """Everything that changes the tokens of a data file."""

    data: str  # sha256 of the file(s)
    tokenizer: str  # sha256 of the tokenizer files
    template: str
    task: str  # task name and its field names
    masking: str
    seq_len: int
    harness_version: str
    storage: str

    def key(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


def key_inputs(data_path: str, model_path: str, cfg, template: str, seq_len: int, hash_data: bool = True) -> KeyInputs:
    """`hash_data=False` leaves the data digest empty: for a prepared folder, trusted by its key."""
    module = tasks.get(cfg.task)
    # A task may add what else changes its tokens (task=chat: the --chat_template text) and its own policy.
    extra = module.cache_key(cfg) if hasattr(module, "cache_key") else {}
    task = json.dumps({"task": cfg.task, **{name: getattr(cfg, name) for name in TASK_FIELDS}, **extra}, sort_keys=True)
    return KeyInputs(file_digest(Path(data_path)) if hash_data else "", tokenizer_digest(model_path), template, task,
                     getattr(module, "MASKING_POLICY", data.MASKING_POLICY), seq_len, __version__, STORAGE_FORMAT)


def is_prepared(path: str) -> bool:
    return (Path(path) / PREPARED_FILE).is_file()


def load_prepared(folder: Path, want: KeyInputs | None, what: str):
    """A prepared folder's tokenized dataset; refused if it was made with other settings."""
    meta = json.loads((folder / PREPARED_FILE).read_text())
    if want is not None:
        made = meta["key_inputs"]
        differ = [k for k, v in want.__dict__.items() if k != "data" and made.get(k) != v]
        if differ:
            raise HarnessError(f"{what} {folder}: prepared with other {', '.join(differ)} than this run "
                               f"(prepared: {', '.join(f'{k}={made.get(k)!r}' for k in differ)}); "
                               f"run launch/prepare_data.py again with this run's flags")
    return datasets.load_from_disk(str(folder / "dataset"))


def write_entry(final: Path, tokenized, inputs: KeyInputs, source: str, eos_id: int) -> None:
    """Save the tokenized dataset with its per-row counts and tokens digest, atomically.

    Runs once per node (local rank 0, or prepare_data): the counts and the digest read every
    token once here so that no rank has to at start-up.
    """
    rows = data.TokenizedSource.from_dataset(tokenized, eos_id)
    if "supervised" not in tokenized.column_names:
        tokenized = tokenized.add_column("supervised", rows.supervised.astype(np.int32))
    if "ends_with_eos" not in tokenized.column_names:
        tokenized = tokenized.add_column("ends_with_eos", rows.ends_with_eos)
    staging = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tokenized.save_to_disk(str(staging / "dataset"))
    (staging / PREPARED_FILE).write_text(json.dumps({"key": inputs.key(), "key_inputs": inputs.__dict__,
                                                     "source": source, "rows": len(tokenized),
                                                     "tokens_digest": rows.digest}, indent=2) + "\n")
    try:
        staging.rename(final)
    except OSError:  # another node's rank wrote the same entry first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
        if not (final / PREPARED_FILE).is_file():
            raise


def recorded_digest(dataset) -> str:
    """The tokens digest `write_entry` recorded next to the files `dataset` was loaded from, or ""."""
    files = dataset.cache_files
    if not files:
        return ""
    meta = Path(files[0]["filename"]).parent.parent / PREPARED_FILE
    try:
        return json.loads(meta.read_text()).get("tokens_digest", "")
    except (OSError, ValueError):
        return ""


def build(data_path: str, cfg, task, template: str, tokenizer, seq_len: int, num_proc: int, what: str):
    """Read, turn rows into examples (naming bad rows) and tokenize: no cache involved."""
    examples = task.examples(data.read_rows(data_path, what), cfg, template)
    if num_proc == 0:
        # Starting worker processes costs about a second each: only worth it for large data.
        num_proc = 1 if len(examples) < AUTO_NUM_PROC_MIN_ROWS else min(8, os.cpu_count() or 1)
    if hasattr(task, "tokenize_examples"):  # a row that is not one (prompt, target) pair (task=chat)
        return task.tokenize_examples(examples, cfg, tokenizer, seq_len, num_proc)
    return data.tokenize_dataset(data.examples_dataset(examples), tokenizer, seq_len, num_proc)


def tokenized(data_path: str, model_path: str, cfg, task, template: str, tokenizer, seq_len: int,
              num_proc: int, local_rank: int, nonce: str, what: str = "--data"):
    """The tokenized dataset of one data file, from the cache or made (and cached) now.

    `nonce` is the same on every rank of this job (and new for every job): it names the folder in
    which local rank 0 leaves the key it computed, or an error, for the other ranks of its node,
    so no rank hashes the data again and no rank trusts an old job's files. Returns (dataset, cache_hit).
    """
    path = Path(data_path)
    if not path.exists():
        raise HarnessError(f"{what} {data_path}: no such file or folder")
    if is_prepared(data_path):
        # Trusted by its recorded key: the tokenized set is not hashed again, on any rank.
        return load_prepared(path, key_inputs(data_path, model_path, cfg, template, seq_len, hash_data=False), what), True
    root = cache_root(cfg.data_cache)
    handoff = root / JOBS_DIR / nonce
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    key_file, error_file = handoff / f"{name}.key", handoff / f"{name}.error"
    if local_rank != 0:
        wait_for(key_file, error_file, what, "hash")
        entry = root / key_file.read_text().strip()
        wait_for(entry / PREPARED_FILE, error_file, what, "tokenize")
        return load_prepared(entry, None, what), True
    handoff.mkdir(parents=True, exist_ok=True)
    remove_old_handoffs(root / JOBS_DIR, handoff)
    error_file.unlink(missing_ok=True)
    try:
        inputs = key_inputs(data_path, model_path, cfg, template, seq_len)  # O(file size), once per node
        entry = root / inputs.key()
        staged = key_file.with_name(f"{key_file.name}.tmp-{uuid.uuid4().hex[:8]}")
        staged.write_text(inputs.key())
        staged.replace(key_file)  # atomic: a waiting rank never reads half a key
        if (entry / PREPARED_FILE).is_file():
            return load_prepared(entry, None, what), True
        result = build(data_path, cfg, task, template, tokenizer, seq_len, num_proc, what)
        write_entry(entry, result, inputs, str(path.resolve()), tokenizer.eos_token_id)
    except BaseException as err:
        message = str(err) if isinstance(err, HarnessError) else f"tokenization failed on local rank 0: {err!r}"
        error_file.write_text(message)
        raise
    return load_prepared(entry, None, what), False


def remove_old_handoffs(jobs: Path, keep: Path) -> None:
    cutoff = time.time() - JOBS_KEEP_S
    for folder in jobs.iterdir():
        try:
            if folder != keep and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:  # another node's rank 0 removed it first
            pass


def wait_for(ready: Path, error_file: Path, what: str, doing: str) -> None:
    """Poll for a file local rank 0 writes: no collective, so no timeout however long it takes."""
    start = last_report = time.monotonic()
    while not ready.is_file():
        if error_file.is_file():
            raise HarnessError(error_file.read_text())
        if time.monotonic() - last_report > WAIT_REPORT_S:
            last_report = time.monotonic()
            print(f"rank {os.environ.get('RANK', 0)}: waiting for local rank 0 to {doing} {what} "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
        time.sleep(0.2)
