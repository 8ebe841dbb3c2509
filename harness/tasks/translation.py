"""Translation: source text -> target text, scored with sacrebleu's corpus BLEU and chrF.

`--source_field`/`--target_field` name the row fields (a dotted path reads a nested field, e.g.
`translation.de` for the WMT layout of `datasets`); `--source_lang`/`--target_lang` are the
language names the prompt shows. Evaluation generates greedily; BLEU and chrF are sacrebleu's
corpus scores with its defaults (BLEU: 13a tokenization, exponential smoothing; chrF: character
6-grams, beta 2), never re-implemented. Like every metric here they are reported as fractions
(sacrebleu's score / 100); sacrebleu's own score lines and signatures are saved with the metrics
in eval/step-N.json (and metrics.json of launch/evaluate.py), so a number can be reproduced.
"""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF

from harness.errors import HarnessError
from harness.tasks.common import Example, check_placeholders, name_rows

NAME = "translation"
DEFAULT_TEMPLATE = ("Translate the text from {source_lang} to {target_lang}.\n\n"
                    "### {source_lang}:\n{source}\n\n### {target_lang}:\n")
EVAL_MODE = "generate"
METRICS = ("bleu", "chrf")
MAIN_METRIC = "bleu"


def field_value(row, path: str):
    """`a.b` reads row["a"]["b"]; a plain name reads row[name]."""
    value = row
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def examples(rows, cfg, template: str = "") -> list[Example]:
    missing = [f"--{name}" for name in ("source_lang", "target_lang") if not getattr(cfg, name).strip()]
    if missing:
        raise HarnessError(f"task translation needs {' and '.join(missing)}: the language names the prompt shows, "
                           f"e.g. --source_lang German --target_lang English")
    columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
    for path, flag_name in ((cfg.source_field, "source_field"), (cfg.target_field, "target_field")):
        if columns and path.split(".")[0] not in columns:
            raise HarnessError(f"data has no field {path.split('.')[0]!r} (fields: {sorted(columns)}); "
                               f"use --{flag_name} to name it (a dotted path reads a nested field)")
    template = template or DEFAULT_TEMPLATE
    check_placeholders(template, {"source", "source_lang", "target_lang"})

    out: list[Example] = []
    empty_source: list[int] = []
    empty_target: list[int] = []
    for i, row in enumerate(rows):
        source, target = field_value(row, cfg.source_field), field_value(row, cfg.target_field)
        if not isinstance(source, str) or not source.strip():
            empty_source.append(i)
            continue
        if not isinstance(target, str) or not target.strip():
            empty_target.append(i)
            continue
        prompt = template.format(source=source.strip(), source_lang=cfg.source_lang.strip(),
                                 target_lang=cfg.target_lang.strip())
        out.append(Example(row=i, prompt=prompt, target=target.strip(), golds=(target.strip(),)))
    problems = []
    if empty_source:
        problems.append(f"{name_rows(empty_source)}: source {cfg.source_field!r} is missing, empty or not text")
    if empty_target:
        problems.append(f"{name_rows(empty_target)}: target {cfg.target_field!r} is missing, empty or not text")
    if problems:
        raise HarnessError("bad rows in the data:\n  " + "\n  ".join(problems))
    return out


def compute_metrics(predictions: list[str], examples: list[Example], cfg) -> tuple[dict, dict]:

    references = [[ex.golds[0] for ex in examples]]  # one reference stream
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(predictions, references)
    chrf_score = chrf.corpus_score(predictions, references)
    return ({"bleu": bleu_score.score / 100, "chrf": chrf_score.score / 100},
            {"sacrebleu": {"bleu": str(bleu_score), "bleu_signature": str(bleu.get_signature()),
                           "chrf": str(chrf_score), "chrf_signature": str(chrf.get_signature())}})
