"""Triton grouped NF4 matmul for mixture-of-experts layers: all experts in one launch.

Computes (arguments as the ``nf4_grouped_matmul`` op, qlora_kernels/ops/nf4_grouped.py), for the
experts' weight W ``[E, N, K]`` in NF4 and the rows of x grouped by expert (``offsets [E + 1]``):

* ``y[i] = x[i] @ deq(W[e])^T``   x [T, K] -> y [T, N]   (``TRANSPOSED=False``)
* ``y[i] = x[i] @ deq(W[e])``     x [T, N] -> y [T, K]   (``TRANSPOSED=True``: the backward dX)

Launch shape: program (t, j) owns tile t of the *tile table* and output columns
``j*BLOCK_OUT : (j+1)*BLOCK_OUT``. The tile table cuts every expert's rows into tiles of BLOCK_M
rows, so that no tile straddles two experts: tile t is (its expert, its first row, its group's end).
It is built on the device from ``offsets`` (cumulative tile counts, a search sorted): the number of
tiles is not known on the host, so the grid has the upper bound ``cdiv(T, BLOCK_M) + E`` programs
along the tiles and the ones past the last tile return at once. No host synchronization.

Each program walks the reduction dimension like the dense fused kernel (qlora_kernels/triton/
nf4_matmul.py, whose tile decoder it shares: 32-bit words, one pair-table lookup per byte, the
block scales gathered per row), on expert e's rows ``e*N + n`` of the ``[E*N, K]`` view, so block
and double-quant indices are those of the whole tensor. fp32 accumulation; fp32 operands in IEEE fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant_maps import NESTED_BLOCKSIZE
from .nf4_matmul import _config, _decode_tile, code_pairs, on_device


@triton.jit
def _nf4_grouped_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, pairs_ptr, y_ptr, offset,
    tile_expert_ptr, tile_row0_ptr, tile_row1_ptr, E, N, K, stride_xm, stride_ym,
    NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCKSIZE: tl.constexpr, TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr,
):
    t = tl.program_id(0)
    pid_o = tl.program_id(1)
    e = tl.load(tile_expert_ptr + t)
    if e >= E:
        return
    row0 = tl.load(tile_row0_ptr + t)
    row1 = tl.load(tile_row1_ptr + t)
    rm = row0 + tl.arange(0, BLOCK_M)
    m_ok = rm < row1
    rm64 = rm.to(tl.int64)
    base = e.to(tl.int64) * N  # expert e's first row in the [E*N, K] view
    ro = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    if TRANSPOSED:  # y[rm, ro] = sum_n x[rm, n] W_e[n, ro]: the reduction runs over W's rows
        for n0 in range(0, N, BLOCK_RED):
            rn = n0 + tl.arange(0, BLOCK_RED)
            x = tl.load(x_ptr + rm64[:, None] * stride_xm + rn[None, :], mask=m_ok[:, None] & (rn < N)[None, :],
                        other=0.0)
            w = _decode_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, pairs_ptr, offset,
                             base + rn, rn < N, pid_o * BLOCK_OUT, K, NESTED, NESTED_BLOCK, BLOCKSIZE, BLOCK_RED,
                             BLOCK_OUT // 2)
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        out_cols = K
    else:  # y[rm, ro] = sum_k x[rm, k] W_e[ro, k]
        for k0 in range(0, K, BLOCK_RED):
            rk = k0 + tl.arange(0, BLOCK_RED)
            x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :],
                        other=0.0)
            w = _decode_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, pairs_ptr, offset,
                             base + ro, ro < N, k0, K, NESTED, NESTED_BLOCK, BLOCKSIZE, BLOCK_OUT, BLOCK_RED // 2)
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        out_cols = N
    mask = m_ok[:, None] & (ro < out_cols)[None, :]
    tl.store(y_ptr + rm64[:, None] * stride_ym + ro[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def tile_table(offsets: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert, first row, group end)`` of every tile of ``block_m`` rows, computed on offsets' device;
    ``cdiv(rows, block_m) + E`` entries, those past the last tile with expert ``E``."""
    experts = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    t = torch.arange(triton.cdiv(rows, block_m) + experts, device=offsets.device)
    expert = torch.searchsorted(cum, t, right=True)
    e = expert.clamp(max=experts - 1)
    row0 = offsets[e] + (t - (cum[e] - tiles[e])) * block_m
    return expert.to(torch.int32), row0, offsets[e + 1]


def nf4_grouped_matmul(
    x: torch.Tensor,
    offsets: torch.Tensor,
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
    """Launcher (arguments as the ``nf4_grouped_matmul`` op); ``block`` overrides the tile config."""
    if k % blocksize:
        raise ValueError(f"grouped NF4 matmul needs K % blocksize == 0; got K={k}, blocksize={blocksize}")
    nested = nested_absmax is not None
    x, offsets, packed, absmax, code = (t.contiguous() for t in (x, offsets, packed, absmax, code))
    if packed.data_ptr() % 4:  # the decoder reads the codes as 32-bit words
        packed = packed.clone()
    if nested:
        nested_absmax, nested_code = nested_absmax.contiguous(), nested_code.contiguous()
    rows = x.shape[0]
    experts = offsets.numel() - 1
    out_cols = k if transposed else n
    y = torch.empty(rows, out_cols, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    # the dense kernel's tile config, from the mean rows per expert
    block_m, block_out, block_red, warps, stages = block or _config(rows / experts, out_cols)
    expert, row0, row1 = tile_table(offsets, rows, block_m)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    grid = (expert.numel(), triton.cdiv(out_cols, block_out))
    with on_device(x):
        _nf4_grouped_kernel[grid](
            x, packed.reshape(-1), absmax, nested_absmax if nested else absmax, nested_code if nested else code,
            code_pairs(code), y, float(nested_offset), expert, row0, row1, experts, n, k, x.stride(0), y.stride(0),
            NESTED=nested, NESTED_BLOCK=NESTED_BLOCKSIZE, DOT_FP32=interpret,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCKSIZE=blocksize, TRANSPOSED=transposed,
            BLOCK_M=block_m, BLOCK_OUT=block_out, BLOCK_RED=block_red, num_warps=warps, num_stages=stages,
        )
    return y
