#!/usr/bin/env bash
# One prepared GPU check (../shared/GPU.md): build against the machine's torch, run the GPU tests,
# run the benchmarks side by side with bitsandbytes, write JSON + PNG into OUTDIR, print a short
# table last. Meant to finish in about 6-8 minutes on an H100/H200 (each benchmark has its own
# timeout; a benchmark cut short still leaves the others' tables).
#
#   bash benchmarks/gpu_check.sh OUTDIR        (the device tool: carry .whl, OUTDIR=$OUT)
#
# bitsandbytes comes from a wheel fetched beforehand into .whl/ (git-ignored):
#   pip download --no-deps bitsandbytes==0.50.2 -d .whl
set -uo pipefail
OUT="${1:-bench_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  log "bitsandbytes from .whl"
  python3 -m pip install -q --no-index --no-deps --target .site .whl/bitsandbytes-*.whl && export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
fi

log "build"
t0=$(date +%s)
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" \
  python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
python3 -c "import qlora_kernels as qk; from qlora_kernels.backends import backends_report; print(backends_report())"

log "GPU tests"
tests="tests/test_ops.py tests/test_nf4_linear.py tests/test_nf4_format.py"
for t in tests/test_lora_linear.py tests/test_qlora_linear.py tests/test_paged_adamw.py; do [ -f "$t" ] && tests="$tests $t"; done
timeout 240 python3 -m pytest -q -x -k "cuda" $tests 2>&1 | tee "$OUT/tests.log" | tail -15
test_rc=${PIPESTATUS[0]}

log "benchmarks"
timeout 200 python3 benchmarks/bench_nf4.py --out "$OUT" > "$OUT/bench_nf4.txt" 2> "$OUT/bench_nf4.err"; echo "bench_nf4 rc=$?"
[ -f benchmarks/bench_lora.py ] && { timeout 90 python3 benchmarks/bench_lora.py --out "$OUT" > "$OUT/bench_lora.txt" 2> "$OUT/bench_lora.err"; echo "bench_lora rc=$?"; }
[ -f benchmarks/bench_adamw.py ] && { timeout 90 python3 benchmarks/bench_adamw.py --out "$OUT" > "$OUT/bench_adamw.txt" 2> "$OUT/bench_adamw.err"; echo "bench_adamw rc=$?"; }
[ -f benchmarks/bench_e2e.py ] && { timeout 150 python3 benchmarks/bench_e2e.py --out "$OUT" > "$OUT/bench_e2e.txt" 2> "$OUT/bench_e2e.err"; echo "bench_e2e rc=$?"; }

log "summary (tests rc=$test_rc)"
for f in bench_nf4 bench_lora bench_adamw bench_e2e; do
  [ -s "$OUT/$f.txt" ] && { echo "--- $f"; cat "$OUT/$f.txt"; }
  [ -s "$OUT/$f.err" ] && [ ! -s "$OUT/$f.txt" ] && { echo "--- $f failed:"; tail -5 "$OUT/$f.err"; }
done
exit "$test_rc"
