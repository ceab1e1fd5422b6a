#!/usr/bin/env bash
# The numerics sweep: the tests that compare computations which round differently (they take their
# tolerances from tests/bounds.py), run under every CPU capability torch can pick on this machine and with
# 1 and 2 threads, each configuration in its own process tree. A tolerance tuned to one machine's rounding
# fails here on the machine that has it; one derived from the arithmetic passes everywhere.
#
#   bash tests/numerics_sweep.sh                    # default, avx2 and native capability x 1 and 2 threads
#   bash tests/numerics_sweep.sh avx2:2 native:1    # chosen configurations (CAPABILITY:THREADS)
#   SWEEP_TESTS="tests/test_fsdp.py" bash tests/numerics_sweep.sh default:1   # chosen tests
#
# ATEN_CPU_CAPABILITY caps torch's vector kernels (default = no vectorization, avx2, or unset = the best the
# CPU has) and our C++ kernels alike (qlora-kernels backends prints the ISA they run); "native" leaves it
# unset. QLORA_KERNELS_TEST_THREADS sets the thread count of the tests that pin one (the one_thread fixture)
# and OMP_NUM_THREADS that of every process (torchrun ranks too). Each configuration gets a fresh
# torch.compile cache: inductor's on-disk cache does not key its precompiled header on the capability, and
# a kernel built under one capability fails to compile under another.
# Exit status: the number of configurations that failed (0: all passed). On 2 cores: ~3 min a configuration.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(default:1 default:2 avx2:1 avx2:2 native:1 native:2)
if [ -n "${SWEEP_TESTS:-}" ]; then
  read -r -a tests <<< "$SWEEP_TESTS"
else
  # every file that uses the bounds, and the model-level comparisons (ours vs PEFT / bitsandbytes / TRL)
  mapfile -t tests < <(grep -l "import bounds" tests/test_*.py)
  tests+=(tests/test_dpo.py tests/test_hf.py tests/test_hf_loading.py tests/test_hf_quantizer.py
          tests/test_hf_experts.py tests/test_peft_backend.py tests/test_trainers.py tests/test_nf4_experts.py
          tests/test_paged_adamw.py)
  mapfile -t tests < <(printf '%s\n' "${tests[@]}" | sort -u)
fi
failed=0
summary=()
for c in "${configs[@]}"; do
  cap=${c%%:*}
  threads=${c##*:}
  case "$cap" in default|avx2|avx512|native) ;; *) echo "unknown capability '$cap' in '$c' (default, avx2, avx512, native)"; exit 2 ;; esac
  cache=$(mktemp -d "${TMPDIR:-/tmp}/sweep_inductor.XXXXXX")
  envs=(OMP_NUM_THREADS="$threads" QLORA_KERNELS_TEST_THREADS="$threads" TORCHINDUCTOR_CACHE_DIR="$cache")
  if [ "$cap" = native ]; then run=(env -u ATEN_CPU_CAPABILITY "${envs[@]}"); else run=(env ATEN_CPU_CAPABILITY="$cap" "${envs[@]}"); fi
  echo "== $c: $("${run[@]}" "$PY" -c 'import torch, qlora_kernels as qk
from qlora_kernels import _extension
print("torch", torch.backends.cpu.get_cpu_capability(), "| our C++ kernels", _extension.cpu_isa(), "| threads", torch.get_num_threads())')"
  t0=$(date +%s)
  "${run[@]}" "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tail -n 3
  rc=${PIPESTATUS[0]}
  rm -rf "$cache"
  summary+=("$c: $([ "$rc" -eq 0 ] && echo passed || echo "FAILED (exit $rc)") in $(( $(date +%s) - t0 )) s")
  [ "$rc" -ne 0 ] && failed=$((failed + 1))
done
echo "== numerics sweep (${#tests[@]} test files)"
printf '%s\n' "${summary[@]}"
exit "$failed"
