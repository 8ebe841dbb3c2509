"""Tasks: how a data row becomes a (prompt, target) pair. One module per task.

A task module provides `NAME`, `DEFAULT_TEMPLATE`, and
`examples(rows, cfg, template) -> list[Example]`, raising `HarnessError` that names the bad
rows, and its metric: `EVAL_MODE` (loss, labels or generate), `METRICS`, `MAIN_METRIC` and
`compute_metrics(predictions, examples, cfg) -> (metrics, details)` (see harness.evaluation).
Adding a task means adding one module to this package: it is found by its file.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from harness.errors import HarnessError

_NOT_TASKS = {"common"}
TASKS: dict[str, ModuleType] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_TASKS:
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        TASKS[_module.NAME] = _module


def get(name: str) -> ModuleType:
    try:
        return TASKS[name]
    except KeyError:
        raise HarnessError(f"--task {name!r} is not one of {', '.join(TASKS)}") from None
