"""Triton fused NF4 dequantize-matmul for small and medium M (the GPU's 4 < M <= 64 regime).

Computes, for W [N, K] in NF4 (bitsandbytes layout, see qlora_kernels/reference/nf4.py):

* ``y = x @ deq(W)^T``   x [M, K] -> y [M, N]    (forward; ``_nf4_matmul_kernel``)
* ``y = x @ deq(W)``     x [M, N] -> y [M, K]    (backward dX = dY @ W; ``_nf4_matmul_t_kernel``)

with fp32 accumulation on the tensor cores (``tl.dot``) and y in x's dtype.

Launch shape: one program owns an output tile ``BLOCK_M x BLOCK_N`` (forward) or
``BLOCK_M x BLOCK_K`` (transposed) and loops over the reduction dimension; each step loads the
packed bytes of one W tile once (``[rows, BLOCK/2]`` bytes), decodes both nibbles of every byte
(NF4 table lookup, then the per-block absmax, double quantization decoded inline), and feeds the
tile to ``tl.dot``. Each weight byte is read once per output tile of M: with M <= 64 that is one
tile row, i.e. each byte is read once per call.

Requirements (the dispatcher sends anything else to dequantize + cuBLAS): K even and
K % blocksize == 0, so no absmax block spans two rows of W.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant_maps import NESTED_BLOCKSIZE


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                 NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
    """fp32 absmax of NF4 blocks ``block`` (any shape), decoding the double quantization."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _decode_tile(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    code_ptr,
    offset,
    rows,  # [ROWS] indices into W's rows (n)
    row_mask,
    col0,  # first column (k) of the tile, a multiple of 2 * HALF_C
    K,
    NESTED: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    HALF_C: tl.constexpr,
):
    """fp32 tile deq(W)[rows, col0 : col0 + 2 * HALF_C], zero outside W.

    The absmax is gathered once per (row, absmax block) of the tile, not per element: one value
    per row when a block spans the tile's columns, else 2 * HALF_C / BLOCKSIZE values per row.
    """
    C: tl.constexpr = 2 * HALF_C
    cols = col0 + tl.arange(0, C)
    col_mask = cols < K
    byte_cols = col0 // 2 + tl.arange(0, HALF_C)
    mask_b = row_mask[:, None] & (byte_cols < K // 2)[None, :]
    b = tl.load(packed_ptr + rows[:, None] * (K // 2) + byte_cols[None, :], mask=mask_b, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (b >> 4))
    lo = tl.load(code_ptr + (b & 15))
    w = tl.interleave(hi, lo)  # [ROWS, C]: element 2j is the high nibble
    # K % BLOCKSIZE == 0: blocks never span rows; block of (r, c) = r * (K / BLOCKSIZE) + c / BLOCKSIZE.
    first = rows * (K // BLOCKSIZE) + col0 // BLOCKSIZE
    if BLOCKSIZE >= C:
        scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, first, row_mask,
                             NESTED, NESTED_BLOCK)
        w = w * scale[:, None]
    else:
        NB: tl.constexpr = C // BLOCKSIZE
        block = first[:, None] + tl.arange(0, NB)[None, :]
        bmask = row_mask[:, None] & (col0 + tl.arange(0, NB) * BLOCKSIZE < K)[None, :]
        scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, bmask,
                             NESTED, NESTED_BLOCK)
        w = tl.reshape(tl.reshape(w, (ROWS, NB, BLOCKSIZE)) * scale[:, :, None], (ROWS, C))
    return tl.where(row_mask[:, None] & col_mask[None, :], w, 0.0)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, y_ptr, offset,
    M, N, K, stride_xm, stride_ym,
    NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rm < M)[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
        w = _decode_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, rn, rn < N,
                         k0, K, NESTED, NESTED_BLOCK, BLOCKSIZE, BLOCK_N, BLOCK_K // 2)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_matmul_t_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, y_ptr, offset,
    M, N, K, stride_xm, stride_ym,
    NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        x_mask = (rm < M)[:, None] & (rn < N)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :], mask=x_mask, other=0.0)
        w = _decode_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, rn, rn < N,
                         pid_k * BLOCK_K, K, NESTED, NESTED_BLOCK, BLOCKSIZE, BLOCK_N, BLOCK_K // 2)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rk[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def supports(n: int, k: int, blocksize: int) -> bool:
    """Whether the fused kernels handle this weight shape (else: dequantize + matmul)."""
    return k % 2 == 0 and k % blocksize == 0


def _config(m: int, n_out: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_OUT, BLOCK_RED, num_warps, num_stages): small M gets a 16-row tile (the
    smallest tl.dot shape); wide output tiles keep each weight byte read once per M tile; two
    pipeline stages keep shared memory near 60-120 KiB (sm_90, checked offline)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_out = 64 if n_out <= 4096 else 128
    return block_m, block_out, 64, 4, 2


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: float,
    blocksize: int,
    n: int,
    k: int,
    transposed: bool,
    block: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Launcher (arguments as the ``nf4_matmul`` op); ``block`` overrides the tile config."""
    if not supports(n, k, blocksize):
        raise ValueError(f"fused NF4 matmul needs K even and a multiple of blocksize; got K={k}, blocksize={blocksize}")
    x = x.contiguous()
    m = x.shape[0]
    out_cols = k if transposed else n
    y = torch.empty(m, out_cols, dtype=x.dtype, device=x.device)
    block_m, block_out, block_red, warps, stages = block or _config(m, out_cols)
    nested = nested_absmax is not None
    # The interpreter's tl.dot mishandles bf16 operands (held as uint16): there, multiply in fp32.
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    common = dict(NESTED=nested, NESTED_BLOCK=NESTED_BLOCKSIZE, DOT_FP32=interpret, BLOCKSIZE=blocksize,
                  num_warps=warps, num_stages=stages)
    args = (
        x, packed.reshape(-1), absmax, nested_absmax if nested else absmax, nested_code if nested else code, code,
        y, float(nested_offset), m, n, k, x.stride(0), y.stride(0),
    )
    if transposed:
        grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_out))
        _nf4_matmul_t_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_red, BLOCK_K=block_out, **common)
    else:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_out))
        _nf4_matmul_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_out, BLOCK_K=block_red, **common)
    return y
