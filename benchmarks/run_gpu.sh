#!/usr/bin/env bash
# One command on a GPU machine (no network; torch, triton, transformers preinstalled):
# install the package (building the CUDA pool ops with nvcc), run the GPU tests and the
# kernel tests compiled (OUROBOROS_TEST_GPU=1: no interpreter), then every
# benchmarks/bench_*.py with --out "$OUT". Tables and the log (run_gpu.log) go to $OUT
# (default benchmarks/results). Every step runs even if an earlier one failed; the exit
# code is non-zero if any step failed. Budget on an H100: about 6-8 minutes in all.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh            # everything
#   STEPS=info,install,bench bash benchmarks/run_gpu.sh # a subset of: info install test kernels bench
#                                                       # replay sweep
#   STEPS=info,install,sweep bash benchmarks/run_gpu.sh # the tree-attention launch-settings sweep
#                                                       # (not in the default set: ~5 min more)
#   STEPS=bench BENCH=pool,tree_attention QUICK=1 bash benchmarks/run_gpu.sh
#                 # only benchmarks/bench_{pool,tree_attention}.py, each with --quick
#   STEPS=bench BENCH=batch bash benchmarks/run_gpu.sh  # batched decoding, B = 1..32 (~90 s)
#   STEPS=replay bash benchmarks/run_gpu.sh             # the recorded SmolLM2 traces replayed
#                 # at Llama-3-8B / 3.2-1B shapes against transformers' greedy (~4 min, its
#                 # own --budget-s; results replay_<card>.md/.json; REPLAY_ARGS adds
#                 # arguments, e.g. REPLAY_ARGS="--shapes tiny --device cpu" on a CPU)
#
# One device call may run 10 minutes and info+install+tests take ~4.5 min on an H100 host,
# so a full run is best split over back-to-back calls (the machine stays warm between them
# and keeps the built extension): STEPS=info,install,test,kernels; then STEPS=bench
# BENCH=pool,tree_attention; then STEPS=sweep; then STEPS=bench BENCH=e2e QUICK=1.
#   PYTHON=python3.12 WHEELS=wheels bash benchmarks/run_gpu.sh
#
# pytest must be importable; if it is not and $WHEELS (default ./wheels) holds wheels
# (e.g. made elsewhere with `pip download pytest -d wheels`), they are installed offline.

set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-info,install,test,kernels,bench,replay}"
BENCH="${BENCH:-}"   # comma-separated names (pool, tree_attention, e2e, ...); empty = all
QUICK="${QUICK:-0}"  # 1: pass --quick to the benchmarks
WHEELS="${WHEELS:-wheels}"
# Import the package from this tree even if the editable install below fails.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
: > "$LOG"
failures=()

log() { echo "$*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S COMMAND...: run, tee into the log, record a failure, never stop.
step() {
  local name=$1 limit=$2
  shift 2
  log "=== [$(date +%H:%M:%S)] $name: $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "=== $name: rc=$rc after $((SECONDS - start)) s"
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && log "=== $name: TIMED OUT after ${limit} s"
    failures+=("$name (rc=$rc)")
  fi
  return 0
}

wants() { [[ ",$STEPS," == *",$1,"* ]]; }

if wants info; then
  step nvidia-smi 30 nvidia-smi
  step versions 60 "$PY" -c '
import platform, subprocess, torch, triton, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__, "| transformers", transformers.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1),
          "| shared/block optin", getattr(p, "shared_memory_per_block_optin", "?"))
try:
    from torch.utils.cpp_extension import CUDA_HOME
    print("CUDA_HOME", CUDA_HOME)
    print(subprocess.run([f"{CUDA_HOME}/bin/nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
except Exception as error:
    print("nvcc: not found:", error)
'
fi

if wants install; then
  before=${#failures[@]}
  step install 420 "$PY" -m pip install --no-deps --no-build-isolation -e .
  if [ ${#failures[@]} -gt "$before" ]; then  # e.g. an old setuptools: build in place
    step build-ext-inplace 420 "$PY" setup.py build_ext --inplace
  fi
  step extension 60 "$PY" -c '
import ouroboros_kernels as k
info = k.extension_info() if hasattr(k, "extension_info") else "(no extension_info)"
print("extension:", info)
'
fi

if wants test || wants kernels; then
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    if [ -d "$WHEELS" ]; then
      step pytest-offline-install 120 "$PY" -m pip install --no-index --find-links "$WHEELS" pytest
    else
      log "=== pytest is not installed and there is no $WHEELS/ folder of wheels: tests cannot run"
      failures+=("pytest missing")
    fi
  fi
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=10)
if wants test; then
  # Every test marked gpu (all helpers' files); a file that cannot be imported here (a
  # missing optional package) is reported but does not stop the others.
  step gpu-tests 300 env OUROBOROS_TEST_GPU=1 "${PYTEST[@]}" -m gpu \
    --continue-on-collection-errors tests
fi
if wants kernels; then
  # The tree-kernel tests written for the interpreter, compiled for real on CUDA tensors.
  step kernel-tests-compiled 300 env OUROBOROS_TEST_GPU=1 "${PYTEST[@]}" -m "not gpu" \
    tests/test_tree.py tests/test_acceptance.py tests/test_compact_kv.py \
    tests/test_tree_attention.py tests/test_tree_attention_llama.py
fi

if wants bench; then
  for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    if [ "$name" = bench_replay ]; then continue; fi  # the replay step runs it
    if [ -n "$BENCH" ] && [[ ",$BENCH," != *",${name#bench_},"* ]]; then continue; fi
    quick=()
    if [ "$QUICK" = 1 ] && grep -q -- '"--quick"' "$bench"; then quick=(--quick); fi
    limit=420 extra=()
    if [ "$name" = bench_batch ]; then
      # Its own budget and small settings whatever QUICK says: B = 1..32 over 32 held-out
      # prompts, 16 new tokens; --budget-s skips sizes that would not fit. The static-cache
      # baseline is left out here: as transformers runs it on a GPU it compiles once per B
      # (minutes); a full run: --static auto and a larger limit.
      limit=90 quick=()
      extra=(--batch-sizes 1,2,4,8,16,32 --prompts 32 --max-new-tokens 16 --static off
             --budget-s 75)
    fi
    if [ "$name" = bench_compile ]; then
      # CUDA graphs vs the eager device step; every pass shape compiles once (tens of s).
      limit=180 quick=()
      extra=(--configs speculative,ouroboros --prompts 2 --max-new-tokens 32)
    fi
    step "$name" "$limit" "$PY" "$bench" --out "$OUT" "${quick[@]}" "${extra[@]}"
  done
fi

if wants replay; then
  # The committed acceptance traces (benchmarks/results/traces, recorded on a CPU with the
  # real SmolLM2 pair) replayed through the engine's passes on random-weight Llama-3-8B /
  # Llama-3.2-1B shapes (bf16) against transformers' greedy generate (eager, and static
  # cache + compile when the warm-up fits). --budget-s skips configurations that would not
  # fit and says so; the step's own limit leaves room for the models and the report.
  # REPLAY_ARGS: more arguments (the tests: "--shapes tiny --device cpu").
  # shellcheck disable=SC2086
  step bench_replay 240 "$PY" benchmarks/bench_replay.py --out "$OUT" --budget-s 200 \
    --prompts 2 ${REPLAY_ARGS:-}
fi

if wants sweep; then
  step sweep_tree_attention 330 "$PY" benchmarks/sweep_tree_attention.py --quick --out "$OUT" \
    --budget-s 240
fi

log ""
if [ ${#failures[@]} -eq 0 ]; then
  log "run_gpu.sh: all steps passed ($STEPS) in $SECONDS s; results in $OUT"
  exit 0
fi
log "run_gpu.sh: FAILED steps: ${failures[*]} (total $SECONDS s; log $LOG)"
exit 1
