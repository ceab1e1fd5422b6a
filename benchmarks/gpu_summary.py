"""The summary of a GPU check: the card it ran on, and every GPU target judged as a ratio measured in that run.

    python benchmarks/gpu_summary.py WORKDIR [--json OUT.json]

WORKDIR is what benchmarks/gpu_check.sh fills: card.json (benchmarks/card_probe.py: the card's name, memory,
copy bandwidth and bf16 GEMM rate), nf4.json, lora.json, adamw.json, e2e.json, e2e_ragged.json (any of them
may be missing or partial: a step that timed out), tests.log and steps.tsv. Prints the card, the step status,
the test counts and the target table; ``--json`` also writes everything merged into one file. A target whose
measurement is missing says "not measured"; none is ever guessed.

The card is whatever the check got (an H100 80 GB usually, an H200 otherwise), so no target is judged in
absolute microseconds. Each is judged against what was measured side by side in the same run:

* a speedup over bitsandbytes 0.50.2 and over torch bf16 (ratio = their time / ours, > 1: ours is faster);
* for the memory-bound rows (GEMV at M=1, dequantize), the fraction of the card's copy bandwidth that our
  kernel reaches: (bytes it must move / its time) / the copy bandwidth of card.json (read + write bytes of a
  large ``dst.copy_(src)``; from nf4.json's own copy measurement if card.json is missing).

Bytes a memory-bound row must move (:func:`nf4_bytes`, :func:`gemv_bytes`, :func:`dequant_bytes`): an N x K
NF4 weight with blocksize 64 and double quantization is N*K/2 packed bytes + N*K/64 absmax code bytes (uint8)
+ 4 bytes of fp32 nested absmax per 256 blocks (the 16-entry code and the 256-entry nested code, ~1 KiB and
cache-resident, are not counted); a GEMV adds x (M*K*2 bytes, bf16) and y (M*N*2); a dequantize adds its bf16
output (N*K*2). The time is ``ours_us`` of nf4.json (``triton.testing.do_bench`` median, L2 flushed).

The goals, derived from the H200 table of docs/PERFORMANCE.md (the targets there and the bitsandbytes / bf16
numbers measured there; kept below and printed as information only):

* a row with an absolute H200 target (dequantize, M = 1, 8, 32, 128): speedup >= H200 anchor / H200 target,
  for bitsandbytes and for bf16, never below 1x (e.g. M=1 4096x4096: 25.5 / 8 = 3.19x bnb, 18.8 / 8 = 2.35x
  bf16). The dequantize has no bf16 counterpart (bf16 needs none): bnb only;
* GEMV M=1 (4096x4096 and 28672x8192): >= 0.75 of the copy bandwidth; dequantize 8192x8192: >= 0.90;
* M = 8192, every shape: speedup over bf16 ``F.linear`` >= 1 / 1.03 (the H200 target "<= bf16 + 3 %") and
  >= 1x over bitsandbytes;
* one QLoRA layer fwd+bwd (M = 8192, r = 16): >= 1x over bf16 weight + LoRA (the H200 target) and over
  bitsandbytes + LoRA;
* PagedAdamW, LoRA set of 8B: >= max(1, 4.41 / 4.4) = 1x torch fused AdamW, >= 36.5 / 4.4 = 8.3x bnb AdamW;
* end to end: >= 1.3x the tokens/s and <= 0.7x the peak memory of transformers + PEFT + bitsandbytes (these
  were same-run ratios already).

Results of a --quick (CPU) run, or against a card.json measured on the CPU, are computed and printed (the
rehearsal exercises every path) but never held against a goal: their verdict is "rehearsal", met = None.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

# H200 numbers (information only, docs/PERFORMANCE.md): (label, N, K, M, H200 target us, bnb us, bf16 us)
MATMUL_TARGETS = [
    ("nf4_linear M=1", 4096, 4096, 1, 8.0, 25.5, 18.8),
    ("nf4_linear M=1", 28672, 8192, 1, 38.0, 108.0, 127.0),
    ("nf4_linear M=8", 4096, 4096, 8, 10.0, 108.0, 18.9),
    ("nf4_linear M=32", 4096, 4096, 32, 12.0, 117.0, 19.3),
    ("nf4_linear M=128", 8192, 8192, 128, 40.0, 128.0, 46.3),
]
DEQUANT_TARGETS = [("dequantize", 8192, 8192, 45.0, 86.0)]  # (label, N, K, H200 target us, bnb us)
GEMV_BW_GOAL, DEQUANT_BW_GOAL = 0.75, 0.90  # fractions of the measured copy bandwidth (GEMV: M = 1 rows)
LARGE_M, LARGE_M_SLACK = 8192, 1.03  # M = 8192: ours <= bf16 F.linear + 3 %, every shape
BNB_LARGE_M_US = {(4096, 4096): 414, (1024, 4096): 107, (14336, 4096): 1457, (4096, 14336): 1461,
                  (8192, 8192): 1720, (28672, 8192): 5942}
BF16_LARGE_M_US = {(4096, 4096): 395, (1024, 4096): 96, (14336, 4096): 1413, (4096, 14336): 1377,
                   (8192, 8192): 1640, (28672, 8192): 6395}
LORA_BNB_MS = {(4096, 4096): 1.15, (1024, 4096): 1.00, (14336, 4096): 3.60, (4096, 14336): 3.53,
               (8192, 8192): 4.20, (28672, 8192): 13.8}
LORA_BF16_MS = {(4096, 4096): 1.12, (1024, 4096): 0.51, (14336, 4096): 3.78, (4096, 14336): 3.80,
                (8192, 8192): 4.14, (28672, 8192): 12.7}
# (label, set, our provider, H200 target ms, {their provider: H200 ms}): bnb's fastest, AdamW, is the one to beat
ADAMW_TARGET = ("PagedAdamW, LoRA set of 8B r=16", "lora_8B_r16", "ours", 4.4,
                {"torch_fused": 4.41, "bnb_AdamW": 36.5})
E2E_ANCHORS = {"1b": (26253, 14.0), "8b": (6367, 19.8)}
E2E_SPEEDUP, E2E_MEMORY = 1.3, 0.7
RAGGED_SHAPE = "1b"  # e2e_ragged.json: ours packed vs theirs padded, the same goal as uniform data
H200_COPY_GBPS = 4250.0  # a device copy there (docs/PERFORMANCE.md): to express the H200 targets as fractions
NF4_BLOCKSIZE, NESTED_BLOCKSIZE = 64, 256

RESULT_FILES = ("nf4", "lora", "adamw", "e2e", "e2e_ragged")  # <name>.json in the work folder


def nf4_bytes(n: int, k: int, blocksize: int = NF4_BLOCKSIZE, nested_blocksize: int = NESTED_BLOCKSIZE) -> int:
    """Bytes of an N x K NF4 weight with double quantization: packed codes (2 per byte), one uint8 absmax
    code per block, one fp32 nested absmax per ``nested_blocksize`` blocks (the two small code tables,
    ~1 KiB, are not counted)."""
    blocks = math.ceil(n * k / blocksize)
    return math.ceil(n * k / 2) + blocks + 4 * math.ceil(blocks / nested_blocksize)


def gemv_bytes(n: int, k: int, m: int) -> int:
    """Bytes an ``nf4_linear`` of x [M, K] bf16 with an N x K NF4 weight must move: weight, x in, y out."""
    return nf4_bytes(n, k) + 2 * m * k + 2 * m * n


def dequant_bytes(n: int, k: int) -> int:
    """Bytes a dequantize of an N x K NF4 weight to bf16 must move: the NF4 bytes in, N*K*2 bytes out."""
    return nf4_bytes(n, k) + 2 * n * k


def bandwidth_fraction(nbytes: int, us: float, copy_gbps: float) -> float:
    """(bytes moved / time) as a fraction of the copy bandwidth (GB/s, read + write bytes)."""
    return nbytes / (us * 1e-6) / 1e9 / copy_gbps


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(rows, **match) -> dict | None:
    return next((r for r in rows or [] if all(r.get(k) == v for k, v in match.items())), None)


def _is_quick(data: dict | None) -> bool:
    """A --quick (CPU) run: each benchmark records it in its own place (top level, env or meta)."""
    data = data or {}
    return bool(data.get("quick") or (data.get("env") or {}).get("quick") or (data.get("meta") or {}).get("quick"))


def load_results(work: Path) -> dict[str, dict | None]:
    """Every benchmark's JSON of the work folder by name (None where missing or unreadable)."""
    return {name: _load(work / f"{name}.json") for name in RESULT_FILES}


def load_card(work: Path) -> dict[str, Any] | None:
    """card.json of the work folder (benchmarks/card_probe.py), None where missing or unreadable."""
    return _load(work / "card.json")


def copy_bandwidth(card: dict | None, nf4: dict | None) -> tuple[float | None, str, bool]:
    """``(GB/s, source, quick)``: the copy bandwidth of card.json, else the one bench_nf4 measured, else None."""
    if card and card.get("copy_GBps"):
        return float(card["copy_GBps"]), "card.json", bool(card.get("quick"))
    if nf4 and nf4.get("copy_bandwidth_TBps"):
        return float(nf4["copy_bandwidth_TBps"]) * 1e3, "nf4.json", _is_quick(nf4)
    return None, "not measured", False


def _gbps(v: float) -> str:
    """A rate (GB/s, TFLOP/s) as a whole number, or to 3 digits when it is small (a CPU)."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _ratio(theirs, ours) -> float | None:
    return theirs / ours if theirs and ours else None


def targets(work: Path, results: dict[str, dict | None] | None = None,
            card: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One record per goal: what, ours (+ ours_unit), against (what ours was compared with, measured in this
    run), value (the ratio or fraction), goal, h200 (information only), met (True / False / None = not
    measured or a rehearsal) and status ("MET", "not met", "not measured", "rehearsal")."""
    results = load_results(work) if results is None else results
    card = load_card(work) if card is None else card
    nf4, lora, adamw, e2e, ragged = ((results.get(n) or {}) for n in RESULT_FILES)
    copy_gbps, _, copy_quick = copy_bandwidth(card, nf4)
    out: list[dict[str, Any]] = []

    def add(what, ours, ours_unit, against, value, op, goal, h200, quick, unit="x"):
        if value is None or value is False:
            value, met, status = None, None, "not measured"
        elif quick:
            met, status = None, "rehearsal"
        else:
            met = value >= goal if op == ">=" else value <= goal
            status = "MET" if met else "not met"
        goal_text = f"{op} {goal:.2f}" + ("x" if unit == "x" else "")
        out.append(dict(what=what, ours=ours, ours_unit=ours_unit, against=against, value=value, unit=unit,
                        goal=goal, goal_text=goal_text, op=op, h200=h200, met=met, status=status))

    def bw_goal(what, n, k, us, nbytes, goal, h200_us):
        frac = us and copy_gbps and bandwidth_fraction(nbytes, us, copy_gbps)
        against = (f"{_gbps(nbytes / (us * 1e-6) / 1e9)} of {_gbps(copy_gbps)} GB/s" if us and copy_gbps
                   else "copy bandwidth not measured" if us else "-")
        h200 = f"{h200_us:g} us = {bandwidth_fraction(nbytes, h200_us, H200_COPY_GBPS):.2f} of 4.25 TB/s"
        add(f"{what} of copy bandwidth", us, "us", against, frac, ">=", goal, h200, nf4_quick or copy_quick,
            unit="frac")

    nf4_quick = _is_quick(nf4)
    for label, n, k, target_us, bnb_h200 in DEQUANT_TARGETS:
        r = _row(nf4.get("dequantize"), n=n, k=k) or {}
        ours, bnb = r.get("ours_us"), r.get("bnb_us")
        what = f"{label} {n}x{k}"
        add(f"{what} vs bnb", ours, "us", f"bnb {bnb:.1f} us" if bnb else "-", _ratio(bnb, ours), ">=",
            max(1.0, bnb_h200 / target_us), f"{target_us:g} us; bnb {bnb_h200:g}", nf4_quick)
        bw_goal(what, n, k, ours, dequant_bytes(n, k), DEQUANT_BW_GOAL, target_us)
    for label, n, k, m, target_us, bnb_h200, bf16_h200 in MATMUL_TARGETS:
        r = _row(nf4.get("matmul"), n=n, k=k, m=m) or {}
        ours, bnb, bf16 = r.get("ours_us"), r.get("bnb_us"), r.get("bf16_us")
        what = f"{label} {n}x{k}"
        add(f"{what} vs bnb", ours, "us", f"bnb {bnb:.1f} us" if bnb else "-", _ratio(bnb, ours), ">=",
            max(1.0, bnb_h200 / target_us), f"{target_us:g} us; bnb {bnb_h200:g}", nf4_quick)
        add(f"{what} vs bf16", ours, "us", f"bf16 {bf16:.1f} us" if bf16 else "-", _ratio(bf16, ours), ">=",
            max(1.0, bf16_h200 / target_us), f"{target_us:g} us; bf16 {bf16_h200:g}", nf4_quick)
        if m == 1:
            bw_goal(what, n, k, ours, gemv_bytes(n, k, m), GEMV_BW_GOAL, target_us)
    for (n, k), bnb_h200 in BNB_LARGE_M_US.items():
        r = _row(nf4.get("matmul"), n=n, k=k, m=LARGE_M) or {}
        ours, bnb, bf16 = r.get("ours_us"), r.get("bnb_us"), r.get("bf16_us")
        what = f"nf4_linear M={LARGE_M} {n}x{k}"
        h200 = f"bnb {bnb_h200:g}, bf16 {BF16_LARGE_M_US[(n, k)]:g} us"
        add(f"{what} vs bf16", ours, "us", f"bf16 {bf16:.0f} us" if bf16 else "-", _ratio(bf16, ours), ">=",
            1 / LARGE_M_SLACK, f"<= bf16 + 3 %; {h200}", nf4_quick)
        add(f"{what} vs bnb", ours, "us", f"bnb {bnb:.0f} us" if bnb else "-", _ratio(bnb, ours), ">=", 1.0, h200,
            nf4_quick)

    rows = lora.get("rows") or []
    for (n, k), bnb_h200 in LORA_BNB_MS.items():
        ours_rows = [r for r in rows if r.get("n") == n and r.get("k") == k
                     and str(r.get("provider", "")).startswith("qlora") and "ms" in r]
        ours = min((r["ms"] for r in ours_rows), default=None)
        bf16 = (_row(rows, n=n, k=k, provider="torch_bf16") or {}).get("ms")
        bnb = (_row(rows, n=n, k=k, provider="bitsandbytes") or {}).get("ms")
        what = f"layer fwd+bwd M=8192 r=16 {n}x{k}"
        h200 = f"bnb {bnb_h200:g}, bf16 {LORA_BF16_MS[(n, k)]:g} ms"
        add(f"{what} vs bf16+LoRA", ours, "ms", f"bf16 {bf16:.2f} ms" if bf16 else "-", _ratio(bf16, ours), ">=",
            1.0, h200, _is_quick(lora))
        add(f"{what} vs bnb+LoRA", ours, "ms", f"bnb {bnb:.2f} ms" if bnb else "-", _ratio(bnb, ours), ">=", 1.0,
            h200, _is_quick(lora))

    label, set_name, provider, target_ms, anchors = ADAMW_TARGET
    ours = (_row(adamw.get("rows"), set=set_name, provider=provider) or {}).get("step_ms")
    for theirs_name, theirs_h200 in anchors.items():
        theirs = (_row(adamw.get("rows"), set=set_name, provider=theirs_name) or {}).get("step_ms")
        shown = theirs_name.replace("_", " ")
        add(f"{label} vs {shown}", ours, "ms", f"{shown} {theirs:.2f} ms" if theirs else "-", _ratio(theirs, ours),
            ">=", max(1.0, theirs_h200 / target_ms), f"{target_ms:g} ms; {shown} {theirs_h200:g}", _is_quick(adamw))

    # uniform data (e2e.json) and ragged lengths (e2e_ragged.json: each its best, ours packed vs theirs padded;
    # run at RAGGED_SHAPE only): the same goal
    for data, what, shapes in ((e2e, "e2e {}", E2E_ANCHORS), (ragged, "e2e ragged {}", E2E_ANCHORS)):
        for shape in shapes:
            ours = _row(data.get("rows"), shape=shape, provider="qlora_kernels") or {}
            theirs = _row(data.get("rows"), shape=shape, provider="hf_peft_bnb") or {}
            have = bool(ours.get("tokens_per_s") and theirs.get("tokens_per_s"))
            if data is ragged and not have and shape != RAGGED_SHAPE:
                continue
            tps, gib = E2E_ANCHORS[shape]
            anchors = ((f"bnb {tps:,} tok/s", f"bnb {gib:g} GiB") if data is e2e else ("-", "-"))
            suffix = " padded" if data is ragged else ""
            name = what.format(shape) + (" real tokens/s" if data is ragged else " tokens/s")
            add(f"{name} vs HF+PEFT+bnb{suffix}", ours.get("tokens_per_s"), "tok/s",
                f"bnb {theirs['tokens_per_s']:,.0f} tok/s" if have else "-",
                _ratio(ours.get("tokens_per_s"), theirs.get("tokens_per_s")), ">=", E2E_SPEEDUP, anchors[0],
                _is_quick(data))
            have_mem = have and "peak_gib" in ours and bool(theirs.get("peak_gib"))
            add(f"{what.format(shape)} peak memory vs HF+PEFT+bnb{suffix}", ours.get("peak_gib"), "GiB",
                f"bnb {theirs['peak_gib']:.1f} GiB" if have_mem else "-",
                ours["peak_gib"] / theirs["peak_gib"] if have_mem else None, "<=", E2E_MEMORY, anchors[1],
                _is_quick(data))
    return out


def test_counts(work: Path) -> dict[str, int] | None:
    """pytest's final counts from tests.log (passed, failed, errors, skipped, deselected)."""
    try:
        text = (work / "tests.log").read_text(errors="replace")
    except OSError:
        return None
    last = [line for line in text.splitlines() if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", line)]
    if not last:
        return None
    counts = {k: 0 for k in ("passed", "failed", "errors", "skipped", "deselected")}
    for num, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", last[-1]):
        counts["errors" if word.startswith("error") else word] = int(num)
    return counts


def steps(work: Path) -> list[dict[str, Any]]:
    """The rows of steps.tsv: name, exit code, seconds, timeout."""
    out = []
    try:
        for line in (work / "steps.tsv").read_text().splitlines():
            name, rc, secs, limit = line.split("\t")
            out.append(dict(step=name, rc=int(rc), seconds=int(secs), timeout=int(limit)))
    except (OSError, ValueError):
        pass
    return out


def card_line(card: dict | None, nf4: dict | None) -> str:
    """The header naming the card: name, memory, measured copy bandwidth and bf16 GEMM rate."""
    nf4_copy = (nf4 or {}).get("copy_bandwidth_TBps")
    cross = f"; bench_nf4's own copy: {_gbps(nf4_copy * 1e3)} GB/s" if nf4_copy else ""
    if not card or not card.get("name"):
        return "== card: not measured (no card.json)" + (cross + " (the bandwidth fractions use it)" if cross else "")
    kind = "CPU rehearsal: " if card.get("quick") else ""
    mem = f", {card['total_memory_GiB']:g} GiB" if card.get("total_memory_GiB") else ""
    extra = f", sm_{card['capability'].replace('.', '')}, {card['sm_count']} SMs" if card.get("sm_count") else ""
    copy = card.get("copy") or {}
    copy_txt = (f"copy {_gbps(card['copy_GBps'])} GB/s (read+write, {copy.get('tensor_bytes', 0) >> 20} MiB "
                f"dst.copy_(src))" if card.get("copy_GBps") else "copy not measured")
    gemm = card.get("gemm_bf16") or {}
    gemm_txt = (f"bf16 GEMM {gemm.get('n')}^3 {_gbps(card['gemm_bf16_TFLOPs'])} TFLOP/s" if card.get("gemm_bf16_TFLOPs")
                else "bf16 GEMM not measured")
    return f"== card: {kind}{card['name']}{mem}{extra}; {copy_txt}; {gemm_txt}{cross}"


def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "frac":
        return f"{v:.2f}"
    if unit == "tok/s":
        return f"{v:,.0f} tok/s"
    return f"{v:.1f} {unit}" if unit in ("us", "GiB") else f"{v:.2f} {unit}"


def report(work: Path) -> tuple[str, dict[str, Any]]:
    results, card = load_results(work), load_card(work)
    rows, counts, st = targets(work, results, card), test_counts(work), steps(work)
    lines = [card_line(card, results.get("nf4")), "== steps (rc 124 = timed out)"]
    lines += [f"  {s['step']:<16} rc={s['rc']:<4} {s['seconds']:>4d} s (limit {s['timeout']} s)"
              for s in st] or ["  none"]
    lines.append("== GPU tests: " + (", ".join(f"{v} {k}" for k, v in counts.items() if v) if counts else "no result"))
    lines.append("== targets as ratios measured in this run (ratio = their time / ours; fraction = our bytes/s "
                 "over the copy bandwidth); H200 numbers: information only")
    head = ("what", "ours", "measured against", "ratio", "goal", "H200 (info)", "verdict")
    table = [(r["what"], _fmt(r["ours"], r["ours_unit"]), r["against"], _fmt(r["value"], r["unit"]), r["goal_text"],
              r["h200"], r["status"]) for r in rows]
    widths = [max(len(c[i]) for c in [head, *table]) for i in range(len(head) - 1)]
    for cells in [head, *table]:
        lines.append("  " + "  ".join(f"{c:<{w}}" if i in (0, 2, 4, 5) else f"{c:>{w}}"
                                      for i, (c, w) in enumerate(zip(cells, widths))) + "  " + cells[-1])
    n_met = sum(r["met"] is True for r in rows)
    n_judged = sum(r["met"] is not None for r in rows)
    n_rehearsal = sum(r["status"] == "rehearsal" for r in rows)
    n_missing = sum(r["status"] == "not measured" for r in rows)
    lines.append(f"== {n_met} of {n_judged} judged targets met ({n_missing} not measured"
                 + (f", {n_rehearsal} computed in a rehearsal, never judged" if n_rehearsal else "") + ")")
    merged = {"card": card, "steps": st, "tests": counts, "targets": rows, **results}
    return "\n".join(lines), merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="the work folder of gpu_check.sh")
    ap.add_argument("--json", type=Path, default=None, help="write everything merged into this JSON file")
    args = ap.parse_args(argv)
    text, merged = report(args.work)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
