"""launch/train.py under a GPU memory cap, with a memory monitor and an optional profiler.

    GPU_MEM_CAP_GIB=80 PEAKS_OUT=peaks.json python scripts/gpu/train_wrapped.py --model M --data D ...
    PROFILE_STEPS=15:3 PROFILE_OUT=profile.txt python scripts/gpu/train_wrapped.py --model M --data D ...

Every argument is launch/train.py's; the wrapper only reads these environment variables, so the
harness itself knows nothing about them:

  GPU_MEM_CAP_GIB  torch.cuda.set_per_process_memory_fraction(cap / the card's memory) before
                   anything is allocated: on a 141 GB H200 the run sees an 80 GiB card, and an
                   allocation past the cap fails as it would there. Ignored (and said so) without CUDA.
  PEAKS_OUT        a JSON file rewritten every second while the run lives (a timeout loses nothing):
                   peak resident set of this process, peak host memory in use on the machine
                   (MemTotal - MemAvailable, pinned DeepSpeed buffers included), CUDA
                   max_memory_allocated / max_memory_reserved, the cap.
  (none)           a model folder written by `make_model.py --weights False` (config, tokenizer and
                   one placeholder tensor) loads with every weight initialised by the model's own
                   init: the harness refuses a load with missing weights (they would start random
                   unnoticed), and this wrapper lets exactly that kind of folder through
                   (`random_init_check`), saying so. Every other folder is checked as the harness does.
  PROFILE_STEPS    S:N - with PROFILE_OUT set, torch.profiler records optimizer steps S+1 .. S+N
                   (step S warms it up); PROFILE_OUT receives the device kernels by total time, the time per category
                   (matmul, attention, loss, normalisation, optimizer, communication, copies, other),
                   and how busy the device was between the first and last kernel. The steps are
                   counted by wrapping harness.engine.Engine.optimizer_step.
"""

from __future__ import annotations

import json
import os
import re
import resource
import runpy
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))  # the harness, without installing it
GiB = 2**30
PLACEHOLDER_KEY = "random_init_placeholder"  # the one tensor of a make_model.py --weights False folder
CATEGORIES = [  # first match wins; kernel names are lower-cased
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|matmul|\bmm\b|addmm|linear"),
    ("attention", r"flash|fmha|attention|attn|sdpa|efficient"),
    ("loss (log-softmax, cross-entropy)", r"softmax|cross_entropy|nll"),
    ("normalisation", r"rms|norm"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("communication", r"nccl|all_reduce|allreduce|reduce_scatter|all_gather|allgather"),
    ("copies, fills, casts", r"memcpy|memset|copy|fill|cat_|\bcat\b|to_copy|convert"),
]


def cap_gpu_memory() -> str:
    cap = os.environ.get("GPU_MEM_CAP_GIB")
    if not cap:
        return ""
    if not torch.cuda.is_available():
        return f"GPU_MEM_CAP_GIB={cap} ignored: no CUDA device"
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, float(cap) * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return f"GPU memory capped at {cap} GiB: fraction {fraction:.4f} of {total / GiB:.1f} GiB"


def placeholder_only(path: str) -> bool:
    """Whether the model folder's only tensor is make_model.py's placeholder (a folder without weights)."""
    keys = set()
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys == {PLACEHOLDER_KEY}


def random_init_check(check):
    """harness.model.check_load_report, except for a folder without weights (see the module doc):
    there every weight is missing by design and the placeholder is the one unexpected tensor."""

    def check_load_report(path: str, report: dict) -> None:
        unexpected = [k for k in report.get("unexpected_keys") or () if k != PLACEHOLDER_KEY]
        if (placeholder_only(path) and not unexpected and not report.get("mismatched_keys")
                and not report.get("error_msgs")):
            print(f"{path}: no weights (make_model.py --weights False): every weight initialised randomly by the "
                  f"model's init", flush=True)
            return
        check(path, report)

    return check_load_report


def host_used_bytes() -> int:
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    return info["MemTotal"] - info["MemAvailable"]


class Peaks(threading.Thread):
    """Samples memory every 0.5 s and rewrites PEAKS_OUT every second."""

    def __init__(self, path: Path, note: str):
        super().__init__(daemon=True)
        self.path, self.note = path, note
        self.host_used_start = host_used_bytes()
        self.peak = {"host_used_peak_gib": 0.0, "host_rss_peak_gib": 0.0}

    def sample(self) -> None:
        self.peak["host_used_peak_gib"] = max(self.peak["host_used_peak_gib"], host_used_bytes() / GiB)
        self.peak["host_rss_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(0) / GiB
            self.peak["gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved(0) / GiB

    def write(self) -> None:
        out = {**self.peak, "host_used_at_start_gib": self.host_used_start / GiB, "note": self.note,
               "gpu_cap_gib": float(os.environ["GPU_MEM_CAP_GIB"]) if os.environ.get("GPU_MEM_CAP_GIB") else None}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out) + "\n")
        tmp.replace(self.path)

    def run(self) -> None:
        while True:
            for _ in range(2):
                self.sample()
                time.sleep(0.5)
            self.write()


def category(name: str) -> str:
    low = name.lower()
    return next((label for label, pattern in CATEGORIES if re.search(pattern, low)), "other")


def device_time(event) -> float:
    """Self device time in microseconds (the attribute's name changed across torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def kernel_rows(averages) -> tuple[list[tuple[str, int, float]], bool]:
    """(name, calls, self microseconds) of the device kernels in prof.key_averages(), and True; on a
    CPU-only run the CPU operators by their own CPU time, and False.

    Only events whose device_type is CUDA: a CPU operator's self_device_time_total is the time of
    the kernels it launched, which are events of their own, so counting both would count twice.
    """
    events = [e for e in averages if not e.key.startswith("ProfilerStep")]  # step markers, not work
    kernels = [(e.key, e.count, device_time(e)) for e in events
               if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and device_time(e) > 0]
    if kernels:
        return kernels, True
    return [(e.key, e.count, float(e.self_cpu_time_total)) for e in events if e.self_cpu_time_total > 0], False


def busy_share(spans: list[tuple[float, float]]) -> tuple[float, float]:
    """(time covered by at least one kernel, first start to last end) of kernel (start, end) spans."""
    spans = sorted(spans)
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy, cur_start, cur_end = busy + cur_end - cur_start, start, end
        else:
            cur_end = max(cur_end, end)
    return busy + cur_end - cur_start, max(end for _, end in spans) - spans[0][0]


def kernel_table(rows: list[tuple[str, int, float]], on_device: bool, steps: int,
                 spans: list[tuple[float, float]]) -> list[str]:
    """The profile as text: time per category, the device's busy share, the top kernels."""
    total = sum(t for _, _, t in rows) or 1.0
    lines = [f"torch.profiler, {steps} optimizer steps, {'device kernels' if on_device else 'CPU operators (no CUDA)'}: "
             f"{total / 1e3:,.1f} ms in all, {total / 1e3 / steps:,.1f} ms per step", ""]
    per_category: dict[str, float] = {}
    for name, _, t in rows:
        per_category[category(name)] = per_category.get(category(name), 0.0) + t
    lines += ["| category | ms per step | share |", "| --- | --- | --- |"]
    lines += [f"| {c} | {t / 1e3 / steps:,.2f} | {t / total:.1%} |"
              for c, t in sorted(per_category.items(), key=lambda kv: -kv[1])]
    if spans:
        busy, span = busy_share(spans)
        lines += ["", f"device busy {busy / span:.1%} of the {span / 1e3:,.1f} ms from the first kernel to the "
                      f"last (the rest: the device waited for the host)"]
    lines += ["", "| kernel | calls | ms per step | share | category |", "| --- | --- | --- | --- | --- |"]
    for name, calls, t in sorted(rows, key=lambda r: -r[2])[:30]:
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| {short.replace('|', '/')} | {calls} | {t / 1e3 / steps:,.3f} | {t / total:.1%} | "
                     f"{category(name)} |")
    return lines


def profile_table(prof, steps: int, path: Path) -> None:
    rows, on_device = kernel_rows(prof.key_averages())
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and device_time(e) > 0]
    lines = kernel_table(rows, on_device, steps, spans)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:16]), flush=True)


def start_profiler():
    # Both or nothing: run_checks.sh exports PROFILE_STEPS to every step, and only the step that
    # names a PROFILE_OUT is profiled (no table lands in the working folder by default).
    spec, out = os.environ.get("PROFILE_STEPS"), os.environ.get("PROFILE_OUT")
    if not (spec and out):
        return None
    skip, steps = (int(x) for x in spec.split(":"))
    out = Path(out)
    from harness import engine  # the wrapped verb; importing it first changes nothing in the run

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=max(0, skip - 1), warmup=1 if skip else 0, active=steps, repeat=1),
        on_trace_ready=lambda p: profile_table(p, steps, out))
    step = engine.Engine.optimizer_step

    def optimizer_step(self, *args, **kwargs):
        updated = step(self, *args, **kwargs)
        prof.step()
        return updated

    engine.Engine.optimizer_step = optimizer_step
    prof.start()
    return prof


def main() -> None:
    note = cap_gpu_memory()
    if note:
        print(note, flush=True)
    peaks = None
    if os.environ.get("PEAKS_OUT"):
        peaks = Peaks(Path(os.environ["PEAKS_OUT"]), note)
        peaks.start()
    from harness import model as model_mod  # the wrapped check; importing it first changes nothing in the run

    model_mod.check_load_report = random_init_check(model_mod.check_load_report)
    prof = start_profiler()
    sys.argv = [str(ROOT / "launch" / "train.py"), *sys.argv[1:]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        if prof is not None:
            prof.stop()
        if peaks is not None:
            peaks.sample()
            peaks.write()


if __name__ == "__main__":
    main()
