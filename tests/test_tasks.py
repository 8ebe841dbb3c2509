"""Tasks and their metrics: hand-worked metric values, label scoring against a plain forward,
learning a generated classification task, generation on 2 ZeRO-3 ranks = 1 process, LoRA,
best/ and early stopping, and every bad input of the tasks."""

import json

import pytest
import torch

from conftest import as_argv, launch_ok, read_metrics, write_jsonl
from harness import checkpoint, data, default_assets, evaluation
from harness.config import EvalConfig, TrainConfig, flag_docs
from harness.dist import DistInfo
from harness.errors import HarnessError
from harness.tasks import classification, qa, summarization
from harness.tasks.common import Example
from harness.preflight import preflight
from harness.train import run

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
LABELS = "negative,positive"


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task_data")
    return {
        "sent_train": write_jsonl(folder / "sent_train.jsonl", default_assets.generate_sentiment_rows(400, 0)),
        "sent_eval": write_jsonl(folder / "sent_eval.jsonl", default_assets.generate_sentiment_rows(100, 1)),
        "qa": write_jsonl(folder / "qa.jsonl", default_assets.generate_qa_rows(40, 2)),
    }


# --- metric units on hand-worked cases ----------------------------------------------------------


def test_squad_normalization_em_and_f1():
    assert qa.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert qa.normalize_answer("an apple a day; theatre") == "apple day theatre"  # whole words only
    assert qa.exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert qa.f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)  # P 1, R 1/2
    golds = ("Broncos", "Denver Broncos team")
    examples = [Example(0, "", "", golds), Example(1, "", "", ("red",))]
    # Row 0: F1 vs "Broncos" = 2/3 (P 1/2, R 1), vs "denver broncos team" = 0.8 (P 1, R 2/3): max 0.8.
    metrics, _ = qa.compute_metrics(["denver broncos", "A red."], examples, None)
    assert metrics == pytest.approx({"exact_match": 0.5, "f1": (0.8 + 1.0) / 2})


def test_rouge_on_a_known_pair():
    # Unigrams: 5 of 6 shared; bigrams: "the cat", "on the", "the mat" = 3 of 5; LCS "the cat on the mat" = 5.
    metrics, _ = summarization.compute_metrics(["The cat lay on the mat."], [Example(0, "", "", ("the cat sat on the mat",))], None)
    assert metrics == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6, "rougeLsum": 5 / 6})


def test_rouge_lsum_splits_sentences_where_rouge_l_does_not():
    ref, pred = "a b c. d e f.", "d e f. a b c."
    metrics, _ = summarization.compute_metrics([pred], [Example(0, "", "", (ref,))], None)
    assert metrics["rougeLsum"] == pytest.approx(1.0) and metrics["rougeL"] == pytest.approx(0.5)


def test_classification_metrics_and_confusion_matrix():
    cfg = TrainConfig(task="classification", labels="a,b,c")
    golds, preds = list("aaabbc"), list("abab" "cc")
    metrics, details = classification.compute_metrics(preds, [Example(i, "", g, (g,)) for i, g in enumerate(golds)], cfg)
    assert details["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert [metrics[f"precision/{c}"] for c in "abc"] == pytest.approx([1, 1 / 2, 1 / 2])
    assert [metrics[f"recall/{c}"] for c in "abc"] == pytest.approx([2 / 3, 1 / 2, 1])
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


@pytest.mark.parametrize("value", ["negative,positive", "('negative', 'positive')", "{0: 'negative', 1: 'positive'}",
                                   "{'0': 'negative', '1': 'positive'}"])
def test_label_spellings(value):
    words, lookup = classification.parse_labels(value)
    assert words == ["negative", "positive"]
    for raw, index in ((0, 0), ("1", 1), (1.0, 1), ("positive", 1), ("negative", 0)):
        assert classification.label_index(raw, lookup) == index
    assert classification.label_index("neutral", lookup) is None


def test_eval_split_is_seeded_and_disjoint():
    examples = [Example(i, str(i), "t") for i in range(50)]
    train, held = evaluation.split(examples, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40 and {e.row for e in train}.isdisjoint(e.row for e in held)
    assert evaluation.split(examples, 0.2, seed=3) == (train, held) and evaluation.split(examples, 0.2, seed=4) != (train, held)


def test_squad_json_layout_is_flattened(tmp_path):
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "Paris is in France.", "qas": [
            {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12},
                                                                     {"text": "in France", "answer_start": 9}]},
            {"id": "q2", "question": "What is in France?", "answers": [{"text": "Paris", "answer_start": 0}]}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    examples = qa.examples(data.read_rows(str(path)), TrainConfig(task="qa"))
    assert [(e.target, e.golds) for e in examples] == [("France", ("France", "in France")), ("Paris", ("Paris",))]
    assert "Paris is in France." in examples[0].prompt and examples[0].prompt.endswith("### Answer:\n")


# --- bad input, all in preflight before any weights load ----------------------------------------


@pytest.fixture
def cls_flags(tiny_model, task_data, tmp_path):
    return dict(model=str(tiny_model), task="classification", labels=LABELS, data=str(task_data["sent_train"]),
                eval_data=str(task_data["sent_eval"]), output_dir=str(tmp_path / "run"), micro_batch_size=4)


def check(message, **flags):
    with pytest.raises(HarnessError, match=message):
        preflight(TrainConfig(**flags), CPU1)


def test_unknown_label_names_rows(cls_flags, tmp_path):
    rows = default_assets.generate_sentiment_rows(10, 0)
    rows[3]["label"], rows[7]["label"] = "neutral", 5
    check(r"rows 3, 7: label not in --labels \['negative', 'positive'\] \(found 'neutral', 5\)",
          **{**cls_flags, "eval_data": str(write_jsonl(tmp_path / "bad.jsonl", rows))})


def test_fewer_than_two_labels(cls_flags):
    check("names 1 non-empty label.*at least 2", **{**cls_flags, "labels": "positive"})
    check("classification needs at least 2", **{**cls_flags, "labels": ""})


def test_label_word_that_tokenizes_to_nothing():
    class DropsEverything:  # a tokenizer whose vocabulary lacks every character of the word
        eos_token_id = 2

        def __call__(self, words, add_special_tokens):
            return {"input_ids": [[] if w == "???" else [5] for w in words]}

    with pytest.raises(HarnessError, match=r"label word\(s\) \['\?\?\?'\] tokenize to no tokens"):
        classification.label_token_ids(TrainConfig(labels="yes,???"), DropsEverything())


def test_qa_rows_without_answers_and_summaries_of_empty_documents(tiny_model, tmp_path):
    rows = default_assets.generate_qa_rows(8, 0)
    rows[2]["answers"], rows[5]["answers"] = [], [{"text": " "}]
    base = dict(model=str(tiny_model), output_dir=str(tmp_path / "run"), micro_batch_size=2)
    good = write_jsonl(tmp_path / "qa_good.jsonl", default_assets.generate_qa_rows(8, 1))
    check("rows 2, 5: no gold answer in 'answers'", **base, task="qa", data=str(good),
          eval_data=str(write_jsonl(tmp_path / "qa.jsonl", rows)))
    docs = [{"dialogue": "A: hi\nB: hello", "summary": "They greet."}] * 4 + [{"dialogue": "  ", "summary": "x"}]
    check("row 4: document field 'dialogue' is missing, empty", **base, task="summarization", document_field="dialogue",
          data=str(write_jsonl(tmp_path / "sum.jsonl", docs)))


def test_metric_for_best_the_task_does_not_produce(cls_flags):
    check("--metric_for_best 'rougeL': task classification produces loss, ppl, accuracy, macro_f1",
          **{**cls_flags, "metric_for_best": "rougeL"})
    check("need evaluation data", **{**cls_flags, "eval_data": "", "metric_for_best": "accuracy"})
    setup = preflight(TrainConfig(**{**cls_flags, "metric_for_best": "eval/loss"}), CPU1)
    assert (setup.metric_for_best, setup.greater_is_better) == ("eval/loss", False)


def test_lora_targets_must_exist(cls_flags):
    check("--lora_targets 'q_proj,qkv': no Linear module named \\['qkv'\\]",
          **{**cls_flags, "lora": True, "lora_targets": "q_proj,qkv"})


# --- label scoring equals a plain forward -------------------------------------------------------


def test_label_scoring_equals_independent_log_likelihood(tiny_model, task_data):
    from transformers import AutoModelForCausalLM

    cfg = EvalConfig(model=str(tiny_model), data=str(task_data["sent_eval"]), task="classification", labels=LABELS,
                     text_field="text", eval_batch_size=3, max_eval_samples=7, output_dir="unused")
    from harness import engine as engine_mod

    info = engine_mod.init_distributed()
    setup = evaluation.preflight(cfg, info)
    engine = evaluation.build_engine(setup)  # ZeRO-3 inference engine
    assert engine.zero_stage == 3
    es = setup.eval_set
    scores = evaluation.label_scores(engine.sequence_log_likelihood, es.prompts, es.label_ids, es.pad_id)

    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    expected = torch.zeros(len(es.prompts), len(es.label_ids))
    with torch.no_grad():
        for i, prompt in enumerate(es.prompts):
            for k, label in enumerate(es.label_ids):
                logprobs = torch.log_softmax(plain(torch.tensor([prompt + label])).logits[0].float(), dim=-1)
                expected[i, k] = sum(logprobs[len(prompt) - 1 + t, tok] for t, tok in enumerate(label))
    assert scores.shape == (7, 2)
    assert torch.allclose(scores, expected, atol=1e-4), (scores, expected)


# --- learning, best/, files ---------------------------------------------------------------------


@pytest.mark.slow
def test_classification_learns_from_chance_to_90_percent(tiny_model, task_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(TrainConfig(model=str(tiny_model), task="classification", labels=LABELS, data=str(task_data["sent_train"]),
                    eval_data=str(task_data["sent_eval"]), output_dir=str(out), max_steps=300, eval_steps=150, lr=3e-3,
                    micro_batch_size=16, lr_schedule="constant", warmup_steps=5, dtype="fp32", eval_batch_size=16))
    evals = [m for m in read_metrics(out) if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 150, 300]
    assert evals[0]["eval/accuracy"] <= 0.6, evals[0]  # balanced labels: ignoring the text scores 0.5
    assert evals[-1]["eval/accuracy"] >= 0.9, evals[-1]
    step = json.loads((out / "eval" / "step-300.json").read_text())
    assert step["metrics"]["accuracy"] == evals[-1]["eval/accuracy"]
    assert sum(map(sum, step["confusion_matrix"])) == 100
    assert sum(step["confusion_matrix"][i][i] for i in range(2)) == round(100 * step["metrics"]["accuracy"])
    predictions = [json.loads(line) for line in (out / "eval" / "step-300.predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 100
    assert sum(p["prediction"] == p["golds"][0] for p in predictions) / 100 == step["metrics"]["accuracy"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("eval/accuracy")] == pytest.approx([m["eval/accuracy"] for m in evals])
    # best/ is the better of steps 150 and 300 (step 0 is the baseline, not a candidate).
    best_step = max((m for m in evals[1:]), key=lambda m: (m["eval/accuracy"], -m["step"]))["step"]
    best = evaluation.run(EvalConfig(model=str(out / "best"), data=str(task_data["sent_eval"]), task="classification",
                                     labels=LABELS, output_dir=str(tmp_path / "best_eval"), ds_config="zero2"))
    assert best.metrics["eval/accuracy"] == pytest.approx(next(m for m in evals if m["step"] == best_step)["eval/accuracy"])
    assert not any(p.name.endswith((".tmp", ".old")) for p in out.iterdir())


def test_early_stopping_keeps_last_and_best(tiny_model, task_data, tmp_path):
    # At a learning rate of 1e-9 accuracy cannot change, so the second evaluation is not better.
    out = tmp_path / "run"
    result = run(TrainConfig(model=str(tiny_model), task="classification", labels=LABELS, data=str(task_data["sent_train"]),
                             eval_data=str(task_data["sent_eval"]), output_dir=str(out), max_steps=20, eval_steps=1,
                             lr=1e-9, micro_batch_size=4, early_stopping_patience=1, max_eval_samples=8, save_steps=10))
    assert len(result.losses) == 2
    assert [m["step"] for m in read_metrics(out) if "eval/accuracy" in m] == [0, 1, 2]
    assert (out / "final" / "model.safetensors").is_file() and (out / "best" / "model.safetensors").is_file()
    assert result.best.best_step == 1
    # --save_steps saves at the end of a run, and an early stop is where this one ended.
    saved = checkpoint.newest_verified(out / "checkpoints")
    assert saved is not None and saved.name == "step-2"
    assert json.loads((saved / checkpoint.STATE).read_text())["best"] == {
        "metric": "eval/accuracy", "value": result.best.best, "step": 1, "evals_without_gain": 1}


# --- generation: batched, left-padded, and 2 ZeRO-3 ranks = 1 process ---------------------------


@pytest.mark.slow
def test_generation_two_zero3_ranks_equal_one_process(tiny_model, task_data, tmp_path):
    flags = dict(model=str(tiny_model), data=str(task_data["qa"]), task="qa", max_new_tokens=6, ds_config="zero3",
                 eval_batch_size=4, dtype="fp32")
    one = evaluation.run(EvalConfig(**flags, output_dir=str(tmp_path / "one")))
    unbatched = evaluation.run(EvalConfig(**{**flags, "eval_batch_size": 1}, output_dir=str(tmp_path / "unbatched")))
    launch_ok("torchrun", 2, as_argv({**flags, "output_dir": tmp_path / "two"}), script_name="evaluate.py")

    texts = [p["prediction"] for p in one.predictions]
    assert len(texts) == 40 and len(set(texts)) > 5 and all(texts)  # real, varied generations
    assert [p["prediction"] for p in unbatched.predictions] == texts  # left padding changes nothing
    two = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in two] == texts
    written = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert written["world_size"] == 2 and written["zero_stage"] == 3
    assert written["metrics"]["f1"] == one.metrics["eval/f1"]
    assert written["metrics"]["exact_match"] == one.metrics["eval/exact_match"]
    assert written["metrics"]["loss"] == pytest.approx(one.metrics["eval/loss"], abs=1e-6)


# --- LoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all-linear"])
def test_lora_parameters_counted_before_loading_equal_peft(targets, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness import model

    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                             LoraConfig(r=4, target_modules=model.lora_targets(targets), task_type="CAUSAL_LM"))
    trainable, _ = wrapped.get_nb_trainable_parameters()
    assert model.lora_parameters(AutoConfig.from_pretrained(tiny_model), targets, 4, False) == trainable


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_lora_trains_only_adapters_and_merged_export_scores_the_same(ds_config, tiny_model, task_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import deepspeed

    out = tmp_path / "run"
    result = run(TrainConfig(model=str(tiny_model), task="classification", labels=LABELS, data=str(task_data["sent_train"]),
                             output_dir=str(out), max_steps=8, lr=1e-2, micro_batch_size=8, ds_config=ds_config,
                             dtype="fp32", lora=True, lora_r=4, lora_targets="q_proj,v_proj", merge_lora=True))
    module = result.engine.module
    assert all("lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=ds_config == "zero3"):
        trained = {n: p.detach().clone() for n, p in module.named_parameters()}
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_weights = base.state_dict()
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer", ""): v for n, v in trained.items() if "lora_" not in n}
    assert frozen.keys() == base_weights.keys()
    for name, value in frozen.items():  # after 8 steps at lr 1e-2 the base is bit-for-bit the original
        assert torch.equal(value, base_weights[name]), name
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # lora_B starts at zero: it trained
    assert not (out / "final" / "model.safetensors").exists()

    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged").eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 13]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)

    flags = dict(data=str(task_data["sent_eval"]), task="classification", labels=LABELS, ds_config="zero2",
                 max_eval_samples=16)
    via_adapter = evaluation.run(EvalConfig(model=str(out / "final"), output_dir=str(tmp_path / "a"), **flags))
    via_merged = evaluation.run(EvalConfig(model=str(out / "final" / "merged"), output_dir=str(tmp_path / "m"), **flags))
    assert via_adapter.metrics["eval/accuracy"] == via_merged.metrics["eval/accuracy"]
    for a, m in zip(via_adapter.predictions, via_merged.predictions):
        assert a["label_log_likelihoods"] == pytest.approx(m["label_log_likelihoods"], abs=1e-4)



def test_evaluate_cli_lists_its_flags_and_refuses_training_ones(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    script = str(ROOT / "launch" / "evaluate.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    text = " ".join((shown.stdout + shown.stderr).split())
    assert shown.returncode == 0 and all(f"--{name}=" in text for name in flag_docs(EvalConfig))
    refused = subprocess.run([sys.executable, script, "--lora", "--model", "m", "--data", "d"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "unknown flag --lora" in refused.stderr
