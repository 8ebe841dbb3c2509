"""Data-pipeline benchmark: tokenization rows/s, and real tokens/s padded vs packed, same run.

    PYTHONPATH=. python scripts/bench_data.py $DATA/alpaca_subset_2k/alpaca_data.json \
        $DATA/instruction_rasbt_1100/instruction-data.json

Tiny default model on this machine, fp32, 1 process, micro batch 16 samples, seq_len 512,
20 steps per layout; tokens/s is real (non-pad) tokens over the wall time of steps 3..20.
"""

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from harness import data_cache, default_assets, model as model_mod, tasks  # noqa: E402
from harness.config import TrainConfig  # noqa: E402
from harness.train import run  # noqa: E402

STEPS, MICRO, SEQ_LEN = 20, 16, 512


def main(paths):
    model = str(default_assets.default_model_dir())
    tokenizer = model_mod.load_tokenizer(model, False)
    results = {}
    for path in paths:
        entry = {}
        for num_proc in (1, 2):
            start = time.perf_counter()
            ds = data_cache.build(path, TrainConfig(), tasks.get("instruction"), "", tokenizer, SEQ_LEN, num_proc, "--data")
            entry[f"tokenize_rows_per_s_num_proc{num_proc}"] = len(ds) / (time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            for packing in (False, True):
                result = run(TrainConfig(data=path, output_dir=f"{tmp}/{packing}", max_steps=STEPS, seq_len=SEQ_LEN,
                                         micro_batch_size=MICRO, packing=packing, data_cache=f"{tmp}/cache", lr=1e-4))
                metrics = [json.loads(line) for line in open(f"{tmp}/{packing}/metrics.jsonl") if '"loss"' in line]
                timed = metrics[2:]
                tokens = sum(m["tokens"] - p["tokens"] for p, m in zip(metrics[1:], timed))
                seconds = sum(m["step_time_s"] for m in timed)
                steps = result.setup.report["steps"]
                entry["packed" if packing else "padded"] = {
                    "real_tokens_per_s": tokens / seconds, "efficiency": steps["efficiency"],
                    "tokens_per_step": steps["tokens_per_step"], "bin_fill_rate": steps.get("bin_fill_rate")}
        entry["speedup"] = entry["packed"]["real_tokens_per_s"] / entry["padded"]["real_tokens_per_s"]
        results[path] = entry
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
