"""What the training loop builds from a config: device, autocast dtype, tokenizer, model, optimizer, schedule.

Each is a function of the config alone (plus the device), the same for every objective. The model is
``base_model`` in NF4 with LoRA adapters (:func:`qlora_kernels.load_4bit_model` + :func:`qlora_kernels.apply_qlora`),
the optimizer AdamW over the adapters (torch's or :class:`qlora_kernels.PagedAdamW`), the schedule
transformers' warmup + decay.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kernels import PagedAdamW, apply_qlora, load_4bit_model, save_adapter
from qlora_kernels.hf.loading import BlockHook
from qlora_kernels.nn.fused_mlp import fuse_qlora_mlps

from .config import TrainConfig
from .objectives import objective_class
from .offload import ActivationOffloader


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, missing component, incompatible checkpoint)."""


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The configured device (``auto``: CUDA if torch sees one, else the CPU)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device: 'cuda' was asked for but torch sees no CUDA device")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA devices with bf16 (``bf16: auto``), fp16 if asked, else None (fp32).

    On a CPU ``auto`` means fp32: CPU bf16 matmuls are slower than fp32 on most CPUs. ``bf16: true``
    forces CPU bf16 autocast.
    """
    if cfg.fp16:
        if device.type != "cuda":
            raise TrainingError("fp16: true needs a CUDA device (fp16 autocast with loss scaling)")
        return torch.float16
    if cfg.bf16 is True:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError("bf16: true but this CUDA device has no bf16 support; use fp16: true")
        return torch.bfloat16
    if cfg.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp`` on ``device``'s type; no autocast (fp32) when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) inside the block; its training mode comes back after, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer of ``tokenizer_config`` (default: ``base_model``), with a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_config or cfg.base_model, local_files_only=True,
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: TrainConfig, device: torch.device, block_hook: BlockHook | None = None) -> nn.Module:
    """``base_model`` with its linear layers in NF4 (``load_4bit_model``; ``block_hook``: see
    :class:`~qlora_kernels.hf.loading.BlockHook`), no adapters yet; as the objective's model class (a reward model:
    a sequence classifier with a new ``score`` head, :meth:`.objectives.base.Objective.model_kwargs`).

    The frozen parts (embeddings, norms, lm_head) are kept in bf16/fp16 when training under that
    autocast dtype, else fp32. Seeds torch with ``cfg.seed`` first, so the adapters added next
    (:func:`lora_kwargs`) initialize reproducibly.
    """
    torch.manual_seed(cfg.seed)
    amp = autocast_dtype(cfg, device)
    q = cfg.quantization
    return load_4bit_model(cfg.base_model, dtype=amp or torch.float32, device=device, blocksize=q.blocksize,
                           double_quant=q.double_quant, trust_remote_code=cfg.trust_remote_code, block_hook=block_hook,
                           **objective_class(cfg.objective).model_kwargs())


def lora_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The keywords of ``apply_qlora`` a config sets, all but ``target_modules``."""
    q = cfg.quantization
    return dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.peft_use_rslora,
                blocksize=q.blocksize, double_quant=q.double_quant)


def build_model(cfg: TrainConfig, device: torch.device | None = None) -> nn.Module:
    """Load ``base_model`` with its linear layers in NF4 (:func:`load_base_model`) and add trainable LoRA
    adapters (``apply_qlora``, fp32), and train the objective's ``modules_to_save`` whole (a reward model's head)."""
    device = device or resolve_device(cfg)
    model = load_base_model(cfg, device)
    saved = objective_class(cfg.objective).modules_to_save
    apply_qlora(model, target_modules=cfg.lora_target_modules, modules_to_save=list(saved) or None, **lora_kwargs(cfg))
    return model.to(device)


def memory_mode(cfg: TrainConfig) -> tuple[bool, bool]:
    """``(recompute, offload)`` of a config's ``gradient_checkpointing`` and ``activation_offloading``:

    ============================  ======================  ==========  ==============================================
    gradient_checkpointing        activation_offloading   recompute   moved to host memory (and back for backward)
    ============================  ======================  ==========  ==============================================
    false (default)               false (default)         no          nothing
    true                          false                   each layer  nothing (the layer inputs stay on the device)
    false                         true                    no          every activation the decoder saves
    true, or offload              true, or either         each layer  the layer inputs (the checkpoints)
    ============================  ======================  ==========  ==============================================

    (``fsdp_config.activation_checkpointing: true`` counts as ``gradient_checkpointing: true``.)
    """
    recompute = cfg.gradient_checkpointing in (True, "offload") or cfg.fsdp_config.activation_checkpointing
    return recompute, cfg.gradient_checkpointing == "offload" or cfg.activation_offloading


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model: ``activation_checkpointing_enable``, or its
    older name ``gradient_checkpointing_enable`` (deprecated by transformers 5) where a model has only that."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_model(cfg: TrainConfig, model: nn.Module, device: torch.device, sharded: bool = False) -> tuple[
        nn.Module, ActivationOffloader | None, list[str]]:
    """Make a built (or given) QLoRA model ready to train: on ``device``; the fused MLPs (``fused_mlp``,
    :func:`qlora_kernels.nn.fused_mlp.fuse_qlora_mlps`, on the instance); gradient checkpointing (non-reentrant) and
    activation offloading as :func:`memory_mode` says (:class:`.offload.ActivationOffloader`); no KV cache.
    ``sharded``: a model sharded by :mod:`.fsdp`, already on its device with its MLPs fused block by block.

    Returns ``(model, the offloader or None, what to report)``.
    """
    notes: list[str] = []
    if not sharded:
        model.to(device)
    if cfg.fused_mlp and not sharded:
        n = fuse_qlora_mlps(model)
        notes.append(f"fused_mlp: {n} MLPs run as one fused QLoRA Function" + (
            " (they fall back to the three layers while lora_dropout > 0 trains)" if n and cfg.lora_dropout > 0 else "")
            if n else "fused_mlp: no MLP of this model can be fused (Llama/Mistral/Qwen2/Qwen3 MLPs with SiLU and "
            "QLoRA projections); it runs unfused")
    recompute, offload = memory_mode(cfg)
    if recompute:
        enable_checkpointing(model)
    offloader = None
    if offload:
        offloader = ActivationOffloader(device).attach(model)
        where = ("pinned host memory, copied on a side stream" if device.type == "cuda"
                 else "a host store (on the CPU a second copy: the same code path, no memory saved)")
        notes.append(f"activation offloading: {'the layer inputs (checkpoints)' if recompute else 'the activations'} "
                     f"the decoder saves for backward go to {where} and come back for the backward"
                     + ("; each layer is recomputed" if recompute else "; nothing is recomputed"))
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model, offloader, notes


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over ``params``: torch's (``adamw_torch``) or qlora_kernels' PagedAdamW (32- or 8-bit states)."""
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
              weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    return PagedAdamW(params, state_bits=8 if cfg.optimizer == "paged_adamw_8bit" else 32, **kw)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step ``step`` of ``total``.

    transformers' convention (``get_cosine_schedule_with_warmup``, ``get_linear_schedule_with_warmup``,
    ``get_constant_schedule_with_warmup``), so that runs compare with TRL / HF Trainer step by step:
    linear warmup ``step / warmup`` (the first step runs at lr 0) reaches the peak at step ``warmup``;
    then ``cosine`` / ``linear`` decay towards 0 over the remaining steps, or ``constant`` stays at the peak.
    """
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """``warmup_steps``, or ``warmup_ratio`` of the total rounded up (as transformers' TrainingArguments does)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil((cfg.warmup_ratio or 0.0) * total_steps)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """A ``LambdaLR`` over :func:`lr_factor` (warmup from :func:`warmup_steps`)."""
    warmup = warmup_steps(cfg, total_steps)
    kind = cfg.lr_scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, kind))


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``num_epochs`` of micro-batches over the accumulation."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * micro_batches_per_epoch / cfg.gradient_accumulation_steps))


def adapter_saver(model: nn.Module) -> Callable[[nn.Module, Path], None]:
    """How to write this model's adapter in PEFT format: a PEFT model's own method, else ``qk.save_adapter``."""
    if hasattr(model, "peft_config") and hasattr(model, "save_pretrained"):
        return lambda m, d: m.save_pretrained(str(d))
    return lambda m, d: save_adapter(m, str(d))
