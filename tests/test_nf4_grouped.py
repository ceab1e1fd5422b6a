"""The grouped NF4 matmul of mixture-of-experts layers: every backend against the reference, the
autograd Function, autocast and bad input. (The Triton kernel runs under the interpreter in
tests/test_triton_interpret.py.)"""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.functional import nf4_grouped_linear
from qlora_kernels.ops import _dispatch
from qlora_kernels.reference import nf4 as ref

from . import bounds

OPS = torch.ops.qlora_kernels


def _backends(device: str) -> list[str]:
    if device == "cpu":
        return ["reference"] + (["cpp"] if _dispatch.status("cpp", "cpu")[0] else [])
    return ["reference"] + [b for b in ("cuda", "triton") if _dispatch.status(b, "cuda")[0]]


def _offsets(counts: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape, blocksize", [((3, 48, 64), 64), ((4, 70, 128), 32), ((2, 16, 1024), 1024)])
def test_every_backend_matches_the_reference(shape, blocksize, nested, dtype, device, monkeypatch):
    experts, n, k = shape
    qw = qk.quantize_nf4(torch.randn(shape, device=device), blocksize, nested)
    counts = [0, 9, 1, 30][:experts] if experts > 2 else [5, 0]  # empty groups and one-row groups
    off = _offsets(counts, device)
    dense = ref.dequantize_nf4(*qw.tensors(), experts * n * k, torch.float32).view(experts, n, k)
    for transposed in (False, True):
        x = torch.randn(int(off[-1]), n if transposed else k, dtype=dtype, device=device)
        want = ref.nf4_grouped_matmul(x, off, *qw.tensors(), n, k, transposed).float()
        parts = [bounds.kernel_matmul(x[off[e]:off[e + 1]], dense[e].t() if transposed else dense[e],
                                      want[off[e]:off[e + 1]]) for e in range(experts)]
        bound, why = torch.cat([b for b, _ in parts]), parts[0][1] + " (each row with its expert's weight)"
        for backend in _backends(device):
            monkeypatch.setenv("QLORA_KERNELS_BACKEND", backend)
            got = OPS.nf4_grouped_matmul(x, off, *qw.tensors(), n, k, transposed)
            assert got.dtype == dtype and got.shape == want.shape
            bounds.assert_within(f"{backend} nf4_grouped_matmul", got, want, bound, why=why)


def test_reference_is_the_dense_per_expert_product():
    qw = qk.quantize_nf4(torch.randn(3, 8, 32), 32, True)
    w = qk.dequantize_nf4(qw).float()
    off = _offsets([2, 0, 3], "cpu")
    x = torch.randn(5, 32)
    want = torch.cat([x[:2] @ w[0].t(), x[2:] @ w[2].t()])
    torch.testing.assert_close(ref.nf4_grouped_matmul(x, off, *qw.tensors(), 8, 32, False), want)


def test_opcheck(device):
    qw = qk.quantize_nf4(torch.randn(2, 24, 64, device=device))
    off = _offsets([3, 4], device)
    torch.library.opcheck(OPS.nf4_grouped_matmul.default, (torch.randn(7, 64, device=device), off, *qw.tensors(), 24,
                                                           64, False))
    torch.library.opcheck(OPS.nf4_grouped_matmul.default, (torch.randn(7, 24, device=device), off, *qw.tensors(), 24,
                                                           64, True))


def test_linear_function_gradient_and_autocast(device):
    torch.manual_seed(0)
    qw = qk.quantize_nf4(torch.randn(3, 40, 64, device=device))
    w = qk.dequantize_nf4(qw).float()
    off = _offsets([4, 0, 6], device)
    x = torch.randn(10, 64, device=device, requires_grad=True)
    y = nf4_grouped_linear(x, off, qw)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd = x.detach().clone().requires_grad_(True)
    want = torch.cat([xd[:4] @ w[0].t(), xd[4:] @ w[2].t()])
    want.backward(dy)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, xd.grad, atol=1e-4, rtol=1e-4)
    with torch.autocast(device, torch.bfloat16):
        yb = nf4_grouped_linear(x, off, qw)
        yo = OPS.nf4_grouped_matmul(x.detach(), off, *qw.tensors(), 40, 64, False)
    assert yb.dtype == yo.dtype == torch.bfloat16


def test_bad_input_names_the_argument():
    qw = qk.quantize_nf4(torch.randn(3, 8, 32), 32)
    x = torch.randn(5, 32)
    with pytest.raises(ValueError, match=r"offsets must be int64 \[E \+ 1\] = \[4\]"):
        OPS.nf4_grouped_matmul(x, torch.tensor([0, 5]), *qw.tensors(), 8, 32, False)
    with pytest.raises(ValueError, match="a whole number of experts"):
        OPS.nf4_grouped_matmul(x, torch.tensor([0, 5]), *qw.tensors(), 7, 32, False)
    with pytest.raises(ValueError, match=r"x must be 2-D \[T, 32\]"):
        OPS.nf4_grouped_matmul(torch.randn(5, 8), torch.tensor([0, 1, 2, 5]), *qw.tensors(), 8, 32, False)
    with pytest.raises(ValueError, match="offsets must rise from 0 to x.shape"):
        OPS.nf4_grouped_matmul(x, torch.tensor([0, 3, 2, 5]), *qw.tensors(), 8, 32, False)
    with pytest.raises(ValueError, match="shape \\[experts, out_features, in_features\\]"):
        nf4_grouped_linear(x, torch.tensor([0, 5]), qk.quantize_nf4(torch.randn(8, 32)))
    assert OPS.nf4_grouped_matmul(x[:0], torch.zeros(4, dtype=torch.long), *qw.tensors(), 8, 32, False).shape == (0, 8)
