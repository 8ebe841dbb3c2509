"""Evaluate a model on a task's data: metrics JSON and predictions JSONL. Flags: harness.config.EvalConfig.

    python launch/evaluate.py --model runs/exp1/best --task classification --labels negative,positive \
        --text_field sentence --data $DATA/sst2/dev.tsv --output_dir runs/exp1/eval-sst2
    torchrun --nproc_per_node 2 launch/evaluate.py --ds_config zero3 ...   # same flags, same metrics
    deepspeed --num_gpus 8 launch/evaluate.py ...
    python launch/evaluate.py --help                                     # every flag with its doc
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing

import fire  # noqa: E402

from harness.cli import command  # noqa: E402
from harness.config import EvalConfig  # noqa: E402


def evaluate(cfg) -> None:
    from harness.evaluation import run  # torch, deepspeed, transformers load only after the flags parse

    run(cfg)


if __name__ == "__main__":
    fire.Fire(command(EvalConfig, evaluate, __doc__.strip().splitlines()[0]))
