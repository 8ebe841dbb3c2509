"""Fine-tune a causal LM with DeepSpeed. Every flag is a field of harness.config.TrainConfig.

    python launch/train.py --output_dir runs/demo                  # embedded tiny default, 1 process
    deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/zero3.json \
        --model /models/llama-3.2-1b --data train.jsonl --output_dir runs/exp1
    torchrun --nproc_per_node 8 launch/train.py --ds_config zero3 ...   # same flags
    python launch/train.py --help                                  # every flag with its doc
"""

import os
import sys
from pathlib import Path

# Nothing is ever fetched from the hub at run time; tokenizers' own thread pool fights with
# the ranks for cores and warns after fork.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing

import fire  # noqa: E402

from harness.cli import command  # noqa: E402
from harness.config import TrainConfig  # noqa: E402


def train(cfg: TrainConfig) -> None:
    from harness.train import run  # torch, deepspeed, transformers load only after the flags parse

    run(cfg)


if __name__ == "__main__":
    fire.Fire(command(TrainConfig, train, __doc__.strip().splitlines()[0]))
