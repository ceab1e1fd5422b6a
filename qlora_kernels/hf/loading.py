"""Loading a local Hugging Face model directory in 4 bits: :func:`load_4bit_model` builds the model on the meta
device and fills it from its safetensors files one tensor at a time, with transformers' own key renaming and
conversions (its checkpoint conversion mapping): bitsandbytes-4bit checkpoints are used as stored (no
requantizing), full-precision ones are quantized layer by layer. With a :class:`BlockHook` the model is filled
block by block (each transformer block complete, then handed to the hook, e.g. to shard it across ranks),
so that the whole 4-bit model need never exist in one process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import bnb_format
from ..dtypes import FLOAT_DTYPES, SAFETENSORS_DTYPES
from ..nf4 import NF4Weight, quantize_nf4
from ..nn import NF4Linear
from . import experts as moe
from .layers import (
    KEEP_DENSE,
    SEQ_CLS_HEADS,
    check_spec,
    layer_kind,
    linear_modules,
    matches,
    output_embedding_names,
    replace_module,
)

logger = logging.getLogger(__name__)


class QuantizedExpertsWarning(UserWarning):
    """A 4-bit checkpoint's mixture-of-experts tensors were stored dense (bitsandbytes leaves them so) and were
    quantized to NF4 while loading: the model then computes something else than bitsandbytes does on the same file."""


def warn_quantized_experts(names: Sequence[str], keep: str) -> None:
    """Say that the dense experts ``names`` of a 4-bit checkpoint were quantized here, and how to ``keep`` them."""
    warnings.warn(
        f"the 4-bit checkpoint stores the experts of {len(names)} mixture-of-experts layer(s) dense (e.g. {names[0]}; "
        f"bitsandbytes leaves them so) and they were quantized to NF4 while loading, so the outputs differ from "
        f"bitsandbytes' on this checkpoint (by the NF4 rounding of those tensors); {keep} keeps them as stored",
        QuantizedExpertsWarning, stacklevel=3)


@dataclass(frozen=True)
class BlockHook:
    """How :func:`load_4bit_model` loads block by block: ``find(model)`` names the blocks (module names, e.g.
    ``model.layers.0``; called once on the model still on the meta device, it may raise to refuse the model), and
    ``done(name, module)`` is called with each block as soon as every tensor of it is loaded (its linear layers in
    NF4, its other tensors, its computed buffers), before the next block is read. The hook may change the block in
    place (add adapters, shard it: the trainer's FSDP2 setup does both). The tensors outside the blocks are loaded
    after the last block.
    """

    find: Callable[[nn.Module], Sequence[str]]
    done: Callable[[str, nn.Module], None]
    #: optional: reads the blocks' weights (linear layers, fused experts) only in part, quantizing float ones
    #: (:class:`qlora_kernels.train.nf4_shards.ShardedQuantizer`; ``done`` then writes them into the shards)
    quantizer: Any = None


# ---------------------------------------------------------------------------------------------
# load_4bit_model


class _Checkpoint:
    """The tensors of a local safetensors checkpoint (one file or an index of shards), read one at a time."""

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not (path / f).is_file()]
            if absent:
                raise FileNotFoundError(f"{index} names shard files that {str(path)!r} lacks: {absent[:4]}")
        elif single.is_file():
            files, weight_map = [single.name], None
        else:
            others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {others}: only safetensors checkpoints are loaded)" if others else ""
            raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json{hint}")
        self._handles = {f: _open_safetensors(path / f) for f in files}
        self._path = path
        self._headers: dict[str, tuple[dict[str, Any], int]] = {}
        if weight_map is None:
            weight_map = {k: files[0] for k in self._handles[files[0]].keys()}
        else:
            held = {f: set(handle.keys()) for f, handle in self._handles.items()}
            lost = [(k, f) for k, f in weight_map.items() if k not in held[f]]
            if lost:
                raise ValueError(f"{index} maps tensors to shards that do not hold them: {lost[:4]}")
        self.where = weight_map

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> Tensor:
        """The tensor ``key``, read with plain file reads (see :meth:`elements`); a dtype torch cannot read from
        bytes through safetensors' mapping."""
        dtype, shape, _ = self.info(key)
        if dtype is None:
            return self._handles[self.where[key]].get_tensor(key)
        return self.elements(key).reshape(shape)

    def slice(self, key: str):
        """safetensors' lazy slice of ``key``: its ``get_shape()`` / ``get_dtype()`` without reading the tensor."""
        return self._handles[self.where[key]].get_slice(key)

    def info(self, key: str) -> tuple[torch.dtype | None, list[int] | None, int]:
        """``(dtype, shape, file offset of the data)`` of ``key`` from its file's header (read once a file); dtype
        and shape None when torch cannot read the dtype from bytes."""
        file = self.where[key]
        if file not in self._headers:
            with open(self._path / file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[file] = (json.loads(f.read(n)), 8 + n)
        header, data = self._headers[file]
        info = header[key]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        return dtype, (list(info["shape"]) if dtype is not None else None), data + info["data_offsets"][0]

    def elements(self, key: str, first: int = 0, stop: int | None = None) -> Tensor:
        """The flat elements ``[first, stop)`` (default: all) of the tensor ``key`` (row-major, as stored), 1-D, read
        from the file with plain reads: only those bytes are read, and none stays mapped (a mapped page once read
        counts in the process's RSS for as long as the file is open)."""
        dtype, shape, offset = self.info(key)
        if dtype is None:
            raise TypeError(f"{key!r}: torch cannot read its dtype from bytes")
        numel = math.prod(shape)
        stop = numel if stop is None else stop
        if not 0 <= first <= stop <= numel:
            raise ValueError(f"elements [{first}, {stop}) of {key!r} (shape {shape}) are out of range")
        buf = bytearray((stop - first) * dtype.itemsize)
        if not buf:
            return torch.empty(0, dtype=dtype)
        with open(self._path / self.where[key], "rb") as f:
            f.seek(offset + first * dtype.itemsize)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{self._path / self.where[key]}: the data of {key!r} is cut short")
        return torch.frombuffer(buf, dtype=dtype)

    def columns(self, key: str, first: int, stop: int) -> Tensor:
        """Columns ``[first, stop)`` of the 2-D tensor ``key``, ``[rows, stop - first]``, read with plain reads of
        those elements of each row only (one open of the file)."""
        dtype, shape, offset = self.info(key)
        if dtype is None or len(shape) != 2:
            raise TypeError(f"{key!r}: columns of a 2-D tensor of a dtype torch reads from bytes; got {shape}")
        rows, cols = shape
        if not 0 <= first <= stop <= cols:
            raise ValueError(f"columns [{first}, {stop}) of {key!r} (shape {shape}) are out of range")
        width = (stop - first) * dtype.itemsize
        buf = bytearray(rows * width)
        if not buf:
            return torch.empty(rows, stop - first, dtype=dtype)
        view = memoryview(buf)
        with open(self._path / self.where[key], "rb") as f:
            for r in range(rows):
                f.seek(offset + (r * cols + first) * dtype.itemsize)
                if f.readinto(view[r * width:(r + 1) * width]) != width:
                    raise ValueError(f"{self._path / self.where[key]}: the data of {key!r} is cut short")
        return torch.frombuffer(buf, dtype=dtype).reshape(rows, stop - first)


def _read_index(index: Path) -> dict[str, str]:
    """``weight_map`` of a ``model.safetensors.index.json``; ValueError naming the file when it is not one."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{index} is not valid JSON: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = type(data).__name__ if not isinstance(data, dict) else f"keys {sorted(data)[:6]}"
        raise ValueError(f"{index} must be a JSON object with a non-empty 'weight_map' (tensor name -> shard file); "
                         f"got {got}")
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v or "/" in v or v.startswith(".")]
    if bad:
        raise ValueError(f"{index}: weight_map values must be shard file names in the same directory; got {bad[:3]}")
    return weight_map


def _open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{file} is not a readable safetensors file: {exc}") from None


class _KeyPlan:
    """Which checkpoint tensors fill which tensors of the model, by transformers' own loading rules.

    transformers 5 renames checkpoint keys and builds some tensors from several (its checkpoint conversion
    mapping: ``embed_out`` -> ``lm_head`` for GPT-NeoX, Mixtral's ``block_sparse_moe`` -> ``mlp`` and per-expert
    ``experts.N.w1/w3`` fused into the 3-D ``experts.gate_up_proj``, ...). This applies the same
    ``WeightRenaming`` / ``WeightConverter`` list (``get_model_conversion_mapping``) with the same key-renaming
    function, including its handling of the ``base_model_prefix``. With transformers < 5 (no such mapping) keys
    are the model's own names, with the base_model_prefix added or dropped.

    Attributes:
        direct: model key -> checkpoint key, for tensors read as stored; a 4-bit weight's companions keep their
            suffix (``'<layer>.weight.absmax'``).
        converters: model key -> the converter (a copy of transformers') that builds it, its sources collected.
        converter_keys: model key -> source pattern -> the checkpoint keys collected for it, in the order the
            converter takes them.
        unexpected: checkpoint keys the model does not take.
        expected: the model's state-dict keys (as dict keys, in order), as the plan was made.
    """

    def __init__(self, ckpt: _Checkpoint, model: nn.Module) -> None:
        self.direct: dict[str, str] = {}
        self.converters: dict = {}
        self.converter_keys: dict[str, dict[str, list[str]]] = {}
        self.unexpected: list[str] = []
        self.expected = expected = {k: True for k in model.state_dict(keep_vars=True)}
        prefix = getattr(model, "base_model_prefix", "") or ""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
        except ImportError:  # transformers < 5
            rename, ordered, by_pattern = self._prefix_only(prefix, expected), sorted(ckpt.keys()), {}
        else:
            mapping = get_model_conversion_mapping(model) if hasattr(model, "config") else []
            renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
            converters = [t for t in mapping if isinstance(t, WeightConverter)]
            by_pattern = {p: c for c in converters for p in c.source_patterns}
            ordered = sorted(ckpt.keys(), key=dot_natural_key)  # the order converters stack experts in

            def rename(key: str) -> tuple[str, str | None]:
                # as transformers' convert_and_load_state_dict_in_model does
                renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
                if renamed not in expected and key in expected:
                    renamed, pattern = rename_source_key(key, [], [], prefix, expected)
                return renamed, pattern

        for key in ordered:
            base, suffix = bnb_format.split_state_key(key)
            renamed, pattern = rename(base)
            if renamed not in expected:
                self.unexpected.append(key)
            elif pattern is None:
                self.direct[renamed + suffix] = key
            elif suffix:
                raise ValueError(f"checkpoint tensor {key!r} is a 4-bit (bitsandbytes) part of {base!r}, which "
                                 f"transformers builds into {renamed!r} from several tensors; only float tensors can "
                                 f"be converted so: load a full-precision checkpoint of this model instead")
            else:
                converter = self.converters.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
                converter.add_tensor(renamed, key, pattern, lambda key=key: ckpt.get(key))
                self.converter_keys.setdefault(renamed, {}).setdefault(pattern, []).append(key)

    @staticmethod
    def _prefix_only(prefix: str, expected: dict):
        def rename(key: str) -> tuple[str, None]:
            for candidate in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}") if prefix else (key,):
                if candidate in expected:
                    return candidate, None
            return key, None

        return rename


def _check_unexpected(model: nn.Module, unexpected: list[str], path: Path, strict: bool) -> None:
    """Checkpoint tensors the model does not take: an error listing them (``strict``), else a warning listing
    them. Keys transformers itself ignores for this model (``_keys_to_ignore_on_load_unexpected``, stale rotary
    ``inv_freq`` / ``position_ids`` buffers) are dropped first, with transformers' own rule where it has one."""
    if not unexpected:
        return
    info = type("LoadingInfo", (), {})()
    info.missing_keys, info.unexpected_keys = set(), set(unexpected)
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if callable(adjust):
        adjust(info)
    else:  # transformers < 5
        patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
        info.unexpected_keys = {k for k in unexpected if not any(re.search(p, k) for p in patterns)}
    keys = [k for k in unexpected if k in info.unexpected_keys]
    if not keys:
        return
    hint = ""
    if any(re.search(r"\.lora_[AB]\.", k) for k in keys):
        hint = (" (lora_A / lora_B tensors are LoRA adapters, not part of the base model: keep them in a PEFT adapter "
                "directory and load it with load_adapter)")
    msg = (f"checkpoint {str(path)!r} holds {len(keys)} tensors that {type(model).__name__} does not take: "
           f"{keys[:8]}{' ...' if len(keys) > 8 else ''}{hint}")
    if strict:
        raise ValueError(msg + "; pass strict=False to load the rest anyway (with a warning listing them)")
    logger.warning("load_4bit_model: %s; ignored (strict=False)", msg)


def _checked_value(key: str, value: Tensor, target: Tensor) -> None:
    """A checkpoint tensor must have its model tensor's shape and kind (floating point or not)."""
    if list(value.shape) != list(target.shape):
        raise ValueError(f"checkpoint's {key!r} has shape {list(value.shape)}; the model expects {list(target.shape)}")
    if value.is_floating_point() != target.is_floating_point():
        raise TypeError(f"checkpoint tensor {key!r} is {value.dtype}; the model's tensor is {target.dtype} (a "
                        f"{'floating-point' if target.is_floating_point() else 'non-float'} tensor): a quantized "
                        f"tensor needs a quantization_config in config.json that describes it")


def load_4bit_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: Sequence[str] | None = None,
    strict: bool = True,
    trust_remote_code: bool = False,
    model_class=None,
    quantize_experts: bool = True,
    block_hook: BlockHook | None = None,
    num_labels: int | None = None,
) -> nn.Module:
    """Load a local Hugging Face model directory with its linear layers in NF4, never holding the
    full-precision model in memory.

    The model is built on the meta device from ``config.json``; its tensors are then read from the safetensors
    files one at a time, under the names transformers 5 gives them when it loads the same directory (its
    checkpoint conversion mapping: renamed keys such as GPT-NeoX's ``embed_out``, Mixtral's ``block_sparse_moe``,
    per-expert tensors fused into 3-D expert tensors; see :class:`_KeyPlan`):

    * a bitsandbytes 4-bit checkpoint (``config.json`` has a bitsandbytes nf4 ``quantization_config``, as
      transformers writes it with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``): each
      quantized layer (``<name>.weight`` + ``weight.absmax`` / ``quant_map`` / ``nested_*`` /
      ``quant_state.bitsandbytes__nf4``) becomes an :class:`~qlora_kernels.nn.NF4Linear` on the stored bytes,
      no requantizing; layers stored unquantized (e.g. ``llm_int8_skip_modules``) stay dense;
    * a float checkpoint (fp32 / fp16 / bf16): each linear layer but the output embedding (lm_head) and
      ``skip_modules`` is read, cast to ``dtype``, quantized (``blocksize``, ``double_quant``) and dropped
      before the next one is read, so the peak memory is the 4-bit model plus one layer (tensors transformers
      builds from several, such as fused MoE experts, are built first; they stay dense).

    Every other tensor (embeddings, norms, biases, routers, expert tensors, unquantized layers) is read in
    ``dtype`` (floating point only; modules the model class keeps in fp32 stay fp32). Buffers that are computed,
    not stored (rotary frequencies, embedding scales) are initialised by the model class. Every NF4 layer records
    ``dtype`` as its ``compute_dtype`` (what :func:`merge_and_unload` merges into). The linear layers left dense
    are marked so: :func:`apply_qlora` on the result adds plain LoRA to them, and adapters on the stored NF4
    weights elsewhere.

    Args:
        path: a local directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: compute dtype of the model (and of the weights quantized here).
        device: where the model goes (default CPU); tensors are moved there one by one.
        skip_modules: linear layers (names or last components) not to quantize from a float checkpoint.
        strict: a checkpoint tensor the model does not take (after transformers' renaming, and but for the keys
            transformers itself ignores for this model) is an error listing them; ``strict=False`` loads the rest
            and logs a warning listing them (``torch.nn.Module.load_state_dict``'s convention).
        trust_remote_code: allow custom modelling code from the directory (off by default).
        model_class: the transformers class to build (default ``AutoModelForCausalLM``).
        quantize_experts: the fused experts of a mixture-of-experts model (transformers 5's 3-D
            ``experts.gate_up_proj`` / ``experts.down_proj``) become :class:`~qlora_kernels.nn.experts.NF4Experts`,
            quantized module by module as they are read (``blocksize``, ``double_quant``; they are dense in float
            and in bitsandbytes checkpoints alike), or taken as stored when the checkpoint holds them in NF4
            (as ``save_pretrained`` writes a model with NF4Experts that this function or ``apply_qlora`` made: fused,
            see :func:`~qlora_kernels.hf.experts.save_experts_fused`); the routers stay dense.
            Experts a 4-bit checkpoint stores dense (bitsandbytes leaves them so) are quantized with a
            :class:`QuantizedExpertsWarning` (the outputs then differ from bitsandbytes' on the same file).
            False keeps them as stored (dense, unless the checkpoint holds them in NF4).
        block_hook: load block by block and hand each finished block to the hook (see :class:`BlockHook`): the
            process then holds at most one block beyond what the hook keeps of the earlier ones (a float
            checkpoint's fused experts are built per block too). The tensors are the same as without it.
        num_labels: the outputs of a classification head (``config.num_labels``, as ``from_pretrained(path,
            num_labels=...)`` sets it), e.g. 1 for a reward model with
            ``model_class=AutoModelForSequenceClassification``.

    A task head on a checkpoint saved without it (a sequence-classification model, ``score`` or ``classifier``,
    built from a causal LM checkpoint) is initialised by the model class's ``_init_weights`` (under torch's RNG)
    and kept dense, and the checkpoint's ``lm_head`` tensors, which such a model has no place for, are skipped:
    what transformers' ``from_pretrained`` does for the same directory (it reports them as MISSING and
    UNEXPECTED); both are logged at info level.

    Returns:
        The model, in eval mode, with ``model.config`` free of ``quantization_config``.

    Raises:
        FileNotFoundError: no config.json, no safetensors checkpoint, a shard the index names is absent.
        ValueError naming the file or tensor: a damaged index or safetensors file, tensors the model lacks or
            does not take (``strict``), a shape that does not fit, a non-finite weight to quantize, a bad 4-bit
            weight. TypeError naming the tensor: a non-float tensor where the model has a float one (an int8
            weight in a float checkpoint is not quantized as if it were one), a bad ``dtype``.
    """
    from transformers import AutoConfig, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path must be a local model directory with a config.json; got {str(path)!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool; got {strict!r}")
    device = torch.device("cpu" if device is None else device)
    check_spec(skip_modules, "skip_modules", allow_none=True)

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int; got {num_labels!r}")
        config.num_labels = num_labels
    quant = bnb_format.read_quantization_config(config)
    if quant is not None:
        delattr(config, "quantization_config")
    ckpt = _Checkpoint(path)
    model = _build_on_meta(config, dtype, model_class, trust_remote_code)
    plan = _KeyPlan(ckpt, model)
    new_heads = _new_task_heads(model, plan)
    if new_heads:
        skipped = [k for k in plan.unexpected if k.startswith("lm_head.")]
        plan.unexpected = [k for k in plan.unexpected if k not in skipped]
        logger.info("load_4bit_model: %s is new (initialised, not in the checkpoint); skipped the checkpoint's %s",
                    ", ".join(new_heads), ", ".join(skipped) or "nothing")
    _check_unexpected(model, plan.unexpected, path, strict)
    blocks = _blocks(model, block_hook)
    for name in new_heads:  # first, whether or not blocks are handed to a hook: the same draws either way
        _init_new_head(model, model.get_submodule(name), dtype, device)
    sources = _Sources(ckpt, plan, model, path)
    four_bit = quant is not None or any(bnb_format.is_nf4_quant_state_key(k) for k in plan.direct)
    quantize = None if four_bit else dict(blocksize=blocksize, double_quant=double_quant,
                                          keep_dense=output_embedding_names(model), skip=list(skip_modules or []))
    experts = dict(blocksize=blocksize, double_quant=double_quant) if quantize_experts else None
    loaded: dict[int, Tensor] = {}  # tensors read so far by id of their meta stand-in (tied twins)
    quantized_experts: list[str] = []

    in_part = block_hook.quantizer if block_hook is not None else None  # reads the weights 1/N (FSDP2)

    def load(modules: Callable[[], list[tuple[str, nn.Module]]], prefix: str | None) -> int:
        # (modules(): the part's modules by full name, as they are now: each step replaces some)
        block_part = in_part if prefix else None  # inside a block: its weights; outside: the input embedding
        # 0. the tensors transformers builds from several (fused experts, split qkv, ...) of this part; read in part,
        # those that only stack whole tensors (per-expert weights) wait for step 1b (or are built when taken)
        sources.convert(prefix, defer_stacked=block_part is not None)
        # 1. linear layers -> NF4Linear (stored NF4, or quantized here), one at a time
        n = _load_linear_layers(model, modules(), sources, path, dtype, device, quantize, sharded=block_part)
        # 1b. fused MoE experts -> NF4Experts (stored NF4, or quantized here), one module at a time
        quantized_experts.extend(_load_experts(model, modules(), sources, path, dtype, device, experts,
                                               sharded=block_part))
        # 2. every other parameter and persistent buffer, in dtype; tied parameters stay tied
        _load_other_tensors(model, modules(), sources, path, dtype, device, loaded, new_heads,
                            sharded=None if prefix else in_part)
        # 3. computed buffers (rotary inv_freq, embed scales): let the model class initialise them
        _init_computed_buffers(model, modules(), device)
        return n

    done = 0
    for name in blocks:  # with a block hook: each block complete, then handed over
        block = model.get_submodule(name)
        done += load(lambda name=name, block=block: [(f"{name}.{n}" if n else name, m)
                                                     for n, m in block.named_modules()], f"{name}.")
        block_hook.done(name, block)
    inside = tuple(f"{b}." for b in blocks)
    done += load(lambda: [(n, m) for n, m in model.named_modules() if n not in blocks and not n.startswith(inside)],
                 None)
    if four_bit and quantized_experts:
        warn_quantized_experts(quantized_experts, "load_4bit_model(..., quantize_experts=False)")
    model.eval()
    if (path / "generation_config.json").is_file():
        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    with contextlib.suppress(AttributeError):
        model.config._name_or_path = str(path)
    record_bnb4_config(model)
    moe.save_experts_fused(model)
    logger.info("load_4bit_model: %d linear layers in NF4 (%s)", done,
                "stored bitsandbytes 4-bit" if four_bit else "quantized while loading")
    return model


def bnb_quantization_config(model: nn.Module) -> Any:
    """The ``BitsAndBytesConfig`` that describes ``model``'s NF4 layers as their state dict stores them (bitsandbytes'
    keys): nf4, double quantization if any layer has it, the layers' compute dtype, and every dense linear layer in
    ``llm_int8_skip_modules``. With it as ``model.config.quantization_config``, ``save_pretrained`` writes a checkpoint
    that ``from_pretrained`` loads with bitsandbytes (and :func:`~qlora_kernels.load_4bit_model` without it). ValueError
    when the model has no NF4 layer."""
    from transformers import BitsAndBytesConfig

    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no NF4Linear layers to describe")
    dense = sorted(name for name, _, kind in linear_modules(model) if kind in ("linear", "conv1d", "lora"))
    dtype = layers[0].compute_dtype or layers[0].nf4_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=any(m.nf4_nested_absmax is not None for m in layers),
        llm_int8_skip_modules=dense or None,
    )


class NF4LayersQuantizationConfig:
    """``config.quantization_config`` of a model whose 4-bit layers are this package's and that has no transformers
    quantizer (:func:`load_4bit_model`, :func:`~qlora_kernels.apply_qlora`): serialized (``config.json`` from
    ``save_pretrained``, ``config.to_dict()``) as bitsandbytes' description of the NF4 layers the model has at that
    moment (:func:`bnb_quantization_config`), so that transformers + bitsandbytes reload the checkpoint in 4 bits as
    the ``from_pretrained`` route's; as null once no NF4 layer is left (a dense merge, PEFT's
    ``merge_and_unload``), which transformers reads as a plain model. Attributes read through it are the current
    description's (``quant_method``, ``bnb_4bit_quant_type``, ...). A copy or a pickle is a plain dict snapshot."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    def _current(self) -> Any:
        from ..nn.experts import NF4Experts

        model = self._model()
        if model is None:
            return None
        modules = list(model.modules())
        if not any(isinstance(m, NF4Linear) for m in modules) or any(isinstance(m, NF4Experts) for m in modules):
            return None  # nothing 4-bit, or experts bitsandbytes cannot read: no bitsandbytes checkpoint
        return bnb_quantization_config(model)

    def to_dict(self) -> dict[str, Any] | None:
        current = self._current()
        return None if current is None else current.to_dict()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        current = self._current()
        if current is None:
            raise AttributeError(f"the model has no NF4 layer left to describe ({name!r})")
        return getattr(current, name)

    def __deepcopy__(self, memo: dict) -> dict[str, Any] | None:
        return self.to_dict()

    def __reduce__(self) -> tuple:
        return (dict, (self.to_dict() or {},))

    def __repr__(self) -> str:
        return f"NF4LayersQuantizationConfig({self.to_dict()})"


def record_bnb4_config(model: nn.Module) -> None:
    """Give a model without transformers' quantizer (that one describes the model itself when it saves) an
    :class:`NF4LayersQuantizationConfig` as ``config.quantization_config``."""
    config = getattr(model, "config", None)
    if config is not None and getattr(model, "hf_quantizer", None) is None:
        config.quantization_config = NF4LayersQuantizationConfig(model)


def _build_on_meta(config, dtype: torch.dtype, model_class, trust_remote_code: bool) -> nn.Module:
    """The model of ``config`` on the meta device, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM if model_class is None else model_class
    # Auto classes build with from_config; concrete model classes with _from_config.
    auto = hasattr(model_class, "from_config")
    build = model_class.from_config if auto else model_class._from_config
    extra = {"trust_remote_code": trust_remote_code} if auto else {}
    with torch.device("meta"):
        try:
            return build(config, dtype=dtype, **extra)
        except TypeError:  # transformers < 5 spells it torch_dtype
            return build(config, torch_dtype=dtype, **extra)


def _blocks(model: nn.Module, hook: BlockHook | None) -> list[str]:
    """The block names ``hook.find`` gives for the meta model (none without a hook), checked: existing modules,
    none inside another."""
    if hook is None:
        return []
    names = list(hook.find(model))
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        raise ValueError(f"block_hook.find named modules that {type(model).__name__} does not have: {unknown[:4]}")
    nested = [n for n in names if any(n.startswith(o + ".") for o in names)]
    if nested or len(set(names)) != len(names):
        raise ValueError(f"block_hook.find named blocks inside other blocks (or twice): {(nested or names)[:4]}")
    return names


def _stacked_layout(converter: Any, keys: dict[str, list[str]]) -> list[str] | None:
    """The checkpoint keys, in order, whose elements laid end to end are the tensor transformers' ``converter``
    builds, when it only stacks whole tensors: ``MergeModulelist(dim=0)`` of one source pattern (Mixtral's per-expert
    ``w2`` into ``down_proj`` ``[E, H, I]``), or ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)`` of several
    (per-expert ``w1`` and ``w3`` into ``gate_up_proj`` ``[E, 2I, H]``: expert by expert, its tensor of each pattern
    in the converter's order); None for any other conversion (``keys``: the checkpoint keys of each source pattern,
    in the order the converter stacks them)."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(converter, "operations", None) or ()]
    patterns = list(getattr(converter, "source_patterns", None) or ())
    if getattr(converter, "quantization_operation", None) is not None or not patterns or any(
            not keys.get(pat) for pat in patterns):
        return None
    lists = [keys[pat] for pat in patterns]
    if ops == [("MergeModulelist", 0)] and len(lists) == 1:
        return list(lists[0])
    if ops == [("MergeModulelist", 0), ("Concatenate", 1)] and len({len(k) for k in lists}) == 1 and getattr(
            converter.operations[1], "num_shards_attribute", None) is None:
        return [k for expert in zip(*lists) for k in expert]
    return None


class _Sources:
    """One reader for every model tensor: built by a conversion (handed out once) or read from the checkpoint.

    The tensors transformers builds from several checkpoint tensors (fused experts, split qkv, ...) are built by
    :meth:`convert`: all at once, or those of one block (by the name prefix) with the block."""

    def __init__(self, ckpt: _Checkpoint, plan: _KeyPlan, model: nn.Module, path: Path) -> None:
        self.ckpt, self.plan, self.model, self.path = ckpt, plan, model, path
        self.built: dict[str, Tensor] = {}
        self.pending = dict(plan.converters)  # model key -> converter not run yet

    def convert(self, prefix: str | None = None, defer_stacked: bool = False) -> None:
        """Run the conversions not run yet of the model keys under ``prefix`` (a block's ``"<name>."``; None: all;
        a conversion's outputs lie in the block of its first key). ``defer_stacked``: leave those that only stack
        whole tensors (:func:`_stacked_layout`) for :meth:`stacked` to read in part, or :meth:`take` to build."""
        for first in [k for k in self.pending if prefix is None or k.startswith(prefix)]:
            if not (defer_stacked and _stacked_layout(self.pending[first], self.plan.converter_keys.get(first, {}))):
                self._convert(first)

    def stacked(self, key: str, shape: torch.Size) -> tuple[list[str], torch.dtype] | None:
        """``(checkpoint keys, dtype)`` of model key ``key`` of ``shape`` (3-D) when a conversion not run yet only
        stacks whole float tensors into it (:func:`_stacked_layout`), stored in one dtype, whose elements laid end to
        end in that order are its own; else None."""
        converter = self.pending.get(key)
        layout = _stacked_layout(converter, self.plan.converter_keys.get(key, {})) if converter is not None else None
        if not layout or len(shape) != 3 or len(layout) % shape[0]:
            return None
        infos = [self.ckpt.info(k) for k in layout]
        dtypes = {dtype for dtype, _, _ in infos}
        dtype = next(iter(dtypes))
        if len(dtypes) != 1 or dtype is None or not dtype.is_floating_point:
            return None
        group = len(layout) // shape[0]  # per expert: its tensor of each source pattern
        for e in range(shape[0]):
            shapes = [info[1] for info in infos[e * group:(e + 1) * group]]
            if any(len(sh) != 2 or sh[1] != shape[2] for sh in shapes) or sum(sh[0] for sh in shapes) != shape[1]:
                return None
        return layout, dtype

    def read_stacked(self, keys: list[str], first: int, stop: int) -> Tensor:
        """Flat elements ``[first, stop)`` of the tensors ``keys`` laid end to end (:meth:`stacked`), read with plain
        reads of those elements only."""
        parts, at = [], 0
        for key in keys:
            n = math.prod(self.ckpt.info(key)[1])
            a, b = max(first, at), min(stop, at + n)
            if a < b:
                parts.append(self.ckpt.elements(key, a - at, b - at))
            at += n
        return torch.cat(parts) if parts else self.ckpt.elements(keys[0], 0, 0)

    def drop(self, key: str) -> None:
        """Forget the conversion of ``key``: its tensor was read another way (:meth:`stacked`)."""
        self.pending.pop(key)

    def _convert(self, first: str) -> None:
        converter = self.pending.pop(first)
        model = self.model
        try:
            out = converter.convert(first, model=model, config=model.config)
        except Exception as exc:  # an op of transformers' conversion: name the tensors it was given
            sources = sorted(converter.layer_targets.get(first, ()))
            raise ValueError(f"checkpoint {str(self.path)!r}: transformers' conversion of {sources[:4]}"
                             f"{' ...' if len(sources) > 4 else ''} into {first!r} failed: {exc}") from None
        for key, value in out.items():
            value = value[0] if isinstance(value, list) else value
            if key not in self.plan.expected:
                raise ValueError(f"transformers' conversion of checkpoint tensors into {first!r} made {key!r}, which "
                                 f"{type(model).__name__} does not have")
            self.built[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self.plan.direct or key in self.built or key in self.pending

    def take(self, key: str) -> tuple[str, Tensor] | None:
        """(the checkpoint key to name in messages, the tensor) for a model key, or None when not stored; a
        conversion deferred (:meth:`convert`) runs now."""
        if key in self.pending:
            self._convert(key)
        if key in self.built:
            return key, self.built.pop(key)
        if key in self.plan.direct:
            return self.plan.direct[key], self.ckpt.get(self.plan.direct[key])
        return None

    def nf4_weight(self, wkey: str, sharded: Any = None, name: str = "", prefix: str = "nf4_",
                   device: torch.device | None = None) -> NF4Weight | None:
        """The stored 4-bit weight ``wkey`` (a bitsandbytes quant state beside it), or None when stored otherwise.
        ``sharded`` (a :class:`BlockHook`'s ``quantizer``): its packed codes (uint8) are read only in the part
        this rank's shard holds, for module ``name`` under the attributes ``prefix + "packed"`` ..., on
        ``device``; the small tensors are read whole."""
        direct = self.plan.direct
        if not bnb_format.has_quant_state(direct, wkey):
            return None
        context = f"checkpoint {str(self.path)!r},"
        stored, shape, _ = self.ckpt.info(direct[wkey]) if sharded is not None else (None, None, 0)
        if stored is not torch.uint8:
            return _read_nf4_weight(self.ckpt, direct, wkey, context)
        placeholder = torch.empty(shape, dtype=torch.uint8, device=device)  # address space: never filled
        qw = _read_nf4_weight(self.ckpt, direct, wkey, context, packed=placeholder)
        key = direct[wkey]
        return sharded.read_stored(name, prefix, qw, lambda a, b: self.ckpt.elements(key, a, b).to(device))


def _read_nf4_weight(ckpt: _Checkpoint, direct: dict[str, str], wkey: str, context: str,
                     packed: Tensor | None = None) -> NF4Weight:
    """The 4-bit weight of model key ``wkey`` from its bitsandbytes entries in ``ckpt`` (``direct``: model key ->
    checkpoint key); ``packed``: its codes when already read, the other entries then go to their device. A bad
    weight is a ValueError / TypeError naming its checkpoint key after ``context``."""
    keys = [k for k in bnb_format.state_keys(wkey) if k in direct]
    if packed is None:
        sd = {k: ckpt.get(direct[k]) for k in keys}
    else:
        sd = {k: packed if k == wkey else ckpt.get(direct[k]).to(packed.device) for k in keys}
    try:
        return NF4Weight.from_bnb_state_dict(sd, wkey)  # nf4 (fp4 is refused there)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{context} 4-bit weight {direct.get(wkey, wkey)!r}: {exc}") from None


def _load_linear_layers(model: nn.Module, modules: list[tuple[str, nn.Module]], sources: _Sources, path: Path,
                        dtype: torch.dtype, device: torch.device, quantize: dict | None, sharded: Any = None) -> int:
    """Of ``modules`` (full names in ``model``), put an :class:`NF4Linear` in place of every dense linear layer stored
    in 4 bits, and, when ``quantize`` (a float checkpoint: ``blocksize``, ``double_quant``, ``keep_dense`` names,
    ``skip`` specs) is given, of every other stored one but those kept dense, quantized here; mark the rest kept
    dense. ``sharded`` (a :class:`BlockHook`'s ``quantizer``): a float weight stored as it is (a ``Linear``'s or a
    ``Conv1D``'s, not built by a conversion) is quantized through it from the elements it asks for. Returns how
    many."""
    done = 0
    for name, module in modules:
        kind = layer_kind(module)
        if kind not in ("linear", "conv1d"):
            continue
        conv = kind == "conv1d"
        out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if conv else tuple(module.weight.shape)
        wkey = f"{name}.weight"
        qw = sources.nf4_weight(wkey, None if conv else sharded, name, device=device)
        if qw is not None:
            if tuple(qw.shape) != (out_f, in_f):
                ckpt_wkey = sources.plan.direct.get(wkey, wkey)
                raise ValueError(f"checkpoint's {ckpt_wkey!r} has shape {list(qw.shape)}; the model from config.json "
                                 f"expects {[out_f, in_f]} (out_features, in_features)")
            qw = qw.to(device)
        elif quantize is not None and name not in quantize["keep_dense"] and not (
                quantize["skip"] and matches(name, quantize["skip"])) and wkey in sources:
            if sharded is not None and wkey in sources.plan.direct:
                qw = _quantize_in_part(sharded, name, sources, wkey, module.weight, dtype, device, quantize,
                                       conv=conv)
            else:
                qw = _quantize_whole(sources, name, wkey, module.weight, dtype, device, quantize, conv)
        else:
            setattr(module, KEEP_DENSE, True)  # stays dense: loaded with the other tensors
            continue
        bias = None
        if module.bias is not None:
            found = sources.take(f"{name}.bias")
            if found is None:
                raise ValueError(f"checkpoint {str(path)!r} lacks {name}.bias")
            _checked_value(found[0], found[1], module.bias)
            bias = found[1].to(device=device, dtype=dtype)
        layer = NF4Linear(qw, bias, fan_in_fan_out=conv)
        layer.compute_dtype = dtype
        replace_module(model, name, layer)
        done += 1
    return done


def _quantize_whole(sources: _Sources, name: str, wkey: str, target: Tensor, dtype: torch.dtype,
                    device: torch.device, quantize: dict, conv: bool) -> NF4Weight:
    """The stored float weight ``wkey`` of layer ``name``, read whole, quantized to NF4."""
    ckpt_wkey, w = sources.take(wkey)
    _checked_value(ckpt_wkey, w, target)
    w = w.to(device=device, dtype=dtype)
    try:
        return quantize_nf4(w.t() if conv else w, blocksize=quantize["blocksize"],
                            double_quant=quantize["double_quant"])
    except ValueError as exc:
        raise ValueError(f"checkpoint tensor {ckpt_wkey!r} (the weight of {name}): {exc}") from None


def _quantize_in_part(sharded: Any, name: str, sources: _Sources, wkey: str, target: Tensor, dtype: torch.dtype,
                      device: torch.device, quantize: dict, module: str | None = None,
                      prefix: str = "nf4_", conv: bool = False,
                      stacked: tuple[list[str], torch.dtype] | None = None) -> NF4Weight:
    """The stored float weight ``wkey`` of ``name`` quantized through ``sharded``, which reads the elements it
    needs (plain reads of those elements; nothing else of the tensor is read); held by ``module`` (default
    ``name``) under the attributes ``prefix + "packed"`` ... ``wkey`` is stored as it is, or stacked from whole
    tensors by a conversion (``stacked``: what :meth:`_Sources.stacked` gave for it; per-expert weights of fused
    experts). ``conv``: a Conv1D
    weight, stored ``[in, out]`` and quantized transposed (as :func:`_quantize_whole` does): the rows of the
    transpose a rank needs are columns of the stored tensor, read row by row (:meth:`_Checkpoint.columns`)."""
    if stacked is not None:
        keys, stored = stacked
        sources.drop(wkey)
        ckpt_wkey, shape = f"{keys[0]} ... ({len(keys)} tensors stacked)", target.shape

        def read(first: int, stop: int) -> Tensor:
            return sources.read_stacked(keys, first, stop).to(device=device, dtype=dtype)
    else:
        ckpt_wkey = sources.plan.direct[wkey]
        stored, shape, _ = sources.ckpt.info(ckpt_wkey)
        if stored is None:  # a dtype torch cannot read from bytes (float8, ...): read whole, as without a quantizer
            return _quantize_whole(sources, name, wkey, target, dtype, device, quantize, conv=False)
        shape = torch.Size(shape)
        _checked_value(ckpt_wkey, torch.empty(shape, dtype=stored, device="meta"), target)
        if conv:  # quantized as the transpose [out, in]: its flat elements from columns of the stored [in, out]
            inner, shape = shape[0], torch.Size([shape[1], shape[0]])

            def read(first: int, stop: int) -> Tensor:
                r0, r1 = first // inner, -(-stop // inner)
                rows = sources.ckpt.columns(ckpt_wkey, r0, r1).t().reshape(-1)
                return rows[first - r0 * inner:stop - r0 * inner].to(device=device, dtype=dtype)
        else:
            def read(first: int, stop: int) -> Tensor:
                return sources.ckpt.elements(ckpt_wkey, first, stop).to(device=device, dtype=dtype)

    try:
        return sharded.quantize(module or name, prefix, read, shape, dtype, device, quantize["blocksize"],
                                quantize["double_quant"], itemsize=stored.itemsize)
    except ValueError as exc:
        raise ValueError(f"checkpoint tensor {ckpt_wkey!r} (the weight of {name}): {exc}") from None


def _load_experts(model: nn.Module, modules: list[tuple[str, nn.Module]], sources: _Sources, path: Path,
                  dtype: torch.dtype, device: torch.device, quantize: dict | None, sharded: Any = None) -> list[str]:
    """Of ``modules``, put an :class:`NF4Experts` in place of every fused-experts module whose two tensors are stored
    in NF4, and, when ``quantize`` (``blocksize``, ``double_quant``) is given, of every other one, its tensors read,
    cast to ``dtype`` and quantized one module at a time. ``sharded``: as for :func:`_load_linear_layers` (tensors
    stored fused, as the model holds them, or one by one and stacked by the conversion: :meth:`_Sources.stacked`).
    Returns the names of those quantized here."""
    quantized = []
    for name, module in modules:
        if not moe.is_fused_experts(module):
            continue
        keys = [f"{name}.{p}" for p in moe.PROJECTIONS]
        both = all(bnb_format.has_quant_state(sources.plan.direct, k) for k in keys)  # else none is read in part
        stored = [sources.nf4_weight(k, sharded if both else None, name, f"{p}_", device)
                  for k, p in zip(keys, moe.PROJECTIONS)]
        if all(qw is not None for qw in stored):
            for qw, key, proj in zip(stored, keys, moe.PROJECTIONS):
                if tuple(qw.shape) != tuple(getattr(module, proj).shape):
                    raise ValueError(f"checkpoint's 4-bit {sources.plan.direct.get(key, key)!r} has shape "
                                     f"{list(qw.shape)}; the model expects {list(getattr(module, proj).shape)}")
            weights = [qw.to(device) for qw in stored]
        elif quantize is not None and all(k in sources for k in keys):
            weights = []
            for key, proj in zip(keys, moe.PROJECTIONS):
                layout = None if sharded is None or key in sources.plan.direct else sources.stacked(
                    key, getattr(module, proj).shape)
                if sharded is not None and (key in sources.plan.direct or layout is not None):
                    weights.append(_quantize_in_part(sharded, f"{name}.{proj}", sources, key, getattr(module, proj),
                                                     dtype, device, quantize, module=name, prefix=f"{proj}_",
                                                     stacked=layout))
                    continue
                ckpt_key, w = sources.take(key)
                _checked_value(ckpt_key, w, getattr(module, proj))
                try:
                    weights.append(quantize_nf4(w.to(device=device, dtype=dtype), blocksize=quantize["blocksize"],
                                                double_quant=quantize["double_quant"]))
                except ValueError as exc:
                    raise ValueError(f"checkpoint tensor {ckpt_key!r} ({name}.{proj}): {exc}") from None
                del w
            quantized.append(name)
        else:
            continue
        replace_module(model, name, moe.nf4_experts(module, weights))
    return quantized


def _new_task_heads(model: nn.Module, plan: _KeyPlan) -> list[str]:
    """The sequence-classification heads of ``model`` (``score``, ``classifier``: PEFT's names of them) that the
    checkpoint has no tensor for: a causal LM checkpoint loaded into a model of another task."""
    heads = []
    for name in SEQ_CLS_HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and not any(k == name or k.startswith(name + ".") for k in plan.direct):
            if not any(k.startswith(name + ".") for k in plan.converters):
                heads.append(name)
    return heads


def _init_new_head(model: nn.Module, module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """A new task head off the meta device, initialised by the model class (``_init_weights``), in ``dtype``."""
    module.to_empty(device=device)
    init = getattr(model, "_init_weights", None)
    with torch.no_grad():
        if callable(init):
            init(module)
        else:
            module.reset_parameters()
    module.to(dtype)


def _load_other_tensors(model: nn.Module, modules: list[tuple[str, nn.Module]], sources: _Sources, path: Path,
                        dtype: torch.dtype, device: torch.device, loaded: dict[int, Tensor],
                        new_heads: Sequence[str] = (), sharded: Any = None) -> None:
    """Every parameter and persistent buffer of ``modules`` still on the meta device, outside the NF4 layers: read in
    ``dtype`` (floating point only; the model class's fp32 modules in fp32); tied parameters stay tied (``loaded``:
    what earlier calls read, by id of the meta stand-in). The modules ``new_heads`` (top-level names) are skipped:
    they were initialised before anything was read (:func:`_init_new_head`). ``sharded`` (a :class:`BlockHook`'s
    ``quantizer``): the parameters it names in ``dense_rows`` (the input embedding) are read only in the rows this
    rank's shard holds."""
    modules = [(n, m) for n, m in modules if not any(n == h or n.startswith(h + ".") for h in new_heads)]
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    entries = []
    for mname, module in modules:
        if isinstance(module, NF4Linear):
            continue
        own = [(n, t, True) for n, t in module._parameters.items() if t is not None]
        own += [(n, t, False) for n, t in module._buffers.items()
                if t is not None and n not in module._non_persistent_buffers_set]
        entries += [(module, f"{mname}.{n}" if mname else n, n, t, p) for n, t, p in own if t.device.type == "meta"]
    for _, full, _, t, is_param in entries:
        if id(t) in loaded:
            continue  # already read via a tied twin
        if sharded is not None and is_param and full in sharded.dense_rows and full in sources.plan.direct \
                and t.is_floating_point():
            key = sources.plan.direct[full]
            stored, shape, _ = sources.ckpt.info(key)
            if stored is not None and stored.is_floating_point and shape:
                _checked_value(key, torch.empty(shape, dtype=stored, device="meta"), t)
                fp32 = any(re.search(rf"(^|\.){re.escape(k)}(\.|$)", full) for k in keep_fp32)
                mname, _, attr = full.rpartition(".")
                loaded[id(t)] = nn.Parameter(sharded.read_rows(
                    mname, attr, torch.Size(shape), torch.float32 if fp32 else dtype, device, stored.itemsize,
                    lambda a, b, key=key: sources.ckpt.elements(key, a, b)), requires_grad=t.requires_grad)
                continue
        found = sources.take(full)
        if found is None:
            continue  # absent (a tied weight is filled in below from its twin)
        key, value = found
        _checked_value(key, value, t)
        want = t.dtype
        if value.is_floating_point():
            fp32 = any(re.search(rf"(^|\.){re.escape(k)}(\.|$)", full) for k in keep_fp32)
            want = torch.float32 if fp32 else dtype
        value = value.to(device=device, dtype=want)
        loaded[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad) if is_param else value
    missing = []
    for module, full, tname, t, is_param in entries:
        if id(t) not in loaded:
            missing.append(full)
        elif is_param:
            module._parameters[tname] = loaded[id(t)]
        else:
            module._buffers[tname] = loaded[id(t)]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {len(missing)} tensors the model needs: {missing[:8]}")


def _init_computed_buffers(model: nn.Module, modules: list[tuple[str, nn.Module]], device: torch.device) -> None:
    """The non-persistent buffers of ``modules`` still on the meta device (rotary inv_freq, embedding scales),
    initialised by the model class (``_init_weights``) on ``device``."""
    owners = {}
    for mname, module in modules:
        for bname, buf in module._buffers.items():
            if buf is not None and buf.device.type == "meta":
                if bname not in module._non_persistent_buffers_set:
                    raise ValueError(f"buffer {mname}.{bname} was not in the checkpoint")
                # a sentinel, to tell afterwards whether the model class filled it in
                fill = float("nan") if buf.is_floating_point() else -1
                module._buffers[bname] = torch.full(buf.shape, fill, dtype=buf.dtype, device=device)
                owners.setdefault(mname, (module, []))[1].append(bname)
    init = getattr(model, "_init_weights", None)
    with torch.no_grad():
        for mname, (module, names) in owners.items():
            if callable(init):
                # _init_weights also (re)initialises the module's loaded weights (e.g. Gemma's scaled embedding):
                # let it write into meta stand-ins for those, and keep the loaded tensors.
                kept = {n: t for n, t in module._parameters.items() if t is not None}
                kept_buffers = {n: t for n, t in module._buffers.items() if t is not None and n not in names}
                for n, t in kept.items():
                    module._parameters[n] = nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                for n, t in kept_buffers.items():
                    module._buffers[n] = torch.empty_like(t, device="meta")
                try:
                    init(module)
                finally:
                    module._parameters.update(kept)
                    module._buffers.update(kept_buffers)
            for bname in names:
                buf = module._buffers[bname]
                unset = torch.isnan(buf).any() if buf.is_floating_point() else (buf == -1).all()
                if bool(unset):
                    raise NotImplementedError(
                        f"the computed buffer {mname}.{bname} of {type(module).__name__} could not be initialised off "
                        f"the meta device by {type(model).__name__}._init_weights"
                    )
