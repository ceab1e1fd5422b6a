"""The GRPO objective (``objective: grpo``): advantages and token losses against their formulas, the config rules,
the loss and adapter gradients of fixed completions against TRL's GRPOTrainer (PEFT + bitsandbytes, same bytes) for
each loss_type, training (rollouts through generation.py, rewards from a Python function and from a reward model),
a bit-identical resume with a generation batch spanning steps, and TRL's own GRPOTrainer on our model via PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.train import ConfigError, load_config, train
from qlora_kernels.train.data import write_jsonl
from qlora_kernels.train.objectives.grpo import (
    GRPOObjective,
    GRPOSettings,
    completion_batch,
    group_advantages,
    grpo_token_losses,
    load_reward_function,
    score,
)

from .hf_tiny import bnb_model, randomize_lora_b, tiny_tokenizer, write_bnb_checkpoint, write_tiny

REWARDS = '''
def count_a(prompts, completions, **columns):
    """The share of 'a' in a completion."""
    return [c.count("a") / max(1, len(c)) for c in completions]


def low_ids(prompts, completions, completion_ids, **columns):
    """The share of a completion's tokens with ids below 48 (about half of the vocabulary)."""
    return [sum(t < 48 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def says_word(prompts, completions, word, **columns):
    """1 when the completion holds the row's word, None for rows without one."""
    return [None if w is None else float(w in c) for c, w in zip(completions, word)]


def wrong_length(prompts, completions, **columns):
    return [0.0]
'''
WORDS = ["cat", "dog", "sun", "map"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("grpo")
    write_tiny(d / "fp32")  # hidden 64: whole NF4 blocks per row (bitsandbytes' CPU decode needs it)
    write_bnb_checkpoint(d / "fp32", d / "bnb")
    (d / "rewards.py").write_text(REWARDS)
    write_jsonl([{"prompt": f"say {w}:", "word": w} for w in WORDS * 4], d / "train.jsonl")
    write_jsonl([{"prompt": f"say {w}:", "word": w} for w in WORDS], d / "eval.jsonl")
    return {"fp32": d / "fp32", "bnb": d / "bnb", "train": d / "train.jsonl", "eval": d / "eval.jsonl",
            "rewards": d / "rewards.py", "root": d}


def config(assets, out: Path, **kw):
    raw = {"base_model": str(assets["bnb"]), "output_dir": str(out), "objective": "grpo",
           "datasets": [{"path": str(assets["train"]), "type": "prompt"}],
           "test_datasets": [{"path": str(assets["eval"]), "type": "prompt"}],
           "reward_funcs": [f"{assets['rewards']}:count_a"], "num_generations": 4, "max_completion_length": 8,
           "lora_r": 4, "lora_alpha": 8, "sequence_len": 32, "micro_batch_size": 8, "gradient_accumulation_steps": 2,
           "max_steps": 4, "learning_rate": 5e-3, "warmup_steps": 0, "lr_scheduler": "constant",
           "optimizer": "adamw_torch", "seed": 0, "progress_bar": False}
    raw.update(kw)
    return load_config(raw={k: v for k, v in raw.items() if v is not ...})  # ...: the key left out


# --------------------------------------------------------------------------- formulas


def test_group_advantages_follow_trl_formula():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=g)
    r[5] = float("nan")  # unscored: left out of its group's mean and std, advantage 0
    for scale in ("group", "batch", "none"):
        got, _ = group_advantages(r, 4, scale)
        grouped = r.view(-1, 4)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(4)
        std = nanstd(grouped, dim=1).repeat_interleave(4) if scale != "batch" else nanstd(r).expand_as(r)
        want = r - mean if scale == "none" else (r - mean) / (std + 1e-4)
        torch.testing.assert_close(got, torch.nan_to_num(want, nan=0.0), rtol=1e-6, atol=1e-6)
        assert got[5] == 0
    same, _ = group_advantages(torch.ones(8), 4)
    assert torch.equal(same, torch.zeros(8))  # a group whose rewards agree teaches nothing
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.ones(6), 4)


def test_token_losses_are_the_clipped_surrogate_plus_k3():
    g = torch.Generator().manual_seed(1)
    logp, old, ref = (torch.randn(20, generator=g, dtype=torch.float64) * 0.3 - 2 for _ in range(3))
    adv = torch.randn(20, generator=g, dtype=torch.float64)
    ratio = (logp - old).exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
    k3 = (ref - logp).exp() - (ref - logp) - 1
    got, kl, clipped = grpo_token_losses(logp, old, adv, 0.2, 0.28, 0.04, ref, bias_correction_kl=False)
    torch.testing.assert_close(got, -surrogate + 0.04 * k3, rtol=1e-12, atol=1e-12)
    got, kl, clipped = grpo_token_losses(logp, old, adv, 0.2, 0.28, 0.04, ref)
    torch.testing.assert_close(got, -surrogate + 0.04 * k3 * ratio, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, k3)
    assert torch.equal(clipped, ((ratio < 0.8) & (adv < 0)) | ((ratio > 1.28) & (adv > 0))) and clipped.any()
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        grpo_token_losses(logp, old, adv, beta=0.1)


def test_reward_functions_load_and_their_errors_name_them(assets):
    f = load_reward_function(f"{assets['rewards']}:says_word")
    got = score([f], ["says_word"], ["p"] * 3, ["a cat", "dog", "x"], [[1], [2], [3]], {"word": ["cat", "cat", None]})
    assert got[:, 0].tolist()[:2] == [1.0, 0.0] and math.isnan(got[2, 0])
    with pytest.raises(ValueError, match="returned 1 values for 3 completions"):
        score([load_reward_function(f"{assets['rewards']}:wrong_length")], ["wrong_length"], ["p"] * 3, ["a"] * 3,
              [[1]] * 3, {})
    for spec, msg in (("nocolon", "expected 'module:function'"), ("no_such_module_xyz:f", "cannot import"),
                      (f"{assets['rewards']}:nothing", "has no callable 'nothing'"), ("missing.py:f", "no file")):
        with pytest.raises(ValueError, match=msg):
            load_reward_function(spec)


def test_config_keys_and_rules(assets, tmp_path):
    cfg = config(assets, tmp_path, beta=0.04, loss_type="grpo", epsilon_high=0.28)
    assert (cfg.objective, cfg.beta, cfg.loss_type, cfg.dpo_beta) == ("grpo", 0.04, "grpo", 0.1)  # TRL GRPOConfig's
    assert config(assets, tmp_path, objective=..., rl="grpo").objective == "grpo"  # Axolotl's rl: grpo
    assert "dpo_beta" not in cfg.to_dict() and "beta" in cfg.to_dict()  # config.yaml holds the run's keys only
    for kw, msg in (({"reward_funcs": []}, "needs at least one reward"),
                    ({"reward_weights": [1.0, 2.0]}, "2 weights for 1 reward_funcs"),
                    ({"num_generations": 3}, "must be whole groups of num_generations = 3"),
                    ({"max_completion_length": 32}, "leaves no room for a prompt"),
                    ({"loss_type": "sigmoid"}, "loss_type: 'sigmoid' is not allowed"),
                    ({"num_generations": 1}, "num_generations: must be >= 2"),
                    ({"datasets": [{"path": str(assets["train"]), "type": "completion"}]}, "GRPO reads prompt rows"),
                    ({"reward_funcs": [f"{assets['rewards']}:nothing"]}, r"reward_funcs\[0\]: .*no callable")):
        with pytest.raises(ConfigError, match=msg):
            train(config(assets, tmp_path / "x", **kw), quiet=True) if "reward_funcs" in kw and kw["reward_funcs"] \
                else config(assets, tmp_path, **kw)


# --------------------------------------------------------------------------- equality with TRL's GRPOTrainer


PROMPTS = ["say cat:", "say dog:"]  # the same token length: no left padding in TRL's forward (see grpo.py)
COMPLETIONS = [[5, 6, 1], [7, 8, 9, 10, 11, 12], [13, 1], [14, 15, 16, 17],
               [18, 19, 20, 1], [21], [22, 23, 24, 25, 26, 27, 28, 29], [30, 31, 1]]
REWARD_VALUES = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 1.0, 0.75, 0.1])


@pytest.fixture(scope="module")
def adapter(assets, tmp_path_factory):
    """A non-zero LoRA adapter on the 4-bit base, saved in PEFT's format."""
    torch.manual_seed(0)
    model = qk.apply_qlora(qk.load_4bit_model(assets["bnb"], dtype=torch.float32), r=4, lora_alpha=8)
    randomize_lora_b(model, std=0.2)
    out = tmp_path_factory.mktemp("adapter")
    qk.save_adapter(model, out)
    return out


def _trl_loss_and_grads(assets, adapter, tmp_path, loss_type, beta, prompt_ids, advantages):
    import datasets
    import peft
    import trl

    model = peft.PeftModel.from_pretrained(bnb_model(assets["bnb"]), adapter, is_trainable=True)
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=8, beta=beta, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28,
                          report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                              args=args, train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                              processing_class=tiny_tokenizer())
    for n, p in model.named_parameters():  # TRL casts a quantized model's adapters to bf16; ours are fp32 (see
        if n in fp32:                      # tests/test_reward.py): put the fp32 values back
            p.data = fp32[n]
    model.train()
    comp = torch.zeros(8, 8, dtype=torch.long)
    cmask = torch.zeros(8, 8, dtype=torch.long)
    for i, c in enumerate(COMPLETIONS):
        comp[i, :len(c)] = torch.tensor(c)
        cmask[i, :len(c)] = 1
    pids = torch.tensor([prompt_ids[i // 4] for i in range(8)])
    inputs = {"prompt_ids": pids, "prompt_mask": torch.ones_like(pids), "completion_ids": comp,
              "completion_mask": cmask, "advantages": advantages, "num_items_in_batch": cmask.sum()}
    if beta:
        with torch.no_grad(), model.disable_adapter():
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                model, torch.cat([pids, comp], 1), torch.cat([inputs["prompt_mask"], cmask], 1), comp.shape[1])
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets: one micro-batch a step
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradients_equal_trl_for_fixed_completions(assets, adapter, tmp_path, loss_type, beta):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    tok = tiny_tokenizer()
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == 1
    advantages, _ = group_advantages(REWARD_VALUES, 4)
    want_loss, want = _trl_loss_and_grads(assets, adapter, tmp_path, loss_type, beta, prompt_ids, advantages)

    model = qk.load_adapter(qk.load_4bit_model(assets["bnb"], dtype=torch.float32), adapter).train()
    settings = GRPOSettings(num_generations=4, max_completion_length=8, beta=beta, epsilon=0.2, epsilon_high=0.28,
                            loss_type=loss_type, micro_batch_size=8)
    objective = GRPOObjective(settings, ["r:f"], None)
    batch = completion_batch([prompt_ids[i // 4] for i in range(8)], COMPLETIONS, advantages, [True] * 8,
                             tok.pad_token_id)
    objective._add_reference_log_probs(model, batch)
    value, _ = objective.loss(model, batch)
    loss = value / objective.count(batch)  # the loop's normalization for one micro-batch, one rank
    loss.backward()
    assert abs(float(loss) - want_loss) < 1e-5, (float(loss), want_loss)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 1e-4 for g in got.values())  # the gradients are not all zero


# --------------------------------------------------------------------------- training


def test_training_runs_rollouts_and_logs_trl_metrics(assets, tmp_path):
    """The loop with an online stage: every step generates, scores and trains; the metrics carry TRL's names; the eval
    is the mean reward of sampled held-out completions (that training raises it: the demo's GRPO stage, tested in
    tests/test_dpo.py, on a model that knows its task)."""
    res = train(config(assets, tmp_path / "run", max_steps=4, eval_steps=2, beta=0.04,
                       reward_funcs=[f"{assets['rewards']}:low_ids"]), quiet=True)
    steps = [r for r in res.history if "loss" in r]
    keys = {"reward", "reward_std", "rewards/low_ids/mean", "rewards/low_ids/std", "kl", "clip_ratio",
            "completions/mean_length", "completions/max_length", "completions/clipped_ratio", "rollout_tokens_per_s"}
    assert len(steps) == 4 and keys <= set(steps[0]) and steps[0]["kl"] == 0.0 < steps[-1]["kl"]
    assert all(0 <= r["reward"] <= 1 and r["completions/max_length"] <= 8 for r in steps)
    evals = [r for r in res.history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_loss"] == -r["eval_reward"] for r in evals)
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    from safetensors.torch import load_file

    assert any(float(t.abs().max()) > 0 for k, t in load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
               .items() if "lora_B" in k)  # the adapters moved


def test_resume_is_bit_identical_with_a_generation_batch_spanning_steps(assets, tmp_path):
    kw = dict(max_steps=4, save_steps=1, steps_per_generation=4, num_iterations=2, gradient_accumulation_steps=2,
              micro_batch_size=4, loss_type="grpo")
    full = train(config(assets, tmp_path / "full", **kw), quiet=True)
    state = json.loads((tmp_path / "full" / "checkpoint-1" / "trainer_state.json").read_text())
    assert len(state["objective"]["buffer"]) == 6  # 4 micro-batches x 2 iterations, 2 trained at step 1
    res = train(config(assets, tmp_path / "res", **kw, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1")),
                quiet=True)
    key = lambda h: [(r["step"], r["loss"], r["grad_norm"]) for r in h if "loss" in r]  # noqa: E731
    assert key(res.history) == [x for x in key(full.history) if x[0] > 1]
    clipped = [r["clip_ratio"] for r in full.history if "loss" in r]
    assert clipped[0] == 0.0  # step 1: pi_old is pi


def test_a_reward_model_adapter_is_a_reward_function(assets, tmp_path):
    rows = [{"prompt": f"say {w}:", "chosen": " aaa", "rejected": f" {w}"} for w in WORDS * 4]
    write_jsonl(rows, tmp_path / "pref.jsonl")
    rm = tmp_path / "rm"
    train(load_config(raw={"base_model": str(assets["bnb"]), "output_dir": str(rm), "objective": "reward",
                           "datasets": [{"path": str(tmp_path / "pref.jsonl"), "type": "preference"}],
                           "lora_r": 4, "sequence_len": 32, "micro_batch_size": 8, "max_steps": 2,
                           "optimizer": "adamw_torch", "progress_bar": False}), quiet=True)
    res = train(config(assets, tmp_path / "run", max_steps=1, reward_funcs=[str(rm), f"{assets['rewards']}:says_word"],
                       reward_weights=[1.0, 0.5]), quiet=True)
    rec = [r for r in res.history if "loss" in r][0]
    assert {"rewards/rm/mean", "rewards/says_word/mean"} <= set(rec) and math.isfinite(rec["rewards/rm/mean"])


def test_trl_grpo_trainer_runs_on_our_model_through_peft(assets, tmp_path):
    """TRL's own GRPOTrainer, unchanged, on a model loaded with QLoraKernelsConfig, PEFT adapters on NF4LoraLinear."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    from qlora_kernels.hf import LoraConfig, NF4LoraLinear, QLoraKernelsConfig

    model = AutoModelForCausalLM.from_pretrained(assets["fp32"], quantization_config=QLoraKernelsConfig(),
                                                 dtype=torch.float32)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=8, max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                          bf16=False, logging_steps=1, save_strategy="no")
    f = load_reward_function(f"{assets['rewards']}:count_a")
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[f], args=args, processing_class=tiny_tokenizer(),
                              train_dataset=datasets.Dataset.from_list([{"prompt": f"say {w}:"} for w in WORDS]),
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert isinstance(trainer.model.base_model.model.model.layers[0].self_attn.q_proj, NF4LoraLinear)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


def test_conversational_prompts_go_through_the_chat_template_and_rewards_get_messages(tmp_path):
    """TRL's conversational format: the prompt rendered by the tokenizer's chat template with the generation prompt,
    the completions handed to the reward functions as assistant messages, the other fields as columns."""
    from transformers import AutoTokenizer

    from qlora_kernels.demo import synthetic
    from qlora_kernels.train.data import load_prompts

    messages = [{"role": "user", "content": "bufa sona ."}]
    write_jsonl([{"prompt": messages, "tag": "x"}, {"prompt": "bufa sona =", "tag": "y"}], tmp_path / "p.jsonl")
    cfg = load_config(raw={"base_model": str(synthetic.BASE_MODEL_DIR), "output_dir": str(tmp_path / "o"),
                           "objective": "grpo", "datasets": [{"path": str(tmp_path / "p.jsonl"), "type": "prompt"}],
                           "reward_funcs": ["qlora_kernels.demo.rewards:exact_translation"], "num_generations": 2,
                           "micro_batch_size": 2, "max_completion_length": 4, "sequence_len": 64})
    tok = AutoTokenizer.from_pretrained(synthetic.BASE_MODEL_DIR)
    items, _, stats = load_prompts(cfg, tok)
    assert stats.summary().startswith("2 prompts from 2 rows")
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert items[0].templated and items[0].input_ids == tok(want, add_special_tokens=False)["input_ids"]
    assert not items[1].templated and items[1].input_ids == tok("bufa sona =")["input_ids"]
    assert [i.columns for i in items] == [{"tag": "x"}, {"tag": "y"}]
    seen = {}

    def reward(prompts, completions, completion_ids, tag, **kw):
        seen.update(prompts=prompts, completions=completions, tag=tag)
        return [0.0] * len(completions)

    objective = GRPOObjective(GRPOSettings(num_generations=2, max_completion_length=4), ["r:f"], None)
    objective.funcs, objective.tokenizer = [reward], tok
    comps, per_func = objective.complete_and_score(qk.load_4bit_model(synthetic.BASE_MODEL_DIR), items, 0, 2)
    assert per_func.shape == (2, 1) and seen["tag"] == ["x", "y"] and seen["prompts"][0] == messages
    assert seen["completions"][0] == [{"role": "assistant", "content": comps[0].text}]
    assert seen["completions"][1] == comps[1].text


def test_packed_micro_batches_give_the_padded_loss_and_gradients(assets, adapter):
    """sample_packing: a micro-batch's sequences packed into rows (no padding inside, position ids restarting) give the
    token log-probs, loss and adapter gradients of the padded rows, up to float rounding, for every loss_type."""
    from qlora_kernels.train.packing import check_packed_attention

    tok = tiny_tokenizer()
    prompt_ids = [tok(p)["input_ids"] for p in ("say cat:", "say a dog:")]  # prompts of different lengths
    advantages, _ = group_advantages(REWARD_VALUES, 4)
    pids = [prompt_ids[i // 4] for i in range(8)]
    model = qk.load_adapter(qk.load_4bit_model(assets["bnb"], dtype=torch.float32), adapter).train()
    layout = check_packed_attention(model)
    for loss_type in ("grpo", "dr_grpo", "dapo", "bnpo"):
        results = []
        for capacity in (None, 40):
            objective = GRPOObjective(GRPOSettings(num_generations=4, max_completion_length=8, beta=0.04,
                                                   loss_type=loss_type), ["r:f"], None)
            objective.packed_layout = layout
            batch = completion_batch(pids, COMPLETIONS, advantages, [True] * 8, tok.pad_token_id, capacity)
            objective._add_reference_log_probs(model, batch)
            model.zero_grad()
            value, _ = objective.loss(model, batch)
            (value / objective.count(batch)).backward()
            results.append((batch, float(value), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
        (plain, v0, g0), (packed, v1, g1) = results
        assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0] and "position_ids" in packed
        assert int(packed["attention_mask"].sum()) == int(plain["attention_mask"].sum())  # the same real tokens
        assert abs(v0 - v1) < 1e-5 * max(1.0, abs(v0)), (loss_type, v0, v1)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_training_with_packed_micro_batches(assets, tmp_path):
    res = train(config(assets, tmp_path / "run", max_steps=2, sample_packing=True, sequence_len=64), quiet=True)
    steps = [r for r in res.history if "loss" in r]
    assert len(steps) == 2 and all(0 < r["packing_efficiency"] <= 1 for r in steps)
