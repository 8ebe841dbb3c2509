"""task=translation: corpus BLEU and chrF from sacrebleu on hand-worked cases with their
signatures, field paths and language names, bad input, learning a generated mapping, and 2
ZeRO-3 ranks = 1 process."""

import json
import random

import pytest
import torch

from conftest import as_argv, launch_ok, read_metrics, write_jsonl
from harness import evaluation
from harness.config import EvalConfig, TrainConfig
from harness.dist import DistInfo
from harness.errors import HarnessError
from harness.tasks import translation
from harness.tasks.common import Example
from harness.train import preflight, run

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
LANGS = dict(source_lang="English", target_lang="Digits")


def refs(*texts):
    return [Example(i, "", t, (t,)) for i, t in enumerate(texts)]


def test_corpus_bleu_on_a_hand_worked_case():
    # Against "the cat sat on a mat": 1-grams 5/6 (one "the" clipped), 2-grams 3/5, 3-grams 2/4,
    # 4-grams 1/3, equal lengths (no brevity penalty): BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    metrics, details = translation.compute_metrics(["the cat sat on the mat"], refs("the cat sat on a mat"), None)
    assert metrics["bleu"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    signatures = details["sacrebleu"]
    assert signatures["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert signatures["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert signatures["bleu"].startswith(f"BLEU = {100 * metrics['bleu']:.2f}")


def test_scores_are_corpus_level_not_a_mean_of_sentences():
    # Row 1 exact (6 tokens), row 2 shares nothing (4 tokens): n-gram matches pool over the corpus,
    # 1-grams 6/10, 2-grams 5/8, 3-grams 4/6, 4-grams 3/4; a mean of sentence scores would be 0.5.
    metrics, _ = translation.compute_metrics(["the cat sat on the mat", "w x y z"],
                                             refs("the cat sat on the mat", "a b c d"), None)
    assert metrics["bleu"] == pytest.approx((6 / 10 * 5 / 8 * 4 / 6 * 3 / 4) ** 0.25)
    same, _ = translation.compute_metrics(["Das ist gut."], refs("Das ist gut."), None)
    disjoint, _ = translation.compute_metrics(["xyz"], refs("abc"), None)
    assert same["chrf"] == pytest.approx(1.0) and disjoint["chrf"] == 0.0
    # A 3-word corpus has no 4-gram at all: BLEU is 0 however good the output, chrF is not.
    short, _ = translation.compute_metrics(["one two three"], refs("one two three"), None)
    assert short["bleu"] == 0.0 and short["chrf"] == pytest.approx(1.0)


def test_fields_by_dotted_path_and_language_names_in_the_prompt():
    rows = [{"translation": {"de": "Guten Morgen", "en": "Good morning"}}]
    (example,) = translation.examples(rows, TrainConfig(task="translation", source_field="translation.de",
                                                        target_field="translation.en", source_lang="German",
                                                        target_lang="English"))
    assert example.prompt == "Translate the text from German to English.\n\n### German:\nGuten Morgen\n\n### English:\n"
    assert example.target == "Good morning" and example.golds == ("Good morning",)


def test_bad_translation_input(tiny_model, tmp_path):
    with pytest.raises(HarnessError, match="needs --source_lang and --target_lang"):
        translation.examples([{"source": "a", "target": "b"}], TrainConfig(task="translation"))
    with pytest.raises(HarnessError, match="data has no field 'src'.*--source_field"):
        translation.examples([{"source": "a", "target": "b"}], TrainConfig(task="translation", source_field="src", **LANGS))
    rows = [{"source": "one", "target": "uno"}, {"source": " ", "target": "dos"}, {"source": "three"},
            {"source": "four", "target": 4}]
    with pytest.raises(HarnessError) as err:
        translation.examples(rows, TrainConfig(task="translation", **LANGS))
    assert "row 1: source 'source' is missing, empty" in str(err.value)
    assert "rows 2, 3: target 'target' is missing, empty or not text" in str(err.value)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"source": "one", "target": "uno"}] * 3 + [{"source": "", "target": "x"}])
    with pytest.raises(HarnessError, match="row 3: source 'source' is missing, empty"):
        preflight(TrainConfig(model=str(tiny_model), task="translation", data=str(path), micro_batch_size=1,
                              output_dir=str(tmp_path / "run"), **LANGS), CPU1)
    with pytest.raises(HarnessError, match="unknown placeholder"):
        translation.examples([{"source": "a", "target": "b"}], TrainConfig(task="translation", **LANGS), "{text}")


# --- learning and 2 ZeRO-3 ranks = 1 process -----------------------------------------------------

COLOURS = {"red": "rot", "blue": "blau", "black": "schwarz", "white": "weiss"}
ANIMALS = {"cat": "katze", "dog": "hund", "bird": "vogel", "fish": "fisch"}


def phrase_rows(n: int, seed: int) -> list[dict]:
    """A generated phrasebook with reordering: "the red cat" -> "die katze ist rot" (four words, so
    BLEU has 4-grams to count)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour, animal = rng.choice(sorted(COLOURS)), rng.choice(sorted(ANIMALS))
        rows.append({"source": f"the {colour} {animal}", "target": f"die {ANIMALS[animal]} ist {COLOURS[colour]}"})
    return rows


@pytest.fixture(scope="module")
def phrase_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("translation_data")
    return write_jsonl(folder / "train.jsonl", phrase_rows(400, 0)), write_jsonl(folder / "eval.jsonl", phrase_rows(32, 1))


@pytest.mark.slow
def test_translation_learns_a_generated_mapping(tiny_model, phrase_data, tmp_path):
    out = tmp_path / "run"
    run(TrainConfig(model=str(tiny_model), task="translation", data=str(phrase_data[0]), eval_data=str(phrase_data[1]),
                    output_dir=str(out), max_steps=100, eval_steps=100, lr=5e-3, micro_batch_size=16,
                    lr_schedule="constant", warmup_steps=5, dtype="fp32", eval_batch_size=32, max_new_tokens=24,
                    template="{source_lang}: {source}\n{target_lang}:", log_every=50, **LANGS))
    evals = [m for m in read_metrics(out) if "eval/bleu" in m]
    assert [m["step"] for m in evals] == [0, 100]
    assert evals[0]["eval/bleu"] <= 0.05 and evals[0]["eval/chrf"] <= 0.2, evals[0]
    assert evals[-1]["eval/bleu"] >= 0.9 and evals[-1]["eval/chrf"] >= 0.9, evals[-1]
    step = json.loads((out / "eval" / "step-100.json").read_text())
    assert step["metrics"]["bleu"] == evals[-1]["eval/bleu"]
    assert step["sacrebleu"]["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


@pytest.mark.slow
def test_translation_generation_two_zero3_ranks_equal_one_process(tiny_model, phrase_data, tmp_path):
    # The bare source as prompt (a file: fire would parse "{source}" as a literal): an untrained
    # model's output then varies with the row.
    template = tmp_path / "prompt.txt"
    template.write_text("{source}")
    flags = dict(model=str(tiny_model), data=str(phrase_data[1]), task="translation", max_new_tokens=6,
                 ds_config="zero3", eval_batch_size=4, dtype="fp32", max_eval_samples=10, template=str(template), **LANGS)
    one = evaluation.run(EvalConfig(**flags, output_dir=str(tmp_path / "one")))
    launch_ok("torchrun", 2, as_argv({**flags, "output_dir": tmp_path / "two"}), script_name="evaluate.py")
    texts = [p["prediction"] for p in one.predictions]
    assert len(texts) == 10 and len(set(texts)) > 1
    two = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in two] == texts
    written = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert written["world_size"] == 2 and written["zero_stage"] == 3
    assert written["metrics"]["bleu"] == one.metrics["eval/bleu"] and written["metrics"]["chrf"] == one.metrics["eval/chrf"]
    assert written["sacrebleu"]["bleu_signature"] == one.details["sacrebleu"]["bleu_signature"]
