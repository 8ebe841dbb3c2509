"""The data path at scale: memory-mapped rows, the permutation once per epoch, per-step cost that
does not grow with the data, the eval split before mixing."""

import random
import sys
import tracemalloc

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import write_jsonl
from harness import data, data_cache, report
from harness.batches import StepBatches
from harness.config import TrainConfig
from harness.dist import DistInfo
from harness.labels import IGNORE_INDEX
from harness.preflight import preflight

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def arrow_rows(n: int, length: int = 40, batch: int = 1000, eos: int = 2):
    """A tokenized dataset of n rows built as Arrow directly (no tokenizer): record batches of
    `batch` rows like datasets.map writes, a 10-token prompt masked, the target ending in EOS."""
    offsets = np.arange(n + 1, dtype=np.int32) * length
    ids = (np.arange(n * length) % 400 + 10).astype(np.int32)
    ids[length - 1::length] = eos
    labels = ids.copy()
    labels[(np.arange(n * length) % length) < 10] = IGNORE_INDEX
    table = pa.table({"row": np.arange(n, dtype=np.int64),
                      "input_ids": pa.ListArray.from_arrays(offsets, ids),
                      "labels": pa.ListArray.from_arrays(offsets, labels),
                      "prompt_len": np.full(n, 10, dtype=np.int32), "target_len": np.full(n, length - 10, dtype=np.int32),
                      "prompt_truncated": np.zeros(n, dtype=bool), "target_truncated": np.zeros(n, dtype=bool)})
    return datasets.Dataset(datasets.table.InMemoryTable(pa.Table.from_batches(table.to_batches(max_chunksize=batch))))


def saved_entry(tmp_path, n: int, **kwargs):
    """The dataset written as a cache entry (write_entry) and loaded back, memory-mapped."""
    inputs = data_cache.KeyInputs("d", "t", "", "instruction", "m", 64, "0", data_cache.STORAGE_FORMAT)
    data_cache.write_entry(tmp_path / "entry", arrow_rows(n, **kwargs), inputs, "generated", eos_id=2)
    return data_cache.load_prepared(tmp_path / "entry", None, "--data")


# -- the permutation ------------------------------------------------------------------------------

def reference_epoch_order(n, gb, steps_per_epoch, seed, epoch, lengths=None, group=0):
    """The epoch order as every earlier version computed it (Python lists), kept verbatim here so
    a change of the data order (which would move every resumed run's data position) is caught."""
    order = list(range(n))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    if not group:
        return order
    window = group * gb
    used = order[: steps_per_epoch * gb]
    grouped = []
    for w in range(0, len(used), window):
        chunk = sorted(used[w: w + window], key=lambda i: -lengths[i])
        batches = [chunk[i: i + gb] for i in range(0, len(chunk), gb)]
        rng.shuffle(batches)
        grouped += [i for b in batches for i in b]
    return grouped


@pytest.mark.parametrize("group", [0, 3])
def test_permutation_equals_the_previous_one(group):
    rng = random.Random(1)
    lengths = [rng.randint(1, 30) for _ in range(1001)]  # many ties: the stable order matters
    sampler = data.StepSampler(1001, 4, 2, 3, seed=7, lengths=lengths, group_by_length=group)
    gb, spe = sampler.global_batch, sampler.steps_per_epoch
    for epoch in range(3):
        ref = reference_epoch_order(1001, gb, spe, 7, epoch, lengths, group)
        for step in range(epoch * spe, (epoch + 1) * spe):
            start = (step - epoch * spe) * gb
            assert sampler.step_rows(step) == ref[start: start + gb]


# -- per-step cost does not grow with the rows ---------------------------------------------------

def step_work(n: int, packing: bool, group: int, monkeypatch) -> dict:
    """Counted work of steps 1..6 (both ranks) over n rows, after the epoch's permutation exists."""
    rows, _ = data.rows_from_dataset(arrow_rows(n), eos_id=2)
    permutations, tokens_read = [], []
    permutation, tokens = data.StepSampler.permutation, data.TokenizedRows.tokens
    monkeypatch.setattr(data.StepSampler, "permutation", lambda self, e: permutations.append(e) or permutation(self, e))
    monkeypatch.setattr(data.TokenizedRows, "tokens", lambda self, i: tokens_read.append(i) or tokens(self, i))
    sampler = data.StepSampler(n, 4, 2, 2, seed=0, lengths=rows.lengths, group_by_length=group)
    batches = StepBatches(rows, sampler, 0, packing=packing, seq_len=128)
    batches(0, 0)  # the epoch's permutation: once, before the counted steps
    tokens_read.clear()
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    tracemalloc.start()
    tracemalloc.reset_peak()
    sys.setprofile(count)
    for step in range(1, 7):
        for rank in range(2):
            batches(step, rank)
            batches.slots(step)
    sys.setprofile(None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"permutations": permutations, "calls": calls, "tokens_read": len(tokens_read), "peak_bytes": peak}


@pytest.mark.parametrize("packing, group", [(True, 0), (False, 0), (False, 4)])
def test_step_cost_does_not_grow_with_the_row_count(packing, group, monkeypatch):
    small = step_work(1_000, packing, group, monkeypatch)
    monkeypatch.undo()
    large = step_work(100_000, packing, group, monkeypatch)
    # One permutation per epoch, computed before the counted steps; then every step is a slice.
    assert small["permutations"] == large["permutations"] == [0]
    # The same Python and C calls for a step of 1k rows as of 100k rows (equal-length rows: same layout).
    assert small["calls"] == large["calls"] > 0
    # A step reads only its own rows: 16 rows x 6 steps, once per rank's micro-batches.
    assert small["tokens_read"] == large["tokens_read"] == 16 * 6
    # Nothing sized by the data set is allocated per step (100k int64 indices alone are 800 kB).
    assert large["peak_bytes"] < 200_000 and small["peak_bytes"] < 200_000, (small, large)


def test_report_layout_is_sampled_on_a_long_epoch(monkeypatch):
    rows, _ = data.rows_from_dataset(arrow_rows(100_000), eos_id=2)
    sampler = data.StepSampler(len(rows), 4, 1, 1, seed=5, lengths=rows.lengths)
    batches = StepBatches(rows, sampler, 0, packing=True, seq_len=128)
    measured, slots = [], StepBatches.slots
    monkeypatch.setattr(StepBatches, "slots", lambda self, s: measured.append(s) or slots(self, s))
    entry = report.layout_entry(batches, sampler.steps_per_epoch, 128)
    assert entry["steps_measured"] == len(measured) == report.LAYOUT_SAMPLE_STEPS < entry["steps_in_epoch"] == 25_000
    assert measured == report.measured_steps(25_000, 5) and len(set(measured)) == len(measured)
    assert entry["tokens_per_step"] == 4 * 40  # equal rows: the sample gives the exact figure
    assert "measured on 512 of the epoch's 25000 steps" in report.summary(
        {"sources": [], "special_tokens": {"eos_id": 2, "pad_id": 0, "pad_is_eos": False, "eos_trained": True},
         "steps": entry})


# -- storage --------------------------------------------------------------------------------------

def test_rows_are_memory_mapped_views_not_copies(tmp_path):
    n, length = 100_000, 40
    loaded = saved_entry(tmp_path, n, length=length)
    tracemalloc.start()
    arrow_before = pa.total_allocated_bytes()
    rows, stats = data.rows_from_dataset(loaded, eos_id=2)
    numpy_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    arrow_bytes = pa.total_allocated_bytes() - arrow_before
    token_bytes = n * length * 4 * 2
    # Per-row arrays only (a few numbers per row, 10 MB); the 32 MB of tokens stay in the memory map.
    assert numpy_bytes + arrow_bytes < 100 * n < token_bytes / 3, (numpy_bytes, arrow_bytes)
    ids, labels = rows.tokens(54_321)
    assert not ids.flags.owndata and not ids.flags.writeable and ids.dtype == np.int32
    assert ids.tolist() == (np.arange(54_321 * length, 54_322 * length) % 400 + 10).tolist()[:-1] + [2]
    assert labels.tolist() == [IGNORE_INDEX] * 10 + ids.tolist()[10:]
    assert rows.lengths.dtype == rows.supervised.dtype == np.int64
    assert (rows.lengths == length).all() and (rows.supervised == length - 10).all()
    assert stats.ends_with_eos == n and rows.origin(7) == (0, 7)


def test_stored_row_counts_equal_their_definition(tiny_model, tmp_path):
    """supervised / ends_with_eos as write_entry stores them = as derived from an in-memory dataset
    = the Python definition (labels[1:] != -100; a trained EOS last), on truncated rows too."""
    from transformers import AutoTokenizer

    from harness.tasks.common import Example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(0)
    examples = [Example(i, "word " * rng.randint(1, 40), "w " * rng.randint(1, 40)) for i in range(200)]
    tokenized = data.tokenize_dataset(data.examples_dataset(examples), tokenizer, seq_len=32)
    in_memory, _ = data.rows_from_dataset(tokenized, tokenizer.eos_token_id)
    inputs = data_cache.KeyInputs("d", "t", "", "instruction", "m", 32, "0", data_cache.STORAGE_FORMAT)
    data_cache.write_entry(tmp_path / "e", tokenized, inputs, "generated", tokenizer.eos_token_id)
    stored_ds = data_cache.load_prepared(tmp_path / "e", None, "--data")
    assert "supervised" in stored_ds.column_names
    stored, stats = data.rows_from_dataset(stored_ds, tokenizer.eos_token_id)
    python = [r.supervised for r in in_memory]
    assert stored.supervised.tolist() == in_memory.supervised.tolist() == python
    assert stats.ends_with_eos == sum(r.labels[-1] == tokenizer.eos_token_id for r in in_memory) > 0
    assert 0 < stats.target_truncated < 200  # both kinds of rows are in the set
    assert stored.sources[0].digest == in_memory.sources[0].digest == data_cache.recorded_digest(stored_ds)
    assert data.fingerprint(stored) == data.fingerprint(in_memory)


def test_tokens_digest_ignores_batching_and_width_but_not_tokens():
    base = data.rows_from_dataset(arrow_rows(2500, batch=1000), eos_id=2)[0].sources[0].digest
    assert data.rows_from_dataset(arrow_rows(2500, batch=333), eos_id=2)[0].sources[0].digest == base
    as_lists = data.TokenizedRows.from_rows(list(data.rows_from_dataset(arrow_rows(2500), eos_id=2)[0]))
    assert as_lists.sources[0].digest == base  # int64 lists, one batch
    assert data.rows_from_dataset(arrow_rows(2500, length=41), eos_id=2)[0].sources[0].digest != base


def test_mixing_repeats_rows_by_index():
    a, _ = data.rows_from_dataset(arrow_rows(10), eos_id=2, source=0)
    b, _ = data.rows_from_dataset(arrow_rows(30), eos_id=2, source=1)
    mixed, counts = data.mix([a, b], [0.7, 0.3], seed=1)
    assert counts == [28, 12] and len(mixed) == 40
    origins = [mixed.origin(i) for i in range(40)]
    assert [r for _, r in origins[:20]] == list(range(10)) * 2 and {s for s, _ in origins[:28]} == {0}
    rest = [r for _, r in origins[20:28]]
    assert rest == sorted(set(rest)) and [r for _, r in origins[28:]] == sorted({r for _, r in origins[28:]})
    assert mixed.sources == [a.sources[0], b.sources[0]]  # the same memory-mapped sources, no copy
    assert (mixed.lengths == 40).all() and mixed.tokens(39)[0].base is not None


# -- eval split ------------------------------------------------------------------------------------

def test_eval_split_holds_rows_out_before_mixing(tiny_model, tmp_path):
    """The case that leaked: a weighted mix up-samples a source, so a row had copies on both sides."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Repeat the word w{i}.", "output": f"w{i} w{i}"}
                                           for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))}
                                           for i in range(1, 31)])
    setup = preflight(TrainConfig(model=str(tiny_model), data=f"{a}:0.7,{b}:0.3", eval_split=0.2,
                                  output_dir=str(tmp_path / "r"), micro_batch_size=2, data_cache=str(tmp_path / "c")),
                      CPU1)
    train = setup.train_rows
    trained = {tuple(r.input_ids) for r in train}
    held = setup.eval_set.loss_rows
    assert len(held) == 2 + 6  # 20% of each source
    assert not any(tuple(r.input_ids) in trained for r in held)  # no held-out row, nor a copy, is trained on
    origins = [train.origin(i) for i in range(len(train))]
    # a (8 rows left after the split) is up-sampled to 0.7 of 32: each of its 8 rows is trained on,
    # 2 or 3 times; b (24 left) is sampled down to 10 distinct rows.
    assert len(train) == 32 and sum(s == 0 for s, _ in origins) == 22 and len({o for o in origins if o[0] == 0}) == 8
    assert sum(s == 1 for s, _ in origins) == len({o for o in origins if o[0] == 1}) == 10
    assert [s["rows_held_out_for_eval"] for s in setup.report["sources"]] == [2, 6]
    assert [s["rows_in_mix"] for s in setup.report["sources"]] == [22, 10]
