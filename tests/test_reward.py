"""The reward-model objective (``objective: reward``): the loss against its formula, the config and data rules, the
sequence classifier loaded in 4 bits with a new head, training, the saved adapter reloaded by transformers + PEFT and
by load_adapter, and the eval loss against TRL's RewardTrainer + PEFT + bitsandbytes on the same bytes and rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.nn import NF4Linear, QLoraLinear
from qlora_kernels.train import ConfigError, DataError, load_config, train
from qlora_kernels.train.data import load_pairs, write_jsonl
from qlora_kernels.train.objectives.reward import RewardObjective, model_rewards, reward_loss, sequence_rewards

from .hf_tiny import tiny_tokenizer, write_bnb_checkpoint, write_tiny

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForSequenceClassification  # noqa: E402

WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "key", "hat", "bus", "egg", "fig"]


def _rows(n: int, seed: int, margin: bool = False) -> list[dict]:
    """A learnable preference: the chosen answer repeats the prompt's word reversed, the rejected one repeats it."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        w = WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]
        row = {"prompt": f"say {w} back:", "chosen": f" {w[::-1]}", "rejected": f" {w}"}
        if margin:
            row["margin"] = float(i % 3) / 2
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reward")
    write_tiny(d / "fp32")  # hidden 64: every weight row holds whole NF4 blocks (bitsandbytes' CPU decode needs it)
    write_bnb_checkpoint(d / "fp32", d / "bnb")
    write_jsonl(_rows(64, 1), d / "train.jsonl")
    write_jsonl(_rows(24, 2, margin=True), d / "eval.jsonl")
    return {"fp32": d / "fp32", "bnb": d / "bnb", "train": d / "train.jsonl", "eval": d / "eval.jsonl", "root": d}


def config(assets, out: Path, **kw):
    raw = {"base_model": str(assets["bnb"]), "output_dir": str(out), "objective": "reward",
           "datasets": [{"path": str(assets["train"]), "type": "preference"}],
           "test_datasets": [{"path": str(assets["eval"]), "type": "preference"}],
           "lora_r": 4, "lora_alpha": 8, "sequence_len": 40, "micro_batch_size": 8, "max_steps": 4,
           "learning_rate": 1e-2, "warmup_steps": 0, "lr_scheduler": "constant", "optimizer": "adamw_torch",
           "seed": 0, "progress_bar": False}
    raw.update(kw)
    return load_config(raw={k: v for k, v in raw.items() if v is not ...})  # ...: the key left out


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_is_the_bradley_terry_formula(center):
    g = torch.Generator().manual_seed(0)
    rw, rl, m = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    for margin in (None, m):
        got = reward_loss(rw, rl, margin, center)
        d = rw - rl - (0 if margin is None else margin)
        want = torch.log1p(torch.exp(-d)) + (center or 0) * (rw + rl) ** 2
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    big = reward_loss(torch.tensor([1e4, -1e4]), torch.tensor([0.0, 0.0]))  # stable far out on both sides
    assert big[0] == 0 and big[1] == pytest.approx(1e4) and torch.isfinite(big).all()
    with pytest.raises(ValueError, match=r"rewards of shape \[B\]"):
        reward_loss(torch.zeros(2, 1), torch.zeros(2, 1))


# --------------------------------------------------------------------------- config and data


def test_config_keys_and_rules(assets, tmp_path):
    cfg = config(assets, tmp_path, center_rewards_coefficient=0.01)
    assert cfg.objective == "reward" and cfg.center_rewards_coefficient == 0.01 and not cfg.is_dpo
    assert config(assets, tmp_path, objective=..., trainer="reward").objective == "reward"  # our older key name
    for kw, msg in (({"center_rewards_coefficient": -1}, "center_rewards_coefficient: must be >= 0"),
                    ({"objective": "ppo"}, "objective: 'ppo' is not allowed"),
                    ({"rl": "dpo"}, "rl: dpo contradicts objective: reward"),
                    ({"datasets": [{"path": str(assets["train"]), "type": "completion"}]},
                     "a reward model trains on preference rows"),
                    ({"objective": ..., "reward_model": True}, "set objective: reward")):
        with pytest.raises(ConfigError, match=msg):
            config(assets, tmp_path, **kw)


def test_pairs_read_margins_and_drop_long_sequences(assets, tmp_path):
    tok = tiny_tokenizer()
    _, evals, _ = load_pairs(config(assets, tmp_path), tok, too_long="drop")
    assert [p.margin for p in evals[:4]] == [0.0, 0.5, 1.0, 0.0]
    rows = [{"prompt": "p" * 30, "chosen": " long answer", "rejected": " no"}, *_rows(3, 5)]
    write_jsonl(rows, tmp_path / "long.jsonl")
    cfg = config(assets, tmp_path, datasets=[{"path": str(tmp_path / "long.jsonl"), "type": "preference"}],
                 test_datasets=[])
    kept, _, stats = load_pairs(cfg, tok, too_long="drop")
    assert len(kept) == 3 and stats.dropped_too_long == 1 and stats.truncated == 0
    assert "dropped as longer than sequence_len 1" in stats.summary()
    cut, _, stats = load_pairs(cfg, tok)  # DPO's rule: cut at the end
    assert len(cut) == 4 and stats.truncated == 1 and stats.dropped_too_long == 0  # the chosen side only
    write_jsonl([{**rows[1], "margin": "big"}], tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="'margin' must be a finite number"):
        load_pairs(config(assets, tmp_path, datasets=[{"path": str(tmp_path / "bad.jsonl"), "type": "preference"}],
                          test_datasets=[]), tok)


# --------------------------------------------------------------------------- the model


def test_sequence_classifier_loads_in_4bit_with_a_new_dense_head(assets):
    torch.manual_seed(0)
    model = qk.load_4bit_model(assets["bnb"], dtype=torch.float32, model_class=AutoModelForSequenceClassification,
                               num_labels=1)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert isinstance(model.score, torch.nn.Linear) and model.score.weight.shape == (1, 64)
    assert 0.005 < float(model.score.weight.detach().std()) < 0.05  # the model class's init (initializer_range 0.02)
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    qk.apply_qlora(model, r=4, modules_to_save=["score"])
    assert model.qlora_modules_to_save == ("score",) and model.score.weight.requires_grad
    assert not isinstance(model.score, QLoraLinear)  # all-linear leaves the head alone, as PEFT does
    x = torch.tensor([[5, 6, 7, 1, 0, 0], [5, 6, 7, 8, 9, 1]])
    r = model_rewards(model, x, (x != 0).long())
    full = model(input_ids=x).logits  # transformers' pooling: the last non-pad token of each row
    assert r.shape == (2,) and torch.equal(r, full[:, 0])
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        qk.load_4bit_model(assets["bnb"], model_class=AutoModelForSequenceClassification, num_labels=0)
    with pytest.raises(ValueError, match="matches no module"):
        qk.apply_qlora(qk.load_4bit_model(assets["bnb"]), modules_to_save=["head"])


def test_packed_pairs_give_the_padded_rewards_loss_and_gradients(assets, tmp_path):
    """sample_packing: pairs packed into rows (each sequence its own segment, position ids restarting) give the
    rewards, loss and gradients (adapters and head) of the padded pairs, up to float rounding."""
    from qlora_kernels.train.packing import check_packed_attention

    tok = tiny_tokenizer()
    pairs, _, _ = load_pairs(config(assets, tmp_path), tok, too_long="drop")
    pairs = pairs[:6]
    model = qk.load_4bit_model(assets["bnb"], dtype=torch.float32, model_class=AutoModelForSequenceClassification,
                               num_labels=1)
    qk.apply_qlora(model, r=4, modules_to_save=["score"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLoraLinear):
                m.lora_B.weight.normal_(0, 0.05)  # live adapters: their gradients depend on the path
    objective = RewardObjective(center_rewards_coefficient=0.01)
    objective.setup(model, pairs, [], 8, tok.pad_token_id, torch.device("cpu"), None, None)
    objective.packed_layout = check_packed_attention(model)
    results = []
    for batch in (objective.collate(pairs, tok.pad_token_id), objective.collate_packed([pairs[:4], pairs[4:]],
                                                                                       tok.pad_token_id)):
        model.zero_grad()
        value, sums = objective.loss(model, batch)
        value.backward()
        results.append((float(value), sums, {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    (v0, s0, g0), (v1, s1, g1) = results
    assert "base_model.model.score.weight" not in g0 and "score.weight" in g0 and len(g0) == len(g1)
    assert abs(v0 - v1) < 1e-5 * max(1.0, abs(v0)), (v0, v1)
    for k in s0:
        assert s1[k] == pytest.approx(s0[k], rel=1e-5, abs=1e-6), k
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_training_with_packed_pairs(assets, tmp_path):
    res = train(config(assets, tmp_path / "run", max_steps=2, sample_packing=True), quiet=True)
    steps = [r for r in res.history if "loss" in r]
    assert len(steps) == 2 and all(0 < r["packing_efficiency"] <= 1 and r["pairs"] > 0 for r in steps)


# --------------------------------------------------------------------------- training, saving, reloading, TRL


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    res = train(config(assets, out, max_steps=16, eval_steps=8, center_rewards_coefficient=0.01), quiet=True)
    return out, res


def test_training_raises_held_out_accuracy_and_logs_metrics(assets, trained, tmp_path):
    out, res = trained
    steps = [r for r in res.history if "loss" in r]
    assert len(steps) == 16 and all(r["pairs"] == 8 for r in steps)
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= set(steps[0])
    before = [r for r in train(config(assets, tmp_path / "zero", max_steps=1, learning_rate=1e-30), quiet=True).history
              if "eval_loss" in r][-1]
    after = [r for r in res.history if "eval_loss" in r][-1]
    assert after["eval_accuracy"] >= 0.9 and after["eval_accuracy"] > before["eval_accuracy"], (before, after)
    assert after["eval_loss"] < before["eval_loss"] and after["eval_margin"] > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]


def _ours_reloaded(assets, adapter_dir):
    model = qk.load_4bit_model(assets["bnb"], dtype=torch.float32, model_class=AutoModelForSequenceClassification,
                               num_labels=1)
    return qk.load_adapter(model, adapter_dir, is_trainable=False).eval()


def test_saved_reward_model_reloads_with_transformers_and_peft(assets, trained):
    """AutoModelForSequenceClassification + PEFT (on transformers' bitsandbytes model of the same bytes) and
    load_adapter (on ours) give the trained model's rewards: the head is in the adapter directory."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    out, _ = trained
    tok = tiny_tokenizer()
    rows = _rows(6, 9)
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    ours = _ours_reloaded(assets, out)
    assert ours.score.weight.dtype == torch.float32 and not ours.score.weight.requires_grad
    want = sequence_rewards(ours, tok, prompts, completions)
    base = AutoModelForSequenceClassification.from_pretrained(assets["bnb"], num_labels=1, dtype=torch.float32,
                                                              device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(base, out).train()  # train mode: see tests/hf_tiny.bnb_model
    enc = [tok(p + c + tok.eos_token)["input_ids"] for p, c in zip(prompts, completions)]
    width = max(map(len, enc))
    x = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc])
    got = theirs(input_ids=x, attention_mask=(x != tok.pad_token_id).long()).logits[:, 0].detach()
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)
    assert len(set(round(v, 4) for v in want)) > 1  # rewards that differ between texts: the head is not zero


def test_eval_loss_equals_trl_reward_trainer_on_bitsandbytes(assets, trained, tmp_path):
    """TRL 1.16's RewardTrainer (its tokenization, collator and compute_loss) with the saved adapter on transformers'
    bitsandbytes model of the same bytes: its loss over the eval rows equals our eval loss (fp32, 1e-5).

    TRL's loss is computed in train mode with gradients on (nothing has dropout): an eval-mode, no-grad CPU forward
    makes bitsandbytes repack its weights into another layout with bf16 constants, other numbers."""
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("bitsandbytes")
    out, res = trained
    ours = res.eval_loss
    base = AutoModelForSequenceClassification.from_pretrained(assets["bnb"], num_labels=1, dtype=torch.float32,
                                                              device_map="cpu")
    model = peft.PeftModel.from_pretrained(base, out, is_trainable=True)
    rows = [json.loads(x) for x in assets["eval"].read_text().splitlines()]
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=8, max_length=40,
                            center_rewards_coefficient=0.01, report_to=[], use_cpu=True, bf16=False,
                            dataloader_drop_last=False)
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                eval_dataset=datasets.Dataset.from_list(rows), processing_class=tiny_tokenizer())
    # TRL casts the trainable parameters of a quantized model to bf16 (the QLoRA paper's advice); ours stay fp32, as
    # PEFT keeps them: the saved fp32 values go back, so that both losses are computed in fp32
    for n, p in model.named_parameters():
        if n in fp32:
            assert p.dtype == torch.bfloat16
            p.data = fp32[n]
    model.train()
    total, pairs = 0.0, 0
    for batch in trainer.get_eval_dataloader():
        batch = trainer._prepare_inputs(batch)
        n = batch["input_ids"].shape[0] // 2
        total += float(trainer.compute_loss(model, batch)) * n
        pairs += n
    assert pairs == len(rows)
    print(f"TRL RewardTrainer eval loss {total / pairs:.8f}, ours {ours:.8f}")
    assert abs(total / pairs - ours) < 1e-5, (total / pairs, ours)
    assert "margin" in trainer.get_eval_dataloader().dataset.column_names  # TRL read the margin column too


def test_resume_is_bit_identical(assets, tmp_path):
    full = train(config(assets, tmp_path / "full", max_steps=4, save_steps=2), quiet=True)
    res = train(config(assets, tmp_path / "res", max_steps=4, save_steps=2,
                       resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")), quiet=True)
    key = lambda h: [(r["step"], r["loss"], r["margin"]) for r in h if "loss" in r]  # noqa: E731
    assert key(res.history) == [x for x in key(full.history) if x[0] > 2]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "res"))
    assert "base_model.model.score.weight" in a and all(torch.equal(a[k], b[k]) for k in a)


def test_objective_is_registered():
    from qlora_kernels.train.objectives import objective_class

    assert objective_class("reward") is RewardObjective
    with pytest.raises(ValueError, match="objective must be one of"):
        objective_class("ppo")
