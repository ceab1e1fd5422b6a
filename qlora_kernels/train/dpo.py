"""Direct Preference Optimization (DPO) for the thin trainer: losses, preference data, chunked log-probs, the step.

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

Data rows:

* ``preference``: ``{"prompt": str, "chosen": str, "rejected": str}``; the completions are appended to
  the prompt as they are (include any separator), and the end-of-sequence token closes each one.
* ``hh-rlhf``: ``{"chosen": str, "rejected": str}``, two full Anthropic-HH dialogues
  (``"\\n\\nHuman: … \\n\\nAssistant: …"``) that share a prefix; the prompt is the shared prefix up to
  and including its last ``"\\n\\nAssistant:"``, the completions are what follows it in each dialogue.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DPO_LOSSES, PREFERENCE_TYPES, DatasetConfig, SFTConfig
from .data import DataError, DataStats, Example, checked_rows, load_split, tokenize_segments
from .distributed import SINGLE, DistContext, ShardedStream
from .distributed import unwrap_model as _unwrap
from .loss import IGNORE_INDEX, model_sequence_log_probs

HH_ASSISTANT = "\n\nAssistant:"
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


# --------------------------------------------------------------------------- preference data


@dataclass
class PreferencePair:
    """One tokenized preference pair, where it came from, and (once computed) its reference log-probs."""

    chosen: Example
    rejected: Example
    source: str
    ref_chosen: float | None = None
    ref_rejected: float | None = None


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen completion, rejected completion)`` of two Anthropic-HH dialogues.

    The prompt is the longest common prefix cut just after its last ``"\\n\\nAssistant:"``.
    Raises ValueError if the common prefix holds no such marker.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        raise ValueError(f"the chosen and rejected dialogues share no {HH_ASSISTANT!r} turn, so the prompt cannot "
                         f"be found (shared prefix: {chosen[:n][:80]!r})")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def check_preference_row(row: Any, row_type: str) -> str | None:
    """What is wrong with ``row`` for ``row_type`` ('preference' or 'hh-rlhf'), or None if well formed."""
    if not isinstance(row, dict):
        return f"a {row_type} row must be a JSON object, got {type(row).__name__}"
    keys = ("prompt", "chosen", "rejected") if row_type == "preference" else ("chosen", "rejected")
    for k in keys:
        if not isinstance(row.get(k), str):
            got = "missing" if k not in row else f"{type(row.get(k)).__name__} {row.get(k)!r}"[:60]
            return f"{row_type} row needs a string {k!r} (got {got})"
    if row_type == "hh-rlhf":
        try:
            split_hh_dialogue(row["chosen"], row["rejected"])
        except ValueError as e:
            return str(e)
    return None


def preference_texts(row: dict[str, Any], row_type: str) -> tuple[str, str, str]:
    """``(prompt, chosen completion, rejected completion)`` of a checked row."""
    if row_type == "hh-rlhf":
        return split_hh_dialogue(row["chosen"], row["rejected"])
    return row["prompt"], row["chosen"], row["rejected"]


def _tokenize_completion(prompt: str, completion: str, tokenizer: Any, sequence_len: int,
                         stats: DataStats, source: str) -> Example:
    ids, labels = tokenize_segments([(prompt, False), (completion, True)], tokenizer, add_eos=True)
    if len(ids) > sequence_len:
        stats.truncated += 1
        ids, labels = ids[:sequence_len], labels[:sequence_len]
    return Example(ids, labels, source)


def load_preference_dataset(ds: DatasetConfig, cfg: SFTConfig, tokenizer: Any, stats: DataStats) -> list[
        PreferencePair]:
    """Read, check and tokenize one preference dataset; updates ``stats`` (``examples`` counts pairs).

    A sequence longer than ``sequence_len`` is cut at the end (and counted); a pair where either side
    keeps no completion token is dropped (and counted in ``dropped_no_target``).
    """
    if ds.type not in PREFERENCE_TYPES:
        raise DataError(f"{ds.path}: dataset type {ds.type!r} is not a preference type; DPO reads "
                        f"{', '.join(PREFERENCE_TYPES)}")
    out: list[PreferencePair] = []
    for source, row in checked_rows(ds, cfg, stats, check_preference_row):
        prompt, chosen, rejected = preference_texts(row, ds.type)
        a = _tokenize_completion(prompt, chosen, tokenizer, cfg.sequence_len, stats, source)
        b = _tokenize_completion(prompt, rejected, tokenizer, cfg.sequence_len, stats, source)
        if a.num_targets == 0 or b.num_targets == 0:
            stats.dropped_no_target += 1
            continue
        stats.examples += 1
        stats.tokens += len(a.input_ids) + len(b.input_ids)
        stats.target_tokens += a.num_targets + b.num_targets
        out.append(PreferencePair(a, b, source))
    return out


def load_pairs(cfg: SFTConfig, tokenizer: Any) -> tuple[list[PreferencePair], list[PreferencePair], DataStats]:
    """Train and eval pairs for a config: eval from eval-split datasets, else ``val_set_size`` of train."""
    return load_split(cfg, tokenizer, load_preference_dataset, "pair")


def collate_pairs(pairs: list[PreferencePair], pad_id: int, weight: float = 1.0) -> dict[str, Tensor]:
    """One right-padded batch of ``2B`` rows: the B chosen sequences, then the B rejected ones.

    Keys: ``input_ids``, ``attention_mask``, ``labels`` ``[2B, T]``; ``pair_weight`` ``[B]`` (``weight``
    for every pair: 0 marks a placeholder batch that must run but not count, see
    :class:`qlora_kernels.train.distributed.ShardedStream`); and ``ref_logps`` ``[2B]`` when every pair
    carries precomputed reference log-probs.
    """
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(e.input_ids) for e in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, e in enumerate(seqs):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "pair_weight": torch.full((len(pairs),), float(weight))}
    if pairs and all(p.ref_chosen is not None and p.ref_rejected is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs],
                                          dtype=torch.float32)
    return batch


def pair_stream(pairs: list[PreferencePair], micro_batch_size: int, seed: int, pad_id: int,
                ctx: DistContext = SINGLE) -> ShardedStream:
    """The shuffled, resumable micro-batch stream of pairs (``micro_batch_size`` pairs per rank)."""
    return ShardedStream(pairs, micro_batch_size, seed, pad_id, ctx, collate_fn=collate_pairs,
                         placeholder_fn=lambda items, pad: collate_pairs(items, pad, weight=0.0))


def pair_batches(pairs: list[PreferencePair], batch_size: int, pad_id: int) -> Iterator[dict[str, Tensor]]:
    """Pairs in order, ``batch_size`` at a time."""
    for s in range(0, len(pairs), batch_size):
        yield collate_pairs(pairs[s:s + batch_size], pad_id)


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
    from ..hf import adapters_disabled

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


def _autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if amp is None else torch.autocast(device_type=device.type, dtype=amp)


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
            with _autocast(device, amp):
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

    Distributed, each rank computes every ``world_size``-th pair (from its ``rank``) and ``all_reduce``
    (a sum over ranks) gives every rank all values.
    """
    rank, world = ctx.rank, ctx.world_size
    base = _unwrap(model)
    was_training = base.training
    base.eval()
    values = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = list(range(rank, len(pairs), world))
    try:
        for s in range(0, len(mine), batch_size):
            idx = mine[s:s + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in idx], pad_id).items()}
            with _autocast(device, amp):
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


def write_pairs_jsonl(rows: list[dict[str, str]], path: str | Path) -> Path:
    """Write preference rows as JSONL (for generated data sets)."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p
