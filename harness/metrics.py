"""Run-directory logging: metrics.jsonl, TensorBoard and the progress bar, on rank 0 only.

Non-zero ranks get the same object with every method a no-op, so the training loop never
checks ranks itself. A context manager: leaving it, however the run ends, flushes and closes
every file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        self._jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)
        # purge_step hides events a resumed run is about to log again.
        self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def progress(self, steps: int, loss: float, rates: dict) -> None:
        """`rates` is harness.throughput.Window.record(): real tokens/s, padding efficiency, MFU."""
        if self.enabled:
            self._bar.update(steps)
            shown = {"loss": f"{loss:.4f}", "tok_s": f"{rates['tokens_per_s']:,.0f}",
                     "pad_eff": f"{rates['padding_efficiency']:.0%}"}
            if "mfu" in rates:
                shown["mfu"] = f"{rates['mfu']:.1%}"
            self._bar.set_postfix(shown)

    def write(self, message: str) -> None:
        if self.enabled:
            self._bar.write(message)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._jsonl.close()
