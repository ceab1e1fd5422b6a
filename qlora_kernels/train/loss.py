"""Causal-LM cross-entropy from hidden states, chunked so full-vocabulary logits never exist at once.

``causal_lm_loss(hidden, W, labels)`` returns the *sum* of token cross-entropies over target
tokens (labels != -100, shifted by one as in Hugging Face models) and the number of those tokens.
The caller divides by the target-token count of the whole accumulated batch (REFERENCE.md, SFT).

Memory: only target positions are gathered (prompt and padding cost nothing), and logits exist
for ``chunk_size`` tokens at a time, in fp32. The backward of each chunk is computed in the
forward pass, while its logits are live (the gradient w.r.t. the hidden states, and w.r.t. W
and the bias only when those require grad), so nothing vocabulary-sized is kept for backward:
the saved gradient has the shape of the hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
# Logit elements (fp32) per chunk when chunk_size is not given: 16 Mi elements = 64 MiB, plus as
# much again for the softmax gradient.
_AUTO_CHUNK_ELEMENTS = 1 << 24


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk that keep one chunk's fp32 logits near 64 MiB (at least 16 tokens)."""
    return max(16, _AUTO_CHUNK_ELEMENTS // max(1, vocab_size))


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    """``sum_i CE(h_i @ W^T + b, y_i)`` over rows of h [N, H] with W [V, H], chunked over N.

    Saves the gradients computed in forward (``dL/dh`` [N, H] and, if needed, ``dL/dW`` [V, H],
    ``dL/db`` [V], all for an upstream gradient of 1); backward scales them by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk_size: int,
                need_grad: bool) -> Tensor:
        # Logits, log-sum-exp and softmax stay in fp32 even under autocast: in bf16 the log-sum-exp
        # over a large vocabulary loses the small differences the loss is made of.
        with torch.autocast(device_type=h.device.type, enabled=False):
            return ChunkedLinearCrossEntropyFunction._forward(ctx, h, weight, bias, target, chunk_size, need_grad)

    @staticmethod
    def _forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk_size: int,
                 need_grad: bool) -> Tensor:
        w32 = weight.float()
        b32 = bias.float() if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        want_h = need_grad and ctx.needs_input_grad[0]
        want_w = need_grad and ctx.needs_input_grad[1]
        want_b = need_grad and bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(w32) if want_w else None
        grad_b = torch.zeros_like(b32) if want_b else None
        for s in range(0, h.shape[0], chunk_size):
            hc = h[s:s + chunk_size].float()
            yc = target[s:s + chunk_size]
            logits = hc @ w32.t()
            if b32 is not None:
                logits += b32
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if not (want_h or want_w or want_b):
                continue
            # d/dlogits of CE = softmax - onehot, computed in place over the chunk's logits.
            dlogits = logits.sub_(lse[:, None]).exp_()
            dlogits[torch.arange(yc.shape[0], device=yc.device), yc] -= 1.0
            if want_h:
                grad_h[s:s + chunk_size] = (dlogits @ w32).to(h.dtype)
            if want_w:
                grad_w += dlogits.t() @ hc
            if want_b:
                grad_b += dlogits.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        wdt, bdt = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(wdt) if grad_w is not None else None
        gb = (grad_b * grad_out).to(bdt) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def chunked_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                          chunk_size: int | None = None) -> Tensor:
    """Sum of cross-entropies of ``h @ weight^T + bias`` against ``target`` (fp32 scalar), chunked.

    h: [N, H] (any float dtype), weight: [V, H], target: int64 [N] with values in [0, V).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be [N, H] and weight [V, H]; got {list(h.shape)} and {list(weight.shape)}")
    if target.shape != h.shape[:1]:
        raise ValueError(f"target must be [{h.shape[0]}]; got {list(target.shape)}")
    chunk = chunk_size or auto_chunk_size(weight.shape[0])
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    return ChunkedLinearCrossEntropyFunction.apply(h, weight, bias, target, chunk, need)


def _module_chunk_ce(head: nn.Module, hc: Tensor, yc: Tensor) -> Tensor:
    return F.cross_entropy(head(hc).float(), yc, reduction="sum")


def causal_lm_loss(hidden: Tensor, head: Tensor | nn.Module, labels: Tensor, chunk_size: int | None = None,
                   bias: Tensor | None = None) -> tuple[Tensor, int]:
    """(sum of CE over target tokens, number of target tokens) for hidden [B, T, H] and labels [B, T].

    Position t predicts ``labels[:, t + 1]`` (labels are aligned with input_ids, -100 = ignored).
    ``head`` is the output projection's weight [V, H], or any module mapping [n, H] -> [n, V]
    (e.g. a quantized lm_head): a module runs chunk by chunk under activation checkpointing, so
    its logits are recomputed per chunk in backward instead of being kept.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    n = int(mask.sum())
    h = hidden[:, :-1][mask]
    y = target[mask]
    if n == 0:
        return hidden.sum() * 0.0, 0
    if isinstance(head, Tensor):
        return chunked_cross_entropy(h, head, y, bias=bias, chunk_size=chunk_size), n
    from torch.utils.checkpoint import checkpoint

    vocab = getattr(head, "out_features", None) or 32768
    chunk = chunk_size or auto_chunk_size(vocab)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        total = total + checkpoint(_module_chunk_ce, head, h[s:s + chunk], y[s:s + chunk], use_reentrant=False)
    return total, n


def model_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
               chunk_size: int | None = None) -> tuple[Tensor, int]:
    """Run a Hugging Face causal LM's decoder and the chunked loss over its output projection.

    Works for ``*ForCausalLM`` models (also wrapped in PEFT) whose logits are ``lm_head(hidden)``;
    models that rescale or soft-cap logits are refused rather than trained on a wrong loss.
    """
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"model config sets {attr}={getattr(cfg, attr)}: the chunked loss does "
                                      "not apply it yet")
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0]
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        return causal_lm_loss(hidden, head.weight, labels, chunk_size, bias=head.bias)
    return causal_lm_loss(hidden, head, labels, chunk_size)
