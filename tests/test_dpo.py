"""DPO: the loss against its formula, chunked log-probs against full logits, preference data (preference and
hh-rlhf rows), the reference pass (adapters off, or precomputed), the step's gradient against a direct
full-logits implementation, the config keys, and training on a tiny model (held-out reward accuracy rises)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora_kernels as qk
from qlora_kernels.demo.synthetic import instruction_rows, make_languages, save_random_model
from qlora_kernels.train import ConfigError, DataError, load_config, train
from qlora_kernels.train.data import (
    DataStats,
    PreferencePair,
    collate_pairs,
    load_pairs,
    load_preference_dataset,
    split_hh_dialogue,
    write_jsonl,
)
from qlora_kernels.train.loss import model_sequence_log_probs, sequence_log_probs, token_log_probs
from qlora_kernels.train.objectives.dpo import (
    DPOSettings,
    dpo_batch_loss,
    dpo_loss,
    evaluate_dpo,
    precompute_reference_log_probs,
    reference_log_probs,
)

from . import bounds

# --------------------------------------------------------------------------- the loss against its formula


def _direct_losses(pc, pr, rc, rr, beta, loss_type, eps, nc=None, nr=None):
    """The formulas of docs/FORMATS.md ("DPO") / the IPO paper (log-ratios per completion token, as TRL computes it),
    written element by element with math (float64)."""
    out = []
    nc = nc.tolist() if nc is not None else [1] * len(pc)
    nr = nr.tolist() if nr is not None else [1] * len(pc)
    for a, b, c, d, m, n in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), nc, nr):
        h = (a - c) - (b - d)
        if loss_type == "ipo":
            out.append(((a - c) / max(m, 1) - (b - d) / max(n, 1) - 1 / (2 * beta)) ** 2)
        else:
            log_sig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
            out.append(-(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.2),
                                                ("sigmoid", 2.0, 0.45), ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0)])
def test_dpo_loss_matches_the_formula_on_random_log_probs(loss_type, beta, eps):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(64, generator=g, dtype=torch.float64) * 80 for _ in range(4))
    nc, nr = (torch.randint(0, 40, (64,), generator=g) for _ in range(2))  # 0: counts as 1
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, chosen_tokens=nc,
                                            rejected_tokens=nr)
    torch.testing.assert_close(losses.detach(), _direct_losses(pc, pr, rc, rr, beta, loss_type, eps, nc, nr),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_r, beta * (pc.detach() - rc))
    torch.testing.assert_close(rejected_r, beta * (pr.detach() - rr))
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    # gradient against the derivative written out: dL/dpc = -dL/dpr
    losses.sum().backward()
    h = (pc.detach() - rc) - (pr.detach() - rr)
    if loss_type == "ipo":
        m, n = nc.clamp(min=1).double(), nr.clamp(min=1).double()
        d = 2 * ((pc.detach() - rc) / m - (pr.detach() - rr) / n - 1 / (2 * beta))
        want_c, want_r = d / m, -d / n
    else:
        want_c = -(1 - eps) * beta * torch.sigmoid(-beta * h) + eps * beta * torch.sigmoid(beta * h)
        want_r = -want_c
    torch.testing.assert_close(pc.grad, want_c, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pr.grad, want_r, rtol=1e-10, atol=1e-12)


def _trl_ipo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, completion_mask, beta):
    """TRL 1.16's DPOTrainer loss for loss_type="ipo" (f_divergence reverse_kl), as its code computes it from
    sequence log-probs and the [2B, T] completion mask of the chosen-then-rejected batch."""
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
    chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
    rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
    return (chosen_avg_score - rejected_avg_score - 1 / (2 * beta)) ** 2


def test_ipo_averages_log_ratios_per_completion_token_as_trl_does():
    g = torch.Generator().manual_seed(3)
    B, T, beta = 6, 30, 0.3
    lengths = torch.tensor([1, 3, 7, 12, 20, 29, 2, 5, 9, 15, 25, 28])  # completion tokens, chosen then rejected
    completion_mask = (torch.arange(T)[None, :] >= T - lengths[:, None]).long()
    pol, ref = (-torch.rand(2 * B, generator=g, dtype=torch.float64) * lengths for _ in range(2))
    ours, _, _ = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta, "ipo", chosen_tokens=lengths[:B],
                          rejected_tokens=lengths[B:])
    trl = _trl_ipo_losses(pol[:B], pol[B:], ref[:B], ref[B:], completion_mask, beta)
    torch.testing.assert_close(ours, trl, rtol=1e-12, atol=1e-12)
    summed = ((pol[:B] - ref[:B]) - (pol[B:] - ref[B:]) - 1 / (2 * beta)) ** 2  # what ipo computed before
    assert not torch.allclose(ours, summed)
    with pytest.raises(ValueError, match="ipo' needs chosen_tokens and rejected_tokens"):
        dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta, "ipo")


def test_dpo_loss_is_log2_when_policy_equals_reference_and_stable_for_large_margins():
    x = torch.randn(5)
    losses, _, _ = dpo_loss(x, x + 1, x, x + 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2.0)))
    big = torch.tensor([1e4, -1e4])
    losses, _, _ = dpo_loss(big, -big, torch.zeros(2), torch.zeros(2), beta=1.0)
    assert torch.isfinite(losses).all() and losses[0] == 0 and losses[1] == pytest.approx(2e4)


@pytest.mark.parametrize("kw,msg", [({"loss_type": "hinge"}, "loss_type"), ({"beta": 0.0}, "beta"),
                                    ({"label_smoothing": 0.5}, "label_smoothing")])
def test_dpo_loss_rejects_bad_arguments(kw, msg):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=msg):
        dpo_loss(x, x, x, x, **kw)


# --------------------------------------------------------------------------- chunked log-probs


def _full_token_log_probs(h, w, b, y):
    logits = h.float() @ w.float().t() + (b.float() if b is not None else 0)
    return torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_log_probs_match_full_logits_values_and_grads(chunk, with_bias):
    N, H, V = 37, 16, 101  # odd sizes: the last chunk is partial
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64)
    b = torch.randn(V, dtype=torch.float64) if with_bias else None
    y = torch.randint(0, V, (N,))
    up = torch.randn(N, dtype=torch.float64)
    got = token_log_probs(h, w, y, bias=b, chunk_size=chunk)
    (gh,) = torch.autograd.grad((got * up).sum(), h)
    want = _full_token_log_probs(h, w, b, y)
    (wh,) = torch.autograd.grad((want * up).sum(), h)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, wh, rtol=1e-5, atol=1e-6)


def test_token_log_probs_module_head_and_trainable_weight_are_chunked_and_exact():
    N, H, V, chunk = 29, 8, 53, 6
    head = nn.Linear(H, V, bias=True).double()
    rows_seen: list[int] = []
    head.register_forward_hook(lambda m, inp, out: rows_seen.append(inp[0].shape[0]))
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    got = token_log_probs(h, head, y, chunk_size=chunk)
    got.sum().backward()
    assert rows_seen and max(rows_seen) <= chunk  # never the whole batch at once
    gh, gw = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    want = torch.log_softmax(F.linear(h, head.weight, head.bias), -1).gather(1, y[:, None]).squeeze(1)
    want.sum().backward()
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, head.weight.grad)
    # a weight tensor that requires grad takes the checkpointed path and gets its gradient
    w = head.weight.detach().clone().requires_grad_(True)
    token_log_probs(h.detach(), w, y, bias=head.bias.detach(), chunk_size=chunk).sum().backward()
    torch.testing.assert_close(w.grad, head.weight.grad)


def test_sequence_log_probs_sum_only_target_tokens():
    B, T, H, V = 3, 9, 8, 31
    hidden = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[2, :] = -100  # nothing to score
    got, n = sequence_log_probs(hidden, w, labels, chunk_size=4)
    lp = torch.log_softmax(hidden[:, :-1] @ w.t(), -1)
    tgt = labels[:, 1:]
    want = (lp.gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt != -100)).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert n.tolist() == [(tgt[i] != -100).sum().item() for i in range(B)]
    assert got[2] == 0


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dpo")
    model = save_random_model(d / "model", hidden_size=32, num_layers=2)
    langs = make_languages()
    for name, n, seed in (("train", 96, 1), ("eval", 32, 2)):
        write_jsonl(preference_rows(instruction_rows(langs, n, seed)), d / f"{name}.jsonl")
    return {"model": model, "train": d / "train.jsonl", "eval": d / "eval.jsonl", "root": d}


def preference_rows(rows: list[dict]) -> list[dict]:
    """A learnable preference: the chosen answer is the translation, the rejected one copies the input."""
    return [{"prompt": f"{r['instruction']} {r['input']} =", "chosen": f" {r['output']}", "rejected": f" {r['input']}"}
            for r in rows]


def config(assets, out: Path, **kw):
    raw = {"base_model": str(assets["model"]), "output_dir": str(out), "rl": "dpo",
           "datasets": [{"path": str(assets["train"]), "type": "preference"}],
           "test_datasets": [{"path": str(assets["eval"]), "type": "preference"}],
           "lora_r": 8, "lora_alpha": 16, "sequence_len": 64, "micro_batch_size": 8, "gradient_accumulation_steps": 1,
           "max_steps": 4, "learning_rate": 5e-3, "warmup_steps": 0, "lr_scheduler": "constant",
           "optimizer": "adamw_torch", "eval_steps": None, "seed": 0, "progress_bar": False}
    raw.update(kw)
    return load_config(raw=raw)


@pytest.fixture(scope="module")
def tokenizer(assets):
    from qlora_kernels.train.components import load_tokenizer

    return load_tokenizer(config(assets, assets["root"] / "unused"))


def test_split_hh_dialogue_takes_the_shared_prefix_up_to_the_last_assistant_turn():
    pre = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
    p, c, r = split_hh_dialogue(pre + " It is 4.", pre + " It is 5.")  # answers share " It is "
    assert (p, c, r) == (pre, " It is 4.", " It is 5.")
    p, c, r = split_hh_dialogue(pre + " 4", pre + " 4")  # identical dialogues
    assert p == pre and c == r == " 4"
    with pytest.raises(ValueError, match="share no"):
        split_hh_dialogue("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: b")
    # a marker inside only one answer is not part of the prompt
    p, _, _ = split_hh_dialogue(pre + " x\n\nAssistant: y", pre + " z")
    assert p == pre


def test_preference_rows_tokenize_with_prompt_masked_and_eos_trained(assets, tokenizer, tmp_path):
    path = write_jsonl([{"prompt": "Translate into Zil. kadu zutu =", "chosen": " li todomi",
                               "rejected": " kadu zutu"}], tmp_path / "p.jsonl")
    cfg = config(assets, tmp_path / "o", datasets=[{"path": str(path), "type": "preference"}], test_datasets=[])
    stats = DataStats()
    (pair,) = load_preference_dataset(cfg.datasets[0], cfg, tokenizer, stats)
    for ex, completion in ((pair.chosen, " li todomi"), (pair.rejected, " kadu zutu")):
        trained = [t for t in ex.labels if t != -100]
        assert trained[-1] == tokenizer.eos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(trained[:-1]) == completion
        prompt_ids = tokenizer("Translate into Zil. kadu zutu =")["input_ids"]
        assert ex.input_ids[:len(prompt_ids)] == prompt_ids and all(t == -100 for t in ex.labels[:len(prompt_ids)])
    assert stats.examples == 1 and stats.rows == 1


def test_hh_rlhf_rows_load(assets, tokenizer, tmp_path):
    pre = "\n\nHuman: Translate kadu zutu\n\nAssistant:"
    path = write_jsonl([{"chosen": pre + " li todomi", "rejected": pre + " kadu"}], tmp_path / "hh.jsonl")
    cfg = config(assets, tmp_path / "o", datasets=[{"path": str(path), "type": "hh-rlhf"}], test_datasets=[])
    (pair,) = load_preference_dataset(cfg.datasets[0], cfg, tokenizer, DataStats())
    assert tokenizer.decode([t for t in pair.chosen.labels if t != -100][:-1]) == " li todomi"
    assert tokenizer.decode([t for t in pair.rejected.labels if t != -100][:-1]) == " kadu"


def test_bad_rows_fail_or_are_skipped_and_long_rows_are_truncated(assets, tokenizer, tmp_path):
    rows = [{"prompt": "a =", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": 3, "rejected": "x"},
            {"prompt": "a " * 200, "chosen": " b", "rejected": " c"},  # prompt alone is longer than sequence_len
            {"prompt": "a =", "chosen": " b" * 100, "rejected": " c"}]  # chosen is cut
    path = write_jsonl(rows, tmp_path / "bad.jsonl")
    cfg = config(assets, tmp_path / "o", datasets=[{"path": str(path), "type": "preference"}], test_datasets=[])
    with pytest.raises(DataError, match=r"bad.jsonl:2: preference row needs a string 'chosen'"):
        load_preference_dataset(cfg.datasets[0], cfg, tokenizer, DataStats())
    cfg = config(assets, tmp_path / "o", datasets=[{"path": str(path), "type": "preference"}], test_datasets=[],
                 skip_bad_rows=True)
    stats = DataStats()
    pairs = load_preference_dataset(cfg.datasets[0], cfg, tokenizer, stats)
    assert len(pairs) == 2 and stats.skipped_bad_rows == 1 and stats.dropped_no_target == 1
    assert stats.truncated == 3 and all(len(p.chosen.input_ids) <= 64 for p in pairs)
    hh = write_jsonl([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no dialogue"}],
                           tmp_path / "h.jsonl")
    cfg = config(assets, tmp_path / "o", datasets=[{"path": str(hh), "type": "hh-rlhf"}], test_datasets=[])
    with pytest.raises(DataError, match="share no"):
        load_preference_dataset(cfg.datasets[0], cfg, tokenizer, DataStats())


def test_collate_pairs_puts_chosen_then_rejected_in_one_batch(assets, tokenizer):
    cfg = config(assets, assets["root"] / "o")
    train_pairs, eval_pairs, _ = load_pairs(cfg, tokenizer)
    assert len(train_pairs) == 96 and len(eval_pairs) == 32
    pairs = train_pairs[:3]
    b = collate_pairs(pairs, tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 6 and "ref_logps" not in b and b["pair_weight"].tolist() == [1.0] * 3
    for i, p in enumerate(pairs):
        assert b["input_ids"][i, :len(p.chosen.input_ids)].tolist() == p.chosen.input_ids
        assert b["input_ids"][3 + i, :len(p.rejected.input_ids)].tolist() == p.rejected.input_ids
    for p in pairs:
        p.ref_chosen, p.ref_rejected = -1.0, -2.0
    b = collate_pairs(pairs, tokenizer.pad_token_id, counted=False)
    assert b["ref_logps"].tolist() == [-1.0] * 3 + [-2.0] * 3 and b["pair_weight"].sum() == 0


def test_config_keys_and_rules(assets, tmp_path):
    cfg = config(assets, tmp_path, trainer="dpo", rl=None, dpo_loss="ipo", dpo_beta=0.3)
    assert cfg.is_dpo and cfg.dpo_loss == "ipo"
    assert not config(assets, tmp_path, rl=None, datasets=[{"path": str(assets["train"]), "type": "completion"}],
                      test_datasets=[]).is_dpo
    for kw, msg in (({"dpo_loss": "hinge"}, "dpo_loss: 'hinge' is not allowed"),
                    ({"dpo_beta": 0}, "dpo_beta: must be > 0"),
                    ({"dpo_label_smoothing": 0.5}, r"dpo_label_smoothing: must be in \[0, 0.5\)"),
                    ({"dpo_loss": "ipo", "dpo_label_smoothing": 0.1}, "applies to dpo_loss 'sigmoid' only"),
                    ({"rl": "dpo", "trainer": "sft"}, "contradicts"),
                    ({"datasets": [{"path": str(assets["train"]), "type": "alpaca"}]}, "DPO trains on preference"),
                    ({"rl": None}, "are for DPO or a reward model; set objective: dpo")):
        with pytest.raises(ConfigError, match=msg):
            config(assets, tmp_path, **kw)


# --------------------------------------------------------------------------- model-level pieces


@pytest.fixture()
def qlora_model(assets):
    from qlora_kernels.train.components import build_model

    torch.manual_seed(0)
    model = build_model(config(assets, assets["root"] / "m"), torch.device("cpu"))
    with torch.no_grad():  # a non-zero adapter, so that policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _direct_sequence_log_probs(model, batch):
    """Full-vocabulary logits through the model's own forward (what the chunked path must equal)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt = batch["labels"][:, 1:]
    return (lp.gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt != -100)).sum(1)


def test_dpo_step_matches_a_direct_full_logits_implementation(assets, tokenizer, qlora_model):
    from qlora_kernels.hf import adapters_disabled

    model = qlora_model
    pairs, _, _ = load_pairs(config(assets, assets["root"] / "o"), tokenizer)
    batch = collate_pairs(pairs[:5], tokenizer.pad_token_id)
    model.lm_head.forward = None  # the chunked path never runs the full-vocabulary head  # type: ignore[assignment]
    try:
        settings = DPOSettings(beta=0.2, chunk_size=16)
        loss, sums = dpo_batch_loss(model, batch, settings)
        loss.backward()
    finally:
        del model.lm_head.forward
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    with torch.no_grad(), adapters_disabled(model):
        ref = _direct_sequence_log_probs(model, batch)
    pol = _direct_sequence_log_probs(model, batch)
    h = (pol[:5] - ref[:5]) - (pol[5:] - ref[5:])
    want_loss = -F.logsigmoid(0.2 * h).sum()
    want_loss.backward()
    # chunked log-probs vs full logits: two forwards of a 2-layer model that round differently; a log-prob is a sum
    # of negative terms, the loss beta times differences of four of them (its scale: beta times their |sum|)
    rho = bounds.training_rounding(2, batch["input_ids"].numel())[0]
    lp = (pol.detach().abs() + ref.abs())
    bounds.assert_within("loss", float(loss.detach()), float(want_loss.detach()), rho * 0.2 * float(lp.sum()),
                         why=f"rho_forward {rho:.3g} x beta sum(|policy| + |reference| log-probs)")
    assert sums["pairs"] == 5
    rc, rr = 0.2 * (pol[:5] - ref[:5]).detach(), 0.2 * (pol[5:] - ref[5:]).detach()
    bounds.assert_within("rewards/chosen", sums["rewards/chosen"], float(rc.sum()), rho * 0.2 * float(lp[:5].sum()),
                         why="rho_forward x beta sum(|log-probs|) of the chosen")
    assert sums["rewards/accuracies"] == float((rc > rr).sum())
    bounds.assert_within("logps/rejected", sums["logps/rejected"], float(pol[5:].sum()),
                         rho * float(pol[5:].detach().abs().sum()), why="rho_forward x |log-prob sum|")
    assert any(g.abs().sum() > 0 for g in got.values())
    bounds.assert_same_gradients(got, {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                                 num_layers=2, reduce_len=batch["input_ids"].numel())


def test_ipo_step_matches_trl_on_the_models_log_probs(assets, tokenizer, qlora_model):
    from qlora_kernels.hf import adapters_disabled

    model = qlora_model
    pairs, _, _ = load_pairs(config(assets, assets["root"] / "o"), tokenizer)
    batch = collate_pairs(pairs[:5], tokenizer.pad_token_id)
    with torch.no_grad():
        loss, _ = dpo_batch_loss(model, batch, DPOSettings(beta=0.2, loss_type="ipo", chunk_size=16))
        with adapters_disabled(model):
            ref = _direct_sequence_log_probs(model, batch)
        pol = _direct_sequence_log_probs(model, batch)
    completion_mask = (batch["labels"] != -100).long()  # TRL's mask: the completion tokens of each sequence
    assert len(set(completion_mask.sum(1).tolist())) > 1  # completions of different lengths
    want = _trl_ipo_losses(pol[:5], pol[5:], ref[:5], ref[5:], completion_mask, 0.2).sum()
    # d/dh (h - tau)^2 = 2 (h - tau); each averaged log-ratio h within rho of its four averaged |log-probs|
    rho = bounds.training_rounding(2, batch["input_ids"].numel())[0]
    n_c, n_r = (m.sum(1).clamp(min=1) for m in completion_mask.chunk(2))
    dh = rho * ((pol[:5].abs() + ref[:5].abs()) / n_c + (pol[5:].abs() + ref[5:].abs()) / n_r)
    slope = 2 * _trl_ipo_losses(pol[:5], pol[5:], ref[:5], ref[5:], completion_mask, 0.2).sqrt()
    bounds.assert_within("ipo loss", float(loss), float(want), float((slope * dh + dh**2).sum()),
                         why="sum 2 |h - tau| dh + dh^2, dh = rho_forward x the averaged |log-probs|")


def test_reference_is_the_model_with_adapters_off_and_precompute_caches_it(assets, tokenizer, qlora_model):
    model = qlora_model
    pairs, _, _ = load_pairs(config(assets, assets["root"] / "o"), tokenizer)
    pairs = pairs[:6]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref = reference_log_probs(model, batch)
    policy = model_sequence_log_probs(model, *args)
    assert not torch.allclose(ref, policy)  # the adapter is non-zero
    for p in model.modules():  # zero the adapters: the policy becomes the reference
        if isinstance(p, qk.QLoraLinear):
            nn.init.zeros_(p.lora_B.weight)
    torch.testing.assert_close(model_sequence_log_probs(model, *args), ref)
    precompute_reference_log_probs(model, pairs, 4, tokenizer.pad_token_id, torch.device("cpu"), None)
    cached = collate_pairs(pairs, tokenizer.pad_token_id)["ref_logps"]
    rho = bounds.training_rounding(2, batch["input_ids"].numel())[0]  # another padding width: another order
    bounds.assert_within("precomputed reference log-probs", cached, ref, rho * ref.abs(),
                         why=f"rho_forward {rho:.3g} x |log-prob|")
    # with cached values the step runs no reference forward: poison the reference and get the same loss
    settings = DPOSettings()
    a, _ = dpo_batch_loss(model, {**batch, "ref_logps": cached}, settings)
    b, _ = dpo_batch_loss(model, batch, settings)
    assert float(a) == pytest.approx(float(b), rel=1e-5) == pytest.approx(6 * math.log(2), rel=1e-5)


def test_evaluate_dpo_reports_all_metrics(assets, tokenizer, qlora_model):
    _, eval_pairs, _ = load_pairs(config(assets, assets["root"] / "o"), tokenizer)
    m = evaluate_dpo(qlora_model, eval_pairs, 16, tokenizer.pad_token_id, torch.device("cpu"), None, DPOSettings())
    assert set(m) == {"eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins",
                      "eval_rewards/accuracies", "eval_logps/chosen", "eval_logps/rejected"}
    assert m["eval_rewards/margins"] == pytest.approx(m["eval_rewards/chosen"] - m["eval_rewards/rejected"], abs=1e-6)
    assert 0 <= m["eval_rewards/accuracies"] <= 1 and m["eval_loss"] > 0


# --------------------------------------------------------------------------- training


def _evals(history):
    return [r for r in history if "eval_loss" in r]


@pytest.mark.parametrize("kw", [{}, {"precompute_ref_log_probs": True, "dpo_loss": "ipo", "dpo_beta": 0.5,
                                     "gradient_accumulation_steps": 2, "micro_batch_size": 4},
                                {"trainer": "dpo", "rl": None, "dpo_label_smoothing": 0.1,
                                 "gradient_checkpointing": True}],
                         ids=["sigmoid", "ipo-precomputed-accumulated", "smoothed-checkpointed"])
def test_dpo_training_raises_held_out_reward_accuracy(assets, tmp_path, kw):
    out = tmp_path / "run"
    res = train(config(assets, out, max_steps=24, eval_steps=12, **kw), quiet=True)
    assert res.global_step == 24
    evals = _evals(res.history)
    assert [r["step"] for r in evals] == [12, 24]
    steps = [r for r in res.history if "loss" in r]
    assert all(r["pairs"] == 8 for r in steps)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(steps[0])
    # step 1 runs with B = 0: the policy is the reference, so the rewards are 0 and the accuracy is 0
    assert steps[0]["rewards/accuracies"] == 0 and steps[0]["rewards/margins"] == 0
    if kw.get("dpo_loss") != "ipo":  # h = 0: -log sigmoid(0) = log 2, with or without label smoothing
        assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    else:  # (0 - 1/(2 beta))^2
        assert steps[0]["loss"] == pytest.approx(1.0, rel=1e-5)
    first = train(config(assets, tmp_path / "zero", max_steps=1, learning_rate=1e-30, eval_steps=1, **kw),
                  quiet=True)
    before = _evals(first.history)[-1]
    after = evals[-1]
    assert after["eval_rewards/accuracies"] >= 0.9 > before["eval_rewards/accuracies"] + 0.3, (before, after)
    assert after["eval_rewards/margins"] > 0 and after["eval_loss"] < before["eval_loss"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracies" in r for r in recs)
    assert (out / "adapter_model.safetensors").is_file()


def test_dpo_resume_is_bit_identical(assets, tmp_path):
    full = train(config(assets, tmp_path / "full", max_steps=4, save_steps=2), quiet=True)
    res = train(config(assets, tmp_path / "res", max_steps=4, save_steps=2,
                       resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")), quiet=True)
    key = lambda h: [(r["step"], r["loss"], r["rewards/margins"]) for r in h if "loss" in r]  # noqa: E731
    assert key(res.history) == [x for x in key(full.history) if x[0] > 2]


def test_preference_pair_source_names_the_row(assets, tokenizer):
    pairs, _, _ = load_pairs(config(assets, assets["root"] / "o"), tokenizer)
    assert isinstance(pairs[0], PreferencePair) and pairs[0].source.startswith(str(assets["train"]) + ":")


# --------------------------------------------------------------------------- the demo's DPO stage


def test_demo_dpo_and_grpo_stages_teach_and_keep_the_translations(tmp_path):
    from qlora_kernels.demo.run import DPO_STEPS, GRPO_STEPS, run_demo

    res = run_demo(tmp_path / "demo", eval_rows=20, quiet=True, progress_bar=False)  # the demo as shipped
    dpo = res["dpo"]
    assert dpo["steps"] == DPO_STEPS and dpo["style_before"] == 0.0, dpo
    assert dpo["style_after"] >= 0.6, dpo  # the renamed noun, on held-out prompts that need it
    assert dpo["other_after"] >= dpo["other_before"] - 0.05, dpo  # the other translations stay right
    assert dpo["reward_accuracy_after"] >= 0.6 and dpo["eval_loss_after"] < dpo["eval_loss_before"] - 0.1, dpo
    assert (tmp_path / "demo" / "dpo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "sft_merged" / "config.json").is_file()
    assert json.loads((tmp_path / "demo" / "demo_result.json").read_text())["dpo"]["steps"] == DPO_STEPS
    # exported as merged16 and reloaded by plain transformers: the same house-style exact match (fp32)
    assert dpo["exported"]["style"] == dpo["style_after"], dpo
    assert (tmp_path / "demo" / "dpo_merged16" / "model.safetensors").is_file()
    grpo = res["grpo"]  # online RL: exact translations sampled at temperature 2 become more frequent
    assert grpo["steps"] == GRPO_STEPS and grpo["reward_after"] >= grpo["reward_before"] + 0.05, grpo
    assert grpo["greedy_after"] >= grpo["greedy_before"] - 0.05, grpo  # and greedy translations stay right
    assert (tmp_path / "demo" / "grpo" / "adapter_model.safetensors").is_file()
