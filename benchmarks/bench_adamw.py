"""AdamW step time and device memory: qlora_kernels.PagedAdamW vs torch's AdamW vs bitsandbytes' optimizers.

    python benchmarks/bench_adamw.py --out bench_out/adamw            # GPU: the two parameter sets below
    python benchmarks/bench_adamw.py --quick --out bench_out/adamw    # CPU smoke run: small sets, seconds

Parameter sets (fp32 params, random fresh grads):

* ``lora_8B_r16``: the LoRA set of an 8B model at r = 16 (docs/PERFORMANCE.md), 832 tensors and
  67,108,864 params in Llama-3-8B dimensions: 416 pairs of A [16, 4096] and B [out, 16], with out
  = 4096 (256 pairs), 1024 (64) and 14336 (96);
* ``dense_1B``: 16 tensors of 8192 x 8192 (1.07B params).

Providers: ``ours`` (fp32 states), ``ours_8bit``, ``ours_budget25`` / ``ours_8bit_budget25`` (a
``gpu_budget_bytes`` of 25 % of the state bytes: three quarters of the pages stream through
pinned host memory every step), ``torch_fused`` / ``torch_foreach`` (``torch.optim.AdamW``),
and bitsandbytes' ``AdamW``, ``PagedAdamW``, ``AdamW8bit``, ``PagedAdamW8bit`` when it imports.
The ``--quick`` run adds ``ours[reference]`` (the plain-PyTorch backend).

On CUDA: medians of CUDA-event timings (``triton.testing.do_bench``); "state MiB" is the device
memory the optimizer holds after its first steps (``torch.cuda.memory_allocated`` delta;
bitsandbytes' paged optimizers keep their states in CUDA managed memory, which that counter does
not see: their state bytes are reported with a note). For the budget runs the host<->device bytes
moved per step are copied alone, in and out concurrently, in page-sized copies on two streams
(the same pattern as the pager), and the step time is reported against that copy time. On the
CPU: medians of wall-clock times; "state MiB" is the optimizer's state bytes. Prints a table last;
writes ``adamw.json`` (and ``adamw.png`` if matplotlib is present) to ``--out``. Timing never
decides a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResultFile, cpu_us, do_bench_us, environment, forced_backend, load_bnb  # noqa: E402

import qlora_kernels as qk  # noqa: E402

MiB = 2**20
# The targets on an H200 (ms) for ours, and bitsandbytes / torch measured there (docs/PERFORMANCE.md).
TARGETS_H200 = {("lora_8B_r16", "ours"): 4.4, ("dense_1B", "ours"): 9.0, ("dense_1B", "ours_8bit"): 12.0}
ANCHORS_H200 = {
    "lora_8B_r16": {"torch_fused": 4.41, "bnb_AdamW": 36.5, "bnb_PagedAdamW": 39.3, "bnb_AdamW8bit": 38.0,
                    "bnb_PagedAdamW8bit": 41.6},
    "dense_1B": {"torch_fused": 8.66, "bnb_AdamW": 12.0, "bnb_PagedAdamW": 22.9, "bnb_AdamW8bit": 30.0,
                 "bnb_PagedAdamW8bit": 32.5},
}
BUDGET_RATIO_TARGET = 1.25  # step time <= 1.25 x the copy time of the paged bytes


def lora_shapes(scale: int = 1, pairs_scale: int = 1) -> list[tuple[int, int]]:
    """832 tensors (/ pairs_scale), 67,108,864 params (/ scale / pairs_scale): see the module docstring."""
    hidden, kv, ffn, r = 4096 // scale, 1024 // scale, 14336 // scale, 16
    outs = [hidden] * (256 // pairs_scale) + [kv] * (64 // pairs_scale) + [ffn] * (96 // pairs_scale)
    shapes = []
    for out in outs:
        shapes += [(r, hidden), (out, r)]
    return shapes


def make_sets(quick: bool) -> dict[str, list[tuple[int, int]]]:
    if quick:
        return {"lora_small": lora_shapes(scale=16, pairs_scale=8), "dense_small": [(512, 512)] * 4}
    return {"lora_8B_r16": lora_shapes(), "dense_1B": [(8192, 8192)] * 16}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, qk.PagedAdamW):
        pager = opt.pager
        return sum(t.nbytes for s in pager.spaces for t in s.resident.values()) + pager.host_bytes()
    seen, total = set(), 0
    for st in opt.state.values():
        for t in st.values():
            if torch.is_tensor(t) and t.data_ptr() not in seen and t.numel() > 1:
                seen.add(t.data_ptr())
                total += t.nbytes
    return total


def providers(quick: bool, device: str, page_bytes: int) -> dict[str, tuple]:
    """name -> (factory(params, n) -> optimizer, forced backend or None); n = number of params' elements."""
    lr = 1e-4
    out = {
        "ours": (lambda ps, n: qk.PagedAdamW(ps, lr=lr, page_bytes=page_bytes), None),
        "ours_8bit": (lambda ps, n: qk.PagedAdamW(ps, lr=lr, state_bits=8, page_bytes=page_bytes), None),
        # 25 % of the state bytes: fp32 states take 8 bytes per element, 8-bit ones 2 + 8/256.
        "ours_budget25": (
            lambda ps, n: qk.PagedAdamW(ps, lr=lr, page_bytes=page_bytes, gpu_budget_bytes=max(page_bytes, 2 * n)),
            None,
        ),
        "ours_8bit_budget25": (
            lambda ps, n: qk.PagedAdamW(ps, lr=lr, state_bits=8, page_bytes=page_bytes,
                                        gpu_budget_bytes=max(page_bytes, int(n * 2.03125 / 4))),
            None,
        ),
        "torch_fused": (lambda ps, n: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, fused=True), None),
        "torch_foreach": (lambda ps, n: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, foreach=True), None),
    }
    if quick:
        out["ours[reference]"] = (lambda ps, n: qk.PagedAdamW(ps, lr=lr, page_bytes=page_bytes), "reference")
    bnb, _ = load_bnb(device)
    if bnb is not None:
        for name in ("AdamW", "PagedAdamW", "AdamW8bit", "PagedAdamW8bit"):
            cls = getattr(bnb.optim, name)
            out[f"bnb_{name}"] = ((lambda c: lambda ps, n: c(ps, lr=lr, weight_decay=0.0))(cls), None)
    return out


def time_cuda(fn) -> float:
    return do_bench_us(fn, warmup_ms=10, rep_ms=60) / 1e3


def copy_time_ms(bytes_in: int, bytes_out: int, page_bytes: int, device: str) -> float:
    """Milliseconds to copy bytes_in host->device and bytes_out device->host, concurrently, in
    page-sized copies on two streams from/to pinned memory (what the pager moves, without compute)."""
    host_in = torch.empty(page_bytes * 4, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(page_bytes * 4, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(page_bytes * 4, dtype=torch.uint8, device=device)
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()

    def run() -> None:
        cur = torch.cuda.current_stream()
        s_in.wait_stream(cur)
        s_out.wait_stream(cur)
        for stream, nbytes, copy in ((s_in, bytes_in, "in"), (s_out, bytes_out, "out")):
            with torch.cuda.stream(stream):
                done, k = 0, 0
                while done < nbytes:
                    n = min(page_bytes, nbytes - done)
                    lo = (k % 2 + (2 if copy == "out" else 0)) * page_bytes
                    if copy == "in":
                        dev[lo : lo + n].copy_(host_in[(k % 4) * page_bytes :][:n], non_blocking=True)
                    else:
                        host_out[(k % 4) * page_bytes :][:n].copy_(dev[lo : lo + n], non_blocking=True)
                    done, k = done + n, k + 1
        cur.wait_stream(s_in)
        cur.wait_stream(s_out)

    return time_cuda(run)


def make_params(shapes, device: str) -> list[torch.nn.Parameter]:
    """fp32 params with random grads, generated on the device (a 1B-param set in seconds)."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device)
    return params


def bench_one(set_name: str, params: list[torch.nn.Parameter], name: str, factory, backend, device: str,
              quick: bool, page_bytes: int) -> dict:
    n = sum(p.numel() for p in params)
    row = {"set": set_name, "provider": name, "tensors": len(params), "params": n}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    with forced_backend(backend):
        opt = factory(params, n)
        for _ in range(2):
            opt.step()
        row["state_bytes"] = state_bytes(opt)
        if device == "cuda":
            torch.cuda.synchronize()
            row["device_bytes"] = torch.cuda.memory_allocated() - base
            if name.startswith("bnb_Paged"):
                row["note"] = "states in CUDA managed memory"
        if isinstance(opt, qk.PagedAdamW):
            pager = opt.pager
            row["pages"] = [pager.n_resident_pages, pager.n_host_pages]
            before = dict(pager.stats)
            opt.step()
            row["bytes_in"] = pager.stats["bytes_in"] - before["bytes_in"]
            row["bytes_out"] = pager.stats["bytes_out"] - before["bytes_out"]
        reps = 5 if quick else 20
        row["step_ms"] = time_cuda(opt.step) if device == "cuda" else cpu_us(opt.step, reps, warmup=0) / 1e3
        if device == "cuda" and row.get("bytes_in"):
            row["copy_ms"] = copy_time_ms(row["bytes_in"], row["bytes_out"], page_bytes, device)
            row["step_over_copy"] = row["step_ms"] / row["copy_ms"]
    del opt
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict], device: str) -> str:
    head = (f"{'set':<13} {'provider':<20} {'tensors':>7} {'params':>11} {'step ms':>9} {'x torch':>7} "
            f"{'state MiB':>9}  notes")
    lines = [head, "-" * len(head)]
    ref = {r["set"]: r["step_ms"] for r in rows if r["provider"] == "torch_fused" and "step_ms" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['set']:<13} {r['provider']:<20} error: {r['error'][:70]}")
            continue
        mem = r.get("device_bytes", r["state_bytes"]) if device == "cuda" else r["state_bytes"]
        notes = []
        if r.get("note"):
            notes.append(f"{r['note']} ({r['state_bytes'] / MiB:.0f} MiB)")
        if r.get("pages") and r["pages"][1]:
            notes.append(f"pages {r['pages'][0]} resident / {r['pages'][1]} streamed, "
                         f"{(r['bytes_in'] + r['bytes_out']) / MiB:.0f} MiB moved")
        if "copy_ms" in r:
            notes.append(f"copy alone {r['copy_ms']:.2f} ms -> step/copy {r['step_over_copy']:.2f} "
                         f"(target <= {BUDGET_RATIO_TARGET})")
        target = TARGETS_H200.get((r["set"], r["provider"]))
        if target is not None:
            notes.append(f"H200 target <= {target} ms")
        anchor = ANCHORS_H200.get(r["set"], {}).get(r["provider"])
        if anchor is not None:
            notes.append(f"H200 anchor {anchor} ms")
        x = f"{r['step_ms'] / ref[r['set']]:.2f}" if r["set"] in ref else "-"
        lines.append(f"{r['set']:<13} {r['provider']:<20} {r['tensors']:>7} {r['params']:>11,} {r['step_ms']:>9.3f} "
                     f"{x:>7} {mem / MiB:>9.1f}  {'; '.join(notes)}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    sets = sorted({r["set"] for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(7 * len(sets), 4.5), squeeze=False)
    for ax, s in zip(axes[0], sets):
        rs = [r for r in rows if r["set"] == s and "step_ms" in r]
        ax.barh([r["provider"] for r in rs], [r["step_ms"] for r in rs], color="tab:blue")
        ax.set_title(s)
        ax.set_xlabel("step (ms, median)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small sets, a few repetitions")
    ap.add_argument("--out", default="bench_out/adamw", help="output folder for adamw.json / adamw.png")
    ap.add_argument("--sets", default="", help="comma-separated subset of the sets")
    ap.add_argument("--providers", default="", help="comma-separated subset of the providers")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu" and not args.quick:
        print("no CUDA device: running the --quick CPU smoke run", file=sys.stderr)
        args.quick = True
    page_bytes = 64 * 1024 if args.quick else qk.optim.paged_adamw.DEFAULT_PAGE_BYTES
    sets = make_sets(args.quick)
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    provs = providers(args.quick, device, page_bytes)
    if args.providers:
        provs = {k: v for k, v in provs.items() if k in args.providers.split(",")}

    bnb, bnb_err = load_bnb(device)
    meta = {
        **environment(device),
        "bitsandbytes": getattr(bnb, "__version__", None) if bnb else f"unavailable ({bnb_err})",
        "quick": args.quick,
        "page_bytes": page_bytes,
        "targets_h200_ms": {f"{k[0]}/{k[1]}": v for k, v in TARGETS_H200.items()},
    }
    out = Path(args.out)
    results = ResultFile(out / "adamw.json", meta=meta, rows=[])
    rows = results.data["rows"]
    for set_name, shapes in sets.items():
        params = make_params(shapes, device)
        for name, (factory, backend) in provs.items():
            try:
                row = bench_one(set_name, params, name, factory, backend, device, args.quick, page_bytes)
            except Exception as exc:  # e.g. out of memory, or a provider without this device
                row = {"set": set_name, "provider": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            results.add("rows", row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del params
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    results.done()
    png = plot(rows, out / "adamw.png")
    print(f"# {meta['device']}, torch {meta['torch']}, bitsandbytes {meta['bitsandbytes']}, "
          f"{'CPU smoke run' if args.quick else 'CUDA events'}; wrote {out / 'adamw.json'}"
          f"{' and adamw.png' if png else ''}")
    print(table(rows, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
