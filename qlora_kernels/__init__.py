"""qlora_kernels: fast, lean QLoRA fine-tuning kernels (NF4 + double quant, fused LoRA, paged AdamW).

Public API (see DESIGN.md): quantize_nf4, dequantize_nf4, NF4Weight, nf4_linear, backends.
"""

from __future__ import annotations

from . import _extension  # noqa: F401  (loads the optional compiled kernels first)
from . import ops  # noqa: F401  (registers torch.ops.qlora_kernels)
from .backends import backends
from .functional import nf4_linear
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__version__ = "0.1.0"

__all__ = ["NF4Weight", "backends", "dequantize_nf4", "nf4_linear", "quantize_nf4", "__version__"]
