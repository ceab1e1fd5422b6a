"""The CUDA GEMV's algorithm, run on the CPU: tests/cuda_host/gemv_emulation.cpp executes
csrc/cuda/nf4_gemv_core.cuh (the code the kernel runs per warp) for every lane of every warp of the
kernel's grid, on weights from our quantizer, and must match the reference nf4_matmul. This checks
what the compile test cannot (nibble order, lane and row indexing, K splits, tails, double-quant
scales) on machines without a GPU; the GPU tests check the same kernel for real.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.reference import nf4 as ref

from . import bounds

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("gemv") / "gemv_emulation"
    cmd = [CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-I", str(ROOT / "csrc" / "cuda"),
           str(ROOT / "tests" / "cuda_host" / "gemv_emulation.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def _emulate(exe: Path, tmp: Path, qw: qk.NF4Weight, x: torch.Tensor, splits: int) -> torch.Tensor:
    n, k = qw.shape
    m = x.shape[0]
    nested = qw.double_quant
    dtype_code = 2 if x.dtype == torch.bfloat16 else 0
    parts = [struct.pack("<7q", n, k, m, qw.blocksize, splits, int(nested), dtype_code),
             struct.pack("<f", qw.offset), qw.packed.numpy().tobytes(), qw.absmax.numpy().tobytes()]
    if nested:
        parts += [qw.nested_absmax.numpy().tobytes(), qw.nested_code.numpy().tobytes()]
    parts.append(qw.code.numpy().tobytes())
    xb = x.view(torch.int16).numpy().tobytes() if x.dtype == torch.bfloat16 else x.numpy().tobytes()
    parts.append(xb)
    (tmp / "in.bin").write_bytes(b"".join(parts))
    proc = subprocess.run([str(exe), str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-2000:]
    return torch.from_numpy(np.fromfile(tmp / "out.bin", dtype=np.float32).reshape(m, n).copy())


# (n, k, blocksize): rows not a multiple of a warp's 4 or a block's 16, K a multiple of the warp step or
# not (lanes past the end), K below one warp step, one absmax block per row, more than 256 blocks (nested)
CASES = [(5, 1024, 64), (17, 3072, 64), (33, 1056, 32), (64, 96, 32), (3, 4096, 4096), (130, 2048, 128),
         (64, 4128, 32)]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_gemv_algorithm_matches_reference(emulator, tmp_path, case, nested):
    n, k, blocksize = case
    torch.manual_seed(n * 7 + k)
    qw = qk.quantize_nf4(torch.randn(n, k), blocksize, nested)
    # splits 0: the count the CUDA glue picks on 132 SMs (the emulator reports an empty split)
    for m, dtype, splits in [(1, torch.float32, 1), (4, torch.float32, 3), (2, torch.bfloat16, 1),
                             (3, torch.bfloat16, 2), (1, torch.bfloat16, 0)]:
        x = torch.randn(m, k, dtype=dtype)
        got = _emulate(emulator, tmp_path, qw, x, splits)
        want = ref.nf4_matmul(x.float(), *qw.tensors(), n, k, False)
        w = ref.dequantize_nf4(*qw.tensors(), n * k, torch.float32).view(n, k)
        bounds.assert_within(f"m={m} {dtype} splits={splits}", got, want, *bounds.kernel_matmul(x, w, want))
