"""The config keys of the GRPO objective (:mod:`.grpo`; ``objective: grpo``, or Axolotl's ``rl: grpo``), named as in
TRL's ``GRPOConfig`` and with its defaults, but ``max_completion_length`` (256 here, 512 in TRL)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..schema import AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT, Range, setting

GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOKeys:
    """The keys of the GRPO objective."""

    num_generations: int = setting(8, range=Range(2), help="completions sampled per prompt (a group; >= 2)")
    max_completion_length: int = setting(256, range=AT_LEAST_1, help="the most new tokens of a completion")
    temperature: float = setting(1.0, range=POSITIVE, help="sampling temperature of the rollouts (the log-probs of "
                                 "the loss are taken at it too, as TRL does)")
    top_p: float = setting(1.0, range=Range(0, 1, lo_open=True), help="nucleus sampling cut (1: off)")
    top_k: int = setting(0, range=AT_LEAST_0, help="top-k sampling cut (0: off)")
    beta: float = setting(0.0, range=AT_LEAST_0, help="weight of the KL to the reference (the model with its adapters "
                          "off; k3 estimator); 0 skips the reference forward")
    use_bias_correction_kl: bool = setting(True, help="multiply the KL term by the importance ratio (its gradient is "
                                           "then the unbiased reverse-KL gradient, also on-policy; TRL's default)")
    epsilon: float = setting(0.2, range=UNIT, help="the importance ratio is clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = setting(None, range=AT_LEAST_0, help="upper clip (DAPO's clip-higher; null: epsilon)")
    num_iterations: int = setting(1, range=AT_LEAST_1, help="optimizer passes over each generation batch (mu)")
    steps_per_generation: int | None = setting(None, range=AT_LEAST_1, help="micro-batches a generation batch "
                                               "fills (null: gradient_accumulation_steps, one generation a step)")
    loss_type: str = setting("dapo", choices=GRPO_LOSSES, help="how token losses are averaged: grpo (per completion, "
                             "then over completions), bnpo (over the micro-batch's tokens), dr_grpo (over micro-batch "
                             "x max_completion_length), dapo (over the tokens of the whole step)")
    scale_rewards: Union[str, bool] = setting("group", choices=(*SCALE_REWARDS, True, False),
                                              help="advantages divided by the std of the group's rewards, of the "
                                                   "batch's, or not (none); true: group, false: none")
    mask_truncated_completions: bool = setting(False, help="leave completions that hit max_completion_length without "
                                               "an end-of-sequence token out of the loss")
    reward_funcs: list[str] = setting(factory=list, help="rewards: 'module:function' (TRL's signature f(prompts, "
                                      "completions, completion_ids, **columns) -> list[float | None]; module a dotted "
                                      "name or a .py path) or a reward-model adapter directory (objective: reward)")
    reward_weights: list[float] | None = setting(None, help="a weight per reward function (null: all 1)")

    @staticmethod
    def check(cfg: Any, errors: list[str]) -> None:
        """The rules between the GRPO keys and the common ones (a run with ``objective: grpo``)."""
        if cfg.objective != "grpo":
            return
        if not cfg.reward_funcs:
            errors.append("reward_funcs: objective grpo needs at least one reward ('module:function' or a reward-model "
                          "adapter directory)")
        if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.reward_funcs):
            errors.append(f"reward_weights: {len(cfg.reward_weights)} weights for {len(cfg.reward_funcs)} "
                          "reward_funcs; "
                          "give one per function")
        spg = cfg.steps_per_generation or cfg.gradient_accumulation_steps
        if (cfg.micro_batch_size * spg) % cfg.num_generations:
            errors.append(f"micro_batch_size, steps_per_generation, num_generations: a generation batch holds "
                          f"micro_batch_size x steps_per_generation = {cfg.micro_batch_size * spg} completions, which "
                          f"must be whole groups of num_generations = {cfg.num_generations}")
        if cfg.max_completion_length >= cfg.sequence_len:
            errors.append(f"max_completion_length: {cfg.max_completion_length} leaves no room for a prompt in "
                          f"sequence_len {cfg.sequence_len} (prompt + completion)")
