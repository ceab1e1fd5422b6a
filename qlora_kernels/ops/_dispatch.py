"""Which kernel runs an op: the one place that decides, from one table per op.

Backends: ``reference`` (plain PyTorch, any device), ``cpp`` (the extension's CPU kernels),
``cuda`` (the extension's CUDA kernels) and ``triton`` (Triton kernels on CUDA; on the CPU only
under ``TRITON_INTERPRET=1``, and only when forced).

Each op declares its implementations as a tuple of :class:`Kernel` rows, in order of preference:
which backend, on which device type, under which shape rule (a predicate on the call and the same
rule in words). By default an op runs the first row whose backend is live and whose rule accepts
the call (rows marked ``default=False`` run only when forced). ``QLORA_KERNELS_BACKEND=reference|
cpp|cuda|triton`` forces a backend: the op runs that backend's first row that accepts the call, or
raises, naming the op, the device and what that backend implements there; never another backend.
``qk.backends()`` and the README's backend table are made from the same rows
(:func:`kernels_of`, :func:`markdown_table`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _extension

ENV_VAR = "QLORA_KERNELS_BACKEND"
BACKENDS = ("reference", "cpp", "cuda", "triton")
DEVICE_TYPES = ("cpu", "cuda")
#: The rule of a kernel that takes every call (its label is then just its name).
ANY_SHAPE = "any shape"


@dataclass(frozen=True)
class Kernel:
    """One implementation of an op: ``backend`` on ``device`` ('cpu', 'cuda' or 'any'), named ``name``,
    taking the calls ``accepts(**facts)`` is true for (None: every call), ``rule`` saying so in words."""

    op: str
    backend: str
    device: str
    name: str
    rule: str = ANY_SHAPE
    accepts: Callable[..., bool] | None = None
    default: bool = True
    needs: str | None = None  # the extension kernel it calls (it must be registered for the device)
    run: Callable[..., Any] | None = field(default=None, compare=False, repr=False)  # the implementation

    @property
    def label(self) -> str:
        """``name (rule)``, or the name alone for a kernel of every shape (README table, ``qk.backends()``)."""
        return self.name if self.rule == ANY_SHAPE else f"{self.name} ({self.rule})"

    def on(self, device_type: str) -> bool:
        return self.device in ("any", device_type)

    def takes(self, facts: dict[str, Any]) -> bool:
        return self.accepts is None or bool(self.accepts(**facts))

    def registered(self, device_type: str) -> bool:
        return self.needs is None or _registered(self.needs, device_type)


@functools.cache
def _registered(kernel: str, device_type: str) -> bool:
    return _extension.has_kernel(kernel, "CUDA" if device_type == "cuda" else "CPU")


#: Every op's rows, filled by the op modules when they are imported (op name -> rows).
TABLE: dict[str, tuple[Kernel, ...]] = {}


def declare(op: str, *rows: Kernel) -> tuple[Kernel, ...]:
    """Record the rows of ``op`` (in order of preference) and return them."""
    if op in TABLE:
        raise ValueError(f"op {op!r} is declared twice")
    for r in rows:
        if r.op != op or r.backend not in BACKENDS or r.device not in ("any", *DEVICE_TYPES):
            raise ValueError(f"bad kernel row for {op!r}: {r}")
    TABLE[op] = tuple(rows)
    return TABLE[op]


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


def device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _live(row: Kernel, dtype_: str) -> bool:
    """Whether ``row``'s backend is live on ``dtype_`` (cached per process and TRITON_INTERPRET) and
    the extension kernel it calls is registered there."""
    return _cached_status(row.backend, dtype_, triton_interpret())[0] and row.registered(dtype_)


def choose(op: str, device: torch.device, **facts: Any) -> Kernel:
    """The row of ``op``'s table that runs this call on ``device`` (see the module docstring)."""
    dtype_ = device_type(device)
    forced = forced_backend()
    if forced is None:  # a pure function of the op, the device type, the facts and the (cached) backend status
        return _default_choice(op, dtype_, triton_interpret(), tuple(sorted(facts.items())))
    rows = [r for r in TABLE[op] if r.on(dtype_)]
    mine = [r for r in rows if r.backend == forced]
    if not mine:
        have = sorted({r.backend for r in rows})
        raise RuntimeError(f"{ENV_VAR}={forced}, but {forced} does not implement {op} on {dtype_} "
                           f"(implemented there by: {', '.join(have)})")
    live, why = _cached_status(forced, dtype_, triton_interpret())
    if not live:
        raise RuntimeError(f"{ENV_VAR}={forced} but that backend is not live for {op} on {device}: {why}")
    for r in mine:
        if r.takes(facts) and r.registered(dtype_):
            return r
    rules = "; ".join(f"{r.name}: {r.rule}" for r in mine)
    raise RuntimeError(f"{ENV_VAR}={forced}: no {forced} kernel of {op} takes this call on {device} ({facts}); "
                       f"its kernels take: {rules}")


@functools.lru_cache(maxsize=4096)
def _default_choice(op: str, dtype_: str, interpret: bool, facts: tuple) -> Kernel:
    """The first default row of ``op`` live on ``dtype_`` that takes ``facts``; cached (a decode step asks the
    same question for every layer)."""
    kw = dict(facts)
    for r in TABLE[op]:
        if r.on(dtype_) and r.default and r.takes(kw) and _live(r, dtype_):
            return r
    raise RuntimeError(f"no kernel of {op} takes this call on {dtype_}: {kw}")  # the reference takes all


def kernels_of(backend: str, device_type_: str) -> list[Kernel]:
    """The rows ``backend`` implements on ``device_type_``, every op."""
    return [r for rows in TABLE.values() for r in rows if r.backend == backend and r.on(device_type_)]


def markdown_table() -> str:
    """The README's backend table: one line per op, one column per backend, each cell that backend's
    kernels with their rules (on the device it serves: the CPU for cpp, CUDA for cuda and triton)."""
    columns = (("reference", "any"), ("cpp", "cpu"), ("cuda", "cuda"), ("triton", "cuda"))
    head = "| op | reference | cpp (CPU) | cuda | triton |\n|---|---|---|---|---|"
    lines = [head]
    for op, rows in TABLE.items():
        cells = []
        for backend, dev in columns:
            mine = [r for r in rows if r.backend == backend and (dev == "any" or r.on(dev))]
            cells.append("; ".join(r.label for r in mine) or "—")
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
