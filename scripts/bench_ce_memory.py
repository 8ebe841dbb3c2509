"""Peak memory and time of the training loss for a large vocabulary: plain CE vs --chunked_ce N.

    PYTHONPATH=. python scripts/bench_ce_memory.py                                  # CUDA if present, else CPU
    PYTHONPATH=. python scripts/bench_ce_memory.py --device cpu --chunks 0,1024,4096 --out ce.jsonl

The setting of the 1B GPU benchmark's loss: one packed row of --seq_len 4096 tokens, hidden 2048,
a 128,256-word head (Llama-3.2-1B's), bf16 weights and hidden states, about a third of the
positions masked (-100, the prompts). Measured for each variant is the loss's forward and
backward, from the final hidden states (which require grad, as in the model) to the gradients of
the hidden states and of the head's weight:

  chunk 0 (plain)  logits = lm_head(hidden); harness.loss.token_loss_sum(logits, labels): the
                   engine's path without --chunked_ce (the logits are upcast to fp32 in the loss)
  chunk N          harness.loss.chunked_token_loss_sum(hidden, lm_head, labels, N): --chunked_ce N

Peak memory is what the loss adds above the inputs (hidden states, head weight, labels), the two
gradients it produces included:
  CUDA  torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated
        before; each variant runs once to warm up, then --repeats times (time: median of CUDA events).
  CPU   each variant in a fresh process; the peak resident set (VmHWM, reset through
        /proc/self/clear_refs once the inputs exist) minus the resident set at that moment. With
        glibc's mmap threshold fixed at 1 MiB every larger block goes back to the OS when freed, so
        the resident set follows the live tensors.
One JSON line per variant is printed (and appended to --out), then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness.labels import IGNORE_INDEX
from harness.loss import chunked_token_loss_sum, token_loss_sum

GiB = 2**30


def inputs(seq_len: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False, device="meta")
    head.weight = torch.nn.Parameter((torch.randn(vocab, hidden, generator=g) * 0.02).to(device=device, dtype=dtype))
    h = torch.randn(1, seq_len, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, seq_len), generator=g)
    # Samples of 200-800 tokens whose first ~third (the prompt) is masked, as in packed instruction rows.
    pos = 0
    while pos < seq_len:
        n = int(torch.randint(200, 800, (1,), generator=g))
        labels[0, pos:pos + n // 3] = IGNORE_INDEX
        pos += n
    return head, h, labels.to(device)


def loss_fn(chunk: int):
    if chunk == 0:
        return lambda h, head, labels: token_loss_sum(head(h), labels)
    return lambda h, head, labels: chunked_token_loss_sum(h, head, labels, chunk)


def fwd_bwd(fn, h, head, labels) -> float:
    h.grad = head.weight.grad = None
    loss = fn(h, head, labels)
    loss.backward()
    return float(loss)


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_cpu(args, chunk: int) -> dict:
    """One variant in this (fresh) process."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    head, h, labels = inputs(args.seq_len, args.hidden, args.vocab, getattr(torch, args.dtype), torch.device("cpu"))
    fn = loss_fn(chunk)
    base = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current resident set
    start = time.perf_counter()
    loss = fwd_bwd(fn, h, head, labels)
    seconds = time.perf_counter() - start
    return {"peak_gib": (rss_bytes("VmHWM") - base) / GiB, "seconds": seconds, "loss": loss,
            "grads_gib": (h.numel() + head.weight.numel()) * h.element_size() / GiB,
            "supervised": int((labels[:, 1:] != IGNORE_INDEX).sum())}


def measure_cuda(args, chunk: int, head, h, labels) -> dict:
    fn = loss_fn(chunk)
    fwd_bwd(fn, h, head, labels)  # warm-up: cuBLAS workspaces, kernel selection
    h.grad = head.weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fwd_bwd(fn, h, head, labels)
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(args.repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fwd_bwd(fn, h, head, labels)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000)
    return {"peak_gib": peak / GiB, "seconds": statistics.median(times), "loss": loss,
            "grads_gib": (h.numel() + head.weight.numel()) * h.element_size() / GiB,
            "supervised": int((labels[:, 1:] != IGNORE_INDEX).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--chunks", default="0,1024,4096", help="comma-separated --chunked_ce values; 0 is the plain loss")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant on CUDA (median)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default="", help="append one JSON line per variant to this file")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a CPU variant's own process
    args = p.parse_args()

    if args.one is not None:
        print(json.dumps(measure_cpu(args, args.one)))
        return
    chunks = [int(c) for c in args.chunks.split(",")]
    setting = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "seq_len": args.seq_len,
               "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    results = []
    if args.device == "cuda":
        head, h, labels = inputs(args.seq_len, args.hidden, args.vocab, getattr(torch, args.dtype), torch.device("cuda"))
    for chunk in chunks:
        if args.device == "cuda":
            figures = measure_cuda(args, chunk, head, h, labels)
        else:
            argv = [sys.executable, __file__, "--one", str(chunk), *sys.argv[1:]]
            # A fixed mmap threshold: glibc then returns every block above 1 MiB to the OS when it is
            # freed (its default threshold grows to 32 MiB and keeps such blocks on the heap).
            proc = subprocess.run(argv, capture_output=True, text=True,
                                  env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
            if proc.returncode != 0:
                sys.exit(f"error: the chunk {chunk} variant failed:\n{proc.stderr[-3000:]}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({**setting, "chunked_ce": chunk, **figures})
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    plain = next((r for r in results if r["chunked_ce"] == 0), None)
    print(f"\nloss forward+backward, {setting['device']}, {args.dtype}, seq_len {args.seq_len}, hidden {args.hidden}, "
          f"vocab {args.vocab:,}, {results[0]['supervised']} supervised tokens")
    print("| --chunked_ce | peak above inputs, GiB (incl. grads) | time, s | loss |")
    print("| --- | --- | --- | --- |")
    for r in results:
        vs = f" ({r['peak_gib'] / plain['peak_gib']:.0%} of plain)" if plain and r is not plain else ""
        print(f"| {r['chunked_ce'] or 'plain'} | {r['peak_gib']:.2f}{vs} ({r['grads_gib']:.2f}) | {r['seconds']:.3f} | "
              f"{r['loss']:.1f} |")


if __name__ == "__main__":
    main()
