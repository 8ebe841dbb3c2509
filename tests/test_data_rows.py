"""Reading rows: types as the file gives them, UTF-8 errors named by line, rows that could never
fit seq_len cut by characters before tokenization."""

import json

import pytest

from conftest import write_jsonl
from harness import data
from harness.config import TrainConfig
from harness.errors import HarnessError
from harness.tasks import instruction


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_non_utf8_bytes_are_named_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"instruction": f"i{n}", "output": "o"}).encode() for n in range(20)]
    lines[7] = b'{"instruction": "bad \xff byte", "output": "o"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(HarnessError, match=rf"--data {path}: line 8 is not valid UTF-8 \(byte 0xff at byte 22 of the line\)"):
        data.read_rows(str(path))


@pytest.mark.parametrize("block", [1, 5, 1 << 20])
def test_the_utf8_check_finds_the_line_whatever_the_block_size(block, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "UTF8_BLOCK", block)
    path = tmp_path / "d.csv"
    path.write_bytes("a,b\né,ü\n".encode() + b"x,\xe2\x82\n")  # a character cut short on line 3
    with pytest.raises(HarnessError, match="line 3 is not valid UTF-8"):
        data.check_utf8(path, "--data")


def test_a_number_among_texts_names_only_its_row(tmp_path):
    # "51" is valid text; 51 is not. datasets stores the mixed field as JSON text and would read
    # every "51" back as a number, calling all 40 rows bad.
    rows = [{"instruction": "Add 50 and 1.", "output": 51 if i == 0 else "51"} for i in range(40)]
    rows[5]["output"] = ["a", "list"]
    loaded = data.read_rows(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [loaded[i]["output"] for i in range(6)] == [51, "51", "51", "51", "51", ["a", "list"]]
    with pytest.raises(HarnessError, match=r"bad rows in the data:\n  rows 0, 5: field"):
        instruction.examples(loaded, TrainConfig())


def test_csv_values_are_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\n" + "".join(f"Add {i} and 1.,{i + 1}\n" for i in range(10)))
    loaded = data.read_rows(str(path))
    assert loaded[3]["output"] == "4"
    assert [e.target for e in instruction.examples(loaded, TrainConfig())][:2] == ["1", "2"]


# -- rows far longer than seq_len ------------------------------------------------------------

def test_the_char_limit_covers_seq_len_tokens_of_the_longest_vocabulary_entry(tokenizer):
    longest = max(len(t) for t in tokenizer.get_vocab())
    assert data.char_limit(tokenizer, 64) == 2 * 64 * longest


def test_a_row_that_could_never_fit_is_cut_before_tokenization_and_counted(tokenizer, monkeypatch):
    seq_len = 32
    limit = data.char_limit(tokenizer, seq_len)
    seen = []
    original = type(tokenizer).__call__

    def spy(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    huge = "word " * (20 * limit)
    batch = {"prompt": ["Say hi.", "Summarize: " + huge + "\n### Response:\n"], "target": ["hi", huge]}
    out = data.tokenize_batch(batch, tokenizer, seq_len)
    assert max(seen) <= limit  # the tokenizer never saw the 100-times-too-long text
    assert out["chars_cut"] == [False, True]
    rows, stats = data.rows_from_dataset(
        data.tokenize_dataset(data.examples_dataset([data.Example(0, "p " * 10, "t"),
                                                     data.Example(1, batch["prompt"][1], huge)]), tokenizer, seq_len),
        tokenizer.eos_token_id)
    assert stats.cut_by_chars == 1 and len(rows[1].input_ids) == seq_len


def test_the_cut_changes_no_token_that_truncation_keeps(tokenizer):
    seq_len = 24
    limit = data.char_limit(tokenizer, seq_len)
    import random

    rng = random.Random(0)
    words = ["alpha", "river", "stone", "seven", "quick", "instruction", "appropriately", "x", "yz"]
    for _ in range(5):
        prompt = "### Instruction:\n" + " ".join(rng.choice(words) for _ in range(limit)) + "\n### Response:\n"
        target = " ".join(rng.choice(words) for _ in range(limit))
        assert len(prompt) > limit and len(target) > limit
        cut = data.tokenize_batch({"prompt": [prompt], "target": [target]}, tokenizer, seq_len)
        whole = data.tokenize_batch({"prompt": [prompt], "target": [target]}, tokenizer, seq_len, max_chars=10**9)
        assert cut["input_ids"] == whole["input_ids"] and cut["labels"] == whole["labels"]
