"""Hugging Face integration on tiny random models built from configs (no hub access).

Oracles: PEFT on the unquantized model whose linear weights are our dequantized NF4 weights (mathematically the
model we compute), and, for 4-bit checkpoints, transformers' own bitsandbytes model with PEFT LoRA on top (both
run on the CPU).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.hf import adapters_disabled
from qlora_kernels.nn import NF4Linear, QLoraLinear

from . import bounds

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=128, max_position_embeddings=64)
ARCHS = ["llama", "mistral", "qwen2", "gemma", "gpt2"]
LINEAR_LEAVES = {"gpt2": {"c_attn", "c_proj", "c_fc"}}


def _config(arch: str, **over):
    kw = dict(_KW, **over)
    if arch == "llama":
        return transformers.LlamaConfig(**kw)
    if arch == "mistral":
        return transformers.MistralConfig(**kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(**kw)
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=16, **kw)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=kw["hidden_size"], n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(arch)


def _tiny(arch: str, seed: int = 0, **over) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(arch, **over)).eval()  # eval: GPT-2 has dropout


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, QLoraLinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def _dequantized_base(fp_model, ours):
    """The unquantized model with each adapted layer's weight replaced by our dequantized NF4 weight."""
    base = copy.deepcopy(fp_model)
    for name, m in ours.named_modules():
        if isinstance(m, NF4Linear):
            w = m.qweight.dequantize(torch.float32)
            target = base.get_submodule(name)
            target.weight.data = (w.t() if m.fan_in_fan_out else w).contiguous().to(target.weight.dtype)
    return base


def _lora_grads(model, peft_names=False):
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            key = name.replace("base_model.model.", "").replace(".default", "") if peft_names else name
            out[key] = p.grad
    return out


# -- apply_qlora + PEFT round trip -----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_save_adapter_matches_peft_logits_and_grads(arch, tmp_path):
    """Ours (NF4 base + LoRA) == PEFT loading our adapter dir onto the dequantized base: logits and every LoRA grad."""
    fp = _tiny(arch)
    ours = qk.apply_qlora(copy.deepcopy(fp), r=8, lora_alpha=16)
    assert type(ours.lm_head) is nn.Linear  # skipped by default
    _randomize_adapters(ours)
    qk.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    if arch in LINEAR_LEAVES:
        assert set(cfg["target_modules"]) == LINEAR_LEAVES[arch]

    ref = peft.PeftModel.from_pretrained(_dequantized_base(fp, ours), tmp_path, is_trainable=True).eval()
    ids = _ids()
    y = ours(input_ids=ids).logits
    y_ref = ref(input_ids=ids).logits
    bounds.assert_logits_within(f"{arch}: ours vs PEFT", y, ref, ids)
    (y.float() ** 2).mean().backward()
    (y_ref.float() ** 2).mean().backward()
    g, g_ref = _lora_grads(ours), _lora_grads(ref, peft_names=True)
    assert set(g) == set(g_ref) and len(g) > 0
    bounds.assert_same_gradients(g, g_ref, ref.config.num_hidden_layers, bounds.model_reduce_len(ref, ids))


@pytest.mark.parametrize("device", DEVICES)
def test_apply_qlora_freezes_and_replaces_on_the_instance(device):
    model = _tiny("llama").to(device)
    attn_cls = type(model.model.layers[0].self_attn)
    forward_before = attn_cls.forward
    qk.apply_qlora(model, r=4, target_modules=["q_proj", "v_proj"])
    assert attn_cls.forward is forward_before and type(model.model.layers[0].self_attn) is attn_cls
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, QLoraLinear))
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable) and len(trainable) == 8
    assert all(b.device.type == device for b in model.buffers())
    out = model(input_ids=_ids().to(device)).logits
    assert out.shape == (2, 12, 128) and torch.isfinite(out).all()


def test_target_modules_regex_exclude_and_lm_head():
    model = qk.apply_qlora(_tiny("llama"), target_modules=r".*\.mlp\.(up|down)_proj")
    adapted = sorted(n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, QLoraLinear))
    assert adapted == ["down_proj", "down_proj", "up_proj", "up_proj"]
    model = qk.apply_qlora(_tiny("llama"), exclude_modules=["o_proj", "gate_proj"])
    leaves = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, QLoraLinear)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    model = qk.apply_qlora(_tiny("llama"), target_modules=["lm_head"])  # named explicitly: taken
    assert isinstance(model.lm_head, QLoraLinear)


def test_rank_pattern_round_trip(tmp_path):
    fp = _tiny("llama")
    ours = qk.apply_qlora(copy.deepcopy(fp), r=4, lora_alpha=4, target_modules=["q_proj"])
    qk.apply_qlora(ours, r=8, lora_alpha=32, exclude_modules=["q_proj"])
    _randomize_adapters(ours)
    qk.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and set(cfg["rank_pattern"].values()) == {4} and len(cfg["rank_pattern"]) == 2
    ref = peft.PeftModel.from_pretrained(_dequantized_base(fp, ours), tmp_path).eval()
    ids = _ids()
    bounds.assert_logits_within("ours vs PEFT", ours(input_ids=ids).logits, ref, ids)
    # and back into a fresh model of ours
    again = qk.load_adapter(copy.deepcopy(fp), tmp_path)
    assert again.model.layers[0].self_attn.q_proj.r == 4 and again.model.layers[0].mlp.up_proj.r == 8
    torch.testing.assert_close(again(input_ids=ids).logits, ours(input_ids=ids).logits, atol=0, rtol=0)


# -- against transformers' bitsandbytes model + PEFT -----------------------------------------


def _write_bnb_checkpoint(root, arch):
    """A tiny model saved in fp32, then saved again by transformers as a bitsandbytes nf4 checkpoint (root/nf4)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes writes the 4-bit checkpoint; not installed here")
    _tiny(arch).save_pretrained(root / "fp32")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    bnb_model = AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=qcfg, device_map="cpu",
                                                     dtype=torch.float32)
    bnb_model.save_pretrained(root / "nf4")
    return root


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    return _write_bnb_checkpoint(tmp_path_factory.mktemp("bnb"), "llama")


def _bnb_model(path):
    # train mode: an eval-mode, no-grad CPU forward would make bitsandbytes repack to its bf16-absmax CPU layout
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32).train()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_4bit_model_bnb_checkpoint_is_used_as_stored(bnb_checkpoint, arch, tmp_path):
    from safetensors.torch import load_file

    root = bnb_checkpoint if arch == "llama" else _write_bnb_checkpoint(tmp_path, arch)
    path = root / "nf4"
    ours = qk.load_4bit_model(path, dtype=torch.float32)
    stored = load_file(str(path / "model.safetensors"))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == (14 if arch == "llama" else 8) and type(ours.lm_head) is nn.Linear
    assert all(m.fan_in_fan_out == (arch == "gpt2") for m in layers.values())
    assert ours.config.quantization_config.bnb_4bit_quant_type == "nf4"  # what save_pretrained writes
    for name, m in layers.items():
        for key, t in m.state_dict().items():
            assert torch.equal(t, stored[f"{name}.{key}"]), f"{name}.{key}"  # no requantizing
    ref = _bnb_model(path)
    ids = _ids()
    with torch.no_grad():
        bounds.assert_logits_within("ours vs bitsandbytes", ours(input_ids=ids).logits, ref, ids)
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))


@pytest.mark.parametrize("start", ["load_4bit_model", "transformers_bnb"])
def test_matches_bnb_plus_peft_logits_and_grads(bnb_checkpoint, start, tmp_path):
    """transformers' bitsandbytes model + PEFT LoRA (adapters saved by PEFT) vs ours with load_adapter on the same
    4-bit bytes: logits and every LoRA gradient."""
    path = bnb_checkpoint / "nf4"
    ref = peft.get_peft_model(_bnb_model(path), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert type(ref.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(tmp_path)
    ref.train()

    if start == "load_4bit_model":
        ours = qk.load_4bit_model(path, dtype=torch.float32)
        qk.apply_qlora(ours, r=8, lora_alpha=16)
    else:  # adapters straight onto transformers' Linear4bit layers (from_bnb)
        ours = qk.apply_qlora(_bnb_model(path), r=8, lora_alpha=16)
    qk.load_adapter(ours, tmp_path)
    ours.train()
    ids = _ids()
    y, y_ref = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    bounds.assert_logits_within("ours vs bitsandbytes + PEFT", y, ref, ids)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    grads, grads_ref = _lora_grads(ours), _lora_grads(ref, peft_names=True)
    assert set(grads) == set(grads_ref) and len(grads) == 28
    bounds.assert_same_gradients(grads, grads_ref, ref.config.num_hidden_layers, bounds.model_reduce_len(ref, ids))


# -- load_4bit_model from float checkpoints --------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_load_4bit_model_quantizes_float_checkpoint_while_loading(arch, tmp_path):
    fp = _tiny(arch)
    fp.save_pretrained(tmp_path)
    ours = qk.load_4bit_model(tmp_path, dtype=torch.float32)
    want = qk.apply_qlora(copy.deepcopy(fp), r=1)  # same quantizer; B = 0, so the output is the NF4 base model
    for name, m in ours.named_modules():
        if isinstance(m, NF4Linear):
            other = want.get_submodule(name)
            assert torch.equal(m.nf4_packed, other.nf4_packed) and m.fan_in_fan_out == other.fan_in_fan_out
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == sum(
        isinstance(m, QLoraLinear) for m in want.modules()) > 0
    assert not any(t.is_meta for t in list(ours.parameters()) + list(ours.buffers()))
    ids = _ids()
    with torch.no_grad():
        bounds.assert_logits_within("load_4bit_model vs apply_qlora", ours(input_ids=ids).logits, want, ids)


def test_load_4bit_model_bf16_sharded_and_tied(tmp_path):
    fp = _tiny("gemma")  # ties lm_head to the embeddings and has computed buffers (rotary, embed scale)
    fp.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = qk.load_4bit_model(tmp_path)  # bf16 default
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert all(m.nf4_dtype == torch.bfloat16 for m in ours.modules() if isinstance(m, NF4Linear))
    ids = _ids()
    with torch.no_grad():
        want = fp(input_ids=ids).logits
        got = ours(input_ids=ids).logits.float()
    # 4-bit weights: close to the full model, not equal; a wrong buffer (rotary, embed scale) would be far off
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured with the CUDA allocator")
def test_load_4bit_model_peak_memory_cuda(tmp_path):
    """Layer by layer: the peak is the 4-bit model plus one layer's quantization temporaries (generously 32 bytes
    per weight), far below the bf16 model, which is never materialised on the device."""
    fp = _tiny("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=24, vocab_size=256)
    fp.save_pretrained(tmp_path)
    full = sum(p.numel() * 2 for p in fp.parameters())  # bf16 bytes
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = qk.load_4bit_model(tmp_path, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    resident = torch.cuda.memory_allocated() - base
    largest = max(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    assert resident + 32 * largest < 0.5 * full  # so the bound below means something
    assert peak <= resident + 32 * largest, (peak, resident, largest, full)
    assert model.model.layers[0].mlp.up_proj.nf4_packed.is_cuda


# -- merge_and_unload ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_save_pretrained(arch, tmp_path):
    ours = qk.apply_qlora(_tiny(arch), r=8, lora_alpha=16)
    _randomize_adapters(ours)
    ids = _ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    merged = qk.merge_and_unload(ours)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    kinds = {type(m) for m in merged.modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert kinds == ({Conv1D, nn.Linear} if arch == "gpt2" else {nn.Linear})
    bounds.assert_logits_within(f"{arch}: adapters vs merged", want, merged, ids)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    bounds.assert_logits_within(f"{arch}: adapters vs merged and reloaded", want, reloaded, ids)


def test_merge_and_unload_takes_the_models_compute_dtype(bnb_checkpoint):
    """A bnb checkpoint whose quant states say fp32, loaded in bf16 (the default): merge_and_unload made fp32 layers in
    a bf16 model, whose next forward crashed. The merged layers take the dtype the model computes in (recorded by
    load_4bit_model as each NF4 layer's compute_dtype, and kept through dtype casts)."""
    model = qk.apply_qlora(qk.load_4bit_model(bnb_checkpoint / "nf4"), r=4, target_modules=["q_proj", "v_proj"])
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert {m.nf4_dtype for m in layers} == {torch.float32} and {m.compute_dtype for m in layers} == {torch.bfloat16}
    _randomize_adapters(model)
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = qk.merge_and_unload(model)
        assert {m.weight.dtype for m in merged.modules() if isinstance(m, nn.Linear)} == {torch.bfloat16}
        got = merged(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0) > 0.999
    # a dtype cast of the model moves the compute dtype with it; an explicit dtype still wins
    cast = qk.load_4bit_model(bnb_checkpoint / "nf4").to(torch.float16)
    assert {m.compute_dtype for m in cast.modules() if isinstance(m, NF4Linear)} == {torch.float16}
    assert cast.model.layers[0].mlp.up_proj.to_linear().weight.dtype == torch.float16
    assert cast.model.layers[0].mlp.up_proj.to_linear(torch.float32).weight.dtype == torch.float32


# -- training helpers ------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant):
    model = qk.apply_qlora(_tiny("llama"), r=4, lora_dropout=0.1)
    _randomize_adapters(model)
    model.train()
    ids = _ids()

    def grads():
        model.zero_grad()
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ckpt = grads()
    assert set(plain) == set(ckpt) and len(plain) == 28
    bounds.assert_same_gradients(ckpt, plain, model.config.num_hidden_layers, bounds.model_reduce_len(model, _ids()))


def test_adapters_disabled():
    fp = _tiny("llama")
    model = qk.apply_qlora(copy.deepcopy(fp), r=4)
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        _randomize_adapters(model)
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            torch.testing.assert_close(model(input_ids=ids).logits, base, atol=0, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=0, rtol=0)
    assert not torch.allclose(base, adapted)


# -- bad input -------------------------------------------------------------------------------


def test_apply_qlora_bad_arguments():
    model = _tiny("llama")
    with pytest.raises(ValueError, match=r"matched no linear layer.*\['down_proj', 'gate_proj', 'k_proj', 'lm_head'"):
        qk.apply_qlora(model, target_modules=["query", "value"])
    with pytest.raises(ValueError, match=r"r must be a positive integer; got 0"):
        qk.apply_qlora(model, r=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\); got 1.5"):
        qk.apply_qlora(model, lora_dropout=1.5)
    with pytest.raises(TypeError, match=r"target_modules must be 'all-linear'.*got 5"):
        qk.apply_qlora(model, target_modules=5)
    with pytest.raises(ValueError, match=r"is not a regex"):
        qk.apply_qlora(model, target_modules="(")
    qk.apply_qlora(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"already has LoRA adapters"):
        qk.apply_qlora(model, target_modules=["q_proj"])


def test_load_adapter_for_another_model(tmp_path):
    gpt2 = qk.apply_qlora(_tiny("gpt2"), r=4)
    qk.save_adapter(gpt2, tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"is for another model: it has weights for \['transformer\.h\.0"):
        qk.load_adapter(_tiny("llama"), tmp_path / "gpt2")
    wide = qk.apply_qlora(_tiny("llama", intermediate_size=96), r=4)
    qk.save_adapter(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"mlp\.down_proj: lora_A must be \[4, 128\].*got \[4, 96\]"):
        qk.load_adapter(_tiny("llama"), tmp_path / "wide")
    qk.save_adapter(qk.apply_qlora(_tiny("llama"), r=4), tmp_path / "r4")
    model = qk.apply_qlora(_tiny("llama"), r=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"the layer has r=8; the file has r=4"):
        qk.load_adapter(model, tmp_path / "r4")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # left untouched
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json"):
        qk.load_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "wide" / "adapter_config.json").read_text())
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="IA3")))
    with pytest.raises(ValueError, match=r"peft_type must be 'LORA'; got 'IA3'"):
        qk.load_adapter(model, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"has no QLoraLinear / DenseLoraLinear layers"):
        qk.save_adapter(_tiny("llama"), tmp_path / "none")


def test_load_4bit_model_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"local model directory with a config.json"):
        qk.load_4bit_model(tmp_path / "nowhere")
    fp = _tiny("llama")
    fp.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"dtype must be float32, float16 or bfloat16; got torch.int8"):
        qk.load_4bit_model(tmp_path, dtype=torch.int8)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"only safetensors"):
        qk.load_4bit_model(tmp_path)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    qk.save_adapter(qk.apply_qlora(_tiny("llama"), r=4, lora_alpha=8, target_modules=["q_proj"]), path)
    return path


@pytest.mark.parametrize("edit, error", [
    ("", r"adapter_config.json is empty"),
    ("{not json", r"adapter_config.json is not valid JSON: Expecting property name"),
    ("[1, 2]", r"adapter_config.json must hold a JSON object .*got a JSON list"),
    ({"use_rslora": "false"}, r"adapter_config.json: use_rslora must be true or false; got 'false'"),
    ({"lora_dropout": "x"}, r"adapter_config.json: lora_dropout must be a number in \[0, 1\); got 'x'"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\); got 1.5"),
    ({"r": "4"}, r"adapter_config.json: r must be a positive integer; got '4'"),
    ({"r": True}, r"r must be a positive integer; got True"),
    ({"lora_alpha": "8"}, r"adapter_config.json: lora_alpha must be a finite number; got '8'"),
    ({"lora_alpha": None}, r"adapter_config.json: lora_alpha is null; it must be a number \(PEFT's default when"),
    ({"r": None}, r"adapter_config.json: r is null; it must be a number"),
    ({"lora_dropout": None}, r"adapter_config.json: lora_dropout is null; it must be a number"),
    ({"use_dora": "no"}, r"use_dora must be false \(not supported\); got 'no'"),
    ({"rank_pattern": {"(q": 4}}, r"adapter_config.json: rank_pattern key '\(q' is not a regex"),
    ({"rank_pattern": ["q_proj"]}, r"rank_pattern must be an object mapping module-name regexes to positive integers"),
    ({"rank_pattern": {"q_proj": "4"}}, r"rank_pattern\['q_proj'\] must be one of positive integers; got '4'"),
    ({"alpha_pattern": {"q_proj": [8]}}, r"alpha_pattern\['q_proj'\] must be one of finite numbers; got \[8\]"),
])
def test_load_adapter_config_is_type_checked(adapter_dir, tmp_path, edit, error):
    """Every adapter_config.json field load_adapter reads is type-checked; errors name the file and the key (a string
    "false" for use_rslora used to read as True, a bad regex or dropout escaped as re.error / ValueError)."""
    import shutil

    shutil.copytree(adapter_dir, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    if isinstance(edit, dict):
        edit = json.dumps(dict(json.loads(cfg_path.read_text()), **edit))
    cfg_path.write_text(edit)
    model = _tiny("llama")
    with pytest.raises(ValueError, match=error):
        qk.load_adapter(model, tmp_path / "a")
    assert not any(isinstance(m, QLoraLinear) for m in model.modules())  # checked before the model changes
