"""Direct Preference Optimization (DPO) for the thin trainer: the loss, the reference log-probs, the step.

The method (REFERENCE.md, SFT and DPO). For a prompt x with a preferred completion y_w and a rejected
one y_l, with log-probabilities summed over the completion tokens,

    h = [log πθ(y_w|x) − log πref(y_w|x)] − [log πθ(y_l|x) − log πref(y_l|x)]

and the per-pair losses are

* ``sigmoid`` (DPO): ``−(1−ε) log σ(βh) − ε log σ(−βh)``; ε = ``dpo_label_smoothing`` (0 gives plain
  DPO; ε > 0 is the "conservative" variant that assumes a fraction ε of the labels are flipped);
* ``ipo`` (IPO): ``(h̄ − 1/(2β))²``, a squared loss that pulls h̄ to a finite target instead of to +∞,
  where h̄ is h with each completion's log-ratio divided by its number of completion tokens
  (``[log πθ(y_w|x) − log πref(y_w|x)] / |y_w| − [log πθ(y_l|x) − log πref(y_l|x)] / |y_l|``): TRL's
  form (``DPOTrainer``, ``loss_type="ipo"``), the one the IPO paper's results were obtained with, so
  that β means the same for short and long completions.

The implicit rewards are ``β (log πθ − log πref)`` of each completion; the metrics are their means
(``rewards/chosen``, ``rewards/rejected``), the mean margin (``rewards/margins``) and the share of pairs
whose chosen reward is strictly greater (``rewards/accuracies``; 0 while the policy equals the reference).

The reference model is the policy itself with its LoRA adapters switched off
(:func:`qlora_kernels.hf.adapters_disabled`): no second copy of the weights. With
``precompute_ref_log_probs`` the reference log-probs of every pair are computed once, before training,
and kept with the pairs, so a step runs one forward instead of two.

Chosen and rejected sequences go through the model in one forward (the first half of the batch is
chosen, the second half rejected). Log-probs are computed from the decoder's hidden states in chunks
of tokens (:func:`.loss.sequence_log_probs`), so full-vocabulary logits never exist for the whole batch, and
only completion positions are projected at all.

Preference data (rows, pairs, batches) lives in :mod:`.data`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlora_kernels.hf import adapters_disabled

from .components import autocast
from .config import DPO_LOSSES, SFTConfig
from .data import MicroBatchStream, PreferencePair, collate_pairs, pair_batches
from .distributed import SINGLE, DistContext, shard
from .distributed import unwrap_model as _unwrap
from .loss import IGNORE_INDEX, model_sequence_log_probs

METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


# --------------------------------------------------------------------------- the loss


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
             chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None) -> tuple[
        Tensor, Tensor, Tensor]:
    """Per-pair DPO losses and implicit rewards from sequence log-probs (all ``[B]``).

    ``chosen_tokens`` / ``rejected_tokens``: the completion token counts ``[B]`` the log-probs were
    summed over; ``ipo`` needs them (it averages the log-ratios over the completion tokens; a count
    below 1 counts as 1, as in TRL), ``sigmoid`` ignores them.

    Returns ``(losses, chosen_rewards, rejected_rewards)``; the rewards ``β (log πθ − log πref)`` are
    detached (metrics only). See the module docstring for the formulas.

    Raises:
        ValueError: an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside [0, 0.5), or
            ``ipo`` without the token counts.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSSES)}; got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        h = chosen_ratio - rejected_ratio
        losses = -F.logsigmoid(beta * h)
        if label_smoothing:
            losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type 'ipo' needs chosen_tokens and rejected_tokens (the completion token counts "
                             "the log-probs were summed over): IPO averages the log-ratios per token")
        n_c = chosen_tokens.to(chosen_ratio.dtype).clamp(min=1.0)
        n_r = rejected_tokens.to(rejected_ratio.dtype).clamp(min=1.0)
        losses = (chosen_ratio / n_c - rejected_ratio / n_r - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# --------------------------------------------------------------------------- the stream


def pair_stream(pairs: list[PreferencePair], micro_batch_size: int, seed: int, pad_id: int,
                ctx: DistContext = SINGLE) -> MicroBatchStream:
    """The shuffled, resumable micro-batch stream of pairs (``micro_batch_size`` pairs per rank)."""
    return MicroBatchStream(pairs, micro_batch_size, seed, pad_id, ctx, collate_fn=collate_pairs)


# --------------------------------------------------------------------------- the step


@dataclass
class DPOSettings:
    """The DPO knobs of a config."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    chunk_size: int | None = None

    @classmethod
    def from_config(cls, cfg: SFTConfig) -> DPOSettings:
        return cls(getattr(cfg, "dpo_beta", 0.1), getattr(cfg, "dpo_loss", "sigmoid"),
                   getattr(cfg, "dpo_label_smoothing", 0.0), cfg.loss_chunk_size)


def reference_log_probs(model: nn.Module, batch: dict[str, Tensor], chunk_size: int | None = None) -> Tensor:
    """Sequence log-probs of the reference model: ``model`` with its adapters off, no grad."""
    model = _unwrap(model)
    with torch.no_grad(), adapters_disabled(model):
        return model_sequence_log_probs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        chunk_size)


def dpo_batch_loss(model: nn.Module, batch: dict[str, Tensor], settings: DPOSettings,
                   runner: Callable[..., Any] | None = None) -> tuple[Tensor, dict[str, float]]:
    """``(sum of weighted pair losses, metric sums)`` of one collated pair batch (already on the device).

    The reference log-probs come from ``batch["ref_logps"]`` when precomputed, else from a no-grad
    forward with the adapters off (run first, so its activations are gone before the policy's exist).
    The policy runs chosen and rejected in one forward, through ``runner(fn, *args)`` when given (the
    DDP wrapper), else directly. Metric sums are weighted by ``pair_weight``; ``pairs`` is their count.
    """
    ref = batch.get("ref_logps")
    if ref is None:
        ref = reference_log_probs(model, batch, settings.chunk_size)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], settings.chunk_size)
    policy = runner(model_sequence_log_probs, *args) if runner is not None else model_sequence_log_probs(
        _unwrap(model), *args)
    B = policy.shape[0] // 2
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).to(policy.device)  # completion tokens of each sequence
    losses, rc, rr = dpo_loss(policy[:B], policy[B:], ref[:B].float(), ref[B:].float(), settings.beta,
                              settings.loss_type, settings.label_smoothing, chosen_tokens=n[:B],
                              rejected_tokens=n[B:])
    w = batch["pair_weight"].to(losses.device)
    pc, pr = policy[:B].detach(), policy[B:].detach()
    sums = torch.stack([(rc * w).sum(), (rr * w).sum(), ((rc - rr) * w).sum(), ((rc > rr).float() * w).sum(),
                        (pc * w).sum(), (pr * w).sum(), w.sum()]).tolist()
    return (losses * w).sum(), dict(zip((*METRIC_KEYS, "pairs"), sums))


def finish_metrics(sums: dict[str, float], loss_sum: float, prefix: str = "") -> dict[str, float]:
    """Means from sums (``loss`` and every metric over ``pairs``), keys prefixed (e.g. ``eval_``)."""
    n = max(1.0, sums.get("pairs", 0.0))
    out = {f"{prefix}loss": loss_sum / n}
    out.update({f"{prefix}{k}": sums.get(k, 0.0) / n for k in METRIC_KEYS})
    return out


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """``total += sums`` key by key (returns ``total``)."""
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + v
    return total


@torch.no_grad()
def dpo_sums(model: nn.Module, pairs: list[PreferencePair], batch_size: int, pad_id: int, device: torch.device,
             amp: torch.dtype | None, settings: DPOSettings) -> tuple[float, dict[str, float]]:
    """``(loss sum, metric sums)`` over ``pairs`` in eval mode (no dropout); for sharded evaluation."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    loss_sum, sums = 0.0, dict.fromkeys((*METRIC_KEYS, "pairs"), 0.0)  # fixed keys: ranks all-reduce them in order
    try:
        for batch in pair_batches(pairs, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, amp):
                s, m = dpo_batch_loss(model, batch, settings)
            loss_sum += float(s)
            add_sums(sums, m)
    finally:
        model.train(was_training)
    return loss_sum, sums


def evaluate_dpo(model: nn.Module, pairs: list[PreferencePair], batch_size: int, pad_id: int, device: torch.device,
                 amp: torch.dtype | None, settings: DPOSettings) -> dict[str, float]:
    """DPO loss and reward metrics over ``pairs``: ``{"eval_loss", "eval_rewards/accuracies", ...}``."""
    loss_sum, sums = dpo_sums(model, pairs, batch_size, pad_id, device, amp, settings)
    return finish_metrics(sums, loss_sum, "eval_")


@torch.no_grad()
def precompute_reference_log_probs(model: nn.Module, pairs: list[PreferencePair], batch_size: int, pad_id: int,
                                   device: torch.device, amp: torch.dtype | None, chunk_size: int | None = None,
                                   ctx: DistContext = SINGLE,
                                   all_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """Fill ``ref_chosen`` / ``ref_rejected`` of every pair: one no-grad pass with the adapters off, in eval mode.

    Distributed, each rank computes its contiguous share of the pairs (:func:`.distributed.shard`) and
    ``all_reduce`` (a sum over ranks) gives every rank all values.
    """
    base = _unwrap(model)
    was_training = base.training
    base.eval()
    values = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = shard(range(len(pairs)), ctx)
    try:
        for s in range(0, len(mine), batch_size):
            idx = mine[s:s + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in idx], pad_id).items()}
            with autocast(device, amp):
                ref = reference_log_probs(base, batch, chunk_size).double().cpu()
            values[idx, 0], values[idx, 1] = ref[:len(idx)], ref[len(idx):]
    finally:
        base.train(was_training)
    if all_reduce is not None:
        values = all_reduce(values)
    for p, (c, r) in zip(pairs, values.tolist()):
        if not (math.isfinite(c) and math.isfinite(r)):
            raise ValueError(f"{p.source}: the reference log-probs are not finite ({c}, {r})")
        p.ref_chosen, p.ref_rejected = c, r
