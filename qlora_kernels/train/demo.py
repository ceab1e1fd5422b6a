"""``qlora-kernels demo``: a complete QLoRA fine-tune on a CPU in a couple of minutes, nothing downloaded.

1. Load the tiny Llama shipped in ``qlora_kernels/train/data/tiny_llama`` (0.9 M parameters, built by
   :mod:`.synthetic`): it knows two made-up languages, Lumo and Zil, and translates between them
   when prompted with raw text ``"<sentence> ="``. It has never seen an instruction.
2. Quantize its linear layers to NF4 and add LoRA adapters (``load_4bit_model`` + ``apply_qlora``).
3. Measure exact-match accuracy on 200 held-out alpaca prompts ("Translate into Zil." + a sentence
   never seen in training): the base model does not know the format and rarely answers right.
4. Fine-tune with the trainer (the same run as ``qlora-kernels train examples/sft_tiny.yaml``).
5. Measure again (near 100%), and leave the PEFT adapter in the output directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import synthetic
from .config import load_config
from .data import read_rows
from .sft import build_model, load_tokenizer, train
from .templates import alpaca_prompt

DEMO_STEPS = 200


def demo_raw_config(output_dir: str | Path = "outputs/demo", max_steps: int = DEMO_STEPS,
                    base_model: str | Path = synthetic.BASE_MODEL_DIR) -> dict[str, Any]:
    """The demo's training config; ``examples/sft_tiny.yaml`` is the same with repo-relative paths."""
    return {
        "base_model": str(base_model),
        "datasets": [{"path": str(synthetic.TRAIN_FILE), "type": "alpaca"}],
        "test_datasets": [{"path": str(synthetic.EVAL_FILE), "type": "alpaca"}],
        "prompt_template": "alpaca",
        "quantization": {"quant_type": "nf4", "double_quant": True, "blocksize": 64},
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
        "sequence_len": 128,
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


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]], batch_size: int = 50,
                max_new_tokens: int = 24) -> tuple[float, list[str]]:
    """Share of alpaca ``rows`` whose greedy completion equals ``output`` exactly (after stripping)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            prompts = [alpaca_prompt(r["instruction"], r.get("input") or "") for r in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
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
             quiet: bool = False, progress_bar: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """Run the demo; returns ``{"before", "after", "eval_loss", "steps", "seconds", "adapter_dir"}``.

    ``threads``: torch CPU threads for the run (restored afterwards; None keeps torch's setting). One
    is the default: the model is so small that a second thread saves little, and OpenMP threads
    slow down several-fold when the cores are shared with other work.
    """
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(output_dir, max_steps, eval_rows, quiet, progress_bar)
    finally:
        torch.set_num_threads(saved_threads)


def _run_demo(output_dir: str | Path, max_steps: int, eval_rows: int | None, quiet: bool,
              progress_bar: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    ensure_assets()
    cfg = load_config(raw=demo_raw_config(output_dir, max_steps) | {"progress_bar": progress_bar})
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
    say(f"adapter (PEFT format): {Path(output_dir).resolve()}; total time {seconds:.0f} s")
    summary = {"before": before, "after": after, "eval_loss": result.eval_loss, "steps": result.global_step,
               "seconds": round(seconds, 1), "adapter_dir": str(output_dir)}
    (Path(output_dir) / "demo_result.json").write_text(json.dumps(summary, indent=1))
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    p.add_argument("--output-dir", default="outputs/demo", help="where the adapter and metrics go")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="optimizer steps (default %(default)s)")
    p.add_argument("--eval-rows", type=int, default=None, help="held-out prompts to score (default: all 200)")
    p.add_argument("--rebuild-base", action="store_true",
                   help="regenerate the shipped base model and data first (pretraining, about 4 minutes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s; 0: torch's own)")


def main(args: argparse.Namespace) -> int:
    """Entry of ``qlora-kernels demo``."""
    if args.rebuild_base:
        ensure_assets(rebuild=True)
    res = run_demo(args.output_dir, args.steps, args.eval_rows, progress_bar=not args.no_progress,
                   threads=args.threads or None)
    return 0 if res["after"] > res["before"] else 1
