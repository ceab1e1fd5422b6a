"""lora_linear: the fused QLoRA autograd Function against the composite formula in plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import qlora_kernels as qk
from qlora_kernels.functional import dropout_mask

from . import bounds

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _problem(m, k, n, r, dtype, device, seed=0, bias=True, lora_dtype=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    qw = qk.quantize_nf4(w.to(dtype), blocksize=64).to(device)
    x = torch.randn(*m, k, generator=g).to(device, dtype)
    lora_dtype = dtype if lora_dtype is None else lora_dtype
    a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(device, lora_dtype)
    b = (torch.randn(n, r, generator=g) * 0.1).to(device, lora_dtype)
    b_ = (torch.randn(n, generator=g) * 0.1).to(device, dtype) if bias else None
    return x, qw, a, b, b_


def _composite(x, qw, a, b, scale, bias, mask=None, p=0.0):
    """The formula, in fp32, with autograd doing the backward."""
    w = qk.dequantize_nf4(qw, torch.float32)
    xf = x.float()
    xd = xf if mask is None else xf * mask / (1 - p)
    y = xf @ w.t() + scale * (xd @ a.float().t()) @ b.float().t()
    if bias is not None:
        y = y + bias.float()
    return y


def _leaves(*ts, dtype=None):
    """Fresh leaf copies (in ``dtype`` if given: the fp32 reference works on fp32 copies of the same values)."""
    return [None if t is None else t.detach().to(dtype or t.dtype, copy=True).requires_grad_(True) for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [((4, 9), 128, 64, 8), ((7,), 123, 5, 3), ((1,), 64, 96, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_composite(device, dtype, shape, bias):
    m, k, n, r = shape
    torch.manual_seed(1)
    x, qw, a, b, b_ = _problem(m, k, n, r, dtype, device, bias=bias)
    scale = 2.0
    dy = torch.randn(*m, n, device=device, dtype=dtype)

    x1, a1, b1, bias1 = _leaves(x, a, b, b_)
    y = qk.lora_linear(x1, qw, a1, b1, scale, bias=bias1)
    assert y.shape == (*m, n) and y.dtype == dtype
    y.backward(dy)

    x2, a2, b2, bias2 = _leaves(x, a, b, b_, dtype=torch.float32)
    y_ref = _composite(x2, qw, a2, b2, scale, bias2)
    y_ref.backward(dy.float())

    w = qk.dequantize_nf4(qw, torch.float32)
    db1, db2 = (None, None) if b_ is None else (bias1.grad, bias2.grad)
    bounds.assert_lora_matches(w, scale, (x, a, b, b_), dy, (y, x1.grad, a1.grad, b1.grad, db1),
                               (y_ref, x2.grad, a2.grad, b2.grad, db2), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_adapters_under_bf16_activations(device):
    """Mixed precision: adapters fp32, x bf16 -> output bf16, adapter grads fp32 (as under autocast)."""
    x, qw, a, b, _ = _problem((16,), 128, 64, 4, torch.bfloat16, device, lora_dtype=torch.float32)
    x1, a1, b1 = _leaves(x, a, b)
    y = qk.lora_linear(x1, qw, a1, b1, 0.5)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and a1.grad.dtype == torch.float32 and b1.grad.dtype == torch.float32
    x2, a2, b2 = _leaves(x, a, b, dtype=torch.float32)
    y_ref = _composite(x2, qw, a2, b2, 0.5, None)
    y_ref.square().sum().backward()
    # the loss is y^2 summed: its gradient is 2 y (of the reference, fp32)
    bounds.assert_lora_matches(qk.dequantize_nf4(qw, torch.float32), 0.5, (x, a, b, None), 2 * y_ref.detach(),
                               (y, None, a1.grad, b1.grad, None), (y_ref, None, a2.grad, b2.grad, None), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_decode_path_has_no_autograd_node_and_matches_the_formula(device, lora_dtype, context):
    """With nothing to differentiate (decode), lora_linear and QLoraLinear make no autograd node and save nothing;
    the LoRA term runs in the adapters' dtype (as PEFT's) and the output still matches the fp32 formula."""
    x, qw, a, b, bias = _problem((3, 2), 192, 80, 8, torch.bfloat16, device, lora_dtype=lora_dtype)
    # positive terms (no cancellation: the bound from their magnitudes is tight) and a LoRA term as large as the
    # base product, so that a wrong scale or dtype shows above the roundings
    x, a, b = x.abs(), a.abs(), b.abs() * 20
    a.requires_grad_(True)  # parameters that want gradients, outside a grad-enabled region: still no node
    grad_mode = torch.inference_mode() if context == "inference_mode" else torch.no_grad()
    with grad_mode:
        y = qk.lora_linear(x, qw, a, b, 0.75, bias)
    assert y.grad_fn is None and y.dtype == torch.bfloat16 and y.shape == (3, 2, 80)
    want = _composite(x, qw, a.detach(), b, 0.75, bias)
    mag = bounds.abs_twin(bounds.lora_formula(0.75), (x, qk.dequantize_nf4(qw, torch.float32), a, b, bias),
                          torch.ones_like(want))[0]
    # kernel and reference sum in fp32; the base product may round the codes to bf16; the rank-r term in the
    # adapters' dtype rounds x A^T once more when they are bf16; the output rounds to bf16
    bound, why = bounds.chained(mag, want, 192 + 8, torch.bfloat16, 2 if lora_dtype == torch.float32 else 3)
    bounds.assert_within("decode lora_linear", y, want, bound, why=why)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_is_kept_for_backward(device):
    p = 0.3
    x, qw, a, b, b_ = _problem((32,), 128, 64, 4, torch.float32, device)
    dy = torch.randn(32, 64, device=device)

    torch.manual_seed(123)
    x1, a1, b1 = _leaves(x, a, b)
    y = qk.lora_linear(x1, qw, a1, b1, 1.5, bias=b_, dropout_p=p)
    y.backward(dy)

    torch.manual_seed(123)
    mask = dropout_mask(x, p)  # the same draw lora_linear made
    assert 0.55 < mask.float().mean().item() < 0.85
    x2, a2, b2 = _leaves(x, a, b)
    y_ref = _composite(x2, qw, a2, b2, 1.5, b_, mask=mask, p=p)
    y_ref.backward(dy)
    for got, want in [(y, y_ref), (x1.grad, x2.grad), (a1.grad, a2.grad), (b1.grad, b2.grad)]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the dropout really changed the LoRA branch
    assert not torch.allclose(y, _composite(x, qw, a, b, 1.5, b_), atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_under_activation_checkpointing(device):
    """checkpoint() restores the RNG state, so the recomputed forward draws the same mask."""
    x, qw, a, b, b_ = _problem((16,), 128, 64, 4, torch.float32, device)

    def run(use_checkpoint):
        torch.manual_seed(7)
        x1, a1, b1 = _leaves(x, a, b)

        def f(inp):
            return qk.lora_linear(inp, qw, a1, b1, 2.0, bias=b_, dropout_p=0.5).tanh()

        y = checkpoint(f, x1, use_reentrant=False) if use_checkpoint else f(x1)
        y.sum().backward()
        return y, x1.grad, a1.grad, b1.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_saves_only_x_mask_and_rank_r_tensors():
    """What the Function keeps for backward: x, the bool mask, x·Aᵀ ([M, r]) and the resident A, B and NF4 tensors —
    never a dequantized [N, K] weight nor an [M, N] / dropped [M, K] float copy."""
    m, k, n, r = 48, 128, 96, 4
    x, qw, a, b, b_ = _problem((m,), k, n, r, torch.float32, "cpu")
    x1, a1, b1 = _leaves(x, a, b)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qk.lora_linear(x1, qw, a1, b1, 1.0, bias=b_, dropout_p=0.1)
    resident = {id(t) for t in qw.tensors() if isinstance(t, torch.Tensor)}
    floats = [t for t in saved if t.is_floating_point() and id(t) not in resident]
    shapes = sorted(tuple(t.shape) for t in floats)
    assert shapes == sorted([(m, k), (m, r), (r, k), (n, r)]), shapes
    bools = [t for t in saved if t.dtype == torch.bool]
    assert [tuple(t.shape) for t in bools] == [(m, k)]
    assert not any(t.numel() >= n * k and t.is_floating_point() for t in saved)


def test_only_needed_gradients():
    x, qw, a, b, _ = _problem((8,), 128, 64, 4, torch.float32, "cpu")
    a1, b1 = _leaves(a, b)
    qk.lora_linear(x, qw, a1, b1, 1.0).sum().backward()  # x needs no grad (e.g. the first layer)
    assert a1.grad is not None and b1.grad is not None
    x1, b2 = _leaves(x, b)
    qk.lora_linear(x1, qw, a, b2, 1.0).sum().backward()  # A frozen
    assert x1.grad is not None and b2.grad is not None


def test_zero_B_gives_the_base_layer():
    x, qw, a, b, b_ = _problem((3, 4), 128, 64, 8, torch.float32, "cpu")
    y = qk.lora_linear(x, qw, a, torch.zeros_like(b), 4.0, bias=b_)
    torch.testing.assert_close(y, qk.nf4_linear(x, qw, b_), atol=0, rtol=0)


def test_nf4_linear_still_works():
    x, qw, _, _, b_ = _problem((5,), 128, 64, 1, torch.float32, "cpu")
    x1, bias1 = _leaves(x, b_)
    qk.nf4_linear(x1, qw, bias1).sum().backward()
    w = qk.dequantize_nf4(qw, torch.float32)
    torch.testing.assert_close(x1.grad, w.sum(0).expand(5, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias1.grad, torch.full((64,), 5.0))


def test_bad_inputs_name_argument_expected_and_actual():
    x, qw, a, b, b_ = _problem((4,), 128, 64, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"lora_A must be \[r, 128\].*got \[8, 127\]"):
        qk.lora_linear(x, qw, a[:, :127], b, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[64, 8\].*got \[64, 7\]"):
        qk.lora_linear(x, qw, a, b[:, :7], 1.0)
    with pytest.raises(TypeError, match=r"lora_B must have lora_A's dtype torch.float32; got torch.bfloat16"):
        qk.lora_linear(x, qw, a, b.bfloat16(), 1.0)
    with pytest.raises(TypeError, match=r"x must be float32.*got torch.int64"):
        qk.lora_linear(x.long(), qw, a, b, 1.0)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 128\].*got \[4, 64\]"):
        qk.lora_linear(x[:, :64], qw, a, b, 1.0)
    with pytest.raises(TypeError, match=r"scale must be a real number"):
        qk.lora_linear(x, qw, a, b, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\); got 1.0"):
        qk.lora_linear(x, qw, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match=r"qw must be an NF4Weight; got Tensor"):
        qk.lora_linear(x, x, a, b, 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \[64\]; got \[63\]"):
        qk.lora_linear(x, qw, a, b, 1.0, bias=b_[:63])
    with pytest.raises(TypeError, match=r"lora_A must be float32.*got torch.int32"):
        qk.lora_linear(x, qw, a.int(), b, 1.0)
