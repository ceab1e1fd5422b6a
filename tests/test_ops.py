"""The op registry: opcheck, every backend against the reference, backend forcing, dispatch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _extension
from qlora_kernels.ops import _dispatch
from qlora_kernels.reference import nf4 as ref

from . import bounds
from .conftest import DTYPES

OPS = torch.ops.qlora_kernels
HAS_CPP = _dispatch.status("cpp", "cpu")[0]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ backend not live: {_dispatch.status('cpp', 'cpu')[1]}")
HAS_TRITON = importable = _dispatch._triton_import_error() is None


def _weight(shape, blocksize=64, nested=True, device="cpu", dtype=torch.float32):
    return qk.quantize_nf4(torch.randn(shape, dtype=dtype, device=device), blocksize, nested)


def _backends_for(device):
    if device == "cpu":
        return ["reference"] + (["cpp"] if HAS_CPP else [])
    return ["reference"] + [b for b in ("cuda", "triton") if _dispatch.status(b, "cuda")[0]]


@pytest.mark.parametrize("nested", [False, True])
def test_opcheck_every_op(nested, device):
    qw = _weight((48, 96), 64, nested, device)
    w = torch.randn(33, 65, device=device)
    torch.library.opcheck(OPS.quantize_nf4.default, (w.reshape(-1), 64))
    torch.library.opcheck(OPS.dequantize_nf4.default, (*qw.tensors(), qw.numel, torch.bfloat16))
    x = torch.randn(5, 96, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(OPS.nf4_matmul.default, (x, *qw.tensors(), 48, 96, False))
    dy = torch.randn(5, 48, device=device)
    torch.library.opcheck(OPS.nf4_matmul.default, (dy, *qw.tensors(), 48, 96, True))
    out = torch.empty(qw.numel, device=device, dtype=torch.float16)
    torch.library.opcheck(OPS.dequantize_nf4_into.default, (*qw.tensors(), qw.numel, out))


def test_reference_quantizer_in_chunks_is_identical(monkeypatch):
    from qlora_kernels.ops import nf4 as ops_nf4

    w = torch.randn(37, 129)  # odd numel, a partial last block
    whole = ref.quantize_nf4(w, 64)
    monkeypatch.setattr(ops_nf4, "_QUANTIZE_CHUNK", 256)
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "reference")
    p, a = OPS.quantize_nf4(w.reshape(-1), 64)
    assert torch.equal(p, whole[0]) and torch.equal(a, whole[1])


def test_dequantize_into_writes_the_buffer(device):
    qw = _weight((40, 96), 32, True, device)
    for dtype in DTYPES:
        out = torch.full((40 * 96,), float("nan"), dtype=dtype, device=device)
        OPS.dequantize_nf4_into(*qw.tensors(), qw.numel, out)
        assert torch.equal(out, ref.dequantize_nf4(*qw.tensors(), qw.numel, dtype))
    with pytest.raises(ValueError, match="out must be contiguous with numel = 3840"):
        OPS.dequantize_nf4_into(*qw.tensors(), qw.numel, torch.empty(100, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 1024])
@pytest.mark.parametrize("shape", [(5, 123), (1, 7), (64, 64), (3, 4097), (40, 96)])
def test_every_backend_quantize_dequantize_bitwise(shape, blocksize, dtype, device, monkeypatch):
    w = torch.randn(shape, dtype=dtype, device=device)
    p_ref, a_ref = ref.quantize_nf4(w, blocksize)
    for backend in _backends_for(device):
        monkeypatch.setenv("QLORA_KERNELS_BACKEND", backend)
        p, a = OPS.quantize_nf4(w.reshape(-1), blocksize)
        assert torch.equal(p, p_ref) and torch.equal(a, a_ref), backend
        for nested in (False, True):
            qw = qk.quantize_nf4(w, blocksize, nested)
            out = torch.full(shape, float("nan"), dtype=dtype, device=device)  # poisoned
            out.copy_(qk.dequantize_nf4(qw))
            assert torch.equal(out.reshape(-1), ref.dequantize_nf4(*qw.tensors(), qw.numel, dtype)), backend


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 7, 33])
@pytest.mark.parametrize("shape", [(5, 123), (64, 64), (96, 130), (17, 4096)])
def test_every_backend_matmul_against_reference(shape, m, dtype, transposed, device, monkeypatch):
    n, k = shape
    qw = _weight(shape, 64, True, device)
    x = torch.randn(m, n if transposed else k, dtype=dtype, device=device)
    expect = ref.nf4_matmul(x, *qw.tensors(), n, k, transposed).float()
    w = ref.dequantize_nf4(*qw.tensors(), n * k, torch.float32).view(n, k)
    bound, why = bounds.kernel_matmul(x, w.t() if transposed else w, expect)
    for backend in _backends_for(device):
        monkeypatch.setenv("QLORA_KERNELS_BACKEND", backend)
        y = OPS.nf4_matmul(x, *qw.tensors(), n, k, transposed)
        assert y.dtype == dtype and y.shape == expect.shape
        bounds.assert_within(f"{backend} nf4_matmul", y, expect, bound, why=why)


@pytest.mark.skipif(not HAS_CPP, reason="C++ backend not built")
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("k", [64, 160, 192, 224, 1024, 1088, 4160, 8320])
def test_cpp_small_m_gemv_against_reference(blocksize, nested, k):
    """The C++ GEMV that reads the NF4 bytes directly (AVX-512 / AVX2; scalar under ATEN_CPU_CAPABILITY=default):
    whole and partial 64-byte lines (K % 128 == 32, 64, 96: a last piece of 16, 32 or 48 bytes a row), blocks
    smaller and larger than a line, odd N, poisoned memory around nothing (the output is fully written). The bf16
    kernel at M = 1: rows whole, or 8 side by side with a remainder (K > 8192); from M = 2: groups of 8 rows
    (N = 37: a partial group, rows of a half group past N), passes of 4 x rows with a remainder (M = 11), blocks
    ending inside a line (32, 64) or spanning lines (256); 17 blocks a row (K = 1088) decode double-quant scales
    in groups of 16 that straddle a nested block."""
    if k % blocksize:
        pytest.skip("K is not a multiple of the blocksize: not this kernel")
    n = 37
    qw = _weight((n, k), blocksize, nested)
    w = ref.dequantize_nf4(*qw.tensors(), n * k, torch.float32).view(n, k)
    kernel = _extension.kernel("nf4_matmul")
    for m in (1, 2, 3, 8, 11, 16, 33, 64):  # (it serves fp32 x up to M = 32, fp16 up to 64, bf16 up to 16)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(m, k) * torch.rand(m, 1)).to(dtype)
            want = ref.nf4_matmul(x, *qw.tensors(), n, k, False)
            got = kernel(x, qw.packed.reshape(-1), *qw.tensors()[1:], n, k, False)
            assert got.dtype == dtype and got.shape == (m, n)
            bounds.assert_within(f"gemv m={m} {dtype}", got, want, *bounds.kernel_matmul(x, w, want.float()))


def _decode_layout_live() -> bool:
    from qlora_kernels.ops import nf4 as ops_nf4

    return HAS_CPP and ops_nf4.decode_layouts_on()


@pytest.mark.skipif(not _decode_layout_live(), reason="CPU decode layout: needs the C++ backend and avx512_bf16")
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("k", [64, 160, 1024, 1088])
def test_cpp_decode_layout_matmul_against_reference(blocksize, nested, k):
    """The CPU decode layout (tiles of 16 rows) and its bf16 matmul: N = 37 (a partial last tile), M = 1..16 (passes
    of 8 with a remainder) up to 512 (the largest M it serves), blocks of 4, 8 or 32 lines, K not a multiple of 128
    (160), 17 blocks a row (1088: double-quant scales decoded in groups that straddle a nested block)."""
    if k % blocksize:
        pytest.skip("K is not a multiple of the blocksize")
    n = 37
    qw = _weight((n, k), blocksize, nested)
    w = ref.dequantize_nf4(*qw.tensors(), n * k, torch.float32).view(n, k)
    packed, absmax, code, nested_absmax, nested_code, offset, _ = qw.tensors()
    tiled = _extension.kernel("nf4_tile")(packed.reshape(-1), absmax, nested_absmax, nested_code, offset, blocksize,
                                          n, k)
    assert tiled.numel() == 3 * 64 * (k // 8 + k // blocksize)  # 3 tiles: their code lines and a scale line a block
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 64, 129, 512):  # every pass width (1-8 x rows), passes of 8 + a rest
        x = (torch.randn(m, k) * torch.rand(m, 1)).bfloat16()
        want = ref.nf4_matmul(x, *qw.tensors(), n, k, False)
        got = _extension.kernel("nf4_matmul_tiled")(x, tiled, code, blocksize, n, k)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        bounds.assert_within(f"decode layout m={m}", got, want, *bounds.kernel_matmul(x, w, want.float()))


@pytest.mark.skipif(not _decode_layout_live(), reason="CPU decode layout: needs the C++ backend and avx512_bf16")
def test_a_row_that_is_not_whole_blocks_keeps_to_the_stored_layout():
    """K = 96 at blocksize 64 (a block spans two rows): the decode layout cannot hold its scales per row, so an eager
    inference call takes another kernel and gives the formula's result, with no layout made."""
    from qlora_kernels.ops import nf4 as ops_nf4

    ops_nf4.release_decode_layouts()
    qw = _weight((40, 96), 64)
    x = torch.randn(3, 96).bfloat16()
    with torch.inference_mode():
        y = qk.nf4_linear(x, qw)
    assert not ops_nf4.has_decode_layout(qw.packed)
    w = ref.dequantize_nf4(*qw.tensors(), 40 * 96, torch.float32).view(40, 96)
    want = ref.nf4_matmul(x, *qw.tensors(), 40, 96, False)
    bounds.assert_within("K = 96, blocksize 64", y, want, *bounds.kernel_matmul(x, w, want.float()))


@pytest.mark.skipif(not _decode_layout_live(), reason="CPU decode layout: needs the C++ backend and avx512_bf16")
def test_decode_layout_is_made_once_per_weight_and_follows_it(monkeypatch):
    """Eager inference calls make a weight's decode layout once and reuse it; an in-place write to the codes or to
    the block scales makes it anew (the new values are used); the layout goes with its weight; the op itself
    (compiled graphs, autograd) and QLORA_KERNELS_CPU_DECODE_LAYOUT=0 keep to the stored layout."""
    import gc

    from qlora_kernels.ops import nf4 as ops_nf4

    ops_nf4.release_decode_layouts()
    qw, other = _weight((40, 256)), _weight((40, 256))
    x = torch.randn(2, 256).bfloat16()
    with torch.inference_mode():
        y = qk.nf4_linear(x, qw)
        first = ops_nf4.decode_layout(qw.packed, qw.tensors(), 40, 256)
        qk.nf4_linear(x, qw)
        assert len(ops_nf4._LAYOUTS) == 1 and ops_nf4.decode_layout(qw.packed, qw.tensors(), 40, 256) is first
        torch.testing.assert_close(y, ref.nf4_matmul(x, *qw.tensors(), 40, 256, False), rtol=0.02, atol=0.05)
    with torch.no_grad():
        qw.packed.copy_(other.packed)  # same tensor, new codes
    with torch.inference_mode():
        y2 = qk.nf4_linear(x, qw)
        second = ops_nf4.decode_layout(qw.packed, qw.tensors(), 40, 256)
        assert second is not first
        torch.testing.assert_close(y2, ref.nf4_matmul(x, *qw.tensors(), 40, 256, False), rtol=0.02, atol=0.05)
    with torch.no_grad():
        qw.absmax.copy_(other.absmax)  # same tensors, new block scales: the layout holds them too
    with torch.inference_mode():
        y3 = qk.nf4_linear(x, qw)
        assert ops_nf4.decode_layout(qw.packed, qw.tensors(), 40, 256) is not second
        torch.testing.assert_close(y3, ref.nf4_matmul(x, *qw.tensors(), 40, 256, False), rtol=0.02, atol=0.05)
        # the op (what a compiled graph calls) takes the layout eager calls made, under inference mode only
        calls = []
        real = ops_nf4._extension.kernel

        def spy(name):
            calls.append(name)
            return real(name)

        monkeypatch.setattr(ops_nf4._extension, "kernel", spy)
        OPS.nf4_matmul(x, *qw.tensors(), 40, 256, False)
        assert calls[-1] == "nf4_matmul_tiled"
    OPS.nf4_matmul(x, *qw.tensors(), 40, 256, False)
    assert calls[-1] == "nf4_matmul"
    monkeypatch.undo()
    del qw
    gc.collect()
    assert not ops_nf4._LAYOUTS  # freed with its weight
    with torch.inference_mode():
        OPS.nf4_matmul(x, *other.tensors(), 40, 256, False)
        assert not ops_nf4._LAYOUTS
        monkeypatch.setenv(ops_nf4.DECODE_LAYOUT_VAR, "0")
        qk.nf4_linear(x, other)
        assert not ops_nf4._LAYOUTS


def test_matmul_relative_error_bf16_is_small(device):
    # The bar: bf16 relative error <= 1e-2 against the fp32 reference on random data.
    qw = _weight((256, 512), 64, True, device)
    x = torch.randn(16, 512, device=device, dtype=torch.bfloat16)
    expect = ref.nf4_matmul(x.float(), *qw.tensors(), 256, 512, False)
    y = OPS.nf4_matmul(x, *qw.tensors(), 256, 512, False).float()
    assert float((y - expect).norm() / expect.norm()) <= 1e-2


def test_forced_backend_runs_that_backend_or_raises(monkeypatch):
    qw = _weight((8, 64))
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="QLORA_KERNELS_BACKEND must be one of"):
        qk.dequantize_nf4(qw)
    # cuda implements nothing for CPU tensors: forcing it there is an error naming what does
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"cuda does not implement dequantize_nf4 on cpu \(implemented there by: "):
        qk.dequantize_nf4(qw)
    if not torch.cuda.is_available():
        monkeypatch.setenv("QLORA_KERNELS_BACKEND", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="not live"):
            _dispatch.choose("dequantize_nf4", torch.device("cpu"))
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "reference")
    assert _dispatch.choose("nf4_matmul", torch.device("cpu"), m=1, k=64, blocksize=64, transposed=False,
                            gemv_max_m=4, fused_max_m=64).backend == "reference"
    monkeypatch.delenv("QLORA_KERNELS_BACKEND")
    expected = "cpp" if HAS_CPP else "reference"
    assert _dispatch.choose("dequantize_nf4", torch.device("cpu")).backend == expected
    # the default on the CPU never picks triton's interpreter rows
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.choose("dequantize_nf4", torch.device("cpu")).backend == expected


def _facts(m, k=4096, blocksize=64, transposed=False, gemv_max_m=4, fused_max_m=64):
    return dict(m=m, k=k, blocksize=blocksize, transposed=transposed, gemv_max_m=gemv_max_m,
                fused_max_m=fused_max_m)


def test_matmul_table_picks_by_backend_and_shape(monkeypatch):
    # The GPU rows, chosen without a GPU: every row's rule, and a forced backend never runs another's kernel.
    from qlora_kernels.ops import nf4 as ops_nf4

    monkeypatch.setattr(_dispatch, "_live", lambda row, dtype_: True)
    monkeypatch.setattr(_dispatch, "_cached_status", lambda b, d, i: (True, "pretend"))
    monkeypatch.setattr(_dispatch.Kernel, "registered", lambda self, d: True)
    cuda = torch.device("cuda")
    monkeypatch.delenv("QLORA_KERNELS_BACKEND", raising=False)
    pick = lambda **f: (lambda r: (r.backend, r.name))(_dispatch.choose("nf4_matmul", cuda, **_facts(**f)))  # noqa: E731
    assert pick(m=1) == ("cuda", "GEMV")
    assert pick(m=1, transposed=True) == ("triton", "fused")
    assert pick(m=5) == ("triton", "fused")
    assert pick(m=64) == ("triton", "fused")
    assert pick(m=65) == ("cuda", "dequantize + cuBLAS")
    assert pick(m=1, k=96) == ("cuda", "dequantize + cuBLAS")  # K % blocksize != 0: no fused kernel
    assert pick(m=4, gemv_max_m=0) == ("triton", "fused")  # thresholds from QLORA_KERNELS_*_MAX_M
    assert pick(m=100, fused_max_m=128) == ("triton", "fused")
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cuda")
    assert pick(m=8) == ("cuda", "dequantize + cuBLAS")  # forced cuda never runs the Triton kernel
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "triton")
    assert pick(m=1) == ("triton", "fused")
    assert pick(m=1000) == ("triton", "dequantize + cuBLAS")
    assert ops_nf4.MATMUL[0].backend == "cpp"


def test_readme_backend_table_is_the_dispatch_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert _dispatch.markdown_table() in readme, "README's backend table: paste ops._dispatch.markdown_table()"


def test_backends_list_their_kernels():
    status = qk.backends()
    names = {k.split(":")[0] for k in status["reference"].kernels}
    assert names == set(_dispatch.TABLE)
    assert any(k.startswith("nf4_matmul: GEMV") for k in qk.backends("cuda")["cuda"].kernels)


def test_backends_report_is_honest():
    status = qk.backends()
    assert set(status) == {"reference", "cpp", "cuda", "triton"}
    assert status["reference"].live
    assert status["cpp"].live == HAS_CPP
    assert status["cuda"].live == (_extension.cuda_compiled() and torch.cuda.is_available())
    for s in status.values():
        assert s.reason


@pytest.mark.skipif(os.environ.get("QLORA_KERNELS_REQUIRE_CPP") != "1", reason="set by .ci/run after building")
def test_extension_was_built_with_cuda_objects_when_required():
    # CI compiles the extension including its CUDA objects (torch has CUDA and nvcc is there).
    assert HAS_CPP, _dispatch.status("cpp", "cpu")[1]
    if os.environ.get("QLORA_KERNELS_REQUIRE_CUDA_BUILD") == "1":
        assert _extension.cuda_compiled()


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("QLORA_KERNELS_REQUIRE_GPU") != "1", reason="set by benchmarks/gpu_check.sh")
def test_gpu_backends_are_live_when_required():
    # On the GPU machine nothing may silently fall back: the CUDA kernels were built and load, a
    # device is visible, and triton runs on it.
    for backend in ("cuda", "triton"):
        live, why = _dispatch.status(backend, "cuda")
        assert live, f"{backend}: {why}"
