"""PEFT drives the NF4 layers: get_peft_model with qlora_kernels.hf.LoraConfig builds NF4LoraLinear (fused kernels).

Oracle: transformers' own bitsandbytes model of the same 4-bit checkpoint with PEFT's bitsandbytes LoRA layers, loading
the adapter directory ours wrote (and the reverse); PEFT's own behaviour for adapter names, disabling, merging.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlora_kernels as qk

from .hf_tiny import bnb_model, ids, lora_grads, randomize_lora_b, write_bnb_checkpoint, write_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from qlora_kernels.hf import LoraConfig, NF4LoraLinear, as_peft_model, register_peft_layers  # noqa: E402
from qlora_kernels.nn import NF4Linear  # noqa: E402

from . import bounds  # noqa: E402


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    """A bitsandbytes nf4 checkpoint written by transformers + bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("peft_backend")
    write_tiny(root / "fp32")
    return write_bnb_checkpoint(root / "fp32", root / "nf4")


def _ours(path):
    return qk.load_4bit_model(path, dtype=torch.float32)


def _lora(**over):
    return LoraConfig(**dict(dict(r=4, lora_alpha=8, target_modules="all-linear"), **over))


def test_get_peft_model_runs_fused_layers_and_reproduces_on_bnb_peft(nf4_dir, tmp_path, monkeypatch):
    """Every NF4 layer gets an NF4LoraLinear whose forward is the fused lora_linear; the adapter directory it saves
    reloads on transformers' bitsandbytes model with PEFT to the same logits and LoRA gradients (1e-5), and into ours
    (PeftModel.from_pretrained with our config, and qk.load_adapter) to bitwise-equal logits."""
    from qlora_kernels.hf import peft_backend

    model = peft.get_peft_model(_ours(nf4_dir), _lora())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4LoraLinear)}
    assert len(layers) == 14 and all(isinstance(m.base_layer, NF4Linear) for m in layers.values())
    assert type(model.base_model.model.lm_head) is nn.Linear  # the output embedding stays out of "all-linear"
    randomize_lora_b(model)
    calls = []
    fused = peft_backend._lora_linear
    monkeypatch.setattr(peft_backend, "_lora_linear", lambda *a: calls.append(1) or fused(*a))
    model.train()
    x = ids()
    y = model(input_ids=x).logits
    assert len(calls) == 14
    y.square().mean().backward()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]

    ref = peft.PeftModel.from_pretrained(bnb_model(nf4_dir), tmp_path, is_trainable=True)
    assert type(ref.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    y_ref = ref(input_ids=x).logits
    bounds.assert_logits_within("ours vs bitsandbytes + PEFT", y, ref, x)
    y_ref.square().mean().backward()
    g, g_ref = lora_grads(model), lora_grads(ref)
    assert set(g) == set(g_ref) and len(g) == 28
    bounds.assert_same_gradients(g, g_ref, ref.config.num_hidden_layers, bounds.model_reduce_len(ref, x))

    again = peft.PeftModel.from_pretrained(_ours(nf4_dir), tmp_path, config=LoraConfig.from_pretrained(tmp_path))
    assert isinstance(again.base_model.model.model.layers[1].mlp.down_proj, NF4LoraLinear)
    again.train()
    torch.testing.assert_close(again(input_ids=x).logits, y, atol=0, rtol=0)
    convenience = qk.load_adapter(_ours(nf4_dir), tmp_path).train()
    torch.testing.assert_close(convenience(input_ids=x).logits, y, atol=0, rtol=0)


def test_disable_adapter_set_adapter_and_named_adapters(nf4_dir, tmp_path):
    """disable_adapter() is the NF4 base model exactly (DPO's reference); two named adapters switch with set_adapter,
    run together or per row (adapter_names), and save / reload in PEFT's layout (the second in its own subdirectory)."""
    base = _ours(nf4_dir)
    x = ids()
    with torch.no_grad():
        want_base = base(input_ids=x).logits
    model = peft.get_peft_model(base, _lora())
    model.add_adapter("other", _lora(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    model.eval()
    with torch.no_grad():
        y_default = model(input_ids=x).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=x).logits, want_base, atol=0, rtol=0)
        model.set_adapter("other")
        y_other = model(input_ids=x).logits
    assert model.active_adapters == ["other"]
    assert not torch.allclose(y_default, y_other) and not torch.allclose(y_other, want_base)
    with torch.no_grad():
        model.base_model.set_adapter(["default", "other"])  # both active: the first fused, the second PEFT's plain term
        y_both = model(input_ids=x).logits
        model.set_adapter("default")
        mixed = model(input_ids=x, adapter_names=["other", "__base__"]).logits  # PEFT's per-row adapters
    # per-row adapters run each row's layers apart (other shapes, another order); the bound on the scale of the
    # batch's logits with "other" active (the base's differs from it by a small adapter term)
    model.set_adapter("other")
    _, bound, why = bounds.logits_bound(model, x)
    model.set_adapter("default")
    bounds.assert_within("row 0, adapter other", mixed[0], y_other[0], bound[0], why=why)
    bounds.assert_within("row 1, no adapter", mixed[1], want_base[1], bound[1], why=why)
    assert not torch.allclose(y_both, y_default, atol=1e-4) and not torch.allclose(y_both, y_other, atol=1e-4)
    model.set_adapter("other")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()

    again = peft.PeftModel.from_pretrained(_ours(nf4_dir), tmp_path, config=LoraConfig.from_pretrained(tmp_path))
    again.load_adapter(tmp_path / "other", adapter_name="other")
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, y_default, atol=0, rtol=0)
        again.set_adapter("other")
        torch.testing.assert_close(again(input_ids=x).logits, y_other, atol=0, rtol=0)
    assert isinstance(again.base_model.model.model.layers[0].self_attn.q_proj, NF4LoraLinear)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload(arch, tmp_path):
    """merge is exact: a dense deq(W) + scaling * B @ A in place of the NF4 base (GPT-2: a Conv1D again), unmerge puts
    the NF4 base back bit for bit; merge_and_unload gives dense layers that reproduce the adapted model and save as an
    ordinary checkpoint."""
    write_tiny(tmp_path / "fp32", arch)
    model = peft.get_peft_model(_ours(tmp_path / "fp32"), _lora())
    randomize_lora_b(model)
    model.eval()
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
        model.merge_adapter()
        layer = next(m for m in model.modules() if isinstance(m, NF4LoraLinear))
        dense_type = transformers.pytorch_utils.Conv1D if arch == "gpt2" else nn.Linear
        assert type(layer.base_layer) is dense_type and layer.merged
        bounds.assert_logits_within("merged", want, model, x)
        model.unmerge_adapter()
        assert isinstance(layer.base_layer, NF4Linear) and not layer.merged
        torch.testing.assert_close(model(input_ids=x).logits, want, atol=0, rtol=0)
        merged = model.merge_and_unload()
    assert not any(isinstance(m, (NF4Linear, NF4LoraLinear)) for m in merged.modules())
    bounds.assert_logits_within("merge_and_unload", want, merged, x)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    bounds.assert_logits_within("merged and reloaded", want, reloaded, x)


def test_print_trainable_parameters_and_unload(tmp_path, capsys):
    write_tiny(tmp_path)
    base = _ours(tmp_path)
    model = peft.get_peft_model(base, _lora(target_modules=["q_proj", "v_proj"]))
    trainable, _ = model.get_nb_trainable_parameters()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == lora == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 4 * 32)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    unloaded = model.unload()
    assert type(unloaded.model.layers[0].self_attn.q_proj) is NF4Linear


def test_plain_peft_config_and_explicit_registration(tmp_path):
    """A peft.LoraConfig without our registration still works on NF4 layers (PEFT's generic lora.Linear over our
    NF4 matmul, same logits to 1e-6); register_peft_layers turns the fused layers on for a config built elsewhere."""
    write_tiny(tmp_path)
    x = ids()
    fused = peft.get_peft_model(_ours(tmp_path), _lora())
    randomize_lora_b(fused)
    fused.save_pretrained(tmp_path / "adapter")
    plain = peft.PeftModel.from_pretrained(_ours(tmp_path), tmp_path / "adapter")
    assert type(plain.base_model.model.model.layers[0].self_attn.q_proj) is peft.tuners.lora.Linear
    bounds.assert_logits_within("PEFT's plain layer vs ours fused", plain(input_ids=x).logits, fused.eval(), x)
    cfg = register_peft_layers(peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model = peft.get_peft_model(_ours(tmp_path), cfg)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, NF4LoraLinear)
    with pytest.raises(TypeError, match=r"config must be a peft.LoraConfig; got dict"):
        register_peft_layers({"r": 4})


def test_unsupported_settings_are_errors(tmp_path):
    write_tiny(tmp_path)
    with pytest.raises(ValueError, match=r"NF4LoraLinear does not support use_dora=True"):
        peft.get_peft_model(_ours(tmp_path), _lora(use_dora=True))
    with pytest.raises(ValueError, match=r"does not support lora_bias=True"):
        peft.get_peft_model(_ours(tmp_path), _lora(lora_bias=True))
    ours = qk.apply_qlora(copy.deepcopy(_ours(tmp_path)), r=4, target_modules=["q_proj"])
    with pytest.raises(TypeError, match=r"base_layer must be a qlora_kernels NF4Linear; got QLoraLinear \(it has this "
                                        r"package's own adapters: qlora_kernels.hf.as_peft_model"):
        peft.get_peft_model(ours, _lora(target_modules=["q_proj"]))


# -- as_peft_model: a model apply_qlora adapted, as a PeftModel ------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_as_peft_model_carries_the_adapters_as_they_are(arch, tmp_path):
    """The same logits bit for bit (train mode with dropout under one seed too, and the gradients), the same parameter
    objects (an optimizer built before goes on), PEFT's save_pretrained writes what save_adapter writes, and the
    adapters reload onto a fresh load through PEFT with the same logits."""
    from safetensors.torch import load_file

    write_tiny(tmp_path / "fp32", arch)
    model = qk.apply_qlora(_ours(tmp_path / "fp32"), r=4, lora_alpha=8, lora_dropout=0.1,
                           exclude_modules=["k_proj"] if arch == "llama" else None)
    randomize_lora_b(model)
    x = ids()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=0.1)

    def run(m):
        torch.manual_seed(3)
        m.train()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        with torch.no_grad():
            logits = m.eval()(input_ids=x).logits
        return loss.detach(), grads, logits

    loss, grads, logits = run(model)
    qk.save_adapter(model, tmp_path / "ours")
    model.train()
    wrapped = as_peft_model(model)
    assert isinstance(wrapped, peft.PeftModelForCausalLM) and wrapped.training
    layer = wrapped.get_base_model().transformer.h[0].attn.c_attn if arch == "gpt2" else \
        wrapped.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, NF4LoraLinear)
    live = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert set(map(id, live.values())) == set(map(id, params.values()))  # the same tensors, nothing else trainable
    loss2, grads2, logits2 = run(wrapped)
    torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
    torch.testing.assert_close(logits2, logits, atol=0, rtol=0)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)
    wrapped.train()(input_ids=x, labels=x).loss.backward()
    opt.step()  # the optimizer built on the apply_qlora model moves the PeftModel's adapters
    assert not torch.equal(wrapped.eval()(input_ids=x).logits, logits)
    wrapped.save_pretrained(tmp_path / "peft")
    ours, theirs = load_file(str(tmp_path / "ours" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(_ours(tmp_path / "fp32"), tmp_path / "peft",
                                               config=LoraConfig.from_pretrained(tmp_path / "peft")).eval()
        torch.testing.assert_close(again(input_ids=x).logits, wrapped(input_ids=x).logits, atol=0, rtol=0)


def test_as_peft_model_keeps_dense_layers_and_modules_to_save(tmp_path):
    """A layer the 4-bit loader kept dense (DenseLoraLinear) becomes PEFT's lora.Linear on the same dense layer, a
    module trained whole becomes PEFT's modules_to_save, a reward model a SEQ_CLS PeftModel: same scores."""
    from transformers import AutoModelForSequenceClassification

    write_tiny(tmp_path / "fp32")
    model = qk.load_4bit_model(tmp_path / "fp32", dtype=torch.float32, skip_modules=["o_proj"],
                               model_class=AutoModelForSequenceClassification, num_labels=1)
    qk.apply_qlora(model, r=4, modules_to_save=["score"])
    randomize_lora_b(model)
    with torch.no_grad():
        model.score.weight.add_(0.1)
        want = model.eval()(input_ids=ids()).logits
    wrapped = as_peft_model(model)
    assert isinstance(wrapped, peft.PeftModelForSequenceClassification)
    o = wrapped.get_base_model().model.layers[0].self_attn.o_proj
    assert type(o) is peft.tuners.lora.Linear and type(o.base_layer) is nn.Linear
    assert isinstance(wrapped.get_base_model().score, peft.utils.other.ModulesToSaveWrapper)
    assert not hasattr(wrapped.get_base_model(), "qlora_modules_to_save")
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids()).logits, want, atol=0, rtol=0)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in n for n in trainable) and any("o_proj.lora_A" in n for n in trainable)


def test_as_peft_model_errors(tmp_path):
    write_tiny(tmp_path / "fp32")
    with pytest.raises(ValueError, match=r"has no QLoraLinear / DenseLoraLinear layers: call apply_qlora first"):
        as_peft_model(_ours(tmp_path / "fp32"))
    wrapped = as_peft_model(qk.apply_qlora(_ours(tmp_path / "fp32"), r=4))
    with pytest.raises(TypeError, match=r"model is already a PEFT model \(PeftModelForCausalLM\)"):
        as_peft_model(wrapped)
    model = qk.apply_qlora(_ours(tmp_path / "fp32"), r=4)
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match=r"needs live adapters; \['model.layers.0.self_attn.q_proj'\] have merged"):
        as_peft_model(model)
    model = qk.apply_qlora(_ours(tmp_path / "fp32"), r=4, lora_dropout=0.1)
    model.model.layers[1].mlp.up_proj.lora_dropout = 0.2
    with pytest.raises(ValueError, match=r"one lora_dropout for all layers .* the model has \[0.1, 0.2\]"):
        as_peft_model(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, qk.QLoraLinear)  # nothing changed before the error
