"""python-fire over a config dataclass: the dataclass fields are the flags.

`command(TrainConfig, run, doc)` returns a function whose keyword arguments (signature and
docstring) are generated from the dataclass, so `--help` lists every flag with its doc, and
python-fire rejects unknown flags because the function takes no `**kwargs`.

This is also where exceptions become exit statuses (the library never calls sys.exit):
`HarnessError` and its subclasses print `error: ...` on a line of its own and exit with their
`exit_code`; `RequeueRequested` exits 75 quietly, the loop having logged which checkpoint it
saved; a Ctrl-C outside training (e.g. while the libraries import) exits 130 with one line.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from typing import Callable

from tqdm import tqdm

from harness.errors import HarnessError, RequeueRequested


def command(config_cls, run: Callable, summary: str, positional: tuple[str, ...] = ()) -> Callable:
    """`positional` names fields that may also be given as bare words, in that order."""
    fields = dataclasses.fields(config_cls)
    names = {f.name for f in fields}

    def main(*args, **flags):
        try:
            _check_argv(names, len(positional))
            flags.update(zip(positional, args))
            flags.update(_raw_text_flags({f.name for f in fields if f.type in (str, "str")}))
            run(config_cls(**flags))
        except RequeueRequested as stop:
            sys.exit(stop.exit_code)
        except HarnessError as err:
            print_error(str(err))
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print_error("interrupted (Ctrl-C)")
            sys.exit(130)

    main.__signature__ = inspect.Signature(
        [
            inspect.Parameter(f.name,
                              inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name in positional else inspect.Parameter.KEYWORD_ONLY,
                              default=f.default, annotation=f.type)
            for f in sorted(fields, key=lambda f: f.name not in positional)
        ]
    )
    args = "\n".join(f"    {f.name}: {f.metadata.get('doc', '')}" for f in fields)
    main.__doc__ = f"{summary}\n\nArgs:\n{args}\n"
    main.__name__ = run.__name__
    return main


def print_error(message: str) -> None:
    """`error: ...` on a line of its own, never after a progress bar's last frame: tqdm.write clears
    this process's open bars first. Another rank's bar may hold the terminal's current line (all
    ranks write to it): there the error starts with a line break."""
    line = f"error: {message}"
    if getattr(tqdm, "_instances", None):
        tqdm.write(line, file=sys.stderr)
        sys.stderr.flush()
        return
    if os.environ.get("RANK", "0") != "0":
        line = "\n" + line
    print(line, file=sys.stderr, flush=True)


def _check_argv(names: set[str], n_positional: int = 0) -> None:
    """Refuse unknown flags and stray words before any work starts.

    python-fire reports an argument it could not consume only *after* calling the function,
    which for a training run would be hours too late.
    """
    args = sys.argv[1:]
    bare = 0
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            if name not in names:
                raise HarnessError(f"unknown flag --{name}; see --help for the list")
        elif not (i > 0 and args[i - 1].startswith("--") and "=" not in args[i - 1]):
            bare += 1
            if bare > n_positional:
                raise HarnessError(f"unexpected argument {arg!r}: every option is a --flag")


def _raw_text_flags(text_names: set[str]) -> dict[str, str]:
    """Text flags exactly as typed: python-fire parses every value as a Python literal, so
    `--template "{instruction}"` would arrive as a set and `--labels a,b` as a tuple."""
    args, raw = sys.argv[1:], {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in text_names:
            continue
        if eq:
            raw[name] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw[name] = args[i + 1]
    return raw
