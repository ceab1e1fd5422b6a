"""Measure how far our double-quantized absmax codes are from bitsandbytes' CPU quantizer (not a test).

Ours rounds ``absmax - offset`` to the exactly nearest entry of bnb's dynamic map; bnb 0.50.2's CPU
quantizer (``quantize_4bit(..., compress_statistics=True)`` on the CPU) uses an approximate lookup.
This sweeps shapes x blocksizes x dtypes x weight distributions, checks that everything else (packed
codes, offset, nested absmax, nested map) is identical, and reports per tensor how many absmax codes
differ and by how many steps. The bounds in tests/test_nf4_format.py and the README's compatibility
note come from this sweep.

    python -m tests.measure_double_quant_vs_bnb [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import time

import torch

import qlora_kernels as qk
from qlora_kernels.quant_maps import ALLOWED_BLOCKSIZES

# Rows x columns: LLM layer shapes (7B-class attention / MLP, GQA k/v, small models), odd and prime
# sizes, rows shorter than a block, single rows and columns.
ROWS = [1, 3, 7, 32, 64, 127, 256, 512, 1000, 1024, 2048, 4096]
COLS = [1, 33, 64, 123, 256, 768, 1024, 2048, 4096, 4097, 11008]
MAX_NUMEL = 1 << 23  # 8M elements: keeps the sweep to minutes on a CPU
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(shape, dist: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dist == "normal":  # an initialised layer
        w = torch.randn(shape, generator=g) * 0.02
    elif dist == "heavy":  # trained layers: outliers, a wide spread of block absmax
        w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(4) * 0.5
    else:  # uniform
        w = (torch.rand(shape, generator=g) * 2 - 1) * 0.1
    return w.to(dtype)


def measure(w: torch.Tensor, blocksize: int) -> dict:
    import bitsandbytes.functional as F

    ours = qk.quantize_nf4(w, blocksize=blocksize, double_quant=True)
    q_bnb, st = F.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=True)
    same_rest = (torch.equal(ours.packed, q_bnb) and ours.offset == st.offset.item()
                 and torch.equal(ours.nested_absmax, st.state2.absmax)
                 and torch.equal(ours.nested_code, st.state2.code))
    diff = (ours.absmax.int() - st.absmax.int()).abs()
    return {"blocks": diff.numel(), "differ": int((diff > 0).sum()), "max_step": int(diff.max()),
            "hist": collections.Counter(diff[diff > 0].tolist()), "same_rest": same_rest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every other shape, two distributions")
    ap.add_argument("--json", help="write the per-tensor results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shapes = [(r, c) for r, c in itertools.product(ROWS, COLS) if r * c <= MAX_NUMEL]
    dists = ["normal", "heavy", "uniform"]
    if args.quick:
        shapes, dists = shapes[::2], dists[:2]
    rows, steps = [], collections.Counter()
    t0 = time.time()
    for shape, blocksize, dtype, dist in itertools.product(shapes, ALLOWED_BLOCKSIZES, DTYPES, dists):
        r = measure(_weight(shape, dist, dtype, g), blocksize)
        steps.update(r.pop("hist"))
        rows.append(dict(shape=list(shape), blocksize=blocksize, dtype=str(dtype).removeprefix("torch."), dist=dist,
                         **r))
    n = len(rows)
    differ = [r for r in rows if r["differ"]]
    blocks = sum(r["blocks"] for r in rows)
    print(f"{n} tensors ({len(shapes)} shapes x {len(ALLOWED_BLOCKSIZES)} blocksizes x {len(DTYPES)} dtypes x "
          f"{len(dists)} distributions), {blocks} absmax codes, {time.time() - t0:.0f} s")
    print(f"packed codes, offset, nested absmax and nested map identical in {sum(r['same_rest'] for r in rows)}/{n}")
    print(f"tensors with any differing absmax code: {len(differ)}/{n}")
    for k in sorted({r["max_step"] for r in rows}):
        print(f"  max step {k}: {sum(r['max_step'] == k for r in rows)} tensors")
    print(f"differing codes: {sum(steps.values())}/{blocks} ({sum(steps.values()) / blocks:.4%}); by step: "
          f"{dict(sorted(steps.items()))}")
    for least in (1, 256, 4096):  # a tensor of a few blocks differing in one is a large fraction of little
        some = [r for r in rows if r["blocks"] >= least]
        worst = max(some, key=lambda r: r["differ"] / r["blocks"])
        print(f"worst fraction over the {len(some)} tensors of >= {least} blocks: {worst['differ']}/{worst['blocks']} "
              f"= {worst['differ'] / worst['blocks']:.2%} (shape {worst['shape']}, blocksize {worst['blocksize']}, "
              f"{worst['dtype']}, {worst['dist']}); max step there {max(r['max_step'] for r in some)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
