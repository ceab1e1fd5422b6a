"""Triton fused NF4 dequantize-matmul for small and medium M (the GPU's 4 < M <= 64 regime).

Computes, for W [N, K] in NF4 (bitsandbytes layout, see qlora_kernels/reference/nf4.py):

* ``y = x @ deq(W)^T``   x [M, K] -> y [M, N]    (forward; ``_nf4_matmul_kernel``)
* ``y = x @ deq(W)``     x [M, N] -> y [M, K]    (backward dX = dY @ W; ``_nf4_matmul_t_kernel``)

with fp32 accumulation (``tl.dot``) and y in x's dtype.

Launch shape: program (i, j, s) owns the output tile ``BLOCK_M x BLOCK_OUT`` (i, j) and the s-th
of ``SPLIT`` equal slices of the reduction dimension (split-K). Each step of its loop loads the
packed codes of one W tile once, as 32-bit words, decodes both nibbles of every byte with one
lookup in a 256-entry pair table, applies the per-block absmax (double quantization decoded
inline) and feeds the tile to ``tl.dot``: about 8 instructions per weight per thread in the sm_90
code (18.5 with per-nibble gathers and a masked select). With M <= 64 there is one tile row, so
every weight byte is read once per call.

Why split-K: with small M the grid has only cdiv(N, BLOCK_OUT) tiles (16-224 for Llama shapes),
too few to keep 132 SMs streaming weights; splitting the reduction gives ~3 programs per SM.
With ``SPLIT > 1`` each program writes its fp32 partial tile to a ``[SPLIT, M, OUT]`` workspace
and the launcher sums the slices (deterministic, no atomics); with ``SPLIT == 1`` the program
writes y directly.

Numerics: bf16 / fp16 operands use the tensor cores. fp32 operands multiply in IEEE fp32
(``input_precision="ieee"``): on a GPU, tl.dot's default for fp32 is TF32, whose 10-bit mantissa
gives ~1e-3 relative error, and an fp32 caller asked for fp32. Under the CPU interpreter the
operands are multiplied in fp32 (its tl.dot mishandles bf16, held as uint16).

Offsets into W, absmax and the workspace are int64 (a fused expert tensor can exceed 2^31 bytes).

Requirement (the dispatcher sends anything else to dequantize + cuBLAS): K % blocksize == 0, so
no absmax block spans two rows of W (every allowed blocksize is a multiple of 32).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from ..quant_maps import NESTED_BLOCKSIZE


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask,
                 NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr):
    """fp32 absmax of NF4 blocks ``block`` (any shape, int64), decoding the double quantization."""
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
    pairs_ptr,
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

    The packed codes are read as 32-bit words (8 codes each); each byte indexes ``pairs``, the
    256-entry table of (code[b >> 4], code[b & 15]) held as int64, so one lookup yields both weights
    of a byte (half the gathers of a nibble table, and no masked select). Outside W the words read
    as 0x77777777: code 7 is 0.0, and the absmax there reads 0. The absmax is gathered once per
    (row, absmax block) of the tile, not per element: one value per row when a block spans the
    tile's columns, else 2 * HALF_C / BLOCKSIZE values per row.
    """
    C: tl.constexpr = 2 * HALF_C
    NW: tl.constexpr = C // 8  # 32-bit words of packed codes per row of the tile
    rows = rows.to(tl.int64)
    wcols = col0 // 8 + tl.arange(0, NW)
    mask_w = row_mask[:, None] & (wcols < K // 8)[None, :]
    words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (K // 8) + wcols[None, :],
                    mask=mask_w, other=0x77777777).to(tl.uint32, bitcast=True)
    shift = tl.arange(0, 4).to(tl.uint32) * 8
    byte = tl.reshape(((words[:, :, None] >> shift[None, None, :]) & 255).to(tl.int32), (ROWS, HALF_C))
    pair = tl.load(pairs_ptr + byte)  # little-endian: low half = the high nibble's code (element 2j)
    hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
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
    return w  # zero outside W: x is zero beyond K, and rows beyond N decode with absmax 0


@triton.jit
def _store_tile(y_ptr, acc, rm, rc, M, OUT, stride_ym, pid_s, PARTIAL: tl.constexpr):
    """y[rm, rc] = acc (in y's dtype), or with PARTIAL the fp32 slice pid_s of the [SPLIT, M, OUT] workspace."""
    mask = (rm < M)[:, None] & (rc < OUT)[None, :]
    if PARTIAL:
        base = pid_s.to(tl.int64) * M * OUT
        tl.store(y_ptr + base + rm[:, None] * OUT + rc[None, :], acc, mask=mask)
    else:
        tl.store(y_ptr + rm[:, None] * stride_ym + rc[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, pairs_ptr, y_ptr, offset,
    M, N, K, stride_xm, stride_ym, K_PER_SPLIT,
    NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCKSIZE: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_s * K_PER_SPLIT  # K_PER_SPLIT is a multiple of BLOCK_K: tiles never straddle slices
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rm < M)[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
        w = _decode_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, pairs_ptr, offset, rn, rn < N,
                         k0, K, NESTED, NESTED_BLOCK, BLOCKSIZE, BLOCK_N, BLOCK_K // 2)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    _store_tile(y_ptr, acc, rm, rn, M, N, stride_ym, pid_s, PARTIAL)


@triton.jit
def _nf4_matmul_t_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, pairs_ptr, y_ptr, offset,
    M, N, K, stride_xm, stride_ym, N_PER_SPLIT,
    NESTED: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCKSIZE: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_lo = pid_s * N_PER_SPLIT  # a multiple of BLOCK_N
    n_hi = tl.minimum(N, n_lo + N_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        x_mask = (rm < M)[:, None] & (rn < N)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :], mask=x_mask, other=0.0)
        w = _decode_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, pairs_ptr, offset, rn, rn < N,
                         pid_k * BLOCK_K, K, NESTED, NESTED_BLOCK, BLOCKSIZE, BLOCK_N, BLOCK_K // 2)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    _store_tile(y_ptr, acc, rm, rk, M, K, stride_ym, pid_s, PARTIAL)


def supports(n: int, k: int, blocksize: int) -> bool:
    """Whether the fused kernels handle this weight shape (else: dequantize + matmul): K % blocksize == 0."""
    return k % blocksize == 0


def _config(m: float, n_out: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_OUT, BLOCK_RED, num_warps, num_stages) for ``m`` rows (the grouped kernel,
    triton/nf4_grouped.py, passes the mean rows per expert): small M gets a 16-row tile (the
    smallest tl.dot shape); wide output tiles keep each weight byte read once per M tile; two
    pipeline stages keep shared memory near 27-66 KiB (sm_90, checked offline)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_out = 64 if n_out <= 4096 else 128
    return block_m, block_out, 64, 4, 2


#: Programs per SM that split-K aims for (enough to overlap one program's loads with another's math).
PROGRAMS_PER_SM = 3
#: Each split walks at least this many reduction tiles (keeps the software pipeline full).
MIN_TILES_PER_SPLIT = 4
MAX_SPLIT = 32


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k(tiles: int, red: int, block_red: int, device: torch.device) -> int:
    """How many slices to split the reduction into for a grid of ``tiles`` output tiles."""
    if device.type != "cuda":
        return 1
    target = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if tiles >= target:
        return 1
    steps = triton.cdiv(red, block_red)
    return max(1, min(triton.cdiv(target, tiles), steps // MIN_TILES_PER_SPLIT, MAX_SPLIT))


# The pair table of each code tensor, rebuilt only when the tensor changes (one per NF4 weight).
_PAIRS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: entry b holds the fp32 bits of (code[b >> 4], code[b & 15]), low half first."""
    hit = _PAIRS.get(code)
    if hit is not None and hit[0] == code._version:
        return hit[1]
    b = torch.arange(256, device=code.device)
    pairs = torch.stack((code[b >> 4], code[b & 15]), dim=1).contiguous().view(torch.int64).view(256)
    _PAIRS[code] = (code._version, pairs)
    return pairs


def on_device(t: torch.Tensor):
    """Launch on t's GPU: Triton launches on the *current* device, which need not be t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
    split: int | None = None,
) -> torch.Tensor:
    """Launcher (arguments as the ``nf4_matmul`` op); ``block`` overrides the tile config and
    ``split`` the number of reduction slices (default: enough programs to fill the GPU)."""
    if not supports(n, k, blocksize):
        raise ValueError(f"fused NF4 matmul needs K % blocksize == 0; got K={k}, blocksize={blocksize}")
    nested = nested_absmax is not None
    x, packed, absmax, code = (t.contiguous() for t in (x, packed, absmax, code))
    if packed.data_ptr() % 4:  # the kernels read the codes as 32-bit words
        packed = packed.clone()
    if nested:
        nested_absmax, nested_code = nested_absmax.contiguous(), nested_code.contiguous()
    pairs = code_pairs(code)
    m = x.shape[0]
    out_cols, red = (k, n) if transposed else (n, k)
    y = torch.empty(m, out_cols, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_m, block_out, block_red, warps, stages = block or _config(m, out_cols)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(out_cols, block_out)
    s = split or split_k(tiles, red, block_red, x.device)
    per_split = triton.cdiv(triton.cdiv(red, block_red), s) * block_red
    s = triton.cdiv(red, per_split)  # no empty slices
    dest = y if s == 1 else torch.empty(s, m, out_cols, dtype=torch.float32, device=x.device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    common = dict(NESTED=nested, NESTED_BLOCK=NESTED_BLOCKSIZE, DOT_FP32=interpret,
                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCKSIZE=blocksize, PARTIAL=s > 1,
                  num_warps=warps, num_stages=stages)
    args = (
        x, packed.reshape(-1), absmax, nested_absmax if nested else absmax, nested_code if nested else code, pairs,
        dest, float(nested_offset), m, n, k, x.stride(0), y.stride(0), per_split,
    )
    grid = (triton.cdiv(m, block_m), triton.cdiv(out_cols, block_out), s)
    with on_device(x):
        if transposed:
            _nf4_matmul_t_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_red, BLOCK_K=block_out, **common)
        else:
            _nf4_matmul_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_out, BLOCK_K=block_red, **common)
    if s > 1:
        torch.sum(dest, 0, out=y) if x.dtype == torch.float32 else y.copy_(dest.sum(0))
    return y
