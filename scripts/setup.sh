#!/usr/bin/env bash
# bash scripts/setup.sh        # fresh machine -> .venv with the harness installed (editable, + dev extras)
#
# CPU machines: installs the local CPU build torch==2.13.0 first and pins it, so pip never pulls
# CUDA wheels. GPU machines whose python already has a CUDA torch: the venv sees that torch
# (--system-site-packages) and pip leaves it alone. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CPU_TORCH=2.13.0

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c 'import torch' 2>/dev/null; then
  "$PY" -m pip install -q "torch==$CPU_TORCH"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
"$PY" -m pip install -q -c "$constraints" -e '.[dev]'
# DeepSpeed compiles its C++ ops on first use: every run on CPU its communication op (~35 s), runs
# that offload the optimizer DeepSpeedCPUAdam (~1 min). Build them now, so no run starts with a
# compile, or waits on another's. Cached per machine (torch_extensions, -march=native): run setup
# on the kind of machine that trains. Instant when they are already built.
"$PY" -c 'from harness.engine import build_ops; build_ops()'
"$PY" -c 'import torch, deepspeed, transformers; print(f"ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")' 2>/dev/null | tail -1
