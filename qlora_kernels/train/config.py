"""The training config: one YAML file with Axolotl-like keys, checked completely before any model loads.

``load_config(path, overrides)`` reads the YAML, applies ``key=value`` overrides (dotted keys,
values parsed as YAML: ``quantization.blocksize=128``, ``datasets.0.path=x.jsonl``,
``lora_target_modules=[q_proj,v_proj]``), and validates every key: an unknown key, a wrong type,
a value outside its allowed set or range or a missing path raises :class:`ConfigError` naming the key and
what is allowed; every numeric key has a range (finite, and e.g. ``learning_rate > 0``,
``adam_beta1`` in [0, 1)). All problems are reported at once.

Names that TRL, transformers and Axolotl users bring for the same setting are read as aliases
(:data:`ALIASES`: ``per_device_train_batch_size`` -> ``micro_batch_size``, ``max_length`` ->
``sequence_len``, ``beta`` -> ``dpo_beta``, ...); an alias given together with our key is an error,
and ``output_dir/config.yaml`` notes the aliases read. Names with no equivalent get an error that
names what to set instead (:data:`FOREIGN_KEYS`).

The dataclasses below are the schema: a field's type annotation is its type, its default the
default, and ``metadata`` carries the allowed values (``choices``), path checks (``path``) and
a one-line help. The keys are flat in the YAML and grouped here: :class:`CommonKeys` (every run),
:class:`SFTKeys` and :class:`DPOKeys` (each objective's), joined in :class:`TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from .objectives.dpo_config import DPOKeys
from .objectives.grpo_config import GRPOKeys
from .objectives.reward_config import RewardKeys
from .objectives.sft_config import SFTKeys
from .schema import AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT, Range
from .schema import setting as _f

DATASET_TYPES = ("alpaca", "completion", "chat", "text", "preference", "hh-rlhf", "prompt")
PREFERENCE_TYPES = ("preference", "hh-rlhf")  # the row formats of DPO and reward models (see train/data.py)
# what a run optimizes (objectives/<name>.py, its keys in objectives/<name>_config.py)
OBJECTIVES = ("sft", "dpo", "reward", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "reward")  # the objectives that train on preference rows
PROMPT_TYPES = ("prompt",)  # the row format of online objectives (GRPO): TRL's prompt-only data
EVAL_SPLITS = ("eval", "validation", "test")
OPTIMIZERS = ("paged_adamw", "paged_adamw_8bit", "adamw_torch")
OPTIMIZER_ALIASES = {"paged_adamw_32bit": "paged_adamw"}  # Axolotl's / transformers' name of the same optimizer
SCHEDULERS = ("cosine", "linear", "constant")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class ConfigError(ValueError):
    """A config problem: names the key, the value found and the values allowed."""


@dataclass
class DatasetConfig:
    """One dataset: a local JSON/JSONL/parquet file (or a directory of them)."""

    path: str = _f(path="exists", help="local .json/.jsonl/.parquet file or a directory of them")
    type: str = _f("alpaca", choices=DATASET_TYPES, help="row format")
    split: str = _f("train", choices=("train", *EVAL_SPLITS), help="'train', or 'eval'/'validation'/'test' "
                    "to hold the rows out for evaluation")


@dataclass
class QuantizationConfig:
    """How the frozen base weights are stored."""

    quant_type: str = _f("nf4", choices=("nf4",), help="4-bit format of the frozen weights")
    double_quant: bool = _f(True, help="quantize the per-block absmax constants too")
    blocksize: int = _f(64, choices=BLOCKSIZES, help="elements per absmax block")


@dataclass
class FSDPConfig:
    """How ``fsdp: true`` shards the model (Axolotl's / accelerate's ``fsdp_config`` keys; their ``fsdp_`` prefix may be
    given, as in ``fsdp_transformer_layer_cls_to_wrap``). See :mod:`.fsdp`."""

    transformer_layer_cls_to_wrap: Union[str, list[str], None] = _f(
        None, help="class name(s) of the transformer block, each block one FSDP unit (default: the model's "
                   "_no_split_modules)")
    reshard_after_forward: bool = _f(True, help="free each block's gathered weights after its forward and gather "
                                     "them again for the backward (FULL_SHARD); false keeps them to the backward "
                                     "(SHARD_GRAD_OP: less communication, more memory)")
    activation_checkpointing: bool = _f(False, help="the same as gradient_checkpointing: true")
    auto_wrap_policy: str = _f("TRANSFORMER_BASED_WRAP", choices=("TRANSFORMER_BASED_WRAP",),
                               help="each transformer block one unit (the only policy)")
    state_dict_type: str = _f("SHARDED_STATE_DICT", choices=("SHARDED_STATE_DICT",),
                              help="trainer checkpoints are sharded (torch.distributed.checkpoint, safetensors); the "
                                   "adapter is always saved whole, in PEFT's format")
    cpu_ram_efficient_loading: bool = _f(True, choices=(True,), help="always: each rank reads the checkpoint block "
                                         "by block and keeps only its shard")
    offload_params: bool = _f(False, choices=(False,), help="CPU offload of the parameters: not supported")
    shard_one_process: bool = _f(False, help="with one process (no torchrun, or torchrun with one), join a process "
                                 "group of one (nccl on a GPU, gloo on the CPU) and shard over it: the FSDP2 path as "
                                 "N ranks run it, for a one-GPU check of it (default: one process trains unsharded)")
    read_in_part: bool = _f(True, help="each rank reads only the part of each weight behind its own shards "
                            "(plain reads of those bytes; about 1/N of them): a float checkpoint's block weights, "
                            "quantized from their parts (the small absmax all-gathered, so the NF4 bytes equal "
                            "whole-tensor quantization), a 4-bit checkpoint's packed codes, and the rows of the input "
                            "embedding and the output projection; false reads every weight whole on every rank")


@dataclass
class CommonKeys:
    """The keys of every run: model, data, adapter, optimization, evaluation, checkpoints, output."""


    base_model: str = _f(path="model_dir", help="local Hugging Face model directory (safetensors)")
    datasets: list[DatasetConfig] = _f(help="list of {path, type, split}")
    test_datasets: list[DatasetConfig] = _f(factory=list, help="datasets used for evaluation only")
    tokenizer_config: str | None = _f(None, path="dir", help="tokenizer directory (default: base_model)")
    trust_remote_code: bool = _f(False, help="allow custom model code from base_model (off by default)")
    objective: str | None = _f(None, choices=OBJECTIVES, help="what to train: sft (next-token loss), dpo (preference "
                               "pairs), reward (a reward model on preference pairs) or grpo (online RL from rewards of "
                               "sampled completions); default sft, or rl's value")
    rl: str | None = _f(None, choices=("dpo", "grpo"), help="Axolotl's key: 'dpo' or 'grpo', the same as objective: "
                        "dpo / grpo")
    adapter: str = _f("qlora", choices=("qlora",), help="adapter kind (Axolotl key)")
    load_in_4bit: bool = _f(True, choices=(True,), help="Axolotl key; QLoRA always loads in 4 bits")
    quantization: QuantizationConfig = _f(factory=QuantizationConfig, help="{quant_type, double_quant, blocksize}")
    lora_r: int = _f(16, range=AT_LEAST_1, help="LoRA rank")
    lora_alpha: float = _f(16, range=POSITIVE, help="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, range=UNIT, help="dropout on the LoRA input, in [0, 1)")
    lora_target_modules: Union[str, list[str]] = _f("all-linear", help="'all-linear' or a list of module names")
    peft_use_rslora: bool = _f(False, help="rank-stabilized scale alpha / sqrt(r)")
    sequence_len: int = _f(2048, range=AT_LEAST_1, help="tokens per example; longer ones are truncated and counted")
    skip_bad_rows: bool = _f(False, help="skip (and count) malformed rows instead of failing")
    val_set_size: float = _f(0.0, range=AT_LEAST_0,
                             help="fraction (<1) or whole number (>=1) of train rows held out for eval")
    sample_packing: bool = _f(False, help="pack examples into rows of sequence_len tokens (DPO: whole pairs into rows "
                              "of 2 x sequence_len), each attending only to itself; micro_batch_size then counts rows "
                              "(GRPO: each micro-batch's generated sequences packed, micro_batch_size still counts "
                              "completions) (Axolotl key)")
    micro_batch_size: int = _f(1, range=AT_LEAST_1, help="examples per forward pass (packed rows with sample_packing)")
    eval_batch_size: int | None = _f(None, range=AT_LEAST_1,
                                     help="examples per eval forward pass (default: micro_batch_size)")
    gradient_accumulation_steps: int = _f(1, range=AT_LEAST_1, help="micro-batches per optimizer step")
    num_epochs: float = _f(1.0, range=AT_LEAST_0, help="passes over the train rows (ignored when max_steps is set)")
    max_steps: int | None = _f(None, range=AT_LEAST_1, help="optimizer steps (overrides num_epochs)")
    learning_rate: float = _f(2e-4, range=POSITIVE, help="peak learning rate")
    lr_scheduler: str = _f("cosine", choices=SCHEDULERS, help="decay after warmup")
    warmup_steps: int | None = _f(None, range=AT_LEAST_0,
                                  help="linear warmup steps (lr 0 at the first step, as in transformers)")
    warmup_ratio: float | None = _f(None, range=UNIT, help="warmup as a fraction of the total steps (rounded up)")
    optimizer: str = _f("paged_adamw", choices=OPTIMIZERS, help="optimizer of the LoRA parameters "
                         "(paged_adamw_32bit is read as paged_adamw)")
    weight_decay: float = _f(0.0, range=AT_LEAST_0, help="decoupled weight decay")
    adam_beta1: float = _f(0.9, range=UNIT, help="AdamW beta1")
    adam_beta2: float = _f(0.999, range=UNIT, help="AdamW beta2")
    adam_epsilon: float = _f(1e-8, range=POSITIVE, help="AdamW epsilon")
    max_grad_norm: float | None = _f(1.0, range=Range(0, note="0 or null: no clipping"),
                                     help="gradient clipping norm (0 or null: no clipping, as in transformers)")
    gradient_checkpointing: Union[bool, Literal["offload"]] = _f(
        False, choices=(True, False, "offload"),
        help="recompute each decoder layer in backward (true); offload: recompute, and keep the layer inputs in "
             "host memory (= true with activation_offloading: true)")
    activation_offloading: bool = _f(False, help="move the activations the decoder saves for backward to (pinned) host "
                                     "memory and back instead of keeping them on the device; nothing is recomputed "
                                     "unless gradient_checkpointing is on (Axolotl key)")
    fused_mlp: bool = _f(False, help="run each Llama/Mistral/Qwen2/Qwen3 MLP as one fused QLoRA Function "
                         "(nn.FusedQLoraMLP); off by default: it ships behind this flag, the GPU benchmark is ready "
                         "(bench_lora.py --mlp), it could not be shown to win on the CPU")
    bf16: Union[bool, Literal["auto"]] = _f("auto", choices=(True, False, "auto"),
                                            help="bf16 autocast: auto = on for CUDA devices that support it")
    fp16: bool = _f(False, help="fp16 autocast with loss scaling (CUDA only)")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    ddp: bool | None = _f(None, help="under torchrun: data parallel with DDP, the whole 4-bit model on every rank "
                          "(null: yes unless fsdp)")
    fsdp: bool = _f(False, help="under torchrun: FSDP2, the 4-bit model sharded across ranks, each transformer block "
                    "one unit (also Axolotl's list form [full_shard, auto_wrap])")
    fsdp_version: int = _f(2, choices=(2,), help="FSDP2 (torch's fully_shard) is the only version (Axolotl key)")
    fsdp_config: FSDPConfig = _f(factory=FSDPConfig, help="{transformer_layer_cls_to_wrap, reshard_after_forward, "
                                 "activation_checkpointing, ...} (Axolotl key)")
    eval_steps: int | None = _f(None, range=AT_LEAST_1, help="evaluate every N steps (and at the end)")
    early_stopping_patience: int | None = _f(None, range=AT_LEAST_1,
                                             help="stop after N evaluations without a better eval loss")
    save_steps: int | None = _f(None, range=AT_LEAST_1, help="checkpoint every N steps")
    save_total_limit: int | None = _f(None, range=AT_LEAST_1, help="keep only the newest N checkpoints of this run")
    logging_steps: int = _f(1, range=AT_LEAST_1, help="write metrics every N steps")
    loss_chunk_size: int | None = _f(None, range=AT_LEAST_1,
                                     help="tokens per chunk of the chunked cross-entropy (default: auto)")
    output_dir: str = _f("outputs/sft", help="adapter, checkpoints, metrics.jsonl, loss.png; one run per directory")
    overwrite_output_dir: bool = _f(False, help="replace the results of a previous run in output_dir (otherwise "
                                    "a run refuses to start there)")
    auto_resume_from_checkpoints: bool = _f(False, help="resume from the newest checkpoint in output_dir if there "
                                            "is one (Axolotl key)")
    seed: int = _f(42, range=Range(0, 2**32 - 1), help="seed of initialization, shuffling and dropout")
    resume_from_checkpoint: str | None = _f(None, path="checkpoint", help="checkpoint directory to resume from")
    progress_bar: bool = _f(True, help="show a tqdm progress bar")


@dataclass
class TrainConfig(GRPOKeys, RewardKeys, DPOKeys, SFTKeys, CommonKeys):
    """Fine-tuning with QLoRA: SFT, DPO (``objective: dpo``), a reward model (``objective: reward``) or GRPO
    (``objective: grpo``). See examples/sft_tiny.yaml, dpo_tiny.yaml, reward_tiny.yaml and grpo_tiny.yaml.

    One flat set of YAML keys: the common keys (:class:`CommonKeys`), then each objective's, declared beside it
    (``objectives/<name>_config.py``: :class:`SFTKeys`, :class:`DPOKeys`, :class:`RewardKeys`, :class:`GRPOKeys`); a
    run reads the
    common keys and those of its :attr:`objective`. Fields come in that order (a dataclass takes its bases' fields
    from the last base to the first). ``objective`` left null is resolved when the config is built: ``rl``'s value,
    else ``sft``.
    """

    aliases: ClassVar[dict[str, str]] = {}  # set per instance by validate(): {alias given: our key}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the run's keys (defaults included): the common keys and its objective's, as written to
        ``output_dir/config.yaml`` (which then loads as it is: GRPO's ``beta`` beside DPO's ``dpo_beta`` would not)."""
        other = {f.name for key_class in OBJECTIVE_KEYS.values() if key_class is not OBJECTIVE_KEYS[self.objective]
                 for f in dataclasses.fields(key_class)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in other}

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = self.rl or "sft"

    @property
    def is_dpo(self) -> bool:
        """True for DPO (``objective: dpo`` or ``rl: dpo``)."""
        return self.objective == "dpo"

    @property
    def train_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.split == "train"]

    @property
    def eval_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.split != "train"] + list(self.test_datasets)


SFTConfig = TrainConfig  # the name from before DPO joined; both name the same class
OBJECTIVE_KEYS: dict[str, type] = {"sft": SFTKeys, "dpo": DPOKeys, "reward": RewardKeys, "grpo": GRPOKeys}
# The key groups in the order of TrainConfig's fields, with the heading ``qlora-kernels train --help`` gives each.
KEY_GROUPS: tuple[tuple[str, type], ...] = (
    ("config keys (default), common to every objective", CommonKeys),
    ("SFT keys (objective: sft, the default)", SFTKeys),
    ("DPO keys (objective: dpo, or rl: dpo)", DPOKeys),
    ("reward-model keys (objective: reward)", RewardKeys),
    ("GRPO keys (objective: grpo, or rl: grpo; TRL GRPOConfig's names)", GRPOKeys),
)


# --------------------------------------------------------------------------- names other trainers use

# What TRL / transformers / PEFT / Axolotl users write for one of our keys (same meaning); a dotted target
# is a nested key. An alias given together with our key (or with another alias of it) is an error.
ALIASES: dict[str, str] = {
    "model_name_or_path": "base_model",  # TRL ModelConfig
    "trainer": "objective",  # this trainer's name for it before reward models joined
    "per_device_train_batch_size": "micro_batch_size",  # transformers TrainingArguments (TRL, Axolotl)
    "per_device_eval_batch_size": "eval_batch_size",
    "num_train_epochs": "num_epochs",
    "lr_scheduler_type": "lr_scheduler",  # 'constant_with_warmup' is our 'constant'
    "optim": "optimizer",  # 'paged_adamw_32bit' is our 'paged_adamw'
    "max_length": "sequence_len",  # TRL SFTConfig / DPOConfig
    "max_seq_length": "sequence_len",  # TRL before 0.20
    "completion_only_loss": "train_on_inputs",  # TRL SFTConfig; negated (null: our default)
    "beta": "dpo_beta",  # TRL DPOConfig
    "loss_type": "dpo_loss",
    "label_smoothing": "dpo_label_smoothing",
    "packing": "sample_packing",  # TRL SFTConfig (its bfd strategy: packed, position ids restart per example)
    "enable_activation_offloading": "activation_offloading",  # torchtune
    "use_rslora": "peft_use_rslora",  # PEFT LoraConfig / TRL ModelConfig
    "target_modules": "lora_target_modules",  # PEFT LoraConfig
    "bnb_4bit_quant_type": "quantization.quant_type",  # transformers BitsAndBytesConfig
    "bnb_4bit_use_double_quant": "quantization.double_quant",
    "use_bnb_nested_quant": "quantization.double_quant",  # TRL ModelConfig
    "fsdp_transformer_layer_cls_to_wrap": "fsdp_config.transformer_layer_cls_to_wrap",  # transformers / accelerate
}

# Alias names that are an objective's own keys: not read as aliases in its runs (GRPO's beta and loss_type are TRL
# GRPOConfig's; in every other run they are DPOConfig's, read as dpo_beta / dpo_loss).
OBJECTIVE_OWN_KEYS = {"grpo": ("beta", "loss_type")}

ALIAS_NOTES = {"completion_only_loss": "negated", "lr_scheduler_type": "constant_with_warmup is our constant",
               "optim": "paged_adamw_32bit is our paged_adamw"}

# Keys of other trainers with no equivalent here: what to set instead (or why it is not needed).
FOREIGN_KEYS: dict[str, str] = {
    "reward_model": "set objective: reward (a reward model trained on preference rows)",
    "eval_strategy": "evaluation runs every eval_steps steps and at the end: set eval_steps",
    "evaluation_strategy": "evaluation runs every eval_steps steps and at the end: set eval_steps",
    "save_strategy": "checkpoints are written every save_steps steps: set save_steps",
    "lora_target_linear": "set lora_target_modules: all-linear (the default)",
    "r": "set lora_r",
    "batch_size": "set micro_batch_size (examples per forward pass) and gradient_accumulation_steps",
    "padding_free": "set sample_packing: true (examples packed into rows of sequence_len tokens, each attending only "
                    "to itself, no padding inside a row)",
    "max_prompt_length": "not supported: sequence_len bounds prompt and completion together (the end is cut)",
    "report_to": "not supported: metrics go to output_dir/metrics.jsonl and loss.png",
    "deepspeed": "not supported: set fsdp: true (FSDP2) to shard the 4-bit model across ranks, or leave it off for "
                 "DDP under torchrun",
}
# fsdp's list form (Axolotl's / transformers' fsdp: [full_shard, auto_wrap]): what each option means here
FSDP_OPTIONS = {"full_shard": "", "auto_wrap": "", "shard_grad_op": "fsdp_config.reshard_after_forward: false",
                "offload": None}

_EVAL_WORDS = frozenset(("eval", "evaluation", "test", "val", "validation"))


def _alias_value(alias: str, value: Any) -> Any:
    """An alias's value as our key takes it."""
    if alias == "completion_only_loss" and isinstance(value, bool):
        return not value
    if alias == "lr_scheduler_type" and value == "constant_with_warmup":
        return "constant"
    if alias == "optim" and isinstance(value, str):
        return OPTIMIZER_ALIASES.get(value, value)
    return value


def _canonical(raw: dict[str, Any], errors: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``raw`` with every alias renamed to our key (values converted) and ``optimizer: paged_adamw_32bit``
    read as ``paged_adamw``; returns ``(new raw, {what was given: what it was read as})``. ``raw`` is not
    modified."""
    out = dict(raw)
    used: dict[str, str] = {}
    own = OBJECTIVE_OWN_KEYS.get(out.get("objective") or out.get("trainer") or out.get("rl"), ())
    for alias, key in ALIASES.items():
        if alias not in out or alias in own:
            continue
        value = out.pop(alias)
        if alias == "completion_only_loss" and value is None:
            continue  # TRL's default (decide by the data): ours is completion-only
        *parents, leaf = key.split(".")
        node = out
        if parents:
            if not isinstance(out.get(parents[0]), (dict, type(None))):
                continue  # the mapping itself has the wrong type: reported by the type check
            node = out[parents[0]] = dict(out.get(parents[0]) or {})
        other = [a for a, k in used.items() if k == key]
        if leaf in node or other:
            errors.append(f"{alias}: is read as {key}, which is also given{f' (as {other[0]})' if other else ''}; "
                          "set only one of them")
            continue
        if alias == "lr_scheduler_type" and value == "constant" and (out.get("warmup_steps") or
                                                                     out.get("warmup_ratio")):
            errors.append("lr_scheduler_type: 'constant' in transformers has no warmup, but a warmup is set; set "
                          "lr_scheduler_type: constant_with_warmup (our lr_scheduler: constant), or no warmup")
            continue
        node[leaf] = _alias_value(alias, value)
        used[alias] = key
    _canonical_fsdp(out, used, errors)
    opt = out.get("optimizer")
    if isinstance(opt, str) and opt in OPTIMIZER_ALIASES and "optim" not in used:
        out["optimizer"] = OPTIMIZER_ALIASES[opt]
        used[f"optimizer: {opt}"] = f"optimizer: {out['optimizer']}"
    return out, used


def _canonical_fsdp(out: dict[str, Any], used: dict[str, str], errors: list[str]) -> None:
    """In place: ``fsdp: [full_shard, auto_wrap, ...]`` (Axolotl's / transformers' list form) read as ``fsdp: true``
    (``shard_grad_op``: ``fsdp_config.reshard_after_forward: false``), and the ``fsdp_``-prefixed keys inside
    ``fsdp_config`` (Axolotl's older names, accelerate's) read without the prefix (``fsdp_version`` as the top-level
    key)."""
    value = out.get("fsdp")
    if isinstance(value, str):
        value = value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        unknown = [v for v in value if v not in FSDP_OPTIONS]
        if "offload" in value:
            errors.append("fsdp: 'offload' (parameters in CPU memory) is not supported; the 4-bit shards stay on the "
                          "device")
            out.pop("fsdp")  # reported: no second error about its type
        elif unknown or not value:
            errors.append(f"fsdp: {value!r} is not allowed; set fsdp: true (or the list form with "
                          f"{', '.join(o for o in FSDP_OPTIONS if o != 'offload')})")
            out.pop("fsdp")
        else:
            out["fsdp"] = True
            used[f"fsdp: {value}"] = "fsdp: true"
            if "shard_grad_op" in value:
                cfg = out["fsdp_config"] = dict(out.get("fsdp_config") or {})
                cfg.setdefault("reshard_after_forward", False)
                used["fsdp: shard_grad_op"] = FSDP_OPTIONS["shard_grad_op"]
    inner = out.get("fsdp_config")
    if not isinstance(inner, dict):
        return
    inner = out["fsdp_config"] = dict(inner)
    for key in [k for k in inner if isinstance(k, str) and k.startswith("fsdp_")]:
        plain = key[len("fsdp_"):]
        if plain == "version":
            if "fsdp_version" in out:
                errors.append(f"fsdp_config.{key}: is read as fsdp_version, which is also given; set only one of them")
            else:
                out["fsdp_version"] = inner.pop(key)
                used[f"fsdp_config.{key}"] = "fsdp_version"
        elif plain in inner:
            errors.append(f"fsdp_config.{key}: is read as fsdp_config.{plain}, which is also given; set only one of "
                          "them")
        else:
            inner[plain] = inner.pop(key)
            used[f"fsdp_config.{key}"] = f"fsdp_config.{plain}"


def _unknown_key(key: Any, prefix: str, names: list[str]) -> str:
    """The error for an unknown key: what to set instead, or the closest known name (an eval key is only
    suggested for an eval-like key, and the other way round)."""
    k = str(key)
    if not prefix and k in FOREIGN_KEYS:
        return f"{k}: unknown key; {FOREIGN_KEYS[k]}"
    candidates = names + (list(ALIASES) if not prefix else [])
    evalish = bool(set(k.lower().split("_")) & _EVAL_WORDS)
    pool = [n for n in candidates if bool(set(n.split("_")) & _EVAL_WORDS) == evalish]
    close = difflib.get_close_matches(k, pool, n=1)
    hint = ""
    if close:
        c = close[0]
        hint = f"; did you mean {c!r}{f' (read as {ALIASES[c]})' if c in ALIASES and not prefix else ''}?"
    return f"{prefix}{k}: unknown key{hint} (allowed keys: {', '.join(names)})"


# --------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return tp.__name__


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; returns the converted value (or None after an error)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            sub: list[str] = []
            out = _convert(value, arg, key, sub)
            if not sub:
                return out
        errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if tp is type(None):
        if value is None:
            return None
        errors.append(f"{key}: expected null")
        return None
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return None
        return [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping of {_keys(tp)}, got {type(value).__name__} {value!r}")
            return None
        return _build(tp, value, key + ".", errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # PyYAML reads "2e-4" (no dot) as a string
                return float(value)
            except (ValueError, OverflowError):  # "fast"; an int beyond the float range
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return None


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _build(cls: type, raw: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in raw:
        if k not in fields:
            errors.append(_unknown_key(k, prefix, list(fields)))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: required key is missing ({f.metadata.get('help', '')})")
            continue
        value = _convert(raw[name], hints[name], key, errors)
        choices = f.metadata.get("choices")
        if value is not None and choices is not None and not any(value == c and type(value) is type(c)
                                                                 for c in choices):
            errors.append(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, choices))}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError:  # a required key was missing: already reported
        return None


# --------------------------------------------------------------------------- paths and cross-field rules


def _check_path(key: str, value: str | None, kind: str, errors: list[str]) -> None:
    if value is None:
        return
    p = Path(value)
    if kind == "exists":
        if not p.exists():
            errors.append(f"{key}: path {value!r} does not exist (cwd: {os.getcwd()})")
    elif kind == "dir":
        if not p.is_dir():
            errors.append(f"{key}: {value!r} is not a directory (cwd: {os.getcwd()})")
    elif kind == "model_dir":
        if not (p / "config.json").is_file():
            errors.append(f"{key}: {value!r} is not a Hugging Face model directory (no config.json; cwd: "
                          f"{os.getcwd()})")
        elif not any(p.glob("*.safetensors")):
            found = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            extra = f" (found {', '.join(found)}: pickle weights are not loaded)" if found else ""
            errors.append(f"{key}: {value!r} has no *.safetensors weights; only safetensors are loaded{extra}")
    elif kind == "checkpoint":
        if not (p / "trainer_state.json").is_file():
            errors.append(f"{key}: {value!r} is not a checkpoint directory written by this trainer "
                          "(no trainer_state.json)")


def _check_ranges(obj: Any, prefix: str, errors: list[str]) -> None:
    """Every numeric key against its ``range`` (a float must also be finite); null passes where allowed."""
    for f in dataclasses.fields(obj):
        rng, value = f.metadata.get("range"), getattr(obj, f.name)
        if rng is None or not isinstance(value, (int, float)) or isinstance(value, bool) or value in rng:
            continue
        finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
        null = " or null" if type(None) in typing.get_args(typing.get_type_hints(type(obj))[f.name]) else ""
        note = f" ({rng.note})" if rng.note else ""
        errors.append(f"{prefix}{f.name}: must be {finite}{rng}{null}{note}; got {value}")


def _check_rules(cfg: TrainConfig, errors: list[str]) -> None:
    """The rules between keys: of the common keys, of the objective's keys (dpo_label_smoothing with dpo_loss),
    and between the objective and its data (DPO reads preference rows, SFT the others; alpaca cannot format chat)."""
    if cfg.num_epochs <= 0 and cfg.max_steps is None:
        errors.append(f"num_epochs: must be > 0 (or set max_steps), got {cfg.num_epochs}")
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        errors.append("warmup_steps, warmup_ratio: set one of them, not both (an override of one replaces the other)")
    if 1 <= cfg.val_set_size and not cfg.val_set_size.is_integer() and math.isfinite(cfg.val_set_size):
        errors.append(f"val_set_size: must be a fraction < 1 or a whole number of rows; got {cfg.val_set_size}")
    if cfg.rl is not None and cfg.objective != cfg.rl:
        errors.append(f"rl, objective: rl: {cfg.rl} contradicts objective: {cfg.objective}; set one of them")
    DPOKeys.check(cfg, errors)
    GRPOKeys.check(cfg, errors)
    if cfg.bf16 is True and cfg.fp16:
        errors.append("bf16, fp16: set at most one of them to true")
    if cfg.fsdp and cfg.ddp:
        errors.append("ddp, fsdp: set at most one of them to true: DDP keeps the whole 4-bit model on every rank, "
                      "FSDP2 shards it across the ranks (README: 'DDP or FSDP2')")
    if not cfg.fsdp and cfg.fsdp_config != FSDPConfig():
        errors.append("fsdp_config: applies with fsdp: true only; set fsdp: true, or remove fsdp_config")
    if cfg.fsdp and cfg.fp16:
        errors.append("fp16, fsdp: fp16 loss scaling over sharded gradients is not supported; use bf16 (no loss "
                      "scaling) with fsdp")
    if isinstance(cfg.lora_target_modules, str) and cfg.lora_target_modules != "all-linear":
        errors.append(f"lora_target_modules: {cfg.lora_target_modules!r} is not allowed; allowed values: "
                      "'all-linear' or a list of module names")
    if cfg.datasets is not None and cfg.test_datasets is not None:
        if not cfg.datasets:
            errors.append("datasets: needs at least one entry {path, type, split}")
        elif not cfg.train_datasets:
            errors.append("datasets: every entry has an eval split; at least one needs split 'train'")
        has_eval = bool(cfg.eval_datasets)
        if has_eval and cfg.val_set_size > 0:
            errors.append("val_set_size: set it to 0 when eval datasets are given (test_datasets or split: eval)")
        if cfg.early_stopping_patience is not None and not (has_eval or cfg.val_set_size > 0):
            errors.append("early_stopping_patience: needs an eval set (val_set_size, test_datasets or split: eval)")
        if cfg.early_stopping_patience is not None and cfg.eval_steps is None:
            errors.append("early_stopping_patience: needs eval_steps")
        for d in [*cfg.datasets, *cfg.test_datasets]:
            name = {"dpo": "DPO", "reward": "a reward model"}.get(cfg.objective, cfg.objective)
            if d is not None and cfg.objective in PREFERENCE_OBJECTIVES and d.type not in PREFERENCE_TYPES:
                errors.append(f"datasets: {name} trains on preference rows; dataset {d.path!r} has type {d.type!r}; "
                              f"allowed for objective {cfg.objective}: {', '.join(map(repr, PREFERENCE_TYPES))}")
            if d is not None and (cfg.objective == "grpo") != (d.type in PROMPT_TYPES):
                errors.append(f"datasets: objective {cfg.objective} and dataset {d.path!r} of type {d.type!r} do not "
                              "go together: GRPO reads prompt rows (type 'prompt'), and only GRPO does")
                continue
            if d is not None and cfg.objective not in PREFERENCE_OBJECTIVES and d.type in PREFERENCE_TYPES:
                errors.append(f"datasets: {d.type!r} rows (dataset {d.path!r}) are for DPO or a reward model; set "
                              "objective: dpo (or rl: dpo) or objective: reward")
            if d is not None and d.type == "chat" and cfg.prompt_template == "alpaca":
                errors.append(f"prompt_template: 'alpaca' cannot format chat rows (dataset {d.path!r}); "
                              "allowed for chat: 'chatml', 'tokenizer_default'")


def check_output_dir(cfg: TrainConfig) -> list[str]:
    """What stops this run from writing into ``cfg.output_dir`` (one run per directory), as error messages.

    The results of another run there (its adapter, a non-empty metrics.jsonl, checkpoints; see
    :func:`.checkpoint.run_outputs`) are never overwritten silently: the run must either continue it
    (``resume_from_checkpoint`` a checkpoint in output_dir, or ``auto_resume_from_checkpoints: true``,
    which sets ``cfg.resume_from_checkpoint`` to the newest one) or replace it
    (``overwrite_output_dir: true``: the trainer deletes those results before it writes anything).
    """
    from .checkpoint import latest_checkpoint, run_outputs

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        return [f"output_dir: {cfg.output_dir!r} exists and is not a directory"]
    if cfg.overwrite_output_dir and cfg.auto_resume_from_checkpoints:
        return ["overwrite_output_dir, auto_resume_from_checkpoints: set at most one of them to true"]
    if cfg.auto_resume_from_checkpoints and cfg.resume_from_checkpoint is None:
        latest = latest_checkpoint(out)
        if latest is not None:
            cfg.resume_from_checkpoint = str(latest)
    resume = cfg.resume_from_checkpoint
    inside = resume is not None and out.exists() and Path(resume).resolve().parent == out.resolve()
    if inside and cfg.overwrite_output_dir:
        return [f"overwrite_output_dir: true would delete {resume!r}, the checkpoint to resume from; set one of them"]
    found = run_outputs(out)
    if not found or inside or cfg.overwrite_output_dir:
        return []
    latest = latest_checkpoint(out)
    go_on = (f"resume_from_checkpoint: {str(latest)!r} (or auto_resume_from_checkpoints: true) to continue it, "
             if latest is not None else "")
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return [f"output_dir: {cfg.output_dir!r} holds the results of another run ({shown}); set {go_on}"
            "overwrite_output_dir: true to replace them, or choose another output_dir"]


def validate(raw: dict[str, Any]) -> TrainConfig:
    """Build an :class:`TrainConfig` from a plain mapping, or raise :class:`ConfigError` listing every problem.

    Aliases (:data:`ALIASES`) are read as our keys first; errors about them name the alias.
    ``output_dir`` is checked last (:func:`check_output_dir`), once everything else is valid.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a YAML mapping of keys to values; got {type(raw).__name__}")
    errors: list[str] = []
    raw, aliases = _canonical(raw, errors)
    build_errors: list[str] = []
    cfg = _build(TrainConfig, raw, "", build_errors)
    typed = not build_errors and not errors  # the cross-field rules below assume every value has its type
    if cfg is not None:
        _check_ranges(cfg, "", build_errors)
        for f in dataclasses.fields(TrainConfig):
            if f.metadata.get("path"):
                _check_path(f.name, getattr(cfg, f.name), f.metadata["path"], build_errors)
        for name in ("datasets", "test_datasets"):
            for i, d in enumerate(getattr(cfg, name) or []):
                if d is not None:
                    _check_path(f"{name}[{i}].path", d.path, "exists", build_errors)
        if typed:
            _check_rules(cfg, build_errors)
    for alias, key in aliases.items():  # name what the user wrote
        build_errors = [re.sub(rf"^{re.escape(key)}(?=[:\[])", f"{alias} (read as {key})", e) for e in build_errors]
    errors += build_errors
    if not errors:
        errors += check_output_dir(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    cfg.aliases = aliases
    return cfg


EXCLUSIVE = {"warmup_steps": "warmup_ratio", "warmup_ratio": "warmup_steps"}  # set one of each pair


def _spellings(key: str) -> list[str]:
    """Our (dotted) key and every alias of it."""
    key = ALIASES.get(key, key)
    return [key, *(a for a, k in ALIASES.items() if k == key)]


def _pop_dotted(raw: dict[str, Any], key: str) -> None:
    *parents, leaf = key.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (dotted keys; list items by index; values parsed as YAML) to ``raw``.

    An override replaces the key whatever name ``raw`` gave it (our key or an alias), and a non-null
    ``warmup_steps`` / ``warmup_ratio`` replaces the other one of the pair, unless the overrides set
    both (then validation reports them).
    """
    given = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. learning_rate=1e-4)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {text!r} as YAML ({e})") from None
        key = key.strip()
        replaced = _spellings(key) + (_spellings(EXCLUSIVE[ALIASES.get(key, key)])
                                      if value is not None and ALIASES.get(key, key) in EXCLUSIVE else [])
        for other in replaced:
            if other != key and other not in given and isinstance(raw, dict):
                _pop_dotted(raw, other)
        parts = key.split(".")
        node: Any = raw
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key}: {part!r} is not an index of the {len(node)}-item list "
                                      f"{'.'.join(parts[:j])}")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:j])} is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (or take ``raw``), apply overrides and validate it. Loads no model.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8 or not YAML, or any key is invalid.
    """
    if raw is None:
        if path is None:
            raise ConfigError("no config: give a YAML path")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"{p}: cannot be read ({e.strerror})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise ConfigError(f"{p}: not UTF-8 (byte 0x{data[e.start]:02x} at line {line}, column {col}); save the "
                              "file as UTF-8") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return validate(apply_overrides(raw, list(overrides or [])))


def dump_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (every key, defaults included) as YAML, after a comment naming the aliases read."""
    with open(path, "w", encoding="utf-8") as f:
        if cfg.aliases:
            f.write("# aliases read: " + ", ".join(f"{a} -> {k}" + (f" ({ALIAS_NOTES[a]})" if a in ALIAS_NOTES else "")
                                                   for a, k in cfg.aliases.items()) + "\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
