"""Pieces every task shares: the Example record, template loading and rendering."""

from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

MAX_ROWS_NAMED = 10  # error messages list at most this many row indices


@dataclass(frozen=True)
class Example:
    row: int  # index of the source row, for error messages and reports
    prompt: str  # never trained on: its tokens are masked with -100
    target: str  # trained on, followed by EOS
    golds: tuple[str, ...] = ()  # references the metric compares predictions with (QA: every gold answer)


def load_template(value: str) -> str:
    """`--template` is either the template itself or a path to a file holding it."""
    if not value or "{" in value:
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text()
    raise HarnessError(f"--template {value!r} has no {{field}} placeholder and is not a file")


def placeholders(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise HarnessError(f"--template is not a valid format string: {err}") from None


def check_placeholders(template: str, allowed: set[str]) -> None:
    names = placeholders(template)
    if "" in names or any(not n.isidentifier() for n in names):
        raise HarnessError("--template placeholders must be names like {instruction}, not {} or {0}")
    unknown = names - allowed
    if unknown:
        raise HarnessError(f"--template uses unknown placeholder(s) {sorted(unknown)}; "
                           f"available: {sorted(allowed)}")


def name_rows(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_ROWS_NAMED])
    more = f" and {len(rows) - MAX_ROWS_NAMED} more" if len(rows) > MAX_ROWS_NAMED else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


@contextlib.contextmanager
def errors_about(source: str):
    """Name the flag and file (e.g. "--eval_data dev.jsonl") in a HarnessError raised inside that
    does not name it already: a task's "bad rows" message does not know which file it read."""
    try:
        yield
    except HarnessError as err:
        if str(err).startswith(source.split(" ", 1)[0] + " "):
            raise
        raise type(err)(f"{source}: {err}") from None
