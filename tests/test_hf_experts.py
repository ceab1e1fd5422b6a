"""Mixture-of-experts models: apply_qlora stores the fused experts in NF4 (NF4Experts, the router stays
dense), trains LoRA on them (target_parameters), and the expert LoRA round-trips through PEFT's
target_parameters files (PEFT on the dense model computes what ours computes on its NF4 round trip);
load_4bit_model quantizes the experts of a float checkpoint too; merge_and_unload gives the dense model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.nn.experts import NF4Experts

from . import bounds
from .hf_tiny import VOCAB, tiny_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _mixtral(seed=0):
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(tiny_config("mixtral")).eval()


def _randomize_lora(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qk.QLoraLinear):
                nn.init.normal_(m.lora_B.weight, std=0.1)
            elif isinstance(m, NF4Experts):
                for p in m.lora_B.values():
                    p.normal_(0, 0.1)


def _round_trip_dense(dense, ours):
    """``dense`` with every weight ours stores in NF4 replaced by its NF4 round trip (the rest is shared)."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, qk.QLoraLinear):
                ref.get_submodule(name).weight.copy_(qk.dequantize_nf4(m.qweight, torch.float32))
            elif isinstance(m, NF4Experts):
                for proj in ("gate_up_proj", "down_proj"):
                    getattr(ref.get_submodule(name), proj).copy_(qk.dequantize_nf4(m.qweight(proj), torch.float32))
    return ref


def test_experts_in_nf4_with_lora_train_and_round_trip_through_peft(tmp_path):
    dense = _mixtral()
    ours = qk.apply_qlora(copy.deepcopy(dense), r=4, lora_alpha=8, target_parameters=TARGETS)
    experts = [m for m in ours.modules() if isinstance(m, NF4Experts)]
    assert len(experts) == 2 and all(tuple(m.lora_A) == ("gate_up_proj", "down_proj") for m in experts)
    assert type(ours.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"  # the router stays dense
    ref = _round_trip_dense(dense, ours)  # before training: the base weights' NF4 round trip
    # a few steps: the experts' adapters get gradients and the loss falls
    ids = torch.randint(0, VOCAB, (2, 12))
    params = [p for p in ours.parameters() if p.requires_grad]
    assert any(p is m.lora_A["gate_up_proj"] for m in experts for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ours.train()
    losses = []
    for _ in range(4):
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    ours.eval()
    _randomize_lora(ours)  # make sure every factor matters in the comparison
    qk.save_adapter(ours, tmp_path / "adapter")
    cfg = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert "target_parameters" in cfg and "experts.gate_up_proj" in cfg
    with torch.no_grad():
        want = ours(ids).logits
    bounds.assert_logits_within("ours vs PEFT", want, peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval(),
                                ids)
    # and back into ours, from a plain dense model (load_adapter quantizes and adapts what the file names)
    again = qk.load_adapter(copy.deepcopy(dense), tmp_path / "adapter")
    bounds.assert_logits_within("reloaded", want, again, ids)
    # merge: the dense Mixtral with deq(W) + s B A per expert
    merged = qk.merge_and_unload(ours)
    assert not any(isinstance(m, NF4Experts) for m in merged.modules())
    assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    bounds.assert_logits_within("merged", want, merged, ids)


def test_experts_quantized_frozen_by_default_and_errors_name_the_argument():
    model = qk.apply_qlora(_mixtral(), r=4)
    experts = [m for m in model.modules() if isinstance(m, NF4Experts)]
    assert len(experts) == 2 and all(m.r == 0 for m in experts)
    assert not any(p.requires_grad for m in experts for p in m.parameters())
    with pytest.raises(ValueError, match="target_parameters=.* matched no experts parameter"):
        qk.apply_qlora(_mixtral(), r=4, target_parameters=["mlp.experts.nothing"])
    with pytest.raises(ValueError, match="target_parameters needs quantize_experts=True"):
        qk.apply_qlora(_mixtral(), r=4, target_parameters=TARGETS, quantize_experts=False)
    dense = qk.apply_qlora(_mixtral(), r=4, quantize_experts=False)
    assert not any(isinstance(m, NF4Experts) for m in dense.modules())


def test_adapters_disabled_turns_the_experts_lora_off_too():
    model = qk.apply_qlora(_mixtral(), r=4, target_parameters=TARGETS)
    _randomize_lora(model)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        on = model(ids).logits
        with qk.hf.adapters_disabled(model):
            off = model(ids).logits
        for m in model.modules():
            if isinstance(m, (qk.QLoraLinear, NF4Experts)):
                for p in ([m.lora_B.weight] if isinstance(m, qk.QLoraLinear) else m.lora_B.values()):
                    p.zero_()
    assert not torch.allclose(on, off)
    bounds.assert_logits_within("adapters off vs B = 0", off, model, ids)


# -- the experts through transformers' from_pretrained (QLoraKernelsConfig), and 4-bit checkpoints' dense experts ----


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_from_pretrained_quantizes_the_experts_as_load_4bit_model_does(tmp_path):
    """QLoraKernelsConfig puts NF4Experts in place of the fused experts (router dense) with load_4bit_model's bytes, the
    model shrinks by the experts' 4-bit share, apply_qlora's target_parameters LoRA trains on them, and
    save_pretrained of load_4bit_model's model (experts in NF4) writes a checkpoint both load back as stored."""
    from transformers import AutoModelForCausalLM

    from qlora_kernels.hf import QLoraKernelsConfig, bnb_free_config

    from .hf_tiny import ids, write_tiny

    write_tiny(tmp_path / "fp32", "mixtral")

    def load(path, **cfg):
        extra = {"config": bnb_free_config(path)} if (path / "config.json").read_text().count("bitsandbytes") else {}
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=QLoraKernelsConfig(**cfg),
                                                    dtype=torch.float32, **extra).eval()

    ours = qk.load_4bit_model(tmp_path / "fp32", dtype=torch.float32)
    theirs = load(tmp_path / "fp32")
    dense_experts = load(tmp_path / "fp32", quantize_experts=False)
    layer = theirs.model.layers[0].mlp
    assert isinstance(layer.experts, NF4Experts) and type(layer.gate).__module__.startswith("transformers")
    assert not isinstance(dense_experts.model.layers[0].mlp.experts, NF4Experts)
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(input_ids=x).logits, atol=0, rtol=0)
    # the experts hold 4 * 3 * 64 * 128 fp32 weights a layer: 384 KiB dense, 4.5 bits a weight in NF4 (~53 KiB)
    experts = 2 * 4 * 3 * 64 * 128
    saved = _model_bytes(dense_experts) - _model_bytes(theirs)
    assert _model_bytes(ours) == _model_bytes(theirs)
    assert experts * (4 - 0.5 - 0.1) < saved < experts * (4 - 0.5), saved
    qk.apply_qlora(theirs, r=4, target_parameters=TARGETS)
    theirs.train()(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for m in theirs.modules() if isinstance(m, NF4Experts) for p in m.lora_A.values())

    ours.save_pretrained(tmp_path / "nf4")  # (transformers' per-expert split cannot run on NF4 codes: fused, as held)
    assert qk.load_4bit_model(tmp_path / "nf4", dtype=torch.float32).state_dict().keys() == a.keys()
    again = load(tmp_path / "nf4")
    assert isinstance(again.model.layers[0].mlp.experts, NF4Experts)
    c = again.state_dict()
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a)
    kept = load(tmp_path / "nf4", quantize_experts=False)  # stored in NF4: kept as stored, NF4 still
    assert isinstance(kept.model.layers[0].mlp.experts, NF4Experts)


def test_a_4bit_checkpoints_dense_experts_are_quantized_with_a_warning_or_kept_as_stored(tmp_path):
    """bitsandbytes leaves the experts dense; loading its checkpoint quantizes them (both loaders) with a
    QuantizedExpertsWarning, and quantize_experts=False keeps them dense: then the logits are bitsandbytes' (within the
    derived bound), which the quantized ones are not."""
    import warnings

    from transformers import AutoModelForCausalLM

    from qlora_kernels.hf import QLoraKernelsConfig, bnb_free_config
    from qlora_kernels.hf.loading import QuantizedExpertsWarning

    from .hf_tiny import bnb_model, ids, write_bnb_checkpoint, write_tiny

    pytest.importorskip("bitsandbytes")
    write_tiny(tmp_path / "fp32", "mixtral")
    path = write_bnb_checkpoint(tmp_path / "fp32", tmp_path / "bnb")

    def hf(**cfg):
        return AutoModelForCausalLM.from_pretrained(path, config=bnb_free_config(path), dtype=torch.float32,
                                                    quantization_config=QLoraKernelsConfig(**cfg)).eval()

    x = ids()
    ref = bnb_model(path)
    for load in (lambda **kw: qk.load_4bit_model(path, dtype=torch.float32, **kw), hf):
        pattern = r"experts of 2 mixture-of-experts layer\(s\) dense \(e.g. model.layers.0.mlp.experts; .*quantize_"
        with pytest.warns(QuantizedExpertsWarning, match=pattern + r"experts=False\) keeps"):
            quantized = load()
        assert isinstance(quantized.model.layers[0].mlp.experts, NF4Experts)
        with warnings.catch_warnings():
            warnings.simplefilter("error", QuantizedExpertsWarning)
            kept = load(quantize_experts=False)
        assert not isinstance(kept.model.layers[0].mlp.experts, NF4Experts)
        with torch.no_grad():
            want = kept(input_ids=x).logits
            got, bound, why = bounds.logits_bound(ref, x)
            bounds.assert_within("bitsandbytes vs ours, experts kept dense", got, want, bound, why=why)
            assert ((quantized(input_ids=x).logits - got).abs() > bound).any()  # quantized: other numbers
