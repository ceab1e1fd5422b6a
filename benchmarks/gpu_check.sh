#!/usr/bin/env bash
# The one prepared GPU check: measure the card (benchmarks/card_probe.py: name, memory, copy
# bandwidth, bf16 GEMM rate), build against the machine's torch (stopping at once if the CUDA
# backend is not live), run every GPU test, run the benchmarks side by side with bitsandbytes and
# torch bf16, and print the summary last: the card, and every GPU target judged as a ratio measured
# in this run (ours vs bitsandbytes and vs bf16; the memory-bound rows as a fraction of the card's
# copy bandwidth), so that it judges whichever card it got (H100 80 GB usually, H200 otherwise).
# Meant to finish in 7 minutes, build included, so that a rerun still fits a 15-minute device window.
#
#   bash benchmarks/gpu_check.sh OUTDIR                  # on the GPU machine (OUTDIR may be relative)
#   bash benchmarks/gpu_check.sh OUTDIR --cpu-rehearsal  # here, without a GPU: the same steps at tiny
#                                                        # sizes, so that only GPU facts can go wrong there
#
# Time: one deadline for the whole run (GPU_CHECK_BUDGET_S, default 420 s; 1800 s for the
# rehearsal, where each step's own limit is tripled). Each step gets its own limit or what is left
# of the budget, whichever is less; a step that cannot get 10 s is skipped.
# Every step's output is kept even if a later step is killed: after each step the work folder is
# packed again into OUTDIR, which then holds at most 7 files (the device returns 8):
#   summary.txt       the step status, the test counts and the target table (also printed last)
#   results.json      every result merged (card, tests, steps, targets, nf4/lora/adamw/e2e/e2e_ragged rows)
#   gpu_check.tar.gz  everything: logs of every step, the raw JSON (card.json included), the PNGs
#   nf4_speedup.png, lora.png, adamw.png (when written)
#
# bitsandbytes comes from a wheel fetched beforehand into .whl/ (git-ignored; carry it):
#   pip download --no-deps bitsandbytes==0.50.2 -d .whl
set -uo pipefail

OUT_ARG="${1:-bench_out/gpu_check}"
REHEARSAL=0
[ "${2:-}" = "--cpu-rehearsal" ] && REHEARSAL=1
mkdir -p "$OUT_ARG" && OUT="$(cd "$OUT_ARG" && pwd)"  # absolute before we change directory
cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
[ "$REHEARSAL" = 1 ] && BUDGET="${GPU_CHECK_BUDGET_S:-1800}"  # a 2-core CPU builds and benches slower
START=$(date +%s)
: > "$WORK/steps.tsv"

log() { echo "== $(date +%T) (+$(( $(date +%s) - START )) s) $*"; }

pack() {  # the summary and every artifact so far into OUT (cheap: run after every step)
  "$PY" "$ROOT/benchmarks/gpu_summary.py" "$WORK" --json "$WORK/results.json" > "$WORK/summary.txt" 2>&1
  cp "$WORK/summary.txt" "$WORK/results.json" "$OUT/" 2>/dev/null
  for png in nf4_speedup.png lora.png adamw.png; do [ -f "$WORK/$png" ] && cp "$WORK/$png" "$OUT/"; done
  tar -C "$WORK" -czf "$OUT/gpu_check.tar.gz.tmp" . && mv -f "$OUT/gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}

# step NAME LIMIT_S CMD...: run CMD with a timeout (its limit or the budget left), log to WORK/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  [ "$REHEARSAL" = 1 ] && limit=$(( limit * 3 ))  # the same steps on a small CPU: slower
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    log "$name: skipped, ${left} s of the budget left"
    printf '%s\t%s\t%s\t%s\n' "$name" 125 0 "$limit" >> "$WORK/steps.tsv"
    pack
    return 125
  fi
  log "$name (limit ${limit} s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$WORK/steps.tsv"
  tail -n 4 "$WORK/$name.log" | sed 's/^/   /'
  pack
  return "$rc"
}

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null; git -C "$ROOT" status --short 2>/dev/null | head -20
} | tee "$WORK/machine.log"
# The yardstick of this run, before anything else loads the card: card.json (the rehearsal: the CPU, small sizes).
if [ "$REHEARSAL" = 1 ]; then card_args=(--cpu); else card_args=(); fi
step card 30 "$PY" benchmarks/card_probe.py --out "$WORK" "${card_args[@]}"

if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  step bnb_wheel 60 "$PY" -m pip install -q --no-index --no-deps --target "$ROOT/.site" .whl/bitsandbytes-*.whl
  export PYTHONPATH="$ROOT/.site${PYTHONPATH:+:$PYTHONPATH}"  # (the checkout goes in front below)
else
  log "no .whl/bitsandbytes-*.whl: bitsandbytes is compared only if it is already installed"
fi

# The build must be real: C++ kernels and CUDA objects compiled, or stop here.
export QLORA_KERNELS_REQUIRE_CPP=1 QLORA_KERNELS_REQUIRE_CUDA_BUILD=1
[ "$REHEARSAL" = 0 ] && export QLORA_KERNELS_REQUIRE_GPU=1
# In place, against the machine's own torch; this checkout comes first on the path (no install needed).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! step build 240 env MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" \
    "$PY" setup.py build_ext --inplace; then
  log "BUILD FAILED (see build.log in $OUT/gpu_check.tar.gz)"; tail -n 40 "$WORK/build.log"; pack; exit 3
fi
if [ "$REHEARSAL" = 1 ]; then
  live_check='import qlora_kernels as qk; from qlora_kernels import _extension; from qlora_kernels.backends import backends_report
print(backends_report()); b = qk.backends("cpu")
assert b["cpp"].live and _extension.cuda_compiled(), "the C++ kernels or the CUDA objects were not built"'
else
  live_check='import qlora_kernels as qk; from qlora_kernels.backends import backends_report
print(backends_report()); b = qk.backends("cuda")
bad = {k: b[k].reason for k in ("cuda", "triton") if not b[k].live}
assert not bad, f"GPU backends not live: {bad}"'
fi
if ! step backends 60 "$PY" -c "$live_check"; then
  log "STOP: the kernels this check is about are not live"; cat "$WORK/backends.log"; pack; exit 4
fi

# Every GPU test (the gpu marker: all tests on the cuda device, plus the GPU-only ones), stopping after
# 25 failures so that one broken kernel cannot hide the rest; the counts go into the summary.
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)
step tests 120 "$PY" -m pytest -q -m gpu --maxfail=25 -p no:cacheprovider "${xdist[@]}" tests
tests_rc=$?

# FSDP2 on the hardware: the trainer's sharded path over a process group of one (nccl on the GPU, gloo in the
# rehearsal; fsdp_config.shard_one_process), 4 steps of the demo's SFT with a sharded checkpoint; the log says
# "fully sharded (FSDP2) over 1 processes (nccl)"; its output (fsdp.json, metrics) lands in the tarball.
if [ "$REHEARSAL" = 1 ]; then smoke_device=cpu; else smoke_device=cuda; fi
step fsdp_smoke 60 "$PY" -m qlora_kernels.train examples/sft_tiny.yaml max_steps=4 eval_steps=4 save_steps=4 \
  micro_batch_size=8 output_dir="$WORK/fsdp_smoke" fsdp=true fsdp_config.shard_one_process=true \
  device="$smoke_device" progress_bar=false

if [ "$REHEARSAL" = 1 ]; then quick=(--quick); else quick=(); fi
# The rehearsal times two of the target shapes (at M <= 128), so that the summary computes its ratios there too.
nf4_args=("${quick[@]}")
[ "$REHEARSAL" = 1 ] && nf4_args+=(--shapes 4096x4096,8192x8192 --ms 1,8,32,128)
step bench_nf4 90 "$PY" benchmarks/bench_nf4.py --out "$WORK" "${nf4_args[@]}"
step bench_lora 60 "$PY" benchmarks/bench_lora.py --out "$WORK" "${quick[@]}"
step bench_adamw 75 "$PY" benchmarks/bench_adamw.py --out "$WORK" "${quick[@]}"
# GRPO steps/s and memory, ours vs TRL's GRPOTrainer (bitsandbytes + PEFT, and on ours): the tiny model, quick
step bench_grpo 60 "$PY" benchmarks/bench_grpo.py --out "$WORK" --quick
if [ "$REHEARSAL" = 1 ]; then
  step bench_e2e 90 "$PY" benchmarks/bench_e2e.py --out "$WORK" --quick
  step bench_e2e_ragged 90 "$PY" benchmarks/bench_e2e.py --out "$WORK" --quick --data ragged
  step bench_mlp 40 "$PY" benchmarks/bench_lora.py --mlp --quick --out "$WORK"
else
  step bench_e2e 75 "$PY" benchmarks/bench_e2e.py --out "$WORK" --shapes 1b
  # ragged lengths, each provider its best batching (ours packed; theirs padded, and padding-free)
  step bench_e2e_ragged 75 "$PY" benchmarks/bench_e2e.py --out "$WORK" --data ragged --shapes 1b
  step bench_mlp 40 "$PY" benchmarks/bench_lora.py --mlp --out "$WORK"  # the fused QLoRA MLP vs unfused
  # the 8B shape if the budget allows (its own file, merged below)
  if step bench_e2e_8b 90 "$PY" benchmarks/bench_e2e.py --out "$WORK/e2e_8b" --shapes 8b; then :; fi
  "$PY" - "$WORK" <<'EOF'
import json, sys, pathlib
work = pathlib.Path(sys.argv[1])
try:
    main, extra = json.loads((work / "e2e.json").read_text()), json.loads((work / "e2e_8b" / "e2e.json").read_text())
    main["rows"] += extra.get("rows", [])
    (work / "e2e.json").write_text(json.dumps(main, indent=1))
except (OSError, ValueError, KeyError):
    pass
EOF
fi

pack
log "summary (GPU tests rc=$tests_rc; results in $OUT)"
cat "$WORK/summary.txt"
exit "$tests_rc"
