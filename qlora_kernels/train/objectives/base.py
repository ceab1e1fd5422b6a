"""What the training loop optimizes: the interface of an objective (SFT, DPO, reward model), and its evaluation.

The loop (:mod:`.loop`) knows nothing of SFT or DPO; an :class:`Objective` tells it

* what its items are and what a batch of them is: :meth:`~Objective.load_data`, :meth:`~Objective.collate`;
* the normalization count of a batch: :meth:`~Objective.count` (target tokens, pairs). A step's loss is the
  sum of its micro-batches' loss sums over the count of the whole accumulated (global) batch, so its
  gradient is that of the mean loss, whatever the split into micro-batches and ranks;
* the loss sum and metric sums of a micro-batch: :meth:`~Objective.loss`, and the means logged from
  summed metrics: :meth:`~Objective.metrics`;
* any one-time work before the first step: :meth:`~Objective.setup` (DPO's precomputed reference log-probs);
* the model it trains, when not the causal LM with adapters: :meth:`~Objective.model_kwargs` (a reward model's
  sequence classifier) and :attr:`~Objective.modules_to_save` (its head, trained whole);
* with ``sample_packing``, how its items pack into rows (:mod:`.packing`): :meth:`~Objective.pack_length`,
  :meth:`~Objective.pack_capacity`, :meth:`~Objective.collate_packed`; its loss reads a packed batch (its
  ``position_ids``) in :attr:`~Objective.packed_layout`, which the loop sets once it has checked the model.

Sums, not means, cross the boundary, so that the loop can add them over micro-batches and all-reduce
them over ranks before it divides. :func:`evaluate` runs an objective's loss over items without gradients.
The formulas are in docs/FORMATS.md ("SFT loss", "DPO", "Reward model"); :mod:`.sft`, :mod:`.dpo` and
:mod:`.reward` implement them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..components import autocast, eval_mode
from ..config import TrainConfig
from ..data import DataStats
from ..distributed import DistContext, unwrap_model


class Objective(ABC):
    """One training objective behind the loop. Subclasses set the class attributes and the methods below."""

    name: ClassVar[str]  # "sft" | "dpo" | "reward": the progress bar's label
    count_key: ClassVar[str]  # the metrics key of a step's normalization count ("target_tokens" | "pairs")
    item_noun: ClassVar[str]  # what one item is called in messages ("examples" | "pairs")
    metric_keys: ClassVar[tuple[str, ...]] = ()  # the keys of loss()'s metric sums, always all of them, in order
    packed_layout: str | None = None  # how a packed batch runs (.loss.PACKED_LAYOUTS; None: the model's default)
    modules_to_save: ClassVar[tuple[str, ...]] = ()  # modules trained whole beside the adapters (apply_qlora's)
    online: ClassVar[bool] = False  # generates its training batches from the policy (GRPO): see next_micro_batches

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: TrainConfig) -> Objective:
        """The objective with the settings a config gives it."""

    @classmethod
    def model_kwargs(cls) -> dict[str, Any]:
        """What the objective's model needs of ``load_4bit_model`` besides the config's settings (the model class of
        a task head); ``{}``: the causal LM."""
        return {}

    @abstractmethod
    def load_data(self, cfg: TrainConfig, tokenizer: Any) -> tuple[list[Any], list[Any], DataStats]:
        """``(train items, eval items, stats)`` read and tokenized from the config's datasets."""

    @abstractmethod
    def collate(self, items: list[Any], pad_id: int, counted: bool = True) -> dict[str, Tensor]:
        """One padded batch of ``items``; ``counted=False``: a placeholder that runs but counts for nothing."""

    @abstractmethod
    def count(self, batch: dict[str, Tensor]) -> int:
        """The batch's normalization count (0 for a placeholder)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Tensor],
             run: Callable[..., Any] | None = None) -> tuple[Tensor, dict[str, float]]:
        """``(loss sum, metric sums)`` of one batch already on the device.

        ``run(fn, *args)`` runs ``fn(model, *args)`` as the forward that DDP sees (training; see
        :func:`.distributed.wrap_model`); None runs it on ``model`` directly (evaluation).
        """

    def pack_length(self, item: Any) -> int:
        """Token slots ``item`` takes in a packed row (sample packing)."""
        raise NotImplementedError(f"the {self.name} objective does not support sample_packing")

    def pack_capacity(self, sequence_len: int) -> int:
        """Token slots of a packed row, for ``sequence_len`` (at least the longest item's :meth:`pack_length`)."""
        raise NotImplementedError(f"the {self.name} objective does not support sample_packing")

    def collate_packed(self, rows: list[list[Any]], pad_id: int, counted: bool = True) -> dict[str, Tensor]:
        """One packed batch: row r holds the items ``rows[r]``, each attending only to itself; ``counted`` as in
        :meth:`collate`."""
        raise NotImplementedError(f"the {self.name} objective does not support sample_packing")

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The means logged besides the loss, from metric sums added over batches (and ranks)."""
        return {}

    def setup(self, model: nn.Module, train_items: list[Any], eval_items: list[Any], batch_size: int, pad_id: int,
              device: torch.device, amp: torch.dtype | None, ctx: DistContext) -> str | None:
        """One-time work before the first step; returns what to report, or None (nothing done)."""
        return None

    def eval_note(self, record: dict[str, Any]) -> str:
        """What the eval line adds after the eval loss, from the eval record (e.g. ``", reward accuracy 0.75"``)."""
        return ""

    # The online stage (an objective that generates: ``online = True``). The loop draws from the item stream
    # through next_micro_batches, and the defaults below make an offline objective one stream batch a micro-batch.

    def stream_batch_size(self, cfg: TrainConfig) -> int:
        """Items a rank draws from the stream at a time (default: ``micro_batch_size``)."""
        return cfg.micro_batch_size

    def micro_batches_per_stream_batch(self) -> int:
        """Micro-batches one stream batch makes (the epoch's length in micro-batches is this × stream batches)."""
        return 1

    def next_micro_batches(self, n: int, next_batch: Callable[[], tuple[dict[str, Tensor], list[Any]]],
                           model: nn.Module) -> list[tuple[dict[str, Tensor], list[Any]]]:
        """The ``n`` micro-batches (and their items) of the next optimizer step; ``next_batch()`` draws the next
        stream batch. An online objective generates them here, from ``model``, before the step's forward passes."""
        return [next_batch() for _ in range(n)]

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the step not summed over micro-batches (an online stage's: rewards, lengths, rates)."""
        return {}

    def evaluate(self, model: nn.Module, items: list[Any], batch_size: int, pad_id: int, device: torch.device,
                 amp: torch.dtype | None) -> tuple[float, float, dict[str, float]]:
        """``(loss sum, count, metric sums)`` over eval items (this rank's share): :func:`evaluate` by default."""
        return evaluate(self, model, items, batch_size, pad_id, device, amp)

    @torch.no_grad()
    def evaluate_placeholders(self, n: int, model: nn.Module, item: Any, batch_size: int, pad_id: int,
                              device: torch.device, amp: torch.dtype | None) -> None:
        """The forwards of ``n`` eval batches that count for nothing, for a rank with fewer eval items than another
        when the model is sharded (each forward is then a collective that every rank runs as often); ``item``:
        any eval item, as a template. Default: ``n`` forwards of a placeholder batch of ``item`` in eval mode."""
        if n <= 0:
            return
        model = unwrap_model(model)
        with eval_mode(model):
            batch = {k: v.to(device) for k, v in self.collate([item], pad_id, counted=False).items()}
            for _ in range(n):
                with autocast(device, amp):
                    self.loss(model, batch)

    def eval_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """The eval means logged besides the eval loss, from summed eval metrics and counts (all ranks)."""
        return self.metrics(sums)

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint must keep of the objective beyond the step boundary (JSON; None: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:  # noqa: B027 (optional hook: nothing to do)
        """Restore :meth:`state_dict`'s value from a checkpoint (None: the checkpoint had nothing)."""


@torch.no_grad()
def evaluate(objective: Objective, model: nn.Module, items: list[Any], batch_size: int, pad_id: int,
             device: torch.device, amp: torch.dtype | None) -> tuple[float, float, dict[str, float]]:
    """``(loss sum, count, metric sums)`` of ``objective`` over ``items`` in order, ``batch_size`` at a time, in eval
    mode (no dropout) and without gradients; the sums of a shard, for the caller to add over ranks."""
    model = unwrap_model(model)
    loss_sum, count, sums = 0.0, 0, dict.fromkeys(objective.metric_keys, 0.0)
    with eval_mode(model):
        for s in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in objective.collate(items[s:s + batch_size], pad_id).items()}
            with autocast(device, amp):
                loss, metric_sums = objective.loss(model, batch)
            loss_sum += float(loss)
            count += objective.count(batch)
            for k, v in metric_sums.items():
                sums[k] += v
    return loss_sum, count, sums
