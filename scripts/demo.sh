#!/usr/bin/env bash
# bash scripts/demo.sh                    # set up, then fine-tune the embedded tiny default (CPU or GPU)
# bash scripts/demo.sh --max_steps 300    # extra flags pass through to launch/train.py
#
# The embedded default is a 2-layer Llama-shape model with a sentencepiece tokenizer, both built
# locally on first use, and the bundled synthetic instruction data (harness/assets/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python launch/train.py --output_dir runs/demo --overwrite \
  --max_steps 300 --micro_batch_size 8 --lr 3e-3 --lr_schedule constant --warmup_steps 10 --log_every 10 "$@"
