"""nf4_linear: forward, gradients for x and bias (none for the frozen weight), compile."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk

from . import bounds
from .conftest import DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
@pytest.mark.parametrize("shape", [(48, 96), (5, 123), (130, 64)])
def test_forward_and_backward_match_dense(shape, lead, dtype, device):
    n, k = shape
    qw = qk.quantize_nf4(torch.randn(shape, device=device), 64, True)
    w = qk.dequantize_nf4(qw, torch.float32)
    x = torch.randn(*lead, k, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    y = qk.nf4_linear(x, qw, bias)
    assert y.shape == (*lead, n) and y.dtype == dtype
    x32 = x.detach().float().requires_grad_()
    b32 = bias.detach().float().requires_grad_()
    y32 = x32 @ w.t() + b32
    # the bias is one more addend of each output: its |b| joins the terms' magnitude
    bound, why = bounds.kernel_matmul(torch.cat([x.detach(), x.new_ones(*lead, 1)], -1), torch.cat(
        [w, b32.detach()[:, None]], 1), y32.detach())
    bounds.assert_within("y", y, y32, bound, why=why)
    dy = torch.randn_like(y32)
    y.backward(dy.to(dtype))
    y32.backward(dy)
    dy_low = dy.to(dtype)  # what the kernel's backward sees
    bound, why = bounds.kernel_matmul(dy_low, w.t(), x32.grad)
    bounds.assert_within("x.grad", x.grad, x32.grad, bound + 2 * bounds.unit_roundoff(dtype) * bounds.abs_matmul(
        dy, w.t()), why=why + " + 2 u |dy| |w| (dy rounded to x's dtype)")
    rows = dy.reshape(-1, n)
    bound = bounds.reduction(rows.abs().sum(0).double(), rows.shape[0]) + 2 * bounds.unit_roundoff(dtype) * (
        rows.abs().sum(0).double() + b32.grad.abs().double())
    bounds.assert_within("bias.grad", bias.grad, b32.grad, bound,
                         why="2 gamma_M sum|dy| + 2 u (sum|dy| + |db|) (dy and the result rounded to x's dtype)")


def test_gradcheck_fp64_free_path():
    # The weight is frozen; check d/dx numerically in fp32 with a loose tolerance.
    qw = qk.quantize_nf4(torch.randn(6, 64), 32, True)
    x = torch.randn(3, 64, requires_grad=True)
    y = qk.nf4_linear(x, qw)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    eps = 1e-2
    i, j = 1, 7
    xp, xm = x.detach().clone(), x.detach().clone()
    xp[i, j] += eps
    xm[i, j] -= eps
    num = (qk.nf4_linear(xp, qw).square().sum() - qk.nf4_linear(xm, qw).square().sum()) / (2 * eps)
    assert abs(float(num) - float(g[i, j])) < 1e-2 * max(1.0, abs(float(num)))


def test_compile_fullgraph_cpu():
    qw = qk.quantize_nf4(torch.randn(32, 64), 64, True)
    bias = torch.randn(32, requires_grad=True)

    def f(x):
        return qk.nf4_linear(x, qw, bias).relu().sum()

    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    x_eager = x.detach().clone().requires_grad_()
    bias_grad = bias.grad.clone()
    bias.grad = None
    f(x_eager).backward()
    torch.testing.assert_close(out, f(x_eager.detach()))
    torch.testing.assert_close(x.grad, x_eager.grad)
    torch.testing.assert_close(bias_grad, bias.grad)


def test_bad_inputs():
    qw = qk.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        qk.nf4_linear(torch.randn(2, 63), qw)
    with pytest.raises(ValueError, match="bias must have shape"):
        qk.nf4_linear(torch.randn(2, 64), qw, torch.zeros(7))
    with pytest.raises(TypeError, match="qw must be an NF4Weight"):
        qk.nf4_linear(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        qk.nf4_linear(torch.ones(2, 64, dtype=torch.int32), qw)


def test_inference_calls_skip_the_op_dispatch_but_not_its_result_or_checks():
    """Under inference mode nf4_linear runs the op's implementation directly (no custom-op dispatch): the same
    values as the op; a compiled inference graph still holds the op; a weight whose tensors changed after it was
    made (absmax cast to bf16, as a module-wide .to(bf16) of raw buffers would) gets the op's error, not a read of
    the wrong bytes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    qw = qk.quantize_nf4(torch.randn(48, 128))
    x = torch.randn(3, 128).bfloat16()
    with torch.inference_mode():
        want = torch.ops.qlora_kernels.nf4_matmul(x, *qw.tensors(), 48, 128, False)
        assert torch.equal(qk.nf4_linear(x, qw), want)
        counter = CompileCounterWithBackend("eager")
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: qk.nf4_linear(t, qw), backend=counter, fullgraph=True)
        assert torch.equal(compiled(x), want)
        assert counter.frame_count == 1
        assert any(n.target in (torch.ops.qlora_kernels.nf4_matmul, torch.ops.qlora_kernels.nf4_matmul.default)
                   for g in counter.graphs for n in g.graph.nodes)
        bad = list(qw.tensors())
        bad[1] = bad[1].to(torch.bfloat16)
        from qlora_kernels.ops import nf4 as ops_nf4

        with pytest.raises(ValueError, match="absmax must be"):
            ops_nf4.matmul_checked_weight(x, tuple(bad), 48, 128)
        with pytest.raises(ValueError, match=r"x must be 2-D \[M, 128\]"):
            ops_nf4.matmul_checked_weight(x[:, :64], qw.tensors(), 48, 128)
