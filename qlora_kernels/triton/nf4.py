"""Triton NF4 dequantize, with the double-quantized absmax decoded in the same kernel.

``out[e] = code[q(e)] * absmax[e // blocksize]`` in fp32, stored as out's dtype, where with double
quantization ``absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b // 256] + offset``.

Launch shape: one program owns ``BLOCK_BYTES`` packed bytes (int64 offsets) = ``2 * BLOCK_BYTES`` elements; the
two nibbles of a byte are decoded side by side and interleaved on store. Both elements of a byte
share one absmax block (block sizes are even). Fused multiply-add is disabled at launch
(``enable_fp_fusion=False``) so the absmax decode rounds the product and the sum separately, as
bitsandbytes and the reference do: the result is bitwise equal to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant_maps import NESTED_BLOCKSIZE
from .nf4_matmul import on_device


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,  # uint8 [(numel + 1) // 2]
    absmax_ptr,  # fp32 [nb], or uint8 [nb] when NESTED
    nested_absmax_ptr,  # fp32 [ceil(nb / 256)] (NESTED only)
    nested_code_ptr,  # fp32 [256] (NESTED only)
    code_ptr,  # fp32 [16]
    out_ptr,  # [numel], fp32 / fp16 / (bf16 viewed as int16)
    offset,  # fp32 (NESTED only)
    numel,
    BLOCKSIZE: tl.constexpr,  # a power of two: the block index is a shift, not a 64-bit division
    NESTED: tl.constexpr,
    OUT_BF16: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: a fused expert tensor can pass 2^31 elements
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    in_range = byte < (numel + 1) // 2
    b = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    block = (2 * byte) // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=in_range, other=0.0)
        scale = tl.load(nested_code_ptr + q, mask=in_range, other=0.0) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    hi = tl.load(code_ptr + (b >> 4), mask=in_range, other=0.0) * scale
    lo = tl.load(code_ptr + (b & 15), mask=in_range, other=0.0) * scale
    vals = tl.interleave(hi, lo)  # element 2j (high nibble), then 2j + 1
    elem = pid * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
    if OUT_BF16:
        # Round to nearest even by hand on the bits (out_ptr is the bf16 output viewed as int16):
        # the same on GPUs and in the interpreter, whose fp32 -> bf16 cast truncates.
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + elem, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=elem < numel)
    else:
        tl.store(out_ptr + elem, vals.to(out_ptr.dtype.element_ty), mask=elem < numel)


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
    block_bytes: int = 1024,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher: flat ``[numel]`` tensor of ``dtype`` (arguments as the ``dequantize_nf4`` op), written
    into ``out`` when given (contiguous, ``numel`` elements of ``dtype``: ``dequantize_nf4_into``)."""
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    elif not out.is_contiguous() or out.numel() != numel or out.dtype != dtype:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {numel} elements; got {out.dtype} "
                         f"{list(out.shape)}, contiguous={out.is_contiguous()}")
    out = out.view(-1)
    nested = nested_absmax is not None
    packed, absmax, code = (t.contiguous() for t in (packed, absmax, code))
    if nested:
        nested_absmax, nested_code = nested_absmax.contiguous(), nested_code.contiguous()
    grid = (triton.cdiv((numel + 1) // 2, block_bytes),)
    with on_device(packed):
        _dequantize_nf4_kernel[grid](
            packed.reshape(-1),
            absmax,
            nested_absmax if nested else absmax,
            nested_code if nested else code,
            code,
            out.view(torch.int16) if dtype == torch.bfloat16 else out,
            float(nested_offset),
            numel,
            BLOCKSIZE=blocksize,
            NESTED=nested,
            OUT_BF16=dtype == torch.bfloat16,
            NESTED_BLOCK=NESTED_BLOCKSIZE,
            BLOCK_BYTES=block_bytes,
            enable_fp_fusion=False,
        )
    return out
