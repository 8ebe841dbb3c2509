"""Data: reading every supported format, template + masking, truncation, batching, sampling."""

import json

import pytest

from conftest import write_jsonl
from harness import data
from harness.config import TrainConfig
from harness.labels import IGNORE_INDEX
from harness.errors import HarnessError
from harness.tasks import instruction
from harness.tasks.common import Example, load_template

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi there"},
    {"instruction": "Name a colour.", "output": "red"},  # no input field at all
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# -- reading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", "saved"])
def test_reads_every_supported_format(tmp_path, suffix):
    import datasets

    rows = [{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in ROWS]
    ds = datasets.Dataset.from_list(rows)
    if suffix == ".jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif suffix == ".json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        path = tmp_path / "d.csv"
        ds.to_csv(str(path), index=False)
    elif suffix == ".parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    loaded = data.read_rows(str(path))
    # CSV has no way to tell an empty string from a missing value; the task reads both as "".
    assert [{k: v or "" for k, v in r.items()} for r in loaded] == rows


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.jsonl", "no such file"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "unsupported file type '.txt'"),
    (lambda p: (p / "e.jsonl").write_text("") is not None and p / "e.jsonl", "empty"),
    (lambda p: (p / "b.jsonl").write_text('{"instruction": "a", "output": \n') and p / "b.jsonl", "cannot be read as json"),
    (lambda p: (p / "folder").mkdir() or p / "folder", "not a datasets.save_to_disk folder"),
])
def test_bad_data_files_are_named(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(HarnessError, match=message) as err:
        data.read_rows(str(path))
    assert str(path) in str(err.value)


# -- task: template and bad rows -------------------------------------------------------------

def test_default_template_with_and_without_input():
    examples = instruction.examples(ROWS, TrainConfig())
    assert examples[0].prompt == instruction.PROMPT_WITH_INPUT.format(instruction="Add the numbers.", input="2 3")
    assert examples[1].prompt == instruction.PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert examples[2].prompt == instruction.PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert [e.target for e in examples] == ["5", "hi there", "red"]


def test_custom_template_and_field_names(tmp_path):
    rows = [{"q": "Capital of France?", "a": "Paris"}]
    cfg = TrainConfig(instruction_field="q", output_field="a")
    template_file = tmp_path / "t.txt"
    template_file.write_text("Q: {instruction}\nA:")
    [ex] = instruction.examples(rows, cfg, load_template(str(template_file)))
    assert (ex.prompt, ex.target) == ("Q: Capital of France?\nA:", "Paris")


def test_template_errors():
    with pytest.raises(HarnessError, match="unknown placeholder"):
        instruction.examples(ROWS, TrainConfig(), "{instruction} {context}")
    with pytest.raises(HarnessError, match="not a file"):
        load_template("no placeholders and no such file")


def test_missing_field_names_the_flag():
    with pytest.raises(HarnessError, match="no field 'output'.*--output_field"):
        instruction.examples([{"instruction": "x", "response": "y"}], TrainConfig())


def test_bad_rows_are_listed_by_index():
    rows = ROWS + [{"instruction": "", "output": "x"}, {"instruction": "a", "output": None},
                   {"instruction": "b", "output": "  "}]
    with pytest.raises(HarnessError) as err:
        instruction.examples(rows, TrainConfig())
    assert "rows 3, 4" in str(err.value) and "row 5" in str(err.value) and "empty" in str(err.value)


# -- tokenization and masking ----------------------------------------------------------------

def test_prompt_masked_target_and_eos_supervised(tokenizer):
    ex = Example(0, "### Instruction:\nSay hi.\n\n### Response:\n", "hi there")
    [row], stats = data.tokenize([ex], tokenizer, seq_len=512)
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
    assert row.input_ids == [tokenizer.bos_token_id] + prompt_ids + target_ids + [tokenizer.eos_token_id]
    n_prompt = 1 + len(prompt_ids)
    assert row.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row.labels[n_prompt:] == target_ids + [tokenizer.eos_token_id]
    assert row.supervised == len(target_ids) + 1  # EOS is trained
    assert stats.prompt_truncated == stats.target_truncated == 0


def test_truncation_policy_cuts_prompt_middle_first():
    prompt, target = list(range(100, 120)), list(range(5))
    p, t = data.truncate(prompt, target, seq_len=15)
    assert t == target  # the target is intact while the prompt can give way
    assert len(p) == 10 and p[:5] == prompt[:5] and p[5:] == prompt[-5:]  # head and tail survive


def test_truncation_policy_never_drops_the_whole_target():
    prompt, target = list(range(100, 120)), list(range(30))
    p, t = data.truncate(prompt, target, seq_len=16)
    assert len(p) == 8  # the prompt keeps half of seq_len
    assert t == target[:8] and len(p) + len(t) == 16
    p, t = data.truncate(list(range(3)), list(range(30)), seq_len=16)
    assert p == [0, 1, 2] and t == list(range(13))


def test_truncation_counts_are_reported(tokenizer):
    long_prompt = Example(0, "word " * 200, "ok")
    long_target = Example(1, "hi", "word " * 200)
    rows, stats = data.tokenize([long_prompt, long_target], tokenizer, seq_len=64)
    assert all(len(r.input_ids) <= 64 for r in rows)
    assert stats.prompt_truncated == 1 and stats.target_truncated == 1
    assert rows[0].input_ids[-1] == tokenizer.eos_token_id and rows[1].input_ids[-1] != tokenizer.eos_token_id


def test_zero_supervised_rows_above_the_share_are_an_error():
    stats = data.TokenizeStats(rows=10, zero_supervised=[3, 7])
    with pytest.raises(HarnessError, match=r"rows 3, 7 \(2 of 10\) have no supervised token"):
        data.check_supervised(stats)
    data.check_supervised(data.TokenizeStats(rows=1000, zero_supervised=[5]))  # 0.1% is tolerated


# -- batching and sampling -------------------------------------------------------------------

def test_collate_pads_right_and_masks_padding():
    rows = [data.TokenizedRow(0, [1, 5, 6, 2], [IGNORE_INDEX, IGNORE_INDEX, 6, 2]), data.TokenizedRow(1, [1, 7], [IGNORE_INDEX, 2])]
    batch = data.collate(rows, pad_id=3)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 3, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2], [-100, 2, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("mb, ga, ws", [(4, 1, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)])
def test_sampler_same_rows_per_step_for_every_batch_layout(mb, ga, ws):
    reference = data.StepSampler(50, 4, 1, 1, seed=3)
    sampler = data.StepSampler(50, mb, ga, ws, seed=3)
    assert sampler.steps_per_epoch == 12
    for step in range(30):  # crosses epoch boundaries
        rows = [i for rank in range(ws) for micro in sampler.step(step, rank) for i in micro]
        assert len(rows) == 4 and sorted(rows) == sorted(reference.step(step, 0)[0])
        assert all(len(micro) == mb for rank in range(ws) for micro in sampler.step(step, rank))


def test_sampler_epochs_differ_and_cover_rows():
    sampler = data.StepSampler(8, 2, 1, 1, seed=0)
    epoch0 = [i for s in range(4) for i in sampler.step(s, 0)[0]]
    epoch1 = [i for s in range(4, 8) for i in sampler.step(s, 0)[0]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(8)) and epoch0 != epoch1


def test_too_few_rows_for_one_global_batch():
    with pytest.raises(HarnessError, match="3 usable rows, fewer than one global batch of 8"):
        data.StepSampler(3, 2, 2, 2, seed=0)


def test_eval_batches_are_equal_in_number_on_every_rank():
    shards = [data.eval_batches(7, 2, rank, 3) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1
    real = sorted(i for s in shards for b in s for i in b if i is not None)
    assert real == list(range(7))
