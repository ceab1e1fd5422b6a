"""Tolerances derived from the arithmetic, and one assertion that explains a failure.

Two computations of the same quantity that round differently (ranks vs one process, packed vs unpacked,
fused vs unfused, a kernel vs its reference, accumulated vs whole batch) are compared against a bound
built here from what the arithmetic does: the reduction length, the unit roundoff of each dtype, the
magnitudes involved, and for trained weights the steps and learning rates. A tolerance tuned to one
machine's rounding is not one of them: the CPU model, its vector width (``ATEN_CPU_CAPABILITY``) and the
thread count change the summation order, and the bounds hold for every order.

The model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 2-3):

- ``u`` is the unit roundoff of a dtype: 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16), 2^-53 (fp64).
  Rounding a value v to it errs by at most ``u |v|``.
- A sum or dot product of ``n`` terms, in any order, with or without fused multiply-adds, errs by at most
  ``gamma_n * sum |terms|``, ``gamma_n = n u / (1 - n u)`` (Higham, (3.5)). Two such evaluations differ by at
  most twice that. This is rigorous for one reduction.
- A network is a chain of reductions. Along a chain of ``depth`` reductions of length at most ``n``, the
  relative rounding error of the result is taken as ``depth * 2 gamma_n`` (:func:`network`): the first-order
  forward error when no layer amplifies a relative perturbation of its input. The test models are a few
  layers of a randomly initialised Llama with adapters near their initial value, for which that holds; it is
  an assumption, and each test that uses it says so.
- AdamW moves an element by at most ``lr_t c_t`` in step t, ``c_t`` from :func:`adam_step_limit` (by
  Cauchy-Schwarz on the moment sums; 1 at the first step). Two trajectories from the same start, whose
  gradients differ by a relative ``rho`` in each element, differ after the steps by at most
  ``sum_t lr_t c_t min(2, 2 rho)`` (:func:`adam_trajectory`): the first moment by ``rho`` of its bound, the
  second moment's root by ``rho`` of itself, and never more than two full steps apart.

:func:`assert_within` compares and, on failure, names the tensor, gives the largest absolute and relative
difference, where it is, the two values and the bound there, how many elements are beyond it, and why
the bound is what it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-8}


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u`` of a floating dtype: half the distance from 1 to the next representable number."""
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"dtype: expected one of {sorted(map(str, UNIT_ROUNDOFF))}, got {dtype}")
    return UNIT_ROUNDOFF[dtype]


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """``gamma_n = n u / (1 - n u)``: the relative error bound of an n-term sum or dot product (any order)."""
    nu = max(int(n), 1) * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"n: a reduction of {n} terms in {dtype} has no error bound (n u >= 1)")
    return nu / (1 - nu)


def abs_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``|x| @ |w|^T`` in fp64 (x ``[..., K]``, w ``[N, K]``): the sum of |terms| of every output element."""
    k = x.shape[-1]
    mag = x.detach().reshape(-1, k).abs().double().cpu() @ w.detach().abs().double().cpu().T
    return mag.reshape(*x.shape[:-1], w.shape[0])


def matmul(x: torch.Tensor, w: torch.Tensor, *, acc: torch.dtype = torch.float32, inputs: torch.dtype | None = None,
           out: torch.dtype | None = None, ref: torch.Tensor | None = None, paths: int = 2) -> torch.Tensor:
    """Elementwise bound on the difference of ``paths`` evaluations of ``x @ w^T`` (x ``[..., K]``, w ``[N, K]``).

    ``acc``: the dtype the products are summed in (each evaluation within ``gamma_K`` of the exact sum).
    ``inputs``: one evaluation first rounds x and w to this dtype (``2 u`` per product, since both factors
    round). ``out``: the evaluations round their result to this dtype (``u |y|`` each, with ``ref`` the
    value, or the magnitude bound when no ``ref`` is given).
    """
    mag = abs_matmul(x, w)
    bound = paths * gamma(x.shape[-1], acc) * mag
    if inputs is not None:
        bound = bound + 2 * unit_roundoff(inputs) * mag
    if out is not None:
        y = mag if ref is None else ref.detach().abs().double().cpu().reshape(mag.shape)
        bound = bound + paths * unit_roundoff(out) * (y + bound)
    return bound


def reduction(abs_sum: float | torch.Tensor, n: int, dtype: torch.dtype = torch.float32,
              paths: int = 2) -> float | torch.Tensor:
    """Bound on the difference of ``paths`` evaluations of an n-term sum whose |terms| add up to ``abs_sum``."""
    return paths * gamma(n, dtype) * abs_sum


def network(depth: int, n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative rounding bound of a result at the end of ``depth`` chained reductions of length <= ``n``,
    evaluated twice in different orders (first order; see the module docstring for the assumption)."""
    return depth * 2 * gamma(n, dtype)


def llama_depth(num_layers: int, backward: bool = False) -> int:
    """The reductions on one path through a Llama decoder: per layer q/k/v projection, QK^T, attention x V,
    o_proj, gate/up projection, down_proj (6), then the output projection and the loss's sum (2); the
    backward pass the same again."""
    fwd = 6 * num_layers + 2
    return 2 * fwd if backward else fwd


def adam_step_limit(step: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """``c_t``: the largest ``|m_hat_t| / sqrt(v_hat_t)`` AdamW can reach at step t (1-based), any gradients.

    ``m_t = (1-b1) sum_i b1^(t-i) g_i``, ``v_t = (1-b2) sum_i b2^(t-i) g_i^2``; by Cauchy-Schwarz
    ``|m_t| <= (1-b1)/sqrt(1-b2) sqrt(v_t) sqrt(sum_j (b1^2/b2)^j)``, and the bias corrections divide by
    ``1-b1^t`` and ``sqrt(1-b2^t)``.
    """
    b1, b2 = betas
    if step < 1:
        raise ValueError(f"step: expected >= 1, got {step}")
    r = b1 * b1 / b2
    geo = sum(r**j for j in range(step))
    return (1 - b1) * math.sqrt(1 - b2**step) / ((1 - b1**step) * math.sqrt(1 - b2)) * math.sqrt(geo)


def adam_trajectory(lrs: Iterable[float], rho: float, betas: tuple[float, float] = (0.9, 0.999),
                    weight: float = 0.0, weight_decay: float = 0.0) -> float:
    """Elementwise bound on the distance of two AdamW trajectories from the same start whose gradients differ
    by a relative ``rho``: ``sum_t lr_t (c_t min(2, 2 rho) + weight_decay * weight * 2 rho)``.

    ``lrs``: the learning rate of each step taken; ``weight``: the largest |element| (for decoupled weight
    decay, which moves both trajectories alike up to their difference)."""
    total = 0.0
    for t, lr in enumerate(lrs, start=1):
        total += lr * (adam_step_limit(t, betas) * min(2.0, 2 * rho) + weight_decay * weight * 2 * rho)
    return total


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def assert_within(name: str, got: torch.Tensor | float, want: torch.Tensor | float,
                  bound: torch.Tensor | float, why: str = "") -> None:
    """Assert ``|got - want| <= bound`` elementwise (bound broadcast to the shape), NaN never within.

    The failure message names the tensor, gives the largest absolute and relative difference, the index of
    the worst element (the largest ratio of difference to bound) with both values and the bound there, the
    number of elements beyond their bound, and ``why`` (how the bound was derived)."""
    g = torch.as_tensor(got).detach().double().cpu()
    w = torch.as_tensor(want).detach().double().cpu()
    if g.shape != w.shape:
        raise AssertionError(f"{name}: shapes differ: got {tuple(g.shape)}, want {tuple(w.shape)}")
    b = torch.as_tensor(bound).detach().double().cpu().expand(g.shape)
    diff = (g - w).abs()
    same_inf = torch.isinf(g) & (g == w)
    diff = torch.where(same_inf, torch.zeros_like(diff), diff)
    bad = ~(diff <= b)  # NaN compares False: a NaN is never within
    if not bool(bad.any()):
        return
    ratio = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff / b.clamp_min(1e-300))
    flat = int(torch.argmax(torch.where(bad, ratio, torch.full_like(ratio, -1.0)).reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), g.shape)) if g.dim() else ()
    rel = diff / w.abs().clamp_min(1e-300)
    finite = diff[~torch.isnan(diff)]
    max_abs = float(finite.max()) if finite.numel() else math.nan
    max_rel = float(rel[~torch.isnan(rel)].max()) if finite.numel() else math.nan
    where = f"at {list(idx)}" if idx else "(a scalar)"
    msg = (f"{name}: {int(bad.sum())} of {g.numel()} elements beyond the bound; max abs diff {_fmt(max_abs)}, "
           f"max rel diff {_fmt(max_rel)}; worst {where}: got {_fmt(float(g.reshape(-1)[flat]))}, want "
           f"{_fmt(float(w.reshape(-1)[flat]))}, diff {_fmt(float(diff.reshape(-1)[flat]))}, bound "
           f"{_fmt(float(b.reshape(-1)[flat]))}")
    if why:
        msg += f"\n  bound: {why}"
    raise AssertionError(msg)


# --------------------------------------------------------------------------- training runs compared


def training_rounding(num_layers: int, reduce_len: int) -> tuple[float, float]:
    """``(rho_forward, rho_gradient)``: the relative rounding bounds of a loss and of the gradients of a
    ``num_layers`` Llama whose longest reduction (hidden width, or the tokens of a batch the gradients sum
    over) has ``reduce_len`` terms, for two runs that sum in different orders (:func:`network`)."""
    return (network(llama_depth(num_layers), reduce_len),
            network(llama_depth(num_layers, backward=True), reduce_len))


def trained_weights(lrs: Iterable[float], num_layers: int, reduce_len: int, betas: tuple[float, float] = (0.9, 0.999),
                    weight_decay: float = 0.0, weight: float = 0.0) -> tuple[float, str]:
    """The bound on trained weights of two runs (:func:`adam_trajectory` with the gradients' ``rho``) and
    the sentence that says how it was derived."""
    lrs = list(lrs)
    rho = training_rounding(num_layers, reduce_len)[1]
    b = adam_trajectory(lrs, rho, betas, weight, weight_decay)
    return b, (f"AdamW trajectories: sum over {len(lrs)} steps of lr_t c_t min(2, 2 rho) = {_fmt(b)}, gradients' "
               f"rho = {llama_depth(num_layers, True)} chained reductions x 2 gamma_{reduce_len}(fp32) = {_fmt(rho)}")


def loss_after_training(scale: float, num_layers: int, reduce_len: int, grad_norm: float, numel: int,
                        weight_bound: float) -> tuple[float, str]:
    """Bound on a loss evaluated on the trained weights of two runs: its own rounding (``rho_forward |loss|``)
    plus, to first order, the weights' difference: ``|dL| <= ||grad||_1 max|d theta| <= sqrt(numel) ||grad||_2
    weight_bound``, with the gradient norm of the last training step standing in for the loss's own."""
    rho = training_rounding(num_layers, reduce_len)[0]
    b = rho * abs(scale) + math.sqrt(numel) * grad_norm * weight_bound
    return b, (f"rho_forward x {_fmt(scale)} + sqrt({numel}) x grad norm {_fmt(grad_norm)} x weight bound "
               f"{_fmt(weight_bound)} = {_fmt(b)}")


def assert_same_training(got: list[dict], want: list[dict], got_weights: dict[str, torch.Tensor],
                         want_weights: dict[str, torch.Tensor], num_layers: int, reduce_len: int,
                         betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                         loss_scale: Callable[[dict], float] | None = None) -> float:
    """Two runs of the same training that round differently (ranks, packing, accumulation): every step's loss
    and gradient norm (records with ``loss``, ``grad_norm`` and ``lr``, as metrics.jsonl writes them) and the
    trained weights, each within its bound. ``loss_scale(record)``: the magnitude of the terms the loss is
    computed from (default ``|loss|``: a cross-entropy is a mean of positive terms; DPO's is beta times its
    log-probability sums). Returns the trained weights' bound."""
    got, want = [r for r in got if "loss" in r], [r for r in want if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want], "the two runs logged different steps"
    rho_f, rho_g = training_rounding(num_layers, reduce_len)
    lrs = [r["lr"] for r in want]
    for i, (x, y) in enumerate(zip(got, want)):
        # step 1 sees the same weights; later steps also the weights' difference so far (first order)
        w_bound = adam_trajectory(lrs[:i], rho_g, betas, weight_decay=weight_decay)
        numel = sum(v.numel() for v in want_weights.values())
        drift = math.sqrt(numel) * y["grad_norm"] * w_bound
        scale = abs(y["loss"]) if loss_scale is None else loss_scale(y)
        assert_within(f"step {y['step']} loss", x["loss"], y["loss"], rho_f * scale + drift,
                      why=f"rho_forward {_fmt(rho_f)} x loss scale {_fmt(scale)} + sqrt(numel) x grad norm x "
                          f"weight bound {_fmt(w_bound)}")
        assert_within(f"step {y['step']} grad_norm", x["grad_norm"], y["grad_norm"],
                      (rho_g + gamma(numel)) * y["grad_norm"] + drift / max(abs(y["loss"]), 1e-30) * y["grad_norm"],
                      why=f"(rho_gradient {_fmt(rho_g)} + gamma_numel) x norm, plus the loss's relative drift")
    bound, why = trained_weights(lrs, num_layers, reduce_len, betas, weight_decay,
                                 max((float(v.abs().max()) for v in want_weights.values()), default=0.0))
    assert got_weights.keys() == want_weights.keys(), "the two runs trained different tensors"
    for k in want_weights:
        assert_within(k, got_weights[k], want_weights[k], bound, why=why)
    return bound


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], num_layers: int,
                          reduce_len: int) -> None:
    """The gradients of one loss computed two ways (packed, checkpointed, offloaded, fused): each tensor within
    ``rho_gradient`` of its scale, its largest element (every element is a sum over the same tokens)."""
    assert got.keys() == want.keys(), f"different tensors: {sorted(set(got) ^ set(want))}"
    rho = training_rounding(num_layers, reduce_len)[1]
    for k in want:
        assert_within(k, got[k], want[k], rho * float(want[k].abs().max()),
                      why=f"rho_gradient {_fmt(rho)} ({llama_depth(num_layers, True)} chained reductions of "
                          f"<= {reduce_len}) x max|grad|")


# --------------------------------------------------------------------------- a kernel against its reference


def kernel_matmul(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Bound on a kernel's ``x @ w^T`` (w ``[N, K]``: the decoded weight, as the reduction runs) against the
    reference's, which sums in fp32 and rounds to x's dtype. Both accumulate in fp32 (``2 gamma_K``); in fp16 /
    bf16 the kernel may round the decoded weight to x's dtype first (``2 u`` per product, x is in it already),
    and both round the result to x's dtype (``u |y|`` each)."""
    low = x.dtype if x.dtype != torch.float32 else None
    b = matmul(x.float(), w.float(), inputs=low, out=x.dtype, ref=ref.float())
    return b, (f"2 gamma_{x.shape[-1]}(fp32) |x||w|" + (f" + 2 u({x.dtype}) |x||w| + 2 u({x.dtype}) |y|" if low
                                                            else " + 2 u(fp32) |y|"))


def abs_twin(fn: Callable[..., torch.Tensor], inputs: Iterable[torch.Tensor | None],
             grad_out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The magnitudes of a sum-of-products formula and of its gradients: ``fn`` evaluated in fp64 on ``|inputs|``
    with the backward fed ``|grad_out|``. For a formula of products and sums (a linear layer, LoRA, their
    backward) every output is then the sum of the |terms| its evaluation adds up, the scale ``gamma_n``
    multiplies. A nonlinearity enters as a linear bound of itself and its slope (SiLU: ``1.1 |g|``)."""
    leaves = [None if t is None else t.detach().abs().double().cpu().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    y.backward(grad_out.detach().abs().double().cpu())
    return y.detach(), [None if t is None else t.grad for t in leaves]


def chained(mag: torch.Tensor, ref: torch.Tensor, n: int, dtype: torch.dtype, roundings: int) -> tuple[torch.Tensor,
                                                                                                            str]:
    """Bound on two evaluations of a chain of reductions (total length ``n``, fp32 accumulation) with terms of
    magnitude ``mag`` (:func:`abs_twin`), where in a low-precision ``dtype`` each of ``roundings`` operands or
    intermediates on the path may be rounded to it once, and the results are: ``2 gamma_n mag + roundings u mag
    + 2 u |ref|``."""
    u = unit_roundoff(dtype) if dtype != torch.float32 else 0.0
    r = ref.detach().abs().double().cpu()
    b = 2 * gamma(n) * mag + roundings * u * mag + 2 * unit_roundoff(dtype) * r
    return b, f"2 gamma_{n}(fp32) |terms| + {roundings} u({dtype}) |terms| + 2 u |result|"


def lora_formula(scale: float) -> Callable[..., torch.Tensor]:
    """``y = x W^T + scale (x A^T) B^T (+ bias)``, for :func:`abs_twin`."""

    def formula(x, w, a, b, bias=None):
        y = x @ w.t() + scale * (x @ a.t()) @ b.t()
        return y if bias is None else y + bias

    return formula


def assert_lora_matches(w: torch.Tensor, scale: float, inputs: tuple, dy: torch.Tensor, got: tuple, want: tuple,
                        dtype: torch.dtype) -> None:
    """A LoRA layer's output and gradients ``(y, dx, dA, dB, dbias)`` (None: not compared) computed two ways, each
    within the bound of its chain (:func:`chained`): the magnitudes from the formula on |values|; the longest
    reduction the tokens plus K plus N plus r (dA sums over the tokens the products of dY B, itself a sum over N);
    x, W, A, B, dY and the two intermediates (x A^T, dY B) may each be rounded to the low dtype once."""
    x, a, b, bias = inputs
    n = x.numel() // x.shape[-1] + x.shape[-1] + w.shape[0] + a.shape[0]
    mag_y, mags = abs_twin(lora_formula(scale), [x, w, a, b, bias], dy)
    names = ("y", "x.grad", "lora_A.grad", "lora_B.grad", "bias.grad")
    for name, g, r, mag in zip(names, got, want, (mag_y, mags[0], mags[2], mags[3], mags[4])):
        if r is None or g is None:
            continue
        bound, why = chained(mag, r, n, dtype, roundings=7)
        assert_within(name, g, r, bound, why=why)


# --------------------------------------------------------------------------- whole models compared


def _head_weight(model: torch.nn.Module) -> torch.Tensor:
    head = model.get_output_embeddings()
    w = getattr(head, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.detach().float()
    qweight = getattr(head, "qweight", None) or getattr(getattr(head, "base_layer", None), "qweight", None)
    if qweight is not None:
        import qlora_kernels as qk

        return qk.dequantize_nf4(qweight, torch.float32)
    raise TypeError(f"no dense or NF4 weight on the output projection {type(head).__name__}")


def model_reduce_len(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """The longest reduction of a forward or backward of a transformers decoder on ``input_ids``: its widest layer
    (GPT-2's MLP is 4 x hidden without naming it), the sequence, or, for the weights' gradients, the tokens."""
    cfg = model.config
    widths = [getattr(cfg, k, 0) or 0 for k in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    return max(*widths, 4 * widths[0], input_ids.numel())


def logits_bound(model: torch.nn.Module, input_ids: torch.Tensor, **forward_kw) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         str]:
    """``(logits, bound, why)``: ``model``'s logits on ``input_ids`` and the bound on the difference from logits
    computed another way (our kernels, another loader, merged adapters, a checkpoint reloaded): two forwards of a
    ``num_hidden_layers`` decoder whose longest reduction is its widest layer (or the tokens), in fp32, on the
    scale of the last reduction's terms, ``|h| @ |W_out|^T`` (:func:`network`: first order, no layer amplifying a
    relative error)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True, **forward_kw)
    layers = model.config.num_hidden_layers
    n = model_reduce_len(model, input_ids)
    rho = network(llama_depth(layers), n)
    bound = rho * abs_matmul(out.hidden_states[-1].float(), _head_weight(model))
    return out.logits, bound, (f"rho_forward = {llama_depth(layers)} chained reductions x 2 gamma_{n}(fp32) = "
                               f"{_fmt(rho)}, x |h| @ |W_out|^T")


def assert_logits_within(name: str, got: torch.Tensor, model: torch.nn.Module, input_ids: torch.Tensor,
                         **forward_kw) -> None:
    """``got`` against ``model``'s logits on ``input_ids``, within :func:`logits_bound`."""
    want, bound, why = logits_bound(model, input_ids, **forward_kw)
    assert_within(name, got, want, bound, why=why)
