"""Triton kernels on the CPU under TRITON_INTERPRET=1, launched directly, against the reference.

The interpreter must be switched on before triton is imported, so these run in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

REPO = Path(__file__).resolve().parent.parent  # the script imports tests.bounds from here

SCRIPT = textwrap.dedent(
    """
    import sys, torch, qlora_kernels as qk
    sys.path.insert(0, __REPO__)
    from tests import bounds
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
    # The fused small-M matmul, forward and transposed, against the fp32 reference.
    from qlora_kernels.triton import nf4_matmul as trimm
    for (n, k), blocksize, nested, dtype, m in [((48, 128), 64, True, torch.float32, 5),
                                                 ((70, 192), 32, False, torch.bfloat16, 17),
                                                 ((130, 64), 64, True, torch.float16, 64),
                                                 ((16, 256), 256, True, torch.float32, 1)]:
        qw = qk.quantize_nf4(torch.randn(n, k), blocksize, nested)
        for transposed in (False, True):
            x = torch.randn(m, n if transposed else k, dtype=dtype)
            got = trimm.nf4_matmul(x, *qw.tensors(), n, k, transposed).float()
            want = ref.nf4_matmul(x, *qw.tensors(), n, k, transposed).float()
            w = ref.dequantize_nf4(*qw.tensors(), n * k, torch.float32).view(n, k)
            bounds.assert_within(f"nf4_matmul {(n, k, m, dtype, transposed)}", got, want,
                                 *bounds.kernel_matmul(x, w.t() if transposed else w, want))
            cases += 1
    assert not trimm.supports(64, 96, 64)  # K not a multiple of the blocksize: dequantize path
    # Split-K: every number of reduction slices gives the unsplit result (fp32 partials, summed).
    qw = qk.quantize_nf4(torch.randn(200, 320), 64, True)
    for transposed in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 200 if transposed else 320, dtype=dtype)
            want = ref.nf4_matmul(x, *qw.tensors(), 200, 320, transposed).float()
            w = ref.dequantize_nf4(*qw.tensors(), 200 * 320, torch.float32).view(200, 320)
            bound, why = bounds.kernel_matmul(x, w.t() if transposed else w, want)
            for split in (1, 2, 3, 5):
                got = trimm.nf4_matmul(x, *qw.tensors(), 200, 320, transposed, split=split)
                assert got.dtype == dtype
                bounds.assert_within(f"split {split} {dtype} {transposed}", got, want, bound, why=why)
                cases += 1
    # The grouped (mixture-of-experts) kernel: tiles never straddle experts, empty groups, both directions.
    from qlora_kernels.triton import nf4_grouped as trig
    for (e, n, k), blocksize, nested, dtype in [((3, 48, 64), 64, True, torch.float32),
                                                 ((4, 70, 128), 32, False, torch.bfloat16)]:
        qw = qk.quantize_nf4(torch.randn(e, n, k), blocksize, nested)
        counts = torch.tensor([0, 17, 1, 40][:e])
        off = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        for transposed in (False, True):
            x = torch.randn(int(off[-1]), n if transposed else k, dtype=dtype)
            got = trig.nf4_grouped_matmul(x, off, *qw.tensors(), n, k, transposed).float()
            want = ref.nf4_grouped_matmul(x, off, *qw.tensors(), n, k, transposed).float()
            dense = ref.dequantize_nf4(*qw.tensors(), e * n * k, torch.float32).view(e, n, k)
            bound = torch.cat([bounds.kernel_matmul(x[off[i]:off[i + 1]], dense[i].t() if transposed else dense[i],
                                                    want[off[i]:off[i + 1]])[0] for i in range(e)])
            bounds.assert_within(f"grouped {(e, n, k, transposed)}", got, want, bound)
            cases += 1
    # SwiGLU forward and backward (the fused QLoRA MLP's elementwise kernels) against the reference.
    from qlora_kernels.reference import swiglu as ref_sw
    from qlora_kernels.triton import swiglu as tri_sw
    for dtype in (torch.float32, torch.bfloat16):
        g, u, dh = (torch.randn(3, 1500, dtype=dtype) for _ in range(3))
        # elementwise, computed in fp32 (exp, reciprocal, products: <= 16 roundings of u(fp32)), each result
        # rounded to the dtype: the magnitudes |silu(g) u| <= 1.1 |g u| and the same for the gradients
        G, U, D = (t.abs().double() for t in (g, u, dh))
        want = ref_sw.swiglu(g, u)
        mags = [1.1 * G * U, D * U * (1.1 + G), D * 1.1 * G, 1.1 * G * U]
        e32, elo = 16 * bounds.unit_roundoff(torch.float32), bounds.unit_roundoff(dtype)
        for name, a, b, mag in zip(["h", "dg", "du", "h (saved)"],
                                   [tri_sw.swiglu(g, u), *tri_sw.swiglu_backward(dh, g, u)],
                                   [want, *ref_sw.swiglu_backward(dh, g, u)], mags):
            bounds.assert_within(f"swiglu {name} {dtype}", a, b, (e32 + 2 * elo) * mag + 2 * elo * b.abs().double(),
                                 why="16 u(fp32) + 2 u(dtype), of the magnitude, + 2 u(dtype) |result|")
        cases += 1
    # Strided inputs to the launchers themselves are read by value (they make them contiguous).
    q = qk.quantize_nf4(torch.randn(64, 128), 64, False)
    a = torch.stack([q.absmax, q.absmax * 0 - 3], 1)[:, 0]
    assert not a.is_contiguous()
    want = ref.dequantize_nf4(*q.tensors(), q.numel, torch.float32)
    strided = (q.packed, a, *q.tensors()[2:])
    assert torch.equal(tri.dequantize_nf4(*strided, q.numel, torch.float32), want)
    x = torch.randn(32, 128)[::2]
    got, exact = trimm.nf4_matmul(x, *strided, 64, 128, False), x @ want.view(64, 128).t()
    bounds.assert_within("strided", got, exact, *bounds.kernel_matmul(x, want.view(64, 128), exact))
    # Forced through the op registry: the interpreter counts as a live backend on the CPU.
    import os
    qw = qk.quantize_nf4(torch.randn(40, 96), 64, True)  # (triton does not quantize: forced, it would raise)
    os.environ["QLORA_KERNELS_BACKEND"] = "triton"
    assert torch.equal(qk.dequantize_nf4(qw), ref.dequantize_nf4(*qw.tensors(), qw.numel, torch.float32).view(40, 96))
    x = torch.randn(8, 96, requires_grad=True)
    y = qk.nf4_linear(x, qw)  # forward and backward through the fused Triton kernels
    y.sum().backward()
    w = ref.dequantize_nf4(*qw.tensors(), qw.numel, torch.float32).view(40, 96)
    exact = x.detach() @ w.t()
    bounds.assert_within("forced triton y", y, exact, *bounds.kernel_matmul(x.detach(), w, exact))
    exact = torch.ones(8, 40) @ w
    bounds.assert_within("forced triton x.grad", x.grad, exact, *bounds.kernel_matmul(torch.ones(8, 40), w.t(), exact))
    # The same edge rules as every backend: an empty batch, and autocast (x cast, y in the autocast dtype).
    assert torch.ops.qlora_kernels.nf4_matmul(torch.empty(0, 96), *qw.tensors(), 40, 96, False).shape == (0, 40)
    # dequantize_nf4_into is Triton's too now (no second op and copy), and a forced Triton never falls
    # back: K % blocksize != 0 takes Triton's dequantize + BLAS
    out = torch.empty(40 * 96, dtype=torch.bfloat16)
    torch.ops.qlora_kernels.dequantize_nf4_into(*qw.tensors(), qw.numel, out)
    assert torch.equal(out, ref.dequantize_nf4(*qw.tensors(), qw.numel, torch.bfloat16))
    from qlora_kernels.ops import _dispatch
    row = _dispatch.choose("nf4_matmul", torch.device("cpu"), m=8, k=96, blocksize=64, transposed=False,
                           gemv_max_m=4, fused_max_m=64)
    assert (row.backend, row.name) == ("triton", "dequantize + BLAS (interpreter)")
    with torch.autocast("cpu", torch.bfloat16):
        yb = qk.nf4_linear(x, qw)
    assert yb.dtype == torch.bfloat16
    exact = x.detach().bfloat16().float() @ w.t()
    bounds.assert_within("autocast y", yb, exact, *bounds.kernel_matmul(x.detach().bfloat16(), w, exact))
    print("cases", cases)
    """
)


def test_triton_dequantize_matches_reference_bitwise():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("QLORA_KERNELS_BACKEND", None)
    script = SCRIPT.replace("__REPO__", repr(str(REPO)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cases 120" in proc.stdout
