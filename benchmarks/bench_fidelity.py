"""Fidelity: how close QLoRA comes to 16-bit LoRA. The same model, data, seed, steps and optimizer trained three ways:

* ``qlora``: qlora_kernels' QLoRA (NF4 + double quantization, ``load_4bit_model`` + ``apply_qlora``);
* ``lora16``: 16-bit LoRA on the dense base (transformers + PEFT ``LoraConfig``, no quantization);
* ``bnb``: bitsandbytes QLoRA (transformers + ``BitsAndBytesConfig`` nf4, double quantization, + PEFT);

then the eval loss (mean next-token cross-entropy over the held-out answers' tokens) and the exact match of greedy
answers on the held-out prompts, and the gaps in percent against ``lora16``.

    python benchmarks/bench_fidelity.py --out bench_out                       # the demo's task, 200 steps, seeds 0-2
    python benchmarks/bench_fidelity.py --task knowledge --eval-rows 1000 --out bench_out  # the knowledge task
    python benchmarks/bench_fidelity.py --quick --out bench_out               # 40 steps, seeds 0,1 (the tests)

Two tasks (``--task``):

* ``demo``: the demo's tiny Llama (``qlora_kernels/demo/data/tiny_llama``, pretrained on two invented languages,
  0.9 M parameters, fp32 on the CPU) learns to follow "Translate into ..." instructions (alpaca rows of
  ``qlora_kernels/demo/data/sft_translate_*.jsonl``). Word-for-word translation is a rule: a LoRA could learn much
  of it on its own, so the base's weights matter less.
* ``knowledge``: questions whose answers only the base knows (``benchmarks/_knowledge.py``): a Llama pretrained
  here on the facts of ``--people`` invented people (width 256, 4 blocks; 2000 people by default, ~8 minutes on two
  cores, cached under ``--out/bases``) is fine-tuned on questions about half of them and evaluated on the others,
  whose facts it read only in pretraining. What NF4 loses of the base shows here. The JSON also records what the
  base knows before the fine-tune, dense and in NF4 (``base_recall``).

Every provider runs the same loop: the rows in one seeded order, micro-batches of ``--batch``, AdamW (lr ``--lr``,
cosine after 10 warm-up steps, weight decay 0, clipping at 1.0), LoRA r 16 / alpha 32 on every linear layer but
the output projection, dropout 0, and the loss transformers' causal-LM loss over the answer tokens (the prompt is
not a target). The LoRA initialisation is each library's own from the run's seed, so seeds also measure the spread
a run-to-run comparison must allow for.

Writes ``fidelity.json`` / ``fidelity.png`` (``fidelity_knowledge.*`` for the knowledge task) to --out and prints
the table last. Timing never decides a test; the quick runs' gaps are checked in tests/test_bench_fidelity.py
against the spread over their seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

PROVIDERS = ("qlora", "lora16", "bnb")
R, ALPHA = 16, 32


def examples(path: Path, tokenizer: Any, limit: int | None = None) -> tuple[list[Any], list[dict[str, str]]]:
    """``(tokenized examples, rows)`` of an alpaca JSONL file: the prompt (not a target) and the answer with EOS."""
    return tokenized([json.loads(x) for x in path.read_text().splitlines() if x.strip()][:limit], tokenizer)


def tokenized(rows: list[dict[str, str]], tokenizer: Any) -> tuple[list[Any], list[dict[str, str]]]:
    """``(tokenized examples, rows)`` of alpaca rows."""
    from qlora_kernels.train.data import Example, tokenize_segments
    from qlora_kernels.train.templates import alpaca_prompt

    out = []
    for r in rows:
        ids, labels = tokenize_segments([(alpaca_prompt(r["instruction"], r.get("input") or ""), False),
                                         (r["output"], True)], tokenizer, add_eos=True)
        out.append(Example(ids, labels, ""))
    return out, rows


def build(provider: str, base: Path, seed: int) -> torch.nn.Module:
    """The provider's model with fresh adapters (initialised from ``seed``), fp32."""
    torch.manual_seed(seed)
    if provider == "qlora":
        import qlora_kernels as qk

        model = qk.load_4bit_model(base, dtype=torch.float32)
        torch.manual_seed(seed)
        return qk.apply_qlora(model, r=R, lora_alpha=ALPHA, lora_dropout=0.0)
    import peft
    import transformers

    kw: dict[str, Any] = {"dtype": torch.float32}
    if provider == "bnb":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kw["device_map"] = "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(base, **kw)
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))


def knowledge_task(out: Path, people: int, quick: bool, eval_rows: int) -> tuple[Path, Any, list[Any], list[Any],
                                                                               list[dict[str, str]]]:
    """``(base, tokenizer, train examples, eval examples, eval rows)`` of the knowledge task (its base built into
    ``out / "bases"`` on first use): the fine-tune asks about half the people, the eval about the others."""
    import _knowledge
    from transformers import AutoTokenizer

    shape = dict(hidden=128, layers=2, epochs=40) if quick else dict(hidden=256, layers=4, epochs=60)
    base = _knowledge.build_base(out / "bases", people, **shape)
    tokenizer = AutoTokenizer.from_pretrained(base)
    world = _knowledge.make_world(people)
    train, _ = tokenized(world.rows(world.train_people), tokenizer)
    evals, rows = tokenized(world.rows(world.eval_people)[:eval_rows], tokenizer)
    return base, tokenizer, train, evals, rows


def base_recall(base: Path, tokenizer: Any, people: int) -> dict[str, dict[str, float]]:
    """What the pretrained base knows of the held-out people before any fine-tune, dense (fp32) and in NF4 (our
    quantization): the share of "NAME lives in" / "NAME works as a" whose next token is the fact, and the mean
    negative log-likelihood of the fact."""
    import _knowledge
    import transformers

    import qlora_kernels as qk

    world = _knowledge.make_world(people)
    models = {"dense": transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
              "nf4": qk.load_4bit_model(base, dtype=torch.float32)}
    return {name: _knowledge.recall(m, tokenizer, world, world.eval_people) for name, m in models.items()}


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The sum of next-token cross-entropy over the batch's target tokens, and their number."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def train_and_eval(provider: str, base: Path, train: list[Any], evals: list[Any], eval_rows: list[dict[str, str]],
                   tokenizer: Any, seed: int, steps: int, batch: int, lr: float) -> dict[str, Any]:
    from qlora_kernels.demo.run import exact_match
    from qlora_kernels.train.data import collate

    model = build(provider, base, seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warmup if s < warmup else 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup)))))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    pad = tokenizer.pad_token_id
    t0 = time.perf_counter()
    for step in range(steps):
        idx = [order[(step * batch + i) % len(order)] for i in range(batch)]
        loss, n = _loss(model, collate([train[i] for i in idx], pad))
        opt.zero_grad(set_to_none=True)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(evals), 32):
            loss, n = _loss(model, collate(evals[s:s + 32], pad))
            total, count = total + float(loss), count + n
    em = exact_match(model, tokenizer, eval_rows)[0]
    return {"provider": provider, "seed": seed, "eval_loss": total / count, "exact_match": em,
            "train_seconds": round(seconds, 1)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p in PROVIDERS:
        mine = [r for r in runs if r["provider"] == p]
        if not mine:
            continue
        losses, ems = [r["eval_loss"] for r in mine], [r["exact_match"] for r in mine]
        rows.append({"provider": p, "seeds": [r["seed"] for r in mine], "eval_loss": statistics.mean(losses),
                     "eval_loss_spread": max(losses) - min(losses), "exact_match": statistics.mean(ems),
                     "exact_match_spread": max(ems) - min(ems), "eval_losses": losses, "exact_matches": ems})
    ref = next((r for r in rows if r["provider"] == "lora16"), None)
    for r in rows:
        if ref is not None:
            r["eval_loss_gap_pct"] = 100 * (r["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"]
            r["exact_match_gap_pts"] = 100 * (r["exact_match"] - ref["exact_match"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_out", help="folder for fidelity.json and fidelity.png")
    ap.add_argument("--quick", action="store_true", help="40 steps, seeds 0,1, 60 eval rows; knowledge: 300 people "
                    "and a smaller base (the tests)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps (default %(default)s, the demo's)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds, comma separated (default %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="rows a step (default %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default %(default)s)")
    ap.add_argument("--eval-rows", type=int, default=200, help="held-out rows (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma separated, of " + ", ".join(PROVIDERS))
    ap.add_argument("--task", choices=("demo", "knowledge"), default="demo",
                    help="demo: the demo's translation task; knowledge: questions whose answers only the pretrained "
                    "base knows (benchmarks/_knowledge.py; its base is pretrained into --out on first use)")
    ap.add_argument("--people", type=int, default=None, help="knowledge task: people in its world (default 2000; "
                    "300 with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.eval_rows = 40, "0,1", 60
    if args.people is None:
        args.people = 300 if args.quick else 2000
    if args.people < 2:
        ap.error(f"--people: expected at least 2 (half are asked about in the fine-tune), got {args.people}")
    torch.set_num_threads(args.threads)
    from _common import ResultFile, environment, load_bnb, pyplot
    from transformers import AutoTokenizer

    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        ap.error(f"--providers: unknown {bad}; choose from {', '.join(PROVIDERS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    stem = "fidelity" if args.task == "demo" else "fidelity_knowledge"
    settings = ("steps", "seeds", "batch", "lr", "eval_rows") + (("people",) if args.task == "knowledge" else ())
    results = ResultFile(out / f"{stem}.json", quick=args.quick, env=environment("cpu"), task=args.task,
                         settings={k: getattr(args, k) for k in settings})
    bnb, why = load_bnb("cpu")
    if bnb is None and "bnb" in providers:
        providers.remove("bnb")
        results.set(bnb_skipped=why)
    if args.task == "demo":
        from qlora_kernels.demo import synthetic

        base = synthetic.BASE_MODEL_DIR
        tokenizer = AutoTokenizer.from_pretrained(base)
        train, _ = examples(synthetic.TRAIN_FILE, tokenizer)
        evals, eval_rows = examples(synthetic.EVAL_FILE, tokenizer, args.eval_rows)
    else:
        base, tokenizer, train, evals, eval_rows = knowledge_task(out, args.people, args.quick, args.eval_rows)
        results.set(base=base.name, base_recall=base_recall(base, tokenizer, args.people))
    runs = []
    for seed in seeds:
        for p in providers:
            runs.append(train_and_eval(p, base, train, evals, eval_rows, tokenizer, seed, args.steps, args.batch,
                                       args.lr))
            results.add("runs", runs[-1])
    rows = summarize(runs)
    results.set(rows=rows)
    results.done()
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
        names = [r["provider"] for r in rows]
        ax[0].bar(names, [r["eval_loss"] for r in rows], yerr=[r["eval_loss_spread"] / 2 for r in rows])
        ax[0].set_title("eval loss")
        ax[1].bar(names, [r["exact_match"] for r in rows], yerr=[r["exact_match_spread"] / 2 for r in rows])
        ax[1].set_title("exact match")
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
    print(f"fidelity on the {args.task} task: {args.steps} steps of {args.batch} rows, seeds {seeds}, {len(eval_rows)} "
          "held-out rows; gaps against lora16 (16-bit LoRA on the dense base)")
    print(f"{'provider':8s} {'eval loss':>10s} {'spread':>8s} {'gap %':>7s} {'exact':>7s} {'spread':>7s} "
          f"{'gap pts':>8s}")
    for r in rows:
        print(f"{r['provider']:8s} {r['eval_loss']:10.4f} {r['eval_loss_spread']:8.4f} "
              f"{r.get('eval_loss_gap_pct', 0.0):7.2f} {r['exact_match']:7.3f} {r['exact_match_spread']:7.3f} "
              f"{r.get('exact_match_gap_pts', 0.0):8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
