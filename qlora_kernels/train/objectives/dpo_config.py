"""The config keys of the DPO objective (:mod:`.dpo`; ``objective: dpo``, or Axolotl's ``rl: dpo``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schema import POSITIVE, Range, setting

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOKeys:
    """The keys of the DPO objective."""

    dpo_beta: float = setting(0.1, range=POSITIVE, help="DPO beta: strength of the pull towards the reference model")
    dpo_loss: str = setting("sigmoid", choices=DPO_LOSSES, help="sigmoid (DPO) or ipo")
    dpo_label_smoothing: float = setting(0.0, range=Range(0, 0.5, hi_open=True),
                                         help="assumed share of flipped preference labels, in [0, 0.5) (sigmoid)")
    precompute_ref_log_probs: bool = setting(False, help="compute the reference log-probs once before training")

    @staticmethod
    def check(cfg: Any, errors: list[str]) -> None:
        """The rules between the DPO keys (a run with ``objective: dpo``)."""
        if cfg.dpo_label_smoothing > 0 and cfg.dpo_loss != "sigmoid":
            errors.append(f"dpo_label_smoothing: applies to dpo_loss 'sigmoid' only, not {cfg.dpo_loss!r}")
