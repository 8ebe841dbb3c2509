"""Tasks: how a data row becomes a (prompt, target) pair. One module per task.

A task module provides `NAME`, `DEFAULT_TEMPLATE`, and
`examples(rows, cfg, template) -> list[Example]`, raising `HarnessError` that names the bad
rows, and its metric: `EVAL_MODE` (loss, labels or generate), `METRICS`, `MAIN_METRIC` and
`compute_metrics(predictions, examples, cfg) -> (metrics, details)` (see harness.evaluation).
Adding a task means adding one module to this package: it is found by its file.

Optional hooks, for a task whose row is not one (prompt, target) pair (task=chat):
`setup_tokenizer(cfg, tokenizer)` (preflight, before any data is read), `cache_key(cfg)` and
`MASKING_POLICY` (tokenization cache key), `tokenize_examples(examples, cfg, tokenizer, seq_len,
num_proc)` (instead of harness.data's prompt/target tokenization, same columns) and
`eval_tokens(examples, cfg, tokenizer, seq_len, room)` (eval loss rows, generation prompts, stop ids).
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


def setup_tokenizer(task: ModuleType, cfg, tokenizer) -> None:
    """The task's tokenizer setup, if it has one (task=chat: the chat template the run uses)."""
    if hasattr(task, "setup_tokenizer"):
        task.setup_tokenizer(cfg, tokenizer)
