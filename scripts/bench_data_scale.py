"""Data path at scale: time to the first training step (cold and warm tokenization cache), data
time per step and peak RSS per rank, for generated short instruction rows, one process and two
ranks; and tokenization rows/s for --num_proc 1 and 2.

    python scripts/bench_data_scale.py --rows 10000,100000,1000000 --work $SCRATCH/bench_scale \
        --out data_scale.json

Generated rows: `default_assets.generate_sample_instructions` (Alpaca-style, about 45 tokens with
the prompt template). The tiny default model and its 512-piece tokenizer: the data path is what
is timed, not the model. Each run: `launch/train.py` (1 process) or `torchrun --nproc_per_node 2`,
ZeRO-2, fp32 on CPU, micro batch 4, seq_len 256, packing on, STEPS optimizer steps, --num_proc left
at its default (auto: 1 process under 20k rows, else one per core up to 8).

- cold: empty tokenization cache and empty `datasets` cache (the JSON is parsed again); warm: the
  same command again.
- time to first step: from the launch to the first metrics.jsonl line with a loss (polled every
  50 ms), so it includes Python and library imports, preflight, DeepSpeed set-up and step 1.
- data time per step: the median of the loop's `time_data_s` over steps 2..STEPS (with 2 ranks it
  includes the all-reduce of the step's token counts, i.e. waiting for the other rank); and, apart,
  the time to lay out and collate one rank's micro-batches in process, from the warm cache entry.
- peak RSS: the largest resident set of any process of the run (wait4's ru_maxrss over the
  launcher and its ranks), which counts the page-cache pages of the memory-mapped cache that a
  rank touched (shared between the ranks, not copied).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STEPS = 20
FLAGS = ["--max_steps", str(STEPS), "--micro_batch_size", "4", "--seq_len", "256", "--log_every", "1",
         "--dtype", "fp32", "--ds_config", "zero2", "--lr", "1e-4"]


def generate(path: Path, n: int) -> None:
    from harness import default_assets

    if not path.exists():
        path.write_text(default_assets.rows_to_jsonl(default_assets.generate_sample_instructions(n, seed=0)))


def run_once(cmd: list[str], env: dict, out: Path, log: Path, timeout: float = 3600) -> dict:
    """Launch, note when step 1 is logged, wait; the peak RSS of the largest process of the tree."""
    metrics = out / "metrics.jsonl"
    start = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        first_step = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if first_step is None and metrics.exists() and '"loss"' in metrics.read_text():
                first_step = time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                proc.kill()
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 above
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    data_times = [r["time_data_s"] for r in records if "time_data_s" in r and r["step"] >= 2]
    report = json.loads((out / "data_report.json").read_text())
    return {"first_step_s": first_step, "total_s": time.perf_counter() - start,
            "data_s_per_step": statistics.median(data_times), "peak_rss_gib": usage.ru_maxrss / 2**20,
            "cache_hit": report["sources"][0]["tokenization_cache_hit"], "rows": report["rows_in_training_set"]}


def tokenize_rate(path: Path, num_proc: int, tokenizer_dir: str = "") -> float:
    """Rows/s of the tokenization step alone (read, examples, datasets.map), no cache."""
    from harness import data_cache, default_assets, model as model_mod, tasks
    from harness.config import TrainConfig

    tokenizer = model_mod.load_tokenizer(tokenizer_dir or str(default_assets.default_model_dir()), False)
    start = time.perf_counter()
    ds = data_cache.build(str(path), TrainConfig(), tasks.get("instruction"), "", tokenizer, 256, num_proc, "--data")
    return len(ds) / (time.perf_counter() - start)


def batch_build_time(cache: Path, steps: int = 200) -> float:
    """Seconds per step to lay out and collate one rank's micro-batches (packed, 2 ranks x micro
    batch 4), in this process from the warm cache entry: the data path alone, no collective."""
    from harness import data, data_cache
    from harness.batches import StepBatches

    (entry,) = [p for p in cache.iterdir() if (p / data_cache.PREPARED_FILE).is_file()]
    # The entry stores its per-row counts, so the EOS id is not consulted.
    rows, _ = data.rows_from_dataset(data_cache.load_prepared(entry, None, "--data"), eos_id=2)
    batches = StepBatches(rows, data.StepSampler(len(rows), 4, 1, 2, seed=42, lengths=rows.lengths), 3, True, 256)
    batches(0, 0)  # the epoch's permutation, once
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batches(step, 0)
    return (time.perf_counter() - start) / steps


def llama_tokenizer_dir(model_file: str, work_dir: Path) -> str:
    """A folder AutoTokenizer loads as the Llama-2 tokenizer: its tokenizer.model and a config."""
    folder = work_dir / "llama_tokenizer"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(model_file, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return str(folder)


def as_list(value) -> list:
    """python-fire reads `a,b` as a tuple and `a` as a scalar."""
    return list(value) if isinstance(value, (list, tuple)) else str(value).split(",")


def main(rows: str = "10000,100000,1000000", work: str = "bench_scale", out: str = "data_scale.json",
         launchers: str = "python,torchrun", tokenize_rows: int = 100000, llama_tokenizer: str = "",
         skip_runs: bool = False):
    """`llama_tokenizer`: a Llama-2 tokenizer.model, to also time tokenization with a real 32k vocabulary;
    `skip_runs`: only the tokenization rates."""
    work_dir = Path(work).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))}
    sizes = [int(n) for n in as_list(rows)]
    results = {"load_before": os.getloadavg(), "steps": STEPS, "runs": [], "tokenize_rows_per_s": {}}

    if skip_runs:
        sizes = []
    else:  # the comm op JIT build and the default model build happen once, outside any timing
        generate(work_dir / "rows-1000.jsonl", 1000)
        run_once([sys.executable, "launch/train.py", "--data", str(work_dir / "rows-1000.jsonl"), "--output_dir",
                  str(work_dir / "warmup"), "--overwrite", "--data_cache", str(work_dir / "cache-warmup"), *FLAGS],
                 env, work_dir / "warmup", work_dir / "warmup.log")

    for n in sizes:
        path = work_dir / f"rows-{n}.jsonl"
        generate(path, n)
        for launcher in as_list(launchers):
            cache, hf_cache = work_dir / f"cache-{n}-{launcher}", work_dir / f"hf-{n}-{launcher}"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(hf_cache, ignore_errors=True)
            start = ([sys.executable] if launcher == "python" else
                     [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2"])
            for state in ("cold", "warm"):
                run_dir = work_dir / f"run-{n}-{launcher}-{state}"
                cmd = [*start, "launch/train.py", "--data", str(path), "--output_dir", str(run_dir), "--overwrite",
                       "--data_cache", str(cache), *FLAGS]
                result = run_once(cmd, {**env, "HF_DATASETS_CACHE": str(hf_cache)}, run_dir, work_dir / f"{run_dir.name}.log")
                assert result["cache_hit"] == (state == "warm"), result
                result.update(rows_generated=n, ranks=1 if launcher == "python" else 2, cache=state,
                              load=os.getloadavg()[0])
                results["runs"].append(result)
                print(json.dumps(result), flush=True)
                shutil.rmtree(run_dir / "final", ignore_errors=True)
        results.setdefault("batch_build_s_per_step", {})[n] = batch_build_time(work_dir / f"cache-{n}-python")

    path = work_dir / f"rows-{tokenize_rows}.jsonl"
    generate(path, tokenize_rows)
    for num_proc in (1, 2):
        results["tokenize_rows_per_s"][num_proc] = tokenize_rate(path, num_proc)
    if llama_tokenizer:
        folder = llama_tokenizer_dir(llama_tokenizer, work_dir)
        results["tokenize_rows_per_s_llama2"] = {n: tokenize_rate(path, n, folder) for n in (1, 2)}
    results["tokenize_rows"] = tokenize_rows
    results["load_after"] = os.getloadavg()
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = ["| rows | ranks | cache | time to first step (s) | data time per step (ms) | peak RSS per rank (GiB) |",
             "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in results["runs"]:
        lines.append(f"| {r['rows_generated']:,} | {r['ranks']} | {r['cache']} | {r['first_step_s']:.1f} | "
                     f"{r['data_s_per_step'] * 1000:.2f} | {r['peak_rss_gib']:.2f} |")
    text = "\n".join(lines) + "\n"
    if results.get("batch_build_s_per_step"):
        text += "\nbatch build per step, one rank, in process: " + ", ".join(
            f"{int(n):,} rows {s * 1000:.2f} ms" for n, s in results["batch_build_s_per_step"].items()) + "\n"
    for key, name in (("tokenize_rows_per_s", "tiny default tokenizer"), ("tokenize_rows_per_s_llama2", "Llama-2 tokenizer")):
        if key in results:
            rates = ", ".join(f"--num_proc {k}: {v:,.0f} rows/s" for k, v in results[key].items())
            text += f"\ntokenization of {results['tokenize_rows']:,} rows, {name}: {rates}"
    return text


if __name__ == "__main__":
    fire.Fire(main)
