"""The summary of a GPU check: every GPU target with our number, the anchor and whether it is met.

    python benchmarks/gpu_summary.py WORKDIR [--json OUT.json]

WORKDIR is what benchmarks/gpu_check.sh fills: nf4.json, lora.json, adamw.json, e2e.json, e2e_ragged.json (any of
them may be missing or partial: a step that timed out), tests.log and steps.tsv. Prints the step
status, the test counts and the target table; ``--json`` also writes everything merged into one file.
A target whose measurement is missing says "not measured"; none is ever guessed.

The targets (NVIDIA H200, bf16, blocksize 64, double quant) and the anchors measured there for
bitsandbytes 0.50.2 / torch (the numbers to beat) are the tables below; results of a --quick
(CPU) run are never held against them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

# (label, N, K, M, target us, anchor label, anchor us)
MATMUL_TARGETS = [
    ("nf4_linear M=1", 4096, 4096, 1, 8.0, "bnb", 25.5),
    ("nf4_linear M=1", 28672, 8192, 1, 38.0, "bnb", 108.0),
    ("nf4_linear M=8", 4096, 4096, 8, 10.0, "bnb", 108.0),
    ("nf4_linear M=32", 4096, 4096, 32, 12.0, "bnb", 117.0),
    ("nf4_linear M=128", 8192, 8192, 128, 40.0, "bnb", 128.0),
]
DEQUANT_TARGETS = [("dequantize", 8192, 8192, 45.0, "bnb", 86.0)]
LARGE_M, LARGE_M_SLACK = 8192, 1.03  # M = 8192: <= bf16 F.linear + 3 %, every shape
BNB_LARGE_M_US = {(4096, 4096): 414, (1024, 4096): 107, (14336, 4096): 1457, (4096, 14336): 1461,
                  (8192, 8192): 1720, (28672, 8192): 5942}
LORA_BNB_MS = {(4096, 4096): 1.15, (1024, 4096): 1.00, (14336, 4096): 3.60, (4096, 14336): 3.53,
               (8192, 8192): 4.20, (28672, 8192): 13.8}
ADAMW_TARGET = ("PagedAdamW, LoRA set of 8B r=16", "lora_8B_r16", "ours", 4.4, "torch fused 4.41 / bnb 36.5")
E2E_ANCHORS = {"1b": (26253, 14.0), "8b": (6367, 19.8)}
E2E_SPEEDUP, E2E_MEMORY = 1.3, 0.7
RAGGED_SHAPE = "1b"  # e2e_ragged.json: ours packed vs theirs padded, the same goal as uniform data


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(rows, **match) -> dict | None:
    return next((r for r in rows or [] if all(r.get(k) == v for k, v in match.items())), None)


RESULT_FILES = ("nf4", "lora", "adamw", "e2e", "e2e_ragged")  # <name>.json in the work folder


def _is_quick(data: dict) -> bool:
    """A --quick (CPU) run: each benchmark records it in its own place (top level, env or meta)."""
    return bool(data.get("quick") or (data.get("env") or {}).get("quick") or (data.get("meta") or {}).get("quick"))


def load_results(work: Path) -> dict[str, dict | None]:
    """Every benchmark's JSON of the work folder by name (None where missing or unreadable)."""
    return {name: _load(work / f"{name}.json") for name in RESULT_FILES}


def targets(work: Path, results: dict[str, dict | None] | None = None) -> list[dict[str, Any]]:
    """One record per target: what, ours, target, anchor, met (True / False / None = not measured).
    A quick (CPU) run is never held against a target."""
    results = load_results(work) if results is None else results
    nf4, lora, adamw, e2e, ragged = ({} if not d or _is_quick(d) else d for d in (results[n] for n in RESULT_FILES))
    out: list[dict[str, Any]] = []

    def add(what, ours, target, anchor, met, unit):
        out.append(dict(what=what, ours=ours, target=target, anchor=anchor, met=met, unit=unit))

    for label, n, k, target_us, _, anchor in DEQUANT_TARGETS:
        r = _row(nf4.get("dequantize"), n=n, k=k)
        ours = r and r["ours_us"]
        add(f"{label} {n}x{k}", ours, f"<= {target_us:g}", f"bnb {anchor:g}", None if r is None else ours <= target_us,
            "us")
    for label, n, k, m, target_us, _, anchor in MATMUL_TARGETS:
        r = _row(nf4.get("matmul"), n=n, k=k, m=m)
        ours = r and r["ours_us"]
        add(f"{label} {n}x{k}", ours, f"<= {target_us:g}", f"bnb {anchor:g}", None if r is None else ours <= target_us,
            "us")
    for (n, k), bnb_us in BNB_LARGE_M_US.items():
        r = _row(nf4.get("matmul"), n=n, k=k, m=LARGE_M)
        ours = r and r["ours_us"]
        bound = r and r["bf16_us"] * LARGE_M_SLACK
        add(f"nf4_linear M={LARGE_M} {n}x{k}", ours, f"<= bf16 x {LARGE_M_SLACK:g}" + (f" = {bound:.0f}" if r else ""),
            f"bnb {bnb_us:g}", None if r is None else ours <= bound, "us")

    rows = lora.get("rows") or []
    for (n, k), bnb_ms in LORA_BNB_MS.items():
        ours_rows = [r for r in rows if r.get("n") == n and r.get("k") == k and r["provider"].startswith("qlora")
                     and "ms" in r]
        bf16 = _row(rows, n=n, k=k, provider="torch_bf16")
        ours = min((r["ms"] for r in ours_rows), default=None)
        ok = None if ours is None or bf16 is None or "ms" not in bf16 else ours <= bf16["ms"]
        add(f"layer fwd+bwd M=8192 r=16 {n}x{k}", ours,
            "<= bf16+LoRA" + (f" = {bf16['ms']:.2f}" if bf16 and "ms" in bf16 else ""), f"bnb {bnb_ms:g}", ok, "ms")

    label, set_name, provider, target_ms, anchor = ADAMW_TARGET
    r = _row(adamw.get("rows"), set=set_name, provider=provider)
    ours = r.get("step_ms") if r else None
    add(label, ours, f"<= {target_ms:g}", anchor, None if ours is None else ours <= target_ms, "ms")

    # uniform data (e2e.json, against the anchors) and ragged lengths (e2e_ragged.json: each its best, ours
    # packed vs theirs padded; run at RAGGED_SHAPE only): the same goal
    for data, what, shapes in ((e2e, "e2e {}", E2E_ANCHORS), (ragged, "e2e ragged {}", E2E_ANCHORS)):
        for shape in shapes:
            ours = _row(data.get("rows"), shape=shape, provider="qlora_kernels")
            theirs = _row(data.get("rows"), shape=shape, provider="hf_peft_bnb")
            have = bool(ours and theirs and "tokens_per_s" in ours and "tokens_per_s" in theirs)
            if data is ragged and not have and shape != RAGGED_SHAPE:
                continue
            tps, gib = E2E_ANCHORS[shape]
            anchors = ((f"bnb {tps:,} tok/s", f"bnb {gib:g} GiB") if data is e2e
                       else ("bnb in the same run", "bnb in the same run"))
            name = what.format(shape) + (" real tokens/s vs HF+PEFT+bnb padded" if data is ragged
                                         else " tokens/s vs HF+PEFT+bnb")
            speed = have and ours["tokens_per_s"] / theirs["tokens_per_s"]
            add(name, speed, f">= {E2E_SPEEDUP:g}x", anchors[0], None if not have else speed >= E2E_SPEEDUP, "x")
            have_mem = have and "peak_gib" in ours and bool(theirs.get("peak_gib"))
            mem = have_mem and ours["peak_gib"] / theirs["peak_gib"]
            name = what.format(shape) + (" peak memory vs HF+PEFT+bnb padded" if data is ragged
                                         else " peak memory vs HF+PEFT+bnb")
            add(name, mem, f"<= {E2E_MEMORY:g}x", anchors[1], None if not have_mem else mem <= E2E_MEMORY, "x")
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


def _fmt(v, unit: str) -> str:
    if v is None or v is False:
        return "-"
    return f"{v:.2f}{unit}" if unit == "x" else f"{v:.1f} {unit}" if unit == "us" else f"{v:.2f} {unit}"


def report(work: Path) -> tuple[str, dict[str, Any]]:
    results = load_results(work)
    rows, counts, st = targets(work, results), test_counts(work), steps(work)
    lines = ["== steps (rc 124 = timed out)"]
    lines += [f"  {s['step']:<16} rc={s['rc']:<4} {s['seconds']:>4d} s (limit {s['timeout']} s)"
              for s in st] or ["  none"]
    lines.append("== GPU tests: " + (", ".join(f"{v} {k}" for k, v in counts.items() if v) if counts else "no result"))
    lines.append("== targets (H200): ours | target | anchor | met")
    width = max(len(r["what"]) for r in rows)
    for r in rows:
        met = {True: "MET", False: "not met", None: "not measured"}[r["met"]]
        ours = _fmt(r["ours"], r["unit"])
        lines.append(f"  {r['what']:<{width}}  {ours:>10}  {r['target']:<22} {r['anchor']:<24} {met}")
    n_met = sum(r["met"] is True for r in rows)
    n_measured = sum(r["met"] is not None for r in rows)
    lines.append(f"== {n_met} of {n_measured} measured targets met ({len(rows) - n_measured} not measured)")
    merged = {"steps": st, "tests": counts, "targets": rows, **results}
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
