"""GRPO (group relative policy optimization) on the 4-bit base, with TRL ``GRPOTrainer``'s conventions
(docs/FORMATS.md, "GRPO").

Each generation batch: its prompts, each completed ``num_generations`` (G) times by the current policy through
:func:`qlora_kernels.generation.generate` (the NF4 weights with the adapters live; nothing is merged or copied),
every completion scored by the reward functions, and the rewards turned into group-relative advantages

    A_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)      (scale_rewards: group; batch: the batch's std; none: no
                                                             division; std with Bessel's correction, as TRL)

where r_i is the weighted sum of the reward functions' values (``reward_weights``; a function's None is left out,
and a completion no function scores gets advantage 0). The training passes then minimize, over the completion
tokens t of completion i, with ρ_t = π(t) / π_old(t) (log-probs at the sampling ``temperature``):

    ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε_high) A_i) + β ρ_t [π_ref(t)/π(t) − log(π_ref(t)/π(t)) − 1]

the KL term (k3 estimator) against the reference, the policy with its adapters off, only when β > 0; its factor
ρ_t (``use_bias_correction_kl``, TRL's default) makes its gradient the unbiased reverse-KL gradient. With
``num_iterations`` 1 and one generation per optimizer step π_old is π itself (ρ = 1, its gradient is that of the
policy gradient); otherwise π_old is the policy at generation time. ``loss_type`` says how the ℓ_t are averaged:
``grpo`` the mean over a micro-batch's completions of each one's token mean; ``bnpo`` the micro-batch's token mean;
``dr_grpo`` its token sum over (completions × ``max_completion_length``); ``dapo`` the step's token sum over the
completion tokens of the whole step (all ranks). A step's loss is the mean of its micro-batches' (the first three)
or that token-normalized sum (``dapo``), as in TRL.

A generation batch is ``micro_batch_size × steps_per_generation`` completions a rank (TRL's numbers:
``micro_batch_size`` counts completions), split into ``steps_per_generation`` micro-batches, each used
``num_iterations`` times. A micro-batch holds whole sequences, prompt then completion, right-padded (or with
``sample_packing`` packed into rows of ``sequence_len`` tokens, position ids restarting per sequence), so that every
token sits at the position it had while it was generated (TRL left-pads prompts in its training forward, which
shifts the positions of a shorter prompt's tokens: a difference on purpose).

Reward functions: ``module:function`` with TRL's signature ``f(prompts, completions, completion_ids, **columns) ->
list[float | None]`` (for conversational prompts the completions are ``[{"role": "assistant", "content": text}]``),
or a reward-model adapter directory (``objective: reward``), which scores ``prompt + completion``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qlora_kernels.hf import adapters_disabled

from ..components import autocast, eval_mode
from ..config import ConfigError, TrainConfig
from ..data import DataStats, Example, PromptItem, load_prompts
from ..distributed import SINGLE, DistContext, all_reduce_max, all_reduce_sum
from ..distributed import unwrap_model as _unwrap
from ..loss import IGNORE_INDEX, decoder_forward, is_row_sharded, target_rows, token_log_probs
from ..packing import collate_segments, pack_bins
from .base import Objective
from .grpo_config import GRPO_LOSSES, SCALE_REWARDS

# --------------------------------------------------------------------------- settings and rewards


@dataclass
class GRPOSettings:
    """The GRPO knobs of a config (TRL GRPOConfig's names)."""

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    steps_per_generation: int = 1
    gradient_accumulation_steps: int = 1
    micro_batch_size: int = 8
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    chunk_size: int | None = None
    pack: bool = False  # sample_packing: each micro-batch's sequences packed into rows of sequence_len tokens
    sequence_len: int = 2048

    def __post_init__(self) -> None:
        if self.loss_type not in GRPO_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(GRPO_LOSSES)}; got {self.loss_type!r}")
        if self.scale_rewards is True or self.scale_rewards is False:
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {self.scale_rewards!r}")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> GRPOSettings:
        return cls(cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k, cfg.beta,
                   cfg.use_bias_correction_kl, cfg.epsilon, cfg.epsilon_high, cfg.num_iterations,
                   cfg.steps_per_generation or cfg.gradient_accumulation_steps, cfg.gradient_accumulation_steps,
                   cfg.micro_batch_size, cfg.loss_type, cfg.scale_rewards, cfg.mask_truncated_completions,
                   cfg.loss_chunk_size, cfg.sample_packing, cfg.sequence_len)

    @property
    def needs_old_log_probs(self) -> bool:
        """π_old differs from π: a generation batch serves several optimizer steps (TRL's rule)."""
        return self.num_iterations > 1 or self.steps_per_generation > self.gradient_accumulation_steps


def load_reward_function(spec: str) -> Callable[..., list[float | None]]:
    """``"module:function"`` imported: a dotted module name, or a ``.py`` file path (relative to the current
    directory). Raises ValueError naming the spec."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' (a dotted module or a .py path)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"reward function {spec!r}: no file {module_name!r} (cwd: {Path.cwd()})")
            name = f"_qlora_kernels_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as e:  # an import error, or the module's own code failing
        raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"reward function {spec!r}: {module_name!r} has no callable {func_name!r}")
    return func


class RewardModelFunction:
    """A reward-model adapter directory (``objective: reward``) as a reward function: its base loaded in 4 bits as a
    sequence classifier, the adapter and head loaded frozen, ``prompt + completion`` scored."""

    def __init__(self, adapter_dir: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        import json

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from qlora_kernels import load_4bit_model
        from qlora_kernels.hf import load_adapter

        self.path = Path(adapter_dir)
        base = json.loads((self.path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ValueError(f"reward model {str(self.path)!r}: its adapter_config.json's base_model_name_or_path "
                             f"{base!r} is not a local model directory")
        self.tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = load_4bit_model(base, dtype=dtype, device=device, model_class=AutoModelForSequenceClassification,
                                num_labels=1)
        self.model = load_adapter(model, self.path, is_trainable=False).eval()
        self.__name__ = self.path.name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        from qlora_kernels.generation import render_prompt

        from .reward import sequence_rewards

        texts = [p if isinstance(p, str) else render_prompt(p, self.tokenizer) for p in prompts]
        outs = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return sequence_rewards(self.model, self.tokenizer, texts, outs)


def reward_function(spec: str, device: torch.device) -> Callable[..., list[float | None]]:
    """A ``reward_funcs`` entry: a reward-model adapter directory, or ``module:function``."""
    if (Path(spec) / "adapter_config.json").is_file():
        return RewardModelFunction(spec, device)
    return load_reward_function(spec)


def reward_name(spec: str) -> str:
    """How the metrics name a reward function: its function name, or the reward model's directory name."""
    return Path(spec).name if (Path(spec) / "adapter_config.json").is_file() else spec.rpartition(":")[2]


def score(funcs: Sequence[Callable[..., Any]], names: Sequence[str], prompts: list[Any], completions: list[Any],
          completion_ids: list[list[int]], columns: dict[str, list[Any]]) -> Tensor:
    """``[N, F]`` rewards, fp32, NaN where a function returned None; raises ValueError naming a function that gave
    the wrong number of values or a value that is not a number or None."""
    out = torch.full((len(completions), len(funcs)), float("nan"))
    for j, (f, name) in enumerate(zip(funcs, names)):
        values = f(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise ValueError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                             "completions")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"reward function {name!r} returned {v!r} for completion {i}: a finite number or "
                                 "None was expected")
            out[i, j] = float(v)
    return out


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group",
                     ctx: DistContext = SINGLE) -> tuple[Tensor, Tensor]:
    """``(advantages [N], std used [N])`` of rewards ``[N]`` (NaN: unscored) in consecutive groups of
    ``num_generations``; ``scale_rewards="batch"`` divides by the std of every reward of every rank."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [N] with N a multiple of num_generations={num_generations}; got "
                         f"{list(rewards.shape)}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        ok = ~torch.isnan(rewards)
        s, s2, n = all_reduce_sum([float(rewards[ok].sum()), float((rewards[ok].double() ** 2).sum()),
                                   float(ok.sum())], ctx).tolist()
        var = (s2 - s * s / n) / (n - 1) if n > 1 else float("nan")
        std = torch.full_like(rewards, math.sqrt(max(var, 0.0)))
    else:
        std = _nanstd(grouped).repeat_interleave(num_generations)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), std


def _nanstd(x: Tensor) -> Tensor:
    """The std of each row ignoring NaNs, with Bessel's correction (NaN for fewer than two values)."""
    mean = torch.nanmean(x, dim=1, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=1)
    var = torch.nanmean((x - mean) ** 2, dim=1) * count / (count - 1)
    return torch.where(count > 1, var, torch.full_like(var, float("nan"))).sqrt()


# --------------------------------------------------------------------------- the loss


def completion_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                         temperature: float = 1.0, chunk_size: int | None = None, position_ids: Tensor | None = None,
                         layout: str | None = None) -> Tensor:
    """Log-probs ``[N]`` (fp32) of the completion tokens (``labels`` not -100), in row-major order, of the logits
    divided by ``temperature``; chunked, no full-vocabulary logits. ``position_ids`` / ``layout``: a packed batch
    (:func:`.loss.decoder_forward`)."""
    hidden, head, bias = decoder_forward(model, input_ids, attention_mask, position_ids, layout)
    h, y, _ = target_rows(hidden, labels)
    if y.numel() == 0 and not (isinstance(head, Tensor) and is_row_sharded(head)):  # (sharded: a collective)
        return hidden.sum()[None][:0] * 0.0  # a placeholder: keep the graph connected (DDP: every rank's grads)
    if temperature != 1.0:
        h = h / temperature
        bias = bias / temperature if bias is not None else None
    return token_log_probs(h, head, y, bias, chunk_size)


def token_rows(labels: Tensor, sequence_ids: Tensor | None = None) -> Tensor:
    """The completion (row, or of a packed batch its ``sequence_ids`` number) of each completion token ``[N]``, in the
    order of :func:`completion_log_probs`."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return mask.nonzero()[:, 0] if sequence_ids is None else sequence_ids[:, 1:][mask]


def grpo_token_losses(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, epsilon: float = 0.2,
                      epsilon_high: float | None = None, beta: float = 0.0, ref_log_probs: Tensor | None = None,
                      bias_correction_kl: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(ℓ_t, kl_t, clipped_t)`` per token (all ``[N]``): the clipped surrogate plus β × the k3 KL (the module
    docstring), the KL multiplied by the ratio with ``bias_correction_kl`` (its value unchanged on-policy, its
    gradient the unbiased reverse-KL one); ``advantages`` are per token; ``clipped_t`` marks tokens whose ratio was
    clipped where it matters."""
    eh = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_probs - old_log_probs)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + eh)
    losses = -torch.min(ratio * advantages, clipped_ratio * advantages)
    if beta != 0.0:
        if ref_log_probs is None:
            raise ValueError("beta > 0 needs ref_log_probs (the reference model's log-probs)")
        d = ref_log_probs - log_probs
        kl = torch.exp(d) - d - 1
        losses = losses + beta * (kl * ratio if bias_correction_kl else kl)
    else:
        kl = torch.zeros_like(losses)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + eh) & (advantages > 0))
    return losses, kl.detach(), clipped.detach()


def aggregate(losses: Tensor, rows: Tensor, num_rows: int, loss_type: str, max_completion_length: int) -> Tensor:
    """A micro-batch's loss from its token losses (``rows``: each token's row; ``num_rows``: its completions):
    ``dapo`` the token sum (the loop divides by the step's tokens), else the micro-batch's value (module docstring)."""
    if loss_type == "dapo":
        return losses.sum()
    if loss_type == "bnpo":
        return losses.sum() / max(1, losses.numel())
    if loss_type == "dr_grpo":
        return losses.sum() / (num_rows * max_completion_length)
    per_row = torch.zeros(num_rows, dtype=losses.dtype, device=losses.device).index_add(0, rows, losses)
    n = torch.zeros(num_rows, dtype=losses.dtype, device=losses.device).index_add(0, rows, torch.ones_like(losses))
    return (per_row / n.clamp(min=1.0)).mean()


# --------------------------------------------------------------------------- rollouts -> micro-batches


def completion_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], advantages: Tensor,
                     trained: Sequence[bool], pad_id: int, pack_capacity: int | None = None) -> dict[str, Tensor]:
    """One micro-batch of whole sequences (prompt, then completion): ``input_ids``, ``attention_mask``, ``labels``
    (the completion tokens of the ``trained`` ones, -100 elsewhere), ``advantages`` ``[B]``, ``weight`` ``[B]`` (1).

    A row a sequence, right-padded; or with ``pack_capacity`` the sequences packed into rows of at most that many
    tokens (:func:`.packing.pack_bins`, :func:`.packing.collate_segments`: no padding inside a row, position ids
    restarting with each sequence), with ``position_ids`` and ``sequence_ids`` (each token's completion, -1 on
    padding)."""
    if pack_capacity is not None:
        items = [Example(list(p) + list(c), [IGNORE_INDEX] * len(p) + (list(c) if t else [IGNORE_INDEX] * len(c)), "")
                 for p, c, t in zip(prompt_ids, completion_ids, trained)]
        bins = pack_bins([len(e.input_ids) for e in items], pack_capacity)
        batch = collate_segments([[items[i] for i in b] for b in bins], pad_id, True, [list(b) for b in bins])
        return {**batch, "advantages": advantages.float().clone(), "weight": torch.ones(len(items))}
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (p, c, row) in enumerate(zip(prompt_ids, completion_ids, rows)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        if trained[i] and len(c):
            labels[i, len(p):len(row)] = torch.tensor(list(c))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "advantages": advantages.float().clone(), "weight": torch.ones(len(rows))}


def placeholder_batch(pad_id: int) -> dict[str, Tensor]:
    """A micro-batch that runs (every rank takes part in each all-reduce) but counts for nothing."""
    b = completion_batch([[pad_id]], [[]], torch.zeros(1), [False], pad_id)
    b["weight"].zero_()
    b["ref_log_probs"] = torch.zeros(0)  # no completion tokens: the reference's log-probs of none
    return b


class GRPOObjective(Objective):
    """GRPO over prompts: an online stage (rollouts, rewards, advantages) before the training passes."""

    name = "grpo"
    count_key = "normalizer"
    item_noun = "prompts"
    metric_keys = ("kl", "clip_ratio", "completion_tokens")
    online = True

    def __init__(self, settings: GRPOSettings, reward_specs: Sequence[str], reward_weights: Sequence[float] | None,
                 seed: int = 0) -> None:
        self.settings = settings
        self.seed = seed
        self.generations = 0  # generation batches drawn so far (with the seed and the rank: the sampling seed)
        self.reward_specs = list(reward_specs)
        self.reward_names = [reward_name(s) for s in reward_specs]
        self.reward_weights = torch.tensor(list(reward_weights) if reward_weights is not None
                                           else [1.0] * len(reward_specs))
        self.funcs: list[Callable[..., Any]] | None = None
        self.buffer: list[dict[str, Any]] = []  # micro-batches still to train on: {"batch", "sources"}
        self.rollout: dict[str, float] = {}  # the metrics of the generation that fed the last step
        self.tokenizer: Any = None
        self.ctx, self.device, self.amp, self.pad_id = SINGLE, torch.device("cpu"), None, 0
        self.sharded, self.placeholder_prompt = False, None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> GRPOObjective:
        objective = cls(GRPOSettings.from_config(cfg), cfg.reward_funcs, cfg.reward_weights, cfg.seed)
        for i, spec in enumerate(cfg.reward_funcs):  # fail before any model loads
            if not (Path(spec) / "adapter_config.json").is_file():
                try:
                    load_reward_function(spec)
                except ValueError as e:
                    raise ConfigError(f"invalid config:\n  reward_funcs[{i}]: {e}") from None
        return objective

    # -- data

    def load_data(self, cfg: TrainConfig, tokenizer: Any) -> tuple[list[PromptItem], list[PromptItem], DataStats]:
        self.tokenizer = tokenizer
        return load_prompts(cfg, tokenizer)

    def collate(self, items: list[PromptItem], pad_id: int, counted: bool = True) -> dict[str, Tensor]:
        return {"prompts": torch.tensor(len(items) if counted else 0)}

    def stream_batch_size(self, cfg: TrainConfig) -> int:
        """Prompts a rank draws per generation batch: ``micro_batch_size × steps_per_generation / num_generations``."""
        s = self.settings
        return s.micro_batch_size * s.steps_per_generation // s.num_generations

    def micro_batches_per_stream_batch(self) -> int:
        s = self.settings
        return s.steps_per_generation * s.num_iterations

    def count(self, batch: dict[str, Tensor]) -> int:
        if float(batch["weight"].sum()) == 0:
            return 0
        if self.settings.loss_type == "dapo":
            return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return 1

    # -- the online stage

    def setup(self, model: nn.Module, train_items: list[PromptItem], eval_items: list[PromptItem], batch_size: int,
              pad_id: int, device: torch.device, amp: torch.dtype | None, ctx: DistContext) -> str | None:
        self.ctx, self.device, self.amp, self.pad_id = ctx, device, amp, pad_id
        self.funcs = [reward_function(s, device) for s in self.reward_specs]
        # a model sharded over the ranks (fsdp): every forward is a collective, so a rank without prompts still
        # generates (this prompt, results dropped) and runs the reference passes of its placeholder micro-batches
        from qlora_kernels.generation import sharded_ranks

        self.sharded = sharded_ranks(_unwrap(model))
        self.placeholder_prompt = (train_items or eval_items or [None])[0]
        return (f"GRPO: {self.settings.num_generations} completions a prompt, up to "
                f"{self.settings.max_completion_length} tokens; rewards: {', '.join(self.reward_names)}")

    def next_micro_batches(self, n: int, next_batch: Callable[[], tuple[dict[str, Tensor], list[Any]]],
                           model: nn.Module) -> list[tuple[dict[str, Tensor], list[Any]]]:
        """The ``n`` micro-batches of the next step: from the buffer, generating a new batch when it runs out."""
        out = []
        while len(out) < n:
            if not self.buffer:
                _, prompts = next_batch()
                self.buffer = self.generate_batch(model, prompts)
            entry = self.buffer.pop(0)
            out.append((entry["batch"], [_Source(s) for s in entry["sources"]]))
        return out

    def generate_batch(self, model: nn.Module, prompts: list[PromptItem]) -> list[dict[str, Any]]:
        """Rollouts of ``prompts`` (G each), their rewards and advantages, as ``steps_per_generation`` micro-batches
        (each ``num_iterations`` times), with π_old's and π_ref's log-probs where needed; records the rollout
        metrics."""
        s, base = self.settings, _unwrap(model)
        G, spg = s.num_generations, s.steps_per_generation
        # each generation batch of each rank draws from its own seed: ranks sample independently, a resumed run
        # samples as the uninterrupted one did, and the caller's random state is left alone
        seed = hash((self.seed, self.generations, self.ctx.rank)) % 2**63
        self.generations += 1
        t0 = time.perf_counter()
        items = [p for p in prompts for _ in range(G)]
        comps: list[Any] = []
        per_func = torch.zeros(0, len(self.reward_names))
        if items:
            with autocast(self.device, self.amp):
                comps, per_func = self.complete_and_score(base, items, seed, len(items))
        elif self.sharded:
            self._generate_placeholders(base, 1)
        t_gen = time.perf_counter() - t0
        unscored = torch.isnan(per_func).all(dim=1)
        rewards = (per_func * self.reward_weights).nansum(dim=1)
        rewards[unscored] = float("nan")
        # every rank takes part in the collectives below, also one without prompts (the last batch of an epoch)
        advantages, _ = group_advantages(rewards, G, s.scale_rewards, self.ctx)
        truncated = [c.finish_reason == "length" for c in comps]
        trained = [not (t and s.mask_truncated_completions) for t in truncated]
        self.rollout = self._rollout_metrics(per_func, rewards, comps, truncated, t_gen)
        if not items:  # runs placeholders: every rank runs as many forwards
            parts = [{"batch": self._placeholder(base), "sources": []} for _ in range(spg)]
            return [part for _ in range(s.num_iterations) for part in parts]

        # split into steps_per_generation micro-batches (shuffled, as TRL shuffles a generation batch)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        parts = []
        for k in range(spg):  # equal parts; at the end of an epoch a rank's batch may be short, a part empty
            idx = order[k * len(items) // spg:(k + 1) * len(items) // spg]
            if not idx:
                parts.append({"batch": self._placeholder(base), "sources": []})
                continue
            batch = completion_batch([items[i].input_ids for i in idx], [comps[i].token_ids for i in idx],
                                     advantages[idx], [trained[i] for i in idx], self.pad_id,
                                     s.sequence_len if s.pack else None)
            self._add_reference_log_probs(base, batch)
            parts.append({"batch": batch, "sources": [items[i].source for i in idx]})
        return [part for _ in range(s.num_iterations) for part in parts]

    def complete_and_score(self, model: nn.Module, items: list[PromptItem], seed: int, batch_size: int) -> tuple[
            list[Any], Tensor]:
        """``(completions, rewards [N, F])`` of one completion of each item, sampled from ``seed`` with the rollouts'
        settings (:func:`qlora_kernels.generation.generate`) and scored by every reward function (:func:`score`:
        the prompts as the rows gave them; a conversation's completion as an assistant message, as in TRL)."""
        from qlora_kernels.generation import generate

        s = self.settings
        comps = generate(model, self.tokenizer, [p.prompt for p in items], max_new_tokens=s.max_completion_length,
                         temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed, batch_size=batch_size,
                         chat_template=[None if p.templated else False for p in items]).completions
        texts = [c.text if isinstance(p.prompt, str) else [{"role": "assistant", "content": c.text}]
                 for c, p in zip(comps, items)]
        columns = {k: [p.columns.get(k) for p in items] for k in {k for p in items for k in p.columns}}
        return comps, score(self.funcs, self.reward_names, [p.prompt for p in items], texts,
                            [list(c.token_ids) for c in comps], columns)

    def _placeholder(self, model: nn.Module) -> dict[str, Tensor]:
        """A micro-batch that counts for nothing; on a sharded model with the reference passes the others run."""
        batch = placeholder_batch(self.pad_id)
        if self.sharded:
            self._add_reference_log_probs(model, batch)
        return batch

    def _generate_placeholders(self, model: nn.Module, n: int) -> None:
        """``n`` generate calls of one placeholder prompt, results dropped: a sharded model's forwards are
        collectives, and a rank with fewer prompts than another runs them too (the decode steps in step)."""
        from qlora_kernels.generation import generate

        if n <= 0 or self.placeholder_prompt is None:
            return
        s, p = self.settings, self.placeholder_prompt
        with autocast(self.device, self.amp):
            for _ in range(n):
                generate(model, self.tokenizer, [p.prompt], max_new_tokens=s.max_completion_length,
                         temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=0, batch_size=1,
                         chat_template=None if p.templated else False)

    def _log_prob_args(self, batch: dict[str, Tensor], device: torch.device | None = None) -> tuple:
        """The arguments of :func:`completion_log_probs` after the model, for a plain or a packed batch."""
        s = self.settings
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        args = (*(move(batch[k]) for k in ("input_ids", "attention_mask", "labels")), s.temperature, s.chunk_size)
        if "position_ids" in batch:
            args += (move(batch["position_ids"]), self.packed_layout)
        return args

    @torch.no_grad()
    def _add_reference_log_probs(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        s = self.settings
        args = self._log_prob_args(batch, self.device)
        with autocast(self.device, self.amp):
            if s.needs_old_log_probs:
                batch["old_log_probs"] = completion_log_probs(model, *args).cpu()
            if s.beta != 0.0:
                with adapters_disabled(model):
                    batch["ref_log_probs"] = completion_log_probs(model, *args).cpu()

    def _rollout_metrics(self, per_func: Tensor, rewards: Tensor, comps: list[Any], truncated: list[bool],
                         seconds: float) -> dict[str, float]:
        """TRL's names: reward, reward_std, rewards/<name>/mean and /std, completions/mean_length, /max_length,
        /clipped_ratio, and the rollout tokens per second; over every rank's completions."""
        lengths = torch.tensor([len(c.token_ids) for c in comps] or [0], dtype=torch.float64)
        ok = ~torch.isnan(rewards)
        sums = [float(rewards[ok].sum()), float((rewards[ok].double() ** 2).sum()), float(ok.sum()),
                float(lengths.sum()), float(len(comps)), float(sum(truncated)), seconds if comps else 0.0]
        for j in range(per_func.shape[1]):
            col = per_func[:, j]
            good = ~torch.isnan(col)
            sums += [float(col[good].sum()), float((col[good].double() ** 2).sum()), float(good.sum())]
        t = all_reduce_sum(sums, self.ctx, self.device).tolist()
        longest = float(all_reduce_max([float(lengths.max())], self.ctx, self.device)[0])

        def mean_std(s: float, s2: float, n: float) -> tuple[float, float]:
            m = s / n if n else float("nan")
            return m, math.sqrt(max((s2 - n * m * m) / (n - 1), 0.0)) if n > 1 else float("nan")

        out: dict[str, float] = {}
        out["reward"], out["reward_std"] = mean_std(t[0], t[1], t[2])
        for j, name in enumerate(self.reward_names):
            m, sd = mean_std(*t[7 + 3 * j:10 + 3 * j])
            out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = m, sd
        out["completions/mean_length"] = t[3] / max(1.0, t[4])
        out["completions/max_length"] = longest
        out["completions/clipped_ratio"] = t[5] / max(1.0, t[4])
        out["rollout_tokens_per_s"] = round(t[3] / max(1e-9, t[6] / max(1, self.ctx.world_size)), 1)  # mean rank time
        return out

    # -- the training pass

    def loss(self, model: nn.Module, batch: dict[str, Tensor],
             run: Callable[..., Any] | None = None) -> tuple[Tensor, dict[str, float]]:
        s = self.settings
        args = self._log_prob_args(batch)
        logp = run(completion_log_probs, *args) if run is not None else completion_log_probs(_unwrap(model), *args)
        rows = token_rows(batch["labels"], batch.get("sequence_ids")).to(logp.device)
        old = batch.get("old_log_probs")
        old = logp.detach() if old is None else old.to(logp)
        ref = batch.get("ref_log_probs")
        adv = batch["advantages"].to(logp)[rows]
        losses, kl, clipped = grpo_token_losses(logp, old, adv, s.epsilon, s.epsilon_high, s.beta,
                                                None if ref is None else ref.to(logp), s.use_bias_correction_kl)
        w = float(batch["weight"].sum() > 0)
        value = aggregate(losses, rows, batch["advantages"].shape[0], s.loss_type, s.max_completion_length) * w
        n = float(losses.numel()) * w
        return value, {"kl": float(kl.sum()) * w, "clip_ratio": float(clipped.float().sum()) * w,
                       "completion_tokens": n}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums.get("completion_tokens", 0.0))
        out = {"clip_ratio": sums.get("clip_ratio", 0.0) / n}
        if self.settings.beta != 0.0:
            out["kl"] = sums.get("kl", 0.0) / n
        return out

    def step_metrics(self) -> dict[str, float]:
        return dict(self.rollout)

    # -- evaluation: the reward of completions of held-out prompts, sampled as the rollouts are, seed fixed

    def evaluate(self, model: nn.Module, items: list[PromptItem], batch_size: int, pad_id: int, device: torch.device,
                 amp: torch.dtype | None) -> tuple[float, float, dict[str, float]]:
        """``(−reward sum, prompts, metric sums)`` of one completion per prompt, sampled with the rollouts' settings
        from a fixed seed (every evaluation draws the same way; as TRL evaluates, by sampling), lower is better."""
        if not items:
            return 0.0, 0, {"reward": 0.0, **{f"rewards/{n}": 0.0 for n in self.reward_names}}
        base = _unwrap(model)
        with eval_mode(base), autocast(device, amp):
            _, per_func = self.complete_and_score(base, items, self.seed + self.ctx.rank, batch_size)
        rewards = torch.nan_to_num(per_func, nan=0.0) @ self.reward_weights
        sums = {"reward": float(rewards.sum()),
                **{f"rewards/{n}": float(torch.nan_to_num(per_func[:, j], nan=0.0).sum())
                   for j, n in enumerate(self.reward_names)}}
        return -sums["reward"], len(items), sums

    def evaluate_placeholders(self, n: int, model: nn.Module, item: Any, batch_size: int, pad_id: int,
                              device: torch.device, amp: torch.dtype | None) -> None:
        """A rank's eval batches short of another's, on a sharded model: generate calls whose results are dropped."""
        base = _unwrap(model)
        with eval_mode(base):
            self._generate_placeholders(base, n)

    def eval_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {k: v / max(1.0, count) for k, v in sums.items()}

    def eval_note(self, record: dict[str, Any]) -> str:
        return f" (mean reward {record['eval_reward']:.4f} of sampled completions, seed fixed)"

    # -- checkpoints: the micro-batches of a generation batch not trained on yet

    def state_dict(self) -> dict[str, Any]:
        return {"generations": self.generations, "buffer": [{"sources": e["sources"],
                            "batch": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                                          "values": v.flatten().tolist()} for k, v in e["batch"].items()}}
                           for e in self.buffer]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.generations = int((state or {}).get("generations", 0))
        self.buffer = [{"sources": e["sources"],
                        "batch": {k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
                                  for k, v in e["batch"].items()}}
                       for e in (state or {}).get("buffer", [])]


@dataclass
class _Source:
    """A completion's prompt, as the loop's error messages name items (``.source``)."""

    source: str


