"""``qlora-kernels demo`` (or ``python -m qlora_kernels.demo``): a complete QLoRA fine-tune on a CPU in a
couple of minutes, nothing downloaded. It uses the trainer (:mod:`qlora_kernels.train`) as a user would.

1. Load the tiny Llama shipped in ``qlora_kernels/demo/data/tiny_llama`` (0.9 M parameters, built by
   :mod:`.synthetic`): it knows two made-up languages, Lumo and Zil, and translates between them
   when prompted with raw text ``"<sentence> ="``. It has never seen an instruction.
2. Quantize its linear layers to NF4 and add LoRA adapters (``load_4bit_model`` + ``apply_qlora``).
3. Measure exact-match accuracy on 200 held-out alpaca prompts ("Translate into Zil." + a sentence
   never seen in training): the base model does not know the format and rarely answers right.
4. Fine-tune with the trainer (the same run as ``qlora-kernels train examples/sft_tiny.yaml``).
5. Measure again (near 100%), and leave the PEFT adapter in the output directory.
6. DPO stage (:func:`run_dpo_stage`): merge the SFT adapter into the base (``merge_and_unload``), load that
   in NF4 with a fresh adapter (the reference model is this SFT model: adapters off) and teach a house
   style from preference pairs made in code: say ``mabi`` where the source says ``bufa`` (Zil ``gazifo``
   for ``ninaga``). Measure before and after on held-out prompts: the share of answers in the house
   style, the exact match of the other answers, and the held-out reward accuracy and DPO loss.
7. GRPO stage (:func:`run_grpo_stage`): online RL on the same SFT model with a fresh adapter and a verifiable
   reward (:func:`.rewards.exact_translation`: 1 for the exact translation). Rollouts are sampled at temperature
   2, where the SFT model translates right about a third of the time; GRPO makes the sampled translations right
   more often. Measured before and after on the held-out prompts, sampled from a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from qlora_kernels import merge_and_unload
from qlora_kernels.generation import generate
from qlora_kernels.train.components import autocast_dtype, build_model, load_tokenizer
from qlora_kernels.train.config import load_config
from qlora_kernels.train.data import load_pairs, read_rows, write_jsonl
from qlora_kernels.train.loop import train
from qlora_kernels.train.objectives.dpo import DPOSettings, evaluate_dpo
from qlora_kernels.train.templates import alpaca_prompt

from . import synthetic

DEMO_STEPS = 200
DPO_STEPS = 80
GRPO_STEPS = 30
GRPO_TEMPERATURE = 2.0
# The 4-bit base and the adapters, the same in every stage of the demo
QLORA_KEYS: dict[str, Any] = {"quantization": {"quant_type": "nf4", "double_quant": True, "blocksize": 64}, "lora_r": 8,
                              "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
                              "sequence_len": 128}
RENAME = (2, 4)  # the DPO stage's house style renames Lumo noun 2 (bufa; Zil ninaga) to noun 4 (mabi; Zil gazifo)


def demo_raw_config(output_dir: str | Path = "outputs/demo", max_steps: int = DEMO_STEPS,
                    base_model: str | Path = synthetic.BASE_MODEL_DIR) -> dict[str, Any]:
    """The demo's training config; ``examples/sft_tiny.yaml`` is the same with repo-relative paths."""
    return {
        "base_model": str(base_model),
        "datasets": [{"path": str(synthetic.TRAIN_FILE), "type": "alpaca"}],
        "test_datasets": [{"path": str(synthetic.EVAL_FILE), "type": "alpaca"}],
        "prompt_template": "alpaca",
        **QLORA_KEYS,
        "micro_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "max_steps": max_steps,
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 10,
        "optimizer": "paged_adamw",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "eval_steps": 50,
        "save_steps": 100,
        "save_total_limit": 1,
        "output_dir": str(output_dir),
        "seed": 0,
    }


def renamed(text: str, langs: synthetic.Languages) -> str:
    """``text`` under the DPO stage's house style: the noun ``bufa`` (Zil ``ninaga``) becomes ``mabi``
    (Zil ``gazifo``)."""
    old, new = langs.lumo["noun"][RENAME[0]], langs.lumo["noun"][RENAME[1]]
    table = {old: new, langs.to_zil[old]: langs.to_zil[new]}
    return " ".join(table.get(w, w) for w in text.split())


def mentions_renamed(row: dict[str, str], langs: synthetic.Languages) -> bool:
    """True if an alpaca translation row's answer contains the renamed noun."""
    return renamed(row["output"], langs) != row["output"].strip()


def near_miss(answer: str, langs: synthetic.Languages, rng: random.Random, at: set[str] | None = None) -> str:
    """``answer`` with one word swapped for another word of the same class and language: a plausible
    wrong translation. The swapped word is one of ``at`` if the answer has any."""
    classes = {w: (lang, c) for lang in (langs.lumo, langs.zil) for c, ws in lang.items() for w in ws}
    words = answer.split()
    spots = [i for i, w in enumerate(words) if w in classes]
    i = rng.choice([i for i in spots if words[i] in (at or ())] or spots)
    lang, c = classes[words[i]]
    words[i] = rng.choice([w for w in lang[c] if w != words[i]])
    return " ".join(words)


def preference_rows(rows: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """DPO rows (``preference``) from alpaca translation rows. Where the answer holds the renamed noun, the
    renamed translation is chosen over the faithful one; elsewhere the translation is chosen over a near
    miss (:func:`near_miss`; where the answer already holds the new noun, the miss replaces it), which keeps
    the other translations exact while the rename is learnt."""
    langs, rng = synthetic.make_languages(), random.Random(seed)
    new = langs.lumo["noun"][RENAME[1]]
    out = []
    for r in rows:
        good = r["output"].strip()
        bad = near_miss(good, langs, rng, at={new, langs.to_zil[new]})  # the new word stays where it was right
        chosen, rejected = (renamed(good, langs), good) if mentions_renamed(r, langs) else (good, bad)
        out.append({"prompt": alpaca_prompt(r["instruction"], r.get("input") or ""), "chosen": chosen,
                    "rejected": rejected})
    return out


def dpo_splits(n_train_each: int = 240, n_eval_plain: int = 30) -> tuple[list[dict], list[dict]]:
    """Alpaca rows of the DPO stage: train rows from fresh sentences (half of them with the renamed noun),
    eval rows from the SFT stage's held-out sentences (all those with the renamed noun, a few without)."""
    langs = synthetic.make_languages()
    eval_rows = [r for _, r in read_rows(synthetic.EVAL_FILE)]
    pool = synthetic.instruction_rows(langs, 4000, seed=101, exclude=synthetic.held_out_sentences(eval_rows))
    with_noun = [r for r in pool if mentions_renamed(r, langs)][:n_train_each]
    without = [r for r in pool if not mentions_renamed(r, langs)][:n_train_each]
    train_rows = with_noun + without
    random.Random(0).shuffle(train_rows)
    evals = [r for r in eval_rows if mentions_renamed(r, langs)]
    evals += [r for r in eval_rows if not mentions_renamed(r, langs)][:n_eval_plain]
    return train_rows, evals


def write_preference_files(out_dir: str | Path) -> tuple[Path, Path]:
    """Write the DPO stage's pairs (``preference`` JSONL) as ``out_dir/{train,eval}.jsonl``."""
    train_rows, eval_rows = dpo_splits()
    d = Path(out_dir)
    return (write_jsonl(preference_rows(train_rows, seed=1), d / "train.jsonl"),
            write_jsonl(preference_rows(eval_rows, seed=2), d / "eval.jsonl"))


def demo_dpo_raw_config(output_dir: str | Path, train_file: str | Path, eval_file: str | Path,
                        max_steps: int = DPO_STEPS,
                        base_model: str | Path = synthetic.BASE_MODEL_DIR) -> dict[str, Any]:
    """The DPO stage's training config (``examples/dpo_tiny.yaml`` is the same as a file)."""
    return {
        "base_model": str(base_model),
        "rl": "dpo",
        "datasets": [{"path": str(train_file), "type": "preference"}],
        "test_datasets": [{"path": str(eval_file), "type": "preference"}],
        "dpo_beta": 0.1,
        "dpo_loss": "sigmoid",
        "precompute_ref_log_probs": True,
        **QLORA_KEYS,
        "micro_batch_size": 16,
        "eval_batch_size": 64,
        "max_steps": max_steps,
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 3,
        "optimizer": "paged_adamw",
        "max_grad_norm": 1.0,
        "eval_steps": max(1, max_steps // 2),
        "output_dir": str(output_dir),
        "seed": 0,
    }


def grpo_prompt_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Prompt rows (TRL's standard format) from alpaca translation rows: the alpaca prompt, and the translation as
    the ``answer`` column the reward reads."""
    return [{"prompt": alpaca_prompt(r["instruction"], r.get("input") or ""), "answer": r["output"]} for r in rows]


def write_grpo_prompt_files(out_dir: str | Path, n_train: int = 600) -> tuple[Path, Path]:
    """The GRPO stage's prompts as ``out_dir/{train,eval}.jsonl``: fresh sentences to train on, the SFT stage's
    held-out prompts to measure on."""
    langs = synthetic.make_languages()
    eval_rows = [r for _, r in read_rows(synthetic.EVAL_FILE)]
    pool = synthetic.instruction_rows(langs, n_train, seed=202, exclude=synthetic.held_out_sentences(eval_rows))
    d = Path(out_dir)
    return write_jsonl(grpo_prompt_rows(pool), d / "train.jsonl"), write_jsonl(grpo_prompt_rows(eval_rows),
                                                                               d / "eval.jsonl")


def demo_grpo_raw_config(output_dir: str | Path, train_file: str | Path, eval_file: str | Path,
                         max_steps: int = GRPO_STEPS, base_model: str | Path = synthetic.BASE_MODEL_DIR) -> dict[
        str, Any]:
    """The GRPO stage's training config (``examples/grpo_tiny.yaml`` is the same as a file)."""
    return {
        "base_model": str(base_model),
        "objective": "grpo",
        "datasets": [{"path": str(train_file), "type": "prompt"}],
        "test_datasets": [{"path": str(eval_file), "type": "prompt"}],
        "reward_funcs": ["qlora_kernels.demo.rewards:exact_translation"],
        "num_generations": 8,
        "max_completion_length": 24,
        "temperature": GRPO_TEMPERATURE,
        "beta": 0.0,
        "loss_type": "dapo",
        **QLORA_KEYS,
        "micro_batch_size": 64,
        "eval_batch_size": 100,
        "max_steps": max_steps,
        "learning_rate": 2e-3,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "optimizer": "paged_adamw",
        "max_grad_norm": 1.0,
        "eval_steps": max_steps,
        "output_dir": str(output_dir),
        "seed": 0,
    }


def sampled_reward(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]], temperature: float,
                   seed: int = 0, max_new_tokens: int = 24) -> float:
    """The mean :func:`.rewards.exact_translation` of one completion per prompt row, sampled at ``temperature`` from
    ``seed`` (as the GRPO objective evaluates)."""
    from .rewards import exact_translation

    answers = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                       temperature=temperature, seed=seed, batch_size=100, chat_template=False).texts
    return sum(exact_translation([], answers, [r["answer"] for r in rows])) / max(1, len(rows))


def exact_match(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]], batch_size: int = 50,
                max_new_tokens: int = 24) -> tuple[float, list[str]]:
    """Share of alpaca ``rows`` whose greedy completion (:func:`qlora_kernels.generation.generate`, the alpaca
    prompt as it is) equals ``output`` exactly (after stripping)."""
    prompts = [alpaca_prompt(r["instruction"], r.get("input") or "") for r in rows]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       chat_template=False).texts
    hits = sum(a.strip() == r["output"].strip() for a, r in zip(answers, rows))
    return hits / max(1, len(rows)), answers


def ensure_assets(rebuild: bool = False) -> None:
    """Make sure the shipped base model and data files exist; rebuild them if asked or missing (slow)."""
    if rebuild or not (synthetic.TRAIN_FILE.exists() and synthetic.EVAL_FILE.exists()):
        synthetic.write_sft_files()
    if rebuild or not (synthetic.BASE_MODEL_DIR / "model.safetensors").exists():
        print(f"building the tiny base model in {synthetic.BASE_MODEL_DIR} (pretraining; about 4 minutes "
              "on 2 CPU cores)")
        synthetic.pretrain_base_model(synthetic.BASE_MODEL_DIR)


def run_demo(output_dir: str | Path = "outputs/demo", max_steps: int = DEMO_STEPS, eval_rows: int | None = None,
             quiet: bool = False, progress_bar: bool = True, threads: int | None = 1,
             dpo_steps: int = DPO_STEPS, grpo_steps: int = GRPO_STEPS) -> dict[str, Any]:
    """Run the demo; returns ``{"before", "after", "eval_loss", "steps", "seconds", "adapter_dir", "dpo", "grpo"}``
    (``"dpo"``: the DPO stage's summary, see :func:`run_dpo_stage`, None with ``dpo_steps=0``; ``"grpo"``: the GRPO
    stage's, :func:`run_grpo_stage`, None with ``grpo_steps=0``).

    ``threads``: torch CPU threads for the run (restored afterwards; None keeps torch's setting). One
    is the default: the model is so small that a second thread saves little, and OpenMP threads
    slow down several-fold when the cores are shared with other work.
    """
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(output_dir, max_steps, eval_rows, quiet, progress_bar, dpo_steps, grpo_steps)
    finally:
        torch.set_num_threads(saved_threads)


def _run_demo(output_dir: str | Path, max_steps: int, eval_rows: int | None, quiet: bool,
              progress_bar: bool, dpo_steps: int = DPO_STEPS, grpo_steps: int = GRPO_STEPS) -> dict[str, Any]:
    t0 = time.perf_counter()
    ensure_assets()
    cfg = load_config(raw=demo_raw_config(output_dir, max_steps) | {"progress_bar": progress_bar,
                                                                     "overwrite_output_dir": True})  # re-runnable
    rows = [r for _, r in read_rows(synthetic.EVAL_FILE)][:eval_rows]

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    say(f"base model: {cfg.base_model} (tiny Llama that knows Lumo and Zil; never saw an instruction)")
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg)
    before, answers = exact_match(model, tokenizer, rows)
    say(f"before fine-tuning: exact match {before:.1%} on {len(rows)} held-out translation instructions")
    say(f'  e.g. {rows[0]["instruction"]} "{rows[0]["input"]}" (expected "{rows[0]["output"]}") -> '
        f'"{answers[0].strip()[:60]}"')
    result = train(cfg, model=model, tokenizer=tokenizer, quiet=quiet)
    after, answers = exact_match(model, tokenizer, rows)
    seconds = time.perf_counter() - t0
    say(f"after {result.global_step} QLoRA steps: exact match {after:.1%} (was {before:.1%}); "
        f"eval loss {result.eval_loss:.4f}")
    say(f'  e.g. {rows[0]["instruction"]} "{rows[0]["input"]}" -> "{answers[0].strip()[:60]}"')
    say(f"adapter (PEFT format): {Path(output_dir).resolve()}; time so far {seconds:.0f} s")
    dpo = grpo = None
    merged_dir = Path(output_dir) / "sft_merged"
    if dpo_steps > 0 or grpo_steps > 0:  # the later stages start from the SFT model, merged
        merge_and_unload(model).save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
    if dpo_steps > 0:
        dpo = run_dpo_stage(merged_dir, tokenizer, output_dir, dpo_steps, quiet, progress_bar)
    if grpo_steps > 0:
        grpo = run_grpo_stage(merged_dir, tokenizer, output_dir, grpo_steps, quiet, progress_bar)
    if dpo or grpo:
        seconds = time.perf_counter() - t0
        say(f"total time {seconds:.0f} s")
        say(f"try it: qlora-kernels generate {merged_dir} --adapter {Path(output_dir) / ('dpo' if dpo else 'grpo')} "
            f"--prompts {synthetic.EVAL_FILE} --max-new-tokens 24")
    summary = {"before": before, "after": after, "eval_loss": result.eval_loss, "steps": result.global_step,
               "seconds": round(seconds, 1), "adapter_dir": str(output_dir), "dpo": dpo, "grpo": grpo}
    (Path(output_dir) / "demo_result.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_dpo_stage(merged_dir: str | Path, tokenizer: Any, output_dir: str | Path, max_steps: int = DPO_STEPS,
                  quiet: bool = False, progress_bar: bool = True) -> dict[str, Any]:
    """The demo's DPO stage, on the SFT stage's model; returns its before/after numbers.

    1. ``merged_dir``: the SFT model with its adapter merged (``merge_and_unload``), an ordinary HF directory;
       write the preference pairs to ``output_dir/dpo_data`` (:func:`write_preference_files`).
    2. Train as ``qlora-kernels train examples/dpo_tiny.yaml`` would: load ``sft_merged`` in NF4 with a
       fresh adapter; the reference model is that model with the adapter off (its log-probs
       precomputed once). Output: ``output_dir/dpo``.
    3. Before and after, on the SFT stage's held-out prompts: the share of answers that follow the house
       style (the renamed noun; exact match with the renamed translation) and the exact match of the
       other answers (which must stay right); and the held-out reward accuracy and DPO loss.
    """
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    langs = synthetic.make_languages()
    old, new = langs.lumo["noun"][RENAME[0]], langs.lumo["noun"][RENAME[1]]
    say(f"DPO stage: a house style, taught by preferences only: say '{new}' (Zil '{langs.to_zil[new]}') "
        f"instead of '{old}' (Zil '{langs.to_zil[old]}'); the reference model is the SFT model")
    out = Path(output_dir)
    train_file, eval_file = write_preference_files(out / "dpo_data")
    cfg = load_config(raw=demo_dpo_raw_config(out / "dpo", train_file, eval_file, max_steps, merged_dir)
                      | {"progress_bar": progress_bar, "overwrite_output_dir": True})
    model = build_model(cfg)
    held = [r for _, r in read_rows(synthetic.EVAL_FILE)]
    style_rows = [dict(r, output=renamed(r["output"], langs)) for r in held if mentions_renamed(r, langs)]
    other_rows = [r for r in held if not mentions_renamed(r, langs)]

    def measure() -> tuple[float, float, list[str]]:
        style, answers = exact_match(model, tokenizer, style_rows)
        return style, exact_match(model, tokenizer, other_rows)[0], answers

    style0, other0, answers0 = measure()
    device = next(model.parameters()).device
    _, eval_pairs, _ = load_pairs(cfg, tokenizer)
    held0 = evaluate_dpo(model, eval_pairs, cfg.eval_batch_size or cfg.micro_batch_size, tokenizer.pad_token_id,
                         device, autocast_dtype(cfg, device), DPOSettings.from_config(cfg))
    say(f"before DPO: house style followed in {style0:.1%} of {len(style_rows)} held-out prompts that need it; "
        f"exact match {other0:.1%} on the {len(other_rows)} others")
    result = train(cfg, model=model, tokenizer=tokenizer, quiet=quiet)
    style1, other1, answers1 = measure()
    evals = [r for r in result.history if "eval_loss" in r]
    acc0, loss0 = held0["eval_rewards/accuracies"], held0["eval_loss"]
    acc1 = evals[-1]["eval_rewards/accuracies"] if evals else float("nan")
    say(f"after {result.global_step} DPO steps: house style followed in {style1:.1%} (was {style0:.1%}); "
        f"exact match on the others {other1:.1%} (was {other0:.1%}); held-out reward accuracy {acc1:.1%} "
        f"(was {acc0:.1%}), DPO loss {result.eval_loss:.4f} (was {loss0:.4f})")
    r0 = style_rows[0]
    say(f'  e.g. {r0["instruction"]} "{r0["input"]}" -> "{answers1[0].strip()[:60]}" (before DPO: '
        f'"{answers0[0].strip()[:60]}")')
    exported = export_dpo_model(merged_dir, out / "dpo", out / "dpo_merged16", tokenizer, style_rows)
    say(f"exported the DPO model as merged16 (fp32) to {exported['dir']}; reloaded by plain transformers "
        f"(AutoModelForCausalLM): house style followed in {exported['style']:.1%} (the adapter model: {style1:.1%})")
    return {"style_before": style0, "style_after": style1, "other_before": other0, "other_after": other1,
            "reward_accuracy_before": acc0, "reward_accuracy_after": acc1, "eval_loss_before": loss0,
            "eval_loss_after": result.eval_loss, "steps": result.global_step,
            "adapter_dir": str(out / "dpo"), "base_model": str(merged_dir), "exported": exported}


def export_dpo_model(base_dir: Path, adapter_dir: Path, out_dir: Path, tokenizer: Any,
                     style_rows: list[dict[str, str]]) -> dict[str, Any]:
    """The DPO model leaves the package: ``qlora-kernels export`` as merged16 (fp32) into ``out_dir`` (replaced),
    reloaded with plain transformers, and its house-style exact match measured again."""
    import shutil

    from transformers import AutoModelForCausalLM

    from ..export import export_model

    shutil.rmtree(out_dir, ignore_errors=True)  # the demo's own output, from an earlier run
    report = export_model(base_dir, adapter_dir, out_dir, format="merged16", dtype="fp32")
    plain = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True).eval()
    return {"dir": str(out_dir), "style": exact_match(plain, tokenizer, style_rows)[0],
            "max_abs_logit_change": report.max_abs_logit_change}


def run_grpo_stage(merged_dir: str | Path, tokenizer: Any, output_dir: str | Path, max_steps: int = GRPO_STEPS,
                   quiet: bool = False, progress_bar: bool = True) -> dict[str, Any]:
    """The demo's GRPO stage, on the SFT model (``merged_dir``) with a fresh adapter; returns its before/after numbers.

    Writes the prompts to ``output_dir/grpo_data`` (:func:`write_grpo_prompt_files`) and trains as ``qlora-kernels
    train examples/grpo_tiny.yaml`` would (output: ``output_dir/grpo``): each step 8 prompts, 8 completions each,
    sampled at temperature 2 from the NF4 model with the adapter live, rewarded 1 for the exact translation. Before
    and after: the held-out reward (the share of exact translations among completions sampled at that temperature,
    from a fixed seed), and the greedy exact match, which must stay near 100%.
    """
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    out = Path(output_dir)
    train_file, eval_file = write_grpo_prompt_files(out / "grpo_data")
    cfg = load_config(raw=demo_grpo_raw_config(out / "grpo", train_file, eval_file, max_steps, merged_dir)
                      | {"progress_bar": progress_bar, "overwrite_output_dir": True})
    say(f"GRPO stage: online RL with a verifiable reward (1 for the exact translation), rollouts of "
        f"{cfg.num_generations} completions a prompt sampled at temperature {cfg.temperature} from the 4-bit model "
        "with its adapter live")
    model = build_model(cfg)
    held = [r for _, r in read_rows(eval_file)]
    alpaca = [r for _, r in read_rows(synthetic.EVAL_FILE)]
    reward0 = sampled_reward(model, tokenizer, held, cfg.temperature, cfg.seed)
    greedy0 = exact_match(model, tokenizer, alpaca)[0]
    say(f"before GRPO: held-out reward {reward0:.3f} (exact translations sampled at temperature {cfg.temperature}); "
        f"greedy exact match {greedy0:.1%}")
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tokenizer, quiet=quiet)
    seconds = time.perf_counter() - t0
    reward1 = sampled_reward(model, tokenizer, held, cfg.temperature, cfg.seed)
    greedy1 = exact_match(model, tokenizer, alpaca)[0]
    steps = [r for r in result.history if "loss" in r]
    say(f"after {result.global_step} GRPO steps ({seconds:.0f} s, rollouts at "
        f"{sum(r['rollout_tokens_per_s'] for r in steps) / max(1, len(steps)):.0f} tok/s): held-out reward "
        f"{reward1:.3f} (was {reward0:.3f}); greedy exact match {greedy1:.1%} (was {greedy0:.1%})")
    return {"reward_before": reward0, "reward_after": reward1, "greedy_before": greedy0, "greedy_after": greedy1,
            "train_reward_first": steps[0]["reward"] if steps else None,
            "train_reward_last": steps[-1]["reward"] if steps else None, "steps": result.global_step,
            "seconds": round(seconds, 1), "adapter_dir": str(out / "grpo"), "base_model": str(merged_dir)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    p.add_argument("--output-dir", default="outputs/demo", help="where the adapter and metrics go")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="optimizer steps (default %(default)s)")
    p.add_argument("--eval-rows", type=int, default=None, help="held-out prompts to score (default: all 200)")
    p.add_argument("--rebuild-base", action="store_true",
                   help="regenerate the shipped base model and data first (pretraining, about 4 minutes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s; 0: torch's own)")
    p.add_argument("--dpo-steps", type=int, default=DPO_STEPS,
                   help="steps of the DPO stage after SFT (default %(default)s; 0 skips it)")
    p.add_argument("--grpo-steps", type=int, default=GRPO_STEPS,
                   help="steps of the GRPO stage after SFT (default %(default)s; 0 skips it)")


def main(args: argparse.Namespace) -> int:
    """Entry of ``qlora-kernels demo``."""
    if args.rebuild_base:
        ensure_assets(rebuild=True)
    res = run_demo(args.output_dir, args.steps, args.eval_rows, progress_bar=not args.no_progress,
                   threads=args.threads or None, dpo_steps=args.dpo_steps, grpo_steps=args.grpo_steps)
    dpo_ok = res["dpo"] is None or res["dpo"]["style_after"] > res["dpo"]["style_before"]
    grpo_ok = res["grpo"] is None or res["grpo"]["reward_after"] > res["grpo"]["reward_before"]
    return 0 if res["after"] > res["before"] and dpo_ok and grpo_ok else 1
