"""transformers' from_pretrained(quantization_config=QLoraKernelsConfig()) loads into this package's NF4.

Oracle: load_4bit_model of the same directory and dtype (bit for bit), the stored bytes of a bitsandbytes checkpoint,
and transformers + bitsandbytes reloading what save_pretrained writes.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qlora_kernels as qk

from .hf_tiny import bnb_model, ids, randomize_lora_b, write_bnb_checkpoint, write_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

from qlora_kernels.hf import LoraConfig, QLoraKernelsConfig, bnb_free_config  # noqa: E402
from qlora_kernels.nn import NF4Linear  # noqa: E402

from . import bounds  # noqa: E402


def _same(a: nn.Module, b: nn.Module) -> None:
    """Same module types, same state dict (keys, dtypes, bytes), same compute dtypes of the NF4 layers."""
    assert {n: type(m) for n, m in a.named_modules()} == {n: type(m) for n, m in b.named_modules()}
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert [m.compute_dtype for m in a.modules() if isinstance(m, NF4Linear)] == [
        m.compute_dtype for m in b.modules() if isinstance(m, NF4Linear)]


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32),
                                         ("mixtral", torch.float32)])
def test_float_checkpoint_equals_load_4bit_model(arch, dtype, tmp_path):
    """Quantized layer by layer while transformers loads it: the same NF4 bytes, other tensors, module types and
    logits as load_4bit_model (GPT-2's Conv1D weights transposed first, as there; Mixtral's fused 3-D experts in NF4
    and its router dense, as there; save_pretrained writes the experts dense, as bitsandbytes' checkpoints hold them,
    which transformers + bitsandbytes reloads with our logits)."""
    write_tiny(tmp_path, arch)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QLoraKernelsConfig(), dtype=dtype)
    want = qk.load_4bit_model(tmp_path, dtype=dtype)
    _same(ours, want)
    layers = [m for m in ours.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == (14 if arch == "llama" else 8) and {m.compute_dtype for m in layers} == {dtype}
    if arch == "mixtral":
        from qlora_kernels.nn.experts import NF4Experts

        assert isinstance(ours.model.layers[0].mlp.experts, NF4Experts)
    assert all(m.fan_in_fan_out == (arch == "gpt2") for m in layers) and type(ours.lm_head) is nn.Linear
    assert ours.is_quantized and ours.hf_quantizer.is_trainable and ours.hf_quantizer.is_serializable()
    qc = ours.config.quantization_config
    assert isinstance(qc, transformers.BitsAndBytesConfig) and qc.bnb_4bit_quant_type == "nf4"
    assert qc.llm_int8_skip_modules == ["lm_head"] and qc.bnb_4bit_use_double_quant
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, want(input_ids=x).logits, atol=0, rtol=0)
    if arch == "mixtral" and dtype == torch.float32:
        pytest.importorskip("bitsandbytes")
        ours.save_pretrained(tmp_path / "saved")
        ref = bnb_model(tmp_path / "saved")
        assert not isinstance(ref.model.layers[0].mlp.experts, NF4Experts)
        with torch.no_grad():
            got, bound, why = bounds.logits_bound(ref, x)
            bounds.assert_within("transformers + bitsandbytes on our save", got, ours.eval()(input_ids=x).logits,
                                 bound, why=why)


def test_bnb_checkpoint_is_used_as_stored(tmp_path):
    """A bitsandbytes checkpoint: its 4-bit bytes are taken as stored (no requantizing), equal to load_4bit_model.
    transformers itself refuses our config beside the checkpoint's BitsAndBytesConfig; bnb_free_config is the way."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    write_tiny(tmp_path / "fp32")
    path = write_bnb_checkpoint(tmp_path / "fp32", tmp_path / "nf4")
    with pytest.raises(ValueError, match=r"quantized with BitsAndBytesConfig but you are passing a QLoraKernelsConfig"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=QLoraKernelsConfig())
    ours = AutoModelForCausalLM.from_pretrained(path, config=bnb_free_config(path), dtype=torch.float32,
                                                quantization_config=QLoraKernelsConfig(blocksize=128))
    _same(ours, qk.load_4bit_model(path, dtype=torch.float32))
    stored = load_file(str(path / "model.safetensors"))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 14
    for name, m in layers.items():
        assert m.nf4_blocksize == 64  # the stored quant state's, not the config's
        for key, t in m.state_dict().items():
            assert torch.equal(t, stored[f"{name}.{key}"]), f"{name}.{key}"
    x = ids()
    with torch.no_grad():
        bounds.assert_logits_within("ours vs bitsandbytes", ours(input_ids=x).logits, bnb_model(path), x)


def test_device_map_and_skip_modules(tmp_path):
    write_tiny(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QLoraKernelsConfig(), device_map="auto",
                                                dtype=torch.float32)
    # this machine has no accelerator: auto puts everything on the CPU
    assert {t.device.type for t in list(auto.parameters()) + list(auto.buffers())} == {"cpu"}
    _same(auto, qk.load_4bit_model(tmp_path, dtype=torch.float32))
    skip = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QLoraKernelsConfig(
        skip_modules=["down_proj"], double_quant=False), device_map="cpu", dtype=torch.float32)
    want = qk.load_4bit_model(tmp_path, dtype=torch.float32, skip_modules=["down_proj"], double_quant=False)
    _same(skip, want)
    assert type(skip.model.layers[0].mlp.down_proj) is nn.Linear
    assert skip.config.quantization_config.llm_int8_skip_modules == [
        "lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_save_pretrained_writes_a_checkpoint_transformers_reloads(tmp_path):
    """save_pretrained of the 4-bit model writes bitsandbytes' format with a bitsandbytes quantization_config:
    transformers + bitsandbytes loads it (same logits), and so do load_4bit_model and our quantizer (same bytes)."""
    pytest.importorskip("bitsandbytes")
    write_tiny(tmp_path / "fp32")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=QLoraKernelsConfig(),
                                                dtype=torch.float32)
    ours.save_pretrained(tmp_path / "nf4")
    qc = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    ref = bnb_model(tmp_path / "nf4")
    assert type(ref.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    x = ids()
    with torch.no_grad():
        bounds.assert_logits_within("bitsandbytes vs ours", ref(input_ids=x).logits, ours, x)
    _same(qk.load_4bit_model(tmp_path / "nf4", dtype=torch.float32), ours)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", config=bnb_free_config(tmp_path / "nf4"),
                                                 quantization_config=QLoraKernelsConfig(), dtype=torch.float32)
    _same(again, ours)


@pytest.mark.parametrize("route", ["load_4bit_model", "apply_qlora", "bnb+apply_qlora"])
def test_save_pretrained_of_our_models_writes_the_bitsandbytes_config(route, tmp_path):
    """A model from load_4bit_model, with apply_qlora on it, or transformers' bitsandbytes model after apply_qlora
    carries bitsandbytes' description of its NF4 layers in config.quantization_config, so save_pretrained writes the
    checkpoint the from_pretrained route writes: transformers + bitsandbytes reloads it in 4 bits (the base's
    logits) and load_4bit_model gives the same bytes."""
    pytest.importorskip("bitsandbytes")
    write_tiny(tmp_path / "fp32")
    if route == "bnb+apply_qlora":
        write_bnb_checkpoint(tmp_path / "fp32", tmp_path / "bnb")
        model = qk.apply_qlora(bnb_model(tmp_path / "bnb"), r=4, target_modules=["q_proj", "v_proj"])
    else:
        model = qk.load_4bit_model(tmp_path / "fp32", dtype=torch.float32)
        if route == "apply_qlora":
            qk.apply_qlora(model, r=4, target_modules=["q_proj", "v_proj"])
    source = tmp_path / ("bnb" if route == "bnb+apply_qlora" else "fp32")
    base = qk.load_4bit_model(source, dtype=torch.float32)  # the same bytes, no adapters
    model.save_pretrained(tmp_path / "saved")
    qc = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] and qc["llm_int8_skip_modules"] == ["lm_head"]
    reloaded = bnb_model(tmp_path / "saved")
    assert type(reloaded.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    x = ids()
    with torch.no_grad():
        bounds.assert_logits_within("bitsandbytes reload vs the base", reloaded(input_ids=x).logits, base, x)
    if route == "load_4bit_model":
        again = qk.load_4bit_model(tmp_path / "saved", dtype=torch.float32)
    else:  # the adapters' tensors are saved too (transformers skips them with a report); ours asks first
        with pytest.raises(ValueError, match="are LoRA adapters, not part of the base model"):
            qk.load_4bit_model(tmp_path / "saved", dtype=torch.float32)
        again = qk.load_4bit_model(tmp_path / "saved", dtype=torch.float32, strict=False)
    for (name, a), b in zip(again.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), name
    merged = qk.merge_and_unload(qk.load_4bit_model(tmp_path / "fp32", dtype=torch.float32))
    assert getattr(merged.config, "quantization_config", None) is None  # dense again: a plain checkpoint


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_save_pretrained_after_peft_merge_and_unload(targets, tmp_path):
    """PEFT's merge_and_unload makes the adapted layers dense; save_pretrained then describes what is left: nothing
    4-bit (all-linear: a plain checkpoint, no quantization_config) or the rest, with the merged layers listed as dense,
    which transformers + bitsandbytes reloads to the merged model's logits."""
    write_tiny(tmp_path / "fp32")
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", quantization_config=QLoraKernelsConfig(), dtype=torch.float32),
        LoraConfig(r=4, target_modules=targets))
    randomize_lora_b(model)
    merged = model.merge_and_unload().eval()
    x = ids()
    with torch.no_grad():
        want = merged(input_ids=x).logits
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    if targets == "all-linear":
        assert "quantization_config" not in config
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    else:
        pytest.importorskip("bitsandbytes")
        assert "model.layers.1.self_attn.v_proj" in config["quantization_config"]["llm_int8_skip_modules"]
        reloaded = bnb_model(tmp_path / "merged")
        assert type(reloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        bounds.assert_logits_within("merged and reloaded", want, reloaded, x)


def _train_one_step(model, tmp_path):
    rows = [{"input_ids": ids(1, 8, seed=i)[0].tolist(), "labels": ids(1, 8, seed=i)[0].tolist()} for i in range(2)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(model.named_parameters())
    assert before and any(not torch.equal(after[n], p) for n, p in before.items())  # it trained


def test_trainer_accepts_the_model_with_adapters(tmp_path):
    """transformers' Trainer refuses a purely quantized model (its rule, kept); with PEFT adapters (the quantizer is
    trainable) or after apply_qlora (which drops the quantization state, the layers being this package's) it trains."""
    write_tiny(tmp_path)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QLoraKernelsConfig(),
                                                    dtype=torch.float32)

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "x"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"cannot perform fine-tuning on purely quantized models"):
        transformers.Trainer(model=load(), args=args)
    _train_one_step(peft.get_peft_model(load(), LoraConfig(r=4, target_modules="all-linear")), tmp_path)
    model = qk.apply_qlora(load(), r=4)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.config.quantization_config.to_dict()["quant_method"] == "bitsandbytes"  # describes them, for saving
    _train_one_step(model, tmp_path)
    merged = qk.merge_and_unload(load())  # a plain dense model: no quantization state left either
    assert getattr(merged, "hf_quantizer", None) is None and not merged.is_quantized


def test_config_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"blocksize must be one of .*; got 100"):
        QLoraKernelsConfig(blocksize=100)
    with pytest.raises(TypeError, match=r"double_quant must be a bool; got 'yes'"):
        QLoraKernelsConfig(double_quant="yes")
    with pytest.raises(TypeError, match=r"skip_modules must be .*got 5"):
        QLoraKernelsConfig(skip_modules=5)
    with pytest.raises(TypeError, match=r"unexpected arguments \['bits'\]"):
        QLoraKernelsConfig(bits=4)
    assert QLoraKernelsConfig.from_dict(QLoraKernelsConfig(blocksize=128).to_dict()).blocksize == 128
    write_tiny(tmp_path)
    with pytest.raises(ValueError, match=r"device_map must not offload modules to the CPU or the disk"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QLoraKernelsConfig(),
                                             device_map={"model": "cpu", "lm_head": "disk"})
