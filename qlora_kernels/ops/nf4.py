"""The NF4 ops: schema, fake (meta) implementation and dispatch of each, declared once.

Ops (``torch.ops.qlora_kernels.*``), all on flat tensors in bitsandbytes' layout:

* ``quantize_nf4(w, blocksize) -> (packed uint8 [(numel+1)//2], absmax fp32 [nb])``
* ``dequantize_nf4(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
  numel, dtype) -> [numel]``: absmax is fp32 ``[nb]``, or uint8 codes ``[nb]`` when
  ``nested_absmax`` (fp32 ``[ceil(nb/256)]``) and ``nested_code`` (fp32 ``[256]``) are given.
* ``nf4_matmul(x, <the weight as above>, n, k, transposed) -> y``: for W of shape [N, K],
  ``y = x @ deq(W)^T`` (x [M, K], y [M, N]) or with ``transposed`` ``y = x @ deq(W)``
  (x [M, N], y [M, K]); fp32 accumulation, y in x's dtype.

Which kernel runs is chosen here (see ``_dispatch``); backends only register kernels.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _extension
from ..quant_maps import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE
from ..reference import nf4 as ref
from ._dispatch import choose

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest M that the fused C++ CPU matmul serves; larger M goes to dequantize + BLAS.
_CPP_FUSED_MAX_M = 16


def _triton(name: str) -> Callable:
    from ..triton import nf4 as triton_nf4

    return getattr(triton_nf4, name)


def _check_weight(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    blocksize: int,
    numel: int,
) -> None:
    """Shape, dtype and device checks of a packed NF4 weight (cheap; runs on fake tensors too)."""
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}; got {blocksize}")
    if numel <= 0:
        raise ValueError(f"numel must be positive; got {numel}")
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed must be uint8 with (numel + 1) // 2 = {(numel + 1) // 2} elements; "
            f"got {packed.dtype} with {packed.numel()}"
        )
    nb = math.ceil(numel / blocksize)
    nested = nested_absmax is not None
    if nested != (nested_code is not None):
        raise ValueError("nested_absmax and nested_code must be given together (double quantization)")
    want = torch.uint8 if nested else torch.float32
    if absmax.dtype != want or absmax.numel() != nb:
        raise ValueError(f"absmax must be {want} with ceil(numel / blocksize) = {nb} elements; got {absmax.dtype} with {absmax.numel()}")
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"code (quant_map) must be float32 with 16 elements; got {code.dtype} with {code.numel()}")
    tensors = [packed, absmax, code]
    if nested:
        n_nested = math.ceil(nb / NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != n_nested:
            raise ValueError(
                f"nested_absmax must be float32 with ceil(nb / 256) = {n_nested} elements; "
                f"got {nested_absmax.dtype} with {nested_absmax.numel()}"
            )
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError(
                f"nested_code (nested_quant_map) must be float32 with 256 elements; got {nested_code.dtype} with {nested_code.numel()}"
            )
        tensors += [nested_absmax, nested_code]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors of an NF4 weight must be on one device; got {sorted(map(str, devices))}")


# ---------------------------------------------------------------------------------------------
# quantize_nf4


@torch.library.custom_op("qlora_kernels::quantize_nf4", mutates_args=())
def quantize_nf4(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    _check_quantize(w, blocksize)
    backend = choose("quantize_nf4", w.device, {"cpu": ("cpp",)})
    if backend == "cpp":
        return _extension.kernel("quantize_nf4")(w.contiguous().view(-1), blocksize)
    return ref.quantize_nf4(w, blocksize)


def _check_quantize(w: Tensor, blocksize: int) -> None:
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16; got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("w must not be empty")
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}; got {blocksize}")


@quantize_nf4.register_fake
def _(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    _check_quantize(w, blocksize)
    n = w.numel()
    return (
        w.new_empty(((n + 1) // 2,), dtype=torch.uint8),
        w.new_empty((math.ceil(n / blocksize),), dtype=torch.float32),
    )


# ---------------------------------------------------------------------------------------------
# dequantize_nf4


@torch.library.custom_op("qlora_kernels::dequantize_nf4", mutates_args=())
def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    nested_offset: float,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
) -> Tensor:
    _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, dtype)
    args = (packed.reshape(-1), absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, dtype)
    backend = choose("dequantize_nf4", packed.device, {"cpu": ("cpp", "triton"), "cuda": ("cuda", "triton")})
    if backend in ("cpp", "cuda"):
        return _extension.kernel("dequantize_nf4")(*args)
    if backend == "triton":
        return _triton("dequantize_nf4")(*args)
    return ref.dequantize_nf4(*args)


def _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, dtype) -> None:
    _check_weight(packed, absmax, code, nested_absmax, nested_code, blocksize, numel)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")


@dequantize_nf4.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, dtype):
    _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, dtype)
    return packed.new_empty((numel,), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# nf4_matmul


@torch.library.custom_op("qlora_kernels::nf4_matmul", mutates_args=())
def nf4_matmul(
    x: Tensor,
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
    _check_matmul(x, packed, absmax, code, nested_absmax, nested_code, blocksize, n, k, transposed)
    weight = (packed.reshape(-1), absmax, code, nested_absmax, nested_code, nested_offset, blocksize)
    backend = choose("nf4_matmul", x.device, {"cpu": ("cpp",), "cuda": ("cuda", "triton")})
    # The dispatch table, by backend and M (rows of x):
    #   reference            any M: fp32 formula
    #   cpp, M <= 16         fused kernel: decodes each weight byte once, fp32 dot products
    #   cpp, M > 16          dequantize (cpp) into x's dtype, then the BLAS matmul: at this M the
    #                        decode is amortized and the BLAS (oneDNN, AVX-512/AMX) wins
    #   cuda / triton        dequantize with that backend, then cuBLAS (the fused GPU kernels of
    #                        the GEMV/small-M issue go here)
    if backend == "cpp" and x.shape[0] <= _CPP_FUSED_MAX_M:
        return _extension.kernel("nf4_matmul")(x.contiguous(), *weight, n, k, transposed)
    if backend != "reference":
        w = dequantize_nf4(*weight, n * k, x.dtype).view(n, k)
        return x @ (w if transposed else w.t())
    return ref.nf4_matmul(x, *weight, n, k, transposed)


def _check_matmul(x, packed, absmax, code, nested_absmax, nested_code, blocksize, n, k, transposed) -> None:
    _check_weight(packed, absmax, code, nested_absmax, nested_code, blocksize, n * k)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    inner = n if transposed else k
    if x.dim() != 2 or x.shape[1] != inner:
        raise ValueError(f"x must be 2-D [M, {inner}] for a weight of shape [{n}, {k}] (transposed={transposed}); got {list(x.shape)}")
    if x.device != packed.device:
        raise ValueError(f"x and the weight must be on one device; got x on {x.device}, weight on {packed.device}")


@nf4_matmul.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n, k, transposed):
    _check_matmul(x, packed, absmax, code, nested_absmax, nested_code, blocksize, n, k, transposed)
    return x.new_empty((x.shape[0], k if transposed else n))
