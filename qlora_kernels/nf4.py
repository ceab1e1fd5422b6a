"""NF4 weights: quantize, dequantize, and the bitsandbytes state-dict format.

``quantize_nf4(w)`` returns an :class:`NF4Weight` whose bytes are those bitsandbytes 0.50.2 writes
(``quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)`` on the CPU), and whose
state dict uses bitsandbytes' keys, so checkpoints move both ways between the two libraries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.qlora_kernels)
from .dtypes import DTYPE_NAMES, FLOAT_DTYPES, dtype_name
from .quant_maps import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE, dynamic_map, nf4_code
from .reference.nf4 import quantize_absmax

_QK = torch.ops.qlora_kernels
_QS_SUFFIX_NF4 = "quant_state.bitsandbytes__nf4"
_QS_SUFFIX_FP4 = "quant_state.bitsandbytes__fp4"


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
        state = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
        return state

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, Tensor]:
        """State dict entries exactly as ``bitsandbytes.nn.Linear4bit`` (and transformers) write them."""
        sd = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        sd[f"{prefix}.{_QS_SUFFIX_NF4}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "weight") -> NF4Weight:
        """Read the entries under ``prefix`` of a bitsandbytes / transformers 4-bit state dict.

        The quant-state blob is read as bitsandbytes reads it: the raw bytes of a uint8 (or int8) tensor of any
        shape. Raises ValueError naming the key for missing keys, a corrupt quant-state blob, a quant type
        other than nf4, or tensors whose shape or dtype do not match the recorded shape; TypeError naming the
        key for an entry that is not a tensor (a list, Python bytes) or a blob of another dtype.
        """
        qs_key = f"{prefix}.{_QS_SUFFIX_NF4}"
        if qs_key not in state_dict:
            if f"{prefix}.{_QS_SUFFIX_FP4}" in state_dict:
                raise ValueError(f"{prefix!r} is FP4-quantized; only NF4 weights are supported")
            raise ValueError(f"state dict has no {qs_key!r}: not a bitsandbytes 4-bit weight under prefix {prefix!r}")
        state = _read_quant_state_blob(state_dict[qs_key], qs_key)

        def need(key: str, kind, where: str = qs_key):
            if key not in state:
                raise ValueError(f"{where!r} lacks {key!r}: {state}")
            value = state[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{where!r}: {key!r} must be {kind}; got {value!r}")
            return value

        if need("quant_type", str) != "nf4":
            raise ValueError(f"{qs_key!r}: quant_type must be 'nf4'; got {state['quant_type']!r}")
        blocksize = need("blocksize", int)
        if blocksize not in ALLOWED_BLOCKSIZES:
            raise ValueError(f"{qs_key!r}: blocksize must be one of {ALLOWED_BLOCKSIZES}; got {blocksize}")
        dtype = need("dtype", str)
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{qs_key!r}: dtype must be one of {list(DTYPE_NAMES)}; got {dtype!r}")
        shape = need("shape", list)
        if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"{qs_key!r}: shape must be a list of positive integers; got {shape!r}")

        def tensor(suffix: str) -> Tensor:
            key = f"{prefix}.{suffix}" if suffix else prefix
            if key not in state_dict:
                raise ValueError(f"state dict lacks {key!r} (needed by the 4-bit weight {prefix!r})")
            value = state_dict[key]
            if not isinstance(value, Tensor):
                raise TypeError(f"{key!r} must be a torch.Tensor; got {type(value).__name__}")
            return value

        nested = "nested_offset" in state or "nested_blocksize" in state
        kwargs = {}
        if nested:
            nested_bs = need("nested_blocksize", int)
            if nested_bs != NESTED_BLOCKSIZE:
                raise ValueError(f"{qs_key!r}: nested_blocksize must be {NESTED_BLOCKSIZE}; got {nested_bs}")
            offset = need("nested_offset", (int, float))
            if not math.isfinite(offset):
                raise ValueError(f"{qs_key!r}: nested_offset must be finite; got {offset}")
            kwargs = dict(
                nested_absmax=tensor("nested_absmax"), nested_code=tensor("nested_quant_map"), offset=float(offset)
            )
        packed = tensor("")
        if packed.dtype != torch.uint8 and packed.dtype.itemsize > 1 and packed.is_contiguous():
            # bnb_4bit_quant_storage other than uint8 (e.g. bf16 for FSDP): the same bytes, another dtype.
            packed = packed.view(torch.uint8).reshape(-1, 1)
        try:
            return cls(
                packed=packed,
                absmax=tensor("absmax"),
                shape=torch.Size(shape),
                dtype=DTYPE_NAMES[dtype],
                blocksize=blocksize,
                code=tensor("quant_map"),
                **kwargs,
            )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"4-bit weight {prefix!r}: {exc}") from None


def _read_quant_state_blob(blob, key: str) -> dict:
    """The JSON object packed in a ``quant_state.bitsandbytes__nf4`` entry.

    bitsandbytes writes it as a 1-D uint8 tensor of UTF-8 JSON bytes and reads it back as the tensor's raw bytes
    in memory order (``bytes(t.numpy())``), so any shape of a uint8 (or int8: the same bytes) tensor reads the
    same; anything else (another dtype, Python bytes, a list) is an error naming ``key``.
    """
    if not isinstance(blob, Tensor):
        raise TypeError(f"{key!r} must be a uint8 tensor of JSON bytes (as bitsandbytes writes it); "
                        f"got {type(blob).__name__}")
    if blob.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"{key!r} must be a uint8 tensor of JSON bytes (as bitsandbytes writes it); got {blob.dtype}")
    raw = bytes(blob.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).tolist())
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key!r} does not hold a JSON object: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{key!r} must hold a JSON object; got {type(state).__name__}")
    return state


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
