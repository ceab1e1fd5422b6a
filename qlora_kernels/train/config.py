"""The SFT config: one YAML file with Axolotl-like keys, checked completely before any model loads.

``load_config(path, overrides)`` reads the YAML, applies ``key=value`` overrides (dotted keys,
values parsed as YAML: ``quantization.blocksize=128``, ``datasets.0.path=x.jsonl``,
``lora_target_modules=[q_proj,v_proj]``), and validates every key: an unknown key, a wrong type,
a value outside its allowed set or a missing path raises :class:`ConfigError` naming the key and
what is allowed. All problems are reported at once.

The dataclasses below are the schema: a field's type annotation is its type, its default the
default, and ``metadata`` carries the allowed values (``choices``), path checks (``path``) and
a one-line help.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

DATASET_TYPES = ("alpaca", "completion", "chat", "text", "preference", "hh-rlhf")
PREFERENCE_TYPES = ("preference", "hh-rlhf")  # the row formats of DPO (see train/dpo.py)
DPO_LOSSES = ("sigmoid", "ipo")
EVAL_SPLITS = ("eval", "validation", "test")
PROMPT_TEMPLATES = ("alpaca", "chatml", "tokenizer_default")
OPTIMIZERS = ("paged_adamw", "paged_adamw_8bit", "adamw_torch")
SCHEDULERS = ("cosine", "linear", "constant")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class ConfigError(ValueError):
    """A config problem: names the key, the value found and the values allowed."""


def _f(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, path: str | None = None,
       help: str = "", factory: Any = None) -> Any:
    meta = {"choices": choices, "path": path, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


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
class SFTConfig:
    """Fine-tuning with QLoRA: SFT, or DPO with ``rl: dpo``. See examples/sft_tiny.yaml and examples/dpo_tiny.yaml."""

    base_model: str = _f(path="model_dir", help="local Hugging Face model directory (safetensors)")
    datasets: list[DatasetConfig] = _f(help="list of {path, type, split}")
    test_datasets: list[DatasetConfig] = _f(factory=list, help="datasets used for evaluation only")
    tokenizer_config: str | None = _f(None, path="dir", help="tokenizer directory (default: base_model)")
    trust_remote_code: bool = _f(False, help="allow custom model code from base_model (off by default)")
    rl: str | None = _f(None, choices=("dpo",), help="preference tuning instead of SFT: 'dpo' (Axolotl key)")
    trainer: str | None = _f(None, choices=("sft", "dpo"), help="'sft' or 'dpo' (default: sft, or dpo if rl: dpo)")
    dpo_beta: float = _f(0.1, help="DPO beta: strength of the pull towards the reference model")
    dpo_loss: str = _f("sigmoid", choices=DPO_LOSSES, help="sigmoid (DPO) or ipo")
    dpo_label_smoothing: float = _f(0.0, help="assumed share of flipped preference labels, in [0, 0.5) (sigmoid)")
    precompute_ref_log_probs: bool = _f(False, help="compute the reference log-probs once before training")
    adapter: str = _f("qlora", choices=("qlora",), help="adapter kind (Axolotl key)")
    load_in_4bit: bool = _f(True, choices=(True,), help="Axolotl key; QLoRA always loads in 4 bits")
    quantization: QuantizationConfig = _f(factory=QuantizationConfig, help="{quant_type, double_quant, blocksize}")
    lora_r: int = _f(16, help="LoRA rank")
    lora_alpha: float = _f(16, help="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, help="dropout on the LoRA input, in [0, 1)")
    lora_target_modules: Union[str, list[str]] = _f("all-linear", help="'all-linear' or a list of module names")
    peft_use_rslora: bool = _f(False, help="rank-stabilized scale alpha / sqrt(r)")
    prompt_template: str | None = _f(None, choices=PROMPT_TEMPLATES, help="default: alpaca for alpaca rows, "
                                     "chatml for chat rows")
    train_on_inputs: bool = _f(False, help="also train on prompt tokens")
    sequence_len: int = _f(2048, help="tokens per example; longer ones are truncated and counted")
    skip_bad_rows: bool = _f(False, help="skip (and count) malformed rows instead of failing")
    val_set_size: float = _f(0.0, help="fraction (<1) or number (>=1) of train rows held out for eval")
    micro_batch_size: int = _f(1, help="examples per forward pass")
    eval_batch_size: int | None = _f(None, help="examples per eval forward pass (default: micro_batch_size)")
    gradient_accumulation_steps: int = _f(1, help="micro-batches per optimizer step")
    num_epochs: float = _f(1.0, help="passes over the train rows (ignored when max_steps is set)")
    max_steps: int | None = _f(None, help="optimizer steps (overrides num_epochs)")
    learning_rate: float = _f(2e-4, help="peak learning rate")
    lr_scheduler: str = _f("cosine", choices=SCHEDULERS, help="decay after warmup")
    warmup_steps: int | None = _f(None, help="linear warmup steps")
    warmup_ratio: float | None = _f(None, help="warmup as a fraction of the total steps")
    optimizer: str = _f("paged_adamw", choices=OPTIMIZERS, help="optimizer of the LoRA parameters")
    weight_decay: float = _f(0.0, help="decoupled weight decay")
    adam_beta1: float = _f(0.9, help="AdamW beta1")
    adam_beta2: float = _f(0.999, help="AdamW beta2")
    adam_epsilon: float = _f(1e-8, help="AdamW epsilon")
    max_grad_norm: float | None = _f(1.0, help="gradient clipping norm (null: no clipping)")
    gradient_checkpointing: bool = _f(False, help="recompute activations in backward")
    bf16: Union[bool, Literal["auto"]] = _f("auto", choices=(True, False, "auto"),
                                            help="bf16 autocast: auto = on for CUDA devices that support it")
    fp16: bool = _f(False, help="fp16 autocast with loss scaling (CUDA only)")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    eval_steps: int | None = _f(None, help="evaluate every N steps (and at the end)")
    early_stopping_patience: int | None = _f(None, help="stop after N evaluations without a better eval loss")
    save_steps: int | None = _f(None, help="checkpoint every N steps")
    save_total_limit: int | None = _f(None, help="keep only the newest N checkpoints")
    logging_steps: int = _f(1, help="write metrics every N steps")
    loss_chunk_size: int | None = _f(None, help="tokens per chunk of the chunked cross-entropy (default: auto)")
    output_dir: str = _f("outputs/sft", help="adapter, checkpoints, metrics.jsonl, loss.png")
    seed: int = _f(42, help="seed of initialization, shuffling and dropout")
    resume_from_checkpoint: str | None = _f(None, path="checkpoint", help="checkpoint directory to resume from")
    progress_bar: bool = _f(True, help="show a tqdm progress bar")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every key (defaults included), as written to ``output_dir/config.yaml``."""
        return dataclasses.asdict(self)

    @property
    def is_dpo(self) -> bool:
        """True for preference tuning (``rl: dpo`` or ``trainer: dpo``)."""
        return self.rl == "dpo" or self.trainer == "dpo"

    @property
    def train_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.split == "train"]

    @property
    def eval_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.split != "train"] + list(self.test_datasets)


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
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
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append(f"{prefix}{k}: unknown key{hint} (allowed keys: {', '.join(fields)})")
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


def _check_rules(cfg: SFTConfig, errors: list[str]) -> None:
    positive = ("lora_r", "sequence_len", "micro_batch_size", "gradient_accumulation_steps", "logging_steps")
    for name in positive:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            errors.append(f"{name}: must be >= 1, got {getattr(cfg, name)}")
    optional_positive = ("max_steps", "eval_steps", "save_steps", "save_total_limit", "early_stopping_patience",
                         "loss_chunk_size", "eval_batch_size")
    for name in optional_positive:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            errors.append(f"{name}: must be >= 1 or null, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        errors.append(f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.learning_rate <= 0:
        errors.append(f"learning_rate: must be > 0, got {cfg.learning_rate}")
    if cfg.num_epochs <= 0 and cfg.max_steps is None:
        errors.append(f"num_epochs: must be > 0 (or set max_steps), got {cfg.num_epochs}")
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        errors.append("warmup_steps, warmup_ratio: set one of them, not both")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        errors.append(f"warmup_steps: must be >= 0, got {cfg.warmup_steps}")
    if cfg.warmup_ratio is not None and not 0.0 <= cfg.warmup_ratio < 1.0:
        errors.append(f"warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.val_set_size < 0:
        errors.append(f"val_set_size: must be >= 0, got {cfg.val_set_size}")
    if cfg.rl == "dpo" and cfg.trainer == "sft":
        errors.append("rl, trainer: rl: dpo contradicts trainer: sft; set one of them")
    if cfg.dpo_beta <= 0:
        errors.append(f"dpo_beta: must be > 0, got {cfg.dpo_beta}")
    if not 0.0 <= cfg.dpo_label_smoothing < 0.5:
        errors.append(f"dpo_label_smoothing: must be in [0, 0.5), got {cfg.dpo_label_smoothing}")
    if cfg.dpo_label_smoothing > 0 and cfg.dpo_loss != "sigmoid":
        errors.append(f"dpo_label_smoothing: applies to dpo_loss 'sigmoid' only, not {cfg.dpo_loss!r}")
    if cfg.bf16 is True and cfg.fp16:
        errors.append("bf16, fp16: set at most one of them to true")
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
            if d is not None and cfg.is_dpo and d.type not in PREFERENCE_TYPES:
                errors.append(f"datasets: DPO trains on preference rows; dataset {d.path!r} has type {d.type!r}; "
                              f"allowed for DPO: {', '.join(map(repr, PREFERENCE_TYPES))}")
            if d is not None and not cfg.is_dpo and d.type in PREFERENCE_TYPES:
                errors.append(f"datasets: {d.type!r} rows (dataset {d.path!r}) are for DPO; set rl: dpo")
            if d is not None and d.type == "chat" and cfg.prompt_template == "alpaca":
                errors.append(f"prompt_template: 'alpaca' cannot format chat rows (dataset {d.path!r}); "
                              "allowed for chat: 'chatml', 'tokenizer_default'")


def validate(raw: dict[str, Any]) -> SFTConfig:
    """Build an :class:`SFTConfig` from a plain mapping, or raise :class:`ConfigError` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a YAML mapping of keys to values; got {type(raw).__name__}")
    errors: list[str] = []
    cfg = _build(SFTConfig, raw, "", errors)
    typed = not errors  # the cross-field rules below assume every value has its type
    if cfg is not None:
        for f in dataclasses.fields(SFTConfig):
            if f.metadata.get("path"):
                _check_path(f.name, getattr(cfg, f.name), f.metadata["path"], errors)
        for name in ("datasets", "test_datasets"):
            for i, d in enumerate(getattr(cfg, name) or []):
                if d is not None:
                    _check_path(f"{name}[{i}].path", d.path, "exists", errors)
        if typed:
            _check_rules(cfg, errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (dotted keys; list items by index; values parsed as YAML) to ``raw``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. learning_rate=1e-4)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {text!r} as YAML ({e})") from None
        parts = key.strip().split(".")
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
                raw: dict[str, Any] | None = None) -> SFTConfig:
    """Read a YAML config (or take ``raw``), apply overrides and validate it. Loads no model."""
    if raw is None:
        if path is None:
            raise ConfigError("no config: give a YAML path")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        with open(p, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return validate(apply_overrides(raw, list(overrides or [])))


def dump_config(cfg: SFTConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
