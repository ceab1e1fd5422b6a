"""NF4 weights: quantize, dequantize, and their bitsandbytes state dict.

``quantize_nf4(w)`` returns an :class:`NF4Weight` whose bytes are those bitsandbytes 0.50.2 writes
(``quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)`` on the CPU), and whose
state dict uses bitsandbytes' keys, so checkpoints move both ways between the two libraries
(the format itself lives in :mod:`qlora_kernels.bnb_format`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import bnb_format, ops  # ops: registers torch.ops.qlora_kernels
from .dtypes import FLOAT_DTYPES, dtype_name
from .quant_maps import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE, dynamic_map, nf4_code
from .reference.nf4 import quantize_absmax

_QK = torch.ops.qlora_kernels


@dataclass(eq=False)
class NF4Weight:
    """A frozen weight in NF4 with bitsandbytes' layout.

    Attributes:
        packed: uint8 ``[(numel + 1) // 2, 1]``, two codes a byte, first element in the high nibble.
        absmax: fp32 ``[nb]``; with double quantization uint8 codes ``[nb]``.
        shape: the original weight's shape (``[out_features, in_features]`` for a Linear).
        dtype: the original weight's dtype, the default dtype of :meth:`dequantize`.
        blocksize: elements per absmax block.
        code: the NF4 table, fp32 ``[16]`` (bitsandbytes' ``quant_map``).
        nested_absmax, nested_code, offset: the double-quantization constants, or None / 0.0.
    """

    packed: Tensor
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code: Tensor = field(default_factory=nf4_code)
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    offset: float = 0.0

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16; got {self.dtype}")
        ops.nf4._check_weight(
            self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.blocksize, self.numel
        )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed codes and all constants."""
        ts = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def tensors(self) -> tuple:
        """The op arguments that describe this weight (after x, before the output shape)."""
        return (
            self.packed,
            self.absmax,
            self.code,
            self.nested_absmax,
            self.nested_code,
            self.offset,
            self.blocksize,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str) -> NF4Weight:
        def move(t):
            return None if t is None else t.to(device)

        return NF4Weight(
            move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
            move(self.code), move(self.nested_absmax), move(self.nested_code), self.offset,
        )

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"NF4Weight(shape={list(self.shape)}, dtype={dtype_name(self.dtype)}, blocksize={self.blocksize}"
            f"{dq}, device={self.device}, nbytes={self.nbytes})"
        )

    # -- bitsandbytes / transformers state dict ----------------------------------------------

    def quant_state_json(self) -> dict:
        """The non-tensor quant state, as bitsandbytes packs it into ``quant_state.bitsandbytes__nf4``."""
        return bnb_format.quant_state_json(self.blocksize, self.dtype, self.shape,
                                           self.offset if self.double_quant else None)

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, Tensor]:
        """State dict entries exactly as ``bitsandbytes.nn.Linear4bit`` (and transformers) write them
        (see :mod:`qlora_kernels.bnb_format`)."""
        return bnb_format.write_state_dict(prefix, self.packed, self.absmax, self.code, self.nested_absmax,
                                           self.nested_code, self.quant_state_json())

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "weight") -> NF4Weight:
        """Read the entries under ``prefix`` of a bitsandbytes / transformers 4-bit state dict
        (see :mod:`qlora_kernels.bnb_format`).

        The quant-state blob is read as bitsandbytes reads it: the raw bytes of a uint8 (or int8) tensor of any
        shape; packed codes in another storage dtype (``bnb_4bit_quant_storage``) are read as their bytes.
        Raises ValueError naming the key for missing keys, a corrupt quant-state blob, a quant type other than
        nf4, or tensors whose shape or dtype do not match the recorded shape; TypeError naming the key for an
        entry that is not a tensor (a list, Python bytes) or a blob of another dtype.
        """
        fields = bnb_format.read_state_dict(state_dict, prefix)
        try:
            return cls(**fields)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"4-bit weight {prefix!r}: {exc}") from None


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """The bytes :func:`quantize_nf4` allocates for a tensor of ``numel`` elements (``NF4Weight.nbytes``), without
    quantizing anything: packed codes (two a byte), one absmax a block (a uint8 code with double quantization, else
    fp32), the 16-entry NF4 table, and with double quantization one fp32 nested absmax a 256 blocks and the
    256-entry dynamic map."""
    if numel < 1:
        raise ValueError(f"numel must be >= 1; got {numel}")
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}; got {blocksize!r}")
    blocks = -(-numel // blocksize)
    out = -(-numel // 2) + 16 * 4
    if double_quant:
        return out + blocks + -(-blocks // NESTED_BLOCKSIZE) * 4 + 256 * 4
    return out + blocks * 4


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a floating weight to NF4, byte-compatible with bitsandbytes.

    Args:
        w: float32, float16 or bfloat16 tensor of any shape, finite, non-empty.
        blocksize: elements per absmax block; one of 32, 64, ..., 4096.
        double_quant: quantize absmax to 8 bits in blocks of 256 (bitsandbytes'
            ``compress_statistics``), exact-nearest rounding.
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor; got {type(w).__name__}")
    if not w.dtype.is_floating_point or w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16; got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty; got shape {list(w.shape)}")
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}; got {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool; got {double_quant!r}")
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"w must be finite; got {bad} NaN/inf values in a tensor of shape {list(w.shape)}")
    packed, absmax = _QK.quantize_nf4(w.contiguous().reshape(-1), blocksize)
    kwargs = {}
    if double_quant:
        codes, nested_absmax, offset = quantize_absmax(absmax)
        absmax = codes
        kwargs = dict(nested_absmax=nested_absmax, nested_code=dynamic_map(w.device), offset=offset)
    return NF4Weight(
        packed=packed.view(-1, 1), absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
        code=nf4_code(w.device), **kwargs,
    )


def dequantize_nf4(qw: NF4Weight, dtype: torch.dtype | None = None) -> Tensor:
    """The weight back in floating point, ``NF4[code] * absmax`` rounded to ``dtype``
    (default: the dtype it was quantized from), shaped as the original; bitwise equal to
    bitsandbytes' ``dequantize_4bit``."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight; got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    return _QK.dequantize_nf4(*qw.tensors(), qw.numel, dtype).view(qw.shape)
