"""The compiled extension is optional: importing never fails, never initializes CUDA."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_does_not_initialize_cuda():
    proc = _run(
        """
        import torch, qlora_kernels as qk
        qk.quantize_nf4(torch.randn(8, 64))
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_broken_extension_falls_back_to_reference():
    proc = _run(
        """
        import sys, importlib.abc, importlib.machinery

        class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name == "qlora_kernels._C":
                    return importlib.machinery.ModuleSpec(name, self, origin="/broken/_C.so")
            def create_module(self, spec):
                raise ImportError("undefined symbol: _ZN3c10 (simulated)")
            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, Broken())
        import torch, qlora_kernels as qk
        status = qk.backends()
        assert not status["cpp"].live and "simulated" in status["cpp"].reason, status
        qw = qk.quantize_nf4(torch.randn(8, 64))
        x = torch.randn(2, 64)
        torch.testing.assert_close(qk.nf4_linear(x, qw), x @ qk.dequantize_nf4(qw).t())
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    assert "failed to load" in proc.stderr  # the reason is logged


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_the_cpu_kernels_isa_is_capped_by_aten_cpu_capability():
    """ATEN_CPU_CAPABILITY limits our C++ kernels as it limits torch's (QLORA_KERNELS_CPU_CAPABILITY: ours alone),
    so that one variable runs the whole program as a machine without the wider ISA would."""
    import os

    from qlora_kernels import _extension

    if _extension.cpu_isa() is None:
        pytest.skip("C++ extension not built")
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    hw = ("avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags and {"avx2", "fma", "f16c"} <= flags
          else "avx2" if {"avx2", "fma", "f16c"} <= flags else "scalar")
    order = ["scalar", "avx2", "avx512"]
    if hw == "avx512" and "avx512_bf16" in flags:  # the bf16 dot product comes with AVX-512, never alone
        order[2] = hw = "avx512+bf16"

    def isa(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "QLORA_KERNELS_CPU_CAPABILITY")}
        code = "from qlora_kernels import _extension; print(_extension.cpu_isa())"
        return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                              timeout=120, check=True).stdout.strip()

    assert isa() == hw
    assert isa(ATEN_CPU_CAPABILITY="default") == "scalar"
    assert isa(ATEN_CPU_CAPABILITY="avx2") == order[min(1, order.index(hw))]
    assert isa(ATEN_CPU_CAPABILITY="avx512") == hw
    assert isa(ATEN_CPU_CAPABILITY="avx512", QLORA_KERNELS_CPU_CAPABILITY="default") == "scalar"
