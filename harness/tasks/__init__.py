"""Tasks: how a data row becomes a (prompt, target) pair. One module per task.

A task module provides `NAME`, `DEFAULT_TEMPLATE`, and
`examples(rows, cfg, template) -> list[Example]`, raising `HarnessError` that names the bad
rows. Adding a task means adding one module and one line in `TASKS`.
"""

from __future__ import annotations

from types import ModuleType

from harness.errors import HarnessError
from harness.tasks import instruction

TASKS: dict[str, ModuleType] = {instruction.NAME: instruction}


def get(name: str) -> ModuleType:
    try:
        return TASKS[name]
    except KeyError:
        raise HarnessError(f"--task {name!r} is not one of {', '.join(TASKS)}") from None
