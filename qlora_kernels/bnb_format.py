"""The bitsandbytes 4-bit format, in one place: what bitsandbytes 0.50.2 writes and holds, and how it is read here.

* State dict. A 4-bit weight under ``prefix`` (``<layer>.weight``) is its packed codes under ``prefix`` and the
  entries ``prefix.absmax``, ``prefix.quant_map``, with double quantization ``prefix.nested_absmax`` and
  ``prefix.nested_quant_map``, and ``prefix.quant_state.bitsandbytes__nf4``: a uint8 tensor holding the UTF-8
  JSON of the non-tensor quant state (``quant_type``, ``blocksize``, ``dtype``, ``shape``; with double
  quantization ``nested_blocksize``, ``nested_dtype``, ``nested_offset``). transformers' 4-bit checkpoints use
  the same keys. :func:`write_state_dict` writes these entries, :func:`read_state_dict` reads them.
* Storage dtype. bitsandbytes may keep the packed codes in another dtype (``bnb_4bit_quant_storage``, e.g. bf16
  for FSDP): the same bytes (:func:`packed_as_uint8`).
* Modules. ``bitsandbytes.nn.Linear4bit`` holds a ``Params4bit`` weight with a ``quant_state``; on a CPU with
  AVX512-BF16 an eval-mode forward repacks it into a tiled inference layout
  (:func:`linear4bit_quant_type`, :func:`linear4bit_float_weight`, :func:`linear4bit_fields`).
* transformers. ``config.json``'s ``quantization_config`` (:func:`read_quantization_config`), and the state a
  model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` carries (:func:`is_transformers_bnb4`,
  :func:`drop_transformers_quantization`).

The file formats are described in docs/FORMATS.md. This module builds no :class:`~qlora_kernels.nf4.NF4Weight`: it
reads and writes the weight's fields (``packed``, ``absmax``, ``shape``, ``dtype``, ``blocksize``, ``code``,
``nested_absmax``, ``nested_code``, ``offset``), so :mod:`qlora_kernels.nf4` builds on it without an import cycle.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Container, Mapping

import torch
from torch import Tensor, nn

from .dtypes import DTYPE_NAMES, FLOAT_DTYPES, dtype_name
from .quant_maps import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE

QUANT_STATE_NF4 = "quant_state.bitsandbytes__nf4"
QUANT_STATE_FP4 = "quant_state.bitsandbytes__fp4"
# The entries bitsandbytes writes beside a 4-bit ``<layer>.weight`` (transformers' serialized names).
STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_NF4, QUANT_STATE_FP4)
# The first quant-state blob read that was not 1-D (it is warned about once per process).
_warned_blob_shape: list[str] = []


# ---------------------------------------------------------------------------------------------
# state-dict keys


def state_keys(prefix: str) -> list[str]:
    """Every key a 4-bit weight under ``prefix`` may have: ``prefix`` and ``prefix.<suffix>``."""
    return [prefix] + [f"{prefix}.{suffix}" for suffix in STATE_SUFFIXES]


def has_quant_state(keys: Container[str], prefix: str) -> bool:
    """Whether ``keys`` hold a quant state (nf4 or fp4) for a 4-bit weight under ``prefix``."""
    return f"{prefix}.{QUANT_STATE_NF4}" in keys or f"{prefix}.{QUANT_STATE_FP4}" in keys


def is_nf4_quant_state_key(key: str) -> bool:
    """Whether ``key`` is the nf4 quant state of a 4-bit tensor (``<layer>.weight.quant_state.bitsandbytes__nf4``,
    or of another tensor name such as fused experts' ``<experts>.gate_up_proj.quant_state.bitsandbytes__nf4``)."""
    return key.endswith(f".{QUANT_STATE_NF4}")


def split_state_key(key: str) -> tuple[str, str]:
    """``'<layer>.weight.absmax'`` -> (``'<layer>.weight'``, ``'.absmax'``) (any tensor name, e.g. an experts'
    ``gate_up_proj``); other keys -> (key, '')."""
    for suffix in STATE_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], "." + suffix
    return key, ""


# ---------------------------------------------------------------------------------------------
# state dict: write and read


def quant_state_json(blocksize: int, dtype: torch.dtype, shape: torch.Size, offset: float | None) -> dict:
    """The non-tensor quant state as bitsandbytes packs it into ``quant_state.bitsandbytes__nf4``; ``offset`` is
    the double-quantization offset, None without double quantization."""
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype_name(dtype), "shape": list(shape)}
    if offset is not None:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    return state


def write_state_dict(prefix: str, packed: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Tensor | None,
                     nested_code: Tensor | None, quant_state: dict) -> dict[str, Tensor]:
    """State dict entries exactly as ``bitsandbytes.nn.Linear4bit`` (and transformers) write them."""
    sd = {prefix: packed, f"{prefix}.absmax": absmax, f"{prefix}.quant_map": code}
    if nested_absmax is not None:
        sd[f"{prefix}.nested_absmax"] = nested_absmax
        sd[f"{prefix}.nested_quant_map"] = nested_code
    blob = json.dumps(quant_state).encode("utf-8")
    sd[f"{prefix}.{QUANT_STATE_NF4}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


def read_state_dict(state_dict: Mapping[str, Tensor], prefix: str) -> dict:
    """The NF4 weight's fields from the entries under ``prefix`` of a bitsandbytes / transformers 4-bit state dict.

    Checks the quant state and that every entry it needs is a tensor; the tensors' shapes and dtypes are left to
    :class:`~qlora_kernels.nf4.NF4Weight`. Raises ValueError naming the key for a missing entry, a corrupt or
    incomplete quant state, or a quant type other than nf4; TypeError naming the key for an entry that is not a
    tensor or a quant-state blob that is not bytes.
    """
    qs_key = f"{prefix}.{QUANT_STATE_NF4}"
    if qs_key not in state_dict:
        if f"{prefix}.{QUANT_STATE_FP4}" in state_dict:
            raise ValueError(f"{prefix!r} is FP4-quantized; only NF4 weights are supported")
        raise ValueError(f"state dict has no {qs_key!r}: not a bitsandbytes 4-bit weight under prefix {prefix!r}")
    fields = _read_quant_state(_read_quant_state_blob(state_dict[qs_key], qs_key), qs_key)

    def tensor(suffix: str) -> Tensor:
        key = f"{prefix}.{suffix}" if suffix else prefix
        if key not in state_dict:
            raise ValueError(f"state dict lacks {key!r} (needed by the 4-bit weight {prefix!r})")
        value = state_dict[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"{key!r} must be a torch.Tensor; got {type(value).__name__}")
        return value

    if "offset" in fields:
        fields.update(nested_absmax=tensor("nested_absmax"), nested_code=tensor("nested_quant_map"))
    fields.update(packed=packed_as_uint8(tensor("")), absmax=tensor("absmax"), code=tensor("quant_map"))
    return fields


def _read_quant_state(state: dict, qs_key: str) -> dict:
    """``blocksize``, ``dtype``, ``shape`` (and ``offset`` with double quantization) from the quant-state JSON."""

    def need(key: str, kind):
        if key not in state:
            raise ValueError(f"{qs_key!r} lacks {key!r}: {state}")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{qs_key!r}: {key!r} must be {kind}; got {value!r}")
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
    fields = dict(blocksize=blocksize, dtype=DTYPE_NAMES[dtype], shape=torch.Size(shape))
    if "nested_offset" in state or "nested_blocksize" in state:
        nested_bs = need("nested_blocksize", int)
        if nested_bs != NESTED_BLOCKSIZE:
            raise ValueError(f"{qs_key!r}: nested_blocksize must be {NESTED_BLOCKSIZE}; got {nested_bs}")
        offset = need("nested_offset", (int, float))
        if not math.isfinite(offset):
            raise ValueError(f"{qs_key!r}: nested_offset must be finite; got {offset}")
        fields["offset"] = float(offset)
    return fields


def _read_quant_state_blob(blob: object, key: str) -> dict:
    """The JSON object packed in a ``quant_state.bitsandbytes__nf4`` entry.

    bitsandbytes writes it as a 1-D uint8 tensor of UTF-8 JSON bytes and reads it back as the tensor's raw bytes
    in memory order (``bytes(t.numpy())``), so any shape of a uint8 (or int8: the same bytes) tensor reads the
    same; a blob that is not 1-D is read so too, with a warning naming the key and the shape (once per process:
    one converter usually wrote every layer's blob so). Anything else (another dtype, Python bytes, a list) is an
    error naming ``key``.
    """
    if not isinstance(blob, Tensor):
        raise TypeError(f"{key!r} must be a uint8 tensor of JSON bytes (as bitsandbytes writes it); "
                        f"got {type(blob).__name__}")
    if blob.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"{key!r} must be a uint8 tensor of JSON bytes (as bitsandbytes writes it); got {blob.dtype}")
    if blob.dim() != 1 and not _warned_blob_shape:
        _warned_blob_shape.append(key)
        warnings.warn(f"{key!r} is stored with shape {list(blob.shape)}, not 1-D as bitsandbytes writes it: read "
                      f"as bitsandbytes reads it, its {blob.numel()} bytes in memory order (other blobs stored so are "
                      f"read the same way without a further warning)", UserWarning, stacklevel=3)
    raw = bytes(packed_as_uint8(blob.detach().to("cpu").contiguous()).reshape(-1).tolist())
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key!r} does not hold a JSON object: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{key!r} must hold a JSON object; got {type(state).__name__}")
    return state


def packed_as_uint8(packed: Tensor) -> Tensor:
    """Stored bytes as uint8 ``[nbytes, 1]``, a view of ``packed``.

    bitsandbytes' ``quant_storage`` (``bnb_4bit_quant_storage``: bf16, fp32, int8, ... for FSDP) holds the packed
    codes in another dtype: the same bytes. A uint8 tensor, or one that cannot be viewed as bytes (not
    contiguous), is returned as it is, for :class:`~qlora_kernels.nf4.NF4Weight`'s checks to name.
    """
    if packed.dtype == torch.uint8 or not packed.is_contiguous():
        return packed
    return packed.view(torch.uint8).reshape(-1, 1)


# ---------------------------------------------------------------------------------------------
# bitsandbytes.nn.Linear4bit


def is_bnb_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of bitsandbytes' own modules (4-bit, 8-bit, ...)."""
    return type(module).__module__.startswith("bitsandbytes")


def linear4bit_quant_type(module: nn.Module) -> str | None:
    """The ``quant_type`` (``'nf4'``, ``'fp4'``) of a ``bitsandbytes.nn.Linear4bit``; None for any other module."""
    if not isinstance(module, nn.Linear):
        return None
    return getattr(getattr(module, "weight", None), "quant_type", None)


def _nf4_param(module: nn.Module):
    """The ``Params4bit`` weight of an nf4 ``Linear4bit``; TypeError / ValueError for another module."""
    quant_type = linear4bit_quant_type(module)
    if quant_type is None:
        raise TypeError(f"module must be a bitsandbytes Linear4bit; got {type(module).__name__}")
    if quant_type != "nf4":
        raise ValueError(f"module's quant_type must be 'nf4'; got {quant_type!r}")
    return module.weight


def linear4bit_float_weight(module: nn.Module) -> tuple[Tensor, int, bool] | None:
    """For an nf4 ``Linear4bit`` whose weight bitsandbytes has not quantized yet (it does so on the first move to
    a device): ``(float weight, blocksize, double_quant)``, to quantize as bitsandbytes would (its blocksize and
    ``compress_statistics``). None for a quantized layer (read it with :func:`linear4bit_fields`)."""
    w = _nf4_param(module)
    if getattr(w, "quant_state", None) is not None and getattr(w, "bnb_quantized", True):
        return None
    if w.data.dtype not in FLOAT_DTYPES:
        raise ValueError(f"module's weight is {w.data.dtype} but has no quant_state")
    return w.data, w.blocksize, bool(w.compress_statistics)


def linear4bit_fields(module: nn.Module) -> dict:
    """The NF4 weight's fields of a quantized nf4 ``Linear4bit``, sharing its tensors.

    * In the standard layout: its packed codes and quant state (absmax, or the uint8 absmax codes with state2's
      nested absmax / map and the offset) are taken as they are: no requantizing.
    * In bitsandbytes' CPU inference layout (after an eval-mode, no-grad forward on a CPU with AVX512-BF16:
      codes reordered in 32-row tiles, absmax rounded to bf16 and no longer double-quantized): the codes are put
      back in the standard order and the bf16 absmax is used as fp32 absmax, so the weight computes exactly what
      bitsandbytes computes now. The original fp32 absmax is gone from that module; to keep it, take the layer
      before such a forward (or load its state dict).
    """
    w = _nf4_param(module)
    qs = w.quant_state
    packed = packed_as_uint8(w.data)
    shape = torch.Size(qs.shape)
    if getattr(qs, "packing_format_for_cpu", False):
        packed, absmax = _undo_cpu_layout(packed, qs.absmax, shape, qs.blocksize)
        return dict(packed=packed, absmax=absmax, shape=shape, dtype=qs.original_dtype, blocksize=qs.blocksize,
                    code=qs.code.float())
    fields = dict(packed=packed.reshape(-1, 1), shape=shape, dtype=qs.dtype, blocksize=qs.blocksize, code=qs.code)
    if qs.nested:
        return dict(fields, absmax=qs.absmax, nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                    offset=float(qs.offset))
    return dict(fields, absmax=qs.absmax.float())


def _undo_cpu_layout(packed: Tensor, absmax: Tensor, shape: torch.Size, blocksize: int,
                     tile: int = 32) -> tuple[Tensor, Tensor]:
    """bitsandbytes' CPU inference layout back to the standard one.

    That layout (for W [N, K], N a multiple of 32, K even) is a uint8 ``[N, K/2]`` holding, row-major, one
    32-byte group per (32-row tile t, column pair j): byte i of it has in its low nibble the code of
    ``W[32t + i//2, 2j + i%2]`` and in its high nibble that of ``W[32t + 16 + i//2, 2j + i%2]``; absmax is
    bf16 ``[K/blocksize, N]`` (transposed). Returns the standard packed ``[N*K/2, 1]`` and fp32 absmax.
    """
    n, k = shape
    groups = packed.reshape(n // tile, k // 2, tile)
    # Low nibbles hold rows 0-15 of the tile, high nibbles rows 16-31, each as (row, column-of-pair) pairs:
    # concatenated they are the tile's [32 rows, 2 columns] for column pair j.
    nibbles = torch.cat([groups & 0xF, groups >> 4], dim=2).reshape(n // tile, k // 2, tile, 2)
    codes = nibbles.permute(0, 2, 1, 3).reshape(-1)  # [tiles, 32 rows, K/2, 2] -> row-major [N*K]
    standard = (codes[0::2] << 4) | codes[1::2]
    return standard.reshape(-1, 1).contiguous(), absmax.t().reshape(-1).float().contiguous()


# ---------------------------------------------------------------------------------------------
# transformers' bitsandbytes integration


def read_quantization_config(config: object) -> dict | None:
    """``config.quantization_config`` as a dict, None when absent; ValueError unless bitsandbytes 4-bit nf4."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes" or not qc.get("load_in_4bit", qc.get("_load_in_4bit", False)):
        raise ValueError(f"config.json's quantization_config must be bitsandbytes 4-bit (quant_method 'bitsandbytes', "
                         f"load_in_4bit true); got quant_method={method!r}, load_in_4bit={qc.get('load_in_4bit')!r}")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        got = qc.get("bnb_4bit_quant_type")
        raise ValueError(f"quantization_config.bnb_4bit_quant_type must be 'nf4'; got {got!r}")
    return qc


def is_transformers_bnb4(model: nn.Module) -> bool:
    """Whether ``model`` carries transformers' bitsandbytes 4-bit state (``from_pretrained(quantization_config=
    BitsAndBytesConfig(load_in_4bit=True))``)."""
    quantizer = getattr(model, "hf_quantizer", None)
    qc = getattr(quantizer, "quantization_config", None)
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(qc, "load_in_4bit", False))


def drop_transformers_quantization(model: nn.Module) -> None:
    """Remove transformers' quantization state from ``model`` (``hf_quantizer``, ``is_quantized``,
    ``quantization_method``, ``is_loaded_in_4bit``, ``config.quantization_config``), for a model that holds no
    bitsandbytes module any more (bitsandbytes' state, or that of qlora_kernels' own quantizer)."""
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit"):
        if attr in vars(model):
            delattr(model, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        for attr in ("quantization_config", "_is_quantized"):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    # the quantizer's load-time conversions (bitsandbytes' deserialization of the packed weight with its quant state)
    # cannot run backwards, and save_pretrained reverts every conversion the model was loaded with: the layers now
    # keep their state dict in the stored format themselves
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if _reversible(c)]


def _reversible(conversion: object) -> bool:
    """Whether each operation of a transformers weight conversion has a reverse (save_pretrained runs it)."""
    for op in getattr(conversion, "operations", None) or ():
        try:
            op.reverse_op  # noqa: B018 (a property that raises for one-way operations)
        except NotImplementedError:
            return False
    return True
