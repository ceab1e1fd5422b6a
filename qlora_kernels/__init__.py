"""qlora_kernels: fast, lean QLoRA fine-tuning kernels (NF4 + double quant, fused LoRA, paged AdamW).

Public API (docs/ARCHITECTURE.md): quantize_nf4, dequantize_nf4, NF4Weight, nf4_linear,
lora_linear, QLoraLinear, apply_qlora, load_4bit_model, save_adapter, load_adapter,
merge_and_unload, backends, PagedAdamW (qlora_kernels.optim); QLoraKernelsConfig (transformers'
``from_pretrained(..., quantization_config=...)``, imported with transformers on first use).
"""

from __future__ import annotations

# _extension first: it loads the optional compiled kernels before the ops look for them.
from . import _extension, ops  # noqa: F401
from .backends import backends
from .functional import lora_linear, nf4_linear
from .hf import apply_qlora, load_4bit_model, load_adapter, merge_and_unload, save_adapter
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from .nn import QLoraLinear
from .optim import PagedAdamW

__version__ = "0.1.0"

__all__ = [
    "NF4Weight",
    "PagedAdamW",
    "QLoraKernelsConfig",
    "QLoraLinear",
    "__version__",
    "apply_qlora",
    "backends",
    "dequantize_nf4",
    "load_4bit_model",
    "load_adapter",
    "lora_linear",
    "merge_and_unload",
    "nf4_linear",
    "quantize_nf4",
    "save_adapter",
]


def __getattr__(name: str):
    if name == "QLoraKernelsConfig":  # needs transformers: imported (and registered with it) on first use
        from .hf import QLoraKernelsConfig

        return QLoraKernelsConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
