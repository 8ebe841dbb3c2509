"""Instruction tuning on Alpaca-style rows: instruction, optional input, output.

The prompt is the template rendered with the row's fields; the target is the output. The
default template is Stanford Alpaca's, with its two variants for rows with and without input.
A custom `--template` is one format string; `{input}` renders as "" where a row has none.
"""

from __future__ import annotations

from harness.config import TrainConfig
from harness.errors import HarnessError
from harness.tasks.common import Example, check_placeholders, name_rows

NAME = "instruction"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
DEFAULT_TEMPLATE = PROMPT_WITH_INPUT
EVAL_MODE = "loss"  # open-ended responses: eval loss / perplexity is the metric
METRICS = ()
MAIN_METRIC = "loss"


def examples(rows, cfg: TrainConfig, template: str = "") -> list[Example]:
    """Turn rows (a datasets.Dataset or a list of dicts) into examples, or name every bad row."""
    if template:
        check_placeholders(template, {"instruction", "input"})
    fields = (cfg.instruction_field, cfg.input_field, cfg.output_field)
    columns = set(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else ()))
    for required in (cfg.instruction_field, cfg.output_field):
        if columns and required not in columns:
            raise HarnessError(f"data has no field {required!r} (fields: {sorted(columns)}); "
                               f"use --{'instruction' if required == cfg.instruction_field else 'output'}_field to name it")

    out: list[Example] = []
    missing: list[int] = []
    empty_output: list[int] = []
    for i, row in enumerate(rows):
        instruction, inp, output = (row.get(f) for f in fields)
        if not isinstance(instruction, str) or not instruction.strip() or not isinstance(output, str):
            missing.append(i)
            continue
        if not output.strip():
            empty_output.append(i)
            continue
        inp = inp if isinstance(inp, str) else ""
        if template:
            prompt = template.format(instruction=instruction, input=inp)
        else:
            prompt = (PROMPT_WITH_INPUT if inp.strip() else PROMPT_NO_INPUT).format(instruction=instruction, input=inp)
        out.append(Example(row=i, prompt=prompt, target=output))
    problems = []
    if missing:
        problems.append(f"{name_rows(missing)}: field {cfg.instruction_field!r} or {cfg.output_field!r} "
                        f"is missing, empty or not text")
    if empty_output:
        problems.append(f"{name_rows(empty_output)}: field {cfg.output_field!r} is empty (nothing to learn)")
    if problems:
        raise HarnessError("bad rows in the data:\n  " + "\n  ".join(problems))
    return out
