"""task=ner: conlleval chunking, the listing and its parser, entity-level metrics on hand-worked
cases, every row layout, bad input, learning a generated NER task, and 2 ZeRO-3 ranks = 1 process."""

import json
import random

import pytest
import torch

from conftest import as_argv, launch_ok, read_metrics, write_jsonl
from harness import data, evaluation
from harness.config import EvalConfig, TrainConfig
from harness.dist import DistInfo
from harness.errors import HarnessError
from harness.tasks import ner
from harness.tasks.common import Example
from harness.train import preflight, run

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TAGS = "O,B-PER,I-PER,B-LOC,I-LOC"


# --- chunking, listing, parsing ------------------------------------------------------------------


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),  # B- always starts a new entity
    (["O", "I-LOC", "I-LOC"], [("LOC", 1, 3)]),  # IOB1: I- after O starts one (conlleval)
    (["B-PER", "I-LOC", "O"], [("PER", 0, 1), ("LOC", 1, 2)]),  # I- of another type starts one
    (["B-ORG", "E-ORG", "S-PER", "I-PER", "E-PER"], [("ORG", 0, 2), ("PER", 2, 3), ("PER", 3, 5)]),  # BIOES
    (["O", "O"], []),
])
def test_bio_tags_chunk_as_conlleval_does(tags, expected):
    assert ner.chunks(tags) == expected


def test_listing_reads_back_and_bad_outputs_are_unparseable():
    entities = [("PER", "Ada Lovelace"), ("LOC", "London"), ("PER", "Ada Lovelace")]
    assert ner.listing(entities) == "PER: Ada Lovelace; LOC: London; PER: Ada Lovelace"
    assert ner.parse(ner.listing(entities)) == entities
    assert ner.listing([]) == "none" and ner.parse("none") == [] and ner.parse(" None ") == []
    assert ner.parse("PER:  Ada   Lovelace ;LOC:Rome") == [("PER", "Ada Lovelace"), ("LOC", "Rome")]  # spacing is not content
    for bad in ("", "Ada Lovelace", "PER Ada", "PER: ", "PER: Ada; ", ": Ada", "PER: Ada; LOC London"):
        assert ner.parse(bad) is None, bad


def test_entity_metrics_on_a_hand_worked_case():
    golds = ["PER: Ada Lovelace; LOC: Paris", "none", "LOC: Oslo; LOC: Oslo", "PER: Alan"]
    preds = ["PER: Ada Lovelace; LOC: Rome", "ORG: Acme", "Oslo is a city", "PER: Alan"]
    metrics, details = ner.compute_metrics(preds, [Example(i, "", g, (g,)) for i, g in enumerate(golds)], None)
    # Correct: Ada Lovelace, Alan (2). Predicted: 2 + 1 + 0 (unparseable) + 1 = 4. Gold: 2 + 0 + 2 + 1 = 5.
    assert metrics["precision"] == pytest.approx(2 / 4) and metrics["recall"] == pytest.approx(2 / 5)
    assert metrics["f1"] == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert metrics["unparseable"] == pytest.approx(1 / 4)
    assert [metrics[f"{m}/PER"] for m in ("precision", "recall", "f1")] == [1, 1, 1]
    assert [metrics[f"{m}/LOC"] for m in ("precision", "recall", "f1")] == [0, 0, 0]  # Rome for Paris; Oslo x2 missed
    assert [metrics[f"{m}/ORG"] for m in ("precision", "recall", "f1")] == [0, 0, 0]
    assert details["entity_counts"]["LOC"] == {"gold": 3, "predicted": 1, "correct": 0}
    # Exact text and type: a partial name or the wrong type scores nothing.
    partial, _ = ner.compute_metrics(["PER: Ada; LOC: Ada Lovelace"], [Example(0, "", "", ("PER: Ada Lovelace",))], None)
    assert partial["f1"] == 0 and partial["unparseable"] == 0


# --- row layouts ---------------------------------------------------------------------------------


def test_conll_rows_with_tag_names_or_ids_and_span_rows_give_the_same_target(tmp_path):
    tokens = ["Ada", "Lovelace", "visited", "New", "York", "."]
    names = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
    ids = [TAGS.split(",").index(t) for t in names]
    text = "Ada Lovelace visited New York ."
    expected = "PER: Ada Lovelace; LOC: New York"
    by_name = ner.examples([{"tokens": tokens, "ner_tags": names}], TrainConfig(task="ner"))
    by_id = ner.examples([{"tokens": tokens, "ner_tags": ids}], TrainConfig(task="ner", labels=TAGS))
    spans = ner.examples([{"text": text, "entities": [{"start": 21, "end": 29, "label": "LOC"}, [0, 12, "PER"]]}],
                         TrainConfig(task="ner"))
    assert [e.target for e in by_name + by_id + spans] == [expected] * 3
    assert by_name[0].prompt.endswith(f"### Text:\n{text}\n\n### Entities:\n")
    assert ner.examples([{"tokens": ["hello"], "ner_tags": ["O"]}], TrainConfig(task="ner"))[0].target == "none"


def test_saved_dataset_names_its_integer_tags(tmp_path):
    import datasets

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=TAGS.split(",")))})
    datasets.Dataset.from_dict({"tokens": [["Ada", "went", "to", "Rome"]], "ner_tags": [[1, 0, 0, 3]]},
                               features=features).save_to_disk(str(tmp_path / "conll"))
    (example,) = ner.examples(data.read_rows(str(tmp_path / "conll")), TrainConfig(task="ner"))
    assert example.target == "PER: Ada; LOC: Rome"


def test_bad_ner_rows_are_named(tmp_path):
    rows = [{"tokens": ["Ada"], "ner_tags": ["B-PER"]}, {"tokens": ["Ada", "x"], "ner_tags": ["B-PER"]},
            {"tokens": ["Ada"], "ner_tags": ["X-PER"]}, {"tokens": ["Ada"], "ner_tags": [7]},
            {"tokens": [], "ner_tags": []}, {"tokens": ["A", ";", "B"], "ner_tags": ["B-ORG", "I-ORG", "I-ORG"]}]
    with pytest.raises(HarnessError) as err:
        ner.examples(rows, TrainConfig(task="ner", labels=TAGS))
    message = str(err.value)
    assert "row 1: 'ner_tags' is missing or does not have one tag per word" in message
    assert "row 2: tags that are not O or B-/I-/E-/S-TYPE (found X-PER)" in message
    assert "row 3: a tag id outside --labels (0..4)" in message
    assert "row 4: 'tokens' is missing, empty" in message
    assert "row 5: an entity text contains ';'" in message and "row 0" not in message
    with pytest.raises(HarnessError, match="row 0: integer tags need --labels"):
        ner.examples([{"tokens": ["Ada"], "ner_tags": [1]}], TrainConfig(task="ner"))
    with pytest.raises(HarnessError, match=r"row 0: a span outside the text.*\(found 0, 40, 'PER'\)"):
        ner.examples([{"text": "Ada", "entities": [{"start": 0, "end": 40, "label": "PER"}]}], TrainConfig(task="ner"))
    with pytest.raises(HarnessError, match="data has neither 'tokens' \\+ 'ner_tags'.*--tokens_field"):
        ner.examples([{"words": ["Ada"], "tags": ["B-PER"]}], TrainConfig(task="ner"))


def test_bad_ner_file_fails_in_preflight(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["Ada"], "ner_tags": ["B-PER"]}] * 3
                       + [{"tokens": ["Ada"], "ner_tags": [1]}])
    with pytest.raises(HarnessError, match="row 3: integer tags need --labels"):
        preflight(TrainConfig(model=str(tiny_model), task="ner", data=str(path), micro_batch_size=1,
                              output_dir=str(tmp_path / "run")), CPU1)


# --- learning and 2 ZeRO-3 ranks = 1 process -----------------------------------------------------

PEOPLE = (["Ada", "Lovelace"], ["Alan", "Turing"], ["Grace"], ["Linus"])
PLACES = (["Paris"], ["Rome"], ["New", "York"], ["Oslo"])


def ner_rows(n: int, seed: int) -> list[dict]:
    """Short sentences with a person and/or a place from small closed sets, CoNLL style."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        pattern = rng.choice([[person, "lives in", place], [person, "is here"], ["we went to", place], ["it rained"]])
        tokens, tags = [], []
        for part in pattern:
            if isinstance(part, str):
                tokens += part.split()
                tags += ["O"] * len(part.split())
            else:
                kind = "PER" if part in PEOPLE else "LOC"
                tokens += part
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(part) - 1)
        rows.append({"tokens": tokens + ["."], "ner_tags": tags + ["O"]})
    return rows


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ner_data")
    return write_jsonl(folder / "train.jsonl", ner_rows(400, 0)), write_jsonl(folder / "eval.jsonl", ner_rows(32, 1))


@pytest.mark.slow
def test_ner_learns_generated_entities(tiny_model, ner_data, tmp_path):
    out = tmp_path / "run"
    run(TrainConfig(model=str(tiny_model), task="ner", data=str(ner_data[0]), eval_data=str(ner_data[1]),
                    output_dir=str(out), max_steps=200, eval_steps=200, lr=5e-3, micro_batch_size=16,
                    lr_schedule="constant", warmup_steps=5, dtype="fp32", eval_batch_size=32, max_new_tokens=40,
                    template="{text}\nEntities:", log_every=50))
    evals = [m for m in read_metrics(out) if "eval/f1" in m]
    assert [m["step"] for m in evals] == [0, 200]
    assert evals[0]["eval/f1"] <= 0.1 and evals[-1]["eval/f1"] >= 0.8, evals
    assert evals[-1]["eval/unparseable"] <= 0.1
    step = json.loads((out / "eval" / "step-200.json").read_text())
    assert step["metrics"]["f1"] == evals[-1]["eval/f1"] and set(step["entity_counts"]) >= {"PER", "LOC"}
    predictions = [json.loads(line) for line in (out / "eval" / "step-200.predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 32


@pytest.mark.slow
def test_ner_generation_two_zero3_ranks_equal_one_process(tiny_model, ner_data, tmp_path):
    # The bare text as prompt (a file: fire would parse "{text}" as a literal): an untrained model's
    # output then varies with the row.
    template = tmp_path / "prompt.txt"
    template.write_text("{text}")
    flags = dict(model=str(tiny_model), data=str(ner_data[1]), task="ner", max_new_tokens=6, ds_config="zero3",
                 eval_batch_size=4, dtype="fp32", max_eval_samples=10, template=str(template))
    one = evaluation.run(EvalConfig(**flags, output_dir=str(tmp_path / "one")))
    launch_ok("torchrun", 2, as_argv({**flags, "output_dir": tmp_path / "two"}), script_name="evaluate.py")
    texts = [p["prediction"] for p in one.predictions]
    assert len(texts) == 10 and len(set(texts)) > 1
    two = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in two] == texts
    written = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert written["world_size"] == 2 and written["zero_stage"] == 3
    for name in ("f1", "precision", "recall", "unparseable"):
        assert written["metrics"][name] == one.metrics[f"eval/{name}"]
    assert written["metrics"]["loss"] == pytest.approx(one.metrics["eval/loss"], abs=1e-6)
