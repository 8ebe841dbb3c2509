"""Tokenize a data file ahead of time (CPU only) into a folder launch/train.py --data accepts.

    python launch/prepare_data.py --data train.jsonl --output data/train.prepared \
        --model /models/llama-3.2-1b --seq_len 2048
    deepspeed launch/train.py --data data/train.prepared --model /models/llama-3.2-1b --seq_len 2048 ...
    python launch/prepare_data.py --task classification --labels negative,positive --text_field sentence \
        --data train.tsv --output data/sst2.prepared     # every task and field flag of training
    python launch/prepare_data.py --help         # every flag with its doc
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing

import fire  # noqa: E402

from harness.cli import command  # noqa: E402
from harness.config import PrepareConfig  # noqa: E402


def prepare_data(cfg: PrepareConfig) -> None:
    from harness.prepare import prepare  # torch, datasets, transformers load only after the flags parse

    prepare(cfg)


if __name__ == "__main__":
    fire.Fire(command(PrepareConfig, prepare_data, __doc__.strip().splitlines()[0]))
