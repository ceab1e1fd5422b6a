"""A reward model by QLoRA, with TRL's ``RewardTrainer`` conventions (docs/FORMATS.md, "Reward model").

The model is the base model loaded as a sequence classifier with one output
(``AutoModelForSequenceClassification``, ``num_labels=1``): its decoder in NF4 with LoRA adapters, and a dense
``score`` head (hidden -> 1, new, initialised by the model class) trained whole beside the adapters. The reward
of a sequence ``r(x, y)`` is the head's output at its last non-pad token, which is the token transformers'
sequence-classification models read (``config.pad_token_id`` is set to the tokenizer's pad token, as TRL does).

For a prompt x with a chosen completion y_w and a rejected one y_l (each closed by the end-of-sequence token), with
``r_w = r(x, y_w)``, ``r_l = r(x, y_l)`` and the row's optional margin m (0 when absent), the per-pair loss is the
Bradley-Terry negative log-likelihood

    -log σ(r_w − r_l − m)  [+ c · (r_w + r_l)²  with ``center_rewards_coefficient`` c]

and a step optimizes its mean over the pairs of the step. The metrics are the share of pairs with ``r_w > r_l``
(``accuracy``), the mean ``r_w − r_l`` (``margin``) and the mean rewards of each side.

A pair longer than ``sequence_len`` on either side is dropped (and counted), as TRL's RewardTrainer drops it:
cut at the end, the sequence would be scored at a token that is not its last.

With ``sample_packing`` whole pairs are packed into rows of ``2 × sequence_len`` tokens, each sequence its own
segment (:func:`.data.collate_packed_pairs`, as DPO packs them): the decoder runs once over the rows and the head
reads each sequence's last non-pad token (:func:`packed_rewards`), the token the padded forward reads.

The trained adapter directory holds the LoRA weights and the ``score`` head (PEFT's ``modules_to_save``,
``task_type: SEQ_CLS``): ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1,
pad_token_id=...)`` + ``peft.PeftModel.from_pretrained(model, dir)`` reload it, and so does
:func:`qlora_kernels.hf.load_adapter` on a model loaded by :func:`qlora_kernels.load_4bit_model` with the same
``model_class`` and ``num_labels``. :func:`sequence_rewards` scores texts with either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TrainConfig
from ..data import (
    DataStats,
    Example,
    PreferencePair,
    collate,
    collate_packed_pairs,
    collate_pairs,
    load_pairs,
    tokenize_segments,
)
from ..distributed import unwrap_model
from ..loss import decoder_forward
from .base import Objective

METRIC_KEYS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")
HEAD = "score"  # the head of transformers' *ForSequenceClassification models


def reward_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> Tensor:
    """Per-pair reward-model losses ``[B]`` from the rewards of the chosen and rejected sequences (each ``[B]``):
    ``-log σ(r_w − r_l − m) + c (r_w + r_l)²`` (the module docstring)."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must be rewards of shape [B]; got {list(chosen.shape)} and "
                         f"{list(rejected.shape)}")
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def model_rewards(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The rewards ``[N]`` (fp32) of a right-padded batch: the sequence classifier's one output at each row's last
    non-pad token (transformers' own pooling)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"a reward model outputs one score per sequence (logits [N, 1]); {type(model).__name__} "
                         f"gave {list(logits.shape)}: load the base with AutoModelForSequenceClassification and "
                         f"num_labels=1")
    return logits[:, 0].float()


def packed_rewards(model: nn.Module, input_ids: Tensor, position_ids: Tensor, sequence_ids: Tensor,
                   layout: str | None = None) -> Tensor:
    """The rewards ``[S]`` (fp32) of a packed batch (:func:`.data.collate_packed_pairs`): the decoder over the rows
    (:func:`.loss.decoder_forward` in ``layout``), then the ``score`` head at each sequence's last token that is not
    ``config.pad_token_id`` (its first token if it has none), where transformers' pooling reads a padded row.
    Sequence ``s`` is the tokens with ``sequence_ids == s``."""
    head = getattr(model, HEAD, None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"a reward model has a {HEAD!r} head (AutoModelForSequenceClassification, num_labels=1); "
                         f"{type(model).__name__} has none")
    hidden = decoder_forward(model, input_ids, None, position_ids, layout)[0]
    seq = sequence_ids.reshape(-1)
    n = int(seq.max()) + 1
    where = torch.arange(seq.numel(), device=seq.device)
    pad = getattr(model.config, "pad_token_id", None)
    inside = seq >= 0
    real = inside if pad is None else inside & (input_ids.reshape(-1) != pad)
    first = torch.full((n,), seq.numel(), device=seq.device).scatter_reduce(0, seq[inside], where[inside], "amin",
                                                                           include_self=True)
    last = torch.full((n,), -1, device=seq.device).scatter_reduce(0, seq[real], where[real], "amax",
                                                                  include_self=True)
    last = torch.where(last >= 0, last, first)
    logits = head(hidden.reshape(seq.numel(), -1)[last])
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"a reward model outputs one score per sequence; its {HEAD!r} head gave "
                         f"{list(logits.shape)}: load the base with num_labels=1")
    return logits[:, 0].float()


@torch.no_grad()
def sequence_rewards(model: nn.Module, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
                     batch_size: int = 16) -> list[float]:
    """The reward model's score of each ``prompt + completion`` (tokenized as in training: the text once, the
    end-of-sequence token appended), ``batch_size`` at a time, in eval mode."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have the same length; got {len(prompts)} and "
                         f"{len(completions)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = unwrap_model(model)
    model.config.pad_token_id = pad
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out: list[float] = []
        for s in range(0, len(prompts), batch_size):
            items = [Example(*tokenize_segments([(p, False), (c, True)], tokenizer, add_eos=True), "")
                     for p, c in zip(prompts[s:s + batch_size], completions[s:s + batch_size])]
            batch = collate(items, pad)
            out += model_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        return out
    finally:
        model.train(was_training)


class RewardObjective(Objective):
    """A reward model over preference pairs, normalized by the pairs of the step."""

    name = "reward"
    count_key = "pairs"
    item_noun = "pairs"
    metric_keys = (*METRIC_KEYS, "pairs")
    modules_to_save: ClassVar[tuple[str, ...]] = (HEAD,)

    def __init__(self, center_rewards_coefficient: float | None = None) -> None:
        self.center_rewards_coefficient = center_rewards_coefficient

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> RewardObjective:
        return cls(cfg.center_rewards_coefficient)

    @classmethod
    def model_kwargs(cls) -> dict[str, Any]:
        from transformers import AutoModelForSequenceClassification

        return {"model_class": AutoModelForSequenceClassification, "num_labels": 1}

    def load_data(self, cfg: TrainConfig, tokenizer: Any) -> tuple[list[PreferencePair], list[PreferencePair],
                                                                 DataStats]:
        return load_pairs(cfg, tokenizer, too_long="drop")

    def collate(self, items: list[PreferencePair], pad_id: int, counted: bool = True) -> dict[str, Tensor]:
        return collate_pairs(items, pad_id, counted)

    def count(self, batch: dict[str, Tensor]) -> int:
        return int(batch["pair_weight"].sum())

    def pack_length(self, item: PreferencePair) -> int:
        return len(item.chosen.input_ids) + len(item.rejected.input_ids)

    def pack_capacity(self, sequence_len: int) -> int:
        return 2 * sequence_len

    def collate_packed(self, rows: list[list[PreferencePair]], pad_id: int, counted: bool = True) -> dict[
            str, Tensor]:
        return collate_packed_pairs(rows, pad_id, counted)

    def loss(self, model: nn.Module, batch: dict[str, Tensor],
             run: Callable[..., Any] | None = None) -> tuple[Tensor, dict[str, float]]:
        if "position_ids" in batch:
            fn, args = packed_rewards, (batch["input_ids"], batch["position_ids"], batch["sequence_ids"],
                                        self.packed_layout)
        else:
            fn, args = model_rewards, (batch["input_ids"], batch["attention_mask"])
        rewards = run(fn, *args) if run is not None else fn(unwrap_model(model), *args)
        B = rewards.shape[0] // 2
        rw, rl = rewards[:B], rewards[B:]
        losses = reward_loss(rw, rl, batch.get("margin"), self.center_rewards_coefficient)
        w = batch["pair_weight"].to(losses)
        dw, dl = rw.detach(), rl.detach()
        sums = torch.stack([((dw > dl).float() * w).sum(), ((dw - dl) * w).sum(), (dw * w).sum(), (dl * w).sum(),
                            w.sum()]).tolist()
        return (losses * w).sum(), dict(zip(self.metric_keys, sums))

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums.get("pairs", 0.0))
        return {k: sums.get(k, 0.0) / n for k in METRIC_KEYS}

    def setup(self, model: nn.Module, train_items: list[PreferencePair], eval_items: list[PreferencePair],
              batch_size: int, pad_id: int, device: torch.device, amp: torch.dtype | None, ctx: Any) -> str | None:
        """The model reads the reward at the last token that is not ``pad_id`` (the tokenizer's pad token)."""
        config = unwrap_model(model).config
        before, config.pad_token_id = config.pad_token_id, pad_id
        if before is not None and before != pad_id:
            return f"reward model: config.pad_token_id {before} set to the tokenizer's pad token {pad_id}"
        return None

    def eval_note(self, record: dict[str, Any]) -> str:
        return f", accuracy {record['eval_accuracy']:.3f}, margin {record['eval_margin']:.3f}"
