"""Triton kernels on the CPU under TRITON_INTERPRET=1, launched directly, against the reference.

The interpreter must be switched on before triton is imported, so these run in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed")

SCRIPT = textwrap.dedent(
    """
    import torch, qlora_kernels as qk
    from qlora_kernels.triton import nf4 as tri
    from qlora_kernels.reference import nf4 as ref
    torch.manual_seed(0)
    cases = 0
    for shape in [(5, 123), (1, 7), (1, 1), (3, 4097), (64, 64)]:
        for blocksize in (32, 64, 256):
            for nested in (False, True):
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    qw = qk.quantize_nf4(torch.randn(shape), blocksize, nested)
                    got = tri.dequantize_nf4(*qw.tensors(), qw.numel, dtype, block_bytes=64)
                    want = ref.dequantize_nf4(*qw.tensors(), qw.numel, dtype)
                    assert torch.equal(got, want), (shape, blocksize, nested, dtype)
                    cases += 1
    # Forced through the op registry: the interpreter counts as a live backend on the CPU.
    import os
    os.environ["QLORA_KERNELS_BACKEND"] = "triton"
    qw = qk.quantize_nf4(torch.randn(40, 96), 64, True)
    assert torch.equal(qk.dequantize_nf4(qw), ref.dequantize_nf4(*qw.tensors(), qw.numel, torch.float32).view(40, 96))
    print("cases", cases)
    """
)


def test_triton_dequantize_matches_reference_bitwise():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("QLORA_KERNELS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cases 90" in proc.stdout
