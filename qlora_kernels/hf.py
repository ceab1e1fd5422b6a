"""Hugging Face integration: put QLoRA layers into a ``transformers`` model, load 4-bit models, merge.

* :func:`apply_qlora` swaps linear layers of a model *instance* (``setattr`` on their parents; no class or
  global is patched) for :class:`~qlora_kernels.nn.QLoraLinear` and freezes everything else.
* :func:`load_4bit_model` builds a model on the meta device from a local directory and fills it from its
  safetensors files one tensor at a time: bitsandbytes-4bit checkpoints are used as stored (no
  requantizing), full-precision ones are quantized layer by layer.
* :func:`merge_and_unload` turns every 4-bit layer back into a plain ``nn.Linear`` (``Conv1D`` for GPT-2).

Adapter files (PEFT's format) are read and written by :mod:`qlora_kernels.adapters`.

Which modules count as linear layers: ``torch.nn.Linear``, transformers' ``Conv1D`` (GPT-2; weight stored
``[in, out]``), ``bitsandbytes.nn.Linear4bit`` (nf4) and this package's :class:`~qlora_kernels.nn.NF4Linear`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .functional import lora_linear
from .nf4 import NF4Weight, quantize_nf4
from .nn import NF4Linear, QLoraLinear

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QS_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"

# The package's QLoRA-facing names are re-exported from here so that qlora_kernels/__init__.py imports them at once.
__all__ = [
    "QLoraLinear", "adapters_disabled", "apply_qlora", "linear_layer_names", "load_4bit_model", "load_adapter",
    "lora_linear", "merge_and_unload", "save_adapter",
]


# ---------------------------------------------------------------------------------------------
# what is a linear layer


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        return False
    return isinstance(module, Conv1D)


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and hasattr(getattr(module, "weight", None), "quant_type")


def _kind(module: nn.Module) -> str | None:
    """'qlora', 'nf4', 'bnb4', 'linear', 'conv1d', 'other-linear' (an unsupported nn.Linear subclass) or None."""
    if isinstance(module, QLoraLinear):
        return "qlora"
    if isinstance(module, NF4Linear):
        return "nf4"
    if _is_bnb_linear4bit(module):
        return "bnb4"
    if isinstance(module, nn.Linear):
        # other quantized / wrapped linears (bitsandbytes 8-bit, PEFT layers) cannot be converted
        return "other-linear" if type(module).__module__.startswith(("bitsandbytes", "peft")) else "linear"
    if _is_conv1d(module):
        return "conv1d"
    return None


def _output_embedding_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    names = {name for name, m in model.named_modules() if out is not None and m is out}
    return names or ({"lm_head"} if hasattr(model, "lm_head") else set())


def _linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every linear layer of ``model``; the adapters inside a QLoraLinear are not layers."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        kind = _kind(module)
        if kind is None:
            continue
        if kind in ("qlora", "nf4"):
            inside += (name + ".",)
        yield name, module, kind


def linear_layer_names(model: nn.Module) -> list[str]:
    """The names of the modules of ``model`` that :func:`apply_qlora` can target (all kinds, lm_head included)."""
    return [name for name, _, _ in _linear_modules(model)]


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list entry matches the name or
    its last components (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _check_spec(value, arg: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, str):
        if value == "":
            raise ValueError(f"{arg} must not be empty")
        try:
            re.compile(value)
        except re.error as exc:
            msg = f"{arg} must be 'all-linear', a regex or a list of names; {value!r} is not a regex: {exc}"
            raise ValueError(msg) from None
        return
    if not isinstance(value, (list, tuple, set, frozenset)) or not value or not all(isinstance(t, str) for t in value):
        raise TypeError(f"{arg} must be 'all-linear', a regex string or a non-empty list of names; got {value!r}")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


# ---------------------------------------------------------------------------------------------
# apply_qlora


def _check_lora_args(r, lora_alpha, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer; got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number; got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1); got {lora_dropout!r}")


def _make_qlora(module: nn.Module, kind: str, name: str, *, r: int, lora_alpha: float, lora_dropout: float,
                use_rslora: bool, blocksize: int, double_quant: bool, lora_dtype: torch.dtype) -> QLoraLinear:
    lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, lora_dtype=lora_dtype)
    if kind == "nf4":
        return QLoraLinear.from_nf4(module, **lora)
    if kind == "bnb4":
        return QLoraLinear.from_bnb(module, **lora)
    weight = module.weight
    if weight.device.type == "meta":
        raise ValueError(f"{name}.weight is on the meta device: load the weights first (or use load_4bit_model)")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}.weight must be float32, float16 or bfloat16; got {weight.dtype}")
    if kind == "conv1d":  # GPT-2: weight [in, out], y = x @ W + b
        qw = quantize_nf4(weight.detach().t(), blocksize=blocksize, double_quant=double_quant)
        bias = None if module.bias is None else module.bias.detach()
        return QLoraLinear(qw, bias, fan_in_fan_out=True, **lora)
    return QLoraLinear.from_linear(module, blocksize=blocksize, double_quant=double_quant, **lora)


def _select(model: nn.Module, target_modules, exclude_modules) -> list[tuple[str, nn.Module, str]]:
    outputs = _output_embedding_names(model)
    chosen, available = [], []
    for name, module, kind in _linear_modules(model):
        available.append(name)
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if target_modules == "all-linear":
            if name in outputs:
                continue
        elif not _matches(name, target_modules):
            continue
        if kind == "qlora":
            raise ValueError(f"{name} already has LoRA adapters (QLoraLinear); call merge_and_unload first, or "
                             f"load_adapter to replace their weights")
        if kind == "other-linear":
            raise TypeError(f"{name} is a {type(module).__module__}.{type(module).__name__}, which apply_qlora cannot "
                            f"convert (supported: nn.Linear, Conv1D, bitsandbytes Linear4bit nf4, NF4Linear)")
        chosen.append((name, module, kind))
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in available})
        raise ValueError(
            f"target_modules={target_modules!r} matched no linear layer of {type(model).__name__}"
            + (f" (exclude_modules={exclude_modules!r})" if exclude_modules is not None else "")
            + f"; its linear layers are named {leaves} (e.g. {available[:3]})"
        )
    return chosen


def apply_qlora(
    model: nn.Module,
    r: int = 16,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    use_rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    exclude_modules: str | Sequence[str] | None = None,
    lora_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace the targeted linear layers of ``model`` by :class:`~qlora_kernels.nn.QLoraLinear`, in place.

    Full-precision layers (``nn.Linear``, GPT-2's ``Conv1D``) are quantized to NF4 as they are swapped, one at a
    time; 4-bit layers (bitsandbytes ``Linear4bit`` nf4, :class:`NF4Linear` from :func:`load_4bit_model`) get
    adapters on their stored NF4 tensors, never requantized. Then every parameter of the model is frozen except
    the new ``lora_A`` / ``lora_B``.

    Args:
        model: a ``transformers`` model (any ``nn.Module`` works).
        r, lora_alpha, lora_dropout, use_rslora: the LoRA hyper-parameters (see :class:`QLoraLinear`).
        target_modules: ``"all-linear"`` (every linear layer but the output embedding / lm_head), a list of
            names (an entry matches a module's full name or its last components, e.g. ``"q_proj"``) or a
            regex matched against the full name (PEFT's rules).
        blocksize, double_quant: NF4 settings for layers quantized here.
        exclude_modules: names (list, same rule) or a regex of layers to leave alone.
        lora_dtype: the adapters' dtype (fp32 by default, as PEFT keeps them under a bf16 base).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: r <= 0, a bad alpha or dropout, no layer matched (the message lists the linear layers' names),
            or a matched layer that already has adapters. TypeError: a bad ``target_modules`` or an unsupported
            layer type.
    """
    _check_lora_args(r, lora_alpha, lora_dropout)
    _check_spec(target_modules, "target_modules")
    _check_spec(exclude_modules, "exclude_modules", allow_none=True)
    if hasattr(model, "peft_config"):
        raise TypeError("model is a PEFT model; apply_qlora takes the plain transformers model")
    chosen = _select(model, target_modules, exclude_modules)
    for name, module, kind in chosen:
        layer = _make_qlora(module, kind, name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            use_rslora=use_rslora, blocksize=blocksize, double_quant=double_quant,
                            lora_dtype=lora_dtype)
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
    _freeze_all_but_lora(model)
    return model


def _freeze_all_but_lora(model: nn.Module, trainable: bool = True) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, QLoraLinear):
            m.lora_A.weight.requires_grad_(trainable)
            m.lora_B.weight.requires_grad_(trainable)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`QLoraLinear` of ``model`` computes its base layer only (e.g. DPO's
    reference model); the previous state is restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, QLoraLinear)]
    before = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.disable_adapters = True
        yield model
    finally:
        for m, b in zip(layers, before):
            m.disable_adapters = b


# ---------------------------------------------------------------------------------------------
# merge_and_unload


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`QLoraLinear` by a plain ``nn.Linear`` with weight ``deq(W) + scaling * B @ A``
    (and every :class:`NF4Linear` by one with ``deq(W)``), in place; layers that came from GPT-2's ``Conv1D``
    become ``Conv1D`` again. The merge is computed in fp32 and rounded to ``dtype`` (default: each layer's
    original dtype). The result is a plain transformers model: ``save_pretrained`` writes an ordinary
    checkpoint (any ``quantization_config`` is dropped from ``model.config``). Returns ``model``.
    """
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be None, float32, float16 or bfloat16; got {dtype}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QLoraLinear / NF4Linear layers to merge")
    for name, m in layers:
        linear = m.to_linear(dtype)
        if m.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(m.out_features, m.in_features)
            conv.weight = nn.Parameter(linear.weight.detach().t().contiguous())
            conv.bias = nn.Parameter(linear.bias.detach()) if linear.bias is not None else None
            linear = conv.to(linear.weight.device)
        parent, child = _parent(model, name)
        setattr(parent, child, linear)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    return model


# ---------------------------------------------------------------------------------------------
# load_4bit_model


class _Checkpoint:
    """The tensors of a local safetensors checkpoint (one file or an index of shards), read one at a time."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = [single.name], None
        else:
            others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {others}: only safetensors checkpoints are loaded)" if others else ""
            raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json{hint}")
        self._handles = {f: safe_open(str(path / f), framework="pt", device="cpu") for f in files}
        if weight_map is None:
            weight_map = {k: files[0] for k in self._handles[files[0]].keys()}
        self.where = weight_map

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> Tensor:
        return self._handles[self.where[key]].get_tensor(key)

    def shape(self, key: str) -> list[int]:
        return list(self._handles[self.where[key]].get_slice(key).get_shape())

    def with_prefix(self, prefix: str) -> dict[str, Tensor]:
        return {k: self.get(k) for k in self.where if k == prefix or k.startswith(prefix + ".")}


def _resolver(ckpt: _Checkpoint, model: nn.Module):
    """Map a model key to the checkpoint's key (checkpoints of a base model lack the ``model.`` prefix, etc.)."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(key: str) -> str | None:
        candidates = [key]
        if prefix:
            candidates += [key.removeprefix(prefix + "."), f"{prefix}.{key}"]
        return next((c for c in candidates if c in ckpt), None)

    return resolve


def _read_quant_config(config) -> dict | None:
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


def load_4bit_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: Sequence[str] | None = None,
    trust_remote_code: bool = False,
    model_class=None,
) -> nn.Module:
    """Load a local Hugging Face model directory with its linear layers in NF4, never holding the
    full-precision model in memory.

    The model is built on the meta device from ``config.json``; its tensors are then read from the safetensors
    files one at a time:

    * a bitsandbytes 4-bit checkpoint (``config.json`` has a bitsandbytes nf4 ``quantization_config``, as
      transformers writes it with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``): each
      quantized layer (``<name>.weight`` + ``weight.absmax`` / ``quant_map`` / ``nested_*`` /
      ``quant_state.bitsandbytes__nf4``) becomes an :class:`~qlora_kernels.nn.NF4Linear` on the stored bytes,
      no requantizing; layers stored unquantized stay dense;
    * a float checkpoint (fp32 / fp16 / bf16): each linear layer but the output embedding (lm_head) and
      ``skip_modules`` is read, cast to ``dtype``, quantized (``blocksize``, ``double_quant``) and dropped
      before the next one is read, so the peak memory is the 4-bit model plus one layer.

    Every other tensor (embeddings, norms, biases, unquantized layers) is read in ``dtype`` (floating point only;
    modules the model class keeps in fp32 stay fp32). Buffers that are computed, not stored (rotary
    frequencies, embedding scales) are initialised by the model class. :func:`apply_qlora` on the result adds
    adapters on the stored NF4 weights.

    Args:
        path: a local directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: compute dtype of the model (and of the weights quantized here).
        device: where the model goes (default CPU); tensors are moved there one by one.
        skip_modules: linear layers (names or last components) not to quantize from a float checkpoint.
        trust_remote_code: allow custom modelling code from the directory (off by default).
        model_class: the transformers class to build (default ``AutoModelForCausalLM``).

    Returns:
        The model, in eval mode, with ``model.config`` free of ``quantization_config``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path must be a local model directory with a config.json; got {str(path)!r}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    device = torch.device("cpu" if device is None else device)
    _check_spec(skip_modules, "skip_modules", allow_none=True)

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    quant = _read_quant_config(config)
    if quant is not None:
        delattr(config, "quantization_config")
    ckpt = _Checkpoint(path)
    model_class = AutoModelForCausalLM if model_class is None else model_class
    # Auto classes build with from_config; concrete model classes with _from_config.
    auto = hasattr(model_class, "from_config")
    build = model_class.from_config if auto else model_class._from_config
    extra = {"trust_remote_code": trust_remote_code} if auto else {}
    with torch.device("meta"):
        try:
            model = build(config, dtype=dtype, **extra)
        except TypeError:  # transformers < 5 spells it torch_dtype
            model = build(config, torch_dtype=dtype, **extra)
    resolve = _resolver(ckpt, model)
    outputs = _output_embedding_names(model)
    skip = list(skip_modules or [])

    # 1. linear layers -> NF4Linear (stored NF4, or quantized here), one at a time
    done: set[str] = set()
    for name, module in list(model.named_modules()):
        kind = _kind(module)
        if kind not in ("linear", "conv1d"):
            continue
        conv = kind == "conv1d"
        out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if conv else tuple(module.weight.shape)
        wkey = resolve(f"{name}.weight")
        qs_key = resolve(f"{name}{_QS_SUFFIX}")
        if qs_key is not None:
            wprefix = qs_key.removesuffix(_QS_SUFFIX[len(".weight"):])
            sd = ckpt.with_prefix(wprefix)
            if sd[wprefix].dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: the same bytes
                sd[wprefix] = sd[wprefix].view(torch.uint8).reshape(-1, 1)
            qw = NF4Weight.from_bnb_state_dict(sd, wprefix)
            if tuple(qw.shape) != (out_f, in_f):
                raise ValueError(f"checkpoint's {wprefix!r} has shape {list(qw.shape)}; the model from config.json "
                                 f"expects {[out_f, in_f]} (out_features, in_features)")
            qw = qw.to(device)
        elif quant is None and wkey is not None and name not in outputs and not (skip and _matches(name, skip)):
            shape = ckpt.shape(wkey)
            if shape != list(module.weight.shape):
                want = list(module.weight.shape)
                raise ValueError(f"checkpoint's {wkey!r} has shape {shape}; the model expects {want}")
            w = ckpt.get(wkey).to(device=device, dtype=dtype)
            qw = quantize_nf4(w.t() if conv else w, blocksize=blocksize, double_quant=double_quant)
            del w
        else:
            continue  # stays dense: loaded with the other tensors below
        bias = None
        if module.bias is not None:
            bkey = resolve(f"{name}.bias")
            if bkey is None:
                raise ValueError(f"checkpoint lacks {name}.bias")
            bias = ckpt.get(bkey).to(device=device, dtype=dtype)
        parent, child = _parent(model, name)
        setattr(parent, child, NF4Linear(qw, bias, fan_in_fan_out=conv))
        done.add(name)

    # 2. every other parameter and persistent buffer, in dtype; tied parameters stay tied
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    entries = []
    for mname, module in model.named_modules():
        if isinstance(module, NF4Linear):
            continue
        own = [(n, t, True) for n, t in module._parameters.items() if t is not None]
        own += [(n, t, False) for n, t in module._buffers.items()
                if t is not None and n not in module._non_persistent_buffers_set]
        entries += [(module, f"{mname}.{n}" if mname else n, n, t, p) for n, t, p in own if t.device.type == "meta"]
    loaded: dict[int, Tensor] = {}
    for _, full, _, t, is_param in entries:
        key = resolve(full)
        if key is None or id(t) in loaded:
            continue  # absent (a tied weight is filled in below from its twin) or already read via a twin
        value = ckpt.get(key)
        if list(value.shape) != list(t.shape):
            raise ValueError(f"checkpoint's {key!r} has shape {list(value.shape)}; the model expects {list(t.shape)}")
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

    # 3. computed buffers (rotary inv_freq, embed scales): let the model class initialise them
    _init_computed_buffers(model, device)
    model.eval()
    if (path / "generation_config.json").is_file():
        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    with contextlib.suppress(AttributeError):
        model.config._name_or_path = str(path)
    logger.info("load_4bit_model: %d linear layers in NF4 (%s)", len(done),
                "stored bitsandbytes 4-bit" if quant is not None else "quantized while loading")
    return model


def _init_computed_buffers(model: nn.Module, device: torch.device) -> None:
    owners = {}
    for mname, module in model.named_modules():
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


# PEFT adapter files live in their own module, which builds on the helpers above.
from .adapters import load_adapter, save_adapter  # noqa: E402
