"""The vocabulary-parallel chunked loss: an output projection sharded by rows over ranks (a ``DTensor``, as FSDP2's unit
of it holds it) gives each rank the log-probs, the summed cross-entropy and the hidden rows' gradients that the whole
weight gives it, with every rank's own batch (its row count, also none), on 2 and 3 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

REPO = Path(__file__).resolve().parent.parent

_WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from qlora_kernels.train.loss import (causal_lm_loss, chunked_cross_entropy, decoder_forward, is_plain_linear,
                                      is_row_sharded, token_log_probs)

out, vocab, rows_spec = sys.argv[1], int(sys.argv[2]), [int(v) for v in sys.argv[3].split(",")]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
H = 6
g = torch.Generator().manual_seed(0)  # the same weight on every rank
W = torch.randn(vocab, H, generator=g, dtype=torch.float64)
b = torch.randn(vocab, generator=g, dtype=torch.float64)
gr = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
n = rows_spec[rank]
h0 = torch.randn(n, H, generator=gr, dtype=torch.float64) * 2
y = torch.randint(0, vocab, (n,), generator=gr)
up = torch.randn(n, generator=gr, dtype=torch.float64)
Wd, bd = distribute_tensor(W, mesh, [Shard(0)]), distribute_tensor(b, mesh, [Shard(0)])
res = {"sharded": is_row_sharded(Wd), "diffs": {}}

def run(fn, weight, bias):
    h = h0.clone().requires_grad_(True)
    val = fn(h, weight, bias)
    (val * up).sum().backward() if val.dim() else val.backward()
    return val.detach(), h.grad.detach()

for chunk in (1, 3, 64):
    for with_bias in (False, True):
        cases = {"token": lambda h, w, bb: token_log_probs(h, w, y, bias=bb, chunk_size=chunk),
                 "sum": lambda h, w, bb: chunked_cross_entropy(h, w, y, bias=bb, chunk_size=chunk)}
        for name, fn in cases.items():
            got = run(fn, Wd, bd if with_bias else None)
            want = run(fn, W, b if with_bias else None)
            res["diffs"][f"{name}/{chunk}/{with_bias}"] = [float((a - c).abs().max()) if a.numel() else 0.0
                                                          for a, c in zip(got, want)]
            assert got[0].shape == want[0].shape and got[1].shape == want[1].shape

# causal_lm_loss: a rank whose labels are all ignored still joins (and gets no loss, zero gradients)
hidden = torch.randn(2, 5, H, generator=gr, dtype=torch.float64, requires_grad=True)
labels = torch.randint(0, vocab, (2, 5), generator=gr)
if rank == 0:
    labels[:] = -100
loss, count = causal_lm_loss(hidden, Wd, labels)
loss.backward()
want_loss, want_count = causal_lm_loss(hidden.detach(), W, labels)
res["causal"] = [float(loss), float(want_loss), count, want_count, float(hidden.grad.abs().sum())]

# a trainable sharded weight is refused; FSDP2's unit of an nn.Linear is still a plain linear layer
Wt = distribute_tensor(W.clone().requires_grad_(True), mesh, [Shard(0)])
try:
    token_log_probs(h0, Wt, y)
    res["trainable"] = None
except ValueError as e:
    res["trainable"] = str(e)
from torch.distributed.fsdp import fully_shard
head = nn.Linear(H, vocab, dtype=torch.float64)
head.requires_grad_(False)
fully_shard(head, mesh=mesh, reshard_after_forward=True)
res["plain"] = [is_plain_linear(head), is_row_sharded(head.weight), is_row_sharded(head.bias),
                is_plain_linear(nn.Module())]
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(res, f)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("world, vocab, rows", [(2, 11, "7,3"), (2, 11, "0,4"), (3, 2, "4,0,5"), (3, 13, "2,9,1")])
def test_a_row_sharded_head_gives_each_rank_the_whole_weight_s_results(tmp_path, world, vocab, rows):
    """Vocabularies that do not divide evenly (and, at 2 rows over 3 ranks, a rank holding none of them), ranks with
    different row counts or none, chunks of 1, 3 and 64 rows, with and without a bias: in fp64 the values and the
    hidden rows' gradients equal the whole weight's to rounding (the ranks' log-sum-exps combined and the partial
    gradients summed in another order than one GEMM's: a few ulps of values of order 10)."""
    (tmp_path / "w.py").write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                           str(tmp_path / "w.py"), str(tmp_path), str(vocab), rows],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(world):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["sharded"]
        assert len(res["diffs"]) == 12
        for case, (dv, dg) in res["diffs"].items():
            assert dv <= 1e-12 and dg <= 1e-12, (r, case, dv, dg)
        loss, want, count, want_count, grad = res["causal"]
        assert count == want_count and abs(loss - want) <= 1e-12 * max(1.0, abs(want))
        assert (count == 0) == (r == 0) and (grad == 0.0) == (r == 0)
        assert "must be frozen" in res["trainable"]
        assert res["plain"] == [True, True, True, False]
