"""Benchmark the harness against transformers.Trainer with the same DeepSpeed config; one JSON + a table.

    python launch/benchmark.py --data $DATA/alpaca_subset_2k --max_steps 30 --repeats 2 --output bench/cpu.json
    python launch/benchmark.py --model /models/llama-3.2-1b --data train.jsonl --dtype bf16 --ds_config zero2
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing

import fire  # noqa: E402

from harness.cli import command  # noqa: E402
from harness.config import BenchConfig  # noqa: E402


def benchmark(cfg: BenchConfig) -> None:
    from harness.benchmark import run  # torch, deepspeed, transformers load only after the flags parse

    run(cfg)


if __name__ == "__main__":
    fire.Fire(command(BenchConfig, benchmark, __doc__.strip().splitlines()[0]))
