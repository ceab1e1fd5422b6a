"""NF4 matmul and dequantize: qlora_kernels vs bitsandbytes vs bf16 torch, side by side in one run.

    python benchmarks/bench_nf4.py --out bench_out            # GPU: six Llama shapes, M = 1, 8, 32, 128, 8192
    python benchmarks/bench_nf4.py --quick --out bench_out    # CPU smoke run: small shapes

GPU method: medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call; the method of
the measured anchors), weights rotated so the working set is several times the L2 cache (each call reads a
different copy), fresh random data. CPU: medians of wall-clock time per call, the weights rotated over at
least 3x the last-level cache (as a decode step reads them: from DRAM). For M <= 128 and the dequantize also
the GPU time of back-to-back calls (``gpu_us``: no CPU launch overhead can show) and the host time per call
(``host_us``), see benchmarks/_common.py. Every cell is reported as a ratio to bitsandbytes and to bf16
measured in the same run (bitsandbytes on the faster of its two paths, both timed: ``matmul_4bit`` and a
``Linear4bit`` in eval mode under inference mode, which on a CPU repacks its weight and is what ``generate()``
runs; the row names the path; ours likewise makes its CPU decode layout at each weight's first inference call,
before the timing), and for M <= 8 as the fraction of the bandwidth bound (weight bytes at the
device copy bandwidth, also measured in this run). Writes ``nf4.json`` (after every row) and
``nf4_speedup.png`` to --out and prints the table last. Timing never decides a test.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResultFile, cpu_us, do_bench_us, environment, gpu_batch_us, load_bnb, pyplot  # noqa: E402

import qlora_kernels as qk  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]
MS = [1, 8, 32, 128, 8192]
QUICK_SHAPES = [(512, 512), (1024, 2048)]
QUICK_MS = [1, 8, 128]
ROTATE_BYTES = 512 << 20  # working set per provider: several times a Hopper L2 (50 MB)
BATCH_TIMED_MAX_M = 128  # gpu_us / host_us columns up to this M (small kernels, where launch cost matters)


def _cpu_last_level_cache_bytes() -> int:
    """The CPU's last-level cache as the OS reports it (0 when it does not)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


def _rotate_bytes(device: str) -> int:
    """The working set per provider: several times the GPU's L2, or the CPU's last-level cache (a decode step
    reads every layer's weight once: from DRAM, not from a cache that holds one layer)."""
    return ROTATE_BYTES if device != "cpu" else max(128 << 20, 3 * _cpu_last_level_cache_bytes())


def _rotating(make, nbytes: int, device: str):
    """A closure cycling through enough copies of an operand to defeat the caches."""
    copies = max(2, min(64, math.ceil(_rotate_bytes(device) / max(nbytes, 1))))
    items = [make() for _ in range(copies)]
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    next_item.items = items
    return next_item


def _bnb_linear4bit(bnb, w: torch.Tensor, device: str):
    """bitsandbytes' inference layer on ``w`` in eval mode (compute in bf16), as transformers builds it: a
    ``Linear4bit`` whose weight is quantized on its device (on a CPU with avx512_bf16 its first eval-mode
    forward repacks the codes into its fast CPU layout, which is the path its users run)."""
    n, k = w.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=True)
    layer = layer.to(device) if device != "cpu" else layer
    if device == "cpu":
        layer.weight = layer.weight._quantize("cpu")
    return layer.eval()


def copy_bandwidth(device: str) -> float:
    """Device copy bandwidth in bytes/s (read + write), measured here."""
    n = (1 << 30) if device == "cuda" else _rotate_bytes("cpu")
    src = torch.ones(n, dtype=torch.uint8, device=device)  # written: untouched host pages all read one zero page
    dst = torch.ones_like(src)
    us = do_bench_us(lambda: dst.copy_(src)) if device == "cuda" else cpu_us(lambda: dst.copy_(src))
    return 2 * n / (us * 1e-6)


def _time(fn, device: str, args, batch_too: bool) -> dict:
    if device != "cuda":
        return {"us": cpu_us(fn)}
    out = {"us": do_bench_us(fn, args.warmup_ms, args.rep_ms)}
    if batch_too:
        out["gpu_us"], out["host_us"] = gpu_batch_us(fn)
    return out


def run(device: str, shapes, ms, with_bnb: bool, args, results: ResultFile) -> None:
    bw = copy_bandwidth(device)
    results.set(copy_bandwidth_TBps=bw / 1e12)
    bnb, why = load_bnb(device) if with_bnb else (None, "--no-bnb")
    if bnb is None:
        print(f"bitsandbytes not measured: {why}", file=sys.stderr)
        results.set(bnb_skipped=why)
    if bnb is not None:
        import bitsandbytes.functional as bnbf
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        def make_w():
            return torch.randn(n, k, dtype=torch.bfloat16, device=device, generator=gen) * 0.02

        nf4_bytes = qk.quantize_nf4(make_w(), 64, True).nbytes
        ours_w = _rotating(lambda: qk.quantize_nf4(make_w(), 64, True), nf4_bytes, device)
        bf16_w = _rotating(make_w, n * k * 2, device)
        bnb_w = bnb_layer = None
        if bnb is not None:
            bnb_w = _rotating(lambda: bnbf.quantize_4bit(make_w(), quant_type="nf4", blocksize=64,
                                                         compress_statistics=True), nf4_bytes, device)
            bnb_layer = _rotating(lambda: _bnb_linear4bit(bnb, make_w(), device), nf4_bytes, device)
            with torch.inference_mode():  # every copy's first eval-mode call repacks its weight: not timed
                for layer in bnb_layer.items:
                    layer(torch.zeros(1, k, dtype=torch.bfloat16, device=device))
        with torch.inference_mode():  # on a CPU every copy's first inference call makes its decode layout: not timed
            for w in ours_w.items:
                qk.nf4_linear(torch.zeros(1, k, dtype=torch.bfloat16, device=device), w)
        out_bytes = n * k * 2
        t = _time(lambda: qk.dequantize_nf4(ours_w()), device, args, True)
        row = {"n": n, "k": k, "ours_us": t["us"], "ours_TBps": (nf4_bytes + out_bytes) / (t["us"] * 1e-6) / 1e12}
        row.update({f"ours_{key}": v for key, v in t.items() if key != "us"})
        if bnb_w is not None:
            tb = _time(lambda: bnbf.dequantize_4bit(*bnb_w()), device, args, False)["us"]
            row.update(bnb_us=tb, bnb_TBps=(nf4_bytes + out_bytes) / (tb * 1e-6) / 1e12)
        results.add("dequantize", row)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device, generator=gen)
            small = m <= BATCH_TIMED_MAX_M
            with torch.inference_mode():  # a decode step: no autograd bookkeeping, for anyone
                t_ours = _time(lambda: qk.nf4_linear(x, ours_w()), device, args, small)
                t_bf16 = _time(lambda: torch.nn.functional.linear(x, bf16_w()), device, args, False)["us"]
                t_bnb = t_bnb_eval = None
                if bnb_w is not None:
                    def call_bnb():
                        q, st = bnb_w()
                        return bnb.matmul_4bit(x, q.t(), st)

                    t_bnb = _time(call_bnb, device, args, False)["us"]
                if bnb_layer is not None:  # what generate() runs: on a CPU it repacks at the first call
                    t_bnb_eval = _time(lambda: bnb_layer()(x), device, args, False)["us"]
            # bitsandbytes on its best path of the two, named in the row
            paths = {k_: v for k_, v in (("matmul_4bit", t_bnb), ("Linear4bit eval", t_bnb_eval)) if v}
            best = min(paths, key=paths.get) if paths else None
            r = {"n": n, "k": k, "m": m, "ours_us": t_ours["us"], "bf16_us": t_bf16,
                 "bnb_us": paths[best] if best else None, "bnb_path": best, "bnb_matmul_4bit_us": t_bnb,
                 "bnb_eval_us": t_bnb_eval, "vs_bf16": t_bf16 / t_ours["us"],
                 "vs_bnb": (paths[best] / t_ours["us"]) if best else None}
            r.update({f"ours_{key}": v for key, v in t_ours.items() if key != "us"})
            if m <= 8:
                bound_us = nf4_bytes / bw * 1e6
                r["bound_us"] = bound_us
                r["bw_fraction"] = bound_us / t_ours["us"]
            results.add("matmul", r)
            print(f"  {n}x{k} M={m}: ours {t_ours['us']:.1f} us, bf16 {t_bf16:.1f}"
                  + (f", bnb matmul_4bit {t_bnb:.1f}" if t_bnb else "")
                  + (f", bnb Linear4bit eval {t_bnb_eval:.1f}" if t_bnb_eval else ""), file=sys.stderr, flush=True)
        ours_w = bf16_w = bnb_w = bnb_layer = None  # free this shape's copies before the next one
        if device == "cuda":
            torch.cuda.empty_cache()


def table(res: dict) -> str:
    lines = [f"device copy bandwidth (read+write): {res.get('copy_bandwidth_TBps', float('nan')):.2f} TB/s", "",
             "dequantize (bf16 out, blocksize 64, double quant); gpu = back-to-back GPU time",
             f"{'N x K':>12} {'ours us':>9} {'gpu us':>8} {'TB/s':>6} {'bnb us':>9} {'TB/s':>6} {'speedup':>8}"]
    for r in res.get("dequantize", []):
        bnb_us = r.get("bnb_us")
        gpu = f"{r['ours_gpu_us']:>8.1f}" if "ours_gpu_us" in r else f"{'-':>8}"
        lines.append(f"{r['n']:>6}x{r['k']:<5} {r['ours_us']:>9.1f} {gpu} {r['ours_TBps']:>6.2f} "
                     + (f"{bnb_us:>9.1f} {r['bnb_TBps']:>6.2f} {bnb_us / r['ours_us']:>7.2f}x" if bnb_us else
                        f"{'-':>9} {'-':>6} {'-':>8}"))
    lines += ["", "nf4_linear forward, bf16 (us; ratios > 1 mean ours is faster; gpu/host = back-to-back GPU time "
              "and host time per call)",
              "bnb: bitsandbytes' faster path of matmul_4bit and Linear4bit in eval mode (E), inference mode",
              f"{'N x K':>12} {'M':>5} {'ours':>9} {'gpu':>7} {'host':>7} {'bnb':>10} {'bf16':>9} {'vs bnb':>7} "
              f"{'vs bf16':>7} {'bw frac':>7}"]
    for r in res.get("matmul", []):
        tag = "E" if r.get("bnb_path") == "Linear4bit eval" else " "
        bnb_us = f"{r['bnb_us']:>9.1f}{tag}" if r["bnb_us"] else f"{'-':>10}"
        vs_bnb = f"{r['vs_bnb']:>6.2f}x" if r["vs_bnb"] else f"{'-':>7}"
        frac = f"{r['bw_fraction']:>7.2f}" if "bw_fraction" in r else f"{'':>7}"
        gpu = f"{r['ours_gpu_us']:>7.1f}" if "ours_gpu_us" in r else f"{'':>7}"
        host = f"{r['ours_host_us']:>7.1f}" if "ours_host_us" in r else f"{'':>7}"
        lines.append(f"{r['n']:>6}x{r['k']:<5} {r['m']:>5} {r['ours_us']:>9.1f} {gpu} {host} {bnb_us} "
                     f"{r['bf16_us']:>9.1f} {vs_bnb} {r['vs_bf16']:>6.2f}x {frac}")
    if res.get("bnb_skipped"):
        lines.append(f"bitsandbytes not measured: {res['bnb_skipped']}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = res.get("matmul", [])
    shapes = sorted({(r["n"], r["k"]) for r in rows}, key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, title in ((axes[0], "vs_bnb", "speedup over bitsandbytes"), (axes[1], "vs_bf16", "speedup over bf16")):
        for n, k in shapes:
            pts = [(r["m"], r[key]) for r in rows if (r["n"], r["k"]) == (n, k) and r[key]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{n}x{k}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="folder for nf4.json and nf4_speedup.png")
    ap.add_argument("--quick", action="store_true", help="small shapes (the CPU mode; implied without CUDA)")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    ap.add_argument("--shapes", default=None, help="comma list NxK,... (default: the six Llama shapes)")
    ap.add_argument("--ms", default=None, help="comma list of M (default: 1,8,32,128,8192)")
    ap.add_argument("--warmup-ms", type=int, default=10, help="GPU: do_bench warm-up per cell (ms)")
    ap.add_argument("--rep-ms", type=int, default=60, help="GPU: do_bench measuring time per cell (ms)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    shapes = QUICK_SHAPES if quick else SHAPES
    ms = QUICK_MS if quick else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    out = Path(args.out)
    results = ResultFile(out / "nf4.json", env=environment(device), quick=quick)
    run(device, shapes, ms, not args.no_bnb, args, results)
    results.done()
    plot(results.data, out / "nf4_speedup.png")
    print(f"== nf4 on {results.data['env']['device']} (torch {torch.__version__})")
    print(table(results.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
