#!/usr/bin/env bash
# The GPU measurements of this project in one run on an H100 or H200, under 8 minutes:
#   1. the GPU tests (pytest -m gpu over tests/autotune and tests/kernels)           <= 90 s
#   2. benchmarks/matmul.py  -> $OUT_DIR/matmul_<gpu>_bf16.json                      <= 135 s
#   3. benchmarks/conv.py    -> $OUT_DIR/conv_<gpu>_bf16.json                        <= 140 s
#   4. benchmarks/int8.py    -> $OUT_DIR/int8_<gpu>.json (needs $TINYPALLAS_MODELS)  <= 75 s
# With --llama, the LLaMA decode measurements instead (issue 12), also under 8 minutes:
#   1. pytest -m gpu tests/kernels/llm tests/models/test_llama_decode_kernels.py       <= 80 s
#   2. benchmarks/llama.py --format bf16 --profile -> $OUT_DIR/llama_<gpu>_bf16.json   <= 160 s
#   3. benchmarks/llama.py --format w4a16 --profile -> $OUT_DIR/llama_<gpu>_w4a16.json <= 160 s
#   4. benchmarks/llama.py --sweep (GEMV configs, portable and Mosaic GPU bodies)    <= 60 s
# and $OUT_DIR/gpu_check[_llama]_<gpu>.json: each stage's command, exit status, seconds, whether it
# reached its time limit, and the end of its output. A stage cut short by its limit keeps the rows it
# finished (the benchmarks write their JSON after every row); a failed stage does not stop the next.
#
#   bash benchmarks/gpu_check.sh [--llama]            # on the GPU; writes benchmarks/results/*_h200_*.json
#   bash benchmarks/gpu_check.sh [--llama] --dry-run  # anywhere (CPU): the same stages on tiny problems, into a
#                                                     # temporary folder, to know that every stage starts
# Environment: PYTHON (default .venv/bin/python, else python3); TINYPALLAS_MODELS (folder of the
# .tflite models, default ../shared/tflite); OUT_DIR (default benchmarks/results, dry run: a temp folder).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

DRY=0
LLAMA=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --llama) LLAMA=1 ;;
    *) echo "error: unknown argument ${arg}; use --llama, --dry-run or nothing" >&2; exit 2 ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if [ "$DRY" = 1 ]; then OUT_DIR=${OUT_DIR:-$(mktemp -d)}; else OUT_DIR=${OUT_DIR:-benchmarks/results}; fi
mkdir -p "$OUT_DIR"
LOGS=$(mktemp -d)
# Compiled executables are cached on disk, so the configs a sweep compiled are not compiled again
# when the benchmark compares them (the timings are unaffected).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$LOGS/jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

# Preflight: the packages each stage imports, and the device.
if ! TAG=$("$PY" - "$DRY" <<'EOF'
import importlib.util, re, sys
dry = sys.argv[1] == "1"
missing = [m for m in ("jax", "numpy", "optuna", "sqlalchemy", "rich", "pytest", "hypothesis", "tflite")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing Python packages for the GPU check: {', '.join(missing)}; install the project "
             "with its test extras (pip install -e '.[test]') or carry their wheels")
import jax
from tuning import platform
if not dry and platform.backend() != "gpu":
    sys.exit(f"error: no NVIDIA GPU here (jax backend {jax.default_backend()!r}); run with --dry-run to check "
             "that the stages start")
kind = platform.device_kind()
print(next((t for t in ("h200", "h100") if t.upper() in kind), re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")))
EOF
); then
  exit 2
fi
echo "gpu_check: device tag '$TAG', python $PY, results in $OUT_DIR"

WORST=0
run_stage() {  # name limit_seconds command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start end rc
  start=$(date +%s.%N)
  timeout --signal=INT --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  end=$(date +%s.%N)
  echo "== $name: exit $rc after $(awk "BEGIN { printf \"%.1f\", $end - $start }")s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$start" "$end" "$limit" "$*" >>"$LOGS/stages.tsv"
  [ "$rc" -gt "$WORST" ] && WORST=$rc
  return 0
}

TESTS=(tests/autotune/test_measure.py tests/kernels)
MODELS=${TINYPALLAS_MODELS:-../shared/tflite}
LLAMA_TESTS=(tests/kernels/llm tests/models/test_llama_decode_kernels.py)
if [ "$LLAMA" = 1 ] && [ "$DRY" = 1 ]; then
  run_stage gpu_tests 120 "$PY" -m pytest -o addopts= -p no:cacheprovider -q -m gpu --collect-only "${LLAMA_TESTS[@]}"
  run_stage llama_bf16 300 "$PY" benchmarks/llama.py --gpu-path --quick --format bf16 --batches 1 --profile \
    --out "$OUT_DIR/llama_${TAG}_bf16_dry.json"
  run_stage llama_w4a16 300 "$PY" benchmarks/llama.py --gpu-path --quick --format w4a16 --batches 1 --profile \
    --out "$OUT_DIR/llama_${TAG}_w4a16_dry.json"
  run_stage gemv_sweep 300 "$PY" benchmarks/llama.py --sweep --quick --format none \
    --out "$OUT_DIR/llama_gemv_sweep_${TAG}_dry.json"
elif [ "$LLAMA" = 1 ]; then
  run_stage gpu_tests 80 "$PY" -m pytest -o addopts= -p no:cacheprovider -q -m gpu "${LLAMA_TESTS[@]}"
  run_stage llama_bf16 160 "$PY" benchmarks/llama.py --format bf16 --profile --batches 1 4 16 \
    --out "$OUT_DIR/llama_${TAG}_bf16.json"
  run_stage llama_w4a16 160 "$PY" benchmarks/llama.py --format w4a16 --profile --batches 1 4 16 \
    --out "$OUT_DIR/llama_${TAG}_w4a16.json"
  run_stage gemv_sweep 60 "$PY" benchmarks/llama.py --sweep --format none --out "$OUT_DIR/llama_gemv_sweep_${TAG}.json"
elif [ "$DRY" = 1 ]; then
  run_stage gpu_tests 120 "$PY" -m pytest -o addopts= -p no:cacheprovider -q -m gpu --collect-only "${TESTS[@]}"
  run_stage matmul 120 "$PY" benchmarks/matmul.py --shapes 32x48x40 --trials 1 --rounds 10 \
    --out "$OUT_DIR/matmul_${TAG}_dry.json"
  run_stage conv 120 "$PY" benchmarks/conv.py --quick --limit 1 --skip-layouts --rounds 10 \
    --out "$OUT_DIR/conv_${TAG}_dry.json"
  run_stage int8 120 "$PY" benchmarks/int8.py --quick --limit 1 --rounds 10 --models "$MODELS" \
    --out "$OUT_DIR/int8_${TAG}_dry.json"
else
  run_stage gpu_tests 90 "$PY" -m pytest -o addopts= -p no:cacheprovider -q -m gpu "${TESTS[@]}"
  # 4096^3, 8192^3 and the LLaMA-7B projections at M=2048 (the goal shapes), 1024^3, two decode shapes.
  run_stage matmul 135 "$PY" benchmarks/matmul.py --trials 5 --rounds 20 \
    --shapes 4096x4096x4096 8192x8192x8192 2048x4096x4096 2048x11008x4096 2048x4096x11008 \
    1024x1024x1024 1x4096x4096 16x4096x4096 \
    --out "$OUT_DIR/matmul_${TAG}_bf16.json"
  run_stage conv 140 "$PY" benchmarks/conv.py --configs 1 --rounds 20 --out "$OUT_DIR/conv_${TAG}_bf16.json"
  run_stage int8 75 "$PY" benchmarks/int8.py --all --batch 256 --rounds 20 --models "$MODELS" \
    --out "$OUT_DIR/int8_${TAG}.json"
fi

SUFFIX=""
[ "$LLAMA" = 1 ] && SUFFIX=_llama
[ "$DRY" = 1 ] && SUFFIX=${SUFFIX}_dry
"$PY" - "$OUT_DIR/gpu_check_${TAG}${SUFFIX}.json" "$LOGS" "$DRY" <<'EOF'
import pathlib, sys
from autotune import results
out, logs, dry = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
stages = []
for line in (logs / "stages.tsv").read_text().splitlines():
    name, rc, start, end, limit, command = line.split("\t")
    log = logs / f"{name}.log"
    stages.append({"stage": name, "command": command, "exit": int(rc), "seconds": round(float(end) - float(start), 1),
                   "limit_seconds": int(limit), "reached_limit": int(rc) in (124, 137),
                   "output_tail": log.read_text(errors="replace")[-4000:] if log.exists() else ""})
doc = {"check": "gpu_check.sh" + (" --llama" if "llama" in out else "") + (" --dry-run" if dry else ""), "env": results.environment(),
       "total_seconds": round(sum(s["seconds"] for s in stages), 1), "stages": stages}
results.save_json(out, doc)
print(f"wrote {out}: " + ", ".join(f"{s['stage']} exit {s['exit']} in {s['seconds']}s" for s in stages))
EOF
rm -rf "$LOGS"
[ "$WORST" = 0 ]
