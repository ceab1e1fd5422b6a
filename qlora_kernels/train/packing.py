"""Sample packing (``sample_packing: true``): many examples in one row, each attending only to itself.

Real instruction data has ragged lengths, so micro-batches padded to their longest example spend a
large share of every step on padding. With packing, the training items are put into *rows* of
``capacity`` token slots (SFT: ``sequence_len``; DPO: ``2 × sequence_len``, a whole pair per row at
least) once, before the first step, by a seeded, deterministic best-fit-decreasing bin packer
(:func:`pack_bins`), and a micro-batch is ``micro_batch_size`` such rows (:class:`.data.MicroBatchStream`
shuffles the rows each epoch, as it shuffles examples without packing).

A packed row (:func:`collate_segments`) is the concatenation of its sequences (an SFT example; the chosen
and the rejected sequence of a DPO pair, each its own sequence), then padding up to the longest row of the
micro-batch. Each sequence is a *segment*:

* ``position_ids`` restart at 0 for every segment (the padding tail is a segment of its own), so the
  rotary (or absolute) positions are those of the sequence alone, and transformers builds the
  block-diagonal causal mask from them: with no 2-D ``attention_mask`` and no cache,
  ``transformers.masking_utils`` finds the segments (``find_packed_sequence_indices``) for the
  ``sdpa``, ``eager`` and ``flex_attention`` paths (one row or many), and the flash-attention paths read
  them from the position ids of a single flattened row (``_is_packed_sequence``), which
  :func:`.loss.decoder_forward` gives them (layout ``"flat"``);
* the first token of each segment is not a target (label -100): it is never predicted from the
  previous segment's last token, exactly as position 0 of an unpacked example is never predicted;
* ``sequence_ids`` (DPO) number the sequences of the batch, so log-probs are summed per sequence.

So the loss sum and its count (target tokens) of a packed micro-batch are those of the same examples
unpacked, and the step's normalisation stays "mean over the target tokens of the whole step".
:func:`check_packed_attention` verifies on the model itself, before the first step, that a perturbed
segment changes nothing in its neighbours (else it tries an explicit 4-D mask, layout ``"mask"``, and
refuses to train if that does not keep them apart either).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .components import eval_mode
from .loss import IGNORE_INDEX, decoder_forward, default_packed_layout


def pack_bins(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Bins of item indices whose lengths add up to at most ``capacity`` each: best-fit decreasing.

    Items are placed longest first (equal lengths in the order of a permutation seeded with ``seed``), each in
    the open bin with the least room that still fits it (the oldest such bin on a tie), or a new bin. Same
    input, same bins; the order of the bins is that in which they were opened (longest first), and the
    items of a bin are in the order placed. Best fit needs at most 11/9 OPT + 1 bins, as first fit does.

    Raises:
        ValueError: an item longer than ``capacity``, or a capacity below 1.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1; got {capacity}")
    n = len(lengths)
    tie = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    rank = [0] * n
    for pos, i in enumerate(tie):
        rank[i] = pos
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin index) of the bins with room, sorted
    for i in sorted(range(n), key=lambda i: (-lengths[i], rank[i])):
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"item {i} has {size} tokens, more than the row capacity {capacity}")
        j = bisect.bisect_left(rooms, (size, -1))
        if j == len(rooms):
            bins.append([i])
            room, b = capacity - size, len(bins) - 1
        else:
            room, b = rooms.pop(j)
            bins[b].append(i)
            room -= size
        if room > 0:
            bisect.insort(rooms, (room, b))
    return bins


@dataclass
class PackingStats:
    """What packing did to a data set: items, rows, and the share of slots that hold real tokens."""

    items: int
    rows: int
    capacity: int
    tokens: int
    padded_efficiency: float  # the same items in micro-batches padded to their longest item (the run without packing)

    @property
    def efficiency(self) -> float:
        """Real tokens / (rows × capacity)."""
        return self.tokens / max(1, self.rows * self.capacity)

    def summary(self, noun: str) -> str:
        return (f"sample_packing: {self.items} {noun} in {self.rows} rows of {self.capacity} tokens, packing "
                f"efficiency {100 * self.efficiency:.1f}% of the slots (padded micro-batches without packing: "
                f"{100 * self.padded_efficiency:.1f}%)")


def packing_stats(lengths: Sequence[int], bins: list[list[int]], capacity: int, micro_batch_size: int,
                  seed: int) -> PackingStats:
    """:class:`PackingStats` of ``bins``; the padded efficiency is that of the first epoch's shuffled micro-batches
    of ``micro_batch_size`` items without packing (the order :class:`.data.MicroBatchStream` draws)."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    slots = 0
    for s in range(0, len(order), micro_batch_size):
        part = [lengths[i] for i in order[s:s + micro_batch_size]]
        slots += max(part) * len(part)
    tokens = sum(lengths)
    return PackingStats(len(lengths), len(bins), capacity, tokens, tokens / max(1, slots))


def collate_segments(rows: list[list[Any]], pad_id: int, counted: bool = True,
                     sequence_ids: list[list[int]] | None = None) -> dict[str, Tensor]:
    """One packed batch: row r is the concatenation of the examples ``rows[r]`` (``input_ids`` / ``labels``), right-
    padded to the longest row.

    Keys: ``input_ids``; ``labels`` (the examples' labels, -100 on the first token of each example and on padding;
    all -100 with ``counted=False``); ``position_ids`` (0, 1, ... per example, and per padding tail);
    ``attention_mask`` (1 on real tokens: what the loop counts; a packed batch does not pass it to the model);
    and, given ``sequence_ids`` (one number per example, as ``rows``), ``sequence_ids`` (-1 on padding).
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seq = torch.full(shape, -1, dtype=torch.long) if sequence_ids is not None else None
    for r, row in enumerate(rows):
        s = 0
        for k, e in enumerate(row):
            n = len(e.input_ids)
            ids[r, s:s + n] = torch.tensor(e.input_ids)
            if counted and n > 1:
                labels[r, s + 1:s + n] = torch.tensor(e.labels[1:])
            pos[r, s:s + n] = torch.arange(n)
            mask[r, s:s + n] = 1
            if seq is not None:
                seq[r, s:s + n] = sequence_ids[r][k]
            s += n
        pos[r, s:] = torch.arange(width - s)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos}
    if seq is not None:
        batch["sequence_ids"] = seq
    return batch


@torch.no_grad()
def check_packed_attention(model: nn.Module, layout: str | None = None) -> str:
    """The packed layout (:func:`.loss.decoder_forward`) under which ``model`` keeps packed segments apart.

    Two rows ``[a, b, pad]`` and ``[b, a]`` of random tokens run twice in eval mode, the second time with every
    token of ``a`` changed: the hidden states of ``b`` must not change (within 1e-3 of their scale, which
    leaves room for low-precision rounding; attention across segments changes them by far more). The
    default layout is tried first (``"flat"`` for flash attention, else ``"rows"``: the position ids alone),
    then the explicit block-diagonal mask (``"mask"``). Returns the first that passes.

    Raises:
        RuntimeError: neither keeps the segments apart (the caller names ``sample_packing``).
    """
    with eval_mode(model):
        emb = model.get_input_embeddings()
        vocab = getattr(emb, "num_embeddings", None) or emb.weight.shape[0]
        device = emb.weight.device
        g = torch.Generator().manual_seed(0)
        na, nb = 5, 7
        a, a2, b = (torch.randint(0, vocab, (n,), generator=g) for n in (na, na, nb))
        pad = torch.zeros(3, dtype=torch.long)

        def rows(first: Tensor) -> tuple[Tensor, Tensor]:
            r0 = torch.cat([first, b, pad])
            r1 = torch.cat([b, first, pad])
            p0 = torch.cat([torch.arange(na), torch.arange(nb), torch.arange(3)])
            p1 = torch.cat([torch.arange(nb), torch.arange(na), torch.arange(3)])
            return torch.stack([r0, r1]).to(device), torch.stack([p0, p1]).to(device)

        ids, pos = rows(a)
        ids2, _ = rows(a2)
        mask = (ids >= 0).long()
        tried = []
        for lay in dict.fromkeys([layout or default_packed_layout(model), "mask"]):
            h1 = decoder_forward(model, ids, mask, position_ids=pos, layout=lay)[0].float()
            h2 = decoder_forward(model, ids2, mask, position_ids=pos, layout=lay)[0].float()
            b1 = torch.cat([h1[0, na:na + nb], h1[1, :nb]])
            b2 = torch.cat([h2[0, na:na + nb], h2[1, :nb]])
            change = float((b1 - b2).abs().max())
            scale = float(b1.abs().max()) or 1.0
            if change <= 1e-3 * scale:
                return lay
            tried.append(f"{lay!r}: a change in one segment moved its neighbour's hidden states by {change:.3g} "
                         f"(scale {scale:.3g})")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    raise RuntimeError(f"packed examples are not kept apart by this model's attention ({impl}): " + "; ".join(tried))
