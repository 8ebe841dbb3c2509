#!/usr/bin/env bash
# bash scripts/gpu/run_checks.sh              # on the lent GPU machine: GPU-marked tests, then the GPU benchmarks
# bash scripts/gpu/run_checks.sh tests-only   # only the GPU-marked tests
#
# From the repo root there, after `bash scripts/gpu/fetch_wheels.sh` here; the device tool must
# carry [".whl", ".gpu"].
#
# The GPU image has torch, transformers, accelerate, peft, tensorboard and sentencepiece; the
# carried wheels add deepspeed, datasets, fire and their missing dependencies, installed into
# /tmp/site (nothing of the image is replaced). Logs and JSON land in $OUT (the device tool's
# folder that comes back) or gpu-results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c 'import torch, deepspeed, transformers; print(torch.__version__, deepspeed.__version__, transformers.__version__)' \
  | tee -a "$out/device.txt"

python3 -m pytest -q -m cuda tests/ 2>&1 | tee "$out/pytest-gpu.log"
[ "${1:-}" = tests-only ] && exit 0

# The GPU benchmarks; every command is echoed into the log next to its figures.
alpaca=${ALPACA:-.gpu/alpaca_data.json}   # the data folder does not travel: fetch_wheels.sh copies it into .gpu/
run() { echo "+ $*" | tee -a "$out/commands.log"; "$@"; }
[ -d models/llama-1b ] || run python3 scripts/gpu/make_model.py llama-1b models/llama-1b

# 1. MFU of the 1B Llama shape, full fine-tune, bf16, packed seq 4096, ZeRO-2, 1 GPU.
run python3 launch/train.py --model models/llama-1b --data "$alpaca" --ds_config zero2 --dtype bf16 --seq_len 4096 \
  --packing True --micro_batch_size 16 --max_steps 30 --lr 1e-5 --log_every 5 --output_dir "$out/mfu-1b" --overwrite \
  2>&1 | tail -20 | tee "$out/mfu-1b.log"
python3 -c 'import json,sys; m=[json.loads(l) for l in open(sys.argv[1])]; print({k: m[-1].get(k) for k in ("mfu","tokens_per_s","peak_memory_gib")})' \
  "$out/mfu-1b/metrics.jsonl" | tee -a "$out/mfu-1b.log"

# 2. Harness / HF Trainer real tokens/s, same model, data and DeepSpeed config.
run python3 launch/benchmark.py --model models/llama-1b --data "$alpaca" --ds_config zero2 --dtype bf16 --seq_len 4096 \
  --micro_batch_size 4 --max_steps 20 --output "$out/bench-1b.json" 2>&1 | tail -20 | tee "$out/bench-1b.log"

# 3. 7B full fine-tune on one 80 GB GPU: ZeRO-3 + CPU offload, >= 20 optimizer steps; the planner's prediction first.
[ -d models/llama2-7b ] || run python3 scripts/gpu/make_model.py llama2-7b models/llama2-7b
run python3 launch/plan.py --model models/llama2-7b --world_size 1 --gpu_gib 80 --host_gib 128 --micro_batch_size 1 \
  --grad_ckpt True | tee "$out/plan-7b.txt"
run python3 launch/train.py --model models/llama2-7b --data "$alpaca" --ds_config zero3_offload --dtype bf16 \
  --seq_len 4096 --grad_ckpt True --micro_batch_size 1 --max_steps 20 --lr 1e-5 --log_every 1 \
  --output_dir "$out/full-7b" --overwrite 2>&1 | tail -20 | tee "$out/full-7b.log"
