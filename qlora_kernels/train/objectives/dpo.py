"""Direct Preference Optimization (DPO) for the thin trainer: the loss, the reference log-probs, the step.

The method (docs/FORMATS.md, "DPO"). For a prompt x with a preferred completion y_w and a rejected
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

With ``sample_packing`` whole pairs are packed into rows of ``2 × sequence_len`` tokens, the chosen and the
rejected sequence of a pair each its own segment (:func:`.data.collate_packed_pairs`): they never attend to
each other, and log-probs are summed per sequence (``sequence_ids``).

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

from ..components import autocast, eval_mode
from ..config import TrainConfig
from ..data import DataStats, PreferencePair, collate_packed_pairs, collate_pairs, load_pairs
from ..distributed import SINGLE, DistContext, all_reduce_sum, shard
from ..distributed import unwrap_model as _unwrap
from ..loss import model_sequence_log_probs, sequence_target_counts
from .base import Objective, evaluate
from .dpo_config import DPO_LOSSES

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


# --------------------------------------------------------------------------- the step


@dataclass
class DPOSettings:
    """The DPO knobs of a config."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    chunk_size: int | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> DPOSettings:
        return cls(cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing, cfg.loss_chunk_size)


def _log_prob_args(batch: dict[str, Tensor], chunk_size: int | None, layout: str | None) -> tuple:
    """The arguments of :func:`.loss.model_sequence_log_probs` after the model, for a plain or a packed batch."""
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size)
    if "position_ids" in batch:
        args += (batch["position_ids"], batch["sequence_ids"], layout)
    return args


def reference_log_probs(model: nn.Module, batch: dict[str, Tensor], chunk_size: int | None = None,
                        layout: str | None = None) -> Tensor:
    """Sequence log-probs of the reference model: ``model`` with its adapters off, no grad."""
    model = _unwrap(model)
    with torch.no_grad(), adapters_disabled(model):
        return model_sequence_log_probs(model, *_log_prob_args(batch, chunk_size, layout))


def dpo_batch_loss(model: nn.Module, batch: dict[str, Tensor], settings: DPOSettings,
                   runner: Callable[..., Any] | None = None, layout: str | None = None) -> tuple[
        Tensor, dict[str, float]]:
    """``(sum of weighted pair losses, metric sums)`` of one collated pair batch (already on the device).

    The reference log-probs come from ``batch["ref_logps"]`` when precomputed, else from a no-grad
    forward with the adapters off (run first, so its activations are gone before the policy's exist).
    The policy runs chosen and rejected in one forward, through ``runner(fn, *args)`` when given (the
    DDP wrapper), else directly. Metric sums are weighted by ``pair_weight``; ``pairs`` is their count. A packed
    batch (:func:`.data.collate_packed_pairs`) runs in ``layout`` (:data:`.loss.PACKED_LAYOUTS`).
    """
    ref = batch.get("ref_logps")
    if ref is None:
        ref = reference_log_probs(model, batch, settings.chunk_size, layout)
    args = _log_prob_args(batch, settings.chunk_size, layout)
    policy = runner(model_sequence_log_probs, *args) if runner is not None else model_sequence_log_probs(
        _unwrap(model), *args)
    B = policy.shape[0] // 2
    counts: dict[str, Tensor] = {}
    if settings.loss_type == "ipo":  # averages over the completion tokens of each sequence; sigmoid ignores them
        n = sequence_target_counts(batch["labels"], batch.get("sequence_ids")).to(policy.device)
        counts = {"chosen_tokens": n[:B], "rejected_tokens": n[B:]}
    losses, rc, rr = dpo_loss(policy[:B], policy[B:], ref[:B].float(), ref[B:].float(), settings.beta,
                              settings.loss_type, settings.label_smoothing, **counts)
    w = batch["pair_weight"].to(losses.device)
    pc, pr = policy[:B].detach(), policy[B:].detach()
    sums = torch.stack([(rc * w).sum(), (rr * w).sum(), ((rc - rr) * w).sum(), ((rc > rr).float() * w).sum(),
                        (pc * w).sum(), (pr * w).sum(), w.sum()]).tolist()
    return (losses * w).sum(), dict(zip((*METRIC_KEYS, "pairs"), sums))


def evaluate_dpo(model: nn.Module, pairs: list[PreferencePair], batch_size: int, pad_id: int, device: torch.device,
                 amp: torch.dtype | None, settings: DPOSettings) -> dict[str, float]:
    """DPO loss and reward metrics over ``pairs``: ``{"eval_loss", "eval_rewards/accuracies", ...}``."""
    objective = DPOObjective(settings)
    loss_sum, _, sums = evaluate(objective, model, pairs, batch_size, pad_id, device, amp)
    return {"eval_loss": loss_sum / max(1.0, sums["pairs"]),
            **{f"eval_{k}": v for k, v in objective.metrics(sums).items()}}


@torch.no_grad()
def precompute_reference_log_probs(model: nn.Module, pairs: list[PreferencePair], batch_size: int, pad_id: int,
                                   device: torch.device, amp: torch.dtype | None, chunk_size: int | None = None,
                                   ctx: DistContext = SINGLE) -> None:
    """Fill ``ref_chosen`` / ``ref_rejected`` of every pair: one no-grad pass with the adapters off, in eval mode.

    Distributed, each rank computes its contiguous share of the pairs (:func:`.distributed.shard`) and a sum
    over ranks gives every rank all values.
    """
    base = _unwrap(model)
    values = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = shard(range(len(pairs)), ctx)
    with eval_mode(base):
        for s in range(0, len(mine), batch_size):
            idx = mine[s:s + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in idx], pad_id).items()}
            with autocast(device, amp):
                ref = reference_log_probs(base, batch, chunk_size).double().cpu()
            values[idx, 0], values[idx, 1] = ref[:len(idx)], ref[len(idx):]
    values = all_reduce_sum(values, ctx, device)
    for p, (c, r) in zip(pairs, values.tolist()):
        if not (math.isfinite(c) and math.isfinite(r)):
            raise ValueError(f"{p.source}: the reference log-probs are not finite ({c}, {r})")
        p.ref_chosen, p.ref_rejected = c, r


# --------------------------------------------------------------------------- the objective


class DPOObjective(Objective):
    """DPO / IPO over preference pairs, normalized by the pairs of the step (:func:`dpo_batch_loss`)."""

    name = "dpo"
    count_key = "pairs"
    item_noun = "pairs"
    metric_keys = (*METRIC_KEYS, "pairs")

    def __init__(self, settings: DPOSettings, precompute_ref_log_probs: bool = False) -> None:
        self.settings = settings
        self.precompute_ref_log_probs = precompute_ref_log_probs

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> DPOObjective:
        return cls(DPOSettings.from_config(cfg), cfg.precompute_ref_log_probs)

    def load_data(self, cfg: TrainConfig, tokenizer: Any) -> tuple[list[PreferencePair], list[PreferencePair],
                                                                 DataStats]:
        return load_pairs(cfg, tokenizer)

    def collate(self, items: list[PreferencePair], pad_id: int, counted: bool = True) -> dict[str, Tensor]:
        return collate_pairs(items, pad_id, counted)

    def pack_length(self, item: PreferencePair) -> int:
        return len(item.chosen.input_ids) + len(item.rejected.input_ids)

    def pack_capacity(self, sequence_len: int) -> int:
        return 2 * sequence_len  # a whole pair fits in a row (each side is at most sequence_len)

    def collate_packed(self, rows: list[list[PreferencePair]], pad_id: int, counted: bool = True) -> dict[
            str, Tensor]:
        return collate_packed_pairs(rows, pad_id, counted)

    def count(self, batch: dict[str, Tensor]) -> int:
        return int(batch["pair_weight"].sum())

    def loss(self, model: nn.Module, batch: dict[str, Tensor],
             run: Callable[..., Any] | None = None) -> tuple[Tensor, dict[str, float]]:
        return dpo_batch_loss(model, batch, self.settings, run, self.packed_layout)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Each reward and log-prob sum over the pairs (``sums["pairs"]``, the summed pair weights)."""
        n = max(1.0, sums.get("pairs", 0.0))
        return {k: sums.get(k, 0.0) / n for k in METRIC_KEYS}

    def setup(self, model: nn.Module, train_items: list[PreferencePair], eval_items: list[PreferencePair],
              batch_size: int, pad_id: int, device: torch.device, amp: torch.dtype | None,
              ctx: DistContext) -> str | None:
        """With ``precompute_ref_log_probs``: the reference log-probs of every pair, once (then a step runs one
        forward instead of two)."""
        if not self.precompute_ref_log_probs:
            return None
        for pairs in (train_items, eval_items):
            precompute_reference_log_probs(model, pairs, batch_size, pad_id, device, amp, self.settings.chunk_size,
                                           ctx)
        return f"reference log-probs precomputed for {len(train_items)} + {len(eval_items)} pairs"

    def eval_note(self, record: dict[str, Any]) -> str:
        return f", reward accuracy {record['eval_rewards/accuracies']:.3f}"
