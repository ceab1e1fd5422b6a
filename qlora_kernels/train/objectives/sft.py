"""Supervised fine-tuning (SFT) as an objective of the loop: the mean cross-entropy over target tokens.

An item is a tokenized :class:`.data.Example` (prompt tokens and padding labelled -100; see :mod:`.data` for
the row types and templates). A micro-batch's loss is the sum of the cross-entropies of its target tokens
(:func:`.loss.model_loss`: decoder forward, then the chunked output projection, no full-vocabulary logits)
and its count is its number of target tokens, so a step optimizes the mean token loss of the whole
accumulated batch (docs/FORMATS.md, "SFT loss"). With ``sample_packing`` the examples are packed into rows of
``sequence_len`` tokens (:mod:`.packing`); the loss sum and count of a packed batch are those of its examples
unpacked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..config import TrainConfig
from ..data import DataStats, Example, collate, collate_packed, load_examples
from ..loss import IGNORE_INDEX, model_loss
from .base import Objective


class SFTObjective(Objective):
    """Completion-only next-token cross-entropy, normalized by the target tokens of the step."""

    name = "sft"
    count_key = "target_tokens"
    item_noun = "examples"

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size  # tokens per chunk of the chunked cross-entropy (None: auto)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> SFTObjective:
        return cls(cfg.loss_chunk_size)

    def load_data(self, cfg: TrainConfig, tokenizer: Any) -> tuple[list[Example], list[Example], DataStats]:
        return load_examples(cfg, tokenizer)

    def collate(self, items: list[Example], pad_id: int, counted: bool = True) -> dict[str, Tensor]:
        return collate(items, pad_id, counted)

    def pack_length(self, item: Example) -> int:
        return len(item.input_ids)

    def pack_capacity(self, sequence_len: int) -> int:
        return sequence_len

    def collate_packed(self, rows: list[list[Example]], pad_id: int, counted: bool = True) -> dict[str, Tensor]:
        return collate_packed(rows, pad_id, counted)

    def count(self, batch: dict[str, Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, Tensor],
             run: Callable[..., Any] | None = None) -> tuple[Tensor, dict[str, float]]:
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"], self.chunk_size)
        if "position_ids" in batch:  # packed
            args += (batch["position_ids"], self.packed_layout)
        loss_sum, _ = run(model_loss, *args) if run is not None else model_loss(model, *args)
        return loss_sum, {}
