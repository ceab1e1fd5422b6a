"""Reading 1/N: each FSDP2 rank reads (and quantizes) only the part of each block weight behind its own shards.

``fully_shard`` splits every NF4 tensor of a layer on dim 0 as ``torch.chunk`` does (rank ``r`` of ``N`` keeps
rows ``[r c, (r + 1) c)``, ``c = ceil(rows / N)``, padded to equal shards). For the packed codes (two elements a
byte) rank ``r``'s rows are the weight's flat elements ``[2 r c, 2 (r + 1) c)``. The absmax codes, the nested
absmax and the double-quantization offset depend on the whole tensor (the offset is the mean of every block's
absmax), but they are small: one fp32 a block of 64 elements.

So, per weight (:meth:`ShardedQuantizer.quantize`):

1. each rank reads the elements from the start of the block holding its first element to the end of the block
   holding its last (its codes' elements, rounded out to whole blocks: about 1/N of the weight plus at most two
   blocks), with plain reads of those bytes of the file (nothing else of it is read or mapped);
2. quantizes them to NF4 (:func:`~qlora_kernels.quantize_nf4`, exactly as the whole tensor is: a block's codes
   depend only on its own elements);
3. all-gathers the fp32 absmax (each block from the one rank that owns its first element) and double-quantizes
   the whole absmax vector on every rank, as :func:`~qlora_kernels.quantize_nf4` does;

so every rank holds the same bytes it would hold after quantizing the whole weight and sharding it. A weight
stored in 4 bits (a bitsandbytes checkpoint, :meth:`ShardedQuantizer.read_stored`) needs no gather: each rank reads
its part of the packed codes and the small tensors whole.

The module is built with a placeholder of the full shape for the packed codes (``torch.empty``: address space,
not memory, on the CPU; on a GPU one layer's worth, allocated and freed), FSDP2 copies each rank's chunk of it
into the shard it allocates, and :meth:`ShardedQuantizer.install` then writes the values into the shards.
Linear layers (``NF4Linear``, attributes ``nf4_*``) and fused experts (``NF4Experts``, ``gate_up_proj_*`` /
``down_proj_*``; stored fused, or one by one and stacked by the loader's reader) alike; and the input embedding and
the output projection, dense parameters of units of their own, by rows (:meth:`ShardedQuantizer.read_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nf4 import NF4Weight, quantize_nf4
from ..quant_maps import dynamic_map, nf4_code
from ..reference.nf4 import quantize_absmax


def chunk_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the rows rank ``rank`` keeps when FSDP2 shards ``rows`` rows on dim 0 (``torch.chunk``:
    chunks of ``ceil(rows / world_size)``; trailing ranks may keep none)."""
    c = -(-rows // world_size)
    return min(rows, rank * c), min(rows, (rank + 1) * c)


def elements_to_read(numel: int, blocksize: int, world_size: int, rank: int) -> tuple[int, int, int, int]:
    """``(first, stop, first_block, stop_block)`` for rank ``rank``: the flat elements it reads (whole blocks around
    its packed codes' elements) and the blocks whose absmax it contributes (those whose first element is among its
    codes'; together the ranks' contributions are every block once, in order)."""
    nb = -(-numel // blocksize)

    def first_element(r: int) -> int:
        return min(numel, 2 * chunk_rows((numel + 1) // 2, world_size, r)[0])

    e0 = first_element(rank)
    e1 = first_element(rank + 1) if rank + 1 < world_size else numel
    b0 = -(-e0 // blocksize)
    b1 = -(-e1 // blocksize) if rank + 1 < world_size else nb
    if e0 >= e1:
        return e0, e0, b0, b0
    return (e0 // blocksize) * blocksize, min(numel, -(-e1 // blocksize) * blocksize), b0, b1


_PARTS = ("packed", "absmax", "code", "nested_absmax", "nested_code")  # an NF4Weight's tensors, in holder order


@dataclass
class ShardedQuantizer:
    """Reads the block weights rank by rank (see the module docstring), for the trainer's FSDP2 loader: float
    weights quantized from 1/N of their elements (:meth:`quantize`), stored 4-bit ones from 1/N of their packed
    codes (:meth:`read_stored`). ``gather(t, sizes)``: the concatenation over the ranks, in rank order, of each
    rank's 1-D fp32 ``t`` (rank ``r``'s of length ``sizes[r]``). ``bytes_read``: the checkpoint bytes this rank
    read for those weights; ``bytes_whole``: what reading them whole would have read.

    A weight's values wait in ``pending[module name][attribute]`` until :meth:`install`; the attributes are
    ``prefix + part`` (``nf4_packed`` ... for a linear layer, ``gate_up_proj_packed`` ... for experts)."""

    rank: int
    world_size: int
    gather: Callable[[Tensor, list[int]], Tensor]
    bytes_read: int = 0
    bytes_whole: int = 0
    pending: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    #: the dense parameters (full names) read by rows (:meth:`read_rows`): the input embedding
    dense_rows: set[str] = field(default_factory=set)

    def quantize(self, name: str, prefix: str, read: Callable[[int, int], Tensor], shape: torch.Size,
                 dtype: torch.dtype, device: torch.device, blocksize: int, double_quant: bool,
                 itemsize: int) -> NF4Weight:
        """The placeholder :class:`NF4Weight` of a float weight of module ``name`` (``shape``, quantized from
        ``dtype``): full-shape tensors whose values :meth:`install` writes into this rank's shards once the block
        is sharded. ``read(first, stop)``: the weight's flat elements ``[first, stop)`` in ``dtype`` on
        ``device``, read from a file of ``itemsize`` bytes an element. All ranks call this for the same weights in
        the same order (it all-gathers)."""
        numel = math.prod(shape)
        first, stop, b0, b1 = elements_to_read(numel, blocksize, self.world_size, self.rank)
        nb = -(-numel // blocksize)
        part, error = None, None
        mine = torch.empty(0, dtype=torch.float32, device=device)
        if stop > first:
            try:
                part = quantize_nf4(read(first, stop), blocksize=blocksize, double_quant=False)
                mine = part.absmax[b0 - first // blocksize:b1 - first // blocksize]
            except ValueError as exc:  # e.g. a NaN in this rank's part: every rank must still join the gather
                error, mine = exc, torch.zeros(b1 - b0, dtype=torch.float32, device=device)
            self.bytes_read += (stop - first) * itemsize
        self.bytes_whole += numel * itemsize
        # each rank sends a flag (1: its part failed) before its blocks, so all ranks fail together, none waits
        ranges = [elements_to_read(numel, blocksize, self.world_size, r) for r in range(self.world_size)]
        sizes = [1 + b - a for _, _, a, b in ranges]
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        sent = self.gather(torch.cat([flag, mine.float()]), sizes)
        starts = [sum(sizes[:r]) for r in range(self.world_size)]
        failed = [r for r, at in enumerate(starts) if float(sent[at]) != 0.0]
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"rank {failed[0]} could not quantize its part of {name}'s weight (its error names the "
                             "tensor and why)")
        absmax = torch.cat([sent[at + 1:at + n] for at, n in zip(starts, sizes)])
        if absmax.numel() != nb:
            raise RuntimeError(f"{name}: the ranks' absmax blocks add up to {absmax.numel()}, expected {nb}")
        code, offset, nested, nested_code = nf4_code(device), 0.0, None, None
        if double_quant:
            absmax, nested, offset = quantize_absmax(absmax)
            nested_code = dynamic_map(device)
        p0, p1 = chunk_rows((numel + 1) // 2, self.world_size, self.rank)
        packed = torch.empty(0, 1, dtype=torch.uint8, device=device)
        if part is not None and p1 > p0:
            skip = p0 - first // 2  # first is a block start, so even: its byte is the first of part's
            packed = part.packed[skip:skip + p1 - p0]
        whole = NF4Weight(packed=torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device=device), absmax=absmax,
                          shape=shape, dtype=dtype, blocksize=blocksize, code=code, nested_absmax=nested,
                          nested_code=nested_code, offset=offset)
        self._keep(name, prefix, whole, packed)
        return whole

    def read_stored(self, name: str, prefix: str, qw: NF4Weight, read_packed: Callable[[int, int], Tensor]
                    ) -> NF4Weight:
        """A stored 4-bit weight of module ``name``: ``qw`` holds its small tensors (absmax, tables, offset) and a
        full-shape placeholder for the packed codes, of which ``read_packed(first, stop)`` reads the bytes
        ``[first, stop)``; this rank reads only its shard's. Returns ``qw``."""
        rows = qw.packed.shape[0]
        p0, p1 = chunk_rows(rows, self.world_size, self.rank)
        width = qw.packed[0].numel() if rows else 1
        packed = read_packed(p0 * width, p1 * width).reshape(p1 - p0, *qw.packed.shape[1:])
        self.bytes_read += (p1 - p0) * width
        self.bytes_whole += qw.packed.numel()
        self._keep(name, prefix, qw, packed)
        return qw

    def read_rows(self, name: str, attr: str, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                  itemsize: int, read: Callable[[int, int], Tensor]) -> Tensor:
        """The full-shape placeholder of the dense parameter ``attr`` of module ``name`` (``shape``, in ``dtype``
        on ``device``), of which ``read(first, stop)`` reads flat elements of ``itemsize`` bytes: this rank reads
        only the rows its shard holds (dim 0), kept for :meth:`install`."""
        r0, r1 = chunk_rows(shape[0], self.world_size, self.rank)
        row = math.prod(shape[1:])
        self.pending.setdefault(name, {})[attr] = read(r0 * row, r1 * row).reshape(r1 - r0, *shape[1:]).to(
            device=device, dtype=dtype)
        self.bytes_read += (r1 - r0) * row * itemsize
        self.bytes_whole += math.prod(shape) * itemsize
        return torch.empty(shape, dtype=dtype, device=device)

    def _keep(self, name: str, prefix: str, qw: NF4Weight, packed: Tensor) -> None:
        """Hold this rank's values of ``qw``: its packed codes ``packed``, and its chunk of each small tensor."""
        local = self.pending.setdefault(name, {})
        local[prefix + "packed"] = packed
        for part in _PARTS[1:]:
            t = getattr(qw, part)
            if t is not None:  # this rank's chunk of the small tensors every rank holds whole
                lo, hi = chunk_rows(t.shape[0], self.world_size, self.rank)
                local[prefix + part] = t[lo:hi]

    def placeholder_bytes(self, block_name: str, block: nn.Module) -> int:
        """The bytes of the full-shape placeholders (packed codes) of ``block``'s weights read here, not yet
        installed: address space, never filled."""
        total = 0
        for rel, module in block.named_modules():
            local = self.pending.get(f"{block_name}.{rel}" if rel else block_name, {})
            total += sum(getattr(module, k).numel() for k in local if k.endswith("_packed"))
        return total

    def install(self, block_name: str, block: nn.Module) -> int:
        """Write the values of the layers of ``block`` (named ``block_name``) quantized so far into their FSDP2
        shards; call after ``fully_shard(block)``. Returns how many layers."""
        from torch.distributed.tensor import DTensor

        done = 0
        for rel, module in block.named_modules():
            name = f"{block_name}.{rel}" if rel else block_name
            local = self.pending.pop(name, None)
            if local is None:
                continue
            for key, value in local.items():
                p = getattr(module, key)
                if not isinstance(p, DTensor):
                    raise RuntimeError(f"{name}.{key}: expected an FSDP2 shard (DTensor) after fully_shard, got "
                                       f"{type(p).__name__}")
                shard = p.to_local()
                if shard.shape != value.shape:
                    raise RuntimeError(f"{name}.{key}: this rank's shard has shape {list(shard.shape)}, the values "
                                       f"read for it {list(value.shape)}")
                shard.copy_(value)
            done += 1
        return done

    def check_done(self) -> None:
        """RuntimeError naming the layers quantized but never installed (a block the hook did not shard)."""
        if self.pending:
            raise RuntimeError(f"read 1/N: layers quantized but never written into their shards: "
                               f"{list(self.pending)[:4]}")
