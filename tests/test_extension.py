"""The compiled extension is optional: importing never fails, never initializes CUDA."""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
