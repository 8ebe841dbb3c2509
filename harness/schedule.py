"""Learning-rate schedule: linear warmup from 0, then cosine, linear or constant.

`lr_factor(step)` multiplies the peak LR; step is the number of optimizer steps already taken,
so the first update uses factor(0). With warmup_steps = W > 0 the first update uses lr/W ... up
to lr at step W-1; with W = 0 the first update uses the full lr (DeepSpeed's own schedulers
would force a 2-step warmup here).
"""

from __future__ import annotations

import math
from functools import partial

from harness.config import TrainConfig


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total)


def lr_factor(step: int, *, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def lr_lambda(cfg: TrainConfig, total: int):
    return partial(lr_factor, schedule=cfg.lr_schedule, warmup=warmup_steps(cfg, total),
                   total=total, min_ratio=cfg.min_lr_ratio)
