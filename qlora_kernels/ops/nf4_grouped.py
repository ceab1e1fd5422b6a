"""The grouped NF4 matmul of mixture-of-experts layers: schema, fake implementation, dispatch.

``nf4_grouped_matmul(x, offsets, <the weight>, n, k, transposed) -> y``: the weight is one NF4
tensor of shape ``[E, N, K]`` (E experts stacked, as transformers 5 stores fused expert weights,
e.g. ``experts.gate_up_proj`` / ``experts.down_proj``; quantized in its flattened order, so expert
e is rows ``e*N : (e+1)*N`` of the ``[E*N, K]`` view and its blocks never straddle another expert's
when ``K % blocksize == 0``). The rows of x are grouped by expert: ``offsets`` is int64 ``[E + 1]``,
non-decreasing, ``offsets[0] == 0``, ``offsets[E] == x.shape[0]``, and rows
``offsets[e] : offsets[e + 1]`` use expert e. Row i of y is ``x[i] @ deq(W[e])^T`` (x ``[T, K]`` ->
y ``[T, N]``) or, with ``transposed``, ``x[i] @ deq(W[e])`` (x ``[T, N]`` -> y ``[T, K]``, the
backward for x). fp32 accumulation, y in x's dtype; under autocast x is cast as for ``nf4_matmul``.

Kernels (the dispatch rules are in ``_dispatch``): on a GPU one Triton launch for all experts
(its tiles of x rows never straddle two experts; the tile table is built on the device, so there is
no host synchronization); elsewhere, and for shapes the fused kernel does not take, one
``nf4_matmul`` per expert with rows (which reads ``offsets`` on the host).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dtypes import FLOAT_DTYPES
from ..reference import nf4 as ref
from ..reference.nf4 import decode_absmax
from ._dispatch import Kernel, choose, declare
from .nf4 import _check_weight, _contiguous, _triton, cast_first_input_under_autocast, fused_shape_ok, nf4_matmul


def _check_grouped(x, offsets, packed, absmax, code, nested_absmax, nested_code, blocksize, n, k, transposed):
    if n <= 0 or k <= 0:
        raise ValueError(f"n and k must be positive; got n={n}, k={k}")
    numel = packed.numel() * 2
    if numel % (n * k):
        raise ValueError(f"the weight must be [E, {n}, {k}] (a whole number of experts); it holds {numel} elements")
    experts = numel // (n * k)
    _check_weight(packed, absmax, code, nested_absmax, nested_code, blocksize, numel)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    inner = n if transposed else k
    if x.dim() != 2 or x.shape[1] != inner:
        raise ValueError(f"x must be 2-D [T, {inner}] for experts of shape [{n}, {k}] (transposed={transposed}); "
                         f"got {list(x.shape)}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() != experts + 1:
        raise ValueError(f"offsets must be int64 [E + 1] = [{experts + 1}] (group starts of the {experts} experts "
                         f"and the end); got {offsets.dtype} {list(offsets.shape)}")
    if x.device != packed.device or offsets.device != packed.device:
        raise ValueError(f"x, offsets and the weight must be on one device; got {x.device}, {offsets.device}, "
                         f"{packed.device}")
    return experts


def _per_expert(x: Tensor, offsets: Tensor, weight: tuple, experts: int, n: int, k: int, transposed: bool) -> Tensor:
    """One nf4_matmul per expert with rows: expert e's packed codes and (decoded, fp32) absmax are
    slices of the whole weight's, so every nf4_matmul kernel serves it unchanged."""
    packed, absmax, code, nested_absmax, nested_code, offset, blocksize = weight
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"offsets must rise from 0 to x.shape[0] = {x.shape[0]}; got {bounds}")
    if nested_absmax is not None:  # the nested blocks of 256 do not restart at an expert's first block
        absmax = decode_absmax(absmax, nested_absmax, nested_code, offset)
    y = x.new_empty((x.shape[0], k if transposed else n))
    per = n * k
    blocks = per // blocksize
    for e in range(experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            codes = packed[e * per // 2:(e + 1) * per // 2]
            scales = absmax[e * blocks:(e + 1) * blocks]
            y[lo:hi] = nf4_matmul(x[lo:hi], codes, scales, code, None, None, 0.0, blocksize, n, k, transposed)
    return y


def _triton_grouped(x, offsets, weight, experts, n, k, transposed):
    return _triton("nf4_grouped", "nf4_grouped_matmul")(x, offsets, *weight, n, k, transposed)


def _per_expert_kernel(backend: str, device: str) -> Kernel:
    return Kernel("nf4_grouped_matmul", backend, device, "per-expert nf4_matmul", "K % blocksize == 0",
                  accepts=fused_shape_ok, run=_per_expert)


def _reference(x, offsets, weight, experts, n, k, transposed):
    return ref.nf4_grouped_matmul(x, offsets, *weight, n, k, transposed)


#: Its kernels in order of preference. The per-expert loop needs K % blocksize == 0 (an expert's blocks
#: are then its own); the reference takes every shape.
GROUPED = declare(
    "nf4_grouped_matmul",
    Kernel("nf4_grouped_matmul", "triton", "cuda", "grouped fused", "K % blocksize == 0",
           accepts=fused_shape_ok, run=_triton_grouped),
    _per_expert_kernel("cpp", "cpu"),
    _per_expert_kernel("cuda", "cuda"),
    Kernel("nf4_grouped_matmul", "triton", "cpu", "grouped fused (interpreter)", "K % blocksize == 0", default=False,
           accepts=fused_shape_ok, run=_triton_grouped),
    Kernel("nf4_grouped_matmul", "reference", "any", "the fp32 formula", run=_reference),
)


@torch.library.custom_op("qlora_kernels::nf4_grouped_matmul", mutates_args=())
def nf4_grouped_matmul(
    x: Tensor,
    offsets: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    nested_offset: float,
    blocksize: int,
    n: int,
    k: int,
    transposed: bool,
) -> Tensor:
    experts = _check_grouped(x, offsets, packed, absmax, code, nested_absmax, nested_code, blocksize, n, k, transposed)
    if x.shape[0] == 0:
        return x.new_empty((0, k if transposed else n))
    x, offsets, packed, absmax, code, nested_absmax, nested_code = _contiguous(
        x, offsets, packed, absmax, code, nested_absmax, nested_code)
    weight = (packed.reshape(-1), absmax, code, nested_absmax, nested_code, nested_offset, blocksize)
    kernel = choose("nf4_grouped_matmul", x.device, k=k, blocksize=blocksize)
    return kernel.run(x, offsets, weight, experts, n, k, transposed)


@nf4_grouped_matmul.register_fake
def _(x, offsets, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n, k, transposed):
    _check_grouped(x, offsets, packed, absmax, code, nested_absmax, nested_code, blocksize, n, k, transposed)
    return x.new_empty((x.shape[0], k if transposed else n))


cast_first_input_under_autocast(nf4_grouped_matmul, "nf4_grouped_matmul")
