"""Bad input raises ValueError/TypeError naming the argument, the expected and the actual value."""

from __future__ import annotations

import json

import pytest
import torch

import qlora_kernels as qk


@pytest.mark.parametrize(
    "w, exc, match",
    [
        (torch.ones(4, 4, dtype=torch.int32), TypeError, "w must be float32, float16 or bfloat16; got torch.int32"),
        (torch.ones(4, 4, dtype=torch.float64), TypeError, "w must be float32, float16 or bfloat16; got torch.float64"),
        (torch.empty(0, 4), ValueError, r"w must not be empty; got shape \[0, 4\]"),
        (torch.tensor([1.0, float("nan"), 2.0]), ValueError, "w must be finite; got 1 NaN/inf"),
        (torch.tensor([1.0, float("inf")]), ValueError, "w must be finite"),
        ([1.0, 2.0], TypeError, "w must be a torch.Tensor; got list"),
    ],
)
def test_quantize_rejects(w, exc, match):
    with pytest.raises(exc, match=match):
        qk.quantize_nf4(w)


def test_quantize_rejects_blocksize_and_flag():
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64, .*\); got 48"):
        qk.quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="double_quant must be a bool; got 1"):
        qk.quantize_nf4(torch.randn(64), double_quant=1)


def test_dequantize_rejects():
    with pytest.raises(TypeError, match="qw must be an NF4Weight; got Tensor"):
        qk.dequantize_nf4(torch.randn(3))
    qw = qk.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16; got torch.int8"):
        qk.dequantize_nf4(qw, torch.int8)


@pytest.fixture
def sd():
    return qk.quantize_nf4(torch.randn(16, 64), 64, True).to_bnb_state_dict("layer.weight")


def _with_json(sd, **changes):
    key = "layer.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(sd[key].tolist()))
    state.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del state[k]
    sd = dict(sd)
    sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return sd


def test_state_dict_missing_keys(sd):
    for key in ["layer.weight", "layer.weight.absmax", "layer.weight.quant_map", "layer.weight.nested_absmax"]:
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(ValueError, match=f"state dict lacks '{key}'"):
            qk.NF4Weight.from_bnb_state_dict(broken, "layer.weight")
    with pytest.raises(ValueError, match="has no 'other.weight.quant_state.bitsandbytes__nf4'"):
        qk.NF4Weight.from_bnb_state_dict(sd, "other.weight")


def test_state_dict_corrupt_json(sd):
    bad = dict(sd)
    bad["layer.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        qk.NF4Weight.from_bnb_state_dict(bad, "layer.weight")
    with pytest.raises(ValueError, match="quant_type must be 'nf4'; got 'fp4'"):
        qk.NF4Weight.from_bnb_state_dict(_with_json(sd, quant_type="fp4"), "layer.weight")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        qk.NF4Weight.from_bnb_state_dict(_with_json(sd, blocksize=48), "layer.weight")
    with pytest.raises(ValueError, match="dtype must be one of"):
        qk.NF4Weight.from_bnb_state_dict(_with_json(sd, dtype="int8"), "layer.weight")
    with pytest.raises(ValueError, match="lacks 'shape'"):
        qk.NF4Weight.from_bnb_state_dict(_with_json(sd, shape=None), "layer.weight")
    with pytest.raises(ValueError, match="nested_blocksize must be 256; got 128"):
        qk.NF4Weight.from_bnb_state_dict(_with_json(sd, nested_blocksize=128), "layer.weight")


def test_state_dict_wrong_shapes(sd):
    with pytest.raises(ValueError, match=r"packed must be uint8 with \(numel \+ 1\) // 2 = 1024 elements; got .* 512"):
        qk.NF4Weight.from_bnb_state_dict(_with_json(sd, shape=[32, 64]), "layer.weight")
    bad = dict(sd)
    bad["layer.weight.absmax"] = sd["layer.weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax must be torch.uint8 with ceil"):
        qk.NF4Weight.from_bnb_state_dict(bad, "layer.weight")
    bad = dict(sd)
    bad["layer.weight.quant_map"] = torch.zeros(15)
    with pytest.raises(ValueError, match="quant_map\\) must be float32 with 16 elements"):
        qk.NF4Weight.from_bnb_state_dict(bad, "layer.weight")


def test_packed_in_another_storage_dtype_is_read_as_bytes(sd):
    # bnb_4bit_quant_storage=torch.bfloat16 stores the same bytes as a bf16 tensor [nbytes / 2, 1].
    other = dict(sd)
    other["layer.weight"] = sd["layer.weight"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    a = qk.NF4Weight.from_bnb_state_dict(sd, "layer.weight")
    b = qk.NF4Weight.from_bnb_state_dict(other, "layer.weight")
    assert torch.equal(a.packed, b.packed) and torch.equal(qk.dequantize_nf4(a), qk.dequantize_nf4(b))


def test_fp4_is_refused(sd):
    bad = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="FP4-quantized; only NF4"):
        qk.NF4Weight.from_bnb_state_dict(bad, "layer.weight")
