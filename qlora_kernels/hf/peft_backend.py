"""This package as a PEFT backend: PEFT's LoRA on an :class:`~qlora_kernels.nn.NF4Linear` runs the fused kernels.

PEFT picks the LoRA layer for a module by the type of its base layer (its bitsandbytes, torchao, ... dispatchers),
and takes third-party layer types through the custom-module registration of a ``LoraConfig``
(``LoraConfig._register_custom_module``). This module registers :class:`NF4LoraLinear` for :class:`NF4Linear` there:

* :class:`LoraConfig` is ``peft.LoraConfig`` with the registration made in ``__post_init__`` (so it survives
  ``dataclasses.replace`` and PEFT's own copies); ``peft.get_peft_model(model, LoraConfig(...))``, TRL's
  ``peft_config=LoraConfig(...)``, ``PeftModel.add_adapter`` all build :class:`NF4LoraLinear` on the 4-bit layers,
  and PEFT's own ``lora.Linear`` on dense ones (``target_modules="all-linear"`` finds both: ``NF4Linear`` is an
  ``nn.Linear``). :meth:`LoraConfig.from_pretrained` reads an ``adapter_config.json`` into one, for
  ``peft.PeftModel.from_pretrained(model, path, config=LoraConfig.from_pretrained(path))``.
* :func:`register_peft_layers` makes the same registration on a ``peft.LoraConfig`` someone else built.
* :func:`as_peft_model` turns a model adapted by :func:`~qlora_kernels.apply_qlora` (or
  :func:`~qlora_kernels.load_adapter`) into that ``PeftModel``, adapters and NF4 bytes carried over as they are: what
  transformers' ``Trainer`` and TRL need to checkpoint adapters, resume from them and use the adapters-disabled
  model as DPO's reference.

Everything else is PEFT's: adapter names, ``set_adapter``, ``disable_adapter()``, ``add_adapter`` / ``load_adapter``,
``save_pretrained`` (``adapter_model.safetensors`` + ``adapter_config.json``), ``merge_and_unload``, ``unload``,
``print_trainable_parameters``; transformers' ``Trainer`` and TRL treat the result as any PeftModel. A plain
``peft.LoraConfig`` without the registration still works on ``NF4Linear`` layers, through PEFT's generic
``lora.Linear`` (our NF4 matmul for the base, PEFT's unfused LoRA term), but cannot merge them.

:data:`PEFT_LAYER_TYPES` is the registration itself (base-layer type -> LoRA layer type), the one place another
4-bit layer type (e.g. MoE experts) is added.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from ..functional import _lora_linear
from ..nn import NF4Linear, QLoraLinear
from ..nn.experts import NF4Experts
from .adapters import adapter_config
from .layers import LORA_TYPES, DenseLoraLinear, dense_layer, is_conv1d, replace_module

__all__ = ["PEFT_LAYER_TYPES", "LoraConfig", "NF4LoraLinear", "as_peft_model", "register_peft_layers"]


class NF4LoraLinear(nn.Module, LoraLayer):
    """PEFT's LoRA layer on an :class:`NF4Linear`: ``y = x @ deq(W)^T + b + Σ_active scaling_a * B_a A_a dropout(x)``.

    Built by PEFT (``config._custom_modules``, see :func:`register_peft_layers`) with PEFT's layout: ``base_layer`` is
    the NF4 layer, ``lora_A`` / ``lora_B`` / ``lora_dropout`` / ``scaling`` are keyed by adapter name, so the state
    dict and the adapter files are PEFT's (``...q_proj.lora_A.default.weight``), the same as PEFT's bitsandbytes
    ``Linear4bit`` writes. The first active adapter runs with the base matmul in one fused forward and backward
    (:func:`qlora_kernels.lora_linear`, dropout included); further active adapters add PEFT's plain LoRA term.

    Merging is exact: :meth:`merge` puts a dense layer ``deq(W) + Σ scaling * B @ A`` (fp32, rounded once to the
    layer's compute dtype; a ``Conv1D`` for a layer that replaced one) in place of the NF4 base, and :meth:`unmerge`
    puts the NF4 base back, unchanged. So ``merge_and_unload()`` turns each adapted layer into a dense one, as
    :func:`qlora_kernels.merge_and_unload` does (PEFT's bitsandbytes layer requantizes instead, which rounds most of a
    LoRA update away: NF4's steps are coarser). Not supported (an error naming the setting): DoRA and the other LoRA
    variants, ``lora_bias``, ``target_parameters`` on an NF4 layer, a base that already has this package's own
    adapters (:class:`QLoraLinear`).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: peft.LoraConfig, r: int = 0,
                 lora_alpha: int = 1, parameter_name: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        if not isinstance(base, NF4Linear) or isinstance(base, QLoraLinear):
            got = type(base).__name__
            hint = (" (it has this package's own adapters: qlora_kernels.hf.as_peft_model(model) makes the model a "
                    "PeftModel of them, or merge_and_unload it first)") if isinstance(
                base, QLoraLinear) else ""
            raise TypeError(f"base_layer must be a qlora_kernels NF4Linear; got {got}{hint}")
        if parameter_name is not None:
            raise ValueError(f"target_parameters is not supported on an NF4Linear; got parameter_name="
                             f"{parameter_name!r} (target the module instead)")
        self.fan_in_fan_out = False  # the NF4 weight is [out, in] whatever layer it replaced (lora_A/B: PEFT's shapes)
        self._nf4_stash: list[NF4Linear] = []  # the NF4 base while merged into a dense layer (not a submodule)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: peft.LoraConfig, **kwargs: Any) -> None:
        for key in ("use_dora", "lora_bias"):
            if getattr(config, key, False):
                raise ValueError(f"{type(self).__name__} does not support {key}=True; got "
                                 f"{key}={getattr(config, key)!r} for adapter {adapter_name!r}")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        base = self.base_layer
        if not active:
            return base(x, *args, **kwargs)
        base._check_input(x)
        first = active[0]
        dropout = self.lora_dropout[first]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        y = _lora_linear(x, base._weight_args(), base.out_features, base.in_features, self.lora_A[first].weight,
                         self.lora_B[first].weight, float(self.scaling[first]), base.bias, p)
        for name in active[1:]:
            lora_a = self.lora_A[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            y = y + (self.lora_B[name](lora_a(self.lora_dropout[name](h))) * self.scaling[name]).to(y.dtype)
        return y

    # -- merging ---------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``scaling * B @ A`` of ``adapter``, ``[out, in]``, in the adapter's dtype (computed in fp32)."""
        return self._delta(adapter).to(self.lora_B[adapter].weight.dtype)

    def _delta(self, adapter: str) -> Tensor:
        a, b = self.lora_A[adapter].weight.detach().float(), self.lora_B[adapter].weight.detach().float()
        return (b @ a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapters (or ``adapter_names``) into a dense copy of the layer, exactly (see the class)."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        with torch.no_grad():
            delta = sum(self._delta(a) for a in adapter_names)
            base = self.get_base_layer()
            if isinstance(base, NF4Linear):
                merged = dense_layer(base, delta=delta)
            else:  # already merged: add to the dense weight (Conv1D stores it [in, out])
                merged = base
                conv = is_conv1d(base)
                w = base.weight.detach().float() + (delta.t() if conv else delta).to(base.weight.device)
                if safe_merge and not bool(torch.isfinite(w).all()):
                    raise ValueError(f"NaNs detected in the merged weights; the adapters {adapter_names} seem broken")
                base.weight.data = w.to(base.weight.dtype)
            if safe_merge and not bool(torch.isfinite(merged.weight).all()):
                raise ValueError(f"NaNs detected in the merged weights; the adapters {adapter_names} seem broken")
            if merged is not base:
                self._nf4_stash = [base]
                self.base_layer = merged
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put the NF4 base back (exactly as it was before :meth:`merge`)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        device = self.base_layer.weight.device
        self.base_layer = self._nf4_stash.pop().to(device)
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


PEFT_LAYER_TYPES: dict[type[nn.Module], type[nn.Module]] = {NF4Linear: NF4LoraLinear}
"""Base-layer type -> PEFT LoRA layer type, as :func:`register_peft_layers` registers them on a LoraConfig."""


def register_peft_layers(config: peft.LoraConfig) -> peft.LoraConfig:
    """Register this package's LoRA layers (:data:`PEFT_LAYER_TYPES`) on ``config`` (PEFT's custom-module
    registration); returns ``config``. TypeError unless it is a ``peft.LoraConfig``."""
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig; got {type(config).__name__}")
    config._register_custom_module(dict(PEFT_LAYER_TYPES))
    return config


class LoraConfig(peft.LoraConfig):
    """``peft.LoraConfig`` whose LoRA layers on :class:`NF4Linear` modules are :class:`NF4LoraLinear` (the fused
    kernels). The same fields, defaults and ``adapter_config.json``; a drop-in for ``from peft import LoraConfig``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        register_peft_layers(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs: Any) -> LoraConfig:
        """Read an adapter directory's ``adapter_config.json`` (as ``peft.LoraConfig.from_pretrained``) into a
        :class:`LoraConfig`. ValueError naming the path when it holds another PEFT method's config."""
        loaded = peft.PeftConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(loaded, peft.LoraConfig):
            raise ValueError(f"{pretrained_model_name_or_path!r} must hold a LoRA adapter config (peft_type 'LORA'); "
                             f"got peft_type {getattr(loaded, 'peft_type', None)!r}")
        fields = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded) if f.init}
        return cls(**fields)


def as_peft_model(model: nn.Module, adapter_name: str = "default") -> peft.PeftModel:
    """The model adapted by :func:`~qlora_kernels.apply_qlora` (or :func:`~qlora_kernels.load_adapter`) as a
    ``peft.PeftModel`` of :class:`LoraConfig`, for transformers' ``Trainer`` and TRL, which checkpoint, resume and
    build DPO's reference model the PEFT way only for a ``PeftModel``.

    In place: each :class:`~qlora_kernels.nn.QLoraLinear` becomes :class:`NF4LoraLinear` on the same NF4 tensors, each
    :class:`~qlora_kernels.hf.DenseLoraLinear` PEFT's ``lora.Linear`` on the same dense layer, and the adapters are
    the layers' own ``lora_A`` / ``lora_B`` parameters (the same tensor objects, dtype and ``requires_grad``: an
    optimizer built on them goes on working), under ``adapter_name``. The config is what :func:`save_adapter` writes
    (:func:`~qlora_kernels.hf.adapters.adapter_config`), so the model computes what it computed, PEFT's
    ``save_pretrained`` writes the tensors :func:`save_adapter` writes, and ``modules_to_save`` become PEFT's (trained
    from their current values). The model's train / eval mode is kept.

    Raises:
        TypeError: ``model`` is already a PEFT model.
        ValueError: no adapted layer; a merged or disabled adapter; layers with different dropouts (PEFT has one
            ``lora_dropout``); LoRA on mixture-of-experts projections (PEFT's ``target_parameters`` needs the dense
            experts: keep those in this package's own loop and :func:`save_adapter`).
    """
    if isinstance(model, peft.PeftModel) or hasattr(model, "peft_config"):
        raise TypeError(f"model is already a PEFT model ({type(model).__name__}); as_peft_model takes the model "
                        f"apply_qlora adapted")
    experts = [n for n, m in model.named_modules() if isinstance(m, NF4Experts) and m.r > 0]
    if experts:
        raise ValueError(f"as_peft_model cannot carry LoRA on mixture-of-experts projections ({experts[:2]}): PEFT's "
                         f"target_parameters works on dense experts only; train these with this package's loop and "
                         f"save them with save_adapter")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}
    cfg = adapter_config(model)  # (raises when there is no adapted layer)
    for what in ("merged", "disable_adapters"):
        bad = [n for n, m in layers.items() if getattr(m, what)]
        if bad:
            raise ValueError(f"as_peft_model needs live adapters; {bad[:3]} have {what}=True (unmerge / enable them "
                             f"first)")
    dropouts = {m.lora_dropout for m in layers.values()}
    if len(dropouts) > 1:
        raise ValueError(f"as_peft_model needs one lora_dropout for all layers (PEFT's LoraConfig has one); the model "
                         f"has {sorted(dropouts)}")
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    config = LoraConfig(**{k: v for k, v in cfg.items() if k in fields and k != "inference_mode"})
    training = model.training
    carried = {}
    for name, m in layers.items():
        carried[name] = (m.lora_A.weight, m.lora_B.weight, m.scaling)
        replace_module(model, name, _base_of(m))
    if hasattr(model, "qlora_modules_to_save"):
        del model.qlora_modules_to_save  # PEFT's modules_to_save from here on (config["modules_to_save"])
    wrapped = peft.get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=False)
    inner = wrapped.get_base_model()
    for name, (a, b, scaling) in carried.items():
        layer = inner.get_submodule(name)
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            raise RuntimeError(f"PEFT put no LoRA layer on {name} ({type(layer).__name__}); please report this")
        if not math.isclose(float(layer.scaling[adapter_name]), float(scaling), rel_tol=1e-12):
            raise RuntimeError(f"{name}: PEFT's scaling {layer.scaling[adapter_name]} differs from the layer's "
                               f"{scaling}; please report this")
        layer.lora_A[adapter_name].weight = a
        layer.lora_B[adapter_name].weight = b
    wrapped.train(training)
    return wrapped


def _base_of(layer: nn.Module) -> nn.Module:
    """The layer under an adapted layer: an :class:`NF4Linear` on a :class:`QLoraLinear`'s NF4 tensors and bias (not
    copied), or a :class:`DenseLoraLinear`'s dense layer."""
    if isinstance(layer, DenseLoraLinear):
        return layer.base_layer
    base = NF4Linear(layer.qweight, None, layer.fan_in_fan_out)
    base.bias = layer.bias
    base.compute_dtype = layer.compute_dtype
    return base
