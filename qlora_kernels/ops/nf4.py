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
import os
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..quant_maps import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE
from ..reference import nf4 as ref
from . import _dispatch
from ._dispatch import choose

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest M that the fused C++ CPU matmul serves (see the dispatch table in nf4_matmul).
_CPP_FUSED_MAX_M = 16
#: Largest M the CUDA GEMV kernel is compiled for.
GEMV_LIMIT_M = 4
#: Environment variables that move the GPU dispatch thresholds of ``nf4_matmul`` (set them from
#: measurement, e.g. benchmarks/bench_nf4.py, without editing code): the largest M that runs the
#: CUDA GEMV (0..4, default 4) and the largest M that runs the Triton fused kernel (default 64).
GEMV_MAX_M_VAR = "QLORA_KERNELS_GEMV_MAX_M"
FUSED_MAX_M_VAR = "QLORA_KERNELS_FUSED_MAX_M"
_DEFAULT_GEMV_MAX_M = 4
_DEFAULT_FUSED_MAX_M = 64
# Elements per chunk of the reference quantizer (bounds its temporaries to ~100 MiB).
_QUANTIZE_CHUNK = 1 << 22


def _env_int(var: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{var} must be an integer in [{lo}, {hi}]; got {raw!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{var} must be an integer in [{lo}, {hi}]; got {value}")
    return value


def gpu_matmul_thresholds() -> tuple[int, int]:
    """``(gemv_max_m, fused_max_m)``: the largest M served by the CUDA GEMV and by the Triton fused
    kernel on a GPU (from ``QLORA_KERNELS_GEMV_MAX_M`` / ``QLORA_KERNELS_FUSED_MAX_M``, read per call)."""
    return (_env_int(GEMV_MAX_M_VAR, _DEFAULT_GEMV_MAX_M, 0, GEMV_LIMIT_M),
            _env_int(FUSED_MAX_M_VAR, _DEFAULT_FUSED_MAX_M, 0, 1 << 20))


def _contiguous(*tensors: Optional[Tensor]) -> tuple:
    """The weight tensors as the kernels read them: contiguous (a no-op for contiguous tensors).

    Kernels take raw pointers, so a strided view (``absmax`` taken as a column of a wider tensor,
    say) would be read as if it were dense; every op normalizes its inputs here, once."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _triton(module: str, name: str) -> Callable:
    """A Triton launcher, imported on first use (triton is optional)."""
    import importlib

    return getattr(importlib.import_module(f"qlora_kernels.triton.{module}"), name)


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
        raise ValueError(
            f"absmax must be {want} with ceil(numel / blocksize) = {nb} elements; "
            f"got {absmax.dtype} with {absmax.numel()}"
        )
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
                f"nested_code (nested_quant_map) must be float32 with 256 elements; "
                f"got {nested_code.dtype} with {nested_code.numel()}"
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
    # The reference holds ~28 bytes of temporaries per weight: run it over chunks of whole blocks
    # (an even number of elements, so bytes never straddle chunks) to bound that on a GPU.
    flat = w.reshape(-1)
    chunk = blocksize * max(1, _QUANTIZE_CHUNK // blocksize)
    if flat.numel() <= chunk:
        return ref.quantize_nf4(flat, blocksize)
    parts = [ref.quantize_nf4(flat[i : i + chunk], blocksize) for i in range(0, flat.numel(), chunk)]
    return torch.cat([p for p, _ in parts]), torch.cat([a for _, a in parts])


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
    packed, absmax, code, nested_absmax, nested_code = _contiguous(packed, absmax, code, nested_absmax, nested_code)
    args = (packed.reshape(-1), absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, dtype)
    backend = choose("dequantize_nf4", packed.device, {"cpu": ("cpp", "triton"), "cuda": ("cuda", "triton")})
    if backend in ("cpp", "cuda"):
        return _extension.kernel("dequantize_nf4")(*args)
    if backend == "triton":
        return _triton("nf4", "dequantize_nf4")(*args)
    return ref.dequantize_nf4(*args)


def _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, dtype) -> None:
    _check_weight(packed, absmax, code, nested_absmax, nested_code, blocksize, numel)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")


@dequantize_nf4.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, dtype):
    _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, dtype)
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.custom_op("qlora_kernels::dequantize_nf4_into", mutates_args=("out",))
def dequantize_nf4_into(
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor],
    nested_offset: float,
    blocksize: int,
    numel: int,
    out: Tensor,
) -> None:
    """``dequantize_nf4`` written into ``out`` (contiguous, ``numel`` elements, its dtype)."""
    _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, out.dtype)
    if not out.is_contiguous() or out.numel() != numel or out.device != packed.device:
        raise ValueError(
            f"out must be contiguous with numel = {numel} elements on {packed.device}; "
            f"got {out.numel()} elements, contiguous={out.is_contiguous()}, on {out.device}"
        )
    packed, absmax, code, nested_absmax, nested_code = _contiguous(packed, absmax, code, nested_absmax, nested_code)
    args = (packed.reshape(-1), absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel)
    backend = choose("dequantize_nf4", packed.device, {"cpu": ("cpp",), "cuda": ("cuda",)})
    if backend in ("cpp", "cuda"):
        _extension.kernel("dequantize_nf4_into")(*args, out.view(-1))
    else:
        out.view(-1).copy_(dequantize_nf4(*args, out.dtype))


@dequantize_nf4_into.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, out):
    _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, out.dtype)


# A reusable dequantization buffer per (device, stream, dtype) for the "dequantize, then BLAS"
# path: no allocation per call, and at most one dequantized weight alive per stream.
_WORKSPACES: dict[tuple, Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)  # free the old one before allocating the larger one
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_workspaces() -> None:
    """Free the dequantization workspaces (they are re-created on demand)."""
    _WORKSPACES.clear()


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
    m = x.shape[0]
    if m == 0:  # an empty batch: the same empty result on every backend
        return x.new_empty((0, k if transposed else n))
    x, packed, absmax, code, nested_absmax, nested_code = _contiguous(x, packed, absmax, code, nested_absmax,
                                                                     nested_code)
    weight = (packed.reshape(-1), absmax, code, nested_absmax, nested_code, nested_offset, blocksize)
    backend = choose("nf4_matmul", x.device, {"cpu": ("cpp", "triton"), "cuda": ("cuda", "triton")})
    # The dispatch table (the one place that picks the NF4 matmul kernel), by backend and M:
    #   reference              any M: the fp32 formula
    #   cpp, M <= 16           fused C++ kernel: each weight byte decoded once, fp32 dot products
    #   cpp, M > 16            dequantize (C++) into a workspace in x's dtype, then BLAS (oneDNN
    #                          with AVX-512/AMX beats a hand-written decode-and-dot here)
    #   cuda, M <= gemv_max_m  CUDA GEMV (forward only): bandwidth-bound, split-K when N cannot
    #                          fill the GPU
    #   cuda/triton,           Triton fused dequantize-matmul (tensor cores, split-K so that small
    #     M <= fused_max_m     grids still fill the GPU); forward and transposed (backward dX)
    #   cuda/triton, larger M  dequantize (CUDA, double-quant decode fused) into the workspace,
    #                          then cuBLAS: the GEMM is compute-bound, the decode is ~1/K of it
    # gemv_max_m / fused_max_m: gpu_matmul_thresholds() (defaults 4 / 64, set by environment).
    # Shapes a fused kernel does not take (fused_shape_ok: K not a multiple of the blocksize) use
    # the dequantize path, which takes any shape.
    if backend == "cpp" and m <= _CPP_FUSED_MAX_M:
        return _extension.kernel("nf4_matmul")(x, *weight, n, k, transposed)
    if backend in ("cuda", "triton"):
        fusable = fused_shape_ok(k, blocksize)
        gemv_max_m, fused_max_m = gpu_matmul_thresholds() if x.device.type == "cuda" else (_DEFAULT_GEMV_MAX_M,
                                                                                            _DEFAULT_FUSED_MAX_M)
        if backend == "cuda" and not transposed and m <= gemv_max_m and fusable:
            if x.data_ptr() % 16:  # the GEMV reads x 16 bytes at a time
                x = x.clone()
            return _extension.kernel("nf4_gemv")(x, *weight, n, k)
        if m <= fused_max_m and fusable and _dispatch_status_triton(x.device):
            return _triton("nf4_matmul", "nf4_matmul")(x, *weight, n, k, transposed)
    if backend != "reference":
        w = _workspace(n * k, x.dtype, x.device)
        dequantize_nf4_into(*weight, n * k, w)
        w = w.view(n, k)
        return x @ (w if transposed else w.t())
    return ref.nf4_matmul(x, *weight, n, k, transposed)


def fused_shape_ok(k: int, blocksize: int) -> bool:
    """The shape rule of every fused NF4 matmul kernel (CUDA GEMV, Triton): K % blocksize == 0, so that
    no absmax block spans two rows of W (every allowed blocksize is a multiple of 32, so a row is then
    also whole 16-byte chunks of packed codes, as the GEMV reads them)."""
    return k % blocksize == 0


def _dispatch_status_triton(device: torch.device) -> bool:
    return _dispatch.cached_status("triton", "cuda" if device.type == "cuda" else "cpu")


def _check_matmul(x, packed, absmax, code, nested_absmax, nested_code, blocksize, n, k, transposed) -> None:
    _check_weight(packed, absmax, code, nested_absmax, nested_code, blocksize, n * k)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    inner = n if transposed else k
    if x.dim() != 2 or x.shape[1] != inner:
        raise ValueError(
            f"x must be 2-D [M, {inner}] for a weight of shape [{n}, {k}] (transposed={transposed}); "
            f"got {list(x.shape)}"
        )
    if x.device != packed.device:
        raise ValueError(f"x and the weight must be on one device; got x on {x.device}, weight on {packed.device}")


@nf4_matmul.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n, k, transposed):
    _check_matmul(x, packed, absmax, code, nested_absmax, nested_code, blocksize, n, k, transposed)
    return x.new_empty((x.shape[0], k if transposed else n))


# Autocast: ``nf4_matmul`` is a matmul, so under autocast it behaves as ``torch.mm`` / ``F.linear`` do:
# x (the only activation; the NF4 constants are never cast) is cast to the autocast dtype, the op runs
# with autocast off, and y comes out in that dtype. The other NF4 ops take an explicit dtype (or none)
# and are left alone by autocast. The dtype is the region's current one (torch.get_autocast_dtype),
# which torch.library.register_autocast cannot express (it fixes one dtype per device type).
_AUTOCAST_LIB = torch.library.Library("qlora_kernels", "IMPL")


def _register_matmul_autocast(device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, x, *rest):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return nf4_matmul._opoverload(x.to(dtype) if x.is_floating_point() else x, *rest)

    _AUTOCAST_LIB.impl("nf4_matmul", kernel, key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_matmul_autocast(_device_type)
