"""The fused QLoRA MLP: a Llama-style MLP (``down(silu(gate(x)) * up(x))``) whose three projections are
:class:`QLoraLinear` layers, run as one autograd Function (:func:`qlora_kernels.functional.qlora_mlp`).

:class:`FusedQLoraMLP` keeps the MLP's own three layers as its children under the same names
(``gate_proj``, ``up_proj``, ``down_proj``), so parameter names, state dicts and adapter files do not
change; it only changes how the forward and backward run. It is put in place of an MLP on the model
instance (never by patching a class) and falls back to the three layers one by one whenever the fused
Function does not apply: LoRA dropout in training, a bias, merged or disabled adapters, different
adapter dtypes. What the fusion saves is activation memory (the Function keeps g and u; autograd over
the three layers keeps g, silu(g), u and h) and launches; whether it is faster depends on the GPU
(benchmarks/bench_lora.py --mlp measures it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import qlora_mlp
from .qlora_linear import QLoraLinear

#: MLP classes of transformers with gate_proj / up_proj / down_proj and ``act_fn = silu`` (by class name,
#: so that transformers stays optional).
FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _is_silu(act) -> bool:
    """Whether ``act`` computes SiLU (transformers has its own SiLU class; compare values, not types)."""
    if not isinstance(act, nn.Module):
        return False
    probe = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    try:
        return bool(torch.equal(act(probe), nn.functional.silu(probe)))
    except Exception:  # an activation that does not take a plain tensor
        return False


class FusedQLoraMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, fused when it can be (see the module docstring)."""

    def __init__(self, gate_proj: QLoraLinear, up_proj: QLoraLinear, down_proj: QLoraLinear,
                 act_fn: nn.Module | None = None) -> None:
        super().__init__()
        for name, layer in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if not isinstance(layer, QLoraLinear):
                raise TypeError(f"{name} must be a QLoraLinear; got {type(layer).__name__}")
        if gate_proj.in_features != up_proj.in_features or gate_proj.out_features != up_proj.out_features or (
                down_proj.in_features, down_proj.out_features) != (gate_proj.out_features, gate_proj.in_features):
            raise ValueError(
                f"gate_proj and up_proj must be [I, H] and down_proj [H, I]; got gate_proj "
                f"[{gate_proj.out_features}, {gate_proj.in_features}], up_proj [{up_proj.out_features}, "
                f"{up_proj.in_features}], down_proj [{down_proj.out_features}, {down_proj.in_features}]")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()

    def fusable(self) -> bool:
        """Whether the fused Function computes exactly what the three layers would, now."""
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        dtypes = {layer.lora_A.weight.dtype for layer in layers} | {layer.lora_B.weight.dtype for layer in layers}
        return (all(layer.bias is None and not layer.merged and not layer.disable_adapters
                    and not (layer.training and layer.lora_dropout > 0) for layer in layers)
                and len(dtypes) == 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fusable():
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        self.gate_proj._check_input(x)
        projections = [(layer._weight_args(), layer.out_features, layer.in_features, layer.lora_A.weight,
                        layer.lora_B.weight, layer.scaling) for layer in (self.gate_proj, self.up_proj, self.down_proj)]
        return qlora_mlp(x, *projections)

    @classmethod
    def from_mlp(cls, mlp: nn.Module) -> FusedQLoraMLP | None:
        """The fused MLP for a transformers MLP whose projections are QLoRA layers with SiLU, or None."""
        act = getattr(mlp, "act_fn", None)
        if type(mlp).__name__ not in FUSABLE_MLPS or not _is_silu(act):
            return None
        layers = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(layer, QLoraLinear) for layer in layers):
            return None
        return cls(*layers, act_fn=mlp.act_fn)


def fuse_qlora_mlps(model: nn.Module) -> int:
    """Put a :class:`FusedQLoraMLP` in place of every fusable MLP of ``model`` (on the instance: each
    parent's attribute is replaced; no class is changed). Returns how many were fused. The parameter
    names, state dict and adapter files stay the same; :func:`unfuse_qlora_mlps` undoes it."""
    fused = 0
    for name, module in list(model.named_modules()):
        new = FusedQLoraMLP.from_mlp(module) if name else None
        if new is None:
            continue
        # the original MLP instance, for unfuse; kept out of _modules so it adds no second set of names
        object.__setattr__(new, "_unfused", module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        fused += 1
    return fused


def unfuse_qlora_mlps(model: nn.Module) -> int:
    """Put the original MLPs back in place of every :class:`FusedQLoraMLP` of ``model``; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedQLoraMLP) and "_unfused" in module.__dict__:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.__dict__["_unfused"])
            count += 1
    return count
