"""Hugging Face integration: put QLoRA layers into a ``transformers`` model, load 4-bit models, merge.

* :func:`apply_qlora` swaps linear layers of a model *instance* (``setattr`` on their parents; no class or
  global is patched) for :class:`~qlora_kernels.nn.QLoraLinear` and freezes everything else. Layers a 4-bit
  loader left dense (see below) keep their dense weight and get plain LoRA (:class:`DenseLoraLinear`).
* :func:`load_4bit_model` builds a model on the meta device from a local directory and fills it from its
  safetensors files one tensor at a time, with transformers' own key renaming and conversions (its
  checkpoint conversion mapping): bitsandbytes-4bit checkpoints are used as stored (no requantizing),
  full-precision ones are quantized layer by layer.
* :func:`merge_and_unload` turns every adapted or 4-bit layer back into a plain dense layer (``nn.Linear``;
  ``Conv1D`` for GPT-2; the original class for a dense layer with LoRA).

Adapter files (PEFT's format) are read and written by :mod:`qlora_kernels.adapters`.

Which modules count as linear layers: ``torch.nn.Linear`` (and subclasses such as Falcon's ``FalconLinear``),
transformers' ``Conv1D`` (GPT-2; weight stored ``[in, out]``), ``bitsandbytes.nn.Linear4bit`` (nf4) and this
package's :class:`~qlora_kernels.nn.NF4Linear`.

Dense layers of a 4-bit model: a layer that a 4-bit loader kept dense (stored dense in a bitsandbytes
checkpoint, listed in its ``llm_int8_skip_modules``, left dense by transformers' bitsandbytes integration, or
kept dense by :func:`load_4bit_model`: the output embedding and ``skip_modules``) is marked so, and
:func:`apply_qlora` / :func:`~qlora_kernels.adapters.load_adapter` never quantize it: adapters on it are plain
LoRA over its dense weight, as PEFT puts them on a transformers + bitsandbytes model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dtypes import FLOAT_DTYPES
from .functional import lora_linear
from .nf4 import NF4Weight, quantize_nf4
from .nn import NF4Linear, QLoraLinear

logger = logging.getLogger(__name__)

_QS_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
# The entries bitsandbytes writes beside a 4-bit ``<layer>.weight`` (transformers' serialized names).
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                 "quant_state.bitsandbytes__fp4")
# Set on a dense linear module that a 4-bit loader kept dense: apply_qlora gives it plain LoRA, never NF4.
_KEEP_DENSE = "_qlora_kernels_keep_dense"

# The package's QLoRA-facing names are re-exported from here so that qlora_kernels/__init__.py imports them at once.
__all__ = [
    "DenseLoraLinear", "QLoraLinear", "adapters_disabled", "apply_qlora", "linear_layer_names", "load_4bit_model",
    "load_adapter", "lora_linear", "merge_and_unload", "save_adapter",
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
    """'qlora', 'lora' (:class:`DenseLoraLinear`), 'nf4', 'bnb4', 'linear', 'conv1d', 'other-linear' (an
    unsupported nn.Linear subclass) or None."""
    if isinstance(module, QLoraLinear):
        return "qlora"
    if isinstance(module, DenseLoraLinear):
        return "lora"
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
    """(name, module, kind) of every linear layer of ``model``; the parts of an adapted or NF4 layer (its adapters,
    a DenseLoraLinear's base layer) are not layers."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        kind = _kind(module)
        if kind is None:
            continue
        if kind in ("qlora", "lora", "nf4"):
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
# plain LoRA on a dense layer


class DenseLoraLinear(nn.Module):
    """Plain LoRA on a frozen dense layer: ``y = base(x) + scaling * dropout(x) @ A^T @ B^T``, as PEFT's LoRA layer
    computes it.

    What :func:`apply_qlora` puts on a layer that a 4-bit loader kept dense (see the module docstring): the dense
    weight is kept as it is, never quantized, so an adapter trained here reproduces on transformers + bitsandbytes
    + PEFT. ``base_layer`` is the original module (``nn.Linear`` or a subclass such as Falcon's ``FalconLinear``,
    or GPT-2's ``Conv1D``), called as it is; ``lora_A`` / ``lora_B`` and the hyper-parameters are those of
    :class:`QLoraLinear` (same names, same init, same PEFT file format). :meth:`merge` / :meth:`unmerge` and
    ``disable_adapters`` behave as there; :meth:`merged_layer` makes the dense merge ``W + scaling * B @ A``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        kind = _kind(base_layer)
        if kind not in ("linear", "conv1d"):
            raise TypeError(f"base_layer must be a dense nn.Linear or Conv1D; got {type(base_layer).__name__}")
        _check_lora_args(r, lora_alpha, lora_dropout)
        if lora_dtype not in FLOAT_DTYPES:
            raise TypeError(f"lora_dtype must be float32, float16 or bfloat16; got {lora_dtype}")
        weight = base_layer.weight
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"base_layer.weight must be float32, float16 or bfloat16; got {weight.dtype}")
        self.fan_in_fan_out = kind == "conv1d"  # Conv1D: weight [in, out]
        self.in_features, self.out_features = (
            tuple(weight.shape) if self.fan_in_fan_out else (weight.shape[1], weight.shape[0]))
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.use_rslora = int(r), lora_alpha, bool(use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.scaling = float(lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r)
        device = weight.device
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.disable_adapters = False

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.disable_adapters:
            return y
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.merged:
            a, b = a.detach(), b.detach()
        h = x.to(a.dtype)
        if self.training and not self.merged and self.lora_dropout > 0:
            h = F.dropout(h, self.lora_dropout, training=True)
        return (y + F.linear(F.linear(h, a), b) * self.scaling).to(y.dtype)

    def merge(self) -> None:
        """Freeze the adapter into the layer: same output, no gradients to lora_A / lora_B, no dropout."""
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: the adapter trains again."""
        self.merged = False

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` in fp32, [out, in]."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    def merged_layer(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The base layer with weight ``W + scaling * B @ A`` (computed in fp32, rounded to ``dtype``, default the
        base weight's dtype; the bias is cast to ``dtype`` too). Reuses the base layer: call it once, when unloading."""
        base = self.base_layer
        dtype = base.weight.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
        with torch.no_grad():
            delta = self.delta_weight().to(base.weight.device)
            w = base.weight.detach().float() + (delta.t() if self.fan_in_fan_out else delta)
            base.weight = nn.Parameter(w.to(dtype))
            if base.bias is not None:
                base.bias = nn.Parameter(base.bias.detach().to(dtype))
        return base

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}")


_LORA_TYPES = (QLoraLinear, DenseLoraLinear)


# ---------------------------------------------------------------------------------------------
# apply_qlora


def _check_lora_args(r, lora_alpha, lora_dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer; got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number; got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1); got {lora_dropout!r}")


def _make_lora(module: nn.Module, kind: str, name: str, *, r: int, lora_alpha: float, lora_dropout: float,
               use_rslora: bool, blocksize: int, double_quant: bool, lora_dtype: torch.dtype) -> nn.Module:
    """The adapted layer for ``module``: a QLoraLinear on its 4-bit weight or on its weight quantized here, or a
    DenseLoraLinear when a 4-bit loader kept it dense."""
    lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, lora_dtype=lora_dtype)
    if kind == "nf4":
        return QLoraLinear.from_nf4(module, **lora)
    if kind == "bnb4":
        return QLoraLinear.from_bnb(module, **lora)
    weight = module.weight
    if weight.device.type == "meta":
        raise ValueError(f"{name}.weight is on the meta device: load the weights first (or use load_4bit_model)")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.weight must be float32, float16 or bfloat16; got {weight.dtype}")
    if getattr(module, _KEEP_DENSE, False):
        return DenseLoraLinear(module, **lora)
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
        if kind in ("qlora", "lora"):
            raise ValueError(f"{name} already has LoRA adapters ({type(module).__name__}); call merge_and_unload "
                             f"first, or load_adapter to replace their weights")
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


def _is_transformers_bnb4(model: nn.Module) -> bool:
    """Whether ``model`` carries transformers' bitsandbytes 4-bit state (``from_pretrained(quantization_config=
    BitsAndBytesConfig(load_in_4bit=True))``)."""
    quantizer = getattr(model, "hf_quantizer", None)
    qc = getattr(quantizer, "quantization_config", None)
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(qc, "load_in_4bit", False))


def _adopt_bnb4_layout(model: nn.Module) -> bool:
    """On a transformers bitsandbytes 4-bit model, mark every dense linear layer as kept dense (transformers left
    it dense: ``llm_int8_skip_modules``, the output embedding, nn.Linear subclasses it does not convert such as
    FalconLinear). Returns whether the model is such a model."""
    if not _is_transformers_bnb4(model):
        return False
    for _, module, kind in _linear_modules(model):
        if kind in ("linear", "conv1d"):
            setattr(module, _KEEP_DENSE, True)
    return True


def _drop_bnb4_state(model: nn.Module) -> None:
    """After the swap on a transformers bitsandbytes 4-bit model: its remaining (untargeted) nf4 ``Linear4bit``
    layers become :class:`NF4Linear` on the same bytes, and once no bitsandbytes module is left, transformers'
    quantization state goes as well (``hf_quantizer``, ``is_quantized``, ``quantization_method``,
    ``is_loaded_in_4bit``, ``config.quantization_config``), as after :func:`load_4bit_model`: the model holds this
    package's 4-bit layers, which transformers' Trainer trains like any model with trainable adapters."""
    for name, module, kind in list(_linear_modules(model)):
        if kind == "bnb4" and module.weight.quant_type == "nf4":
            parent, child = _parent(model, name)
            setattr(parent, child, NF4Linear.from_bnb(module))
    if any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        return  # still quantized by bitsandbytes (8-bit or fp4 layers): the state stays true
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit"):
        if attr in vars(model):
            delattr(model, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        for attr in ("quantization_config", "_is_quantized"):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)


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
    adapters on their stored NF4 tensors, never requantized. Dense layers of a 4-bit model (those a 4-bit loader
    kept dense, see the module docstring) are not quantized: they get plain LoRA (:class:`DenseLoraLinear`).
    Then every parameter of the model is frozen except the new ``lora_A`` / ``lora_B``.

    On a transformers bitsandbytes 4-bit model (``from_pretrained(quantization_config=BitsAndBytesConfig(...))``)
    the untargeted nf4 ``Linear4bit`` layers become :class:`NF4Linear` on the same bytes (no adapters, nothing
    requantized), and once no bitsandbytes layer is left the model's transformers quantization state
    (``hf_quantizer``, ``is_quantized``, ``quantization_method``, ``is_loaded_in_4bit``,
    ``config.quantization_config``) is removed, as :func:`load_4bit_model` returns models: transformers' Trainer
    then trains it (it refuses models it believes are "purely quantized").

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
    bnb4 = _adopt_bnb4_layout(model)
    for name, module, kind in chosen:
        layer = _make_lora(module, kind, name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           use_rslora=use_rslora, blocksize=blocksize, double_quant=double_quant,
                           lora_dtype=lora_dtype)
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
    if bnb4:
        _drop_bnb4_state(model)
    _freeze_all_but_lora(model)
    return model


def _freeze_all_but_lora(model: nn.Module, trainable: bool = True) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, _LORA_TYPES):
            m.lora_A.weight.requires_grad_(trainable)
            m.lora_B.weight.requires_grad_(trainable)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every adapted layer of ``model`` (:class:`QLoraLinear`, :class:`DenseLoraLinear`) computes
    its base layer only (e.g. DPO's reference model); the previous state is restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, _LORA_TYPES)]
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
    become ``Conv1D`` again, and a :class:`DenseLoraLinear` becomes its base layer with ``W + scaling * B @ A``.
    The merge is computed in fp32 and rounded to ``dtype``; by default each layer's compute dtype: the dtype
    the model computes in (an NF4 layer's ``compute_dtype``, set by :func:`load_4bit_model` and by dtype casts of
    the model, else the dtype its weight was quantized from; a dense layer's own dtype), so the merged model
    runs as it did. The result is a plain transformers model: ``save_pretrained`` writes an ordinary checkpoint
    (any ``quantization_config`` is dropped from ``model.config``). Returns ``model``.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be None, float32, float16 or bfloat16; got {dtype}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (NF4Linear, DenseLoraLinear))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QLoraLinear / DenseLoraLinear / NF4Linear layers to merge")
    for name, m in layers:
        if isinstance(m, DenseLoraLinear):
            parent, child = _parent(model, name)
            setattr(parent, child, m.merged_layer(dtype))
            continue
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
        return self._handles[self.where[key]].get_tensor(key)

    def shape(self, key: str) -> list[int]:
        return list(self._handles[self.where[key]].get_slice(key).get_shape())


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


def _split_bnb_key(key: str) -> tuple[str, str]:
    """``'<layer>.weight.absmax'`` -> (``'<layer>.weight'``, ``'.absmax'``); other keys -> (key, '')."""
    for suffix in _BNB_SUFFIXES:
        if key.endswith(".weight." + suffix):
            return key[: -len(suffix) - 1], "." + suffix
    return key, ""


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
        unexpected: checkpoint keys the model does not take.
    """

    def __init__(self, ckpt: _Checkpoint, model: nn.Module) -> None:
        self.direct: dict[str, str] = {}
        self.converters: dict = {}
        self.unexpected: list[str] = []
        expected = {k: True for k in model.state_dict(keep_vars=True)}
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
            base, suffix = _split_bnb_key(key)
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

    Returns:
        The model, in eval mode, with ``model.config`` free of ``quantization_config``.

    Raises:
        FileNotFoundError: no config.json, no safetensors checkpoint, a shard the index names is absent.
        ValueError naming the file or tensor: a damaged index or safetensors file, tensors the model lacks or
            does not take (``strict``), a shape that does not fit, a non-finite weight to quantize, a bad 4-bit
            weight. TypeError naming the tensor: a non-float tensor where the model has a float one (an int8
            weight in a float checkpoint is not quantized as if it were one), a bad ``dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path must be a local model directory with a config.json; got {str(path)!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool; got {strict!r}")
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
    plan = _KeyPlan(ckpt, model)
    _check_unexpected(model, plan.unexpected, path, strict)

    # Tensors transformers builds from several checkpoint tensors (fused experts, ...), then one reader for all.
    built: dict[str, Tensor] = {}
    expected = model.state_dict(keep_vars=True)
    for first, converter in plan.converters.items():
        try:
            out = converter.convert(first, model=model, config=model.config)
        except Exception as exc:  # an op of transformers' conversion: name the tensors it was given
            sources = sorted(converter.layer_targets.get(first, ()))
            raise ValueError(f"checkpoint {str(path)!r}: transformers' conversion of {sources[:4]}"
                             f"{' ...' if len(sources) > 4 else ''} into {first!r} failed: {exc}") from None
        for key, value in out.items():
            value = value[0] if isinstance(value, list) else value
            if key not in expected:
                raise ValueError(f"transformers' conversion of checkpoint tensors into {first!r} made {key!r}, which "
                                 f"{type(model).__name__} does not have")
            built[key] = value

    def source(key: str) -> tuple[str, Tensor] | None:
        """(the checkpoint key to name in messages, the tensor) for a model key, or None when not stored."""
        if key in built:
            return key, built.pop(key)
        if key in plan.direct:
            return plan.direct[key], ckpt.get(plan.direct[key])
        return None

    outputs = _output_embedding_names(model)
    skip = list(skip_modules or [])
    four_bit = quant is not None or any(k.endswith(_QS_SUFFIX) for k in plan.direct)

    # 1. linear layers -> NF4Linear (stored NF4, or quantized here), one at a time
    done: set[str] = set()
    for name, module in list(model.named_modules()):
        kind = _kind(module)
        if kind not in ("linear", "conv1d"):
            continue
        conv = kind == "conv1d"
        out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if conv else tuple(module.weight.shape)
        wkey = f"{name}.weight"
        if any(f"{wkey}.{suffix}" in plan.direct for suffix in _BNB_SUFFIXES[-2:]):  # a quant state: nf4 (or fp4)
            parts = [wkey] + [f"{wkey}.{suffix}" for suffix in _BNB_SUFFIXES]
            sd = {k: ckpt.get(plan.direct[k]) for k in parts if k in plan.direct}
            ckpt_wkey = plan.direct.get(wkey, wkey)
            try:
                qw = NF4Weight.from_bnb_state_dict(sd, wkey)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"checkpoint {str(path)!r}, 4-bit weight {ckpt_wkey!r}: {exc}") from None
            if tuple(qw.shape) != (out_f, in_f):
                raise ValueError(f"checkpoint's {ckpt_wkey!r} has shape {list(qw.shape)}; the model from config.json "
                                 f"expects {[out_f, in_f]} (out_features, in_features)")
            qw = qw.to(device)
        elif not four_bit and name not in outputs and not (skip and _matches(name, skip)) and (
                wkey in plan.direct or wkey in built):
            ckpt_wkey, w = source(wkey)
            _checked_value(ckpt_wkey, w, module.weight)
            w = w.to(device=device, dtype=dtype)
            try:
                qw = quantize_nf4(w.t() if conv else w, blocksize=blocksize, double_quant=double_quant)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {ckpt_wkey!r} (the weight of {name}): {exc}") from None
            del w
        else:
            setattr(module, _KEEP_DENSE, True)  # stays dense: loaded with the other tensors below
            continue
        bias = None
        if module.bias is not None:
            found = source(f"{name}.bias")
            if found is None:
                raise ValueError(f"checkpoint {str(path)!r} lacks {name}.bias")
            _checked_value(found[0], found[1], module.bias)
            bias = found[1].to(device=device, dtype=dtype)
        layer = NF4Linear(qw, bias, fan_in_fan_out=conv)
        layer.compute_dtype = dtype
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
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
        if id(t) in loaded:
            continue  # already read via a tied twin
        found = source(full)
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

    # 3. computed buffers (rotary inv_freq, embed scales): let the model class initialise them
    _init_computed_buffers(model, device)
    model.eval()
    if (path / "generation_config.json").is_file():
        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    with contextlib.suppress(AttributeError):
        model.config._name_or_path = str(path)
    logger.info("load_4bit_model: %d linear layers in NF4 (%s)", len(done),
                "stored bitsandbytes 4-bit" if four_bit else "quantized while loading")
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
