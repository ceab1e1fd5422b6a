"""NF4 matmul and dequantize: qlora_kernels vs bitsandbytes vs bf16 torch, side by side in one run.

    python benchmarks/bench_nf4.py --out bench_out            # GPU: the Llama shapes of the issue
    python benchmarks/bench_nf4.py --quick --out bench_out    # CPU smoke run: small shapes

GPU method (as shared/anchors): medians of CUDA-event timings (``triton.testing.do_bench``),
weights rotated so the working set is several times the L2 cache (each call reads a different
copy), fresh random data. Reports every cell as a ratio to bitsandbytes and to bf16 measured in the
same run, and for M <= 8 the fraction of the bandwidth bound (weight bytes at the device copy
bandwidth, also measured in this run). Writes ``nf4.json`` and ``nf4_speedup.png`` to --out and
prints the table last. Timing never decides a test.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import qlora_kernels as qk

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]
MS = [1, 8, 32, 128, 1024, 8192]
QUICK_SHAPES = [(512, 512), (1024, 2048)]
QUICK_MS = [1, 8, 128]
ROTATE_BYTES = 512 << 20  # working set per provider: several times a Hopper L2 (50 MB)


def _timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us

    def cpu_bench(fn, reps: int = 7) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    return cpu_bench


def _rotating(make, nbytes: int, device: str):
    """A closure cycling through enough copies of an operand to defeat the L2 cache."""
    copies = 1 if device == "cpu" else max(1, min(64, math.ceil(ROTATE_BYTES / max(nbytes, 1))))
    items = [make() for _ in range(copies)]
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def copy_bandwidth(device: str, bench) -> float:
    """Device copy bandwidth in bytes/s (read + write), measured here."""
    n = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * n / (us * 1e-6)


def run(device: str, shapes, ms, with_bnb: bool) -> dict:
    bench = _timer(device)
    bw = copy_bandwidth(device, bench)
    bnb = None
    if with_bnb:
        try:
            import bitsandbytes as bnb  # noqa: F401
            import bitsandbytes.functional as bnbF
        except Exception as exc:  # noqa: BLE001
            print(f"bitsandbytes unavailable: {exc}", file=sys.stderr)
            bnb = None
    rows = []
    dq_rows = []
    torch.manual_seed(0)
    for n, k in shapes:
        w_bytes_nf4 = None

        def make_w():
            return torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02

        w0 = make_w()
        q_ours = qk.quantize_nf4(w0, 64, True)
        w_bytes_nf4 = q_ours.nbytes
        ours_w = _rotating(lambda: qk.quantize_nf4(make_w(), 64, True), w_bytes_nf4, device)
        bf16_w = _rotating(make_w, n * k * 2, device)
        bnb_w = None
        if bnb is not None:
            def make_bnb():
                return bnbF.quantize_4bit(make_w(), quant_type="nf4", blocksize=64, compress_statistics=True)

            bnb_w = _rotating(make_bnb, w_bytes_nf4, device)
        # dequantize
        out_bytes = n * k * 2
        t = bench(lambda: qk.dequantize_nf4(ours_w()))
        row = {"n": n, "k": k, "ours_us": t, "ours_TBps": (w_bytes_nf4 + out_bytes) / (t * 1e-6) / 1e12}
        if bnb_w is not None:
            tb = bench(lambda: bnbF.dequantize_4bit(*bnb_w()))
            row.update(bnb_us=tb, bnb_TBps=(w_bytes_nf4 + out_bytes) / (tb * 1e-6) / 1e12)
        dq_rows.append(row)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            with torch.no_grad():
                t_ours = bench(lambda: qk.nf4_linear(x, ours_w()))
                t_bf16 = bench(lambda: torch.nn.functional.linear(x, bf16_w()))
                t_bnb = None
                if bnb_w is not None:
                    def call_bnb():
                        q, st = bnb_w()
                        return bnb.matmul_4bit(x, q.t(), st)

                    t_bnb = bench(call_bnb)
            r = {"n": n, "k": k, "m": m, "ours_us": t_ours, "bf16_us": t_bf16, "bnb_us": t_bnb,
                 "vs_bf16": t_bf16 / t_ours, "vs_bnb": (t_bnb / t_ours) if t_bnb else None}
            if m <= 8:
                bound_us = w_bytes_nf4 / bw * 1e6
                r["bound_us"] = bound_us
                r["bw_fraction"] = bound_us / t_ours
            rows.append(r)
            print(f"  {n}x{k} M={m}: ours {t_ours:.1f} us, bf16 {t_bf16:.1f}"
                  + (f", bnb {t_bnb:.1f}" if t_bnb else ""), file=sys.stderr)
    return {"copy_bandwidth_TBps": bw / 1e12, "matmul": rows, "dequantize": dq_rows}


def table(res: dict) -> str:
    lines = [f"device copy bandwidth (read+write): {res['copy_bandwidth_TBps']:.2f} TB/s", "",
             "dequantize (bf16 out, blocksize 64, double quant)",
             f"{'N x K':>12} {'ours us':>9} {'TB/s':>6} {'bnb us':>9} {'TB/s':>6} {'speedup':>8}"]
    for r in res["dequantize"]:
        bnb_us = r.get("bnb_us")
        lines.append(f"{r['n']:>6}x{r['k']:<5} {r['ours_us']:>9.1f} {r['ours_TBps']:>6.2f} "
                     + (f"{bnb_us:>9.1f} {r['bnb_TBps']:>6.2f} {bnb_us / r['ours_us']:>7.2f}x" if bnb_us else
                        f"{'-':>9} {'-':>6} {'-':>8}"))
    lines += ["", "nf4_linear forward, bf16 (us; ratios > 1 mean ours is faster)",
              f"{'N x K':>12} {'M':>5} {'ours':>9} {'bnb':>9} {'bf16':>9} {'vs bnb':>7} {'vs bf16':>7} {'bw frac':>7}"]
    for r in res["matmul"]:
        bnb_us = f"{r['bnb_us']:>9.1f}" if r["bnb_us"] else f"{'-':>9}"
        vs_bnb = f"{r['vs_bnb']:>6.2f}x" if r["vs_bnb"] else f"{'-':>7}"
        frac = f"{r['bw_fraction']:>7.2f}" if "bw_fraction" in r else f"{'':>7}"
        lines.append(f"{r['n']:>6}x{r['k']:<5} {r['m']:>5} {r['ours_us']:>9.1f} {bnb_us} {r['bf16_us']:>9.1f} "
                     f"{vs_bnb} {r['vs_bf16']:>6.2f}x {frac}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return
    shapes = sorted({(r["n"], r["k"]) for r in res["matmul"]}, key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, title in ((axes[0], "vs_bnb", "speedup over bitsandbytes"), (axes[1], "vs_bf16", "speedup over bf16")):
        for n, k in shapes:
            pts = [(r["m"], r[key]) for r in res["matmul"] if (r["n"], r["k"]) == (n, k) and r[key]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{n}x{k}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="folder for nf4.json and nf4_speedup.png")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    ap.add_argument("--shapes", default=None, help="comma list NxK,... (default: the issue's Llama shapes)")
    ap.add_argument("--ms", default=None, help="comma list of M (default: 1,8,32,128,1024,8192)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = QUICK_SHAPES if args.quick or device == "cpu" else SHAPES
    ms = QUICK_MS if args.quick or device == "cpu" else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    res = run(device, shapes, ms, with_bnb=not args.no_bnb)
    res["env"] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "qlora_kernels": qk.__version__, "threads": torch.get_num_threads(),
        "backends": {k: v.live for k, v in qk.backends().items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nf4.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "nf4_speedup.png")
    print(f"== nf4 on {res['env']['device']} (torch {torch.__version__})")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
