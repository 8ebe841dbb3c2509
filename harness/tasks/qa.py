"""Extractive QA as generation: context + question -> answer, scored with SQuAD EM and F1.

Rows are flat (`context`, `question`, `answers`) or the official SQuAD JSON (`data` -> articles ->
`paragraphs` -> `qas`), which is flattened here in file order. `answers` may be a list of strings,
a list of {"text": ...} (SQuAD) or {"text": [...]} (the HF squad layout). Training uses the first
gold answer as the target; evaluation generates greedily and takes, per question, the best EM and
F1 over all gold answers after the official SQuAD v1.1 normalization (lower case, no punctuation,
no articles a/an/the, single spaces).
"""

from __future__ import annotations

import collections
import re
import string

from harness.errors import HarnessError
from harness.tasks.common import Example, check_placeholders, name_rows

NAME = "qa"
DEFAULT_TEMPLATE = "Answer the question from the context.\n\n### Context:\n{context}\n\n### Question:\n{question}\n\n### Answer:\n"
EVAL_MODE = "generate"
METRICS = ("exact_match", "f1")
MAIN_METRIC = "f1"


def flatten_squad(rows) -> list[dict]:
    """The official SQuAD layout (one object with `data`) -> one dict per question."""
    flat = []
    for record in rows:
        for article in record.get("data") or []:
            for paragraph in article.get("paragraphs") or []:
                for qa in paragraph.get("qas") or []:
                    flat.append({"context": paragraph.get("context"), "question": qa.get("question"),
                                 "answers": qa.get("answers"), "id": qa.get("id")})
    return flat


def gold_answers(value) -> list[str]:
    if isinstance(value, dict):  # HF squad: {"text": [...], "answer_start": [...]}
        value = value.get("text")
    if isinstance(value, str):
        value = [value]
    answers = []
    for item in value or []:
        text = item.get("text") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip():
            answers.append(text.strip())
    return answers


def examples(rows, cfg, template: str = "") -> list[Example]:
    columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
    fields = (cfg.context_field, cfg.question_field, cfg.answers_field)
    if "data" in columns and cfg.context_field not in columns:
        rows, fields = flatten_squad(rows), ("context", "question", "answers")
        if not rows:
            raise HarnessError("data has a 'data' field but no SQuAD articles/paragraphs/qas in it")
    else:
        for required, flag_name in zip(fields, ("context_field", "question_field", "answers_field")):
            if columns and required not in columns:
                raise HarnessError(f"data has no field {required!r} (fields: {sorted(columns)}); use --{flag_name} to name it")
    template = template or DEFAULT_TEMPLATE
    check_placeholders(template, {"context", "question"})

    out: list[Example] = []
    empty: list[int] = []
    no_answers: list[int] = []
    for i, row in enumerate(rows):
        context, question = row.get(fields[0]), row.get(fields[1])
        if not isinstance(context, str) or not context.strip() or not isinstance(question, str) or not question.strip():
            empty.append(i)
            continue
        golds = gold_answers(row.get(fields[2]))
        if not golds:
            no_answers.append(i)
            continue
        prompt = template.format(context=context.strip(), question=question.strip())
        out.append(Example(row=i, prompt=prompt, target=golds[0], golds=tuple(golds)))
    problems = []
    if empty:
        problems.append(f"{name_rows(empty)}: {fields[0]!r} or {fields[1]!r} is missing, empty or not text")
    if no_answers:
        problems.append(f"{name_rows(no_answers)}: no gold answer in {fields[2]!r} (training needs a target and "
                        f"EM/F1 need references)")
    if problems:
        raise HarnessError("bad rows in the data:\n  " + "\n  ".join(problems))
    return out


# --- SQuAD v1.1 metric, following the official evaluate-v1.1.py --------------------------------

def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def compute_metrics(predictions: list[str], examples: list[Example], cfg) -> tuple[dict, dict]:
    n = len(examples)
    em = sum(max(exact_match(p, g) for g in ex.golds) for p, ex in zip(predictions, examples))
    f = sum(max(f1(p, g) for g in ex.golds) for p, ex in zip(predictions, examples))
    return {"exact_match": em / n, "f1": f / n}, {}
