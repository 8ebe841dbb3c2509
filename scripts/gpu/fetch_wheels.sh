#!/usr/bin/env bash
# bash scripts/gpu/fetch_wheels.sh DATA_DIR   # on a dev machine with PyPI: fills .whl/ and .gpu/ for the GPU machine
#
# The lent GPU machine (Python 3.12, x86-64; torch 2.11, transformers 5.17, accelerate, peft,
# tensorboard, sentencepiece, tokenizers, pyarrow, pandas, fsspec, huggingface-hub, msgpack,
# einops, ninja, py-cpuinfo, psutil ... preinstalled) cannot reach PyPI. This puts into .whl/
# exactly the wheels it lacks, pinned to the versions the CPU CI tests: deepspeed, datasets, fire,
# trl (the SFTTrainer baseline of launch/benchmark.py), rouge-score and their missing dependencies.
# Every Requires-Dist of these was checked against the machine's package list; the ones already
# there (numpy, packaging, tqdm, psutil, pyarrow>=24, fsspec<=2026.9.0, huggingface-hub>=1.31,<2
# for transformers 5.17, accelerate, jinja2, click, joblib, regex, six, absl-py ...) are not carried.
# deepspeed and rouge-score are sdist-only on PyPI: built here into pure-Python wheels (DS_BUILD_OPS=0;
# DeepSpeed's C++/CUDA ops are JIT-compiled on first use on the GPU machine, which has nvcc and
# ninja; the harness's GPU configs use torch's AdamW, which needs none).
#
# DATA_DIR holds alpaca_subset_2k/alpaca_data.json and llama_tokenizer/tokenizer.model. They go to
# .gpu/ (the device tool carries only the repo): the Alpaca 2k subset and .gpu/llama_tokenizer/, the
# Llama-2 SentencePiece model plus a tokenizer_config.json naming LlamaTokenizer (32,000 pieces).
#
# Idempotent: a second run downloads nothing, rebuilds nothing and removes any wheel that is no
# longer pinned (two versions of one package stop the install on the GPU machine).
# Then, on the GPU machine (the device tool carries [".whl", ".gpu"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -ne 1 ] || [ ! -f "$1/alpaca_subset_2k/alpaca_data.json" ] || [ ! -f "$1/llama_tokenizer/tokenizer.model" ]; then
  echo "error: usage: bash scripts/gpu/fetch_wheels.sh DATA_DIR (a folder holding alpaca_subset_2k/alpaca_data.json" \
       "and llama_tokenizer/tokenizer.model)" >&2
  exit 2
fi
data=$1
for d in .whl .gpu; do
  git check-ignore -q "$d/probe" || { echo "error: $d/ is not git-ignored; add '/$d/' to .gitignore" >&2; exit 2; }
done
PY=${PYTHON:-.venv/bin/python}   # builds the sdists; needs torch (deepspeed's setup.py imports it)
export PIP_DISABLE_PIP_VERSION_CHECK=1

binary=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19           # datasets (the rest of its needs are there)
  fire==0.7.1 termcolor==3.3.0                                # fire
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5         # deepspeed (msgpack, einops, ninja, py-cpuinfo are there)
  annotated-types==0.8.0 typing-inspection==0.4.5             # pydantic
  nltk==3.10.4 defusedxml==0.7.1                              # rouge-score (absl-py, six, click, joblib, regex are there)
  trl==1.16.0                                                 # SFTTrainer baseline; accepts transformers 5.17 and 5.24
)
sdist=(deepspeed==0.19.8 rouge-score==0.1.2)

mkdir -p .whl
# Drop wheels that are not pinned above (a changed pin leaves the old version behind).
keep=$(printf '%s\n' "${binary[@]}" "${sdist[@]}" | sed 's/==/-/; s/[-.]/_/g' | tr '[:upper:]' '[:lower:]')
for f in .whl/*.whl; do
  [ -e "$f" ] || continue
  key=$(basename "$f" | cut -d- -f1-2 | sed 's/[-.]/_/g' | tr '[:upper:]' '[:lower:]')
  grep -qx "$key" <<<"$keep" || { echo "removing unpinned $f"; rm -f "$f"; }
done

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${binary[@]}"
for spec in "${sdist[@]}"; do
  name=${spec%%==*}; version=${spec##*==}
  ls .whl/"${name//-/_}-$version"-py3-none-any.whl >/dev/null 2>&1 && continue
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$spec"
done
# A pure-Python deepspeed wheel: no prebuilt op may travel (it would not match the GPU's torch/CUDA).
if unzip -l .whl/deepspeed-0.19.8-py3-none-any.whl | grep -q '\.so$'; then
  echo "error: the deepspeed wheel holds compiled ops; rebuild it with DS_BUILD_OPS=0" >&2; exit 1
fi

# The benchmark data and the real tokenizer travel too; .gpu/ is git-ignored, never committed.
mkdir -p .gpu/llama_tokenizer
cp "$data/alpaca_subset_2k/alpaca_data.json" .gpu/alpaca_data.json
cp "$data/llama_tokenizer/tokenizer.model" .gpu/llama_tokenizer/tokenizer.model
chmod u+w .gpu/alpaca_data.json .gpu/llama_tokenizer/tokenizer.model
cat > .gpu/llama_tokenizer/tokenizer_config.json <<'EOF'
{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
EOF
"$PY" -c 'import sys; from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(".gpu/llama_tokenizer")
sys.exit(0 if len(t) == 32000 else f"error: .gpu/llama_tokenizer loads with {len(t)} pieces, not 32000")'

ls -1 .whl
du -sh .whl .gpu
