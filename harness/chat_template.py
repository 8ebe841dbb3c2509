"""Conversations through a chat template: one token sequence, the assistant's tokens found exactly.

A conversation becomes ONE sequence: the template's rendering of all its messages, tokenized
once (transformers' `apply_chat_template`, no special tokens added beyond what the template
writes: BOS is there when the template puts it there). Its labels are -100 everywhere except the
assistant turns: each turn's content and the template's end-of-turn token after it (`<|eot_id|>`,
`<|im_end|>`, `</s>`). System and user turns, role headers, the generation prompt
(`<|im_start|>assistant\\n`) and whitespace the template writes after an end-of-turn token are
masked. Nothing follows the last assistant turn in a row (trailing tokens would be masked and
change no loss).

Finding the assistant tokens, exactly, two ways:
- A template with `{% generation %}...{% endgeneration %}` around the assistant output:
  transformers' `return_assistant_tokens_mask` marks the tokens inside; the template decides.
- Any other template, by prefix: for the assistant message at index k, P = the rendering of
  messages[:k] with the generation prompt, F = the rendering of messages[:k+1]. P's tokens must be
  a prefix of F's, and F's of the whole conversation's; the turn is F's tokens after P, up to and
  including its last special token. A template that rewrites earlier turns as the conversation
  grows, or a tokenizer that merges text across a turn boundary, is refused with the rows: exact
  boundaries are then impossible without markers.
Either way each assistant turn must end with a special token, or the model could never learn to
stop; the built-in `chatml` therefore needs a tokenizer with `<|im_start|>`/`<|im_end|>` tokens.

Truncation (rows longer than seq_len), oldest turns first, never the last assistant turn's start:
1. The opening (the tokens of the leading system message(s), or BOS) is kept, unless it takes
   more than half of seq_len; then it counts as part of the oldest turn.
2. Whole exchanges are dropped oldest first (an exchange: everything after the previous assistant
   turn up to the end of the next one), never the last one; earlier assistant turns lose their
   loss with them.
3. If the last exchange alone is too long, its context (the last user turn and the assistant
   header) is cut from its start but keeps at least half of what remains, and the last assistant
   turn is cut at its end (it loses its end-of-turn token). Its first token always survives.
The report counts rows that lost context (step 2 or 3: "prompt") and rows whose last assistant turn
was cut ("target").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from harness.errors import HarnessError

IGNORE_INDEX = -100
# Part of the tokenization cache key of task=chat: change it whenever the tokens or labels change.
MASKING_POLICY = ("chat: assistant turns + end-of-turn trained, rest masked; tail dropped; "
                  "truncate oldest exchanges, then last context start, then last turn end; v1")

# ChatML as Qwen2 and others write it, without a default system prompt.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILTIN = {"chatml": CHATML}
BUILTIN_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
MARKER_TAGS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def flag_text(value: str) -> str:
    """`--chat_template`: a built-in name, a file holding a Jinja template, or the template itself."""
    if not value:
        return ""
    if value in BUILTIN:
        return BUILTIN[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text()
    raise HarnessError(f"--chat_template {value!r} is not a built-in name ({', '.join(BUILTIN)}), "
                       f"not a file, and not a Jinja template")


def resolve(value: str, tokenizer) -> str:
    """The template text a run uses: `--chat_template`, else the tokenizer's own; never a silent default."""
    text = flag_text(value)
    if value in BUILTIN_TOKENS:
        vocab = tokenizer.get_vocab()
        missing = [t for t in BUILTIN_TOKENS[value] if t not in vocab]
        if missing:
            raise HarnessError(f"--chat_template {value}: the tokenizer has no token {' or '.join(missing)}, so an "
                               f"assistant turn could not end with one end-of-turn token; use the model's own "
                               f"template, or a template that ends assistant turns with {{{{ eos_token }}}}")
    if not text:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise HarnessError("task chat: the tokenizer has no chat template; give --chat_template: a Jinja "
                               "template, a file holding one, or the built-in 'chatml' "
                               "(<|im_start|>role\\n...<|im_end|>, for tokenizers that have those tokens)")
        text = own
    check_syntax(text)
    if has_generation_markers(text) and not getattr(tokenizer, "is_fast", False):
        raise HarnessError("a chat template with {% generation %} markers needs a fast (Rust) tokenizer: "
                           "transformers maps the marked text to tokens through character offsets")
    return text


def check_syntax(text: str) -> None:
    """A template that does not parse fails every row: say so once, before any row is read."""

    plain = MARKER_TAGS.sub("", text)  # transformers' own extension handles these tags when rendering
    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(plain)
    except jinja2.TemplateSyntaxError as err:
        raise HarnessError(f"the chat template is not valid Jinja: {err.message} (line {err.lineno})") from None


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION_TAG.search(template))


def special_ids(tokenizer) -> set[int]:
    """Ids that can end a turn: the special tokens and every added token marked special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


@dataclass
class Encoded:
    """One conversation: its tokens (ending with the last assistant turn) and where the assistant speaks."""

    ids: list[int]
    spans: list[tuple[int, int]]  # [start, end) of each assistant turn's supervised tokens
    opening: int = 0  # tokens of the leading system message(s) (or BOS) that truncation keeps
    breaks: list[int] = field(default_factory=list)  # where each exchange after the first begins


def render(tokenizer, template: str, conversations: list[list[dict]], generation_prompt: bool) -> list[str | Exception]:
    """Render conversations; a conversation whose rendering raises gets its exception instead."""
    if not conversations:
        return []
    try:
        return list(tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
                                                  add_generation_prompt=generation_prompt))
    except Exception:  # find the conversation(s) that raise; the others render as in the batch
        out: list[str | Exception] = []
        for conversation in conversations:
            try:
                out.append(tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                         add_generation_prompt=generation_prompt))
            except Exception as err:  # templates raise anything (raise_exception, KeyError, TypeError)
                out.append(err)
        return out


def template_error(err: Exception) -> str:
    return f"the chat template raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def assistant_indices(conversation: list[dict]) -> list[int]:
    return [i for i, m in enumerate(conversation) if m["role"] == "assistant"]


def leading_system(conversation: list[dict]) -> list[dict]:
    n = 0
    while n < len(conversation) and conversation[n]["role"] == "system":
        n += 1
    return conversation[:n]


def encode(conversations: list[list[dict]], tokenizer, template: str) -> list[Encoded | str]:
    """Tokens and assistant spans of each conversation, or the reason it cannot be encoded.

    Each conversation ends with an assistant message (harness.tasks.chat ensures it).
    """
    specials = special_ids(tokenizer)
    if has_generation_markers(template):
        encoded = encode_marked(conversations, tokenizer, template)
    else:
        encoded = encode_by_prefix(conversations, tokenizer, template, specials)
    openings = opening_lengths(conversations, [e.ids if isinstance(e, Encoded) else None for e in encoded],
                               tokenizer, template)
    out: list[Encoded | str] = []
    for enc, opening in zip(encoded, openings):
        if isinstance(enc, Encoded):
            enc.opening = opening
            enc.breaks = exchange_breaks(enc, tokenizer, specials)
            problem = check_turn_ends(enc, specials)
            out.append(problem or enc)
        else:
            out.append(enc)
    return out


def encode_marked(conversations, tokenizer, template: str) -> list[Encoded | str]:
    """`{% generation %}` templates: transformers marks the assistant tokens from character offsets."""
    def one(batch):
        result = tokenizer.apply_chat_template(batch, chat_template=template, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        return result["input_ids"], result["assistant_masks"]

    try:
        ids, masks = one(conversations)
        results: list = list(zip(ids, masks))
    except Exception:
        results = []
        for conversation in conversations:
            try:
                (ids,), (mask,) = one([conversation])
                results.append((ids, mask))
            except Exception as err:
                results.append(template_error(err))
    out: list[Encoded | str] = []
    for result in results:
        if isinstance(result, str):
            out.append(result)
            continue
        ids, mask = list(result[0]), list(result[1])
        spans, start = [], None
        for i, m in enumerate(mask + [0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append((start, i))
                start = None
        if not spans:
            out.append("the template's {% generation %} blocks mark no token of this conversation")
            continue
        out.append(Encoded(ids[: spans[-1][1]], spans))
    return out


def encode_by_prefix(conversations, tokenizer, template: str, specials: set[int]) -> list[Encoded | str]:
    """Templates without markers: render by prefix, tokenize every rendering in one call, and verify
    that each shorter rendering's tokens are a prefix of the longer one's."""
    full = render(tokenizer, template, conversations, False)
    prefixes = [(c, k) for c, conversation in enumerate(conversations) for k in assistant_indices(conversation)]
    asked = render(tokenizer, template, [conversations[c][:k] for c, k in prefixes], True)
    answered = render(tokenizer, template, [conversations[c][: k + 1] for c, k in prefixes], False)

    errors: dict[int, str] = {}
    for c, text in enumerate(full):
        if isinstance(text, Exception):
            errors[c] = template_error(text)
    for (c, k), p, f in zip(prefixes, asked, answered):
        if c in errors:
            continue
        bad = p if isinstance(p, Exception) else f if isinstance(f, Exception) else None
        if bad is not None:
            errors[c] = template_error(bad) + f" (rendering messages up to index {k})"
        elif not (f.startswith(p) and full[c].startswith(f)):
            errors[c] = (f"the template is not prefix-stable: the conversation rendered up to assistant message {k} is "
                         f"not the start of its full rendering (the template rewrites earlier turns); exact assistant "
                         f"boundaries then need {{% generation %}} markers in the template")

    texts, owners = [], []
    for c, text in enumerate(full):
        if c not in errors:
            texts.append(text)
            owners.append(("full", c, -1))
    for (c, k), p, f in zip(prefixes, asked, answered):
        if c not in errors:
            texts += [p, f]
            owners += [("asked", c, k), ("answered", c, k)]
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    by_owner = dict(zip(owners, tokens))

    out: list[Encoded | str] = []
    for c, conversation in enumerate(conversations):
        if c in errors:
            out.append(errors[c])
            continue
        ids = by_owner[("full", c, -1)]
        spans, problem = [], None
        for k in assistant_indices(conversation):
            p, f = by_owner[("asked", c, k)], by_owner[("answered", c, k)]
            if f[: len(p)] != p or ids[: len(f)] != f:
                problem = (f"the tokens are not prefix-stable at assistant message {k}: the tokenizer merges text "
                           f"across the turn boundary, so the assistant tokens have no exact start or end; add "
                           f"{{% generation %}} markers to the template or end its generation prompt on a special "
                           f"token or newline")
                break
            turn = f[len(p):]
            end = last_special(turn, specials)
            if end is None or tokenizer.decode(turn[end + 1:]).strip():
                problem = no_end_of_turn(f"assistant message {k}")
                break
            spans.append((len(p), len(p) + end + 1))
        out.append(problem or Encoded(ids[: spans[-1][1]], spans))
    return out


def last_special(tokens: list[int], specials: set[int]) -> int | None:
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i] in specials:
            return i
    return None


def no_end_of_turn(which: str) -> str:
    return (f"{which} is not followed by a special end-of-turn token (such as <|im_end|>, <|eot_id|> or "
            f"{{{{ eos_token }}}}), so the model could never learn to stop; use a template that ends assistant turns "
            f"with one")


def exchange_breaks(enc: Encoded, tokenizer, specials: set[int]) -> list[int]:
    """The next exchange begins after an assistant turn and the whitespace the template writes after
    it (ChatML's newline), so that cutting there leaves a rendering the template could have made."""
    breaks = []
    for _, end in enc.spans[:-1]:
        while end < len(enc.ids) and enc.ids[end] not in specials and not tokenizer.decode([enc.ids[end]]).strip():
            end += 1
        breaks.append(end)
    return breaks


def check_turn_ends(enc: Encoded, specials: set[int]) -> str | None:
    for n, (_, end) in enumerate(enc.spans):
        if enc.ids[end - 1] not in specials:
            return no_end_of_turn(f"assistant turn {n + 1} (as marked)")
    return None


def opening_lengths(conversations, ids: list[list[int] | None], tokenizer, template: str) -> list[int]:
    """Tokens truncation keeps at the start: the leading system message(s) rendered alone when that is
    a token prefix of the whole conversation, else BOS when the rendering starts with it, else none."""
    bos = tokenizer.bos_token_id
    lengths = [1 if i and bos is not None and i[0] == bos else 0 for i in ids]
    wanted = [c for c, conversation in enumerate(conversations)
              if ids[c] is not None and leading_system(conversation)]
    rendered = render(tokenizer, template, [leading_system(conversations[c]) for c in wanted], False)
    texts = [(c, t) for c, t in zip(wanted, rendered) if isinstance(t, str) and t]
    if texts:
        tokens = tokenizer([t for _, t in texts], add_special_tokens=False)["input_ids"]
        for (c, _), opening in zip(texts, tokens):
            if ids[c][: len(opening)] == opening and len(opening) < len(ids[c]):
                lengths[c] = len(opening)
    return lengths


def labels_of(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return labels


def truncate(enc: Encoded, seq_len: int) -> tuple[list[int], list[int], bool, bool]:
    """The truncation policy of the module docstring -> (input_ids, labels, context cut, last turn cut)."""
    labels = labels_of(enc.ids, enc.spans)
    keep, context_cut, turn_cut = kept_positions(len(enc.ids), enc.spans, enc.opening, enc.breaks, seq_len)
    return [enc.ids[i] for i in keep], [labels[i] for i in keep], context_cut, turn_cut


def kept_positions(n: int, spans: list[tuple[int, int]], opening: int, breaks: list[int],
                   seq_len: int) -> tuple[list[int], bool, bool]:
    """Which of a conversation's n positions survive truncation (its last span ends at n; exchange
    k + 1 begins at breaks[k])."""
    if n <= seq_len:
        return list(range(n)), False, False
    if opening > seq_len // 2:
        opening = 0
    starts = [opening] + list(breaks)  # where each exchange begins
    first = 0
    while first < len(spans) - 1 and opening + n - starts[first] > seq_len:
        first += 1
    if opening + n - starts[first] <= seq_len:
        return list(range(opening)) + list(range(starts[first], n)), True, False
    start, (answer_start, end) = starts[-1], spans[-1]
    budget = seq_len - opening
    context, answer = answer_start - start, end - answer_start
    keep_context = max(min(context, budget // 2), budget - answer)
    keep_answer = budget - keep_context  # >= 1: the last turn's start always survives
    keep = list(range(opening)) + list(range(answer_start - keep_context, answer_start + keep_answer))
    return keep, first > 0 or keep_context < context, keep_answer < answer
