#!/usr/bin/env bash
# On the lent GPU machine, from the repo root (device tool: carry [".whl"], after
# `bash scripts/gpu/fetch_wheels.sh` here):
#     bash scripts/gpu/run_checks.sh                 # GPU-marked tests, then the issue-8 benchmarks
#     bash scripts/gpu/run_checks.sh tests-only      # only the GPU-marked tests
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

# Issue 8 targets, each figure with its command (see docs/benchmarks.md for the recorded ones).
if [ -f launch/benchmark.py ]; then
  python3 launch/benchmark.py --help > /dev/null
fi
