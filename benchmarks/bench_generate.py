"""Generation through transformers' ``generate()``: prefill and decode tokens per second, one process.

    python benchmarks/bench_generate.py --out bench_out            # hidden 1024 and 2048, batch 1, 8, 32
    python benchmarks/bench_generate.py --quick --out bench_out    # a tiny model, batch 1 and 2 (the tests)

Providers, each on its best path, all built from one random Llama saved once as bf16 safetensors (so the 4-bit
ones quantize the same weights into the same bytes):

* ``bf16``: the dense model (``from_pretrained``, bf16);
* ``ours``: ``qk.load_4bit_model`` (NF4, double quantization, blocksize 64), and ``ours+lora`` with
  ``qk.apply_qlora`` (r 16 on every linear layer, adapters live: B is not zero);
* ``bnb``: transformers' bitsandbytes 4-bit model (NF4, double quantization, bf16 compute) in eval mode, which on
  a CPU repacks its weights at the first call (its inference path), and ``bnb+peft`` with PEFT's LoRA (r 16, all
  linear layers).

Method: greedy decoding (``do_sample=False``) of ``--new-tokens`` tokens after a ``--prompt-len`` prompt, under
``torch.inference_mode()``, every model in eval mode, each provider with each of ``--caches`` (transformers'
dynamic cache; its static cache with the decode step compiled, which transformers declines for a bitsandbytes
model: that one runs eagerly), ratios taken against each peer's best cache. ``prefill_tok_s`` = batch x prompt
tokens / the time of ``generate(max_new_tokens=1)``; ``decode_tok_s`` = batch x (new tokens - 1) / (the time of
the full ``generate`` minus that); medians of ``--reps`` runs, all models built first and timed in turn within
each run (a slow spell of the machine hits every provider alike), after a warm-up that also gives the tokens
compared. ``tokens_equal_ours`` (on the bnb rows): the share of sequences whose greedy tokens equal ours (same
bytes; a random model's near-ties can flip a token, its bf16 rounding differs from ours), and
``tokens_equal_ours_ties_aside`` (dynamic cache): equal, or first different at a step where ours' top-2 logits are
within ``TIE_LOGITS``;
``tokens_equal_merged``: ours+lora against its own dense merge (``qk.merge_and_unload``). Writes
``generate.json`` (after every row) and ``generate.png`` to --out and prints the table last. Timing never
decides a test.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResultFile, environment, load_bnb, pyplot  # noqa: E402

import qlora_kernels as qk  # noqa: E402
from qlora_kernels.generation import CACHES, cache_kwargs  # noqa: E402

PROVIDERS = ("bf16", "ours", "ours+lora", "bnb", "bnb+peft")


def save_model(out: Path, hidden: int, layers: int, vocab: int, seed: int) -> Path:
    """A random Llama (Llama-3 proportions: MLP 3.5x hidden rounded to 256, head dim 64, 4 query heads per KV head)
    saved as bf16 safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=(hidden * 7 // 2 + 255) // 256 * 256,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # live, not-tiny logits: greedy tokens are then mostly not ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _live_adapters(model: torch.nn.Module, seed: int) -> None:
    """Non-zero LoRA B (PEFT and apply_qlora start it at zero): the adapted model differs from its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(provider: str, path: Path, bnb_ok: bool, seed: int) -> torch.nn.Module | None:
    from transformers import AutoModelForCausalLM

    if provider == "bf16":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif provider in ("ours", "ours+lora"):
        model = qk.load_4bit_model(path)
        if provider == "ours+lora":
            model = qk.apply_qlora(model, r=16, lora_alpha=16, target_modules="all-linear")
            _live_adapters(model, seed)
    elif not bnb_ok:
        return None
    else:
        from transformers import BitsAndBytesConfig

        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
        if provider == "bnb+peft":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
            _live_adapters(model, seed)
    return model.eval()


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int,
             cache: str = "dynamic") -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, **cache_kwargs(cache))


def run(args: argparse.Namespace, results: ResultFile) -> None:
    bnb, why = load_bnb("cpu") if not args.no_bnb else (None, "--no-bnb")
    if bnb is None:
        results.set(bnb_skipped=why)
        print(f"bitsandbytes not measured: {why}", file=sys.stderr)
    for hidden in args.hidden:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_model(Path(tmp) / "model", hidden, args.layers, args.vocab, args.seed)
            models = {p: m for p in PROVIDERS if (m := build(p, path, bnb is not None, args.seed)) is not None}
            g = torch.Generator().manual_seed(args.seed)
            for batch in args.batches:
                ids = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=g)
                mask = torch.ones_like(ids)
                runs = [(p, c) for p in models for c in args.caches]
                tokens = {}
                for p, c in runs:  # the warm-up (and, with the static cache, the compiles of both lengths)
                    generate(models[p], ids, mask, 1, c)
                    tokens[p, c] = generate(models[p], ids, mask, args.new_tokens, c)[:, ids.shape[1]:]
                gaps = _top2_gaps(models["ours"], ids, mask, args.new_tokens) if "ours" in models else None
                t_pre: dict[tuple, list[float]] = {r: [] for r in runs}
                t_all: dict[tuple, list[float]] = {r: [] for r in runs}
                for _ in range(args.reps):  # the providers interleaved: a slow spell of the machine hits them all
                    for p, c in runs:
                        t0 = time.perf_counter()
                        generate(models[p], ids, mask, 1, c)
                        t1 = time.perf_counter()
                        generate(models[p], ids, mask, args.new_tokens, c)
                        t_pre[p, c].append(t1 - t0)
                        t_all[p, c].append(time.perf_counter() - t1)
                for p, c in runs:
                    pre, full = statistics.median(t_pre[p, c]), statistics.median(t_all[p, c])
                    row = {"hidden": hidden, "layers": args.layers, "batch": batch, "provider": p, "cache": c,
                           "prefill_tok_s": batch * args.prompt_len / pre,
                           "decode_tok_s": batch * (args.new_tokens - 1) / max(full - pre, 1e-9),
                           "decode_ms_per_step": (full - pre) / (args.new_tokens - 1) * 1e3}
                    if p == "bnb" and ("ours", c) in tokens:
                        row["tokens_equal_ours"] = _share_equal(tokens["ours", c], tokens[p, c])
                        if c == "dynamic" and gaps is not None:
                            row["tokens_equal_ours_ties_aside"] = _share_equal_ties_aside(
                                tokens["ours", c], tokens[p, c], gaps, TIE_LOGITS)
                    if p == "ours+lora":
                        merged = qk.merge_and_unload(copy.deepcopy(models[p])).eval()
                        ref = generate(merged, ids, mask, args.new_tokens)[:, ids.shape[1]:]
                        row["tokens_equal_merged"] = _share_equal(tokens[p, c], ref)
                        del merged
                    if p.startswith("ours") and c != "dynamic":
                        row["tokens_equal_dynamic"] = _share_equal(tokens[p, c], tokens[p, "dynamic"]) if (
                            (p, "dynamic") in tokens) else None
                    results.add("rows", row)
                    print(f"  h={hidden} batch={batch} {p} ({c} cache): prefill {row['prefill_tok_s']:.0f} tok/s, "
                          f"decode {row['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
            del models


#: A step whose top-2 logits (ours) are closer than this is a near-tie: two providers that round differently may
#: take either token there. 0.25 is ~4x the largest logit difference measured between ours and bitsandbytes on
#: the same bytes on this benchmark's models (0.06-0.07, benchmarks/RESULTS.md).
TIE_LOGITS = 0.25


def _top2_gaps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    """[batch, new] top-1 minus top-2 logit of each greedy step of ``model`` (dynamic cache)."""
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    top2 = torch.stack([lg.float().topk(2, dim=-1).values for lg in out.logits], dim=1)  # [batch, new, 2]
    return top2[..., 0] - top2[..., 1]


def _share_equal_ties_aside(a: torch.Tensor, b: torch.Tensor, gaps: torch.Tensor, tie: float) -> float:
    """The share of sequences that are equal, or first differ at a step where ``a``'s top-2 logits are within ``tie``
    (a near-tie: after it the two continue from different tokens, so the rest says nothing)."""
    same = 0
    for i in range(a.shape[0]):
        diff = (a[i] != b[i]).nonzero()
        same += int(diff.numel() == 0 or gaps[i, int(diff[0])] < tie)
    return same / a.shape[0]


def _share_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of sequences (rows) whose tokens are all equal."""
    return (a == b).all(dim=1).float().mean().item()


def table(res: dict) -> str:
    rows = res.get("rows", [])
    lines = [f"generate(): greedy, {res.get('new_tokens')} new tokens after {res.get('prompt_len')} prompt tokens, "
             f"{res.get('layers')} layers, vocab {res.get('vocab')}; decode tok/s ratios: ours to the peer's best "
             "cache (its best path), > 1 is faster (ours+lora against bnb+peft)",
             f"{'hidden':>6} {'batch':>5} {'provider':>10} {'cache':>8} {'prefill':>9} {'decode':>9} {'ms/step':>8} "
             f"{'vs bnb':>7} {'vs bf16':>7}"]
    best: dict[tuple, float] = {}
    for r in rows:
        key = (r["hidden"], r["batch"], r["provider"])
        best[key] = max(best.get(key, 0.0), r["decode_tok_s"])
    for r in rows:
        key = (r["hidden"], r["batch"])
        peer = "bnb+peft" if r["provider"] == "ours+lora" else "bnb"
        vs_bnb = vs_bf16 = ""
        if r["provider"].startswith("ours"):
            if (*key, peer) in best:
                vs_bnb = f"{r['decode_tok_s'] / best[(*key, peer)]:.2f}x"
            if (*key, "bf16") in best:
                vs_bf16 = f"{r['decode_tok_s'] / best[(*key, 'bf16')]:.2f}x"
        lines.append(f"{r['hidden']:>6} {r['batch']:>5} {r['provider']:>10} {r.get('cache', 'dynamic'):>8} "
                     f"{r['prefill_tok_s']:>9.0f} {r['decode_tok_s']:>9.1f} {r['decode_ms_per_step']:>8.2f} "
                     f"{vs_bnb:>7} {vs_bf16:>7}")
    eq = [(r["hidden"], r["batch"], k, r[k]) for r in rows
          for k in ("tokens_equal_ours", "tokens_equal_ours_ties_aside", "tokens_equal_merged", "tokens_equal_dynamic")
          if r.get(k) is not None]
    if eq:
        names = {"tokens_equal_ours": "bnb = ours", "tokens_equal_ours_ties_aside": "bnb = ours ties aside",
                 "tokens_equal_merged": "ours+lora = its dense merge", "tokens_equal_dynamic": "static = dynamic cache"}
        lines.append("greedy sequences equal: " + "; ".join(f"h={h} b={b} {names[k]} {v:.2f}" for h, b, k, v in eq))
    if res.get("bnb_skipped"):
        lines.append(f"bitsandbytes not measured: {res['bnb_skipped']}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = res.get("rows", [])
    groups = sorted({(r["hidden"], r["batch"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(PROVIDERS)
    for i, provider in enumerate(PROVIDERS):
        vals = [next((r["decode_tok_s"] for r in rows if (r["hidden"], r["batch"]) == gr and r["provider"] == provider),
                     0.0) for gr in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=provider)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"h={h}\nbatch {b}" for h, b in groups])
    ax.set_ylabel("decode tok/s")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_out", help="folder for generate.json and generate.png")
    ap.add_argument("--quick", action="store_true", help="hidden 64, 2 layers, batch 1 and 2, 4 new tokens")
    ap.add_argument("--hidden", default="1024,2048", help="comma list of hidden sizes")
    ap.add_argument("--batches", default="1,8,32", help="comma list of batch sizes")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    ap.add_argument("--caches", default="dynamic,static",
                    help="comma list of KV caches, each provider timed with each: dynamic, static (the decode step "
                         "compiled by torch.compile, as qlora_kernels.generation's cache='static'; transformers "
                         "declines to compile a bitsandbytes model and runs its static cache eagerly)")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.batches, args.layers, args.vocab = "64", "1,2", 2, 512
        args.prompt_len, args.new_tokens, args.reps, args.caches = 8, 4, 1, "dynamic"
    args.caches = [c.strip() for c in str(args.caches).split(",") if c.strip()]
    if not args.caches or any(c not in CACHES for c in args.caches):
        ap.error(f"--caches takes a comma list of {', '.join(CACHES)}; got {','.join(args.caches)!r}")
    try:
        args.hidden = [int(v) for v in str(args.hidden).split(",")]
        args.batches = [int(v) for v in str(args.batches).split(",")]
    except ValueError:
        ap.error(f"--hidden and --batches take comma lists of integers; got {args.hidden!r}, {args.batches!r}")
    if min(args.hidden) < 64 or min(args.hidden) % 64 or min(args.batches) < 1 or args.new_tokens < 2:
        ap.error("--hidden: multiples of 64; --batches: >= 1; --new-tokens: >= 2")
    out = Path(args.out)
    results = ResultFile(out / "generate.json", quick=args.quick, env=environment("cpu"), layers=args.layers,
                         vocab=args.vocab, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    run(args, results)
    results.done()
    plot(results.data, out / "generate.png")
    print(table(results.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
