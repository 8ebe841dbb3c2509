"""Tokenization cache, preflight data report, mixing, length grouping, prepare_data."""

import json
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, write_jsonl
from harness import data, data_cache, default_assets, tasks
from harness.batches import StepBatches
from harness.config import PrepareConfig, TrainConfig
from harness.dist import DistInfo
from harness.errors import HarnessError
from harness.preflight import preflight
from harness.prepare import prepare

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"} for w in
        ("red", "blue", "green", "one", "two", "three", "cat", "dog")]


# -- cache -----------------------------------------------------------------------------------

@pytest.fixture
def cache_env(tmp_path, tiny_model, monkeypatch):
    """A private cache, a copy of the model (its tokenizer files get edited) and a counter of
    tokenize_batch calls, so 'no tokenization' is observed, not assumed."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    calls = []
    real = data.tokenize_batch
    monkeypatch.setattr(data, "tokenize_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)

    def load(cfg_overrides=None, template="", seq_len=64, data_path=path, local_rank=0, count=True):
        from transformers import AutoTokenizer

        cfg = TrainConfig(data_cache=str(tmp_path / "cache"), **(cfg_overrides or {}))
        tokenizer = AutoTokenizer.from_pretrained(model)
        calls.clear()
        ds, hit = data_cache.tokenized(str(data_path), str(model), cfg, tasks.get(cfg.task), template, tokenizer,
                                       seq_len, 1, local_rank, "nonce")
        if count:  # (two threads share the counter in the waiting test)
            assert hit == (not calls)  # a hit never tokenizes, a miss does
        return ds, hit

    return load, path, model


def test_cache_hit_on_identical_inputs(cache_env):
    load, _, _ = cache_env
    first, hit = load()
    assert not hit
    second, hit = load()
    assert hit and second["input_ids"] == first["input_ids"] and second["labels"] == first["labels"]


@pytest.mark.parametrize("change", ["data", "tokenizer", "template", "task", "masking", "seq_len", "version"])
def test_cache_miss_when_a_key_input_changes(cache_env, change, monkeypatch):
    load, path, model = cache_env
    load()
    kwargs = {}
    if change == "data":
        write_jsonl(path, ROWS[:-1] + [{"instruction": "Say no.", "input": "", "output": "no"}])
    elif change == "tokenizer":
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["model_max_length"] = 12345  # tokens unchanged, but the key must not guess that
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    elif change == "template":
        kwargs["template"] = "Q: {instruction}\nA: "
    elif change == "task":
        kwargs["cfg_overrides"] = {"input_field": "context"}
    elif change == "masking":
        monkeypatch.setattr(data, "MASKING_POLICY", data.MASKING_POLICY + "-changed")
    elif change == "seq_len":
        kwargs["seq_len"] = 32
    elif change == "version":
        monkeypatch.setattr(data_cache, "__version__", "9.9.9")
    _, hit = load(**kwargs)
    assert not hit
    _, hit = load(**kwargs)
    assert hit


def test_other_local_ranks_wait_for_rank0_without_a_collective(cache_env):
    load, path, _ = cache_env
    results = {}
    waiter = threading.Thread(target=lambda: results.update(rank1=load(local_rank=1, count=False)))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive()  # rank 1 does not tokenize: it waits for the entry
    ds, hit = load(local_rank=0, count=False)
    waiter.join(timeout=30)
    assert not hit and results["rank1"][1] and results["rank1"][0]["input_ids"] == ds["input_ids"]


def test_waiting_ranks_get_rank0_error(cache_env, tmp_path):
    load, _, _ = cache_env
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}])
    with pytest.raises(HarnessError, match="row 0: field 'output' is empty"):
        load(data_path=bad)
    with pytest.raises(HarnessError, match="row 0: field 'output' is empty"):
        load(data_path=bad, local_rank=1)  # finds the error file of this job's nonce


def test_data_is_hashed_once_per_node(cache_env, monkeypatch):
    """The cache key costs O(file size) on local rank 0 only; the other ranks read its result."""
    load, path, _ = cache_env
    hashed, real = [], data_cache.file_digest
    monkeypatch.setattr(data_cache, "file_digest", lambda p: hashed.append(p) or real(p))
    results = {}
    waiter = threading.Thread(target=lambda: results.update(rank1=load(local_rank=1, count=False)))
    waiter.start()
    ds, hit = load(local_rank=0, count=False)
    waiter.join(timeout=30)
    assert hashed == [path] and results["rank1"][0]["input_ids"] == ds["input_ids"]
    hashed.clear()
    load(local_rank=0, count=False)  # a cache hit still hashes the file (its content is the key), once
    assert hashed == [path]


def test_prepared_folder_is_trusted_by_its_key(cache_env, tmp_path, monkeypatch):
    load, path, model = cache_env
    out = tmp_path / "prepared"
    prepare(PrepareConfig(data=str(path), output=str(out), model=str(model), seq_len=64))
    hashed = []
    monkeypatch.setattr(data_cache, "file_digest", lambda p: hashed.append(p) or "")
    ds, hit = load(data_path=out)
    assert hit and not hashed and len(ds) == len(ROWS)  # neither the folder nor the data is hashed


# -- preflight report ------------------------------------------------------------------------

def test_preflight_report_counts_on_a_crafted_file(tiny_model, tmp_path):
    rows = [dict(r) for r in ROWS * 2]
    rows[1]["instruction"] = "word " * 300  # prompt cut in its middle
    rows[2]["output"] = "word " * 300  # target cut at its end: loses EOS
    rows[3]["output"] = "word " * 300
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    setup = preflight(TrainConfig(model=str(tiny_model), data=str(path), output_dir=str(out), seq_len=64,
                                  micro_batch_size=2, packing=False, data_cache=str(tmp_path / "c")), CPU1)
    report = setup.report
    [src] = report["sources"]
    assert src["rows_read"] == src["rows_kept"] == 16 and not src["tokenization_cache_hit"]
    # The long-target rows' prompts (37 tokens) also give way down to seq_len / 2 first.
    assert src["rows_truncated"] == {"prompt": 3, "target_lost_eos": 2, "cut_by_chars_before_tokenization": 0}
    assert src["targets_ending_with_trained_eos"] == 14
    assert src["prompt_tokens"]["max"] > 300 and src["target_tokens"]["max"] > 300
    assert src["target_tokens"]["p50"] < 10
    assert report["special_tokens"]["pad_is_eos"] is False and report["special_tokens"]["eos_trained"]
    steps = report["steps"]
    lengths = [len(r.input_ids) for r in setup.train_rows]
    assert steps["tokens_per_step"] == pytest.approx(sum(lengths) / 8)  # 16 rows, 8 steps of 2
    assert 0 < steps["efficiency"] < 1 and steps["layout"] == "padded"
    # Zero supervised tokens: reachable only through truncation to one token; listed by row.
    ds = data.tokenize_dataset(data.examples_dataset(tasks.get("instruction").examples(rows, TrainConfig())),
                               setup.tokenizer, seq_len=1)
    kept, stats = data.rows_from_dataset(ds, setup.tokenizer.eos_token_id)
    assert not kept and stats.zero_supervised == list(range(16))
    with pytest.raises(HarnessError, match=r"rows 0, 1, .* \(16 of 16\) have no supervised token"):
        data.check_supervised(stats)


def test_report_is_saved_and_pad_equal_eos_still_trains_eos(tiny_model, tmp_path):
    from harness.train import run

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["pad_token"] = config.get("eos_token", "</s>")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = run(TrainConfig(model=str(model), data=str(path), output_dir=str(tmp_path / "run"), max_steps=1,
                             micro_batch_size=2, data_cache=str(tmp_path / "c")))
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert report["special_tokens"]["pad_is_eos"] and report["special_tokens"]["eos_trained"]
    assert report["steps"]["layout"] == "packed" and 0 < report["steps"]["bin_fill_rate"] <= 1


# -- mixing ----------------------------------------------------------------------------------

def test_parse_data_spec():
    assert data.parse_data_spec("a.jsonl") == [("a.jsonl", None)]
    assert data.parse_data_spec("a.jsonl:0.7,b.jsonl:0.3") == [("a.jsonl", 0.7), ("b.jsonl", 0.3)]
    assert data.parse_data_spec("a.jsonl,b.jsonl") == [("a.jsonl", None), ("b.jsonl", None)]
    with pytest.raises(HarnessError, match="give every file a weight"):
        data.parse_data_spec("a.jsonl:0.7,b.jsonl")
    with pytest.raises(HarnessError, match="must be a positive number"):
        data.parse_data_spec("a.jsonl:0,b.jsonl:1")


def test_mixing_follows_weights_and_seed(tiny_model, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)  # 8 rows
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"Count to {i}.", "output": str(i)} for i in range(24)])

    def setup(seed):
        return preflight(TrainConfig(model=str(tiny_model), data=f"{a}:0.75,{b}:0.25", output_dir=str(tmp_path / "r"),
                                     seed=seed, micro_batch_size=2, data_cache=str(tmp_path / "c")), CPU1)

    p1, p2, p3 = setup(1), setup(1), setup(2)
    sources = [r.source for r in p1.train_rows]
    assert len(sources) == 32 and sources.count(0) == 24 and sources.count(1) == 8  # 0.75 / 0.25 of 32
    assert [s["rows_in_mix"] for s in p1.report["sources"]] == [24, 8]
    picked = [(r.source, r.row) for r in p1.train_rows]
    assert picked == [(r.source, r.row) for r in p2.train_rows]
    assert picked != [(r.source, r.row) for r in p3.train_rows]  # another seed samples other b rows
    assert sorted(r.row for r in p1.train_rows if r.source == 0) == sorted(list(range(8)) * 3)  # 3 whole copies


# -- length grouping -------------------------------------------------------------------------

def test_length_grouped_sampler_pads_less_and_keeps_every_row():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(256)]
    rows = [data.TokenizedRow(i, [1] * n, [1] * n) for i, n in enumerate(lengths)]

    def efficiency(group, seed=0):
        sampler = data.StepSampler(256, 4, 2, 2, seed, lengths=lengths, group_by_length=group)
        batches = StepBatches(rows, sampler, 0, packing=False, seq_len=512)
        totals = [batches.slots(s) for s in range(sampler.steps_per_epoch)]
        epoch = sorted(i for s in range(sampler.steps_per_epoch) for i in sampler.step_rows(s))
        return sum(r for r, _ in totals) / sum(t for _, t in totals), epoch, [sampler.step_rows(s) for s in range(8)]

    plain, epoch_plain, _ = efficiency(0)
    grouped, epoch_grouped, order = efficiency(8)
    assert epoch_plain == epoch_grouped == list(range(256))
    assert grouped > plain + 0.2, (plain, grouped)
    assert efficiency(8)[2] == order and efficiency(8, seed=1)[2] != order


# -- prepare_data ----------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_data_folder_is_accepted_by_train(tiny_model, parity_data, tmp_path):
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--data", str(parity_data),
                           "--output", str(out), "--model", str(tiny_model), "--seq_len", "256"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["rows_kept"] == 64
    flags = dict(model=str(tiny_model), output_dir=str(tmp_path / "r"), micro_batch_size=2, seq_len=256,
                 data_cache=str(tmp_path / "c"))
    from_folder = preflight(TrainConfig(data=str(out), **flags), CPU1)
    from_file = preflight(TrainConfig(data=str(parity_data), **flags), CPU1)
    assert from_folder.report["sources"][0]["tokenization_cache_hit"]
    assert [r.input_ids for r in from_folder.train_rows] == [r.input_ids for r in from_file.train_rows]
    with pytest.raises(HarnessError, match="prepared with other seq_len"):
        preflight(TrainConfig(data=str(out), **{**flags, "seq_len": 128}), CPU1)


TASK_ROWS = {  # each task's rows under field names that are not its defaults, and the flags naming them
    "instruction": ([{"task": f"Repeat {w}.", "extra": "", "response": f"{w} {w}"} for w in "abcdefgh"],
                    dict(instruction_field="task", input_field="extra", output_field="response")),
    "qa": ([{"passage": r["context"], "query": r["question"], "golds": r["answers"]}
            for r in default_assets.generate_qa_rows(8, 0)],
           dict(context_field="passage", question_field="query", answers_field="golds")),
    "summarization": ([{"article": f"the {w} sat on the mat all day.", "highlights": f"{w} sat."} for w in "abcdefgh"],
                      dict(document_field="article", summary_field="highlights")),
    "translation": ([{"pair": {"de": f"das {w}", "en": f"the {w}"}} for w in "abcdefgh"],
                    dict(source_field="pair.de", target_field="pair.en", source_lang="German", target_lang="English")),
    "ner": ([{"words": ["Ada", "went", "to", w], "bio": ["B-PER", "O", "O", "B-LOC"]} for w in "abcdefgh"],
            dict(tokens_field="words", tags_field="bio")),
    "chat": ([{"turns": [{"speaker": "user", "text": f"say {w}"}, {"speaker": "assistant", "text": w}]}
              for w in "abcdefgh"],
             dict(messages_field="turns", message_keys="speaker,text",
                  chat_template="{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}{% if m['role'] == "
                                "'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                                "{% if add_generation_prompt %}assistant:\n{% endif %}")),
}


@pytest.mark.parametrize("task", sorted(TASK_ROWS))
def test_prepare_data_takes_each_task_with_custom_fields(task, tiny_model, tmp_path):
    """prepare_data tokenizes as training does for every task, its field flags included."""
    rows, fields = TASK_ROWS[task]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    flags = dict(task=task, seq_len=128, **fields)
    out = tmp_path / "prepared"
    summary = prepare(PrepareConfig(data=str(path), output=str(out), model=str(tiny_model), micro_batch_size=2, **flags))
    assert summary["rows_kept"] == len(rows) and 0 < summary["bin_fill_rate"] <= 1
    recorded = json.loads(json.loads((out / data_cache.PREPARED_FILE).read_text())["key_inputs"]["task"])
    assert all(recorded[name] == value for name, value in fields.items())
    run = dict(model=str(tiny_model), output_dir=str(tmp_path / "r"), micro_batch_size=2, data_cache=str(tmp_path / "c"))
    from_folder = preflight(TrainConfig(data=str(out), **run, **flags), CPU1)
    from_file = preflight(TrainConfig(data=str(path), **run, **flags), CPU1)
    assert from_folder.report["sources"][0]["tokenization_cache_hit"]
    assert [r.input_ids for r in from_folder.train_rows] == [r.input_ids for r in from_file.train_rows]
    assert from_folder.fingerprints["data_fingerprint"] == from_file.fingerprints["data_fingerprint"]
    other = {name: value + "_x" for name, value in list(fields.items())[:1]}
    with pytest.raises(HarnessError, match="prepared with other task"):
        preflight(TrainConfig(data=str(out), **run, **{**flags, **other}), CPU1)


def test_prepare_data_takes_every_task_flag_of_training(tiny_model, tmp_path):
    rows = [{"sentence": r["text"], "polarity": r["label"]} for r in default_assets.generate_sentiment_rows(40, 0)]
    path = write_jsonl(tmp_path / "sent.jsonl", rows)
    task = dict(task="classification", labels="negative,positive", text_field="sentence", label_field="polarity",
                seq_len=128)
    out = tmp_path / "prepared"
    assert prepare(PrepareConfig(data=str(path), output=str(out), model=str(tiny_model), **task))["rows_kept"] == 40
    flags = dict(model=str(tiny_model), output_dir=str(tmp_path / "r"), micro_batch_size=2, data_cache=str(tmp_path / "c"))
    from_folder = preflight(TrainConfig(data=str(out), **flags, **task), CPU1)
    from_file = preflight(TrainConfig(data=str(path), **flags, **task), CPU1)
    assert from_folder.report["sources"][0]["tokenization_cache_hit"]
    assert [r.input_ids for r in from_folder.train_rows] == [r.input_ids for r in from_file.train_rows]
    with pytest.raises(HarnessError, match="prepared with other task"):
        preflight(TrainConfig(data=str(out), **flags, **{**task, "labels": "bad,good"}), CPU1)
