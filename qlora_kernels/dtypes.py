"""The floating dtypes the package computes in, and their names in checkpoints.

A leaf module (imports only torch), so every layer of the package can use it without an import cycle.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
"""The weight / activation dtypes every op, module and file format accepts."""

DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Name → dtype, as bitsandbytes' quant-state JSON and transformers' configs spell them."""


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8, "I8": torch.int8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I32": torch.int32, "I64": torch.int64}
"""A safetensors header's dtype name → the torch dtype its bytes read as (the ones the package reads)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``: the spelling of :data:`DTYPE_NAMES`."""
    return str(dtype).removeprefix("torch.")


__all__ = ["DTYPE_NAMES", "FLOAT_DTYPES", "SAFETENSORS_DTYPES", "dtype_name"]
