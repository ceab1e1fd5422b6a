"""``qlora_kernels.backends()``: which backends are live here, why the others are not, and what each
implements (from the ops' kernel tables, the same rows the dispatcher chooses from)."""

from __future__ import annotations

from dataclasses import dataclass

from ._extension import cpu_isa
from .ops._dispatch import BACKENDS, ENV_VAR, forced_backend, kernels_of, status


@dataclass(frozen=True)
class BackendStatus:
    name: str
    live: bool
    reason: str
    device_type: str = "cpu"
    kernels: tuple[str, ...] = ()  # "op: kernel (rule)" for every kernel it implements on device_type

    def __str__(self) -> str:
        return f"{self.name:<10} {'live' if self.live else 'off':<5} {self.reason}"


def backends(device_type: str | None = None) -> dict[str, BackendStatus]:
    """Status of every backend for tensors on ``device_type`` ('cpu' or 'cuda'; default: 'cuda'
    for the GPU backends, 'cpu' for reference and cpp). Does not initialize CUDA beyond the
    device-count query ``torch.cuda.is_available()`` makes."""
    out = {}
    for name in BACKENDS:
        dev = device_type or ("cpu" if name in ("reference", "cpp") else "cuda")
        live, reason = status(name, dev)
        kernels = tuple(f"{k.op}: {k.label}" for k in kernels_of(name, dev))
        out[name] = BackendStatus(name, live, reason, dev, kernels)
    return out


def backends_report() -> str:
    """The status lines (``qlora-kernels backends``)."""
    lines = [str(s) for s in backends().values()]
    isa = cpu_isa()
    if isa is not None:
        lines.append(f"cpp CPU kernels: {isa} (the CPU's vector ISA, capped by ATEN_CPU_CAPABILITY)")
    forced = forced_backend()
    lines.append(f"{ENV_VAR}={forced}" if forced else f"{ENV_VAR} unset: fastest live backend per op and device")
    return "\n".join(lines)
