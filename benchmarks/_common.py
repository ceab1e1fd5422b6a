"""What the benchmark scripts share: timers, the forced-backend switch, probing bitsandbytes, the
environment record, and incremental JSON output (a script killed half-way keeps what it measured).

Timers (GPU):

* :func:`do_bench_us`: ``triton.testing.do_bench`` medians, as the measured anchors were taken: the L2
  cache is flushed before every timed call, and the flush (~80 us of GPU work) also gives the CPU a
  head start to queue the call, so launch overhead is hidden unless it exceeds the flush.
* :func:`gpu_batch_us`: GPU time per call of a back-to-back batch queued behind a GPU sleep, so that no
  CPU launch overhead can show; also returns the host time per call (what the Python side costs).
  When the two disagree, the do_bench number is launch-bound.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qlora_kernels as qk  # noqa: E402
from qlora_kernels.ops import ENV_VAR  # noqa: E402


@contextlib.contextmanager
def forced_backend(name: str | None):
    """``QLORA_KERNELS_BACKEND=name`` inside the block (None / "auto": the default dispatch)."""
    old = os.environ.get(ENV_VAR)
    if name in (None, "auto"):
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def load_bnb(device: str | torch.device) -> tuple[Any, str | None]:
    """``(bitsandbytes, None)`` if bitsandbytes imports *and* runs a 4-bit round trip and matmul on
    ``device``, else ``(None, reason)``. (It imports fine where its CUDA library does not load; the
    failure then comes at the first call.) Probed once per device and process."""
    return _probe_bnb(str(device))


@functools.cache
def _probe_bnb(device: str) -> tuple[Any, str | None]:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        w = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        bnbf.dequantize_4bit(q, state)
        bnb.matmul_4bit(torch.randn(2, 64, device=device, dtype=torch.bfloat16), q.t(), quant_state=state)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as exc:  # not installed, no build for this device, or its library fails to load
        return None, f"{type(exc).__name__}: {str(exc)[:300]}"
    return bnb, None


def do_bench_us(fn, warmup_ms: int = 10, rep_ms: int = 60, grad_to_none=None) -> float:
    """Median microseconds per call by ``triton.testing.do_bench`` (L2 flushed before each call)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")) * 1e3


def gpu_batch_us(fn, batch: int = 64, repeats: int = 3) -> tuple[float, float]:
    """``(GPU us per call, host us per call)`` of ``batch`` calls queued back to back behind a GPU sleep."""
    fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(40_000_000)  # ~20 ms: the stream waits while the CPU queues the batch
        t0 = time.perf_counter()
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e6 / batch)
        end.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3 / batch)
    return statistics.median(gpu), statistics.median(host)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return None
    return plt


def cpu_us(fn, reps: int = 7, warmup: int = 1) -> float:
    """Median wall-clock microseconds per call on the CPU (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def environment(device: str | torch.device) -> dict[str, Any]:
    """Card / CPU, versions and live backends: what every result file records."""
    dev = torch.device(device)
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "qlora_kernels": qk.__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "backends": {k: v.reason for k, v in qk.backends().items() if v.live},
    }
    for mod in ("triton", "bitsandbytes", "transformers", "peft"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        import subprocess

        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    return env


class ResultFile:
    """A JSON result rewritten after every row, so a timeout or crash keeps the rows measured so far."""

    def __init__(self, path: str | Path, **fields: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"complete": False, **fields}
        self.flush()

    def add(self, key: str, row: dict[str, Any]) -> None:
        self.data.setdefault(key, []).append(row)
        self.flush()

    def set(self, **fields: Any) -> None:
        self.data.update(fields)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    def done(self) -> None:
        self.set(complete=True)
