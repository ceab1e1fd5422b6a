"""The tolerance helper itself: its bounds hold where they claim to, and a failure explains itself."""

from __future__ import annotations

import math

import pytest
import torch

from . import bounds


def test_a_perturbed_tensor_fails_with_name_magnitudes_where_and_bound():
    want = torch.linspace(-1, 1, 12).reshape(3, 4)
    got = want.clone()
    got[2, 1] += 3e-3
    bounds.assert_within("layer.lora_B", got[:2], want[:2], 0)  # the rows left alone pass, exactly
    with pytest.raises(AssertionError) as e:
        bounds.assert_within("layer.lora_B", got, want, 1e-5, why="2 gamma_K |x||w|")
    msg = str(e.value)
    assert msg.startswith("layer.lora_B: 1 of 12 elements beyond the bound")
    assert "max abs diff 0.003" in msg and "at [2, 1]" in msg and "bound 1e-05" in msg
    assert f"want {float(want[2, 1]):.3g}" in msg and "max rel diff" in msg and "2 gamma_K |x||w|" in msg


def test_nan_is_never_within_and_matching_infinities_are():
    bounds.assert_within("inf", torch.tensor([math.inf, -math.inf, 1.0]), torch.tensor([math.inf, -math.inf, 1.0]), 0)
    with pytest.raises(AssertionError, match="1 of 2 elements"):
        bounds.assert_within("nan", torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.0]), 1.0)
    with pytest.raises(AssertionError, match="shapes differ"):
        bounds.assert_within("shape", torch.zeros(2), torch.zeros(3), 1.0)


def test_unit_roundoff_and_gamma():
    assert bounds.unit_roundoff(torch.float32) == torch.finfo(torch.float32).eps / 2
    assert bounds.unit_roundoff(torch.bfloat16) == torch.finfo(torch.bfloat16).eps / 2
    assert bounds.gamma(1000) == pytest.approx(1000 * 2**-24, rel=1e-4)
    with pytest.raises(ValueError, match="n u >= 1"):
        bounds.gamma(300, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        bounds.unit_roundoff(torch.int8)


@pytest.mark.parametrize("k", [7, 64, 4096])
def test_the_matmul_bound_holds_for_orders_and_output_dtypes(k):
    x, w = torch.randn(5, k), torch.randn(9, k) * torch.rand(9, 1)
    exact = x.double() @ w.double().T
    y_mm = x @ w.T
    y_seq = torch.zeros(5, 9)  # a strictly sequential order, the other extreme from a blocked GEMM
    for i in range(0, k, max(1, k // 64)):
        y_seq += x[:, i:i + max(1, k // 64)] @ w[:, i:i + max(1, k // 64)].T
    bounds.assert_within("mm vs exact", y_mm, exact, bounds.matmul(x, w, paths=1))
    bounds.assert_within("mm vs sequential", y_mm, y_seq, bounds.matmul(x, w))
    y_bf16 = (x.bfloat16().float() @ w.bfloat16().float().T).bfloat16()
    bounds.assert_within("bf16 inputs and output vs fp32", y_bf16, y_mm,
                         bounds.matmul(x, w, inputs=torch.bfloat16, out=torch.bfloat16, ref=y_mm))
    with pytest.raises(AssertionError):  # and it is tight enough to see one wrong weight
        w2 = w.clone()
        w2[3, 0] += 0.5
        bounds.assert_within("one weight off", x @ w2.T, y_mm, bounds.matmul(x, w))


def test_adam_step_limit_is_reached_but_never_exceeded():
    betas = (0.9, 0.999)
    assert bounds.adam_step_limit(1, betas) == pytest.approx(1.0)
    for t in (1, 2, 5, 20):
        c = bounds.adam_step_limit(t, betas)
        # the extremal gradients of Cauchy-Schwarz: g_i proportional to (b1 / b2)^(t-i)
        g = torch.tensor([(betas[0] / betas[1]) ** (t - i) for i in range(1, t + 1)], dtype=torch.float64)
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([p], lr=1.0, betas=betas, eps=0.0)
        for gi in g:
            before = p.detach().clone()
            p.grad = gi.reshape(1)
            opt.step()
        assert float((before - p.detach()).abs()) == pytest.approx(c, rel=1e-9)
        for _ in range(20):  # any other gradients stay below
            p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([p], lr=1.0, betas=betas, eps=0.0)
            for gi in torch.randn(t, dtype=torch.float64):
                before = p.detach().clone()
                p.grad = gi.reshape(1)
                opt.step()
            assert float((before - p.detach()).abs()) <= c * (1 + 1e-12)


def test_two_adamw_trajectories_with_perturbed_gradients_stay_within_the_trajectory_bound():
    rho, lrs = 1e-4, [1e-2, 1e-2, 5e-3, 5e-3, 1e-3]
    p0 = torch.randn(1000, dtype=torch.float64)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    oa = torch.optim.AdamW([a], lr=lrs[0], weight_decay=0.01)
    ob = torch.optim.AdamW([b], lr=lrs[0], weight_decay=0.01)
    for lr in lrs:
        g = torch.randn(1000, dtype=torch.float64)
        for opt, p, grad in ((oa, a, g), (ob, b, g * (1 + rho * (2 * torch.rand(1000, dtype=torch.float64) - 1)))):
            opt.param_groups[0]["lr"] = lr
            p.grad = grad
            opt.step()
    bound = bounds.adam_trajectory(lrs, rho, weight=float(p0.abs().max()) + sum(lrs), weight_decay=0.01)
    bounds.assert_within("adamw", a.detach(), b.detach(), bound)
    assert float((a - b).detach().abs().max()) > bound / 100  # a bound, not a blanket
