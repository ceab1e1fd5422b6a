"""The card a GPU check runs on, measured in that run: its name, memory, copy bandwidth and bf16 GEMM rate.

    python benchmarks/card_probe.py --out WORKDIR          # GPU: 1 GiB copy, 8192^3 bf16 GEMM (a few seconds)
    python benchmarks/card_probe.py --out WORKDIR --cpu    # CPU (the rehearsal): 64 MiB copy, 1024^3 GEMM

Writes ``card.json`` to --out (rewritten after each measurement, so a timeout keeps what was measured).
``benchmarks/gpu_summary.py`` judges the memory-bound targets as a fraction of the copy bandwidth
measured here, and names the card in its header.

What is measured and which bytes are counted:

* copy bandwidth: ``dst.copy_(src)`` of two uint8 tensors of ``--copy-mib`` MiB (1 GiB on a GPU, far
  beyond the L2 cache); every run moves ``2 x size`` bytes (each byte read once and written once), so
  ``copy_GBps = 2 x size / median time`` (GB = 10^9 bytes). GPU: CUDA events around each call after
  warm-up calls, the median of ``--reps`` runs; CPU: ``time.perf_counter``, the median likewise. This
  is the figure a memory-bound kernel is held against: it reads its inputs and writes its outputs once.
* bf16 GEMM rate: ``torch.mm(a, b, out=c)`` for bf16 ``a, b`` of ``--gemm`` x ``--gemm`` (8192 on a GPU,
  random normal data: the realistic clock under load), ``2 x n^3`` flops per call, median of ``--reps``.

Nothing here decides a test; the numbers are the yardstick of the run they were measured in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _median_ms(fn: Callable[[], Any], device: str, reps: int, warmup: int) -> float:
    """Median milliseconds of one call of ``fn`` (CUDA events per call on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_memory_bytes() -> int | None:
    """Total memory from /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe(device: str) -> dict[str, Any]:
    """Name, memory and versions of the card (or of the CPU, in the rehearsal)."""
    out: dict[str, Any] = {"device": device, "quick": device != "cuda", "torch": torch.__version__,
                           "cuda": torch.version.cuda, "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(name=torch.cuda.get_device_name(0), total_memory_bytes=int(props.total_memory),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    else:
        out.update(name=cpu_model(), total_memory_bytes=cpu_memory_bytes(), cpu_count=os.cpu_count(),
                   torch_threads=torch.get_num_threads())
    mem = out.get("total_memory_bytes")
    out["total_memory_GiB"] = round(mem / 2**30, 1) if mem else None
    return out


def copy_bandwidth(device: str, mib: int, reps: int) -> dict[str, Any]:
    """``dst.copy_(src)`` of ``mib`` MiB: GB/s counting the bytes read plus the bytes written."""
    n = mib << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, reps, warmup=3)
    moved = 2 * n
    return {"copy_GBps": moved / (ms * 1e-3) / 1e9, "copy": {
        "tensor_bytes": n, "bytes_per_run": moved, "median_ms": ms, "runs": reps,
        "counted": "2 x tensor bytes per run (each byte read once and written once)"}}


def gemm_rate(device: str, size: int, reps: int) -> dict[str, Any]:
    """bf16 ``torch.mm`` of two ``size`` x ``size`` matrices: TFLOP/s at 2 size^3 flops per call."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device, generator=gen)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device, generator=gen)
    c = torch.empty(size, size, dtype=torch.bfloat16, device=device)
    ms = _median_ms(lambda: torch.mm(a, b, out=c), device, reps, warmup=3 if device == "cuda" else 1)
    return {"gemm_bf16_TFLOPs": 2 * size**3 / (ms * 1e-3) / 1e12,
            "gemm_bf16": {"m": size, "n": size, "k": size, "median_ms": ms, "runs": reps}}


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for card.json")
    ap.add_argument("--cpu", action="store_true", help="measure the CPU (the rehearsal; implied without CUDA)")
    ap.add_argument("--copy-mib", type=int, default=None, help="copy size in MiB (default: 1024 GPU, 64 CPU)")
    ap.add_argument("--gemm", type=int, default=None, help="GEMM size n of n^3 (default: 8192 GPU, 1024 CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default: 20 GPU, 5 CPU)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    gpu = device == "cuda"
    mib = args.copy_mib or (1024 if gpu else 64)
    size = args.gemm or (8192 if gpu else 1024)
    reps = args.reps or (20 if gpu else 5)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "card.json"
    card = describe(device)
    _write(path, card)
    card.update(copy_bandwidth(device, mib, reps))
    _write(path, card)
    card.update(gemm_rate(device, size, reps))
    card["complete"] = True
    _write(path, card)
    print(f"{card['name']} ({card['total_memory_GiB']} GiB): copy {card['copy_GBps']:.0f} GB/s "
          f"(read+write, {mib} MiB), bf16 GEMM {size}^3 {card['gemm_bf16_TFLOPs']:.2f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
