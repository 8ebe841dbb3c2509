"""Estimate per-GPU and per-host memory of each ZeRO stage x offload choice, and recommend one.

    python launch/plan.py --model /models/llama-2-7b --world_size 1 --gpu_gib 80 --host_gib 128
    python launch/plan.py --model_config '{"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}'
    python launch/train.py --ds_config auto ...     # the same planner, on the machine it runs on
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable without installing

import fire  # noqa: E402

from harness.cli import command  # noqa: E402
from harness.config import PlanConfig  # noqa: E402


def plan(cfg: PlanConfig) -> None:
    from harness.memory_plan import plan as run_plan  # torch, deepspeed, transformers load only after the flags parse

    print(run_plan(cfg)[1])


if __name__ == "__main__":
    fire.Fire(command(PlanConfig, plan, __doc__.strip().splitlines()[0]))
