#!/usr/bin/env bash
# The command a GPU session runs (device tool, one call; see bench/RESULTS.md):
#
#   bash bench/run_gpu.sh [PHASES]          PHASES: comma list of parity, float32, bfloat16, torch
#                                            or "all" (= parity,float32,bfloat16,torch; default)
#
# * Installs carried wheels from .whl/ (if present) into /tmp/site, as the device README says; the
#   GPU image lacks ml_collections, which cn2_jax.config / the detector import: carry it (RESULTS.md).
# * parity: bench/parity_torchvision.py (ROIAlign / NMS vs torchvision.ops) -> $OUT/parity.json
# * float32 / bfloat16: bench/bench.py --dtypes <dtype> --skip-torch -> $OUT/bench_<dtype>.json
# * torch: bench/bench.py --skip-jax (torchvision Faster R-CNN) -> $OUT/bench_torch.json
# * at the end: all bench_*.json of this call merged into $OUT/bench.json + $OUT/bench.md (table).
# * everything printed goes to $OUT/run.log too. At most 7 files (+ profile.tar.gz): the device
#   tool returns 8 files at most.
#
# Time: the whole call stays within BUDGET_S seconds (default 560, for a 600 s call): bench.py
# skips cases that would start with < 60 s left and kills one still running at its budget, always
# writing what it measured. Results are written after every case, so a killed call still returns
# them. A full run needs more than one 10-minute call: see RESULTS.md for the recommended split.
#
# Environment knobs: OUT (default bench/out), PYTHON (default python3), BUDGET_S, STEPS (timed train
# steps, default 10), INFER_ITERS (default 20), BATCH (train batch per GPU, default 16),
# SIZES (default 800x1333@832x1344,1024x1024), INFER_BATCHES (default 1,8,16), PROFILE=1 (adds
# jax.profiler traces as $OUT/profile.tar.gz), BENCH_ARGS (extra bench.py flags), SMALL=1 (CPU
# check of this script with bench.py --small and parity --small).
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-560}
if [ "${SMALL:-0}" = 1 ]; then   # CPU check of this script: bench.py --small defaults
  BENCH_COMMON=(--small --no-md --min-case-s 10)
  PARITY_ARGS=(--small --seeds 1)
else
  BENCH_COMMON=(--steps "${STEPS:-10}" --infer-iters "${INFER_ITERS:-20}" --batch "${BATCH:-16}"
                --sizes "${SIZES:-800x1333@832x1344,1024x1024}"
                --infer-batches "${INFER_BATCHES:-1,8,16}" --no-md)
  PARITY_ARGS=()
fi
PHASES=${1:-all}
[ "$PHASES" = all ] && PHASES=parity,float32,bfloat16,torch
LOG="$OUT/run.log"

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

main() {

echo "== cn2_jax bench: phases $PHASES, budget ${BUDGET_S}s, $(date -u +%FT%TZ)"
if ls .whl/*.whl >/dev/null 2>&1; then
  echo "== installing carried wheels: $(ls .whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "wheel install failed"; return 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

$PY - <<'EOF' || { echo "== missing packages (carry ml_collections: see bench/RESULTS.md)"; return 2; }
import importlib, sys
for name in ("jax", "flax", "optax", "numpy", "ml_collections", "torch", "torchvision"):
    try:
        m = importlib.import_module(name)
        print(f"   {name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"   {name}: NOT importable ({type(e).__name__}: {e})")
        if name in ("jax", "flax", "optax", "numpy", "ml_collections"):
            sys.exit(1)
import jax
print("   jax devices:", jax.devices())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv

RC=0
[ "${PROFILE:-0}" = 1 ] && BENCH_COMMON+=(--profile /tmp/cn2_bench_profile)
# shellcheck disable=SC2206
EXTRA=(${BENCH_ARGS:-})
JSONS=()
IFS=, read -ra PH <<< "$PHASES"
for phase in "${PH[@]}"; do
  L=$(left)
  echo "== phase $phase ($L s left)"
  case "$phase" in
    parity)
      T=$(( L < 150 ? L : 150 ))
      if [ "$T" -lt 20 ]; then echo "   skipped: no time left"; continue; fi
      timeout -k 5 "$T" $PY bench/parity_torchvision.py "${PARITY_ARGS[@]}" --json "$OUT/parity.json"
      r=$?; echo "== parity exit code $r (0 = all within tolerance)"; [ $r -ne 0 ] && RC=1
      ;;
    float32|bfloat16)
      if [ "$L" -lt 60 ]; then echo "   skipped: no time left"; continue; fi
      $PY bench/bench.py --dtypes "$phase" --skip-torch --budget-s $(( L - 15 )) \
          "${BENCH_COMMON[@]}" "${EXTRA[@]}" --out "$OUT/bench_$phase.json"
      r=$?; [ $r -ne 0 ] && RC=1
      JSONS+=("$OUT/bench_$phase.json")
      ;;
    torch)
      if [ "$L" -lt 60 ]; then echo "   skipped: no time left"; continue; fi
      $PY bench/bench.py --skip-jax --budget-s $(( L - 15 )) "${BENCH_COMMON[@]}" "${EXTRA[@]}" \
          --out "$OUT/bench_torch.json"
      r=$?; [ $r -ne 0 ] && RC=1
      JSONS+=("$OUT/bench_torch.json")
      ;;
    *) echo "unknown phase $phase (parity, float32, bfloat16, torch, all)"; RC=2 ;;
  esac
done

EXISTING=()
for j in "${JSONS[@]}"; do [ -f "$j" ] && EXISTING+=("$j"); done
if [ ${#EXISTING[@]} -gt 0 ]; then
  echo "== merged table"
  $PY bench/bench.py --merge "${EXISTING[@]}" --out "$OUT/bench.json"
fi
if [ "${PROFILE:-0}" = 1 ] && [ -d /tmp/cn2_bench_profile ]; then
  tar -C /tmp -czf "$OUT/profile.tar.gz" cn2_bench_profile
  if [ "$(stat -c %s "$OUT/profile.tar.gz")" -gt 15000000 ]; then
    echo "== full profile too large for the 16 MB return limit: keeping only *.trace.json.gz"
    (cd /tmp && find cn2_bench_profile -name '*.trace.json.gz' -print0 |
        tar --null -czf "$OUT/profile.tar.gz" -T -)
  fi
  ls -la "$OUT/profile.tar.gz"
fi
echo "== done in $(( $(date +%s) - T0 )) s, exit $RC; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
return $RC
}

main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
