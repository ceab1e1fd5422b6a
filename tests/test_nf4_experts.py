"""NF4Experts: a transformers 5 fused-experts module in NF4 computes what the module computes with its
weights' NF4 round trip, trains LoRA per expert, and keeps bitsandbytes' keys in its state dict."""

from __future__ import annotations

import copy

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.nn.experts import NF4Experts

from . import bounds

transformers = pytest.importorskip("transformers")


def _mixtral_experts(e=4, h=32, i=48):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e, num_experts_per_tok=2)
    torch.manual_seed(0)
    m = MixtralExperts(cfg)
    with torch.no_grad():
        m.gate_up_proj.normal_(0, 0.1)
        m.down_proj.normal_(0, 0.1)
    return m


def _routing(t, e, k, device="cpu"):
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(device)
    w = torch.softmax(torch.randn(t, k), -1).to(device)
    return idx, w


def _round_trip_into(dense, ours, with_lora=False):
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            w = ours.dense(name, torch.float32) if with_lora else qk.dequantize_nf4(ours.qweight(name))
            getattr(dense, name).copy_(w)


class _SiluBound(torch.nn.Module):
    def forward(self, t):
        return 1.1 * t  # on |g|: |silu(g)| <= |g| and |silu'(g)| <= 1.1


def _assert_experts_match(name, got, dense, x, idx, w):
    """Experts' output against transformers' module on the same (round-tripped) weights: the magnitudes from the
    same module on |values| with SiLU bounded by 1.1 |g|; the chain: gate_up (hidden), the product, down
    (intermediate), the top-k sum."""
    twin = copy.deepcopy(dense).double()
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
        twin.act_fn = _SiluBound()
        mag = twin(x.detach().abs().double(), idx, w.detach().abs().double()).cpu()
        want = dense(x, idx, w)
    n = twin.gate_up_proj.shape[-1] + twin.down_proj.shape[-1] + idx.shape[-1]
    bounds.assert_within(name, got, want, *bounds.chained(mag, want, n, torch.float32, roundings=0))


def test_forward_equals_the_transformers_module_on_the_dequantized_weights(device):
    dense = _mixtral_experts().to(device)
    ours = NF4Experts.from_experts(dense)
    _round_trip_into(dense, ours)  # the reference: the same module with its weights' NF4 round trip
    x = torch.randn(9, 32, device=device)
    idx, w = _routing(9, 4, 2, device)
    idx[0, 1] = 4  # a dropped slot (index == num_experts), as transformers' routers may emit
    _assert_experts_match("experts", ours(x, idx, w), dense, x, idx, w)


def test_lora_trains_per_expert_and_matches_the_dense_delta(device):
    dense = _mixtral_experts().to(device)
    ours = NF4Experts.from_experts(dense)
    ours.add_lora(r=4, lora_alpha=8)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            ours.lora_B[name].normal_(0, 0.05)
    _round_trip_into(dense, ours, with_lora=True)
    x = torch.randn(7, 32, device=device, requires_grad=True)
    idx, w = _routing(7, 4, 2, device)
    idx[:, :] = idx % 3  # expert 3 is never chosen
    y = ours(x, idx, w)
    _assert_experts_match("experts with LoRA", y, dense, x, idx, w)
    y.square().sum().backward()
    for name in ("gate_up_proj", "down_proj"):
        g = ours.lora_A[name].grad
        assert g is not None and float(g[:3].abs().sum()) > 0
        assert float(g[3].abs().sum()) == 0.0  # an expert no token chose gets no gradient
    assert x.grad is not None
    ours.disable_adapters = True
    _round_trip_into(dense, ours)
    _assert_experts_match("adapters disabled", ours(x, idx, w), dense, x, idx, w)


def test_state_dict_uses_bitsandbytes_keys_and_round_trips():
    ours = NF4Experts.from_experts(_mixtral_experts())
    sd = ours.state_dict()
    assert "gate_up_proj" in sd and "gate_up_proj.quant_state.bitsandbytes__nf4" in sd and "down_proj.absmax" in sd
    other = NF4Experts.from_experts(_mixtral_experts())
    with torch.no_grad():
        other.gate_up_proj_packed.zero_()
    other.load_state_dict(sd)
    assert torch.equal(other.gate_up_proj_packed, ours.gate_up_proj_packed)
    half = ours.to(torch.bfloat16)  # a dtype cast never touches the NF4 tensors
    assert half.gate_up_proj_absmax.dtype == torch.uint8 and half.gate_up_proj_code.dtype == torch.float32
