"""The NF4 ops: schema, fake (meta) implementation and dispatch of each, declared once.

Ops (``torch.ops.qlora_kernels.*``), all on flat tensors in bitsandbytes' layout:

* ``quantize_nf4(w, blocksize) -> (packed uint8 [(numel+1)//2], absmax fp32 [nb])``
* ``dequantize_nf4(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize,
  numel, dtype) -> [numel]``: absmax is fp32 ``[nb]``, or uint8 codes ``[nb]`` when
  ``nested_absmax`` (fp32 ``[ceil(nb/256)]``) and ``nested_code`` (fp32 ``[256]``) are given.
* ``nf4_matmul(x, <the weight as above>, n, k, transposed) -> y``: for W of shape [N, K],
  ``y = x @ deq(W)^T`` (x [M, K], y [M, N]) or with ``transposed`` ``y = x @ deq(W)``
  (x [M, N], y [M, K]); fp32 accumulation, y in x's dtype.

Which kernel runs is chosen here, from each op's table of kernels (``QUANTIZE``, ``DEQUANTIZE``,
``DEQUANTIZE_INTO``, ``MATMUL`` below; the rules in ``_dispatch``); backends only register kernels.
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..dtypes import FLOAT_DTYPES
from ..quant_maps import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE
from ..reference import nf4 as ref
from ._dispatch import Kernel, choose, declare

#: Largest M that the fused C++ CPU matmul serves, by x's dtype. Measured on a 2-core Zen 4 (N x K from 128x1024
#: to 4096x4096, inference), its time over dequantize + BLAS's: fp32 0.4-0.9x at M = 24-32, 0.7-1.4x at M = 48-64;
#: fp16 (whose CPU BLAS has no fast path there) 0.4-0.6x at M = 16-64; bf16 (the BLAS uses avx512_bf16) wins at
#: M <= 16 only.
CPP_FUSED_MAX_M = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 16}
#: Largest M that the CPU decode-layout matmul serves. On a 2-core Zen 4 (4096 x 4096 and 4096 x 14336, weights from
#: DRAM) it took 0.72-0.87x the dense bf16 matmul's time at M = 64, 0.81-0.86x at 128, 0.95-1.00x at 256 and
#: 0.97-1.04x at 512, where dequantize + BLAS took 1.22-1.45x, 1.14-1.17x, 1.08-1.12x and 1.06-1.09x: it is the
#: faster of the two up to 512 (the two converge there).
DECODE_LAYOUT_MAX_M = 512
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


def _quantize_reference(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    # The reference holds ~28 bytes of temporaries per weight: run it over chunks of whole blocks
    # (an even number of elements, so bytes never straddle chunks) to bound that on a GPU.
    flat = w.reshape(-1)
    chunk = blocksize * max(1, _QUANTIZE_CHUNK // blocksize)
    if flat.numel() <= chunk:
        return ref.quantize_nf4(flat, blocksize)
    parts = [ref.quantize_nf4(flat[i : i + chunk], blocksize) for i in range(0, flat.numel(), chunk)]
    return torch.cat([p for p, _ in parts]), torch.cat([a for _, a in parts])


QUANTIZE = declare(
    "quantize_nf4",
    Kernel("quantize_nf4", "cpp", "cpu", "C++ (OpenMP)", needs="quantize_nf4",
           run=lambda w, bs: _extension.kernel("quantize_nf4")(w.contiguous().view(-1), bs)),
    Kernel("quantize_nf4", "reference", "any", "PyTorch, in chunks of whole blocks", run=_quantize_reference),
)


@torch.library.custom_op("qlora_kernels::quantize_nf4", mutates_args=())
def quantize_nf4(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    _check_quantize(w, blocksize)
    return choose("quantize_nf4", w.device).run(w, blocksize)


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


DEQUANTIZE = declare(
    "dequantize_nf4",
    Kernel("dequantize_nf4", "cpp", "cpu", "C++ (OpenMP, AVX2 / AVX-512)", needs="dequantize_nf4",
           run=lambda *a: _extension.kernel("dequantize_nf4")(*a)),
    Kernel("dequantize_nf4", "cuda", "cuda", "CUDA (double-quant decode fused)", needs="dequantize_nf4",
           run=lambda *a: _extension.kernel("dequantize_nf4")(*a)),
    Kernel("dequantize_nf4", "triton", "cuda", "Triton", run=lambda *a: _triton("nf4", "dequantize_nf4")(*a)),
    Kernel("dequantize_nf4", "triton", "cpu", "Triton (interpreter)", default=False,
           run=lambda *a: _triton("nf4", "dequantize_nf4")(*a)),
    Kernel("dequantize_nf4", "reference", "any", "PyTorch", run=ref.dequantize_nf4),
)


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
    return choose("dequantize_nf4", packed.device).run(*args)


def _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, dtype) -> None:
    _check_weight(packed, absmax, code, nested_absmax, nested_code, blocksize, numel)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")


@dequantize_nf4.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, dtype):
    _check_dequantize(packed, absmax, code, nested_absmax, nested_code, blocksize, numel, dtype)
    return packed.new_empty((numel,), dtype=dtype)


def _into_reference(*args) -> None:
    *weight, out = args
    out.copy_(ref.dequantize_nf4(*weight, out.dtype))


DEQUANTIZE_INTO = declare(
    "dequantize_nf4_into",
    Kernel("dequantize_nf4_into", "cpp", "cpu", "C++ (OpenMP, AVX2 / AVX-512)", needs="dequantize_nf4_into",
           run=lambda *a: _extension.kernel("dequantize_nf4_into")(*a)),
    Kernel("dequantize_nf4_into", "cuda", "cuda", "CUDA (double-quant decode fused)", needs="dequantize_nf4_into",
           run=lambda *a: _extension.kernel("dequantize_nf4_into")(*a)),
    Kernel("dequantize_nf4_into", "triton", "cuda", "Triton",
           run=lambda *a: _triton("nf4", "dequantize_nf4")(*a[:-1], a[-1].dtype, out=a[-1])),
    Kernel("dequantize_nf4_into", "triton", "cpu", "Triton (interpreter)", default=False,
           run=lambda *a: _triton("nf4", "dequantize_nf4")(*a[:-1], a[-1].dtype, out=a[-1])),
    Kernel("dequantize_nf4_into", "reference", "any", "PyTorch", run=_into_reference),
)


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
    choose("dequantize_nf4_into", packed.device).run(*args, out.view(-1))


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


def _dequantize_then_matmul(x: Tensor, weight: tuple, n: int, k: int, transposed: bool, **_) -> Tensor:
    """deq(W) into the workspace, then BLAS. The decode is the kernel ``dequantize_nf4_into``'s table chooses (the
    forced backend's, if one is forced), run directly: the weight's tensors were checked and made contiguous by
    the caller, and the op's dispatch and checks cost more than the decode of a small layer (~20 us a call)."""
    w = _workspace(n * k, x.dtype, x.device)
    choose("dequantize_nf4_into", x.device).run(*weight, n * k, w)
    w = w.view(n, k)
    return x @ (w if transposed else w.t())


def _gemv(x: Tensor, weight: tuple, n: int, k: int, transposed: bool, **_) -> Tensor:
    if x.data_ptr() % 16:  # the GEMV reads x 16 bytes at a time
        x = x.clone()
    return _extension.kernel("nf4_gemv")(x, *weight, n, k)


def _triton_fused(x: Tensor, weight: tuple, n: int, k: int, transposed: bool, **_) -> Tensor:
    return _triton("nf4_matmul", "nf4_matmul")(x, *weight, n, k, transposed)


def fused_shape_ok(k: int, blocksize: int, **_) -> bool:
    """The shape rule of every fused NF4 matmul kernel (CUDA GEMV, Triton): K % blocksize == 0, so that
    no absmax block spans two rows of W (every allowed blocksize is a multiple of 32, so a row is then
    also whole 16-byte chunks of packed codes, as the GEMV reads them). Also the ``accepts`` of the
    kernel rows whose rule is just this one (it ignores the call's other facts)."""
    return k % blocksize == 0


def _fused_small_m(m, k, blocksize, fused_max_m, **_) -> bool:
    return m <= fused_max_m and fused_shape_ok(k, blocksize)


#: The kernels of nf4_matmul in order of preference (the first live one whose rule takes the call).
#: On a GPU: the GEMV for decode-sized M (bandwidth-bound), the Triton fused kernel up to
#: fused_max_m (tensor cores, each weight byte read once per call), above that dequantize + cuBLAS
#: (the GEMM is compute-bound; the decode is ~1/K of it). On a CPU: the fused C++ kernel for
#: small M, else dequantize (C++) + BLAS (oneDNN with AVX-512/AMX beats a hand-written decode-and-dot).
MATMUL = declare(
    "nf4_matmul",
    Kernel("nf4_matmul", "cpp", "cpu", "decode layout", f"bf16 x, M <= {DECODE_LAYOUT_MAX_M}, K % blocksize == 0, "
           "avx512_bf16, eager inference", needs="nf4_matmul_tiled",
           accepts=lambda m, k, blocksize, transposed, decode_layout, **_: (
               decode_layout and not transposed and m <= DECODE_LAYOUT_MAX_M and fused_shape_ok(k, blocksize)),
           run=lambda x, w, n, k, t, owner: _extension.kernel("nf4_matmul_tiled")(
               x, decode_layout(owner, w, n, k), w[2], w[6], n, k)),
    Kernel("nf4_matmul", "cpp", "cpu", "fused", ", ".join(f"M <= {m} ({d} x)" for d, m in (
               ("fp32", CPP_FUSED_MAX_M[torch.float32]), ("fp16", CPP_FUSED_MAX_M[torch.float16]),
               ("bf16", CPP_FUSED_MAX_M[torch.bfloat16]))), needs="nf4_matmul",
           accepts=lambda m, dtype, **_: m <= CPP_FUSED_MAX_M[dtype],
           run=lambda x, w, n, k, t, **_: _extension.kernel("nf4_matmul")(x, *w, n, k, t)),
    Kernel("nf4_matmul", "cpp", "cpu", "dequantize + BLAS", needs="dequantize_nf4_into", run=_dequantize_then_matmul),
    Kernel("nf4_matmul", "cuda", "cuda", "GEMV", f"forward, M <= {GEMV_MAX_M_VAR} (default {_DEFAULT_GEMV_MAX_M}), "
           "K % blocksize == 0", needs="nf4_gemv",
           accepts=lambda m, k, blocksize, transposed, gemv_max_m, **_: (
               not transposed and m <= gemv_max_m and fused_shape_ok(k, blocksize)),
           run=_gemv),
    Kernel("nf4_matmul", "triton", "cuda", "fused", f"M <= {FUSED_MAX_M_VAR} (default {_DEFAULT_FUSED_MAX_M}), "
           "K % blocksize == 0", accepts=_fused_small_m, run=_triton_fused),
    Kernel("nf4_matmul", "cuda", "cuda", "dequantize + cuBLAS", needs="dequantize_nf4_into",
           run=_dequantize_then_matmul),
    Kernel("nf4_matmul", "triton", "cuda", "dequantize + cuBLAS", run=_dequantize_then_matmul),
    Kernel("nf4_matmul", "triton", "cpu", "fused (interpreter)", "K % blocksize == 0", default=False,
           accepts=fused_shape_ok, run=_triton_fused),
    Kernel("nf4_matmul", "triton", "cpu", "dequantize + BLAS (interpreter)", default=False,
           run=_dequantize_then_matmul),
    Kernel("nf4_matmul", "reference", "any", "the fp32 formula",
           run=lambda x, w, n, k, t, **_: ref.nf4_matmul(x, *w, n, k, t)),
)


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
    # under inference mode (a compiled decode step, say) the op takes a decode layout that eager calls already made
    # for this very tensor (inductor passes a module's buffers as they are); it never makes one itself
    owner = packed if torch.is_inference_mode_enabled() and has_decode_layout(packed) else None
    return _matmul(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n, k, transposed,
                   owner=owner)


def matmul_checked_weight(x: Tensor, weight: tuple, n: int, k: int) -> Tensor:
    """``nf4_matmul(x, *weight, n, k, False)`` outside the op's wrapper, for a weight whose tensors were checked
    when it was made (an :class:`~qlora_kernels.NF4Weight`'s): the same kernel choice and result, without the
    custom op's dispatch and the weight's checks, which measured ~20 us a call (more than the kernel of a small
    decode layer). Eager only: under ``torch.compile`` (and for autograd) callers use the op."""
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be 2-D [M, {k}] for a weight of shape [{n}, {k}]; got {list(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    packed, absmax = weight[0], weight[1]
    if x.device != packed.device:
        raise ValueError(f"x and the weight must be on one device; got x on {x.device}, weight on {packed.device}")
    if packed.dtype != torch.uint8 or packed.numel() != (n * k + 1) // 2 or absmax.dtype not in _ABSMAX_DTYPES:
        # a weight changed after it was made (a module cast to another dtype, say): the op's checks say how
        _check_weight(*weight[:5], weight[6], n * k)
    return _matmul(x, *weight, n, k, False, owner=packed)


_ABSMAX_DTYPES = (torch.float32, torch.uint8)


def _matmul(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, n, k, transposed,
            owner: Tensor | None = None):
    """The op's body. ``owner``: the packed tensor as the caller keeps it (a module's buffer, an NF4Weight's field),
    given by eager inference callers only: the CPU decode layout is made once per owner and kept for it."""
    m = x.shape[0]
    if m == 0:  # an empty batch: the same empty result on every backend
        return x.new_empty((0, k if transposed else n))
    x, packed, absmax, code, nested_absmax, nested_code = _contiguous(x, packed, absmax, code, nested_absmax,
                                                                     nested_code)
    weight = (packed.reshape(-1), absmax, code, nested_absmax, nested_code, nested_offset, blocksize)
    gemv_max_m, fused_max_m = (gpu_matmul_thresholds() if x.device.type == "cuda"
                               else (_DEFAULT_GEMV_MAX_M, _DEFAULT_FUSED_MAX_M))
    layout = owner is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu" and decode_layouts_on()
    kernel = choose("nf4_matmul", x.device, m=m, k=k, blocksize=blocksize, transposed=transposed,
                    gemv_max_m=gemv_max_m, fused_max_m=fused_max_m, decode_layout=layout, dtype=x.dtype)
    return kernel.run(x, weight, n, k, transposed, owner=owner)


# ---------------------------------------------------------------------------------------------
# The CPU decode layout


#: Set to 0 to keep the CPU matmul on the stored layout (no second copy of the codes).
DECODE_LAYOUT_VAR = "QLORA_KERNELS_CPU_DECODE_LAYOUT"
# owner id -> (weak reference to the owner, the data pointers and versions of it and its block scales when the
# layout was made, the layout)
_LAYOUTS: dict[int, tuple] = {}


@functools.cache
def _cpu_has_avx512_bf16() -> bool:
    return _extension.has_kernel("nf4_matmul_tiled", "CPU") and _extension.kernel("cpu_isa")() == "avx512+bf16"


def decode_layouts_on() -> bool:
    """Whether eager inference calls with bf16 x on this CPU take the decode layout: the CPU has avx512_bf16 (as
    ``ATEN_CPU_CAPABILITY`` allows) and ``QLORA_KERNELS_CPU_DECODE_LAYOUT`` is not ``0``."""
    return os.environ.get(DECODE_LAYOUT_VAR, "1").strip() != "0" and _cpu_has_avx512_bf16()


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot change outside inference mode)
        return -1


def decode_layout(packed: Tensor, weight: tuple, n: int, k: int) -> Tensor:
    """The CPU decode layout of an [n, k] weight whose codes the caller keeps as ``packed`` (``weight``: the op's
    tensors, ``(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize)``): W's codes repacked
    into tiles of 16 rows with each block's 16 fp32 scales after its codes (the C++ ``nf4_tile``; the layout is
    described in csrc/cpu/nf4_cpu.cpp), from which the bf16 matmul at M <= ``DECODE_LAYOUT_MAX_M`` streams one tile
    after another, shares each line's decode with up to 8 x rows and needs no horizontal sums (measured against
    bitsandbytes' inference path on a 2-core Zen 4 in benchmarks/RESULTS.md). Made at the first call for ``packed``
    and kept while ``packed`` lives and it and the block scales are unchanged (a new data pointer or an in-place
    write makes it anew): a second copy of the codes, half a byte per weight plus 4 bytes a block, beside the stored
    bytes, which stay bitsandbytes' (saving, training and every other kernel read those).
    :func:`release_decode_layouts` frees them; ``QLORA_KERNELS_CPU_DECODE_LAYOUT=0`` keeps them from being made."""
    absmax, nested_absmax, nested_code, offset, blocksize = weight[1], weight[3], weight[4], weight[5], weight[6]
    stamp = tuple((t.data_ptr(), _version(t)) if t is not None else None
                  for t in (packed, absmax, nested_absmax, nested_code)) + (float(offset), blocksize)
    key = id(packed)
    entry = _LAYOUTS.get(key)
    if entry is not None and entry[0]() is packed and entry[1] == stamp:
        return entry[2]
    tiled = _extension.kernel("nf4_tile")(packed.reshape(-1).contiguous(), absmax.contiguous(), nested_absmax,
                                          nested_code, float(offset), blocksize, n, k)
    if entry is None:
        weakref.finalize(packed, _LAYOUTS.pop, key, None)
    _LAYOUTS[key] = (weakref.ref(packed), stamp, tiled)
    return tiled


def has_decode_layout(packed: Tensor) -> bool:
    """Whether a decode layout was made for this tensor object (and it is alive)."""
    entry = _LAYOUTS.get(id(packed))
    return entry is not None and entry[0]() is packed


def release_decode_layouts() -> None:
    """Free every CPU decode layout (they are made again on demand)."""
    _LAYOUTS.clear()


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


def cast_first_input_under_autocast(op, name: str) -> None:
    """Register the autocast rule above for the custom op ``op`` (``qlora_kernels::<name>``), whose
    first argument is its activation, on the CPU and CUDA."""
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(_keyset, x, *rest, _device_type=device_type, _keyset_off=keyset):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_keyset_off):
                return op._opoverload(x.to(dtype) if x.is_floating_point() else x, *rest)

        _AUTOCAST_LIB.impl(name, kernel, key_name, with_keyset=True)


cast_first_input_under_autocast(nf4_matmul, "nf4_matmul")
