"""Export a training checkpoint (ZeRO-2 or ZeRO-3, any world size) as a Hugging Face folder.

    python launch/export.py runs/exp1/checkpoints/step-1000 exported/exp1
    python launch/export.py runs/exp1 exported/exp1 --dtype bf16    # a run directory: its newest checkpoint
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing

import fire  # noqa: E402

from harness.cli import command  # noqa: E402
from harness.config import ExportConfig  # noqa: E402


def export(cfg: ExportConfig) -> None:
    from harness.export import export as run_export  # torch, deepspeed, transformers load only after the flags parse

    run_export(cfg)


if __name__ == "__main__":
    fire.Fire(command(ExportConfig, export, __doc__.strip().splitlines()[0], positional=("checkpoint", "out")))
