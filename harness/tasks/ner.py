"""Named-entity recognition as generation: text -> a canonical listing of its entities.

Rows, detected per file:
- CoNLL style: `--tokens_field` (words) and `--tags_field` (one BIO tag per word: names like
  B-PER, or integer ids that `--labels` names in order, e.g. O,B-PER,I-PER,B-LOC,I-LOC; a
  `datasets` folder whose tags are a ClassLabel sequence names them itself). The text is the words
  joined by single spaces, an entity's text its words joined the same way. Chunks follow conlleval:
  B- (or S-) starts an entity, I- (or E-) continues one of the same type and otherwise starts one.
- Spans: `--text_field` and `--entities_field`, a list of {start, end, label} character offsets
  (end exclusive; `type` for `label`, or [start, end, label] triples).

The target lists the entities in text order as `TYPE: text` joined by "; ", e.g.
`PER: Ada Lovelace; LOC: London`, or `none`. Evaluation generates greedily and parses the listing
back to (type, text) pairs (items split at ";", spacing ignored); an output that is not such a
listing is unparseable: it predicts no entity (its row's gold entities count as missed) and its
share is reported as `unparseable`.

Metrics follow the CoNLL/seqeval convention, an entity counts only with exact text and type:
micro precision, recall and F1 over all entities, and per type. seqeval itself scores tag
sequences aligned with the words; a generated listing has no positions, so the count is over the
multiset of (type, text) pairs of each row, which is seqeval's count whenever the predicted
entities are the gold ones at the positions that match (the usual case of one mention per name).
"""

from __future__ import annotations

import collections
import re

from harness.errors import HarnessError
from harness.tasks.classification import parse_labels
from harness.tasks.common import Example, check_placeholders, name_rows

NAME = "ner"
DEFAULT_TEMPLATE = ("Extract the named entities from the text. List each as TYPE: entity, separated by "
                    "semicolons, in text order; answer none if there are none.\n\n### Text:\n{text}\n\n### Entities:\n")
EVAL_MODE = "generate"
METRICS = ("precision", "recall", "f1")
MAIN_METRIC = "f1"
NONE = "none"
SEPARATOR = "; "
ITEM = re.compile(r"([^\s:;]+):\s*(\S(?:.*\S)?)")
TYPE = re.compile(r"[^\s:;]+")


def canonical(text: str) -> str:
    return " ".join(text.split())


def listing(entities: list[tuple[str, str]]) -> str:
    return SEPARATOR.join(f"{kind}: {text}" for kind, text in entities) or NONE


def parse(output: str) -> list[tuple[str, str]] | None:
    """A generated listing -> (type, text) pairs; None when it is not a listing."""
    output = output.strip()
    if output.lower() == NONE:
        return []
    entities = []
    for item in re.split(r"\s*;\s*", output):
        match = ITEM.fullmatch(item.strip())
        if not match:
            return None
        entities.append((match.group(1), canonical(match.group(2))))
    return entities


def split_tag(tag: str) -> tuple[str, str] | None:
    """"B-PER" -> ("B", "PER"), "O" -> ("O", ""); None for anything else."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not TYPE.fullmatch(kind):
        return None
    return prefix, kind


def chunks(tags: list[str]) -> list[tuple[str, int, int]]:
    """BIO/IOB1/BIOES tags -> (type, start, end) word spans, end exclusive, by conlleval's rules."""
    out: list[tuple[str, int, int]] = []
    current: tuple[str, int] | None = None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = split_tag(tag)
        if current and (prefix in ("O", "B", "S") or kind != current[0]):
            out.append((current[0], current[1], i))
            current = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and current is None):
            current = (kind, i)
        if prefix in ("E", "S"):
            out.append((current[0], current[1], i + 1))
            current = None
    return out


def tag_names(rows, cfg) -> list[str] | None:
    if cfg.labels:

        return parse_labels(cfg.labels)[0]
    feature = getattr(rows, "features", {}).get(cfg.tags_field) if hasattr(rows, "features") else None
    names = getattr(getattr(feature, "feature", None), "names", None)  # a ClassLabel sequence
    return list(names) if names else None


def examples(rows, cfg, template: str = "") -> list[Example]:
    columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
    template = template or DEFAULT_TEMPLATE
    check_placeholders(template, {"text"})
    if cfg.tokens_field in columns and cfg.tags_field in columns:
        entities_of, layout = conll_entities(rows, cfg), "conll"
    elif cfg.text_field in columns and cfg.entities_field in columns:
        entities_of, layout = span_entities(cfg), "spans"
    else:
        raise HarnessError(f"data has neither {cfg.tokens_field!r} + {cfg.tags_field!r} (CoNLL words and BIO tags) nor "
                           f"{cfg.text_field!r} + {cfg.entities_field!r} (text and entity spans); fields: "
                           f"{sorted(columns)}; name them with --tokens_field/--tags_field or "
                           f"--text_field/--entities_field")

    out: list[Example] = []
    problems: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        result = entities_of(row)
        if isinstance(result, str):
            problems.setdefault(result, []).append(i)
            continue
        text, entities = result
        target = listing(entities)
        if parse(target) != entities:  # the listing must read back as what it lists
            problems.setdefault("an entity text contains ';', so the listing would not read back", []).append(i)
            continue
        out.append(Example(row=i, prompt=template.format(text=text), target=target, golds=(target,)))
    if problems:
        raise HarnessError(f"bad rows in the data ({layout} layout):\n  "
                           + "\n  ".join(f"{name_rows(bad)}: {problem}" for problem, bad in problems.items()))
    return out


def conll_entities(rows, cfg):
    names = tag_names(rows, cfg)

    def entities_of(row):
        tokens, tags = row.get(cfg.tokens_field), row.get(cfg.tags_field)
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
            return f"{cfg.tokens_field!r} is missing, empty, or has a word that is not text"
        if not isinstance(tags, list) or len(tags) != len(tokens):
            return f"{cfg.tags_field!r} is missing or does not have one tag per word"
        if any(isinstance(t, int) and not isinstance(t, bool) for t in tags):
            if names is None:
                return "integer tags need --labels naming them in id order, e.g. O,B-PER,I-PER,B-LOC,I-LOC"
            if any(not isinstance(t, int) or not 0 <= t < len(names) for t in tags):
                return f"a tag id outside --labels (0..{len(names) - 1})"
            tags = [names[t] for t in tags]
        if any(not isinstance(t, str) or split_tag(t) is None for t in tags):
            bad = sorted({str(t) for t in tags if not isinstance(t, str) or split_tag(t) is None})[:3]
            return f"tags that are not O or B-/I-/E-/S-TYPE (found {', '.join(bad)})"
        words = [canonical(t) for t in tokens]
        return " ".join(words), [(kind, " ".join(words[s:e])) for kind, s, e in chunks(tags)]

    return entities_of


def span_entities(cfg):
    def entities_of(row):
        text, spans = row.get(cfg.text_field), row.get(cfg.entities_field)
        if not isinstance(text, str) or not text.strip():
            return f"{cfg.text_field!r} is missing, empty or not text"
        if not isinstance(spans, list):
            return f"{cfg.entities_field!r} is missing or not a list of spans"
        found = []
        for span in spans:
            if isinstance(span, dict):
                start, end, kind = span.get("start"), span.get("end"), span.get("label", span.get("type"))
            elif isinstance(span, (list, tuple)) and len(span) == 3:
                start, end, kind = span
            else:
                return "a span that is neither {start, end, label} nor [start, end, label]"
            if (not isinstance(start, int) or not isinstance(end, int) or not 0 <= start < end <= len(text)
                    or not isinstance(kind, str) or not TYPE.fullmatch(kind) or not text[start:end].strip()):
                return (f"a span outside the text, empty, or with a type that is not one word "
                        f"(found {start!r}, {end!r}, {kind!r})")
            found.append((start, kind, canonical(text[start:end])))
        return canonical(text), [(kind, entity) for _, kind, entity in sorted(found, key=lambda f: f[0])]

    return entities_of


def compute_metrics(predictions: list[str], examples: list[Example], cfg) -> tuple[dict, dict]:
    """Entity-level micro and per-type precision/recall/F1 (exact text and type); unparseable share."""
    tp, predicted, gold = collections.Counter(), collections.Counter(), collections.Counter()
    unparseable = 0
    for prediction, example in zip(predictions, examples):
        gold_entities = collections.Counter(parse(example.golds[0]))
        parsed = parse(prediction)
        if parsed is None:
            unparseable += 1
            parsed = []
        pred_entities = collections.Counter(parsed)
        for (kind, _), n in (gold_entities & pred_entities).items():
            tp[kind] += n
        for (kind, _), n in pred_entities.items():
            predicted[kind] += n
        for (kind, _), n in gold_entities.items():
            gold[kind] += n

    def prf(t: int, p: int, g: int) -> tuple[float, float, float]:
        # zero_division=0, as seqeval and scikit-learn report it
        precision, recall = (t / p if p else 0.0), (t / g if g else 0.0)
        return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)

    precision, recall, f1 = prf(sum(tp.values()), sum(predicted.values()), sum(gold.values()))
    metrics = {"precision": precision, "recall": recall, "f1": f1, "unparseable": unparseable / len(examples)}
    counts = {}
    for kind in sorted(set(gold) | set(predicted)):
        p, r, f = prf(tp[kind], predicted[kind], gold[kind])
        metrics.update({f"precision/{kind}": p, f"recall/{kind}": r, f"f1/{kind}": f})
        counts[kind] = {"gold": gold[kind], "predicted": predicted[kind], "correct": tp[kind]}
    return metrics, {"entity_counts": counts, "unparseable_rows": unparseable}
