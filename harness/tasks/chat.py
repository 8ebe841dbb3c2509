"""Conversations rendered with the model's chat template; the loss is on the assistant's turns only.

Rows, detected per file:
- OpenAI style: `--messages_field` (default `messages`), a list of {role, content};
- ShareGPT style: `conversations`, a list of {from, value} (human/gpt/system);
- Alpaca style (`--instruction_field`, `--input_field`, `--output_field`): one user turn (the
  instruction, then the input after a blank line) and one assistant turn, so Alpaca files mix
  with conversation files in one `--data` list.
`--message_keys` names the role and content keys when they are neither role/content nor
from/value; `--role_names` maps further role names onto system/user/assistant (or onto another
role the template knows). Messages after the last assistant turn are dropped: nothing to learn.

The template is `--chat_template` (a Jinja string, a file, or the built-in `chatml`) or the
tokenizer's own; the run's tokenizer (saved into final/ and best/) carries it. How a conversation
becomes tokens and labels, and the truncation policy: `harness.chat_template`.

Evaluation: the teacher-forced loss and perplexity over every held-out conversation, and the last
assistant turn generated greedily for the first `--chat_eval_generations` of them, written to
eval/step-N.predictions.jsonl next to the reference. Generation stops at EOS or at any end-of-turn
token the template put after assistant turns in the eval data.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass

import datasets

from harness import chat_template
from harness.errors import HarnessError
from harness.tasks import instruction
from harness.tasks.common import Example, name_rows

NAME = "chat"
DEFAULT_TEMPLATE = ""  # the chat template replaces the prompt template; --template is not used
EVAL_MODE = "generate"
METRICS = ()
MAIN_METRIC = "loss"
MASKING_POLICY = chat_template.MASKING_POLICY
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
SHAREGPT_FIELD = "conversations"
SHAREGPT_KEYS = ("from", "value")


@dataclass(frozen=True)
class Conversation(Example):
    messages: tuple[tuple[str, str], ...] = ()  # (role, content), roles as the template knows them

    def as_dicts(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]


def literal(value):
    """A flag that fire may hand over as a Python literal or as the text of one."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [part.strip() for part in value.split(",")] if "," in value else value
    return value


def role_names(cfg) -> dict[str, str]:
    extra = literal(cfg.role_names) if cfg.role_names else {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                              for k, v in extra.items()):
        raise HarnessError(f"--role_names {cfg.role_names!r}: give a mapping like \"{{'bot': 'assistant'}}\"")
    return {**ROLES, **extra}


def message_keys(cfg) -> tuple[str, str]:
    keys = literal(cfg.message_keys)
    if not isinstance(keys, (list, tuple)) or len(keys) != 2 or not all(isinstance(k, str) and k for k in keys):
        raise HarnessError(f"--message_keys {cfg.message_keys!r}: give the role and content keys, e.g. role,content")
    return keys[0], keys[1]


def examples(rows, cfg, template: str = "") -> list[Conversation]:
    """Rows -> conversations ending with an assistant turn, or an error naming every bad row."""
    if template:
        raise HarnessError("--template is a prompt template; task chat renders rows with the chat template "
                           "(--chat_template)")
    columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
    names = role_names(cfg)
    if cfg.messages_field in columns:
        layout, field, keys = "messages", cfg.messages_field, message_keys(cfg)
    elif SHAREGPT_FIELD in columns:
        layout, field, keys = "sharegpt", SHAREGPT_FIELD, SHAREGPT_KEYS
    elif cfg.instruction_field in columns and cfg.output_field in columns:
        return alpaca_examples(rows, cfg)
    else:
        raise HarnessError(f"data has no field {cfg.messages_field!r} (fields: {sorted(columns)}): task chat reads "
                           f"--messages_field (a list of messages), {SHAREGPT_FIELD!r} (ShareGPT) or Alpaca rows "
                           f"({cfg.instruction_field!r}, {cfg.output_field!r})")

    problems: dict[str, list[int]] = {}
    unknown_roles: set[str] = set()
    out: list[Conversation] = []
    for i, row in enumerate(rows):
        value = row.get(field)
        if not isinstance(value, list):
            problems.setdefault(f"field {field!r} is missing or not a list of messages", []).append(i)
            continue
        if not value:
            problems.setdefault("empty conversation", []).append(i)
            continue
        messages, problem = [], None
        for message in value:
            raw_role = message.get(keys[0]) if isinstance(message, dict) else None
            content = message.get(keys[1]) if isinstance(message, dict) else None
            if raw_role is None and isinstance(message, dict) and layout == "messages":  # ShareGPT keys there
                raw_role, content = message.get(SHAREGPT_KEYS[0]), message.get(SHAREGPT_KEYS[1])
            if not isinstance(raw_role, str) or not isinstance(content, str):
                problem = f"a message without a text {keys[0]!r} and {keys[1]!r}"
                break
            role = names.get(raw_role)
            if role is None:
                unknown_roles.add(raw_role)
                problem = "unknown role"
                break
            messages.append((role, content))
        if problem is None:
            last = max((k for k, (role, _) in enumerate(messages) if role == "assistant"), default=None)
            if last is None:
                problem = "no assistant turn (nothing to learn)"
            elif any(role == "assistant" and not content.strip() for role, content in messages):
                problem = "an empty assistant message (nothing to learn)"
            else:
                messages = messages[: last + 1]
        if problem:
            problems.setdefault(problem, []).append(i)
            continue
        out.append(Conversation(row=i, prompt="", target=messages[-1][1], golds=(messages[-1][1],),
                                messages=tuple(messages)))
    if problems:
        lines = []
        for problem, bad in problems.items():
            if problem == "unknown role":
                problem = (f"unknown role(s) {sorted(unknown_roles)} (known: {sorted(names)}; map others with "
                           f"--role_names \"{{'bot': 'assistant'}}\")")
            lines.append(f"{name_rows(bad)}: {problem}")
        raise HarnessError("bad rows in the data:\n  " + "\n  ".join(lines))
    return out


def alpaca_examples(rows, cfg) -> list[Conversation]:
    """Alpaca rows as one user turn and one assistant turn, checked as task=instruction checks them."""

    pairs = instruction.examples(rows, cfg)  # names rows with a missing instruction or an empty output
    out = []
    for pair, row in zip(pairs, (rows[e.row] for e in pairs)):
        inp = row.get(cfg.input_field)
        user = row[cfg.instruction_field] + (f"\n\n{inp}" if isinstance(inp, str) and inp.strip() else "")
        out.append(Conversation(row=pair.row, prompt="", target=pair.target, golds=(pair.target,),
                                messages=(("user", user), ("assistant", pair.target))))
    return out


# --- tokenization: hooks called by harness.data_cache, harness.evaluation and the preflight -------


def setup_tokenizer(cfg, tokenizer) -> None:
    """Resolve the chat template once, before any data is read, and let the tokenizer carry it: the
    model folders a run writes then render conversations exactly as training did."""
    tokenizer.chat_template = chat_template.resolve(cfg.chat_template, tokenizer)


def cache_key(cfg) -> dict:
    """What changes the tokens beyond the tokenizer's files (which hold its own template)."""
    return {"chat_template": chat_template.flag_text(cfg.chat_template)}


def tokenize_batch(batch: dict, tokenizer, template: str, seq_len: int) -> dict:
    """`datasets.map(batched=True)`: conversations -> the columns every task's rows have, plus `error`."""
    conversations = [json.loads(m) for m in batch["messages"]]
    out = {k: [] for k in ("input_ids", "labels", "prompt_len", "target_len", "prompt_truncated",
                           "target_truncated", "error")}
    for enc in chat_template.encode(conversations, tokenizer, template):
        if isinstance(enc, str):
            ids, labels, prompt_cut, target_cut, supervised, error = [], [], False, False, 0, enc
        else:
            ids, labels, prompt_cut, target_cut = chat_template.truncate(enc, seq_len)
            supervised, error = sum(end - start for start, end in enc.spans), ""
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        # For conversations "prompt" is every masked token and "target" every supervised one.
        out["prompt_len"].append(len(enc.ids) - supervised if not error else 0)
        out["target_len"].append(supervised)
        out["prompt_truncated"].append(prompt_cut)
        out["target_truncated"].append(target_cut)
        out["error"].append(error)
    return out


def tokenize_examples(examples: list[Conversation], cfg, tokenizer, seq_len: int, num_proc: int = 1):
    """Conversations -> a tokenized dataset with the columns of `harness.data.tokenize_dataset`."""

    if tokenizer.eos_token_id is None:
        raise HarnessError("the tokenizer has no EOS token; the model could never learn to stop")
    template = chat_template.resolve(cfg.chat_template, tokenizer)
    table = datasets.Dataset.from_dict({"row": [e.row for e in examples],
                                        "messages": [json.dumps(e.as_dicts()) for e in examples]})
    tokenized = table.map(tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                          fn_kwargs={"tokenizer": tokenizer, "template": template, "seq_len": seq_len},
                          remove_columns=["messages"], desc="tokenize conversations")
    failed: dict[str, list[int]] = {}
    for row, error in zip(tokenized["row"], tokenized["error"]):
        if error:
            failed.setdefault(error, []).append(row)
    if failed:
        raise HarnessError("conversations the chat template cannot render with exact assistant boundaries:\n  "
                           + "\n  ".join(f"{name_rows(rows)}: {error}" for error, rows in failed.items()))
    return tokenized.remove_columns(["error"])


def eval_tokens(examples: list[Conversation], cfg, tokenizer, seq_len: int, room: int):
    """Eval inputs: loss rows of every conversation; generation prompts (the conversation up to its
    last assistant turn, with the generation prompt) for the first --chat_eval_generations; stop ids."""
    from harness import data  # torch: imported when evaluating, not when the task package is listed

    tokenized = tokenize_examples(examples, cfg, tokenizer, seq_len)
    loss_rows, stats = data.rows_from_dataset(tokenized, tokenizer.eos_token_id)
    data.check_supervised(stats, "eval conversations")
    template = chat_template.resolve(cfg.chat_template, tokenizer)
    sample = examples[: cfg.chat_eval_generations]
    conversations = [e.as_dicts() for e in sample]
    encoded = chat_template.encode(conversations, tokenizer, template)
    asked = chat_template.render(tokenizer, template, [c[:-1] for c in conversations], True)
    failed = [e.row for e, text in zip(sample, asked) if isinstance(text, Exception)]
    if failed:
        raise HarnessError(f"{name_rows(failed)}: the chat template cannot render the conversation up to its last "
                           f"assistant turn with a generation prompt")
    asked_ids = tokenizer(asked, add_special_tokens=False)["input_ids"] if asked else []
    prompts = []
    for enc, prompt in zip(encoded, asked_ids):
        last_start = enc.spans[-1][0]
        if enc.ids[:last_start] == prompt:  # prefix-stable: the earlier turns are known exchanges
            spans, opening, breaks = enc.spans[:-1] + [(last_start, last_start + room)], enc.opening, enc.breaks
        else:  # a marked template that rewrites history: the prompt is one block after the opening
            opening = enc.opening if prompt[: enc.opening] == enc.ids[: enc.opening] else 0
            spans, breaks = [(len(prompt), len(prompt) + room)], []
        # The same policy as training, with the room for the reply standing in for the last turn.
        keep, _, _ = chat_template.kept_positions(len(prompt) + room, spans, opening, breaks, seq_len)
        prompts.append([prompt[i] for i in keep if i < len(prompt)])
    specials = chat_template.special_ids(tokenizer)
    stops = {tokenizer.eos_token_id} | {enc.ids[end - 1] for enc in encoded for _, end in enc.spans} & specials
    return loss_rows, prompts, sorted(stops)


def compute_metrics(predictions: list[str], examples: list[Example], cfg) -> tuple[dict, dict]:
    """Open-ended replies: the eval loss is the metric; the generations are for reading."""
    return {}, {}
