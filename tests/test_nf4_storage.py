"""The NF4 tensors as frozen parameters (qlora_kernels.nn.nf4_storage, what FSDP2 needs to shard them): NF4Linear,
QLoraLinear and NF4Experts behave the same in both modes (forward, backward, .to(), state dicts in bitsandbytes'
keys, qweight, merging, adapters), and buffers stay the default."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.nn import NF4Linear, QLoraLinear
from qlora_kernels.nn.experts import NF4Experts
from qlora_kernels.nn.nf4_storage import hold_nf4_as_parameters, nf4_tensors, resident_nf4_bytes

NF4_NAMES = {"nf4_packed", "nf4_absmax", "nf4_code", "nf4_nested_absmax", "nf4_nested_code"}


def _qlora(seed=0, double_quant=True):
    torch.manual_seed(seed)
    layer = QLoraLinear.from_linear(nn.Linear(128, 64), r=4, lora_alpha=8, double_quant=double_quant)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("double_quant", [True, False])
def test_buffers_are_the_default_and_parameters_are_switched_on_the_instance(double_quant):
    layer = _qlora(double_quant=double_quant)
    assert not layer.nf4_as_parameters
    before = {n: getattr(layer, n) for n in NF4_NAMES}
    present = {n for n in NF4_NAMES if before[n] is not None}
    assert len(present) == (5 if double_quant else 3) and present <= {n for n, _ in layer.named_buffers()}
    other = _qlora(seed=1, double_quant=double_quant)
    assert hold_nf4_as_parameters(layer) == 1
    assert layer.nf4_as_parameters and not other.nf4_as_parameters  # the instance, not the class
    params = dict(layer.named_parameters())
    assert present <= set(params) and not present & {n for n, _ in layer.named_buffers()}
    for n in present:  # the same storage, frozen
        assert params[n].data_ptr() == before[n].data_ptr() and not params[n].requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    hold_nf4_as_parameters(layer, False)
    assert not layer.nf4_as_parameters and present <= {n for n, _ in layer.named_buffers()}
    assert not present & set(dict(layer.named_parameters()))
    assert all(type(getattr(layer, n)) is torch.Tensor for n in present)


def test_forward_backward_state_dict_qweight_and_merge_are_the_same_in_both_modes():
    buf = _qlora()
    par = copy.deepcopy(buf)
    hold_nf4_as_parameters(par)
    x = torch.randn(3, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = buf(x), par(x2)
    assert torch.equal(y, y2)
    y.square().sum().backward()
    y2.square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(buf.lora_A.weight.grad, par.lora_A.weight.grad)
    sd, sd2 = buf.state_dict(), par.state_dict()
    assert sd.keys() == sd2.keys() and not NF4_NAMES & set(sd2)  # bitsandbytes' keys only
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(buf.qweight.dequantize(), par.qweight.dequantize())
    assert torch.equal(buf.to_linear().weight, par.to_linear().weight)
    par.merge()
    assert torch.equal(par(x2), y2)


def test_a_state_dict_loads_across_modes_and_the_mode_stays():
    src = _qlora(seed=3)
    dst = _qlora(seed=4)
    hold_nf4_as_parameters(dst)
    missing, unexpected = dst.load_state_dict(src.state_dict())
    assert not missing and not unexpected and dst.nf4_as_parameters
    assert {n for n in NF4_NAMES} <= set(dict(dst.named_parameters()))
    x = torch.randn(2, 128)
    assert torch.equal(dst(x), src(x))
    back = _qlora(seed=5)
    back.load_state_dict(dst.state_dict())  # and from parameter mode into the default
    assert torch.equal(back(x), src(x)) and not back.nf4_as_parameters


def test_to_moves_but_never_casts_the_nf4_tensors_as_parameters():
    layer = _qlora()
    hold_nf4_as_parameters(layer)
    packed = layer.nf4_packed
    layer.to(torch.float16)
    assert layer.nf4_packed is packed  # same device: the very parameter object stays (FSDP2 keeps references)
    assert layer.nf4_code.dtype == torch.float32 and layer.nf4_packed.dtype == torch.uint8
    assert layer.compute_dtype == torch.float16 and layer.lora_A.weight.dtype == torch.float16
    meta = copy.deepcopy(layer).to("meta")
    assert meta.nf4_packed.is_meta and isinstance(meta.nf4_packed, nn.Parameter)
    empty = meta.to_empty(device="cpu")
    assert empty.nf4_packed.device.type == "cpu" and empty.nf4_packed.dtype == torch.uint8
    assert empty.nf4_as_parameters


def test_a_model_in_parameter_mode_saves_and_loads_its_adapter_and_merges(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    qk.apply_qlora(model, r=4, lora_alpha=8, target_modules=["0", "2"])
    for m in model.modules():
        if isinstance(m, QLoraLinear):
            nn.init.normal_(m.lora_B.weight, 0, 0.1)
    x = torch.randn(2, 64)
    want = model(x)
    assert hold_nf4_as_parameters(model) == 2
    assert torch.equal(model(x), want)
    qk.save_adapter(model, tmp_path)
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, QLoraLinear):
            nn.init.zeros_(m.lora_B.weight)
    qk.load_adapter(other, tmp_path)
    assert torch.equal(other(x), want)
    merged = qk.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)


def test_nf4_experts_in_parameter_mode():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    dense = MixtralExperts(MixtralConfig(hidden_size=64, intermediate_size=64, num_local_experts=4,
                                         num_experts_per_tok=2))
    with torch.no_grad():
        dense.gate_up_proj.normal_(0, 0.1)
        dense.down_proj.normal_(0, 0.1)
    buf = NF4Experts.from_experts(dense)
    buf.add_lora(4, 8)
    par = copy.deepcopy(buf)
    hold_nf4_as_parameters(par)
    names = set(dict(par.named_parameters()))
    assert {"gate_up_proj_packed", "down_proj_absmax", "gate_up_proj_code"} <= names
    x = torch.randn(5, 64)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])
    w = torch.softmax(torch.randn(5, 2), -1)
    assert torch.equal(buf(x, idx, w), par(x, idx, w))
    sd, sd2 = buf.state_dict(), par.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    par.to(torch.bfloat16)
    assert par.gate_up_proj_code.dtype == torch.float32 and torch.equal(par.dense("down_proj"), buf.dense("down_proj"))
    fresh = NF4Experts.from_experts(dense)
    hold_nf4_as_parameters(fresh)
    fresh.load_state_dict(buf.state_dict(), strict=False)
    assert torch.equal(fresh.qweight("gate_up_proj").packed, buf.qweight("gate_up_proj").packed)


def test_resident_bytes_count_every_nf4_tensor_once():
    layer = _qlora()
    want = layer.qweight.nbytes
    assert resident_nf4_bytes(layer) == want
    hold_nf4_as_parameters(layer)
    assert resident_nf4_bytes(nn.Sequential(layer)) == want and len(nf4_tensors(layer)) == 5
