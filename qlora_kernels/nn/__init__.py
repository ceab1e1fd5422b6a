"""Modules: :class:`QLoraLinear` (NF4 base + LoRA adapters) and :class:`NF4Linear` (a frozen 4-bit linear)."""

from .qlora_linear import NF4Linear, QLoraLinear, nf4_weight_from_bnb

__all__ = ["NF4Linear", "QLoraLinear", "nf4_weight_from_bnb"]
