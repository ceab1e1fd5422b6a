"""Which backend runs an op: the one place that decides.

Backends: ``reference`` (plain PyTorch, any device), ``cpp`` (the extension's CPU kernels),
``cuda`` (the extension's CUDA kernels) and ``triton`` (Triton kernels on CUDA; on the CPU only
under ``TRITON_INTERPRET=1``). By default an op runs on the fastest backend that implements it for
the tensor's device: CPU: cpp, then reference; CUDA: cuda, then triton, then reference.

``QLORA_KERNELS_BACKEND=reference|cpp|cuda|triton`` forces a backend (tests, benchmarks). An op
that the forced backend does not implement for the tensor's device runs on the reference; an op
it implements there while the backend is not live (not built, no GPU, triton missing) is an
error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .. import _extension

ENV_VAR = "QLORA_KERNELS_BACKEND"
BACKENDS = ("reference", "cpp", "cuda", "triton")
_DEFAULT_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    return None


def status(backend: str, device_type: str = "cuda") -> tuple[bool, str]:
    """(live, reason) of a backend for tensors on ``device_type`` ('cpu' or 'cuda')."""
    if backend == "reference":
        return True, "plain PyTorch, every device"
    if backend == "cpp":
        if _extension.has_kernel("dequantize_nf4", "CPU"):
            return True, f"C++ CPU kernels in {_extension.extension_path()}"
        return False, _extension.load_error() or "the extension has no CPU kernels"
    if backend == "cuda":
        if not _extension.cuda_compiled():
            return False, _extension.load_error() or "the extension was built without CUDA kernels"
        if not torch.cuda.is_available():
            return False, "CUDA kernels are built, but no CUDA device is visible"
        return True, "CUDA kernels built for " + ", ".join(torch.cuda.get_arch_list() or ["?"])
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return False, err
        if device_type == "cpu":
            if triton_interpret():
                return True, "triton interpreter (TRITON_INTERPRET=1) on the CPU"
            return False, "triton runs on CUDA devices (on the CPU only with TRITON_INTERPRET=1)"
        if not torch.cuda.is_available():
            return False, "triton is installed, but no CUDA device is visible"
        return True, "triton kernels on CUDA"
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


@functools.cache
def _cached_status(backend: str, device_type: str, interpret: bool) -> tuple[bool, str]:
    return status(backend, device_type)


def cached_status(backend: str, device_type: str) -> bool:
    """Whether ``backend`` is live for ``device_type`` (cached per process)."""
    return _cached_status(backend, device_type, triton_interpret())[0]


def _device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def choose(op: str, device: torch.device, implemented: dict[str, tuple[str, ...]]) -> str:
    """The backend that runs ``op`` on ``device``.

    ``implemented`` maps a device type ('cpu', 'cuda') to the backends that implement the op
    there; the reference is implied everywhere.
    """
    dtype_ = _device_type(device)
    have = implemented.get(dtype_, ())
    forced = forced_backend()
    if forced is not None:
        if forced not in have:  # includes "reference"
            return "reference"
        live, why = _cached_status(forced, dtype_, triton_interpret())
        if not live:
            raise RuntimeError(f"{ENV_VAR}={forced} but that backend is not live for {op} on {device}: {why}")
        return forced
    for backend in _DEFAULT_ORDER[dtype_]:
        if backend == "reference" or (backend in have and _cached_status(backend, dtype_, triton_interpret())[0]):
            return backend
    return "reference"
