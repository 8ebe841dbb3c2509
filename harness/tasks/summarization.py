"""Summarization: document -> summary, scored with ROUGE-1/2/L/Lsum F1 from greedy generation.

Field names are flags (SAMSum: --document_field dialogue --summary_field summary). ROUGE comes
from Google's `rouge-score` package (with its Porter stemmer), averaged over rows. ROUGE-Lsum
treats newlines as sentence breaks; we put one after every sentence-final punctuation mark first,
as the reference summarization scripts do with nltk's sentence splitter (whose model is a
download, so a regular expression stands in for it).
"""

from __future__ import annotations

import re

from harness.errors import HarnessError
from harness.tasks.common import Example, check_placeholders, name_rows

NAME = "summarization"
DEFAULT_TEMPLATE = "Summarize the document.\n\n### Document:\n{document}\n\n### Summary:\n"
EVAL_MODE = "generate"
METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
MAIN_METRIC = "rougeL"


def examples(rows, cfg, template: str = "") -> list[Example]:
    columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
    for required, flag_name in ((cfg.document_field, "document_field"), (cfg.summary_field, "summary_field")):
        if columns and required not in columns:
            raise HarnessError(f"data has no field {required!r} (fields: {sorted(columns)}); use --{flag_name} to name it")
    template = template or DEFAULT_TEMPLATE
    check_placeholders(template, {"document"})

    out: list[Example] = []
    empty_doc: list[int] = []
    empty_summary: list[int] = []
    for i, row in enumerate(rows):
        document, summary = row.get(cfg.document_field), row.get(cfg.summary_field)
        if not isinstance(document, str) or not document.strip():
            empty_doc.append(i)
            continue
        if not isinstance(summary, str) or not summary.strip():
            empty_summary.append(i)
            continue
        out.append(Example(row=i, prompt=template.format(document=document.strip()), target=summary.strip(),
                           golds=(summary.strip(),)))
    problems = []
    if empty_doc:
        problems.append(f"{name_rows(empty_doc)}: document field {cfg.document_field!r} is missing, empty or not text")
    if empty_summary:
        problems.append(f"{name_rows(empty_summary)}: summary field {cfg.summary_field!r} is missing, empty or not text")
    if problems:
        raise HarnessError("bad rows in the data:\n  " + "\n  ".join(problems))
    return out


def sentences_on_lines(text: str) -> str:
    return "\n".join(part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part)


def compute_metrics(predictions: list[str], examples: list[Example], cfg) -> tuple[dict, dict]:
    from rouge_score import rouge_scorer  # pulls in nltk (~1 s): only summarization metrics need it

    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    totals = dict.fromkeys(METRICS, 0.0)
    for pred, ex in zip(predictions, examples):
        scores = scorer.score(sentences_on_lines(ex.golds[0]), sentences_on_lines(pred))
        for name in METRICS:
            totals[name] += scores[name].fmeasure
    return {name: total / len(examples) for name, total in totals.items()}, {}
