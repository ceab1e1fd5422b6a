"""Mixture-of-experts layers of transformers models: finding their fused experts, putting
:class:`~qlora_kernels.nn.experts.NF4Experts` in their place, their LoRA in PEFT's ``target_parameters``
format, and merging them back.

transformers 5 keeps a MoE layer's experts in one module with two 3-D parameters, ``gate_up_proj
[E, 2I, H]`` and ``down_proj [E, H, I]`` (Mixtral, Qwen2-MoE, Qwen3-MoE, ...); the router is a separate
module and stays dense. PEFT trains LoRA on such parameters with ``target_parameters`` (its
``ParamWrapper``): per parameter ``lora_A [r*E, in]`` and ``lora_B [out, r*E]``, expert e's factors being
``A.reshape(E, r, in)[e]`` and ``B.reshape(out, r, E)[:, :, e]``, with the delta ``s B_e A_e`` on the
``[out, in]`` matrix of expert e. When both parameters of one module are targeted PEFT nests two wrappers:
in the adapter file ``gate_up_proj``'s tensors are under ``<module>.base_layer.lora_A.weight`` and
``down_proj``'s under ``<module>.lora_A.weight`` (with one, directly under ``<module>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nf4 import NF4Weight
from ..nn.experts import PROJECTIONS, NF4Experts
from .layers import matches, replace_module


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers fused-experts module: 3-D ``gate_up_proj`` and ``down_proj`` and an ``act_fn``."""
    if isinstance(module, NF4Experts):
        return False
    return all(isinstance(getattr(module, n, None), Tensor) and getattr(module, n).dim() == 3 for n in PROJECTIONS) \
        and isinstance(getattr(module, "act_fn", None), nn.Module)


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fused-experts module of ``model``, dense or :class:`NF4Experts`."""
    return [(n, m) for n, m in model.named_modules() if n and (isinstance(m, NF4Experts) or is_fused_experts(m))]


def nf4_experts(dense: nn.Module, weights: Sequence[NF4Weight] | None = None, blocksize: int = 64,
                double_quant: bool = True) -> NF4Experts:
    """The :class:`NF4Experts` for a fused-experts module: on ``weights`` (gate_up_proj, down_proj) when given,
    else its own parameters quantized. The dense module is kept on the meta device (no storage) as the
    template that :func:`dense_experts` fills back in."""
    if weights is None:
        out = NF4Experts.from_experts(dense, blocksize=blocksize, double_quant=double_quant)
    else:
        out = NF4Experts(weights[0], weights[1], dense.act_fn)
    object.__setattr__(out, "_dense_template", dense.to("meta"))  # not a child: no second set of names
    return out


def quantize_experts(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> int:
    """Put an :class:`NF4Experts` in place of every dense fused-experts module of ``model`` (on the instance);
    returns how many."""
    count = 0
    for name, module in experts_modules(model):
        if isinstance(module, NF4Experts):
            continue
        if any(getattr(module, n).device.type == "meta" for n in PROJECTIONS):
            raise ValueError(f"{name} is on the meta device: load the weights first (or use load_4bit_model)")
        replace_module(model, name, nf4_experts(module, blocksize=blocksize, double_quant=double_quant))
        count += 1
    return count


def save_experts_fused(model: nn.Module) -> None:
    """Make ``save_pretrained`` write a model's :class:`NF4Experts` as they are held (fused, NF4, bitsandbytes' keys
    of each 3-D tensor) instead of failing: transformers reverts its load-time conversions on save, and its
    per-expert split of the fused tensors cannot run on packed NF4 codes. So the model's ``_weight_conversions``
    (the list ``save_pretrained`` reverts; transformers' mapping for the model class when it has none) lose the
    converters that build the experts tensors; renamings stay. :func:`~qlora_kernels.load_4bit_model` and
    ``QLoraKernelsConfig`` read the result as stored. Nothing happens to a model without NF4 experts."""
    if not any(isinstance(m, NF4Experts) for m in model.modules()) or not hasattr(model, "config"):
        return
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange
        except ImportError:
            return
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]  # (as transformers does for a model it did not load)
    model._weight_conversions = [c for c in conversions if not any(
        p in str(t) for t in (getattr(c, "target_patterns", None) or ()) for p in PROJECTIONS)]


def targeted(model: nn.Module, target_parameters: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The experts projections ``target_parameters`` names (PEFT's rule: the full parameter name, or an entry
    it ends with after a dot), by module name."""
    out = {}
    for name, _ in experts_modules(model):
        hit = tuple(p for p in PROJECTIONS if matches(f"{name}.{p}", list(target_parameters)))
        if hit:
            out[name] = hit
    return out


def peft_keys(name: str, projections: Sequence[str]) -> dict[str, str]:
    """The adapter-file prefix of each projection's LoRA (``base_model.model.`` not included), as PEFT nests them."""
    order = [p for p in PROJECTIONS if p in projections]
    return {p: name + ".base_layer" * (len(order) - 1 - i) for i, p in enumerate(order)}


def to_peft(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Ours (``lora_A [E, r, in]``, ``lora_B [E, out, r]``) to PEFT's (``[r*E, in]``, ``[out, r*E]``)."""
    e, r, in_f = a.shape
    out_f = b.shape[1]
    return a.reshape(e * r, in_f), b.permute(1, 2, 0).reshape(out_f, r * e)


def from_peft(a: Tensor, b: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's ``[r*E, in]`` / ``[out, r*E]`` to ours (``[E, r, in]``, ``[E, out, r]``)."""
    re_, in_f = a.shape
    out_f = b.shape[0]
    r = re_ // experts
    return a.reshape(experts, r, in_f), b.reshape(out_f, r, experts).permute(2, 0, 1)


def dense_experts(module: NF4Experts, dtype: torch.dtype | None = None) -> nn.Module:
    """The dense fused-experts module again, with ``deq(W) + s B A`` per expert (fp32, then ``dtype``; default the
    dtype the weights were quantized from), on the module's device."""
    template = module.__dict__.get("_dense_template")
    if template is None:
        raise ValueError("this NF4Experts was not made from a transformers experts module: no dense class to return")
    device = module.gate_up_proj_packed.device
    dense = template.to_empty(device=device)
    for name in PROJECTIONS:
        w = module.dense(name, dtype)
        setattr(dense, name, nn.Parameter(w, requires_grad=False))
    return dense
