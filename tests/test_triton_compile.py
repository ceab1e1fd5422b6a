"""The Triton kernels compile for real GPUs (sm_80, sm_90) without one: triton lowers them to PTX
and runs ptxas offline. The interpreter tests check the math; this checks what the interpreter
cannot (layouts, shapes the GPU backend rejects, shared memory that would not fit)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qlora_kernels.quant_maps import NESTED_BLOCKSIZE  # noqa: E402
from qlora_kernels.triton import nf4 as tri_nf4  # noqa: E402
from qlora_kernels.triton import nf4_matmul as tri_mm  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _compile(fn, signature, constexprs, capability, **options):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    except RuntimeError as exc:  # no ptxas / CUDA toolchain for triton on this machine
        if "ptxas" in str(exc).lower():
            pytest.skip(f"triton cannot assemble for sm_{capability} here: {exc}")
        raise


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_kernel_compiles(capability, nested):
    sig = {
        "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "nested_absmax_ptr": "*fp32",
        "nested_code_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*i16", "offset": "fp32", "numel": "i32",
        "blocksize": "i32", "NESTED": "constexpr", "OUT_BF16": "constexpr", "NESTED_BLOCK": "constexpr",
        "BLOCK_BYTES": "constexpr",
    }
    consts = {"NESTED": nested, "OUT_BF16": True, "NESTED_BLOCK": NESTED_BLOCKSIZE, "BLOCK_BYTES": 1024}
    k = _compile(tri_nf4._dequantize_nf4_kernel, sig, consts, capability, num_warps=4)
    assert k.metadata.shared <= SMEM_LIMIT[capability]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("m", [16, 64])
def test_fused_matmul_compiles(capability, transposed, blocksize, m):
    sig = {
        "x_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32",
        "nested_code_ptr": "*fp32", "code_ptr": "*fp32", "y_ptr": "*bf16", "offset": "fp32", "M": "i32", "N": "i32",
        "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "NESTED": "constexpr", "NESTED_BLOCK": "constexpr",
        "DOT_FP32": "constexpr", "BLOCKSIZE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_K": "constexpr",
    }
    block_m, block_out, block_red, warps, stages = tri_mm._config(m, 8192)
    if transposed:
        fn, bn, bk = tri_mm._nf4_matmul_t_kernel, block_red, block_out
    else:
        fn, bn, bk = tri_mm._nf4_matmul_kernel, block_out, block_red
    consts = {"NESTED": True, "NESTED_BLOCK": NESTED_BLOCKSIZE, "DOT_FP32": False, "BLOCKSIZE": blocksize,
              "BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk}
    k = _compile(fn, sig, consts, capability, num_warps=warps, num_stages=stages)
    assert k.metadata.shared <= SMEM_LIMIT[capability]
