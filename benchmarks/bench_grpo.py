"""GRPO steps per second, rollout tokens per second and peak memory: our trainer against TRL's GRPOTrainer.

    python benchmarks/bench_grpo.py --out bench_out            # 6 timed steps after 1 warm-up, each provider twice
    python benchmarks/bench_grpo.py --quick --out bench_out    # 2 steps, 8 new tokens (the tests)

Providers, each on the path its users run, the same model, prompts, reward and settings (the demo's tiny Llama, fp32,
shipped in qlora_kernels/demo/data/tiny_llama, or with ``--hidden H`` a random Llama of that width, ``--layers``
layers, MLP 2H and the demo's tokenizer, where the weights and not the Python cost dominate; ``--prompts`` prompts a
step, ``--generations`` completions each,
``--new-tokens`` new tokens at most, temperature 1, beta 0, loss_type dapo, one generation a step, LoRA r 8 on every
linear layer, AdamW):

* ``ours``: ``qlora-kernels train`` with ``objective: grpo`` (the base in NF4 via ``load_4bit_model``, rollouts
  through ``qlora_kernels.generation.generate`` with the adapters live);
* ``trl+bnb``: TRL's ``GRPOTrainer`` + PEFT on transformers' bitsandbytes 4-bit model (NF4, double quantization),
  generating with transformers;
* ``trl+ours``: TRL's ``GRPOTrainer`` on our model through the PEFT route (``QLoraKernelsConfig`` +
  ``qlora_kernels.hf.LoraConfig``).

On a GPU (``--device``, default cuda when there is one) every provider runs there and the peak CUDA memory is
recorded too. Each provider runs in its own process (so that its peak RSS is its own), in turn, ``--rounds`` times
(a slow spell of the machine hits every provider alike); a step's time is measured from the end of the previous
step, the first ``--warmup`` steps left out; the medians are reported. Memory: the peak RSS of the process, and that
less the RSS right after ``import torch`` (the libraries every provider maps alike, ~700 MB for a CUDA build of torch
on the CPU), which is what the provider itself adds. ``tok_s`` counts the completion tokens of a
step over the step's time (rollout and training); ``rollout_tok_s`` (ours) the completion tokens over the generation
time alone.
Writes ``grpo.json`` and ``grpo.png`` to --out and prints the table last. Timing never decides a test.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

PROVIDERS = ("ours", "trl+bnb", "trl+ours")


def write_prompts(path: Path, n: int) -> Path:
    """Translation prompts of the demo's languages (raw ``<sentence> =``, the base model's format) with answers."""
    from qlora_kernels.demo import synthetic
    from qlora_kernels.train.data import write_jsonl

    langs, rng = synthetic.make_languages(), random.Random(3)
    rows = []
    for _ in range(n):
        s = synthetic.sentence(langs, rng)
        rows.append({"prompt": f"{s} =", "answer": synthetic.translate(langs, s, "zil")})
    return write_jsonl(rows, path)


def first_line_exact(prompts: list[Any], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 where a completion's first line is the translation."""
    return [float(c.split("\n")[0].strip() == a.strip()) for c, a in zip(completions, answer)]


def model_dir(args: argparse.Namespace) -> str:
    """The model every provider loads: ``--model`` (the parent's random Llama), else the demo's tiny Llama."""
    from qlora_kernels.demo import synthetic

    return args.model or str(synthetic.BASE_MODEL_DIR)


def run_ours(args: argparse.Namespace, prompts: Path, out: Path) -> dict[str, Any]:
    from qlora_kernels.train import load_config, train

    steps = args.warmup + args.steps
    cfg = load_config(raw={
        "base_model": model_dir(args), "objective": "grpo", "output_dir": str(out),
        "datasets": [{"path": str(prompts), "type": "prompt"}], "reward_funcs": [f"{__file__}:first_line_exact"],
        "num_generations": args.generations, "max_completion_length": args.new_tokens, "temperature": 1.0,
        "beta": 0.0, "loss_type": "dapo", "lora_r": 8, "lora_alpha": 16, "sequence_len": 128,
        "micro_batch_size": args.prompts * args.generations, "max_steps": steps, "learning_rate": 1e-5,
        "warmup_steps": 0, "lr_scheduler": "constant", "optimizer": "adamw_torch", "seed": 0, "progress_bar": False,
        "bf16": False, "device": args.device})
    marks = [time.perf_counter()]
    train(cfg, quiet=True, on_step_end=lambda step, rec: marks.append(time.perf_counter()))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    return {"step_s": [b - a for a, b in zip(marks, marks[1:])],
            "tokens": [r["completions/mean_length"] * args.prompts * args.generations for r in recs],
            "rollout_tok_s": [r["rollout_tokens_per_s"] for r in recs]}


def run_trl(args: argparse.Namespace, prompts: Path, out: Path, base: str) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    import trl

    path = model_dir(args)
    if base == "bnb":
        import peft

        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32,
                                                                  device_map=args.device)
        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        from qlora_kernels.hf import LoraConfig, QLoraKernelsConfig

        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=QLoraKernelsConfig(),
                                                                  dtype=torch.float32).to(args.device)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    steps = args.warmup + args.steps
    config = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.prompts * args.generations,
                            num_generations=args.generations, max_completion_length=args.new_tokens, temperature=1.0,
                            beta=0.0, loss_type="dapo", learning_rate=1e-5, max_steps=steps, logging_steps=1,
                            report_to=[], use_cpu=args.device == "cpu", bf16=False, save_strategy="no", seed=0,
                            gradient_checkpointing=False)
    marks: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer = trl.GRPOTrainer(model=model, reward_funcs=[first_line_exact], args=config, processing_class=tok,
                              train_dataset=datasets.Dataset.from_list(rows), peft_config=lora, callbacks=[Clock()])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"step_s": [b - a for a, b in zip(marks, marks[1:])],
            "tokens": [r["completions/mean_length"] * args.prompts * args.generations for r in logs]}


def child(args: argparse.Namespace) -> int:
    """Run one provider in this process and print its JSON (the parent's --provider call)."""
    import torch

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the libraries mapped by the import
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = write_prompts(Path(tmp) / "prompts.jsonl", 64)
        if args.provider == "ours":
            res = run_ours(args, prompts, Path(tmp) / "out")
        else:
            res = run_trl(args, prompts, Path(tmp) / "out", "bnb" if args.provider == "trl+bnb" else "ours")
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["added_rss_mib"] = res["peak_rss_mib"] - base_rss
    if args.device == "cuda":
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res))
    return 0


def summarize(provider: str, runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    step_s = [t for r in runs for t in r["step_s"][warmup:]]
    tok_s = [n / t for r in runs for n, t in zip(r["tokens"][warmup:], r["step_s"][warmup:])]
    row = {"provider": provider, "steps_per_s": 1 / statistics.median(step_s), "step_s": statistics.median(step_s),
           "tok_s": statistics.median(tok_s), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
           "added_rss_mib": max(r["added_rss_mib"] for r in runs),
           "rounds": len(runs)}
    if "rollout_tok_s" in runs[0]:
        row["rollout_tok_s"] = statistics.median([v for r in runs for v in r["rollout_tok_s"][warmup:]])
    if "peak_cuda_mib" in runs[0]:
        row["peak_cuda_mib"] = max(r["peak_cuda_mib"] for r in runs)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_out", help="folder for grpo.json and grpo.png")
    ap.add_argument("--quick", action="store_true", help="2 steps, 8 new tokens, one round (the tests)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the timing (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each provider, in turn (default %(default)s)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts a step (default %(default)s)")
    ap.add_argument("--generations", type=int, default=4, help="completions a prompt (default %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=24, help="most new tokens a completion (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where every provider runs (auto: cuda if available)")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help="comma-separated subset of " + ", ".join(PROVIDERS))
    ap.add_argument("--hidden", type=int, default=0,
                    help="a random Llama of this width instead of the demo's tiny Llama (0, the default)")
    ap.add_argument("--layers", type=int, default=4, help="its layers (with --hidden; default %(default)s)")
    ap.add_argument("--provider", help=argparse.SUPPRESS)  # internal: run one provider in this process
    ap.add_argument("--model", help=argparse.SUPPRESS)  # internal: the parent's random Llama
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.new_tokens, args.rounds, args.warmup = 2, 8, 1, 1
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.provider:
        return child(args)

    from _common import ResultFile, environment, load_bnb, pyplot

    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        ap.error(f"--providers: unknown {bad}; choose from {', '.join(PROVIDERS)}")
    out = Path(args.out)
    results = ResultFile(out / "grpo.json", quick=args.quick, env=environment(args.device),
                         settings={k: getattr(args, k) for k in ("steps", "warmup", "rounds", "prompts", "generations",
                                                                  "new_tokens", "threads", "hidden", "layers")})
    bnb, why = load_bnb(args.device)
    if bnb is None and "trl+bnb" in providers:
        providers.remove("trl+bnb")
        results.set(bnb_skipped=why)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in providers}
    tmp = tempfile.TemporaryDirectory()
    model_args: list[str] = []
    if args.hidden:
        from qlora_kernels.demo.synthetic import save_random_model

        model_args = ["--model", str(save_random_model(Path(tmp.name) / "model", hidden_size=args.hidden,
                                                       num_layers=args.layers))]
    for _ in range(args.rounds):
        for p in providers:
            cmd = [sys.executable, __file__, "--provider", p, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--prompts", str(args.prompts), "--generations", str(args.generations), "--new-tokens",
                   str(args.new_tokens), "--threads", str(args.threads), "--device", args.device, *model_args]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"provider {p} failed (exit {proc.returncode})")
            runs[p].append(json.loads(line[len("RESULT "):]))
    tmp.cleanup()
    rows = [summarize(p, r, args.warmup) for p, r in runs.items()]
    ours = next((r for r in rows if r["provider"] == "ours"), None)
    for r in rows:
        if ours is not None:
            r["ours_speedup"] = ours["steps_per_s"] / r["steps_per_s"]
            r["ours_memory_ratio"] = ours["peak_rss_mib"] / r["peak_rss_mib"]
            r["ours_added_memory_ratio"] = ours["added_rss_mib"] / r["added_rss_mib"]
        results.add("rows", r)
    results.done()
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        names = [r["provider"] for r in rows]
        ax[0].bar(names, [r["steps_per_s"] for r in rows])
        ax[0].set_title("GRPO steps / s")
        ax[1].bar(names, [r["added_rss_mib"] for r in rows])
        ax[1].set_title("peak RSS above the torch import (MiB)")
        fig.tight_layout()
        fig.savefig(out / "grpo.png", dpi=120)
    model = f"a random Llama, hidden {args.hidden}, {args.layers} layers" if args.hidden else "the demo's tiny Llama"
    print(f"GRPO on {model} (fp32), {args.prompts} prompts x {args.generations} completions a step, up "
          f"to {args.new_tokens} new tokens; medians of {args.steps} steps x {args.rounds} rounds "
          f"({results.data['env'].get('device')}, {args.threads} threads)")
    print(f"{'provider':10s} {'steps/s':>8s} {'step s':>7s} {'tok/s':>7s} {'rollout tok/s':>13s} {'peak RSS MiB':>12s} "
          f"{'added MiB':>9s} {'ours x':>7s} {'ours mem x':>10s} {'added x':>7s}")
    for r in rows:
        print(f"{r['provider']:10s} {r['steps_per_s']:8.3f} {r['step_s']:7.2f} {r['tok_s']:7.0f} "
              f"{r.get('rollout_tok_s', float('nan')):13.0f} {r['peak_rss_mib']:12.0f} {r['added_rss_mib']:9.0f} "
              f"{r.get('ours_speedup', 1):7.2f} {r.get('ours_memory_ratio', 1):10.2f} "
              f"{r.get('ours_added_memory_ratio', 1):7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
