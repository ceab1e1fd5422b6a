"""Reference NF4 quantize / dequantize / matmul and the double quantization of absmax.

Formats (byte-compatible with bitsandbytes 0.50.2, see docs/FORMATS.md):

* the weight is flattened row-major and cut into blocks of ``blocksize`` consecutive elements
  (the last one may be partial); ``absmax[b] = max |w|`` over block b, in fp32;
* each element is scaled by ``1/absmax`` and rounded to the nearest NF4 value:
  ``code = #{i : x > mid_i}`` over the 15 fp32 midpoints (ties go to the lower code);
* codes are packed two per byte, first element in the high nibble; an odd tail's low nibble is
  the code of 0.0 (7);
* with double quantization absmax is stored as uint8 codes of ``absmax - offset`` in bitsandbytes'
  dynamic map, in blocks of 256, with one fp32 ``nested_absmax`` per block and ``offset = mean``.

Every function here takes flat tensors; shapes are the caller's business.
"""

from __future__ import annotations

import torch

from ..quant_maps import NESTED_BLOCKSIZE, NF4_ZERO_CODE, dynamic_map, nf4_code

# bitsandbytes clamps the denominator to this before scaling, so an all-zero block scales to 0.
_TINY = 1e-38


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


def quantize_nf4(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize a flat floating tensor.

    Returns ``packed`` uint8 ``[(numel + 1) // 2]`` and ``absmax`` fp32 ``[ceil(numel / blocksize)]``.
    """
    x = w.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    # Full blocks are scaled by a reciprocal, the partial last block by a division; a full
    # all-zero block stores absmax 0, a partial one stores the clamped 1e-38. This mirrors
    # bitsandbytes' CPU quantizer bit for bit (the rounding of x * (1/a) and x / a can differ).
    absmax = x[:full].view(-1, blocksize).abs().amax(dim=1)
    scaled = (x[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=_TINY))[:, None]).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().amax().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, x[full:] / tail_max])
    scaled = scaled.clamp(-1.0, 1.0)
    codes = torch.bucketize(scaled, _midpoints(nf4_code(x.device)))  # #{mid < x}
    codes = torch.where(torch.isnan(scaled), torch.zeros_like(codes), codes)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    codes = codes.to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def decode_absmax(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: float,
) -> torch.Tensor:
    """fp32 absmax per block; with double quantization
    ``absmax[i] = nested_code[q[i]] * nested_absmax[i // 256] + offset`` (a multiply, then an add,
    each rounded to fp32: no fused multiply-add, as bitsandbytes computes it)."""
    if nested_absmax is None:
        return absmax.float()
    block = torch.arange(absmax.numel(), device=absmax.device) // NESTED_BLOCKSIZE
    return nested_code[absmax.long()] * nested_absmax[block] + nested_offset


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: float,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``w[e] = code[q(e)] * absmax[e // blocksize]`` in fp32, rounded to ``dtype``; flat ``[numel]``."""
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel].long()
    scale = decode_absmax(absmax, nested_absmax, nested_code, nested_offset)
    block = torch.arange(numel, device=p.device) // blocksize
    return (code[codes] * scale[block]).to(dtype)


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
) -> torch.Tensor:
    """``x @ deq(W)^T`` (x: [M, K] -> [M, N]) or, transposed, ``x @ deq(W)`` (x: [M, N] -> [M, K]),
    for W of shape [N, K]; accumulated in fp32, returned in x's dtype."""
    w = dequantize_nf4(
        packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n * k, torch.float32
    ).view(n, k)
    y = x.float() @ (w if transposed else w.t())
    return y.to(x.dtype)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantization of fp32 absmax: ``(codes uint8 [nb], nested_absmax fp32 [ceil(nb/256)],
    offset)``, rounding ``(absmax - offset) / nested_absmax`` to the *exactly* nearest entry of the
    dynamic map (ties to the lower entry).

    bitsandbytes' CUDA quantizer is exact nearest too; its CPU quantizer uses a coarse lookup
    table that picks a neighbouring code for about 0.15% of values (tests bound that difference).
    """
    offset = absmax.mean()
    centered = absmax - offset
    nb = centered.numel()
    pad = -nb % NESTED_BLOCKSIZE
    blocks = torch.nn.functional.pad(centered, (0, pad)).view(-1, NESTED_BLOCKSIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / nested_absmax.clamp(min=_TINY))[:, None]
    codes = torch.bucketize(scaled, _midpoints(dynamic_map(absmax.device)))
    # A block whose values all equal the offset (e.g. a weight with a single NF4 block) has
    # nested_absmax 0: any code decodes to the offset; bitsandbytes writes code 0 there.
    codes = torch.where(nested_absmax[:, None] == 0, torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:nb].to(torch.uint8), nested_absmax, float(offset)


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
) -> torch.Tensor:
    """Experts: W is ``[E, N, K]`` (one NF4 tensor, blocks in its flattened order) and the rows of x are
    grouped by expert, rows ``offsets[e] : offsets[e + 1]`` belonging to expert e; row i of the result is
    ``x[i] @ deq(W[e])^T`` ([T, K] -> [T, N]) or, transposed, ``x[i] @ deq(W[e])`` ([T, N] -> [T, K]).
    Accumulated in fp32, returned in x's dtype."""
    experts = packed.numel() * 2 // (n * k)
    w = dequantize_nf4(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
                       experts * n * k, torch.float32).view(experts, n, k)
    y = torch.zeros(x.shape[0], k if transposed else n, dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for e in range(experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y[lo:hi] = x[lo:hi].float() @ (w[e] if transposed else w[e].t())
    return y.to(x.dtype)
