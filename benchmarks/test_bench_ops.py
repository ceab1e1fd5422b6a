"""pytest-benchmark: NF4 dequantize and nf4_linear (M = 1, 8, 128) against bitsandbytes and a plain
bf16 ``F.linear``, on whichever device is present, with one thread and with all threads (CPU).

    python -m pytest benchmarks/test_bench_ops.py --benchmark-json=bench_out/ops.json \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

Weight 4096x4096 bf16, blocksize 64, double quantization (the setting of docs/PERFORMANCE.md). Not part of the
test suite: timing never decides pass or fail.
"""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
THREADS = sorted({1, torch.get_num_threads()}) if DEVICE == "cpu" else [torch.get_num_threads()]
N = K = 4096


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    w = torch.randn(N, K, dtype=torch.bfloat16, device=DEVICE)
    ours = qk.quantize_nf4(w, 64, True)
    q, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    return w, ours, q, state


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=THREADS, ids=lambda t: f"threads{t}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("provider", ["qlora_kernels", "bitsandbytes"])
def test_dequantize(benchmark, weights, provider, threads):
    w, ours, q, state = weights
    benchmark.group = f"dequantize {N}x{K} bf16 {DEVICE} threads={threads}"
    if provider == "qlora_kernels":
        fn = lambda: qk.dequantize_nf4(ours)  # noqa: E731
    else:
        fn = lambda: F.dequantize_4bit(q, state)  # noqa: E731
    benchmark(lambda: (fn(), _sync()))


@pytest.mark.parametrize("m", [1, 8, 128])
@pytest.mark.parametrize("provider", ["qlora_kernels", "bitsandbytes", "torch_bf16"])
def test_linear(benchmark, weights, provider, m, threads):
    w, ours, q, state = weights
    x = torch.randn(m, K, dtype=torch.bfloat16, device=DEVICE)
    benchmark.group = f"linear M={m} {N}x{K} bf16 {DEVICE} threads={threads}"
    if provider == "qlora_kernels":
        fn = lambda: qk.nf4_linear(x, ours)  # noqa: E731
    elif provider == "bitsandbytes":
        fn = lambda: bnb.matmul_4bit(x, q.t(), state)  # noqa: E731
    else:
        fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    with torch.no_grad():
        benchmark(lambda: (fn(), _sync()))
