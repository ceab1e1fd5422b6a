"""load_4bit_model against transformers' own loader, and the checkpoints it must refuse (tiny configs, no hub).

Oracle: ``transformers.AutoModelForCausalLM.from_pretrained`` of the same directory, with the linear layers we
quantize replaced by the NF4 round trip of *its* loaded weights (so a tensor read under the wrong name, or
converted differently, shows), and for 4-bit checkpoints transformers' bitsandbytes model (+ PEFT).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.hf import DenseLoraLinear
from qlora_kernels.nn import NF4Linear, QLoraLinear

from . import bounds

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

# hidden sizes >= 64 (the blocksize): bitsandbytes 0.50.2's CPU kernels mis-decode weights whose blocks span rows
_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=96, max_position_embeddings=32)


def _config(arch: str):
    if arch == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **_KW)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16,
                                           **_KW)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, vocab_size=96, max_position_embeddings=32)
    if arch == "falcon":  # FalconLinear layers: transformers' bitsandbytes integration leaves them dense
        return transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                                         new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                         bias=False)
    if arch == "llama":
        return transformers.LlamaConfig(**_KW)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(arch)


def _save_tiny(arch: str, path, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    model.save_pretrained(path)
    return model


def _ids(seed=0):
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(seed))


def _bnb_config(**over):
    pytest.importorskip("bitsandbytes")
    kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype=torch.float32)
    return transformers.BitsAndBytesConfig(**dict(kw, **over))


def _bnb_model(path, **kw):
    # train mode: an eval-mode, no-grad CPU forward makes bitsandbytes repack to its bf16-absmax CPU layout
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kw).train()


def _nf4_round_trip_reference(path, ours):
    """transformers' own load of ``path``, each layer we quantized replaced by the NF4 round trip of its weight."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name, m in ours.named_modules():
        if isinstance(m, NF4Linear):
            target = ref.get_submodule(name)
            w = target.weight.data.t() if m.fan_in_fan_out else target.weight.data
            rt = qk.dequantize_nf4(qk.quantize_nf4(w.contiguous(), blocksize=m.nf4_blocksize, double_quant=True))
            target.weight.data = (rt.t() if m.fan_in_fan_out else rt).contiguous()
    return ref


# -- transformers 5's key renaming and conversions ---------------------------------------------


@pytest.mark.parametrize("arch", ["gpt_neox", "mixtral", "qwen3_moe"])
def test_float_checkpoint_loads_with_transformers_conversions(arch, tmp_path):
    """save_pretrained writes the legacy layout (``embed_out``, ``block_sparse_moe.experts.N.w1`` ...), which
    transformers 5 renames and fuses when it loads; ours did not ("lacks N tensors"). Logits equal transformers'
    own load with our linear layers' NF4 round trip; every dense tensor (fused 3-D experts, routers) is identical."""
    _save_tiny(arch, tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    legacy = {"gpt_neox": "embed_out.weight", "mixtral": "block_sparse_moe.experts.0.w1.weight",
              "qwen3_moe": "mlp.experts.0.gate_proj.weight"}[arch]
    assert any(k.endswith(legacy) for k in keys)  # the checkpoint really is in the old layout
    ours = qk.load_4bit_model(tmp_path, dtype=torch.float32, quantize_experts=False)  # the conversions, exactly
    ref = _nf4_round_trip_reference(tmp_path, ours)
    nf4 = {n for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 8  # the attention (and GPT-NeoX MLP) linears; lm_head stays dense, experts are 3-D
    dense = {k: v for k, v in ref.state_dict().items() if k.rsplit(".", 1)[0] not in nf4}
    got = ours.state_dict()
    for key, value in dense.items():
        assert torch.equal(got[key], value), key
    if arch != "gpt_neox":
        experts = ours.model.layers[0].mlp.experts
        assert experts.gate_up_proj.dim() == 3 and not isinstance(experts, NF4Linear)
    with torch.no_grad():
        bounds.assert_logits_within(f"{arch}: ours vs transformers", ours(input_ids=_ids()).logits, ref, _ids())
    if arch == "gpt_neox":
        return
    # by default the fused experts are NF4 too: the NF4 round trip of transformers' own fused tensors
    from qlora_kernels.nn.experts import NF4Experts

    quantized = qk.load_4bit_model(tmp_path, dtype=torch.float32)
    experts = quantized.model.layers[0].mlp.experts
    assert isinstance(experts, NF4Experts)
    for proj in ("gate_up_proj", "down_proj"):
        fused = getattr(ref.model.layers[0].mlp.experts, proj).detach()
        want = qk.dequantize_nf4(qk.quantize_nf4(fused, blocksize=64, double_quant=True))
        assert torch.equal(qk.dequantize_nf4(experts.qweight(proj)), want), proj
    path2 = tmp_path / "saved"  # and a model with NF4 experts loads back its stored bytes (saved in transformers 5's
    quantized.save_pretrained(path2, save_original_format=False)  # own layout: its legacy one splits experts)
    again = qk.load_4bit_model(path2, dtype=torch.float32)
    assert torch.equal(again.model.layers[0].mlp.experts.gate_up_proj_packed, experts.gate_up_proj_packed)
    with torch.no_grad():
        # the same bytes through the same kernels: the same arithmetic
        torch.testing.assert_close(again(input_ids=_ids()).logits, quantized(input_ids=_ids()).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gpt_neox", "mixtral"])
def test_bnb_checkpoint_loads_with_transformers_conversions(arch, tmp_path):
    """A bitsandbytes checkpoint transformers 5 writes for these models (4-bit attention, dense legacy-named experts
    and embed_out): ours loads it as stored and computes what transformers' bitsandbytes model computes."""
    _save_tiny(arch, tmp_path / "fp32")
    _bnb_model(tmp_path / "fp32", quantization_config=_bnb_config()).save_pretrained(tmp_path / "nf4")
    ours = qk.load_4bit_model(tmp_path / "nf4", dtype=torch.float32, quantize_experts=False)
    stored = load_file(str(tmp_path / "nf4" / "model.safetensors"))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 8
    for name, m in layers.items():
        for key, t in m.state_dict().items():
            assert torch.equal(t, stored[f"{name}.{key}"]), f"{name}.{key}"  # no requantizing
    ref = _bnb_model(tmp_path / "nf4")
    with torch.no_grad():
        bounds.assert_logits_within(f"{arch}: ours vs bitsandbytes", ours(input_ids=_ids()).logits, ref, _ids())


def test_per_expert_4bit_tensors_are_refused(tmp_path):
    """transformers 4's bnb MoE layout (each expert's w1/w2/w3 a 4-bit Linear): transformers 5 fuses experts into 3-D
    tensors and cannot load these (size mismatch); ours says why, naming the tensor."""
    _save_tiny("mixtral", tmp_path / "fp32")
    _bnb_model(tmp_path / "fp32", quantization_config=_bnb_config()).save_pretrained(tmp_path / "nf4")
    sd = load_file(str(tmp_path / "nf4" / "model.safetensors"))
    for key in [k for k in sd if ".experts." in k and k.endswith(".weight")]:
        sd.update(qk.quantize_nf4(sd.pop(key), 64, True).to_bnb_state_dict(key))
    save_file(sd, str(tmp_path / "nf4" / "model.safetensors"), metadata={"format": "pt"})
    error = (r"checkpoint tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight.absmax' is a 4-bit "
             r"\(bitsandbytes\) part of .* into 'model.layers.0.mlp.experts.gate_up_proj'")
    with pytest.raises(ValueError, match=error):
        qk.load_4bit_model(tmp_path / "nf4", dtype=torch.float32)


# -- tensors the model does not take, and tensors that are not what they claim -----------------


def test_unexpected_tensors_are_an_error_or_a_listed_warning(tmp_path, caplog):
    """A checkpoint folder that also holds LoRA weights used to load silently with "0 adapters"."""
    _save_tiny("llama", tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    extra = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64),
             "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4)}
    save_file(dict(sd, **extra), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds 2 tensors that LlamaForCausalLM does not take: "
                                         r"\['model.layers.0.self_attn.q_proj.lora_A.weight', .*load_adapter.*strict"):
        qk.load_4bit_model(tmp_path, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="qlora_kernels.hf"):
        model = qk.load_4bit_model(tmp_path, dtype=torch.float32, strict=False)
    assert "q_proj.lora_B.weight" in caplog.text and "strict=False" in caplog.text
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)


def test_keys_transformers_ignores_still_load(tmp_path):
    """What transformers itself ignores for a model (GPT-2's old ``attn.bias`` masks, stale rotary ``inv_freq``)
    is not an unexpected tensor."""
    _save_tiny("gpt2", tmp_path / "gpt2")
    sd = load_file(str(tmp_path / "gpt2" / "model.safetensors"))
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    save_file(sd, str(tmp_path / "gpt2" / "model.safetensors"), metadata={"format": "pt"})
    qk.load_4bit_model(tmp_path / "gpt2", dtype=torch.float32)
    _save_tiny("llama", tmp_path / "llama")
    sd = load_file(str(tmp_path / "llama" / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(tmp_path / "llama" / "model.safetensors"), metadata={"format": "pt"})
    qk.load_4bit_model(tmp_path / "llama", dtype=torch.float32)


def test_non_float_tensor_in_a_float_checkpoint_is_an_error(tmp_path):
    """An int8 linear weight used to be cast to bf16 and quantized as if it were a weight (transformers' loader
    casts it too: there is no honest way to read it without a quantization_config)."""
    _save_tiny("llama", tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight"
    save_file(dict(sd, **{key: torch.randint(-127, 127, sd[key].shape, dtype=torch.int8)}),
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TypeError, match=r"checkpoint tensor 'model.layers.1.mlp.up_proj.weight' is torch.int8; "
                                        r"the model's tensor is torch.bfloat16"):
        qk.load_4bit_model(tmp_path)
    key2 = "model.norm.weight"
    save_file(dict(sd, **{key2: sd[key2].to(torch.int32)}), str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(TypeError, match=r"checkpoint tensor 'model.norm.weight' is torch.int32"):
        qk.load_4bit_model(tmp_path)


def test_nan_weight_error_names_the_tensor(tmp_path):
    _save_tiny("llama", tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.0.mlp.down_proj.weight' \(the weight of "
                                         r"model.layers.0.mlp.down_proj\): w must be finite; got 1 NaN"):
        qk.load_4bit_model(tmp_path)


@pytest.mark.parametrize("index, error", [
    ("{not json", r"model.safetensors.index.json is not valid JSON"),
    ("", r"model.safetensors.index.json is not valid JSON"),
    ('{"metadata": {}}', r"model.safetensors.index.json must be a JSON object with a non-empty 'weight_map'.*"
                         r"got keys \['metadata'\]"),
    ('[1]', r"model.safetensors.index.json must be a JSON object .*got list"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"weight_map values must be shard file names"),
    ('{"weight_map": {"model.norm.weight": "gone.safetensors"}}', r"names shard files that .* lacks: "
                                                                  r"\['gone.safetensors'\]"),
])
def test_corrupt_index_names_the_file(tmp_path, index, error):
    _save_tiny("llama", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        qk.load_4bit_model(tmp_path)


def test_damaged_safetensors_names_the_file(tmp_path):
    _save_tiny("llama", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        qk.load_4bit_model(tmp_path)


# -- layers a 4-bit loader left dense get plain LoRA -------------------------------------------


@pytest.mark.parametrize("case", ["falcon", "llama_skip_modules", "gpt2_skip_modules"])
@pytest.mark.parametrize("start", ["load_4bit_model", "transformers_bnb"])
def test_dense_layers_of_a_4bit_model_get_plain_lora(case, start, tmp_path):
    """Falcon's FalconLinear layers (which transformers' bitsandbytes integration does not convert) and layers in
    llm_int8_skip_modules stay dense in the 4-bit model; apply_qlora used to quantize them, so an adapter trained
    here did not reproduce on transformers + bitsandbytes + PEFT (logits off by 7e-2). Now: equal logits."""
    arch = case.split("_")[0]
    _save_tiny(arch, tmp_path / "fp32")
    skip = {"falcon": None, "llama": ["down_proj", "lm_head"], "gpt2": ["c_proj", "lm_head"]}[arch]  # GPT-2: Conv1D
    qcfg = _bnb_config(**({} if skip is None else {"llm_int8_skip_modules": skip}))
    _bnb_model(tmp_path / "fp32", quantization_config=qcfg).save_pretrained(tmp_path / "nf4")
    if start == "load_4bit_model":
        ours = qk.load_4bit_model(tmp_path / "nf4", dtype=torch.float32)
    else:
        ours = _bnb_model(tmp_path / "nf4")
    qk.apply_qlora(ours, r=4, lora_alpha=8)
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in ours.named_modules() if isinstance(m, (QLoraLinear,
                                                                                             DenseLoraLinear))}
    if arch == "falcon":
        assert set(kinds.values()) == {DenseLoraLinear}
    elif arch == "llama":
        assert kinds["down_proj"] is DenseLoraLinear and kinds["q_proj"] is QLoraLinear
    else:
        assert kinds["c_proj"] is DenseLoraLinear and kinds["c_attn"] is QLoraLinear
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, (QLoraLinear, DenseLoraLinear)):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    qk.save_adapter(ours, tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(_bnb_model(tmp_path / "nf4"), tmp_path / "adapter").train()
    ours.train()
    ids = _ids()
    y = ours(input_ids=ids).logits
    bounds.assert_logits_within("ours vs bitsandbytes + PEFT", y, ref, ids)
    # the adapter round-trips into a fresh load, and merges into the dense weight
    again = qk.load_adapter(qk.load_4bit_model(tmp_path / "nf4", dtype=torch.float32), tmp_path / "adapter")
    bounds.assert_logits_within("reloaded adapter", y, again, ids)
    with torch.no_grad():
        merged = qk.merge_and_unload(again)
    bounds.assert_logits_within("merged", y, merged, ids)
    assert not any(isinstance(m, (NF4Linear, DenseLoraLinear)) for m in merged.modules())


# -- transformers' Trainer after apply_qlora on transformers' bitsandbytes model ---------------


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj"]])
def test_trainer_accepts_bnb_model_after_apply_qlora(tmp_path, target_modules):
    """Trainer refused it ("cannot perform fine-tuning on purely quantized models"): the model kept is_quantized /
    hf_quantizer though no bitsandbytes layer was left. The untargeted Linear4bit layers become NF4Linear on the same
    bytes, transformers' quantization state goes, and Trainer trains the adapters."""
    _save_tiny("llama", tmp_path / "fp32")
    model = _bnb_model(tmp_path / "fp32", quantization_config=_bnb_config())
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    qk.apply_qlora(model, r=4, target_modules=target_modules)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.config.quantization_config.to_dict()["quant_method"] == "bitsandbytes"  # (no quantizer behind it)
    with torch.no_grad():
        bounds.assert_logits_within("B = 0: unchanged", before, model, ids)  # bitsandbytes' kernels, then ours

    rows = [{"input_ids": ids[i].tolist(), "labels": ids[i].tolist()} for i in range(2)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    b_before = model.model.layers[0].self_attn.q_proj.lora_B.weight.detach().clone()
    trainer.train()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.lora_B.weight, b_before)  # it trained


def test_index_json_round_trip_still_loads(tmp_path):
    """A well-formed sharded checkpoint loads (the index checks accept what save_pretrained writes)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("llama"))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    qk.load_4bit_model(tmp_path, dtype=torch.float32)


def test_the_checkpoint_reader_reads_every_dtype_and_any_element_range_with_plain_reads(tmp_path):
    """``_Checkpoint.get`` / ``elements`` read the file's bytes themselves (no mapping): every dtype and shape as
    safetensors stores them, any flat range, and clear errors for a range out of bounds or a file cut short."""
    from qlora_kernels.hf.loading import _Checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(5, 3, generator=g).bfloat16(), "f16": torch.randn(7, generator=g).half(),
               "f32": torch.randn(2, 3, 4, generator=g), "u8": torch.arange(9, dtype=torch.uint8).reshape(9, 1),
               "i64": torch.tensor([-3, 2**40]), "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4),
               "bool": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = _Checkpoint(tmp_path)
    for key, want in tensors.items():
        got = ckpt.get(key)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
        flat = want.reshape(-1)
        if key != "bool":  # a dtype outside SAFETENSORS_DTYPES: get() goes through safetensors itself
            for a, b in ((0, flat.numel()), (min(1, flat.numel()), flat.numel() // 2 + 1 if flat.numel() else 0)):
                assert torch.equal(ckpt.elements(key, a, b), flat[a:b]), (key, a, b)
    with pytest.raises(ValueError, match=r"elements \[4, 99\) of 'bf16'"):
        ckpt.elements("bf16", 4, 99)
    for a, b in ((0, 3), (1, 2), (2, 2)):  # columns of a 2-D tensor (a Conv1D weight's rows of its transpose)
        assert torch.equal(ckpt.columns("bf16", a, b), tensors["bf16"][:, a:b]), (a, b)
    with pytest.raises(ValueError, match=r"columns \[1, 4\) of 'bf16'"):
        ckpt.columns("bf16", 1, 4)
    with pytest.raises(TypeError, match="'f32'"):
        ckpt.columns("f32", 0, 1)
    with pytest.raises(TypeError, match="'bool'"):
        ckpt.elements("bool")
    # a file cut short after it was opened (safetensors refuses one at opening): the read says so
    readable = [k for k in tensors if ckpt.info(k)[0] is not None and tensors[k].numel()]
    last = max(readable, key=lambda k: ckpt.info(k)[2])
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:ckpt.info(last)[2] + 1])
    with pytest.raises(ValueError, match=f"the data of '{last}' is cut short"):
        ckpt.elements(last)


def test_per_expert_weights_are_read_in_part_as_transformers_stacks_them(tmp_path):
    """A Mixtral checkpoint with its experts stored one by one (``experts.N.w1/w2/w3``): the stacked layout of each
    fused tensor names the checkpoint tensors whose elements laid end to end are transformers' conversion of them (w1
    and w3 of each expert in turn for ``gate_up_proj``), any range of them reads as that slice of it, and conversions
    that do more than stack whole tensors have no such layout, so they are built whole."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from qlora_kernels.hf.loading import _Checkpoint, _KeyPlan, _Sources, _stacked_layout

    from .hf_tiny import write_tiny

    write_tiny(tmp_path, "mixtral")
    fused = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    ckpt = _Checkpoint(tmp_path)
    sources = _Sources(ckpt, _KeyPlan(ckpt, model), model, tmp_path)
    sources.convert("model.layers.0.", defer_stacked=True)
    for proj in ("gate_up_proj", "down_proj"):
        key = f"model.layers.0.mlp.experts.{proj}"
        want = fused[key]
        keys, dtype = sources.stacked(key, want.shape)
        assert dtype == torch.float32 and len(keys) == 4 * (2 if proj == "gate_up_proj" else 1)
        if proj == "gate_up_proj":
            assert [k.rsplit(".", 3)[-3:-1] for k in keys[:4]] == [["0", "w1"], ["0", "w3"], ["1", "w1"], ["1", "w3"]]
        flat = want.reshape(-1)
        n = flat.numel()
        for a, b in ((0, n), (3, n // 3), (n // 2 - 5, n // 2 + 7), (n - 1, n), (7, 7)):
            assert torch.equal(sources.read_stacked(keys, a, b), flat[a:b]), (proj, a, b)
        assert sources.stacked(key, torch.Size([want.shape[0], want.shape[1] + 1, want.shape[2]])) is None
    sources.drop("model.layers.0.mlp.experts.down_proj")
    assert "model.layers.0.mlp.experts.down_proj" not in sources
    # deferred and then taken whole: transformers' own conversion, run then
    assert torch.equal(sources.take("model.layers.0.mlp.experts.gate_up_proj")[1], fused[
        "model.layers.0.mlp.experts.gate_up_proj"])
    # other conversions: no layout
    keys = {"a": ["x.0", "x.1"], "b": ["y.0", "y.1"]}

    def op(name, dim):
        return type(name, (), {"dim": dim, "num_shards_attribute": None})()

    def converter(ops, patterns=("a", "b"), quant=None):
        return SimpleNamespace(operations=[op(n, d) for n, d in ops], source_patterns=list(patterns),
                               quantization_operation=quant)

    assert _stacked_layout(converter([("MergeModulelist", 0), ("Concatenate", 1)]), keys) == ["x.0", "y.0", "x.1",
                                                                                             "y.1"]
    assert _stacked_layout(converter([("MergeModulelist", 0)], patterns=("a",)), keys) == ["x.0", "x.1"]
    merge = [("MergeModulelist", 0)]
    for ops, patterns, quant in (([("MergeModulelist", 0), ("Concatenate", 0)], ("a", "b"), None),
                                 ([("MergeModulelist", 1)], ("a",), None), ([("Chunk", 0)], ("a",), None),
                                 (merge, ("a", "b"), None), (merge, ("a",), object()), (merge, ("c",), None)):
        assert _stacked_layout(converter(ops, patterns, quant), keys) is None, (ops, patterns)
