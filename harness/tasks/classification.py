"""Classification as instruction following: the target is the label word, scored, never generated.

Training: prompt = the template rendered with the row's text field(s) and the label words; target =
the row's label word (+ EOS, added by the tokenizer step like every task).

Evaluation is label-constrained scoring (`harness.evaluation.label_scores`): for each eval row the
log-likelihood of every label's tokens (label word + EOS) given the prompt; the argmax is the
prediction, so the model can never answer outside the label set. Metrics: accuracy, macro-F1,
per-class precision/recall, and the confusion matrix (rows: gold, columns: predicted).

`--labels` names the classes: "negative,positive" (an integer label i means the i-th word) or a
mapping "{0: 'negative', 1: 'positive'}". A row label may be the word itself or its key.
"""

from __future__ import annotations

import ast

from harness.errors import HarnessError
from harness.tasks.common import Example, check_placeholders, name_rows

NAME = "classification"
DEFAULT_TEMPLATE = "Classify the text. Answer with one of: {labels}.\n\n### Text:\n{text}\n\n### Label:\n"
EVAL_MODE = "labels"  # harness.evaluation scores the label words instead of generating
METRICS = ("accuracy", "macro_f1")
MAIN_METRIC = "accuracy"


def parse_labels(value) -> tuple[list[str], dict[str, int]]:
    """`--labels` -> (label words in class order, lookup from every accepted spelling to the class)."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)  # fire hands "a,b" over as "('a', 'b')", a mapping as "{...}"
        except (ValueError, SyntaxError):
            parsed = [part for part in value.split(",")]
        if isinstance(parsed, (str, int)):
            parsed = [parsed]
    if isinstance(parsed, dict):
        keys, words = list(parsed.keys()), [str(w).strip() for w in parsed.values()]
    elif isinstance(parsed, (list, tuple)):
        words = [str(w).strip() for w in parsed]
        keys = list(range(len(words)))
    else:
        raise HarnessError(f"--labels {value!r}: give comma-separated words or a mapping like {{0: 'neg', 1: 'pos'}}")
    if len(words) < 2 or any(not w for w in words):
        raise HarnessError(f"--labels {value!r} names {len([w for w in words if w])} non-empty label(s); "
                           f"classification needs at least 2")
    if len(set(words)) != len(words):
        raise HarnessError(f"--labels {value!r} repeats a label word")
    lookup: dict[str, int] = {}
    for index, (key, word) in enumerate(zip(keys, words)):
        lookup[str(key).strip()] = index
        lookup[word] = index
    return words, lookup


def label_index(raw, lookup: dict[str, int]) -> int | None:
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return lookup.get(str(raw).strip())


def text_fields(cfg) -> list[str]:
    return [name.strip() for name in str(cfg.text_field).split(",") if name.strip()]


def examples(rows, cfg, template: str = "") -> list[Example]:
    words, lookup = parse_labels(cfg.labels)
    fields = text_fields(cfg)
    template = template or DEFAULT_TEMPLATE
    check_placeholders(template, {"text", "labels", *fields})
    columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
    for required, flag_name in [(f, "text_field") for f in fields] + [(cfg.label_field, "label_field")]:
        if columns and required not in columns:
            raise HarnessError(f"data has no field {required!r} (fields: {sorted(columns)}); use --{flag_name} to name it")

    out: list[Example] = []
    empty: list[int] = []
    unknown: dict[int, object] = {}
    for i, row in enumerate(rows):
        texts = [row.get(f) for f in fields]
        if any(not isinstance(t, str) for t in texts) or not any(t.strip() for t in texts):
            empty.append(i)
            continue
        index = label_index(row.get(cfg.label_field), lookup)
        if index is None:
            unknown[i] = row.get(cfg.label_field)
            continue
        values = dict(zip(fields, (t.strip() for t in texts)))
        prompt = template.format(**{**values, "text": "\n".join(values.values()), "labels": ", ".join(words)})
        out.append(Example(row=i, prompt=prompt, target=words[index], golds=(words[index],)))
    problems = []
    if empty:
        problems.append(f"{name_rows(empty)}: text field(s) {fields} missing, empty or not text")
    if unknown:
        seen = sorted({repr(v) for v in unknown.values()})[:5]
        problems.append(f"{name_rows(list(unknown))}: label not in --labels {words} (found {', '.join(seen)})")
    if problems:
        raise HarnessError("bad rows in the data:\n  " + "\n  ".join(problems))
    return out


def label_token_ids(cfg, tokenizer) -> list[list[int]]:
    """Each label word's tokens as they follow the prompt in training, plus EOS."""
    words, _ = parse_labels(cfg.labels)
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    empty = [w for w, t in zip(words, ids) if not t]
    if empty:
        raise HarnessError(f"--labels: label word(s) {empty} tokenize to no tokens; choose other words")
    if len({tuple(t) for t in ids}) != len(ids):
        raise HarnessError(f"--labels: label words {words} tokenize to identical token sequences")
    return [t + [tokenizer.eos_token_id] for t in ids]


def compute_metrics(predictions: list[str], examples: list[Example], cfg) -> tuple[dict, dict]:
    """Accuracy, macro-F1, per-class precision/recall; details: the confusion matrix."""
    words, _ = parse_labels(cfg.labels)
    index = {w: i for i, w in enumerate(words)}
    k = len(words)
    confusion = [[0] * k for _ in range(k)]
    for pred, ex in zip(predictions, examples):
        confusion[index[ex.golds[0]]][index[pred]] += 1
    total = sum(map(sum, confusion))
    metrics = {"accuracy": sum(confusion[i][i] for i in range(k)) / total if total else 0.0}
    f1s = []
    for i, word in enumerate(words):
        tp = confusion[i][i]
        predicted = sum(confusion[g][i] for g in range(k))
        actual = sum(confusion[i])
        # A class never predicted (or never present) has precision (recall) 0, as in scikit-learn's zero_division=0.
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        metrics[f"precision/{word}"] = precision
        metrics[f"recall/{word}"] = recall
    metrics["macro_f1"] = sum(f1s) / k
    return metrics, {"labels": words, "confusion_matrix": confusion}
