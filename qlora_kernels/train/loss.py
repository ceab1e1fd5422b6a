"""The output projection's loss from hidden states, chunked so full-vocabulary logits never exist at once.

One chunked function (:class:`ChunkedHeadFunction`) computes the log-probability of each target token
under ``softmax(h @ W^T + b)``; the SFT loss is minus their sum (:func:`chunked_cross_entropy`,
:func:`causal_lm_loss`: the sum over target tokens, labels != -100, shifted by one as in Hugging Face
models, and their count; the caller divides by the target-token count of the whole accumulated batch),
and DPO uses the per-token values (:func:`token_log_probs`, summed per sequence by
:func:`sequence_log_probs`). Both gather the same shifted target positions (:func:`target_rows`) from the
hidden states of one decoder forward (:func:`decoder_forward`), whose batch may be packed (several
sequences per row, each attending only to itself: :mod:`.packing`; then log-probs are summed per sequence).

Memory: only target positions are gathered (prompt and padding cost nothing), and logits exist for
``chunk_size`` tokens at a time. The backward of each chunk is computed in the forward pass, while its
logits are live, so nothing vocabulary-sized is kept for backward: the saved gradient has the shape of
the hidden states (plus, for the summed loss only, the weight's and bias' gradients when they train).

Sharded output projection (FSDP2, :mod:`.fsdp`): a weight that is a ``DTensor`` sharded on dim 0 (its own FSDP2
unit) is never gathered. Each rank projects onto its rows of the vocabulary (:class:`_VocabShards`): every chunk's
hidden rows and targets are all-gathered from the ranks (their counts differ), each rank computes the logits of its
vocabulary rows, the ranks' log-sum-exps and target logits are combined (a gather of two floats a row), and each
rank keeps its own rows' log-probs; the gradient of the hidden rows is each rank's partial product with its rows,
reduce-scattered back to the rank the rows came from. Every rank makes the same number of these collectives (the
chunks of the rank with the most rows), also with no target rows of its own. Communication per chunk: the hidden
rows of all ranks twice (gather, then reduce-scatter); nothing vocabulary-sized ever moves.

Numerics: the GEMMs with W run in the compute dtype (the autocast dtype inside an autocast region, as
``F.linear`` would; else the promoted dtype of h and W), with fp32 accumulation and fp32 logits; the
log-sum-exp, the softmax and the log-probs are fp32. So a bf16 run does bf16 tensor-core GEMMs (and
never casts the vocabulary matrix to fp32), while an fp32 run is exact fp32. On a CPU the same
rounding is emulated (operands rounded to the compute dtype, then an fp32 GEMM).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # torch's DTensor (FSDP2's sharded parameters)
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch without distributed support: no weight is sharded
    DTensor = Shard = None

IGNORE_INDEX = -100
# Logit elements (fp32) per chunk when chunk_size is not given: 16 Mi elements = 64 MiB, plus as
# much again for the softmax gradient.
_AUTO_CHUNK_ELEMENTS = 1 << 24
# torch.mm(a, b, out_dtype=torch.float32) for bf16 / fp16 operands (CUDA, torch >= 2.8)
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk that keep one chunk's fp32 logits near 64 MiB (at least 16 tokens)."""
    return max(16, _AUTO_CHUNK_ELEMENTS // max(1, vocab_size))


def head_compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the head's GEMMs: the autocast dtype inside an autocast region, else h's and W's promoted."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


class _HeadGemm:
    """GEMMs with the output projection W: operands in the compute dtype, results in fp32 (or wider)."""

    def __init__(self, weight: Tensor, compute: torch.dtype) -> None:
        self.compute = compute
        self.acc = torch.promote_types(compute, torch.float32)
        w = weight.detach().to(compute)
        self.native = w.is_cuda and compute in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE
        # elsewhere: round the operands to the compute dtype, multiply in fp32 (W converted once per call)
        self.w = w if self.native or compute == self.acc else w.to(self.acc)

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        if self.native:
            return torch.mm(a.to(self.compute), b.to(self.compute), out_dtype=torch.float32)
        return a.to(self.compute).to(self.acc) @ b.to(self.acc)


def is_row_sharded(weight: Tensor) -> bool:
    """Whether ``weight`` is a ``DTensor`` sharded on dim 0 over a 1-D mesh (an FSDP2 unit's parameter)."""
    return (DTensor is not None and isinstance(weight, DTensor) and weight.device_mesh.ndim == 1
            and tuple(weight.placements) == (Shard(0),))


class _VocabShards:
    """The collectives of the vocabulary-parallel loss (module docstring): each rank holds the rows ``[v0, v1)`` of
    the output projection and ``rows[r]`` hidden rows of its own batch; chunk ``k`` takes rows ``[k c, (k + 1) c)``
    of every rank, concatenated in rank order. Without a process group (``group=None``): one rank holding the
    whole vocabulary, and every method is the identity."""

    def __init__(self, n_rows: int, vocab: int, local_vocab: int, device: torch.device, group=None) -> None:
        self.group = group
        if group is None:
            self.world, self.rank, self.rows, self.v0 = 1, 0, [n_rows], 0
        else:
            import torch.distributed as dist

            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
            sizes = torch.empty(self.world * 2, dtype=torch.int64, device=device)
            dist.all_gather_into_tensor(sizes, torch.tensor([n_rows, local_vocab], device=device), group=group)
            self.rows, vocabs = sizes[0::2].tolist(), sizes[1::2].tolist()
            if sum(vocabs) != vocab:
                raise RuntimeError(f"the ranks' rows of the output projection add up to {sum(vocabs)}, not its "
                                   f"{vocab}")
            self.v0 = sum(vocabs[:self.rank])
        self.v1 = self.v0 + local_vocab

    def chunks(self, chunk: int) -> list[tuple[int, list[int]]]:
        """``(first row, rows of each rank)`` of every chunk: as many on every rank (the most any rank needs)."""
        n = max(-(-r // chunk) for r in self.rows)
        return [(s, [max(0, min(chunk, r - s)) for r in self.rows]) for s in range(0, n * chunk, chunk)]

    def gather(self, t: Tensor, counts: list[int]) -> Tensor:
        """Every rank's rows of this chunk (``t``: this rank's ``counts[rank]``), concatenated in rank order."""
        if self.group is None:
            return t
        import torch.distributed as dist

        m = max(counts)
        buf = t.new_zeros(m, *t.shape[1:])
        buf[:t.shape[0]] = t
        out = t.new_empty(self.world * m, *t.shape[1:])
        dist.all_gather_into_tensor(out, buf, group=self.group)
        return torch.cat([out[r * m:r * m + c] for r, c in enumerate(counts)])

    def combine(self, lse: Tensor, picked: Tensor) -> tuple[Tensor, Tensor]:
        """The log-sum-exp over the whole vocabulary and the target logit, of the ranks' over their rows (a rank
        without the target's row contributes 0 to it)."""
        if self.group is None:
            return lse, picked
        import torch.distributed as dist

        mine = torch.stack([lse, picked])
        out = mine.new_empty(self.world * 2, mine.shape[1])
        dist.all_gather_into_tensor(out, mine, group=self.group)
        out = out.view(self.world, 2, -1)
        return torch.logsumexp(out[:, 0], dim=0), out[:, 1].sum(0)

    def mine(self, t: Tensor, counts: list[int]) -> Tensor:
        """This rank's rows of a chunk's per-row values (every rank holds all of them)."""
        at = sum(counts[:self.rank])
        return t[at:at + counts[self.rank]]

    def reduce_mine(self, t: Tensor, counts: list[int]) -> Tensor:
        """The sum over the ranks of a chunk's per-row partials ``t`` (all ranks' rows), this rank's rows of it."""
        if self.group is None:
            return t
        import torch.distributed as dist

        m = max(counts)
        buf = t.new_zeros(self.world, m, *t.shape[1:])
        at = 0
        for r, c in enumerate(counts):
            buf[r, :c] = t[at:at + c]
            at += c
        out = t.new_empty(m, *t.shape[1:])
        dist.reduce_scatter_tensor(out, buf.reshape(self.world * m, *t.shape[1:]), group=self.group)
        return out[:counts[self.rank]]


def _head_parts(h: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None, _VocabShards | None]:
    """``(weight, bias, shards)``: a row-sharded (FSDP2) output projection as this rank's rows and the collectives
    that combine the ranks' (:class:`_VocabShards`); any other as it is, with ``shards`` None."""
    if not is_row_sharded(weight):
        return weight, bias, None
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("a sharded output projection (a DTensor weight) must be frozen: the vocabulary-parallel "
                         "loss computes no gradient for it")
    local = weight.to_local()
    if bias is not None:
        if not is_row_sharded(bias):
            raise ValueError(f"the output projection's weight is sharded by rows but its bias is "
                             f"{type(bias).__name__} {list(bias.shape)}; expected a DTensor sharded the same way")
        bias = bias.to_local()
    return local, bias, _VocabShards(h.shape[0], weight.shape[0], local.shape[0], h.device,
                                     weight.device_mesh.get_group())


class ChunkedHeadFunction(torch.autograd.Function):
    """Log-probabilities ``log softmax(h_i @ W^T + b)[y_i]`` for the rows of h [N, H], W [V, H], chunked over N.

    ``reduce="sum"``: returns their sum (a scalar); gradients for h, W and b (each computed in forward
    for an upstream gradient of 1, scaled in backward). ``reduce="none"``: returns fp32 ``[N]``;
    gradient for h only (row i scaled by the upstream gradient of token i in backward; a W that
    trains needs the upstream gradients first, see :func:`token_log_probs`). ``shards``: W and b are this
    rank's rows of a vocabulary split over ranks (:class:`_VocabShards`; frozen), else None.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk_size: int,
                compute: torch.dtype, reduce: str, need_grad: bool, shards: _VocabShards | None = None) -> Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            gemm = _HeadGemm(weight, compute)
            b = bias.detach().to(gemm.acc) if bias is not None else None
            want_h = need_grad and ctx.needs_input_grad[0]
            want_w = need_grad and reduce == "sum" and ctx.needs_input_grad[1]
            want_b = need_grad and reduce == "sum" and bias is not None and ctx.needs_input_grad[2]
            out = torch.empty(h.shape[0], dtype=gemm.acc, device=h.device)
            grad_h = torch.empty_like(h) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=gemm.acc, device=h.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=gemm.acc, device=h.device) if want_b else None
            parts = shards or _VocabShards(h.shape[0], weight.shape[0], weight.shape[0], h.device)
            for s, counts in parts.chunks(chunk_size):
                hc = parts.gather(h[s:s + chunk_size], counts)
                yc = parts.gather(target[s:s + chunk_size], counts) - parts.v0  # the target's row among W's
                logits = gemm.mm(hc, gemm.w.t())
                if b is not None:
                    logits += b
                # a target outside this rank's rows (a sharded vocabulary): picked at row 0, counted 0
                inside = ((yc >= 0) & (yc < weight.shape[0])).to(logits.dtype)
                col = yc.clamp(0, max(weight.shape[0] - 1, 0))[:, None]
                if weight.shape[0]:
                    lse = torch.logsumexp(logits, dim=-1)
                    picked = logits.gather(1, col).squeeze(1) * inside
                else:  # a rank holding none of the vocabulary
                    lse = logits.new_full((hc.shape[0],), float("-inf"))
                    picked = logits.new_zeros(hc.shape[0])
                lse, picked = parts.combine(lse, picked)
                out[s:s + counts[parts.rank]] = parts.mine(picked - lse, counts)
                if not (want_h or want_w or want_b):
                    continue
                # d log p(y) / d logits = onehot(y) - softmax, in place over the chunk's logits
                dlogits = logits.sub_(lse[:, None]).exp_().neg_()
                if weight.shape[0]:
                    dlogits.scatter_add_(1, col, inside[:, None])
                if want_h:
                    grad_h[s:s + counts[parts.rank]] = parts.reduce_mine(gemm.mm(dlogits, gemm.w), counts).to(h.dtype)
                if want_w:
                    grad_w += gemm.mm(dlogits.t(), hc)
                if want_b:
                    grad_b += dlogits.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.reduce, ctx.dtypes = reduce, (weight.dtype, bias.dtype if bias is not None else None)
        return out.sum() if reduce == "sum" else out.float()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        if ctx.reduce == "sum":
            gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        else:
            gh = grad_h * grad_out[:, None].to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(wdt) if grad_w is not None else None
        gb = (grad_b * grad_out).to(bdt) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None, None


def _check_head_args(h: Tensor, weight: Tensor, target: Tensor) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be [N, H] and weight [V, H]; got {list(h.shape)} and {list(weight.shape)}")
    if target.shape != h.shape[:1]:
        raise ValueError(f"target must be [{h.shape[0]}]; got {list(target.shape)}")


def chunked_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                          chunk_size: int | None = None) -> Tensor:
    """Sum of cross-entropies of ``h @ weight^T + bias`` against ``target`` (fp32 scalar), chunked.

    h: [N, H] (any float dtype), weight: [V, H], target: int64 [N] with values in [0, V). Gradients
    for h, weight and bias (those that require grad). A weight sharded by rows over ranks (a ``DTensor``, frozen)
    runs vocabulary-parallel (module docstring): a collective every rank calls, each with its own rows.
    """
    _check_head_args(h, weight, target)
    chunk = chunk_size or auto_chunk_size(weight.shape[0])
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    w, b, shards = _head_parts(h, weight, bias)
    logp = ChunkedHeadFunction.apply(h, w, b, target, chunk, head_compute_dtype(h, w), "sum", need, shards)
    return -logp.float()


def _module_chunk_log_probs(head: nn.Module, hc: Tensor, yc: Tensor) -> Tensor:
    logits = head(hc).float()
    return logits.gather(1, yc[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _module_chunk_ce(head: nn.Module, hc: Tensor, yc: Tensor) -> Tensor:
    return F.cross_entropy(head(hc).float(), yc, reduction="sum")


def _checkpointed_chunks(fn: Callable[..., Tensor], head: nn.Module, h: Tensor, target: Tensor,
                         chunk_size: int | None) -> list[Tensor]:
    """``fn(head, h_chunk, target_chunk)`` over chunks of rows under activation checkpointing, so that a chunk's
    logits are recomputed in backward instead of kept (a module head, or a weight that trains)."""
    from torch.utils.checkpoint import checkpoint

    vocab = getattr(head, "out_features", None) or 32768
    chunk = chunk_size or auto_chunk_size(vocab)
    return [checkpoint(fn, head, h[s:s + chunk], target[s:s + chunk], use_reentrant=False)
            for s in range(0, h.shape[0], chunk)]


def token_log_probs(h: Tensor, head: Tensor | nn.Module, target: Tensor, bias: Tensor | None = None,
                    chunk_size: int | None = None) -> Tensor:
    """Log-probability of each target token, fp32 ``[N]``, for hidden rows h ``[N, H]``, chunked.

    ``head`` is the output projection's weight ``[V, H]`` (the fast path, when it and the bias are
    frozen) or a module mapping ``[n, H] -> [n, V]``; a module, or a weight that requires grad, runs
    chunk by chunk under activation checkpointing, so a chunk's logits are recomputed in backward
    instead of kept. A frozen weight sharded by rows over ranks (a ``DTensor``) runs vocabulary-parallel
    (module docstring): a collective every rank calls, each with its own rows, also none.
    """
    if h.dim() != 2 or target.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, H] and target [N]; got {list(h.shape)} and {list(target.shape)}")
    if isinstance(head, Tensor) and (is_row_sharded(head) or not head.requires_grad
                                     and not (bias is not None and bias.requires_grad)):
        _check_head_args(h, head, target)
        chunk = chunk_size or auto_chunk_size(head.shape[0])
        need = torch.is_grad_enabled() and h.requires_grad
        w, b, shards = _head_parts(h, head, bias)
        return ChunkedHeadFunction.apply(h, w, b, target, chunk, head_compute_dtype(h, w), "none", need, shards)
    if isinstance(head, Tensor):
        weight, b = head, bias
        head = lambda x: F.linear(x, weight, b)  # noqa: E731
    parts = _checkpointed_chunks(_module_chunk_log_probs, head, h, target, chunk_size)
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


# --------------------------------------------------------------------------- causal LM: shift, mask, project


def target_rows(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(h [N, H], y [N], mask [B, T-1])``: the hidden rows that predict a target token, their targets, and where
    they are.

    hidden ``[B, T, H]``; labels ``[B, T]`` aligned with the input ids: position t predicts ``labels[:, t + 1]``
    (the shift of Hugging Face causal LMs), ``-100`` where not trained. Prompt and padding rows are never gathered.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return hidden[:, :-1][mask], target[mask], mask


def causal_lm_loss(hidden: Tensor, head: Tensor | nn.Module, labels: Tensor, chunk_size: int | None = None,
                   bias: Tensor | None = None) -> tuple[Tensor, int]:
    """(sum of CE over target tokens, number of target tokens) for hidden [B, T, H] and labels [B, T].

    Position t predicts ``labels[:, t + 1]`` (labels are aligned with input_ids, -100 = ignored; see
    :func:`target_rows`). ``head`` is the output projection's weight [V, H], or any module mapping
    [n, H] -> [n, V] (e.g. a quantized lm_head): a module runs chunk by chunk under activation
    checkpointing, so its logits are recomputed per chunk in backward instead of being kept.
    """
    h, y, _ = target_rows(hidden, labels)
    n = y.numel()  # the target tokens: y holds one entry per True of the mask
    if n == 0 and not (isinstance(head, Tensor) and is_row_sharded(head)):  # (a sharded head: a collective)
        return hidden.sum() * 0.0, 0
    if isinstance(head, Tensor):
        return chunked_cross_entropy(h, head, y, bias=bias, chunk_size=chunk_size), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for part in _checkpointed_chunks(_module_chunk_ce, head, h, y, chunk_size):
        total = total + part
    return total, n


def sequence_log_probs(hidden: Tensor, head: Tensor | nn.Module, labels: Tensor, chunk_size: int | None = None,
                       bias: Tensor | None = None, sequence_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(log-probs [S], target counts [S])``: per sequence, the sum of log p(label) over its target tokens.

    The same positions as :func:`causal_lm_loss` (:func:`target_rows`); only target positions are projected,
    ``chunk_size`` rows at a time (:func:`token_log_probs`). A sequence is a row (S = B), or, given
    ``sequence_ids`` ``[B, T]`` (a packed batch: the number of the sequence each token belongs to, -1 on
    padding; see :mod:`.packing`), each number (S = the largest + 1); a target counts for its own sequence.
    """
    return (_summed_log_probs(hidden, head, labels, chunk_size, bias, sequence_ids),
            sequence_target_counts(labels, sequence_ids))


def _summed_log_probs(hidden: Tensor, head: Tensor | nn.Module, labels: Tensor, chunk_size: int | None,
                      bias: Tensor | None, sequence_ids: Tensor | None) -> Tensor:
    """The log-probs ``[S]`` of :func:`sequence_log_probs`, without the target counts."""
    h, y, mask = target_rows(hidden, labels)
    if sequence_ids is None:
        n_seq = labels.shape[0]
        rows = torch.arange(n_seq, device=labels.device)[:, None].expand_as(mask)[mask]
    else:
        n_seq = int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0
        rows = sequence_ids[:, 1:][mask]
    tok = token_log_probs(h, head, y, bias=bias, chunk_size=chunk_size)
    out = torch.zeros(n_seq, dtype=torch.float32, device=hidden.device).index_add(0, rows, tok)
    if tok.numel() == 0:
        out = out + hidden.sum() * 0.0  # keep the graph connected (every rank of DDP must produce grads)
    return out


def sequence_target_counts(labels: Tensor, sequence_ids: Tensor | None = None) -> Tensor:
    """Target tokens of each sequence ``[S]`` (int64): of each row, or of each number in ``sequence_ids``."""
    mask = labels[:, 1:] != IGNORE_INDEX
    if sequence_ids is None:
        return mask.sum(1)
    n_seq = int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0
    return torch.bincount(sequence_ids[:, 1:][mask], minlength=n_seq)


# --------------------------------------------------------------------------- the decoder, packed or not

#: How a packed batch (:mod:`.packing`) goes through the decoder: ``"rows"``, its rows with their
#: ``position_ids`` and no 2-D attention mask (transformers builds the block-diagonal causal mask from the
#: position ids: sdpa, eager, flex); ``"flat"``, all rows as one row (the flash-attention paths detect packed
#: sequences from the position ids of a single row only); ``"mask"``, the rows with an explicit 4-D
#: block-diagonal causal mask (for a model that ignores the position ids when building its mask).
PACKED_LAYOUTS = ("rows", "flat", "mask")


def default_packed_layout(model: nn.Module) -> str:
    """``"flat"`` for a flash-attention implementation, else ``"rows"``."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flat" if impl.startswith("flash") else "rows"


def packed_attention_mask(position_ids: Tensor, dtype: torch.dtype, boolean: bool) -> Tensor:
    """The 4-D block-diagonal causal mask ``[B, 1, T, T]`` of the segments that ``position_ids`` restart: True / 0
    where a query may attend to a key (same segment, not later), False / the dtype's minimum elsewhere."""
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    seg = (step != 1).cumsum(-1)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    if boolean:
        return allowed[:, None]
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def decoder_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                    position_ids: Tensor | None = None, layout: str | None = None) -> tuple[
        Tensor, Tensor | nn.Module, Tensor | None]:
    """``(hidden states, head, bias)`` of a Hugging Face causal LM: its decoder's output and its output projection
    (the weight and bias of a plain ``nn.Linear``, also an FSDP2 unit's sharded ones, else the module itself, with
    bias None).

    Works for ``*ForCausalLM`` models (also wrapped in PEFT) whose logits are ``lm_head(hidden)``; models that
    rescale or soft-cap logits are refused rather than trained on a wrong loss.

    ``position_ids`` given: a packed batch (:mod:`.packing`; ``attention_mask`` is then not passed to the model,
    only its position ids), run in ``layout`` (:data:`PACKED_LAYOUTS`; default :func:`default_packed_layout`);
    the hidden states come back ``[B, T, H]`` in every layout.
    """
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"model config sets {attr}={getattr(cfg, attr)}: the chunked loss and "
                                      "log-probs do not apply it yet")
    decoder = model.get_decoder()
    if position_ids is None:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    else:
        layout = layout or default_packed_layout(model)
        if layout not in PACKED_LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(PACKED_LAYOUTS)}; got {layout!r}")
        if layout == "flat":
            B, T = input_ids.shape
            hidden = decoder(input_ids=input_ids.reshape(1, B * T), position_ids=position_ids.reshape(1, B * T),
                             attention_mask=None, use_cache=False)[0].reshape(B, T, -1)
        else:
            mask = None
            if layout == "mask":
                emb = model.get_input_embeddings().weight
                dtype = torch.get_autocast_dtype(emb.device.type) if torch.is_autocast_enabled(
                    emb.device.type) else emb.dtype
                mask = packed_attention_mask(position_ids, dtype, getattr(cfg, "_attn_implementation", "") == "sdpa")
            hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)[0]
    head = model.get_output_embeddings()
    if is_plain_linear(head):
        return hidden, head.weight, head.bias
    return hidden, head, None


def is_plain_linear(module: nn.Module | None) -> bool:
    """Whether ``module`` is an ``nn.Linear`` itself (not a subclass such as a quantized layer), also once FSDP2's
    ``fully_shard`` has made it its unit (the class ``FSDPLinear``, of ``FSDPModule`` and ``nn.Linear``)."""
    if type(module) is nn.Linear:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule) and type(module).__bases__ == (FSDPModule, nn.Linear)


def model_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
               chunk_size: int | None = None, position_ids: Tensor | None = None,
               layout: str | None = None) -> tuple[Tensor, int]:
    """Run a Hugging Face causal LM's decoder and :func:`causal_lm_loss` over its output projection
    (:func:`decoder_forward`; ``position_ids`` / ``layout``: a packed batch): ``(sum of CE over target tokens,
    number of target tokens)``."""
    hidden, head, bias = decoder_forward(model, input_ids, attention_mask, position_ids, layout)
    return causal_lm_loss(hidden, head, labels, chunk_size, bias=bias)


def model_sequence_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                             chunk_size: int | None = None, position_ids: Tensor | None = None,
                             sequence_ids: Tensor | None = None, layout: str | None = None) -> Tensor:
    """Run a Hugging Face causal LM's decoder and :func:`sequence_log_probs` over its output projection
    (:func:`decoder_forward`; ``position_ids`` / ``sequence_ids`` / ``layout``: a packed batch): the log-probs
    ``[S]``, one per row, or per sequence of a packed batch."""
    hidden, head, bias = decoder_forward(model, input_ids, attention_mask, position_ids, layout)
    return _summed_log_probs(hidden, head, labels, chunk_size, bias, sequence_ids)
