"""What the training loop optimizes, one objective to a file, each with its config keys beside it.

``<name>.py`` holds an objective (:class:`.base.Objective`: its items, batches, loss and metrics) and
``<name>_config.py`` its YAML keys (a dataclass that :class:`qlora_kernels.train.config.TrainConfig` joins):

* ``sft``: supervised fine-tuning, the token cross-entropy (:mod:`.sft`);
* ``dpo``: direct preference optimization over preference pairs, the reference model being the policy with its
  adapters off (:mod:`.dpo`);
* ``reward``: a reward model on preference pairs, a scalar score head trained with the Bradley-Terry loss
  (:mod:`.reward`).

The keys modules import nothing but the schema (:mod:`..schema`), so the config reads them without loading torch;
:func:`objective_class` imports an objective when a run needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Objective

_CLASSES = {"sft": "SFTObjective", "dpo": "DPOObjective", "reward": "RewardObjective", "grpo": "GRPOObjective"}


def objective_class(name: str) -> type[Objective]:
    """The objective class of ``TrainConfig.objective`` ``name``."""
    if name not in _CLASSES:
        raise ValueError(f"objective must be one of {', '.join(_CLASSES)}; got {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{name}"), _CLASSES[name])
