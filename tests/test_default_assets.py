"""Tests for the embedded default model, tokenizer and bundled sample data."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from harness import default_assets as da

TEMPLATE_TEXTS = [
    da.PROMPT_NO_INPUT.format(instruction="Sort these numbers.") + "3 7 12",
    da.PROMPT_WITH_INPUT.format(instruction="Add the two numbers.", input="19 6") + "25",
    "### Response:\n\nline one\nline two\n",
    "  leading spaces, double  spaces and a trailing newline\n",
    "digits 0123456789 and punctuation: a . b , c ' d ?",
    "unseen characters fall back to bytes: caf\u00e9 \u20ac \u4f60\u597d\ttab",
]


@pytest.fixture(scope="module")
def cached_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One real build of the default model in a private cache, shared by the tests below."""
    cache = tmp_path_factory.mktemp("harness-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_CACHE", str(cache))
        yield da.default_model_dir()


@pytest.fixture(scope="module")
def tokenizer(cached_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(cached_model_dir)


@pytest.fixture(scope="module")
def sp(cached_model_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(cached_model_dir / da.SPM_MODEL_FILE))


# --- data ------------------------------------------------------------------------------------


def test_generation_is_deterministic_per_seed() -> None:
    assert da.generate_sample_instructions(50, seed=7) == da.generate_sample_instructions(50, seed=7)
    assert da.generate_sample_instructions(50, seed=7) != da.generate_sample_instructions(50, seed=8)


def test_generation_does_not_touch_global_random_state() -> None:
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    da.generate_sample_instructions(20, seed=0)
    assert random.random() == expected


def test_generated_rows_have_alpaca_schema_and_varied_lengths() -> None:
    rows = da.generate_sample_instructions(400, seed=3)
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(value, str) for value in row.values())
        assert row["instruction"]
        assert 1 <= len(row["output"].split()) <= 20
    assert any(row["input"] == "" for row in rows) and any(row["input"] for row in rows)
    assert len({len(row["output"].split()) for row in rows}) >= 5
    assert len({len(da.render_prompt(row)) for row in rows}) >= 20
    assert len({row["instruction"].split()[0] for row in rows}) >= 6


def test_generated_answers_are_correct() -> None:
    rows = da.generate_sample_instructions(400, seed=4)
    checked = 0
    for row in rows:
        if match := re.fullmatch(r"What is (\d+) plus (\d+)\?", row["instruction"]):
            assert int(row["output"]) == int(match[1]) + int(match[2])
        elif row["instruction"].startswith(("Sort these", "Put the numbers")):
            assert row["output"].split() == [str(n) for n in sorted(map(int, row["input"].split()))]
        elif row["instruction"].startswith(("Reverse the order", "Write the words in reverse")):
            assert row["output"].split() == row["input"].split()[::-1]
        elif row["instruction"] == "Pick the larger number.":
            assert int(row["output"]) == max(map(int, row["input"].split()))
        else:
            continue
        checked += 1
    assert checked > 100


def test_bundled_files_match_generator() -> None:
    for path, rows, seed in (
        (da.default_data_path(), da.TRAIN_ROWS, da.TRAIN_SEED),
        (da.default_eval_data_path(), da.EVAL_ROWS, da.EVAL_SEED),
    ):
        assert path.is_file() and path.stat().st_size < 200_000
        expected = da.rows_to_jsonl(da.generate_sample_instructions(rows, seed))
        regenerate = "regenerate with: python -m harness.default_assets"
        assert path.read_text(encoding="utf-8") == expected, regenerate
        assert len([json.loads(line) for line in expected.splitlines()]) == rows
    assert da.TRAIN_SEED != da.EVAL_SEED


def test_write_sample_files_reproduces_bundled_bytes(tmp_path: Path) -> None:
    da.write_sample_files(tmp_path)
    assert (tmp_path / da.TRAIN_FILE).read_bytes() == da.default_data_path().read_bytes()
    assert (tmp_path / da.EVAL_FILE).read_bytes() == da.default_eval_data_path().read_bytes()


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_special_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    specials = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert specials == (0, 1, 2, 3)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == da.VOCAB_SIZE


def test_tokenizer_ids_match_sentencepiece_and_round_trip(
    tokenizer: PreTrainedTokenizerBase, sp: spm.SentencePieceProcessor
) -> None:
    rows = da.generate_sample_instructions(300, seed=11)
    texts = da.tokenizer_training_texts(rows) + TEMPLATE_TEXTS
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == text
        assert sp.decode(ids) == text
        assert tokenizer.unk_token_id not in ids  # byte fallback covers everything


def test_newlines_are_single_tokens_and_prompts_are_prefixes(tokenizer: PreTrainedTokenizerBase) -> None:
    newline = tokenizer("\n")["input_ids"]
    assert len(newline) == 1 and tokenizer("\n\n")["input_ids"] == newline * 2
    for row in da.generate_sample_instructions(100, seed=12):
        prompt = tokenizer(da.render_prompt(row))["input_ids"]
        response = tokenizer(row["output"])["input_ids"]
        assert tokenizer(da.render_prompt(row) + row["output"])["input_ids"] == prompt + response


def test_train_tokenizer_is_deterministic(tmp_path: Path) -> None:
    texts = da.tokenizer_training_texts(da.generate_sample_instructions(200, seed=5))
    da.train_tokenizer(texts, tmp_path / "a", vocab_size=400)
    da.train_tokenizer(texts, tmp_path / "b", vocab_size=400)
    for name in (da.SPM_MODEL_FILE, "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "a")) == 400


# --- model -----------------------------------------------------------------------------------


def test_model_folder_loads_and_runs(cached_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(cached_model_dir)
    config = model.config
    assert config.model_type == "llama"
    for key, value in da.MODEL_SHAPE.items():
        assert getattr(config, key) == value
    assert config.vocab_size == len(tokenizer)
    assert not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert (cached_model_dir / "model.safetensors").is_file()

    ids = [tokenizer.bos_token_id] + tokenizer(TEMPLATE_TEXTS[0])["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    assert torch.isfinite(logits).all()


# --- cache -----------------------------------------------------------------------------------


def test_default_model_dir_builds_once(cached_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(cached_model_dir.parent))
    before = cached_model_dir.stat()
    weights_before = (cached_model_dir / "model.safetensors").stat()

    def fail_build(out_dir: Path) -> None:
        raise AssertionError("a cached model must not be rebuilt")

    monkeypatch.setattr(da, "_build_default_model", fail_build)
    again = da.default_model_dir()

    assert again == cached_model_dir
    assert again.stat().st_ino == before.st_ino and again.stat().st_mtime_ns == before.st_mtime_ns
    assert (again / "model.safetensors").stat().st_mtime_ns == weights_before.st_mtime_ns
    # Only the published folder remains: the temporary build folder was renamed, not copied.
    assert [p.name for p in cached_model_dir.parent.iterdir()] == [cached_model_dir.name]
    assert cached_model_dir.name == f"default-model-{da._cache_key()}"


def test_partial_builds_from_crashes_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    prefix = f"default-model-{da._cache_key()}.tmp-"
    recent = tmp_path / (prefix + "recent")  # could be another rank still building: keep it
    ancient = tmp_path / (prefix + "ancient")  # left by a crash long ago: clean it up
    for partial in (recent, ancient):
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"truncated")
    old = time.time() - 2 * da.STALE_BUILD_SECONDS
    os.utime(ancient, (old, old))

    model_dir = da.default_model_dir()

    assert model_dir == tmp_path / f"default-model-{da._cache_key()}"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(model_dir))
    assert recent.is_dir() and not ancient.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model_dir.name, recent.name])


def test_losing_the_publish_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    final = tmp_path / f"default-model-{da._cache_key()}"

    def build_while_another_rank_wins(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        final.mkdir()
        (final / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(da, "_build_default_model", build_while_another_rank_wins)
    assert da.default_model_dir() == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
