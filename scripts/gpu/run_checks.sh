#!/usr/bin/env bash
# bash scripts/gpu/run_checks.sh                    # on the lent GPU machine: every step, ~7.5 min in all
# bash scripts/gpu/run_checks.sh --dry-run          # here, on a CPU: every step with tiny shapes, same files
# bash scripts/gpu/run_checks.sh --steps bench,7b   # a rerun of some steps (env always runs: it installs the wheels)
#
# Prepared here by `bash scripts/gpu/fetch_wheels.sh DATA_DIR` (.whl/ and .gpu/, git-ignored); the device
# tool must carry [".whl", ".gpu"]. Give the call a timeout of BUDGET_S + 60 s.
#
# Steps, in order of value. Each runs under its own `timeout`, cut further to what is left of one overall
# deadline (BUDGET_S, default 450 s, so that with 2-4 min of machine start-up the loan stays inside
# 15 min); a step that fails or times out costs only itself. Expected / limit, seconds:
#   env    install the carried wheels into /tmp/site; versions, nvidia-smi, the varlen kernel's presence   25 / 60
#   tests  pytest -m cuda with DeepSpeed on CUDA: packed isolation per kernel, bf16 ZeRO-2/3 smoke,
#          MFU sane (the 1B model folder is built meanwhile, in the background)                           60 / 100
#   mfu    1B Llama shape, full FT, bf16, packed seq_len 4096, ZeRO-2 with torch's fused AdamW, 20 steps
#          of 64 Alpaca samples; torch.profiler on steps 16-18 -> the kernels table                       70 / 130
#   ce     peak memory and time of the loss, plain vs --chunked_ce, 128k vocabulary, seq_len 4096          15 / 45
#   bench  launch/benchmark.py: harness vs transformers.Trainer vs TRL SFTTrainer, the 1B, 1 repeat       150 / 200
#   7b     Llama-2-7B shape (random init at load), ZeRO-3 + CPU offload, GPU capped at 80 GiB, 4 steps
#          of 10 samples, grad ckpt; launch/plan.py's prediction beside it                         the rest
# Runs stop themselves once their last step is logged (the final export of weights measures nothing).
#
# What comes back: $OUT (the device tool's folder; gpu-results/ elsewhere), at most 6 files, each
# written as soon as its step ends:
#   results.jsonl  one line per step: status, exit code, seconds and its figures
#   summary.txt    the same as one line per step (also printed at the end)
#   env.txt        versions and nvidia-smi;   pytest.txt  the CUDA tests' output
#   profile-1b.txt the 1B run's kernels: time per category, device busy share, top kernels
#   logs.tar.gz    every step's log tail, metrics.jsonl and config.json of each run, the benchmark's
#                  JSON and table, the planner's table
# Run folders live in RUNS (/tmp/runs), never in $OUT.
set -uo pipefail   # no -e: a failing step must not stop the steps after it
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$self")/../.." || exit 2

dry=0
steps=env,tests,mfu,ce,bench,7b
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --steps) steps=env,$2; shift ;;
    __step) shift; step_name=$1 ;;
    *) echo "error: unknown argument $1 (--dry-run, --steps a,b)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${step_name:-}" ]; then
  # The parent: settings for every step, exported to the step processes.
  export DRY=$dry
  if [ "$dry" = 1 ]; then
    export RUNS=${RUNS:-/tmp/runs-dry} PY=${DRY_PYTHON:-python3} DS_ACCELERATOR=cpu BUDGET_S=${BUDGET_S:-3000}
    export SITE=$RUNS/site OUT=${OUT:-$RUNS/out}
    export SHAPE_1B=tiny-1b SHAPE_7B=tiny-7b SEQ=512 MFU_MICRO=8 MFU_STEPS=5 PROFILE_STEPS=2:2
    export BENCH_MICRO=4 BENCH_STEPS=2 STEPS_7B=2 MICRO_7B=4
    export CE_ARGS="--device cpu --seq_len 256 --hidden 64 --vocab 32000 --chunks 0,64"
  else
    export RUNS=${RUNS:-/tmp/runs} PY=python3 DS_ACCELERATOR=cuda BUDGET_S=${BUDGET_S:-450}
    export SITE=/tmp/site OUT=${OUT:-gpu-results}
    export SHAPE_1B=llama-1b SHAPE_7B=llama2-7b SEQ=4096 MFU_MICRO=64 MFU_STEPS=20 PROFILE_STEPS=15:3
    export BENCH_MICRO=32 BENCH_STEPS=15 STEPS_7B=4 MICRO_7B=10
    export CE_ARGS="--chunks 0,1024,2048,4096,8192"
  fi
  export PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HARNESS_CACHE=$RUNS/cache
  # On CUDA nothing is compiled (torch's AdamW, NCCL). On a CPU DeepSpeed compiles a comm op once
  # (minutes on a busy CPU): kept across dry runs, built in the env step, never cut by a timeout mid-build.
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions_run_checks}
  export LOGS=$RUNS/logs DS=$RUNS/ds M1=$RUNS/models/$SHAPE_1B M7=$RUNS/models/$SHAPE_7B-noweights
  export DATA=.gpu/alpaca_data.json
  mkdir -p "$RUNS" "$LOGS" "$OUT"
  for need in .whl .gpu/alpaca_data.json .gpu/llama_tokenizer/tokenizer_config.json; do
    [ -e "$need" ] || { echo "error: $need is missing: run bash scripts/gpu/fetch_wheels.sh DATA_DIR first" >&2; exit 2; }
  done
fi

# -- helpers -----------------------------------------------------------------------------------

# train_until STEPS METRICS CMD...: run a training command and end it (SIGKILL) once STEPS training
# lines are in its metrics.jsonl; what comes after (the export of final/) measures nothing. SIGKILL,
# not TERM: the harness answers TERM by saving a checkpoint. The memory monitor's file is at most 1 s old.
train_until() {
  local want=$1 metrics=$2 pid
  shift 2
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ -f "$metrics" ] && [ "$(grep -c '"tokens_per_s"' "$metrics")" -ge "$want" ]; then
      echo "train_until: $want steps logged in $metrics; ending the run before its final export"
      sleep 2
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 0
    fi
    sleep 2
  done
  wait "$pid"
}

# -- the steps (each runs as `bash run_checks.sh __step NAME` under its own timeout) ---------------

step_env() {
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || return 1
  "$PY" scripts/gpu/ds_configs.py "$DS" || return 1
  if [ "$DS_ACCELERATOR" = cpu ]; then
    "$PY" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' || return 1
  fi
  if command -v nvidia-smi >/dev/null; then
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nvidia-smi; } > "$OUT/env.txt" 2>&1
  else
    echo "no nvidia-smi on this machine" > "$OUT/env.txt"
  fi
  "$PY" - <<'EOF' | tee "$RUNS/env.json" >> "$OUT/env.txt"
import importlib.metadata as md, importlib.util, json, platform, torch
v = {"python": platform.python_version(), "cpus": __import__("os").cpu_count()}
for name in ("torch", "transformers", "deepspeed", "trl", "datasets", "accelerate", "peft", "flash-attn", "triton"):
    try:
        v[name] = md.version(name)
    except md.PackageNotFoundError:
        v[name] = None
v["varlen_attn"] = importlib.util.find_spec("torch.nn.attention.varlen") is not None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    v.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
else:
    v["device"] = "cpu"
import deepspeed, transformers, trl  # noqa: F401  (the carried wheels import)
print(json.dumps(v))
EOF
}

step_tests() {
  "$PY" -m pytest -q -m cuda -p no:cacheprovider -rfEs --junitxml="$RUNS/pytest.xml" tests/ > "$RUNS/pytest.txt" 2>&1
  local rc=$?
  tail -c 200000 "$RUNS/pytest.txt" > "$OUT/pytest.txt"
  return $rc
}

wait_for_1b() {
  while [ ! -f "$M1.rc" ]; do sleep 1; done
  [ "$(cat "$M1.rc")" = 0 ] || { echo "the 1B model build failed: see make-1b.log"; return 1; }
}

step_mfu() {
  wait_for_1b || return 1
  mkdir -p "$RUNS/mfu"
  PEAKS_OUT=$RUNS/mfu/peaks.json PROFILE_OUT=$RUNS/mfu/profile.txt train_until "$MFU_STEPS" "$RUNS/mfu/run/metrics.jsonl" \
    "$PY" scripts/gpu/train_wrapped.py --model "$M1" --data "$DATA" --ds_config "$DS/zero2.json" --dtype bf16 \
    --seq_len "$SEQ" --micro_batch_size "$MFU_MICRO" --max_steps "$MFU_STEPS" --lr 1e-5 --log_every 1 \
    --output_dir "$RUNS/mfu/run" --overwrite True
  local rc=$?
  cp "$RUNS/mfu/profile.txt" "$OUT/profile-1b.txt" 2>/dev/null
  return $rc
}

step_ce() {
  rm -f "$RUNS/ce.jsonl"
  # shellcheck disable=SC2086  # CE_ARGS is a list of flags
  "$PY" scripts/bench_ce_memory.py $CE_ARGS --out "$RUNS/ce.jsonl"
}

step_bench() {
  wait_for_1b || return 1
  mkdir -p "$RUNS/bench"
  "$PY" launch/benchmark.py --model "$M1" --data "$DATA" --ds_config "$DS/zero2.json" --dtype bf16 --seq_len "$SEQ" \
    --micro_batch_size "$BENCH_MICRO" --max_steps "$BENCH_STEPS" --repeats 1 --output "$RUNS/bench/bench-1b.json"
}

step_7b() {
  mkdir -p "$RUNS/7b"
  [ -f "$M7/config.json" ] || "$PY" scripts/gpu/make_model.py "$SHAPE_7B" "$M7" --weights False || return 1
  # The planner's prediction for the same seq_len, one row per micro-batch, grad ckpt (CPU only, alongside).
  "$PY" launch/plan.py --model "$M7" --world_size 1 --gpu_gib 80 --host_gib 128 --seq_len "$SEQ" --micro_batch_size 1 \
    --grad_ckpt True > "$RUNS/7b/plan.txt" 2>&1 &
  local plan=$!
  GPU_MEM_CAP_GIB=80 PEAKS_OUT=$RUNS/7b/peaks.json train_until "$STEPS_7B" "$RUNS/7b/run/metrics.jsonl" \
    "$PY" scripts/gpu/train_wrapped.py --model "$M7" --data "$DATA" --ds_config "$DS/zero3_offload.json" --dtype bf16 \
    --seq_len "$SEQ" --micro_batch_size "$MICRO_7B" --max_steps "$STEPS_7B" --grad_ckpt True --lr 1e-5 --log_every 1 \
    --output_dir "$RUNS/7b/run" --overwrite True
  local rc=$?
  wait "$plan"
  return $rc
}

if [ -n "${step_name:-}" ]; then
  "step_$step_name"
  exit $?
fi

# -- the parent: run the steps in order, inside the deadline -------------------------------------

deadline=$(( $(date +%s) + BUDGET_S ))
declare -A limit=([env]=60 [tests]=100 [mfu]=130 [ce]=45 [bench]=200 [7b]=400)
[ "$dry" = 1 ] && limit=([env]=900 [tests]=400 [mfu]=500 [ce]=200 [bench]=1200 [7b]=600)  # a shared 2-core CPU

pack_logs() {
  # Small files only: log tails, metrics, configs, tables (the folder tar is well under the 16 MiB limit).
  local bundle=$RUNS/bundle
  rm -rf "$bundle"
  mkdir -p "$bundle"
  for f in "$LOGS"/*.log; do [ -e "$f" ] && tail -c 300000 "$f" > "$bundle/$(basename "$f")"; done
  for run in mfu/run 7b/run; do
    [ -d "$RUNS/$run" ] || continue
    mkdir -p "$bundle/${run%/run}"
    cp "$RUNS/$run"/{metrics.jsonl,config.json,data_report.json} "$bundle/${run%/run}/" 2>/dev/null
  done
  cp "$RUNS"/7b/{plan.txt,peaks.json} "$bundle/" 2>/dev/null
  cp "$RUNS"/mfu/peaks.json "$bundle/mfu-peaks.json" 2>/dev/null
  cp "$RUNS"/bench/bench-1b.{json,md} "$RUNS"/ce.jsonl "$RUNS"/pytest.xml "$bundle/" 2>/dev/null
  tar czf "$OUT/logs.tar.gz.tmp" -C "$RUNS" bundle && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

run_step() {
  local name=$1 budget=${limit[$1]} left start rc
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    "$PY" scripts/gpu/collect.py "$name" -1 0
    return
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "== $name (limit ${budget}s, $(date +%T))"
  start=$(date +%s)
  timeout -k 5 "$budget" bash "$self" __step "$name" > "$LOGS/$name.log" 2>&1
  rc=$?
  "$PY" scripts/gpu/collect.py "$name" "$rc" "$(( $(date +%s) - start ))"
  pack_logs
}

echo "run_checks: dry=$dry steps=$steps budget=${BUDGET_S}s runs=$RUNS out=$OUT"
: > "$OUT/results.jsonl"
for name in env tests mfu ce bench 7b; do
  [[ ",$steps," == *",$name,"* ]] || continue
  run_step "$name"
  if [ "$name" = env ] && [[ "$steps" == *mfu* || "$steps" == *bench* ]] && [ "$(cat "$M1.rc" 2>/dev/null)" != 0 ]; then
    # The 1B folder is built while the tests run; mfu and bench wait for it (a warm rerun keeps it).
    rm -rf "$M1" "$M1.rc"
    mkdir -p "$(dirname "$M1")"
    ( timeout 300 "$PY" scripts/gpu/make_model.py "$SHAPE_1B" "$M1" > "$LOGS/make-1b.log" 2>&1; echo $? > "$M1.rc" ) &
  fi
done
echo "== summary ($(( BUDGET_S - (deadline - $(date +%s)) ))s of ${BUDGET_S}s)"
cat "$OUT/summary.txt"
