"""Reading 1/N (qlora_kernels.train.nf4_shards): each rank's NF4 shards, quantized from only the elements it reads,
equal the chunks FSDP2 would keep of the whole tensor quantized at once; ranks simulated in one process here (the
two-process gloo run is in test_fsdp.py)."""

from __future__ import annotations

import math

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.train.nf4_shards import ShardedQuantizer, chunk_rows, elements_to_read

FIELDS = {"nf4_packed": "packed", "nf4_absmax": "absmax", "nf4_code": "code", "nf4_nested_absmax": "nested_absmax",
          "nf4_nested_code": "nested_code"}


@pytest.mark.parametrize("rows,world", [(10, 2), (10, 3), (3, 4), (1, 2), (7, 7), (8, 3)])
def test_chunk_rows_is_torch_chunk(rows, world):
    chunks = torch.arange(rows).chunk(world)
    for r in range(world):
        lo, hi = chunk_rows(rows, world, r)
        want = chunks[r].tolist() if r < len(chunks) else []
        assert list(range(lo, hi)) == want


def _ranks(w: torch.Tensor, blocksize: int, double_quant: bool, world: int):
    """Every rank's (quantizer, placeholder weight) and the elements each read, with an in-process all-gather."""
    flat = w.reshape(-1)
    numel = flat.numel()
    reads: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    # the all-gather: every rank's contribution, computed the way each rank computes it
    contributions = []
    for r in range(world):
        first, stop, b0, b1 = elements_to_read(numel, blocksize, world, r)
        if stop > first:
            part = qk.quantize_nf4(flat[first:stop], blocksize=blocksize, double_quant=False).absmax
            contributions.append(part[b0 - first // blocksize:b1 - first // blocksize])
        else:
            contributions.append(torch.empty(0))

    def gather(t, sizes):  # each rank's flag (0: its part quantized) and blocks
        assert [1 + c.numel() for c in contributions] == sizes and t[0] == 0
        return torch.cat([torch.cat([torch.zeros(1), c]) for c in contributions])

    out = []
    for r in range(world):
        q = ShardedQuantizer(r, world, gather)

        def read(first, stop, r=r):
            reads[r].append((first, stop))
            return flat[first:stop]

        ph = q.quantize("layer", "nf4_", read, w.shape, w.dtype, w.device, blocksize, double_quant,
                        itemsize=w.element_size())
        out.append((q, ph))
    return out, reads


@pytest.mark.parametrize("shape", [(8, 64), (6, 96), (5, 33), (257, 64), (3, 1), (128, 130)])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True), (32, True)])
def test_each_rank_s_shards_equal_the_whole_tensor_s_chunks(shape, world, blocksize, double_quant):
    torch.manual_seed(sum(shape) + world)
    w = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(torch.bfloat16)
    whole = qk.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    ranks, reads = _ranks(w, blocksize, double_quant, world)
    numel = math.prod(shape)
    for r, (q, ph) in enumerate(ranks):
        assert ph.offset == whole.offset  # the double-quantization offset: the mean of the whole tensor's absmax
        assert ph.shape == whole.shape and ph.packed.shape == whole.packed.shape
        assert ph.absmax.shape == whole.absmax.shape
        local = q.pending["layer"]
        for key, attr in FIELDS.items():
            t = getattr(whole, attr)
            if t is None:
                assert key not in local
                continue
            chunks = t.chunk(world)
            want = chunks[r] if r < len(chunks) else t[:0]
            assert torch.equal(local[key], want), (key, r)
        # what it read: whole blocks around its codes' elements, about 1/world of the tensor
        span = sum(b - a for a, b in reads[r])
        per_rank = 2 * (-(-((numel + 1) // 2) // world))
        assert span <= per_rank + 2 * blocksize, (span, per_rank)
        assert q.bytes_whole == numel * w.element_size()


def test_the_ranks_read_each_element_once_save_the_blocks_they_share():
    w = torch.randn(4096, 64)
    ranks, reads = _ranks(w, 64, True, 4)
    spans = [reads[r][0] for r in range(4)]
    assert spans == [(0, 65536), (65536, 131072), (131072, 196608), (196608, 262144)]
    assert [q.bytes_read for q, _ in ranks] == [65536 * 4] * 4


def test_a_non_finite_weight_fails_every_rank_after_the_gather():
    """A NaN in rank 1's part: rank 1 raises its own error (naming the values), rank 0 says which rank failed;
    both only after the all-gather, so neither waits for the other."""
    w = torch.randn(4, 64)
    w[3, 5] = float("nan")
    flat = w.reshape(-1)
    sent = {}

    def gather(t, sizes):
        sent[len(sent)] = t
        return torch.cat([torch.tensor([0.0]), torch.ones(2), torch.tensor([1.0]), torch.zeros(2)])

    errors = []
    for r in range(2):
        q = ShardedQuantizer(r, 2, gather)
        with pytest.raises(ValueError) as exc:
            q.quantize("model.layers.0.mlp.up_proj", "nf4_", lambda a, b: flat[a:b], w.shape, w.dtype, w.device, 64,
                       True, 4)
        errors.append(str(exc.value))
    assert "finite" in errors[1] and "rank 1" in errors[0] and "up_proj" in errors[0]
    assert sent[0][0] == 0 and sent[1][0] == 1  # each rank's flag went into the gather
