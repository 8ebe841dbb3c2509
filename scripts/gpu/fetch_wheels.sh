#!/usr/bin/env bash
# bash scripts/gpu/fetch_wheels.sh     # on a dev machine with PyPI: fills .whl/ for the GPU machine
#
# The lent GPU machine (Python 3.12, x86-64, torch 2.11 + transformers already installed) cannot
# reach PyPI and lacks deepspeed, datasets, fire and a few of their dependencies. This downloads
# exactly those as wheels into .whl/ (git-ignored), pinned to the versions the CPU CI tests.
# deepspeed is sdist-only on PyPI: it is built here into a pure-Python wheel (its C++/CUDA ops are
# JIT-compiled on first use on the GPU machine, which has nvcc and ninja).
# Then, on the GPU machine: bash scripts/gpu/run_checks.sh   (the device tool carries .whl/)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

pinned=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19          # datasets
  fire==0.7.1 termcolor==3.3.0                              # fire
  hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4       # deepspeed
  annotated-types==0.8.0 typing-inspection==0.4.5
  nltk==3.10.4 absl-py==2.5.1                               # summarization metric (rouge-score)
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pinned[@]}"
# sdist-only on PyPI: built here as pure-Python wheels.
ls .whl/rouge_score-0.1.2-*.whl >/dev/null 2>&1 || .venv/bin/python -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2
ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || \
  DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -1 .whl
du -sh .whl
# The benchmark data travels too (../shared does not); .gpu/ is git-ignored, never committed.
mkdir -p .gpu
cp ../shared/data/alpaca_subset_2k/alpaca_data.json .gpu/
grep -qx '/.gpu/' .gitignore || echo '/.gpu/' >> .gitignore
