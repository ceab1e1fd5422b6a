"""End to end: one QLoRA training step of a Llama-shaped model, qlora_kernels' trainer vs transformers + PEFT +
bitsandbytes, same settings, in one run: tokens/s and peak device memory.

    python benchmarks/bench_e2e.py --out bench_out/e2e                 # GPU: the 1B and 8B shapes, batch 4 x 2048
    python benchmarks/bench_e2e.py --shapes 8b --out bench_out/e2e     # one shape
    python benchmarks/bench_e2e.py --quick --out bench_out/e2e         # CPU smoke run: a tiny Llama, seconds

The model is ``LlamaForCausalLM`` built from a config (random weights, seeded, the same bf16 weights for both
providers, so their 4-bit codes are identical): ``1b`` has Llama-3.2-1B's shape (16 layers, width 2048, MLP
8192, 32/8 heads), ``8b`` Llama-3-8B's (32 layers, 4096, 14336, 32/8), both with a 128,256-token vocabulary and
untied embeddings (as the measurements in docs/PERFORMANCE.md). LoRA r = 16, alpha = 16, no dropout, on all
seven projections (q, k, v, o, gate, up, down); gradient checkpointing (non-reentrant); batch 4 x 2048 random
tokens, every token a target; bf16 autocast over bf16 frozen weights; gradient clipping at 1.0.

Providers:

* ``qlora_kernels``: ``apply_qlora`` (NF4, blocksize 64, double quant), and the step the trainer runs
  (``qlora_kernels.train``): ``model_loss`` (decoder, then the chunked cross-entropy over the hidden states:
  no full-vocabulary logits), backward, clipping, then the configured optimizer (default the trainer's
  ``paged_adamw``: ``qlora_kernels.PagedAdamW``).
* ``hf_peft_bnb``: the projections replaced by ``bitsandbytes.nn.Linear4bit`` (nf4, compress_statistics,
  bf16 compute), ``peft.get_peft_model`` with the same ``LoraConfig``, ``model(input_ids, labels=...).loss``
  (full logits, upcast to fp32 by transformers), torch's fused AdamW (as the anchors were measured).

Timing: a few warm-up steps (optimizer states allocated), then the median of ``--steps`` synchronized steps.
Peak memory: ``torch.cuda.max_memory_allocated`` over those steps, counting the weights, adapters, optimizer
states, activations and everything made on the way (``weights`` is what the model holds before the first
step). On the CPU (``--quick``): wall-clock medians and no memory column. Prints a table last; writes
``e2e.json`` to ``--out``. Timing never decides a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qlora_kernels as qk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResultFile, environment, load_bnb  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "quick": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}
# transformers + PEFT + bitsandbytes on an H200 (docs/PERFORMANCE.md): tokens/s, peak GiB; and the targets
ANCHORS_H200 = {"1b": (26253, 14.0), "8b": (6367, 19.8)}
TARGET_SPEEDUP, TARGET_MEMORY = 1.3, 0.7
PROVIDERS = ("qlora_kernels", "hf_peft_bnb")


def llama_config(shape: str, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 2048), rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa",
                       bos_token_id=1, eos_token_id=2)


def build_dense(shape: str, seq_len: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """The random-weight Llama in ``dtype`` on ``device`` (identical for a given seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape, seq_len))
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, as the trainer turns it on."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Ours:
    """qlora_kernels: ``apply_qlora`` and the trainer's step (``model_loss`` with the chunked cross-entropy)."""

    def __init__(self, dense: nn.Module, args, amp: torch.dtype | None) -> None:
        from qlora_kernels.train.loss import model_loss

        self.model = qk.apply_qlora(dense, r=args.r, lora_alpha=args.r, lora_dropout=0.0,
                                    target_modules=PROJECTIONS, blocksize=64, double_quant=True)
        enable_checkpointing(self.model)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        kw = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        if args.optimizer == "paged_adamw":
            self.opt = qk.PagedAdamW(self.params, **kw)
        else:
            self.opt = torch.optim.AdamW(self.params, fused=self.params[0].is_cuda, **kw)
        self.amp, self.loss_fn = amp, model_loss

    def step(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
        with _autocast(ids.device, self.amp):
            s, n = self.loss_fn(self.model, ids, mask, labels)
        loss = s / max(1, n)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


class HFPeftBnb:
    """transformers + PEFT + bitsandbytes: ``Linear4bit`` (nf4, double quant), ``get_peft_model``, ``.loss``."""

    def __init__(self, dense: nn.Module, args, amp: torch.dtype | None) -> None:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model

        compute = amp or torch.float32
        for name, lin in list(dense.named_modules()):
            if not (isinstance(lin, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS):
                continue
            device = lin.weight.device
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute, compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64, module=q)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            q = q.to(device)  # quantizes the weight
            parent, child = name.rsplit(".", 1)
            setattr(dense.get_submodule(parent), child, q)
            del lin
        cfg = LoraConfig(r=args.r, lora_alpha=args.r, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none",
                         task_type="CAUSAL_LM")
        self.model = get_peft_model(dense, cfg)
        enable_checkpointing(self.model)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=self.params[0].is_cuda)
        self.amp = amp

    def step(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
        with _autocast(ids.device, self.amp):
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def _autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if amp is None else torch.autocast(device_type=device.type, dtype=amp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(provider: str, shape: str, args, device: torch.device) -> dict[str, Any]:
    """Build the provider's model for ``shape``, run warm-up and timed steps; the row of the table."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    dtype = amp or torch.float32
    B, T = args.batch, args.seq_len
    t0 = time.perf_counter()
    dense = build_dense(shape, T, dtype, device, args.seed)
    runner = (Ours if provider == "qlora_kernels" else HFPeftBnb)(dense, args, amp)
    del dense
    _free(device)
    _sync(device)
    build_s = time.perf_counter() - t0
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    vocab = SHAPES[shape]["vocab_size"]
    ids = torch.randint(0, vocab, (B, T), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    row: dict[str, Any] = dict(provider=provider, shape=shape, batch=B, seq_len=T, r=args.r, build_s=round(build_s, 2),
                               trainable=sum(p.numel() for p in runner.params))
    if provider == "qlora_kernels":
        row["optimizer"] = args.optimizer
    else:
        row["optimizer"] = "adamw_torch_fused" if device.type == "cuda" else "adamw_torch"
    if device.type == "cuda":
        row["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t = time.perf_counter()
        loss = runner.step(ids, mask, labels)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    step_s = statistics.median(times)
    row.update(step_ms=step_s * 1e3, tokens_per_s=B * T / step_s, first_loss=losses[0], last_loss=losses[-1])
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del runner
    _free(device)
    return row


def run(args, out: Path) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    quick = args.quick or device.type == "cpu"
    if quick:
        args.shapes = "quick"
        args.batch, args.seq_len = args.batch or 2, args.seq_len or 64
        args.steps, args.warmup = min(args.steps, 3), 1
    else:
        args.batch, args.seq_len = args.batch or 4, args.seq_len or 2048
    providers = [p for p in args.providers.split(",") if p]
    skipped = {}
    if "hf_peft_bnb" in providers:
        bnb, why = load_bnb(device)
        if bnb is None:
            providers.remove("hf_peft_bnb")
            skipped["hf_peft_bnb"] = why
    env = environment(device)
    env["quick"] = quick
    results = ResultFile(out / "e2e.json", env=env, skipped=skipped, rows=[],
                         targets=dict(speedup=TARGET_SPEEDUP, memory=TARGET_MEMORY), anchors_h200=ANCHORS_H200)
    for shape in args.shapes.split(","):
        for provider in providers:
            try:
                row = measure(provider, shape, args, device)
            except Exception as exc:  # one failing provider must not hide the others
                row = dict(provider=provider, shape=shape, error=f"{type(exc).__name__}: {exc}"[:500])
                _free(device)
            results.add("rows", row)
            print(f"  {shape:5s} {provider:14s} " + (f"{row['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in row
                                                     else row["error"]), file=sys.stderr, flush=True)
    results.done()
    return results.data


def table(result: dict[str, Any]) -> str:
    """The summary table: one line per shape and provider, ours relative to transformers + PEFT + bnb."""
    rows = result["rows"]
    base = {r["shape"]: r for r in rows if r["provider"] == "hf_peft_bnb" and "tokens_per_s" in r}
    lines = [f"end-to-end QLoRA step on {result['env']['device']} (torch {result['env']['torch']}); "
             f"targets vs hf_peft_bnb: >= {TARGET_SPEEDUP}x tokens/s, <= {TARGET_MEMORY}x peak memory",
             f"{'shape':6s} {'provider':14s} {'optimizer':18s} {'tokens/s':>10s} {'step ms':>9s} {'peak GiB':>9s} "
             f"{'weights':>8s} {'loss@1':>8s} {'speed x':>8s} {'mem x':>6s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:6s} {r['provider']:14s} error: {r['error'][:90]}")
            continue
        b = base.get(r["shape"])
        speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b and "peak_gib" in r else "-"
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        weights = f"{r['weights_gib']:.2f}" if "weights_gib" in r else "-"
        lines.append(f"{r['shape']:6s} {r['provider']:14s} {r['optimizer']:18s} {r['tokens_per_s']:>10,.0f} "
                     f"{r['step_ms']:>9.1f} {peak:>9s} {weights:>8s} {r['first_loss']:>8.4f} {speed:>8s} {mem:>6s}")
    lines += [f"skipped: {p}: {why}" for p, why in result.get("skipped", {}).items()]
    for shape, (tps, gib) in ANCHORS_H200.items():
        if shape in base:
            lines.append(f"{shape:6s} {'anchor H200':14s} {'hf_peft_bnb':18s} {tps:>10,d} {'':>9s} {gib:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/e2e", help="directory for e2e.json")
    p.add_argument("--quick", action="store_true", help="a tiny Llama (the CPU mode; implied without CUDA)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    p.add_argument("--shapes", default="1b,8b", help="comma separated: 1b, 8b (quick mode: a tiny shape)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma separated: " + ", ".join(PROVIDERS))
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; 2 in quick mode)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; 64 in quick mode)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = r)")
    p.add_argument("--optimizer", choices=["paged_adamw", "adamw_torch"], default="paged_adamw",
                   help="qlora_kernels' optimizer (the trainer's default: paged_adamw)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    result = run(args, out)
    print(table(result))
    print(f"wrote {out / 'e2e.json'}")
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
