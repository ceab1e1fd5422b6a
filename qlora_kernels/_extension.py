"""Loading the optional compiled extension ``qlora_kernels._C``.

Importing ``_C`` registers C++ (CPU) and CUDA kernels as ops in the private
``torch.ops.qlora_kernels_C`` namespace; the public ops in ``qlora_kernels.ops`` decide when to
call them. A missing or broken extension never breaks ``import qlora_kernels``: the reason is
logged and kept for ``qlora_kernels.backends()``, and everything runs on the other backends.
Loading the extension does not initialize CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger("qlora_kernels")

_NAMESPACE = "qlora_kernels_C"
_load_error: str | None = None


def _load() -> None:
    global _load_error
    if importlib.util.find_spec("qlora_kernels._C") is None:
        _load_error = "qlora_kernels._C was not built (install with a C++ compiler and torch present)"
        log.info("%s; using the other backends", _load_error)
        return
    try:
        importlib.import_module("qlora_kernels._C")
    except Exception as exc:  # a broken build must not break the import
        _load_error = f"qlora_kernels._C failed to load: {type(exc).__name__}: {exc}"
        log.warning("%s; falling back to the other backends", _load_error)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered ``qlora_kernels_C::op`` for ``dispatch_key`` (CPU, CUDA)."""
    name = f"{_NAMESPACE}::{op}"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key))
    except RuntimeError:  # the op does not exist
        return False


def load_error() -> str | None:
    return _load_error


def extension_path() -> Path | None:
    spec = importlib.util.find_spec("qlora_kernels._C")
    return Path(spec.origin) if spec and spec.origin else None


def cuda_compiled() -> bool:
    """Whether the extension carries CUDA kernels (whether or not a GPU is present)."""
    return has_kernel("dequantize_nf4", "CUDA")


def cpu_isa() -> str | None:
    """The vector ISA the C++ CPU kernels run ("avx512", "avx2" or "scalar"): the CPU's, capped by
    ``ATEN_CPU_CAPABILITY`` (or ``QLORA_KERNELS_CPU_CAPABILITY`` for these kernels alone), read once per
    process; None without the extension."""
    try:
        return str(kernel("cpu_isa")())
    except (AttributeError, RuntimeError):
        return None


def kernel(op: str):
    """The extension's op ``torch.ops.qlora_kernels_C.<op>``."""
    return getattr(getattr(torch.ops, _NAMESPACE), op)


_load()
