"""The Triton kernels compile for real GPUs (sm_80, sm_90) without one: triton lowers them to PTX
and runs ptxas offline. The interpreter tests check the math; this checks what the interpreter
cannot (layouts, shapes the GPU backend rejects, shared memory that would not fit)."""

from __future__ import annotations

import re

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
        "BLOCKSIZE": "constexpr", "NESTED": "constexpr", "OUT_BF16": "constexpr", "NESTED_BLOCK": "constexpr",
        "BLOCK_BYTES": "constexpr",
    }
    consts = {"BLOCKSIZE": 64, "NESTED": nested, "OUT_BF16": True, "NESTED_BLOCK": NESTED_BLOCKSIZE,
              "BLOCK_BYTES": 1024}
    k = _compile(tri_nf4._dequantize_nf4_kernel, sig, consts, capability, num_warps=4)
    assert k.metadata.shared <= SMEM_LIMIT[capability]


def test_dequantize_kernel_offsets_are_64_bit():
    # pid * BLOCK_BYTES in int32 wraps past 2^31 elements (fused expert tensors): the program id is
    # widened to i64 before any offset is formed
    sig = {
        "packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
        "code_ptr": "*fp32", "out_ptr": "*i16", "offset": "fp32", "numel": "i64", "BLOCKSIZE": "constexpr",
        "NESTED": "constexpr", "OUT_BF16": "constexpr", "NESTED_BLOCK": "constexpr", "BLOCK_BYTES": "constexpr",
    }
    consts = {"BLOCKSIZE": 64, "NESTED": True, "OUT_BF16": True, "NESTED_BLOCK": NESTED_BLOCKSIZE,
              "BLOCK_BYTES": 1024}
    kernel = _compile(tri_nf4._dequantize_nf4_kernel, sig, consts, 90, num_warps=4)
    assert "div.s64" not in kernel.asm["ptx"]  # the block index is a shift (BLOCKSIZE is a constexpr power of 2)
    ttir = kernel.asm["ttir"]
    pid = re.search(r"(%\S+) = tt\.get_program_id x : i32", ttir).group(1)
    assert re.search(rf"arith\.extsi {re.escape(pid)} : i32 to i64", ttir), ttir[:2000]


def _compile_matmul(capability, transposed, blocksize, m, x_type="*bf16", precision="tf32", partial=False):
    block_m, block_out, block_red, warps, stages = tri_mm._config(m, 8192)
    if transposed:
        fn, bn, bk = tri_mm._nf4_matmul_t_kernel, block_red, block_out
    else:
        fn, bn, bk = tri_mm._nf4_matmul_kernel, block_out, block_red
    types = {"x_ptr": x_type, "packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32",
             "nested_code_ptr": "*fp32", "pairs_ptr": "*i64", "y_ptr": "*fp32" if partial else x_type,
             "offset": "fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
             "K_PER_SPLIT": "i32", "N_PER_SPLIT": "i32"}
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    consts = {"NESTED": True, "NESTED_BLOCK": NESTED_BLOCKSIZE, "DOT_FP32": False, "PRECISION": precision,
              "BLOCKSIZE": blocksize, "PARTIAL": partial, "BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk}
    return _compile(fn, sig, consts, capability, num_warps=warps, num_stages=stages)


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("m", [16, 64])
def test_fused_matmul_compiles(capability, transposed, blocksize, m):
    k = _compile_matmul(capability, transposed, blocksize, m, partial=blocksize == 64)
    assert k.metadata.shared <= SMEM_LIMIT[capability]


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_matmul_fp32_is_ieee_not_tf32(transposed):
    # fp32 operands must not run on the TF32 tensor-core path (10-bit mantissa): no tf32 mma in the PTX
    ptx = _compile_matmul(90, transposed, 64, 16, x_type="*fp32", precision="ieee").asm["ptx"]
    assert "tf32" not in ptx
    # the bf16 kernel does use the tensor cores (the check above can fail)
    ptx_bf16 = _compile_matmul(90, transposed, 64, 16).asm["ptx"]
    assert re.search(r"\b(mma|wgmma)\.", ptx_bf16)
    ptx_tf32 = _compile_matmul(90, transposed, 64, 16, x_type="*fp32", precision="tf32").asm["ptx"]
    assert "tf32" in ptx_tf32


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("x_type", ["*bf16", "*fp32"])
def test_grouped_matmul_compiles(transposed, x_type):
    from qlora_kernels.triton import nf4_grouped as tri_grouped

    fn = tri_grouped._nf4_grouped_kernel
    types = {"x_ptr": x_type, "packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32",
             "nested_code_ptr": "*fp32", "pairs_ptr": "*i64", "y_ptr": x_type, "offset": "fp32",
             "tile_expert_ptr": "*i32", "tile_row0_ptr": "*i64", "tile_row1_ptr": "*i64", "E": "i32", "N": "i32",
             "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    block_m, block_out, block_red, warps, stages = tri_grouped._config(64, 8192)
    consts = {"NESTED": True, "NESTED_BLOCK": NESTED_BLOCKSIZE, "DOT_FP32": False,
              "PRECISION": "ieee" if x_type == "*fp32" else "tf32", "BLOCKSIZE": 64, "TRANSPOSED": transposed,
              "BLOCK_M": block_m, "BLOCK_OUT": block_out, "BLOCK_RED": block_red}
    k = _compile(fn, sig, consts, 90, num_warps=warps, num_stages=stages)
    assert k.metadata.shared <= SMEM_LIMIT[90]
    assert "tf32" not in k.asm["ptx"]
