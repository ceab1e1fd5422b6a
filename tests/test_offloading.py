"""Activation offloading: the same gradients as without it, every activation the decoder saves moved into the host
store (counted by independent saved-tensor hooks), only the layer inputs with gradient checkpointing, the handles
freed after the backward, and the trainer's keys (gradient_checkpointing: true | false | offload,
activation_offloading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.demo.synthetic import instruction_rows, make_languages, save_random_model
from qlora_kernels.train import ConfigError, load_config, train
from qlora_kernels.train.components import enable_checkpointing, memory_mode
from qlora_kernels.train.data import Example, collate, write_jsonl
from qlora_kernels.train.loss import causal_lm_loss, decoder_forward
from qlora_kernels.train.offload import ActivationOffloader

from . import bounds

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS, HIDDEN = 3, 32


def tiny_llama() -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = qk.apply_qlora(transformers.LlamaForCausalLM(cfg), r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    model.config.use_cache = False
    return model.train()


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (12, 30, 21, 7):
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        examples.append(Example(ids, ids, "x"))
    return collate(examples, 0)


def grads(model: nn.Module, b: dict, hooks=None) -> dict:
    """LoRA gradients of the summed loss; ``hooks``: saved-tensor hooks around the decoder only (as the offloader's)."""
    model.zero_grad(set_to_none=True)
    if hooks is None:
        hidden, head, bias = decoder_forward(model, b["input_ids"], b["attention_mask"])
    else:
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            hidden, head, bias = decoder_forward(model, b["input_ids"], b["attention_mask"])
    loss, _ = causal_lm_loss(hidden, head, b["labels"], bias=bias)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_offloaded_run_has_identical_gradients_and_every_saved_activation_leaves():
    model, b = tiny_llama(), batch()
    want = grads(model, b)

    # what autograd saves in the decoder, counted by hooks of the test's own: tensors that are not the model's
    # parameters or buffers (nor views of them), of at least min_bytes, each tensor once
    keep = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def count(t):
        if t.untyped_storage().data_ptr() not in keep and t.numel() * t.element_size() >= 1024:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    assert all(torch.equal(g, want[k]) for k, g in grads(model, b, (count, lambda t: t)).items())
    assert len(saved) > 10 * LAYERS

    off = ActivationOffloader(torch.device("cpu"), min_bytes=1024).attach(model)
    got = grads(model, b)
    assert all(torch.equal(got[k], want[k]) for k in want)  # bit for bit: the copies are exact
    assert off.tensors == len(saved) and off.bytes == sum(saved.values())
    assert off.reloaded == off.tensors  # each brought back once

    # the handles (and their host copies) are gone once the backward has run
    model.zero_grad(set_to_none=True)
    hidden, head, bias = decoder_forward(model, b["input_ids"], b["attention_mask"])
    handles = [r for refs in off._groups.values() for r in refs]
    assert set(range(1, LAYERS + 2)) <= set(off._groups) and all(r() is not None for r in handles)
    loss, _ = causal_lm_loss(hidden, head, b["labels"], bias=bias)
    loss.backward()
    del loss, hidden
    assert all(r() is None for r in handles)

    off.detach()  # off again: nothing more is moved
    before = off.tensors
    grads(model, b)
    assert off.tensors == before


def test_with_checkpointing_only_the_layer_inputs_leave():
    model, b = tiny_llama(), batch()
    want = grads(model, b)
    enable_checkpointing(model)
    off = ActivationOffloader(torch.device("cpu")).attach(model)
    model.zero_grad(set_to_none=True)
    hidden, head, bias = decoder_forward(model, b["input_ids"], b["attention_mask"])
    per_layer = {g: [r().host for r in off._groups.get(g, [])] for g in range(1, LAYERS + 1)}
    shape = (*b["input_ids"].shape, HIDDEN)
    assert all(len(v) == 1 and tuple(v[0].shape) == shape for v in per_layer.values()), per_layer
    loss, _ = causal_lm_loss(hidden, head, b["labels"], bias=bias)
    loss.backward()
    got = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    bounds.assert_same_gradients(got, want, num_layers=LAYERS, reduce_len=b["input_ids"].numel() + HIDDEN)


def test_memory_mode_rules_and_config_keys(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    base = {"base_model": str(model), "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "o")}

    def mode(**kw):
        return memory_mode(load_config(raw={**base, **kw}))

    assert mode() == (False, False)
    assert mode(gradient_checkpointing=True) == (True, False)
    assert mode(activation_offloading=True) == (False, True)
    assert mode(gradient_checkpointing=True, activation_offloading=True) == (True, True)
    assert mode(gradient_checkpointing="offload") == (True, True)
    assert mode(enable_activation_offloading=True) == (False, True)  # torchtune's name
    with pytest.raises(ConfigError, match="gradient_checkpointing: expected bool or 'offload'"):
        load_config(raw={**base, "gradient_checkpointing": "yes"})


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("offload")
    model = save_random_model(d / "model", hidden_size=32, num_layers=2)
    write_jsonl(instruction_rows(make_languages(), 24, 1), d / "train.jsonl")
    return {"model": model, "train": d / "train.jsonl"}


def run(assets, out: Path, **kw):
    raw = {"base_model": str(assets["model"]), "output_dir": str(out), "lora_r": 4, "lora_alpha": 8,
           "lora_dropout": 0.1, "sequence_len": 96, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
           "max_steps": 3, "learning_rate": 5e-3, "optimizer": "adamw_torch", "seed": 0, "progress_bar": False,
           "datasets": [{"path": str(assets["train"]), "type": "alpaca"}]}
    raw.update(kw)
    return train(load_config(raw=raw), quiet=True)


def curve(res):
    return [v for r in res.history for v in (r["loss"], r["grad_norm"])]


def test_trainer_with_offloading_reproduces_the_losses(assets, tmp_path):
    """Bit-identical losses and gradient norms on the CPU (dropout included), with offloading alone and with
    gradient_checkpointing: offload; the records say how much moved."""
    plain = run(assets, tmp_path / "plain")
    offloaded = run(assets, tmp_path / "off", activation_offloading=True)
    assert curve(offloaded) == curve(plain)
    both = run(assets, tmp_path / "both", gradient_checkpointing="offload")
    bounds.assert_same_training(both.history, plain.history, {}, {}, num_layers=2, reduce_len=8 * 96)
    small = [r["offloaded_mib"] for r in both.history]
    big = [r["offloaded_mib"] for r in offloaded.history]
    assert all(0 < s < b / 5 for s, b in zip(small, big))  # checkpoints only: a small part of the activations
    recs = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["offloaded_mib"] > 0 for r in recs) and "offloaded_mib" not in plain.history[0]


def test_fused_mlp_key_fuses_on_the_instance_and_trains_the_same(assets, tmp_path, capsys):
    plain = run(assets, tmp_path / "plain", lora_dropout=0.0)
    fused = train(load_config(raw={"base_model": str(assets["model"]), "output_dir": str(tmp_path / "fused"),
                                   "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "sequence_len": 96,
                                   "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3,
                                   "learning_rate": 5e-3, "optimizer": "adamw_torch", "seed": 0,
                                   "progress_bar": False, "fused_mlp": True,
                                   "datasets": [{"path": str(assets["train"]), "type": "alpaca"}]}))
    assert "fused_mlp: 2 MLPs run as one fused QLoRA Function" in capsys.readouterr().out
    bounds.assert_same_training(fused.history, plain.history, {}, {}, num_layers=2, reduce_len=8 * 96)
