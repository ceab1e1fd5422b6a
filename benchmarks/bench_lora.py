"""One QLoRA layer, forward + backward: qlora_kernels vs bitsandbytes ``matmul_4bit`` + LoRA vs a bf16 weight + LoRA.

    python benchmarks/bench_lora.py --out bench_out/lora            # GPU: M = 8192 tokens, r = 16, the six shapes
    python benchmarks/bench_lora.py --quick --out bench_out/lora    # CPU smoke run: small shapes, seconds

Each provider computes ``y = x W^T + s (x A^T) B^T`` for x [M, K], W [N, K] frozen, A [r, K], B [N, r] trainable,
then ``y.backward(dy)`` (gradients for x, A, B):

* ``qlora_kernels[<backend>]``: :func:`qlora_kernels.lora_linear` on an NF4 weight (blocksize 64, double quant),
  with the backend forced through ``QLORA_KERNELS_BACKEND`` (``auto`` = the default dispatch);
* ``bitsandbytes``: ``bnb.matmul_4bit(x, W4.t(), quant_state)`` plus the LoRA branch as PEFT computes it;
* ``torch_bf16``: ``F.linear(x, W)`` with W in the compute dtype, plus the same LoRA branch.

On CUDA: medians of CUDA-event timings (``triton.testing.do_bench``), weights rotated so that the set the timed loop
walks through is several times the L2 cache, fresh random data, and the peak memory of one forward + backward
(``torch.cuda.max_memory_allocated``, counting the weight, x, dy, the adapters and everything made on the way).
On the CPU: medians of wall-clock times; no memory column. Before timing, each provider's output and gradients are
checked against the bf16 provider (max abs error reported). Prints a table last; writes ``lora.json`` (and
``lora.png`` if matplotlib is present) to ``--out``. Timing never decides a test.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResultFile, cpu_us, do_bench_us, environment, forced_backend, load_bnb  # noqa: E402

import qlora_kernels as qk  # noqa: E402

FULL_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]  # N x K
QUICK_SHAPES = [(256, 256), (64, 256), (896, 256), (256, 896), (512, 512), (1792, 512)]  # the same, / 16
# bitsandbytes + LoRA and bf16 + LoRA on an H200 (ms), docs/PERFORMANCE.md, M = 8192, r = 16
ANCHORS_H200 = {(4096, 4096): (1.15, 1.12), (1024, 4096): (1.00, 0.51), (14336, 4096): (3.60, 3.78),
                (4096, 14336): (3.53, 3.80), (8192, 8192): (4.20, 4.14), (28672, 8192): (13.8, 12.7)}
L2_BYTES = 50 * 2**20  # H100 / H200


def _bnb(device):
    """(bitsandbytes, bitsandbytes.functional); run() has checked that it runs on ``device``."""
    bnb, why = load_bnb(device)  # probed once per device
    if bnb is None:
        raise RuntimeError(f"bitsandbytes unavailable: {why}")
    import bitsandbytes.functional as bnbf

    return bnb, bnbf


class Case:
    """The tensors of one provider for one shape: ``copies`` rotated weight sets, x, dy and adapters."""

    def __init__(self, provider: str, n: int, k: int, m: int, r: int, dtype, device, copies: int, seed: int):
        self.provider, self.n, self.k = provider, n, k
        # Drawn on the device itself (a CPU generator and pageable copies cost a minute at M = 8192).
        g = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

        self.x = randn(m, k).to(dtype).requires_grad_(True)
        self.dy = randn(m, n).to(dtype)
        self.a = (randn(r, k) / math.sqrt(k)).to(dtype).requires_grad_(True)
        self.b = (randn(n, r) * 0.01).to(dtype).requires_grad_(True)
        self.scale = 2.0
        self.weights = []
        gw = torch.Generator(device=device).manual_seed(seed + 1)
        for _ in range(copies):
            w = (torch.randn(n, k, generator=gw, device=device) / math.sqrt(k)).to(dtype)
            if provider.startswith("qlora_kernels"):
                self.weights.append(qk.quantize_nf4(w, blocksize=64, double_quant=True))
            elif provider == "bitsandbytes":
                _, bnbf = _bnb(device)
                self.weights.append(bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
            else:
                self.weights.append(w)
            del w
        self.i = 0

    def forward(self, weight):
        x, a, b, s = self.x, self.a, self.b, self.scale
        if self.provider.startswith("qlora_kernels"):
            return qk.lora_linear(x, weight, a, b, s)
        if self.provider == "bitsandbytes":
            bnb, _ = _bnb(x.device)
            packed, state = weight
            return bnb.matmul_4bit(x, packed.t(), quant_state=state) + (x @ a.t()) @ b.t() * s
        return F.linear(x, weight) + (x @ a.t()) @ b.t() * s

    def step(self):
        weight = self.weights[self.i % len(self.weights)]
        self.i += 1
        y = self.forward(weight)
        y.backward(self.dy)
        return y

    def zero(self):
        for t in (self.x, self.a, self.b):
            t.grad = None


def _check(case: Case, ref: Case) -> float:
    """Max abs error of y, dx, dA, dB against the reference provider (same x, dy, A, B; W from its own bits)."""
    outs = []
    for c in (case, ref):
        c.zero()
        w = c.weights[0]
        if c is ref and case.provider != ref.provider:
            # the reference computes with the weight the quantized provider decodes, so only arithmetic differs
            if case.provider.startswith("qlora_kernels"):
                w = qk.dequantize_nf4(case.weights[0], ref.x.dtype)
            elif case.provider == "bitsandbytes":
                _, bnbf = _bnb(ref.x.device)
                w = bnbf.dequantize_4bit(*case.weights[0]).to(ref.x.dtype)
        y = c.forward(w)
        y.backward(c.dy)
        outs.append([y.detach(), c.x.grad, c.a.grad, c.b.grad])
        c.zero()
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(*outs))


def run(args, out: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    quick = args.quick or device.type == "cpu"
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    m = args.m or (256 if quick else 8192)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    live = {name: st.live for name, st in qk.backends().items()}
    backends = [b for b in args.backends.split(",") if b == "auto" or live.get(b, False)]
    providers = [f"qlora_kernels[{b}]" for b in backends] + ["bitsandbytes", "torch_bf16"]
    skipped = {}
    bnb, bnb_err = load_bnb(device)
    if bnb is None:
        providers.remove("bitsandbytes")
        skipped["bitsandbytes"] = bnb_err
    for b in args.backends.split(","):
        if b != "auto" and not live.get(b, False):
            skipped[f"qlora_kernels[{b}]"] = qk.backends()[b].reason if b in live else "unknown backend"
    env = environment(device)
    env["quick"] = quick
    results = ResultFile(out / "lora.json", env=env, skipped=skipped, rows=[])
    for n, k in shapes:
        for provider in providers:
            backend = provider[len("qlora_kernels["):-1] if provider.startswith("qlora_kernels") else "auto"
            with forced_backend(backend):
                row = dict(provider=provider, n=n, k=k, m=m, r=args.r, dtype=str(dtype).removeprefix("torch."))
                try:
                    row.update(_measure(provider, n, k, m, args, dtype, device, quick))
                except Exception as exc:  # one failing provider must not hide the others
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                results.add("rows", row)
                print(f"  {provider:28s} {n:>6d}x{k:<6d} " + (f"{row['ms']:.3f} ms" if "ms" in row else row["error"]),
                      file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results.done()
    return results.data


def _measure(provider, n, k, m, args, dtype, device, quick) -> dict:
    out = {}
    # correctness first, on one weight copy, against the plain-torch provider
    case = Case(provider, n, k, m, args.r, dtype, device, 1, args.seed)
    ref = Case("torch_bf16", n, k, m, args.r, dtype, device, 1, args.seed)
    out["max_abs_err"] = _check(case, ref)
    del ref
    if device.type == "cuda":
        del case
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case = Case(provider, n, k, m, args.r, dtype, device, 1, args.seed)
        case.step()
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        case.zero()
        weight_bytes = _weight_bytes(case.weights[0])
        copies = max(1, math.ceil(4 * L2_BYTES / max(weight_bytes, 1)))
        del case
        torch.cuda.empty_cache()
        case = Case(provider, n, k, m, args.r, dtype, device, copies, args.seed)
        out["ms"] = do_bench_us(case.step, args.warmup_ms, args.rep_ms, grad_to_none=[case.x, case.a, case.b]) / 1e3
        out["weight_copies"] = copies
    else:
        out["ms"] = cpu_us(lambda: (case.step(), case.zero()), args.reps, warmup=2) / 1e3
    anchor = ANCHORS_H200.get((n, k))
    if anchor and not quick and m == 8192 and args.r == 16:
        out["anchor_h200_bnb_ms"], out["anchor_h200_bf16_ms"] = anchor
    return out


def _weight_bytes(w) -> int:
    if isinstance(w, qk.NF4Weight):
        return w.nbytes
    if isinstance(w, tuple):
        return w[0].numel() * w[0].element_size()
    return w.numel() * w.element_size()


def table(result: dict) -> str:
    rows = [r for r in result["rows"]]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    shapes = list(dict.fromkeys((r["n"], r["k"]) for r in rows))
    by = {(r["provider"], r["n"], r["k"]): r for r in rows}
    mem = any("peak_mib" in r for r in rows)
    head = ["N x K"] + [f"{p} ms" + (" / MiB" if mem else "") for p in providers] + ["ours / bf16"]
    lines = []
    for n, k in shapes:
        cells = [f"{n}x{k}"]
        for p in providers:
            r = by.get((p, n, k), {})
            if "ms" not in r:
                cells.append("error" if "error" in r else "-")
                continue
            cells.append(f"{r['ms']:.3f}" + (f" / {r['peak_mib']:.0f}" if mem and "peak_mib" in r else ""))
        ours = [by[(p, n, k)]["ms"] for p in providers if p.startswith("qlora") and "ms" in by.get((p, n, k), {})]
        bf16 = by.get(("torch_bf16", n, k), {}).get("ms")
        cells.append(f"{min(ours) / bf16:.2f}x" if ours and bf16 else "-")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    env = result["env"]
    out = [f"LoRA layer fwd+bwd, M={rows[0]['m']}, r={rows[0]['r']}, {rows[0]['dtype']}, {env['device']}, "
           f"torch {env['torch']}" + (" (quick CPU mode)" if env["quick"] else ""),
           fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*c) for c in lines]
    errs = sorted({(r["provider"], r["error"]) for r in rows if "error" in r})
    out += [f"error: {p}: {e}" for p, e in errs]
    out += [f"skipped: {p}: {why}" for p, why in result["skipped"].items()]
    worst = max((r.get("max_abs_err", 0.0) for r in rows), default=0.0)
    out.append(f"max |error| of y, dx, dA, dB vs the plain-torch provider on the same decoded weight: {worst:.3g}")
    return "\n".join(out)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if "ms" in r]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    shapes = list(dict.fromkeys((r["n"], r["k"]) for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        vals = [next((r["ms"] for r in rows if r["provider"] == p and (r["n"], r["k"]) == s), 0.0) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"{n}x{k}" for n, k in shapes])
    ax.set_ylabel("ms (median), forward + backward")
    ax.set_title(f"LoRA layer, M={rows[0]['m']}, r={rows[0]['r']}, {result['env']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# Llama MLP shapes (hidden, intermediate) for --mlp: 1B and 8B
MLP_SHAPES = {"1b": (2048, 8192), "8b": (4096, 14336)}
QUICK_MLP_SHAPES = {"quick": (256, 640)}


def run_mlp(args, out: Path) -> dict:
    """The whole QLoRA MLP (gate, up, SwiGLU, down, LoRA on all three), forward + backward: the fused
    Function vs the three QLoRA layers, time and peak memory (what the fusion is for)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from qlora_kernels.nn.fused_mlp import FusedQLoraMLP

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    quick = args.quick or device.type == "cpu"
    m = args.m or (256 if quick else 8192)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    env = environment(device)
    env["quick"] = quick
    results = ResultFile(out / "lora_mlp.json", env=env, rows=[])
    for shape, (h, i) in (QUICK_MLP_SHAPES if quick else MLP_SHAPES).items():
        torch.manual_seed(args.seed)
        with torch.device(device):
            mlp = LlamaMLP(LlamaConfig(hidden_size=h, intermediate_size=i)).to(dtype)
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = qk.QLoraLinear.from_linear(getattr(mlp, name), r=args.r, lora_alpha=args.r)
            torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
            setattr(mlp, name, layer)
        fused = FusedQLoraMLP.from_mlp(mlp)
        x = torch.randn(m, h, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, h, device=device, dtype=dtype)
        for provider, module in (("unfused (three QLoraLinear)", mlp), ("fused (QLoraMLPFunction)", fused)):
            def step(module=module):
                module(x).backward(dy)

            row = {"shape": shape, "hidden": h, "intermediate": i, "m": m, "provider": provider}
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    torch.cuda.synchronize()
                    row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    row["ms"] = do_bench_us(step, args.warmup_ms, args.rep_ms, grad_to_none=[x]) / 1e3
                else:
                    row["ms"] = cpu_us(step, args.reps, warmup=1) / 1e3
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            results.add("rows", row)
            print(f"  {shape} {provider}: " + (f"{row['ms']:.3f} ms" if "ms" in row else row["error"]),
                  file=sys.stderr, flush=True)
            x.grad = None
            mlp.zero_grad(set_to_none=True)
    results.done()
    return results.data


def mlp_table(result: dict) -> str:
    lines = [f"QLoRA MLP fwd+bwd on {result['env']['device']}: fused vs unfused"]
    for r in result["rows"]:
        mem = f", peak {r['peak_mib']:.0f} MiB" if "peak_mib" in r else ""
        lines.append(f"  {r['shape']:5s} H={r['hidden']} I={r['intermediate']} M={r['m']} {r['provider']:28s} "
                     + (f"{r['ms']:.3f} ms{mem}" if "ms" in r else r.get("error", "")))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/lora", help="directory for lora.json (and lora.png)")
    p.add_argument("--quick", action="store_true", help="small shapes (the CPU mode; implied without CUDA)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    p.add_argument("--m", type=int, default=None, help="tokens (default 8192; 256 in quick mode)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="compute dtype (default bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--backends", default="auto", help="qlora_kernels backends to compare, comma separated "
                   "(auto,cuda,triton,cpp,reference); ones not live here are skipped with the reason")
    p.add_argument("--reps", type=int, default=5, help="CPU: timed repetitions")
    p.add_argument("--warmup-ms", type=int, default=20, help="CUDA: do_bench warmup (ms)")
    p.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench measuring time (ms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlp", action="store_true", help="the whole Llama MLP instead: fused vs unfused QLoRA layers")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.mlp:
        result = run_mlp(args, out)
        print(mlp_table(result))
        print(f"wrote {out / 'lora_mlp.json'}")
        return 0
    result = run(args, out)
    png = plot(result, out / "lora.png")
    print(table(result))
    print(f"wrote {out / 'lora.json'}" + (f" and {out / 'lora.png'}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
