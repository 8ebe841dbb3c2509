"""Throughput accounting, defined once: what a token is, how many FLOPs a step needs, MFU.

Three token counts, because the field does not agree on one:
  slot tokens        every position the model computes on, padding included (rows x row width)
  real tokens        positions holding a sample's token (not padding, not a filler row)
  supervised tokens  positions whose next token is a training target (labels != -100 after the shift)

Model FLOPs of one optimizer step (the only FLOP formula in the harness):

    flops = sum over Linear layers of 2 x in x out x (1 forward + 1 grad-of-input + 1 grad-of-weight if trained)
            x real tokens
          + 12 x n_layers x (n_heads x head_dim) x sum over samples of s_i^2

The first term is the familiar 6 N per token (N = parameters inside matmuls, lm_head included,
embedding lookups excluded: they are gathers, not matmuls); a frozen weight (LoRA's base) needs
no weight gradient, so it counts 4 x in x out. The second term is attention's two matmuls
(Q K^T and P V, 2 s^2 d each forward, twice that backward) over the full s x s square, the
PaLM paper's (appendix B) convention that published MFU figures use. s_i is each *sample's*
length: a packed row of three samples needs three small squares, not one big one, and padding
needs none. Recomputation by activation checkpointing is not useful work and is not counted.

On packed rows and with --chunked_ce the output head (lm_head) runs only on supervised positions
(harness.engine, harness.loss), so its term counts supervised tokens instead of real ones; chunked
CE's recomputation in backward is not counted, and neither is the one position the model's own
head still computes per row under --chunked_ce.

MFU = model FLOPs / (elapsed seconds x world size x peak FLOP/s per device). The peak table
holds dense (no sparsity) tensor-core figures from the vendors' datasheets; a device or dtype not
in it, the CPU included, gets no MFU and the run says so rather than guessing.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch

# (substring of torch.cuda.get_device_name(), dtype) -> dense peak FLOP/s per device.
# Order matters: the first match wins, so "H100 PCIe" precedes the generic (SXM) "H100".
PEAK_FLOPS = [
    ("H100 PCIe", "bf16", 756e12), ("H100 PCIe", "fp16", 756e12),
    ("H100", "bf16", 989.5e12), ("H100", "fp16", 989.5e12),  # SXM
    ("H200", "bf16", 989.5e12), ("H200", "fp16", 989.5e12),
    ("A100", "bf16", 312e12), ("A100", "fp16", 312e12),
]


def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, its name) or (None, why MFU is omitted)."""
    if device.type != "cuda":
        return None, f"MFU omitted: no peak FLOP/s for device type {device.type!r}"
    name = torch.cuda.get_device_name(device)
    for key, key_dtype, value in PEAK_FLOPS:
        if key in name and key_dtype == dtype:
            return value, name
    return None, f"MFU omitted: no peak FLOP/s known for {name!r} in {dtype} (harness.throughput.PEAK_FLOPS)"


@dataclass(frozen=True)
class FlopModel:
    """What the FLOP formula needs from a model: read once from the built module."""

    linear_flops_per_token: int  # sum over Linear layers of 2 x in x out x (3 if trained else 2), head included
    n_layers: int
    attn_width: int  # n_heads x head_dim: the width of Q (and of the attention output)
    head_flops_per_token: int = 0  # the output head's part of linear_flops_per_token
    head_on_supervised_only: bool = False  # packed rows, --chunked_ce: the head runs on supervised positions only

    def step_flops(self, real_tokens: int, sample_lengths, supervised_tokens: int | None = None) -> float:
        head_tokens = supervised_tokens if self.head_on_supervised_only else real_tokens
        linear = (self.linear_flops_per_token - self.head_flops_per_token) * real_tokens \
            + self.head_flops_per_token * head_tokens
        attention = 12 * self.n_layers * self.attn_width * sum(s * s for s in sample_lengths)
        return float(linear + attention)


def flop_model(module: torch.nn.Module, head_on_supervised: bool = False) -> FlopModel:
    """`head_on_supervised`: the head runs on supervised positions only (packed rows, --chunked_ce;
    see harness.engine), so only those count for it; recomputation in backward does not."""
    per_token = head = 0
    output = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            passes = 3 if m.weight.requires_grad else 2
            flops = 2 * m.in_features * m.out_features * passes
            per_token += flops
            if m is output:
                head = flops
    cfg = module.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return FlopModel(per_token, cfg.num_hidden_layers, cfg.num_attention_heads * head_dim, head,
                     head_on_supervised and head > 0)


def sample_lengths(batch: dict) -> list[int]:
    """Each sample's real length: one per padded row, the host-side lengths of a packed row."""
    if "seq_lens" in batch:
        return list(batch["seq_lens"])
    return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]


@dataclass
class StepTokens:
    slots: int = 0
    real: int = 0
    supervised: int = 0
    flops: float = 0.0


def count_tokens(micro_batches: list[dict], fm: FlopModel, supervised) -> StepTokens:
    """Counts of micro-batches read from their tensors; `supervised` is harness.loss.supervised_tokens.
    (The training loop gets its counts from the data on the host instead: harness.batches.StepData.)"""
    t = StepTokens()
    for b in micro_batches:
        lengths = sample_lengths(b)
        n_supervised = supervised(b["labels"])
        t.slots += b["input_ids"].numel()
        t.real += sum(lengths)
        t.supervised += n_supervised
        t.flops += fm.step_flops(sum(lengths), lengths, n_supervised)
    return t


PHASES = ("data", "forward", "backward", "optimizer", "checkpoint")


class StepTimer:
    """Wall time per phase of a step, without adding synchronisation on the GPU.

    On CUDA the phases are bracketed with CUDA events, which the GPU timestamps as it reaches
    them; they are read only in `take()`, when a log line is written, which follows the step's
    loss all-reduce, the step's existing sync point. A host-side clock would measure only the
    time to queue kernels. On the CPU every op is synchronous, so perf_counter is exact.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = {p: 0.0 for p in PHASES}
        self._pending: list[tuple[str, object, object]] = []

    def start(self, phase: str):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return (phase, ev)
        return (phase, time.perf_counter())

    def stop(self, token) -> None:
        phase, begin = token
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((phase, begin, end))
        else:
            self.totals[phase] += time.perf_counter() - begin

    def collect(self) -> None:
        for phase, begin, end in self._pending:
            end.synchronize()
            self.totals[phase] += begin.elapsed_time(end) / 1000.0
        self._pending = []

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last take(), keyed time_<phase>_s."""
        self.collect()
        out = {f"time_{p}_s": v for p, v in self.totals.items()}
        self.totals = {p: 0.0 for p in PHASES}
        return out


class NullTimer:
    """Stands in where no breakdown is wanted (evaluation, tests calling the engine directly)."""

    def start(self, phase: str):
        return None

    def stop(self, token) -> None:
        pass


NULL_TIMER = NullTimer()


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak device memory on CUDA; on the CPU, the process's peak resident set, named as such."""
    if device.type == "cuda":
        return {"peak_device_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is in KiB on Linux: the whole process, weights, optimizer and Python included.
    return {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@dataclass
class Window:
    """Sums over the steps since the last log line; `record` converts them to rates."""

    world_size: int
    peak: float | None
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: StepTokens = field(default_factory=StepTokens)

    def add(self, step: StepTokens) -> None:
        self.steps += 1
        self.tokens.slots += step.slots
        self.tokens.real += step.real
        self.tokens.supervised += step.supervised
        self.tokens.flops += step.flops

    def record(self) -> dict[str, float]:
        """Rates over the window (all ranks' tokens: the step counts are already all-reduced)."""
        elapsed = time.perf_counter() - self.start
        t = self.tokens
        out = {"tokens_per_s": t.real / elapsed, "slot_tokens_per_s": t.slots / elapsed,
               "supervised_tokens_per_s": t.supervised / elapsed,
               "padding_efficiency": t.real / t.slots if t.slots else 0.0,
               "model_tflops_per_s": t.flops / elapsed / 1e12}
        if self.peak:
            out["mfu"] = t.flops / (elapsed * self.world_size * self.peak)
        return out

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something other than training (evaluation) out of the rates."""
        self.start += seconds

    def reset(self) -> None:
        self.start, self.steps, self.tokens = time.perf_counter(), 0, StepTokens()
