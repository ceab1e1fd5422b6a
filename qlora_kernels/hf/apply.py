"""LoRA on a model: :func:`apply_qlora` swaps its linear layers for adapted ones, :func:`adapters_disabled` turns
the adapters off for a block, :func:`merge_and_unload` turns every adapted or 4-bit layer back into a dense one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .. import bnb_format
from ..dtypes import FLOAT_DTYPES
from ..nf4 import quantize_nf4
from ..nn import NF4Linear, QLoraLinear
from ..nn.experts import NF4Experts
from ..nn.lora_args import check_lora_args
from . import experts as moe
from .layers import (
    KEEP_DENSE,
    LORA_TYPES,
    DenseLoraLinear,
    check_spec,
    dense_layer,
    is_qlora_kernels_quantized,
    linear_modules,
    matches,
    output_embedding_names,
    replace_module,
)
from .loading import record_bnb4_config

# ---------------------------------------------------------------------------------------------
# apply_qlora


def make_lora(module: nn.Module, kind: str, name: str, *, r: int, lora_alpha: float, lora_dropout: float,
              use_rslora: bool, blocksize: int, double_quant: bool, lora_dtype: torch.dtype) -> nn.Module:
    """The adapted layer for ``module``: a QLoraLinear on its 4-bit weight or on its weight quantized here, or a
    DenseLoraLinear when a 4-bit loader kept it dense."""
    lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, lora_dtype=lora_dtype)
    if kind == "nf4":
        return QLoraLinear.from_nf4(module, **lora)
    if kind == "bnb4":
        return QLoraLinear.from_bnb(module, **lora)
    weight = module.weight
    if weight.device.type == "meta":
        raise ValueError(f"{name}.weight is on the meta device: load the weights first (or use load_4bit_model)")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.weight must be float32, float16 or bfloat16; got {weight.dtype}")
    if getattr(module, KEEP_DENSE, False):
        return DenseLoraLinear(module, **lora)
    if kind == "conv1d":  # GPT-2: weight [in, out], y = x @ W + b
        qw = quantize_nf4(weight.detach().t(), blocksize=blocksize, double_quant=double_quant)
        bias = None if module.bias is None else module.bias.detach()
        return QLoraLinear(qw, bias, fan_in_fan_out=True, **lora)
    return QLoraLinear.from_linear(module, blocksize=blocksize, double_quant=double_quant, **lora)


def _select(model: nn.Module, target_modules, exclude_modules) -> list[tuple[str, nn.Module, str]]:
    outputs = output_embedding_names(model)
    chosen, available = [], []
    for name, module, kind in linear_modules(model):
        available.append(name)
        if exclude_modules is not None and matches(name, exclude_modules):
            continue
        if target_modules == "all-linear":
            if name in outputs:
                continue
        elif not matches(name, target_modules):
            continue
        if kind in ("qlora", "lora"):
            raise ValueError(f"{name} already has LoRA adapters ({type(module).__name__}); call merge_and_unload "
                             f"first, or load_adapter to replace their weights")
        if kind == "other-linear":
            raise TypeError(f"{name} is a {type(module).__module__}.{type(module).__name__}, which apply_qlora cannot "
                            f"convert (supported: nn.Linear, Conv1D, bitsandbytes Linear4bit nf4, NF4Linear)")
        chosen.append((name, module, kind))
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in available})
        raise ValueError(
            f"target_modules={target_modules!r} matched no linear layer of {type(model).__name__}"
            + (f" (exclude_modules={exclude_modules!r})" if exclude_modules is not None else "")
            + f"; its linear layers are named {leaves} (e.g. {available[:3]})"
        )
    return chosen


def adopt_bnb4_layout(model: nn.Module) -> bool:
    """On a transformers 4-bit model (bitsandbytes', or this package's ``QLoraKernelsConfig``), mark every dense linear
    layer as kept dense (transformers left it dense: ``llm_int8_skip_modules``, the output embedding, nn.Linear
    subclasses bitsandbytes does not convert such as FalconLinear). Returns whether the model is such a model."""
    if not (bnb_format.is_transformers_bnb4(model) or is_qlora_kernels_quantized(model)):
        return False
    for _, module, kind in linear_modules(model):
        if kind in ("linear", "conv1d"):
            setattr(module, KEEP_DENSE, True)
    return True


def drop_bnb4_state(model: nn.Module) -> None:
    """After the swap on a transformers bitsandbytes 4-bit model: its remaining (untargeted) nf4 ``Linear4bit``
    layers become :class:`NF4Linear` on the same bytes, and once no bitsandbytes module is left, transformers'
    quantization state goes as well (``hf_quantizer``, ``is_quantized``, ``quantization_method``,
    ``is_loaded_in_4bit``, ``config.quantization_config``), as after :func:`load_4bit_model`: the model holds this
    package's 4-bit layers, which transformers' Trainer trains like any model with trainable adapters."""
    for name, module, kind in list(linear_modules(model)):
        if kind == "bnb4" and bnb_format.linear4bit_quant_type(module) == "nf4":
            replace_module(model, name, NF4Linear.from_bnb(module))
    if not any(bnb_format.is_bnb_module(m) for m in model.modules()):
        bnb_format.drop_transformers_quantization(model)
        record_bnb4_config(model)  # what save_pretrained then writes: bitsandbytes' description of the NF4 layers
    # else still quantized by bitsandbytes (8-bit or fp4 layers): the state stays true


def apply_qlora(
    model: nn.Module,
    r: int = 16,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    use_rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    exclude_modules: str | Sequence[str] | None = None,
    lora_dtype: torch.dtype = torch.float32,
    target_parameters: Sequence[str] | None = None,
    quantize_experts: bool = True,
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Replace the targeted linear layers of ``model`` by :class:`~qlora_kernels.nn.QLoraLinear`, in place.

    Full-precision layers (``nn.Linear``, GPT-2's ``Conv1D``) are quantized to NF4 as they are swapped, one at a
    time; 4-bit layers (bitsandbytes ``Linear4bit`` nf4, :class:`NF4Linear` from :func:`load_4bit_model`) get
    adapters on their stored NF4 tensors, never requantized. Dense layers of a 4-bit model (those a 4-bit loader
    kept dense, see :mod:`qlora_kernels.hf.layers`) are not quantized: they get plain LoRA (:class:`DenseLoraLinear`).
    Then every parameter of the model is frozen except the new ``lora_A`` / ``lora_B``.

    On a transformers bitsandbytes 4-bit model (``from_pretrained(quantization_config=BitsAndBytesConfig(...))``)
    the untargeted nf4 ``Linear4bit`` layers become :class:`NF4Linear` on the same bytes (no adapters, nothing
    requantized), and once no bitsandbytes layer is left (at once for a ``QLoraKernelsConfig`` model, whose layers are
    this package's) the model's transformers quantization state
    (``hf_quantizer``, ``is_quantized``, ``quantization_method``, ``is_loaded_in_4bit``) is removed, as
    :func:`load_4bit_model` returns models: transformers' Trainer then trains it (it refuses models it believes are
    "purely quantized"). ``config.quantization_config`` then holds bitsandbytes' description of the NF4 layers
    (:func:`~qlora_kernels.hf.loading.record_bnb4_config`): ``save_pretrained`` writes a checkpoint transformers
    reloads in 4 bits.

    Args:
        model: a ``transformers`` model (any ``nn.Module`` works).
        r, lora_alpha, lora_dropout, use_rslora: the LoRA hyper-parameters (see :class:`QLoraLinear`).
        target_modules: ``"all-linear"`` (every linear layer but the output embedding / lm_head), a list of
            names (an entry matches a module's full name or its last components, e.g. ``"q_proj"``) or a
            regex matched against the full name (PEFT's rules).
        blocksize, double_quant: NF4 settings for layers quantized here.
        exclude_modules: names (list, same rule) or a regex of layers to leave alone.
        lora_dtype: the adapters' dtype (fp32 by default, as PEFT keeps them under a bf16 base).
        quantize_experts: put :class:`~qlora_kernels.nn.experts.NF4Experts` in place of the fused experts of a
            mixture-of-experts model (transformers 5's ``experts.gate_up_proj`` / ``experts.down_proj``, most of its
            weights; bitsandbytes leaves them dense), frozen; the routers stay dense.
        target_parameters: PEFT's name for LoRA on parameters: expert projections to train (full names, or the
            names' last components such as ``"mlp.experts.gate_up_proj"``), LoRA per expert with ``r`` and
            ``lora_alpha``; saved in PEFT's ``target_parameters`` format by :func:`save_adapter`.
        modules_to_save: PEFT's name for modules trained whole besides the adapters, e.g. ``["score"]``, the head
            of a reward model (names, or last components, of dense modules; never adapted). Their parameters are
            cast to ``lora_dtype`` and stay trainable; :func:`save_adapter` writes them as PEFT does (PEFT
            reloads them as its ``modules_to_save``). The full names are kept in
            ``model.qlora_modules_to_save``.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: r <= 0, a bad alpha or dropout, no layer matched (the message lists the linear layers' names),
            or a matched layer that already has adapters. TypeError: a bad ``target_modules`` or an unsupported
            layer type.
    """
    check_lora_args(r, lora_alpha, lora_dropout)
    check_spec(target_modules, "target_modules")
    check_spec(exclude_modules, "exclude_modules", allow_none=True)
    if hasattr(model, "peft_config"):
        raise TypeError("model is a PEFT model; apply_qlora takes the plain transformers model")
    if target_parameters is not None:
        check_spec(list(target_parameters), "target_parameters")
    saved = _modules_to_save(model, modules_to_save)  # (checked before anything changes)
    chosen = [c for c in _select(model, target_modules, exclude_modules)
              if not any(c[0] == n or c[0].startswith(n + ".") for n in saved)]
    expert_targets = moe.targeted(model, target_parameters) if target_parameters is not None else {}
    if target_parameters is not None and not expert_targets:
        found = [f"{n}.{p}" for n, _ in moe.experts_modules(model) for p in moe.PROJECTIONS]
        raise ValueError(f"target_parameters={list(target_parameters)!r} matched no experts parameter of "
                         f"{type(model).__name__} (its experts parameters: {found[:4] or 'none'})")
    if expert_targets and not quantize_experts:
        raise ValueError("target_parameters needs quantize_experts=True: LoRA on experts runs on NF4Experts (for LoRA "
                         "on dense experts use PEFT's target_parameters on the dense model)")
    bnb4 = adopt_bnb4_layout(model)
    for name, module, kind in chosen:
        layer = make_lora(module, kind, name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          use_rslora=use_rslora, blocksize=blocksize, double_quant=double_quant,
                          lora_dtype=lora_dtype)
        replace_module(model, name, layer)
    if quantize_experts:
        moe.quantize_experts(model, blocksize=blocksize, double_quant=double_quant)
    moe.save_experts_fused(model)
    for name, projections in expert_targets.items():
        model.get_submodule(name).add_lora(r, lora_alpha, lora_dropout, use_rslora, lora_dtype, projections)
    if bnb4:
        drop_bnb4_state(model)
    train_whole(model, saved, lora_dtype)
    freeze_all_but_lora(model)
    if not any(bnb_format.is_bnb_module(m) for m in model.modules()):
        record_bnb4_config(model)
    return model


def train_whole(model: nn.Module, modules_to_save: Sequence[str] | None, dtype: torch.dtype = torch.float32
                ) -> list[str]:
    """Make ``modules_to_save`` (names or last components of dense modules, see :func:`apply_qlora`) trained whole:
    cast to ``dtype``, trainable, and recorded in ``model.qlora_modules_to_save`` (which :func:`save_adapter`
    writes and :func:`freeze_all_but_lora` keeps trainable). Returns their full names.

    Raises:
        ValueError, TypeError: as :func:`apply_qlora` for ``modules_to_save``.
    """
    saved = _modules_to_save(model, modules_to_save)
    for name in saved:
        model.get_submodule(name).to(dtype).requires_grad_(True)
    if saved:
        model.qlora_modules_to_save = tuple(dict.fromkeys((*getattr(model, "qlora_modules_to_save", ()), *saved)))
    return saved


def _modules_to_save(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """The full names of the ``modules_to_save`` entries (each a full name or last components of a module with
    parameters, not a 4-bit or adapted layer); raises naming an entry that matches nothing."""
    if names is None:
        return []
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"modules_to_save must be a list of module names; got {names!r}")
    out = []
    for want in names:
        found = [n for n, m in model.named_modules() if n and matches(n, [want]) and any(True for _ in m.parameters())]
        found = [n for n in found if not any(n.startswith(f + ".") for f in found)]
        if not found:
            raise ValueError(f"modules_to_save: {want!r} matches no module with parameters of {type(model).__name__}")
        for n in found:
            if isinstance(model.get_submodule(n), (NF4Linear, *LORA_TYPES, NF4Experts)):
                raise ValueError(f"modules_to_save: {n} is a 4-bit or adapted layer; only dense modules are trained "
                                 "whole")
        out += found
    return list(dict.fromkeys(out))


def freeze_all_but_lora(model: nn.Module, trainable: bool = True) -> None:
    """Freeze every parameter but the adapters and the ``modules_to_save`` (:func:`apply_qlora`); ``trainable=False``
    freezes those too."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in getattr(model, "qlora_modules_to_save", ()):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(trainable)
    for m in model.modules():
        if isinstance(m, LORA_TYPES):
            m.lora_A.weight.requires_grad_(trainable)
            m.lora_B.weight.requires_grad_(trainable)
        elif isinstance(m, NF4Experts):
            for p in [*m.lora_A.values(), *m.lora_B.values()]:
                p.requires_grad_(trainable)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every adapted layer of ``model`` (:class:`QLoraLinear`, :class:`DenseLoraLinear`) computes
    its base layer only (e.g. DPO's reference model); the previous state is restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, (*LORA_TYPES, NF4Experts))]
    before = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.disable_adapters = True
        yield model
    finally:
        for m, b in zip(layers, before):
            m.disable_adapters = b


# ---------------------------------------------------------------------------------------------
# merge_and_unload


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`QLoraLinear` by a plain ``nn.Linear`` with weight ``deq(W) + scaling * B @ A``
    (and every :class:`NF4Linear` by one with ``deq(W)``), in place; layers that came from GPT-2's ``Conv1D``
    become ``Conv1D`` again, and a :class:`DenseLoraLinear` becomes its base layer with ``W + scaling * B @ A``.
    The merge is computed in fp32 and rounded to ``dtype``; by default each layer's compute dtype: the dtype
    the model computes in (an NF4 layer's ``compute_dtype``, set by :func:`load_4bit_model` and by dtype casts of
    the model, else the dtype its weight was quantized from; a dense layer's own dtype), so the merged model
    runs as it did. The result is a plain transformers model: ``save_pretrained`` writes an ordinary checkpoint
    (any ``quantization_config`` is dropped from ``model.config``). Returns ``model``.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be None, float32, float16 or bfloat16; got {dtype}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (NF4Linear, DenseLoraLinear,
                                                                                NF4Experts))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QLoraLinear / DenseLoraLinear / NF4Linear layers to merge")
    for name, m in layers:
        if isinstance(m, NF4Experts):
            replace_module(model, name, moe.dense_experts(m, dtype))
            continue
        if isinstance(m, DenseLoraLinear):
            replace_module(model, name, m.merged_layer(dtype))
            continue
        replace_module(model, name, dense_layer(m, dtype))
    if is_qlora_kernels_quantized(model) and not any(isinstance(m, (NF4Linear, NF4Experts)) for m in model.modules()):
        bnb_format.drop_transformers_quantization(model)  # no 4-bit layer left: a plain model (hf_quantizer goes too)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    return model
