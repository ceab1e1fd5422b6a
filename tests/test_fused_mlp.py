"""The fused QLoRA MLP equals the three QLoRA layers it replaces (output and every gradient), keeps
their parameter names, saves less for backward, and falls back where the fusion does not apply; the
SwiGLU ops against their reference (the Triton kernels under the interpreter: test_triton_interpret.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.nn.fused_mlp import FusedQLoraMLP
from qlora_kernels.nn.qlora_linear import QLoraLinear
from qlora_kernels.reference import swiglu as ref_swiglu

from . import bounds

OPS = torch.ops.qlora_kernels
transformers = pytest.importorskip("transformers")


def _llama_mlp(device, h=64, i=96, r=4):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=h, intermediate_size=i)).to(device)
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = QLoraLinear.from_linear(getattr(mlp, name), r=r, lora_alpha=8)
        nn.init.normal_(layer.lora_B.weight, std=0.1)
        setattr(mlp, name, layer)
    return mlp


def _grads(mlp):
    return [p.grad.clone() for _, p in sorted(mlp.named_parameters()) if p.requires_grad and p.grad is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_the_three_layers(dtype, device):
    mlp = _llama_mlp(device)
    fused = FusedQLoraMLP.from_mlp(mlp)
    assert fused is not None and fused.fusable()
    assert sorted(n for n, _ in fused.named_parameters()) == sorted(n for n, _ in mlp.named_parameters())
    for p in mlp.parameters():
        p.requires_grad_(False)
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    x = torch.randn(2, 5, 64, device=device, dtype=dtype)
    outs = []
    for module in (mlp, fused):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.float().square().sum().backward()
        outs.append((y.detach(), xi.grad, _grads(mlp)))
        mlp.zero_grad(set_to_none=True)
    (y0, gx0, g0), (y1, gx1, g1) = outs
    assert y1.dtype == dtype and len(g0) == len(g1) == 6
    # The magnitudes: the MLP on |values| with SiLU bounded by 1.1 |g| (|silu(g)| <= |g|, |silu'| <= 1.1), fed
    # |2 y| (the loss y^2); the chain: gate/up (K + r), the product, down (I + r), the backward's sums over the
    # tokens; up to 12 roundings to the low dtype (inputs, weights, 5 intermediates, their gradients).
    layers = [getattr(mlp, name) for name in ("down_proj", "gate_proj", "up_proj")]  # sorted parameter order
    weights = [t for layer in layers for t in (qk.dequantize_nf4(layer.qweight, torch.float32), layer.lora_A.weight,
                                               layer.lora_B.weight)]

    def twin(x, wd, ad, bd, wg, ag, bg, wu, au, bu):
        def lin(v, w, a, b, layer):
            return bounds.lora_formula(layer.scaling)(v, w, a, b)
        return lin(1.1 * lin(x, wg, ag, bg, layers[1]) * lin(x, wu, au, bu, layers[2]), wd, ad, bd, layers[0])

    mag_y, mags = bounds.abs_twin(twin, [x, *weights], 2 * y0.float())
    n = x.numel() // x.shape[-1] + 64 + 96 + 2 * 4
    grad_mags = [m for i, m in enumerate(mags[1:]) if i % 3]  # lora_A, lora_B of each layer (not W)
    for name, got, want, mag in [("y", y1, y0, mag_y), ("x.grad", gx1, gx0, mags[0])] + [
            (f"lora grad {i}", a, b, m) for i, (a, b, m) in enumerate(zip(g1, g0, grad_mags))]:
        bound, why = bounds.chained(mag, want, n, dtype, roundings=12)
        bounds.assert_within(name, got, want, bound, why=why)


def test_fused_saves_less_for_backward():
    mlp = _llama_mlp("cpu", h=64, i=256)
    fused = FusedQLoraMLP.from_mlp(mlp)

    def saved_bytes(module):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size() if not isinstance(t, nn.Parameter) else 0)
            return t

        x = torch.randn(32, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x).sum().backward()
        return sum(total)

    unfused, ours = saved_bytes(mlp), saved_bytes(fused)
    assert ours < 0.7 * unfused, (ours, unfused)


def test_fallback_where_the_fusion_does_not_apply():
    mlp = _llama_mlp("cpu")
    fused = FusedQLoraMLP.from_mlp(mlp)
    x = torch.randn(3, 64)
    mlp.up_proj.disable_adapters = True
    assert not fused.fusable()
    torch.testing.assert_close(fused(x), mlp(x))
    mlp.up_proj.disable_adapters = False
    mlp.gate_proj.lora_dropout = 0.1
    fused.train()
    assert not fused.fusable()
    fused.eval()
    assert fused.fusable()
    with pytest.raises(TypeError, match="gate_proj must be a QLoraLinear"):
        FusedQLoraMLP(nn.Linear(64, 96), mlp.up_proj, mlp.down_proj)


def test_swiglu_ops_match_the_reference(device):
    g, u, dh = (torch.randn(7, 33, device=device) for _ in range(3))
    torch.testing.assert_close(OPS.swiglu(g, u), ref_swiglu.swiglu(g, u))
    gr, ur = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    (nn.functional.silu(gr) * ur).backward(dh)
    dg, du, h = OPS.swiglu_backward(dh, g, u)
    torch.testing.assert_close(dg, gr.grad)
    torch.testing.assert_close(du, ur.grad)
    torch.testing.assert_close(h, nn.functional.silu(g) * u)
    torch.library.opcheck(OPS.swiglu.default, (g, u))
    torch.library.opcheck(OPS.swiglu_backward.default, (dh, g, u))


def test_fuse_on_a_model_instance_keeps_names_and_outputs():
    from transformers import LlamaConfig, LlamaForCausalLM

    import qlora_kernels as qk
    from qlora_kernels.nn.fused_mlp import fuse_qlora_mlps, unfuse_qlora_mlps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    qk.apply_qlora(model, r=4)
    for layer in model.model.layers:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            nn.init.normal_(getattr(layer.mlp, proj).lora_B.weight, std=0.1)
    keys = list(model.state_dict())
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    assert fuse_qlora_mlps(model) == 2
    assert type(model.model.layers[0].mlp).__name__ == "FusedQLoraMLP" and list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    assert unfuse_qlora_mlps(model) == 2 and type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
