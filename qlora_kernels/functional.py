"""Autograd Functions over the ops: what each saves, what it recomputes, and why.

* :func:`nf4_linear`: ``y = x @ deq(W)^T + b`` for a frozen NF4 weight W of shape [N, K].
* :func:`lora_linear`: ``y = x @ deq(W)^T + b + s * dropout(x) @ A^T @ B^T``, the QLoRA layer, with
  one fused backward for x, A, B (and b).
* :func:`nf4_grouped_linear`: the experts of a mixture-of-experts layer, ``y[i] = x[i] @ deq(W[e(i)])^T``
  for rows of x grouped by expert.

Autocast: both behave as ``nn.Linear`` does. Inside an autocast region x is cast to the autocast dtype
(differentiably: the gradient comes back in x's own dtype), the Function runs with autocast off in
that one dtype (base matmul, LoRA contractions, bias), and y comes out in it; its backward runs in it
too, whatever autocast region the backward is called from. Outside autocast everything runs in x's
dtype. The adapters and the bias are cast to the compute dtype per call; their gradients come back
in their own dtype.

The NF4 weight enters every Function as the op arguments of :meth:`NF4Weight.tensors` plus its shape
``(n, k)``, so the Functions are usable from modules that keep those tensors as buffers (no
:class:`NF4Weight` object has to be built per call, which keeps ``torch.compile`` graphs clean).
"""

from __future__ import annotations

import contextlib
import numbers

import torch
from torch import Tensor

from .dtypes import FLOAT_DTYPES as _FLOAT_DTYPES
from .nf4 import NF4Weight
from .ops import nf4 as _nf4_ops

_QK = torch.ops.qlora_kernels
_EAGER_DEVICES = ("cpu", "cuda")


def _matmul_no_grad(x: Tensor, weight: tuple, n: int, k: int) -> Tensor:
    """``x @ deq(W)^T`` with nothing to differentiate and autocast off: eagerly, the op's implementation without
    its custom-op dispatch (see :func:`~qlora_kernels.ops.nf4.matmul_checked_weight`); the op itself while
    ``torch.compile`` traces, for tensor subclasses (fake tensors) and on other devices (meta: the op's fake
    kernel gives the shape), so that graphs hold the op."""
    if type(x) is Tensor and x.device.type in _EAGER_DEVICES and not torch.compiler.is_compiling():
        return _nf4_ops.matmul_checked_weight(x, weight, n, k)
    return _QK.nf4_matmul(x, *weight, n, k, False)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for input x: the autocast dtype inside an autocast region
    of x's device type, else x's dtype (the rule of ``nn.Linear``). Device types without autocast
    (``meta``) compute in x's dtype."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_off(device_type: str):
    if not torch.amp.is_autocast_available(device_type):  # meta: shapes only, nothing to switch off
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


class NF4LinearFunction(torch.autograd.Function):
    """``y = x @ deq(W)^T`` for x [M, K]; gradients for x only (W is frozen).

    Saves nothing but the (already resident) NF4 tensors: the backward ``dX = dY @ deq(W)``
    runs the same NF4 matmul machinery with ``transposed=True`` instead of keeping a
    dequantized copy of W alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k):
        ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code)
        ctx.offset, ctx.blocksize, ctx.n, ctx.k = offset, blocksize, n, k
        return _QK.nf4_matmul(x, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k, False)

    @staticmethod
    def backward(ctx, dy):
        grad_x = None
        if ctx.needs_input_grad[0]:
            with _autocast_off(dy.device.type):
                grad_x = _QK.nf4_matmul(dy.contiguous(), *ctx.saved_tensors, ctx.offset, ctx.blocksize, ctx.n, ctx.k,
                                        True)
        return (grad_x,) + (None,) * 9


class NF4GroupedLinearFunction(torch.autograd.Function):
    """``y[i] = x[i] @ deq(W[e(i)])^T`` for rows of x grouped by expert (``offsets``), W [E, N, K]
    frozen; gradient for x only. Saves only the (resident) NF4 tensors and the offsets: the backward
    ``dX[i] = dY[i] @ deq(W[e(i)])`` is the same grouped op, transposed."""

    @staticmethod
    def forward(ctx, x, offsets, packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k):
        ctx.save_for_backward(offsets, packed, absmax, code, nested_absmax, nested_code)
        ctx.offset, ctx.blocksize, ctx.n, ctx.k = offset, blocksize, n, k
        return _QK.nf4_grouped_matmul(x, offsets, packed, absmax, code, nested_absmax, nested_code, offset, blocksize,
                                      n, k, False)

    @staticmethod
    def backward(ctx, dy):
        grad_x = None
        if ctx.needs_input_grad[0]:
            with _autocast_off(dy.device.type):
                grad_x = _QK.nf4_grouped_matmul(dy.contiguous(), *ctx.saved_tensors, ctx.offset, ctx.blocksize, ctx.n,
                                                ctx.k, True)
        return (grad_x,) + (None,) * 10


def nf4_grouped_linear(x: Tensor, offsets: Tensor, qw: NF4Weight) -> Tensor:
    """Experts: ``y[i] = x[i] @ deq(W[e])^T`` for the rows ``offsets[e] : offsets[e + 1]`` of x (grouped by
    expert), W the NF4 weight ``[E, N, K]`` (e.g. a fused ``experts.gate_up_proj``); gradients flow to x.

    x: float32/float16/bfloat16 ``[T, K]``; offsets: int64 ``[E + 1]`` rising from 0 to T. The result is
    ``[T, N]`` in the compute dtype (:func:`compute_dtype`), as :func:`nf4_linear`.
    """
    if not isinstance(qw, NF4Weight) or len(qw.shape) != 3:
        got = list(qw.shape) if isinstance(qw, NF4Weight) else type(qw).__name__
        raise ValueError(f"qw must be an NF4Weight of shape [experts, out_features, in_features]; got {got}")
    _, n, k = qw.shape
    _check_x(x, k)
    return _nf4_grouped_linear(x, offsets, qw.tensors(), n, k)


def _nf4_grouped_linear(x: Tensor, offsets: Tensor, weight: tuple, n: int, k: int) -> Tensor:
    """:func:`nf4_grouped_linear` without the argument checks, on the op arguments of the weight (for modules)."""
    dtype = compute_dtype(x)
    with _autocast_off(x.device.type):
        return NF4GroupedLinearFunction.apply(x.reshape(-1, k).to(dtype), offsets, *weight, n, k)


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """The keep-mask :func:`lora_linear` samples for dropout probability ``p``: bool, x's shape,
    each element kept with probability ``1 - p`` (drawn from the default generator of x's device)."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


def _lora_forward(x, lora_a, lora_b, bias, scale, dropout_p, weight, n, k):
    """The forward of :class:`LoraLinearFunction` (y, the dropout mask or None, and ``xa``); the LoRA term is
    two rank-r products added into the NF4 op's output, nothing of the base weight's size."""
    a = lora_a.to(x.dtype)
    b = lora_b.to(x.dtype)
    mask = None
    xd = x
    if dropout_p > 0.0:
        mask = dropout_mask(x, dropout_p)
        xd = x * mask * (1.0 / (1.0 - dropout_p))
    xa = xd @ a.t()  # [M, r]
    y = _QK.nf4_matmul(x, *weight, n, k, False)
    y.addmm_(xa, b.t(), alpha=scale)
    if bias is not None:
        y.add_(bias.to(y.dtype))
    return y, mask, xa


class LoraLinearFunction(torch.autograd.Function):
    """``y = x W^T + b + s · (x ⊙ m / (1 - p)) A^T B^T`` for x [M, K], W = deq(NF4) [N, K],
    A [r, K], B [N, r]; gradients for x, A, B and b.

    Compute dtype: everything runs in x's dtype (fp32 accumulation inside the matmuls; the caller,
    :func:`lora_linear`, has already cast x to the autocast dtype inside an autocast region and runs
    this with autocast off); A and B are cast to it per call (a rank-r copy) and their gradients are
    returned in their own dtype, so fp32 adapters train under bf16 activations.

    Forward: the base product comes from the NF4 op; the LoRA term is added *into* that output with
    one ``addmm_`` (and the bias with one ``add_``), so no second [M, N] tensor is made.

    Saved for backward: x (the caller holds it anyway), the bool dropout mask m when p > 0 (1 byte per
    element instead of a dropped copy of x), ``xa = dropout(x) A^T`` ([M, r], tiny), A and B (parameters,
    resident) and the NF4 tensors (frozen buffers, resident). Not saved: deq(W) (the backward
    ``dY deq(W)`` re-runs the NF4 op, transposed, instead of holding an [N, K] copy alive between
    forward and backward) and ``dropout(x)`` (recomputed from x and m, only when A needs a gradient).

    Backward (all LoRA contractions go through rank r; s is applied to the [M, r] intermediates):
    ``g = s · dY B`` [M, r]; ``dX = dY deq(W) + (g A) ⊙ m / (1 - p)``; ``dA = g^T dropout(x)``;
    ``dB = s · dY^T xa``; ``db = Σ_M dY``.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, scale, dropout_p, packed, absmax, code, nested_absmax, nested_code,
                offset, blocksize, n, k):
        y, mask, xa = _lora_forward(x, lora_a, lora_b, bias, scale, dropout_p,
                                    (packed, absmax, code, nested_absmax, nested_code, offset, blocksize), n, k)
        ctx.save_for_backward(x, mask, xa, lora_a, lora_b, packed, absmax, code, nested_absmax, nested_code)
        ctx.scale, ctx.dropout_p, ctx.offset, ctx.blocksize, ctx.n, ctx.k = scale, dropout_p, offset, blocksize, n, k
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        with _autocast_off(dy.device.type):
            return LoraLinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, mask, xa, lora_a, lora_b, packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        s, p = ctx.scale, ctx.dropout_p
        dy = dy.contiguous()
        a = lora_a.to(dy.dtype)
        b = lora_b.to(dy.dtype)
        grad_x = grad_a = grad_b = grad_bias = None
        if need_x or need_a:
            g = (dy @ b).mul_(s)  # s · dY B, [M, r]
        if need_x:
            grad_x = _QK.nf4_matmul(
                dy, packed, absmax, code, nested_absmax, nested_code, ctx.offset, ctx.blocksize, ctx.n, ctx.k, True
            )
            if mask is None:
                grad_x.addmm_(g, a)
            else:
                grad_x.add_((g @ a).mul_(mask).mul_(1.0 / (1.0 - p)))
        if need_a:
            xd = x if mask is None else x * mask * (1.0 / (1.0 - p))
            grad_a = (g.t() @ xd).to(lora_a.dtype)
        if need_b:
            grad_b = (dy.t() @ xa).mul_(s).to(lora_b.dtype)
        if need_bias:
            grad_bias = dy.sum(0).to(ctx.bias_dtype)
        return (grad_x, grad_a, grad_b, grad_bias) + (None,) * 11


class QLoraMLPFunction(torch.autograd.Function):
    """The Llama-style MLP with all three projections QLoRA layers, as one Function:
    ``y = down(silu(gate(x)) * up(x))`` where ``proj(z) = z deq(W)^T + s (z A^T) B^T``; gradients for x and
    the six adapter matrices (no dropout, no bias: the module falls back to the unfused layers otherwise).

    Saved for backward: x, g = gate(x) and u = up(x) (the [M, I] activations, kept once each) and the
    rank-r intermediates ``x A_g^T``, ``x A_u^T``, ``h A_d^T``. Not saved: h = silu(g) * u (recomputed by
    the SwiGLU backward kernel, which returns it with dg and du), and no dequantized weight. Unfused,
    autograd keeps g, silu(g), u and h: about twice the activation memory of the MLP.

    Backward: ``dh = dY deq(W_d) + s_d (dY B_d) A_d``; ``(dg, du, h) = swiglu_backward(dh, g, u)``;
    ``dX = dg deq(W_g) + du deq(W_u) + s_g (dg B_g) A_g + s_u (du B_u) A_u``; each adapter's gradients as
    in :class:`LoraLinearFunction`.
    """

    @staticmethod
    def forward(ctx, x, a_g, b_g, a_u, b_u, a_d, b_d, spec):
        (wg, sg), (wu, su), (wd, sd), (inter, hidden) = spec
        dt = x.dtype
        ag, bg, au, bu, ad, bd = (t.to(dt) for t in (a_g, b_g, a_u, b_u, a_d, b_d))
        xag = x @ ag.t()
        g = _QK.nf4_matmul(x, *wg, inter, hidden, False)
        g.addmm_(xag, bg.t(), alpha=sg)
        xau = x @ au.t()
        u = _QK.nf4_matmul(x, *wu, inter, hidden, False)
        u.addmm_(xau, bu.t(), alpha=su)
        h = _QK.swiglu(g, u)
        had = h @ ad.t()
        y = _QK.nf4_matmul(h, *wd, hidden, inter, False)
        y.addmm_(had, bd.t(), alpha=sd)
        ctx.save_for_backward(x, g, u, xag, xau, had, a_g, b_g, a_u, b_u, a_d, b_d)
        ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx, dy):
        with _autocast_off(dy.device.type):
            return QLoraMLPFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, g, u, xag, xau, had, a_g, b_g, a_u, b_u, a_d, b_d = ctx.saved_tensors
        (wg, sg), (wu, su), (wd, sd), (inter, hidden) = ctx.spec
        dy = dy.contiguous()
        dt = dy.dtype
        ag, bg, au, bu, ad, bd = (t.to(dt) for t in (a_g, b_g, a_u, b_u, a_d, b_d))
        gd = (dy @ bd).mul_(sd)  # [M, r]
        dh = _QK.nf4_matmul(dy, *wd, hidden, inter, True)
        dh.addmm_(gd, ad)
        dg, du, h = _QK.swiglu_backward(dh, g, u)
        grad_ad = (gd.t() @ h).to(a_d.dtype)
        grad_bd = (dy.t() @ had).mul_(sd).to(b_d.dtype)
        del dh, h
        gg = (dg @ bg).mul_(sg)
        gu = (du @ bu).mul_(su)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _QK.nf4_matmul(dg, *wg, inter, hidden, True)
            grad_x.add_(_QK.nf4_matmul(du, *wu, inter, hidden, True))
            grad_x.addmm_(gg, ag).addmm_(gu, au)
        grad_ag = (gg.t() @ x).to(a_g.dtype)
        grad_bg = (dg.t() @ xag).mul_(sg).to(b_g.dtype)
        grad_au = (gu.t() @ x).to(a_u.dtype)
        grad_bu = (du.t() @ xau).mul_(su).to(b_u.dtype)
        return grad_x, grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd, None


def qlora_mlp(x: Tensor, gate: tuple, up: tuple, down: tuple) -> Tensor:
    """``down(silu(gate(x)) * up(x))`` with the three projections QLoRA layers, one fused Function
    (:class:`QLoraMLPFunction`). Each projection is ``(weight, n, k, lora_A, lora_B, scale)`` with
    ``weight`` the op arguments of its NF4 weight (:meth:`NF4Weight.tensors`); gate and up are
    ``[I, H]``, down ``[H, I]``. x: ``[..., H]``; the result has x's leading dims and the compute dtype.
    """
    (wg, ig, hg, ag, bg, sg), (wu, iu, hu, au, bu, su), (wd, hd, id_, ad, bd, sd) = gate, up, down
    if not (ig == iu == id_ and hg == hu == hd):
        raise ValueError(f"gate and up must be [I, H] and down [H, I]; got gate [{ig}, {hg}], up [{iu}, {hu}], "
                         f"down [{hd}, {id_}]")
    _check_x(x, hg)
    lead = x.shape[:-1]
    dtype = compute_dtype(x)
    spec = ((tuple(wg), float(sg)), (tuple(wu), float(su)), (tuple(wd), float(sd)), (ig, hg))
    with _autocast_off(x.device.type):
        y = QLoraMLPFunction.apply(x.reshape(-1, hg).to(dtype), ag, bg, au, bu, ad, bd, spec)
    return y.view(*lead, hd)


def _check_x(x: Tensor, k: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., {k}] (in_features of the weight); got {list(x.shape)}")


def _check_qw(qw: NF4Weight) -> tuple[int, int]:
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight; got {type(qw).__name__}")
    if len(qw.shape) != 2:
        raise ValueError(f"qw must hold a 2-D weight [out_features, in_features]; got shape {list(qw.shape)}")
    n, k = qw.shape
    return n, k


def _check_bias(bias: Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor) or bias.dtype not in _FLOAT_DTYPES:
        got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(f"bias must be a float32, float16 or bfloat16 tensor; got {got}")
    if bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}]; got {list(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias must be on the weight's device {device}; got {bias.device}")


def nf4_linear(x: Tensor, qw: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """``x @ deq(W)^T + bias`` with any leading batch dims; gradients flow to x and bias.

    x: float32/float16/bfloat16 ``[..., in_features]``; the result has the compute dtype
    (:func:`compute_dtype`: x's dtype, or the autocast dtype inside an autocast region). A bias of
    another dtype is cast to it (differentiably).
    """
    n, k = _check_qw(qw)
    _check_x(x, k)
    _check_bias(bias, n, qw.device)
    return _nf4_linear(x, qw.tensors(), n, k, bias)


def _nf4_linear(x: Tensor, weight: tuple, n: int, k: int, bias: Tensor | None) -> Tensor:
    """:func:`nf4_linear` without the argument checks, on the op arguments of the weight (for modules)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    dtype = compute_dtype(x)
    if not _needs_autograd(x, bias) and not _autocast_on(x.device.type):
        # Inference (torch.inference_mode / no_grad, or nothing that wants a gradient): the op itself, no
        # autograd node, no autocast switch; the same kernel as through the Function below.
        y = _matmul_no_grad(x2.to(dtype), weight, n, k).view(*lead, n)
        return y if bias is None else y + bias.to(dtype)
    with _autocast_off(x.device.type):
        y = NF4LinearFunction.apply(x2.to(dtype), *weight, n, k)
        y = y.view(*lead, n)
        if bias is not None:
            y = y + bias.to(dtype)
    return y


def _needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a gradient can flow to any of ``tensors`` from here (grad mode on and one of them requires it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lora_linear(
    x: Tensor,
    qw: NF4Weight,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """The QLoRA layer: ``x @ deq(W)^T + bias + scale * dropout(x) @ lora_A^T @ lora_B^T``, one fused
    forward and backward (see :class:`LoraLinearFunction`).

    Args:
        x: float32/float16/bfloat16 ``[..., in_features]``; the result has x's leading dims and the compute
            dtype (:func:`compute_dtype`: x's dtype, or the autocast dtype inside an autocast region).
        qw: the frozen base weight, shape ``[out_features, in_features]``.
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]``; one floating dtype for both (it may
            differ from x's: the LoRA product runs in x's dtype, the gradients come back in theirs).
        scale: the LoRA scaling ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        bias: optional ``[out_features]``; cast to x's dtype.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1). The mask is drawn here
            (as :func:`dropout_mask` does) whenever ``dropout_p > 0``: pass 0.0 in eval mode. It is
            kept for the backward, and drawn again identically under activation checkpointing
            (which restores the RNG state).

    Raises:
        TypeError / ValueError naming the argument, the expected and the actual value.
    """
    n, k = _check_qw(qw)
    _check_x(x, k)
    _check_lora(lora_A, lora_B, n, k, qw.device)
    _check_bias(bias, n, qw.device)
    scale = _check_scale(scale)
    dropout_p = _check_dropout(dropout_p)
    return _lora_linear(x, qw.tensors(), n, k, lora_A, lora_B, scale, bias, dropout_p)


def _lora_linear(
    x: Tensor,
    weight: tuple,
    n: int,
    k: int,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    dropout_p: float,
) -> Tensor:
    """:func:`lora_linear` without the argument checks, on the op arguments of the weight (for modules)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    dtype = compute_dtype(x)
    if not _needs_autograd(x, lora_a, lora_b, bias) and not _autocast_on(x.device.type):
        return _lora_decode(x2.to(dtype), lora_a, lora_b, bias, scale, dropout_p, weight, n, k).view(*lead, n)
    with _autocast_off(x.device.type):
        y = LoraLinearFunction.apply(x2.to(dtype), lora_a, lora_b, bias, scale, dropout_p, *weight, n, k)
    return y.view(*lead, n)


def _lora_decode(x, lora_a, lora_b, bias, scale, dropout_p, weight, n, k) -> Tensor:
    """The forward with nothing to differentiate (decode under ``torch.inference_mode``): no autograd node, no
    saved tensors. The LoRA term is two skinny products in the adapters' dtype, as PEFT computes it (x cast to
    ``lora_A``'s dtype), added into the NF4 op's output with one rounding: on a CPU, fp32 adapters measured ~2x
    faster there than bf16 copies of them, and they are exact. (Training computes it in x's dtype, see
    :class:`LoraLinearFunction`; the two differ by x's rounding of the rank-r term.)"""
    if dropout_p > 0.0:  # a training-mode layer under no_grad: the masked forward, as with autograd
        return _lora_forward(x, lora_a, lora_b, bias, scale, dropout_p, weight, n, k)[0]
    y = _matmul_no_grad(x, weight, n, k)
    y.add_((x.to(lora_a.dtype) @ lora_a.t()) @ lora_b.t(), alpha=scale)
    if bias is not None:
        y.add_(bias.to(y.dtype))
    return y


def _check_lora(lora_a: Tensor, lora_b: Tensor, n: int, k: int, device: torch.device) -> None:
    for name, t in (("lora_A", lora_a), ("lora_B", lora_b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on the weight's device {device}; got {t.device}")
    if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_a.shape[0] < 1:
        raise ValueError(f"lora_A must be [r, {k}] (r >= 1, in_features of the weight); got {list(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_B must be [{n}, {r}] (out_features, r of lora_A); got {list(lora_b.shape)}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_B must have lora_A's dtype {lora_a.dtype}; got {lora_b.dtype}")


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number (lora_alpha / r); got {type(scale).__name__}")
    return float(scale)


def _check_dropout(p: float, name: str = "dropout_p") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {p!r}")
    return float(p)
