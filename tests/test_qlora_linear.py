"""QLoraLinear: against bitsandbytes Linear4bit + PEFT LoRA, state dicts in bitsandbytes' keys, merge, compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import qlora_kernels as qk
from qlora_kernels.nn import NF4Linear, QLoraLinear, nf4_weight_from_bnb

from . import bounds

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BNB_KEYS = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4"}


def _linear(k=128, n=64, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def _randomize_b(layer: QLoraLinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle for these tests; not installed here")


def _bnb_layer(linear: nn.Linear, compress_statistics=True):
    bnb = _bnb()
    dtype = linear.weight.dtype
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, compress_statistics=compress_statistics, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on this move


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_from_linear_quantizes_and_initialises_like_peft(device):
    lin = _linear().to(device)
    layer = QLoraLinear.from_linear(lin, r=8, lora_alpha=16)
    qw = qk.quantize_nf4(lin.weight.detach())
    assert torch.equal(layer.nf4_packed, qw.packed) and torch.equal(layer.nf4_absmax, qw.absmax)
    assert layer.scaling == 2.0 and layer.lora_A.weight.shape == (8, 128) and layer.lora_B.weight.shape == (64, 8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on fan_in 128
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(3, 5, 128, device=device)
    torch.testing.assert_close(layer(x), qk.nf4_linear(x, qw, lin.bias), atol=0, rtol=0)  # B = 0: the base layer
    assert QLoraLinear.from_linear(lin, r=4, lora_alpha=8, use_rslora=True).scaling == 4.0


def test_extra_repr_and_qweight():
    layer = QLoraLinear.from_linear(_linear(), r=4, lora_alpha=8, lora_dropout=0.1)
    text = repr(layer)
    for part in ("in_features=128", "out_features=64", "bias=True", "blocksize=64", "double_quant=True", "r=4",
                 "lora_alpha=8", "scaling=2", "lora_dropout=0.1", "merged=False"):
        assert part in text, (part, text)
    assert layer.qweight.shape == (64, 128) and layer.weight.dtype == torch.uint8


# -- against bitsandbytes Linear4bit + PEFT --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compress_statistics", [True, False])
def test_matches_bnb_linear4bit_with_peft_lora(dtype, compress_statistics):
    """Same NF4 bytes (taken from the bitsandbytes layer), same adapters: same output and gradients.

    The oracle is the real stack, bitsandbytes ``Linear4bit`` wrapped by PEFT's ``lora.Linear4bit``; both run on
    the CPU. Train mode, so bitsandbytes keeps its standard layout (see test_from_bnb_cpu_inference_layout).
    """
    peft = pytest.importorskip("peft")
    lin = _linear(k=128, n=64, dtype=dtype)  # in_features >= blocksize: bitsandbytes' CPU dequantize needs it
    bnb_layer = _bnb_layer(lin, compress_statistics)
    ours = QLoraLinear.from_bnb(bnb_layer, r=8, lora_alpha=16)
    _randomize_b(ours)

    class Wrap(nn.Module):
        is_loaded_in_4bit = True  # what transformers sets; it makes PEFT pick its bitsandbytes LoRA layer

        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    ref = peft.get_peft_model(Wrap(bnb_layer), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    ref_layer = ref.base_model.model.proj
    assert type(ref_layer).__name__ == "Linear4bit" and type(ref_layer.base_layer).__module__.startswith("bitsandbytes")
    with torch.no_grad():
        ref_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        ref_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    ref.train()
    ours.train()

    torch.manual_seed(3)
    x = torch.randn(2, 9, 128, dtype=dtype)
    dy = torch.randn(2, 9, 64, dtype=dtype)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1 = ours(x1)
    y2 = ref(x2)
    y1.backward(dy)
    y2.backward(dy)
    bounds.assert_lora_matches(qk.dequantize_nf4(ours.qweight, torch.float32), ours.scaling,
                               (x, ours.lora_A.weight, ours.lora_B.weight, ours.bias), dy,
                               (y1, x1.grad, ours.lora_A.weight.grad, ours.lora_B.weight.grad),
                               (y2, x2.grad, ref_layer.lora_A["default"].weight.grad,
                                ref_layer.lora_B["default"].weight.grad), dtype)


def test_from_bnb_shares_bytes_and_dequantizes_like_bnb():
    bnb = _bnb()
    lin = _linear(k=256, n=96)
    bnb_layer = _bnb_layer(lin)
    ours = QLoraLinear.from_bnb(bnb_layer)
    assert ours.nf4_packed.data_ptr() == bnb_layer.weight.data.data_ptr()  # no copy, no requantizing
    want = bnb.functional.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state)
    torch.testing.assert_close(qk.dequantize_nf4(ours.qweight), want, atol=0, rtol=0)
    torch.testing.assert_close(ours.bias, lin.bias, atol=0, rtol=0)


def test_from_bnb_cpu_inference_layout():
    """After an eval-mode, no-grad CPU forward bitsandbytes repacks the weight (32-row tiles, bf16 absmax, no
    double quant); from_bnb reads that layout: same codes, absmax rounded to bf16, the output bnb now computes."""
    _bnb()
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks for CPU inference only on CPUs with AVX512-BF16; this one has none")
    lin = _linear(k=128, n=64)
    bnb_layer = _bnb_layer(lin)
    before = nf4_weight_from_bnb(bnb_layer)
    before = qk.NF4Weight(before.packed.clone(), before.absmax.clone(), before.shape, before.dtype, before.blocksize,
                          before.code, before.nested_absmax, before.nested_code, before.offset)
    bnb_layer.eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        y_bnb = bnb_layer(x)
    assert bnb_layer.weight.quant_state.packing_format_for_cpu
    after = nf4_weight_from_bnb(bnb_layer)
    assert torch.equal(after.packed, before.packed)
    assert not after.double_quant and after.absmax.dtype == torch.float32
    # every weight is code * absmax: rounding absmax to bf16 moves each by at most 2^-9 relative
    torch.testing.assert_close(qk.dequantize_nf4(after), qk.dequantize_nf4(before), atol=0, rtol=2 ** -8)
    ours = QLoraLinear.from_bnb(bnb_layer)
    torch.testing.assert_close(ours(x), y_bnb, atol=2e-2, rtol=2e-2)  # bnb's CPU kernel computes in bf16


def test_from_bnb_rejects_fp4_and_others():
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(128, 64, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match=r"quant_type must be 'nf4'; got 'fp4'"):
        QLoraLinear.from_bnb(layer)
    with pytest.raises(TypeError, match=r"must be a bitsandbytes Linear4bit; got Linear"):
        QLoraLinear.from_bnb(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"use from_bnb"):
        QLoraLinear.from_linear(_bnb_layer(_linear()))


# -- state dict ------------------------------------------------------------------------------


def test_state_dict_uses_bnb_and_peft_keys_and_round_trips():
    bnb = _bnb()
    lin = _linear()
    bnb_layer = _bnb_layer(lin)
    ours = QLoraLinear.from_bnb(bnb_layer, r=4)
    _randomize_b(ours)
    sd = ours.state_dict()
    assert set(sd) == BNB_KEYS | {"bias", "lora_A.weight", "lora_B.weight"}
    bnb_sd = bnb_layer.state_dict()
    assert set(bnb_sd) == BNB_KEYS | {"bias"}
    for key, t in bnb_sd.items():
        assert sd[key].dtype == t.dtype and torch.equal(sd[key], t), key

    # into a fresh layer (other weight, other adapters): identical outputs
    fresh = QLoraLinear.from_linear(_linear(seed=5), r=4)
    fresh.load_state_dict(sd)
    x = torch.randn(6, 128)
    torch.testing.assert_close(fresh(x), ours(x), atol=0, rtol=0)

    # bitsandbytes reads our bytes back
    qs = bnb.functional.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items()
                                              if k.startswith("weight.")}, device="cpu")
    torch.testing.assert_close(bnb.functional.dequantize_4bit(sd["weight"], qs), qk.dequantize_nf4(ours.qweight),
                               atol=0, rtol=0)


def test_load_state_dict_errors_and_missing_keys():
    ours = QLoraLinear.from_linear(_linear(), r=4)
    other = QLoraLinear.from_linear(_linear(k=64, n=64), r=4)
    with pytest.raises(RuntimeError, match=r"shape must be \[64, 128\].*got \[64, 64\]"):
        ours.load_state_dict({k: v for k, v in other.state_dict().items() if not k.startswith("lora_")}, strict=False)
    sd = ours.state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(RuntimeError, match=r"quant_state.bitsandbytes__nf4"):
        ours.load_state_dict(sd)
    result = ours.load_state_dict({"lora_A.weight": ours.lora_A.weight.detach()}, strict=False)
    assert "weight" in result.missing_keys and "lora_B.weight" in result.missing_keys
    assert result.unexpected_keys == []


@pytest.mark.parametrize("device", DEVICES)
def test_to_moves_nf4_but_never_casts_it(device):
    lin = _linear()
    layer = QLoraLinear.from_linear(lin, r=4).to(device)
    _randomize_b(layer)
    x = torch.randn(5, 128, device=device)
    want = layer(x)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.nf4_code.dtype == torch.float32 and half.nf4_nested_code.dtype == torch.float32
    assert half.lora_A.weight.dtype == torch.bfloat16 and half.bias.dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), want, atol=5e-2, rtol=5e-2)
    assert all(b.device.type == device for b in layer.buffers())
    back = copy.deepcopy(layer).to("meta").to_empty(device="cpu")
    assert back.nf4_packed.device.type == "cpu" and back.nf4_packed.shape == layer.nf4_packed.shape


# -- merge, to_linear, compile, checkpointing ------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_merge_unmerge_and_to_linear(device):
    layer = QLoraLinear.from_linear(_linear().to(device), r=8, lora_alpha=32, lora_dropout=0.2)
    _randomize_b(layer)
    layer.eval()
    x = torch.randn(4, 7, 128, device=device)
    y = layer(x)
    layer.merge()
    layer.train()  # merged: no dropout, no adapter gradients, same output
    x1 = x.clone().requires_grad_(True)
    ym = layer(x1)
    torch.testing.assert_close(ym, y, atol=0, rtol=0)
    ym.sum().backward()
    assert x1.grad is not None and layer.lora_A.weight.grad is None and layer.lora_B.weight.grad is None
    layer.unmerge()
    layer.eval()
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None

    dense = layer.to_linear()
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32 and dense.weight.device.type == device
    torch.testing.assert_close(dense(x), y, atol=1e-5, rtol=1e-5)
    want = qk.dequantize_nf4(layer.qweight) + 4.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(dense.weight, want.detach(), atol=1e-6, rtol=1e-6)

    layer.disable_adapters = True
    torch.testing.assert_close(layer(x), NF4Linear(layer.qweight, layer.bias)(x), atol=0, rtol=0)


def test_nf4_linear_module():
    lin = _linear()
    base = NF4Linear.from_linear(lin)
    x = torch.randn(3, 128)
    torch.testing.assert_close(base(x), qk.nf4_linear(x, qk.quantize_nf4(lin.weight.detach()), lin.bias))
    assert set(base.state_dict()) == BNB_KEYS | {"bias"}
    layer = QLoraLinear.from_nf4(base, r=2)
    assert layer.nf4_packed is base.nf4_packed and layer.bias is base.bias
    torch.testing.assert_close(layer.to_linear()(x), base(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_no_graph_breaks(device):
    from torch._dynamo.utils import counters

    layer = QLoraLinear.from_linear(_linear().to(device), r=8)
    _randomize_b(layer)
    x = torch.randn(2, 5, 128, device=device)
    x_eager = x.clone().requires_grad_(True)
    layer(x_eager).square().sum().backward()
    want = (x_eager.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    layer.zero_grad()

    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(layer, fullgraph=True, backend=backend)  # raises on a graph break
        x_c = x.clone().requires_grad_(True)
        compiled(x_c).square().sum().backward()
        assert not counters["graph_break"], dict(counters["graph_break"])
        for got, ref in zip((x_c.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad), want):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        layer.zero_grad()
    # dropout (training) and eval both trace without breaks as well
    torch._dynamo.reset()
    layer.lora_dropout = 0.1
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x.clone().requires_grad_(True)).sum().backward()
    layer.eval()
    with torch.no_grad():
        compiled(x)


def test_gradient_checkpointing_with_dropout():
    layer = QLoraLinear.from_linear(_linear(), r=8, lora_dropout=0.3)
    _randomize_b(layer)
    x = torch.randn(16, 128)

    def grads(use_checkpoint):
        layer.zero_grad()
        torch.manual_seed(11)
        x1 = x.clone().requires_grad_(True)
        y = checkpoint(layer, x1, use_reentrant=False) if use_checkpoint else layer(x1)
        y.tanh().sum().backward()
        return x1.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()

    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# -- bad input -------------------------------------------------------------------------------


def test_bad_arguments():
    lin = _linear()
    for r in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"r must be a positive integer; got"):
            QLoraLinear.from_linear(lin, r=r)
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\); got 1.0"):
        QLoraLinear.from_linear(lin, lora_dropout=1.0)
    with pytest.raises(TypeError, match=r"lora_dtype must be float32, float16 or bfloat16; got torch.int8"):
        QLoraLinear.from_linear(lin, lora_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"linear must be a torch.nn.Linear; got Conv1d"):
        QLoraLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match=r"blocksize must be one of"):
        QLoraLinear.from_linear(lin, blocksize=48)
    layer = QLoraLinear.from_linear(lin)
    with pytest.raises(TypeError, match=r"x must be a float32, float16 or bfloat16 tensor; got torch.int64"):
        layer(torch.ones(2, 128, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 128\] \(in_features\); got \[2, 64\]"):
        layer(torch.ones(2, 64))
