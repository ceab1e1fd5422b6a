"""The config keys of the reward-model objective (:mod:`.reward`; ``objective: reward``), named as in TRL's
``RewardConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import AT_LEAST_0, setting


@dataclass
class RewardKeys:
    """The keys of the reward-model objective."""

    center_rewards_coefficient: float | None = setting(
        None, range=AT_LEAST_0, help="adds coefficient x mean((r_chosen + r_rejected)^2) to the loss, which pulls the "
                                     "rewards towards mean zero (TRL RewardConfig; null: off)")
