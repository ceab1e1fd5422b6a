"""The layers of a transformers model that this package works on: which modules are linear layers and of what kind,
plain LoRA on a dense layer (:class:`DenseLoraLinear`), PEFT's name-matching rules, and replacing a module by name.

Which modules count as linear layers: ``torch.nn.Linear`` (and subclasses such as Falcon's ``FalconLinear``),
transformers' ``Conv1D`` (GPT-2; weight stored ``[in, out]``), ``bitsandbytes.nn.Linear4bit`` (nf4) and this
package's :class:`~qlora_kernels.nn.NF4Linear`; the adapted layers (:class:`~qlora_kernels.nn.QLoraLinear`,
:class:`DenseLoraLinear`) count as one layer each (their parts are not layers).

Dense layers of a 4-bit model: a layer that a 4-bit loader kept dense (stored dense in a bitsandbytes
checkpoint, listed in its ``llm_int8_skip_modules``, left dense by transformers' bitsandbytes integration, or
kept dense by :func:`~qlora_kernels.load_4bit_model`: the output embedding and ``skip_modules``) is marked so
(:data:`KEEP_DENSE`), and :func:`~qlora_kernels.apply_qlora` / :func:`~qlora_kernels.load_adapter` never quantize
it: adapters on it are plain LoRA over its dense weight (:class:`DenseLoraLinear`), as PEFT puts them on a
transformers + bitsandbytes model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import bnb_format
from ..dtypes import FLOAT_DTYPES
from ..nn import NF4Linear, QLoraLinear
from ..nn.lora_adapter import LoraAdapterMixin

# Set on a dense linear module that a 4-bit loader kept dense: apply_qlora gives it plain LoRA, never NF4.
KEEP_DENSE = "_qlora_kernels_keep_dense"
SEQ_CLS_HEADS = ("score", "classifier")  # the heads of sequence-classification models (PEFT's SEQ_CLS_HEAD_NAMES)


# ---------------------------------------------------------------------------------------------
# what is a linear layer


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, weight ``[in, out]``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        return False
    return isinstance(module, Conv1D)


def layer_kind(module: nn.Module) -> str | None:
    """'qlora', 'lora' (:class:`DenseLoraLinear`), 'nf4', 'bnb4', 'linear', 'conv1d', 'other-linear' (an
    unsupported nn.Linear subclass) or None."""
    if isinstance(module, QLoraLinear):
        return "qlora"
    if isinstance(module, DenseLoraLinear):
        return "lora"
    if isinstance(module, NF4Linear):
        return "nf4"
    if bnb_format.linear4bit_quant_type(module) is not None:
        return "bnb4"
    if isinstance(module, nn.Linear):
        # other quantized / wrapped linears (bitsandbytes 8-bit, PEFT layers) cannot be converted
        other = bnb_format.is_bnb_module(module) or type(module).__module__.startswith("peft")
        return "other-linear" if other else "linear"
    if is_conv1d(module):
        return "conv1d"
    return None


def is_qlora_kernels_quantized(model: nn.Module) -> bool:
    """Whether ``model`` came from ``from_pretrained(quantization_config=QLoraKernelsConfig())`` and still carries that
    quantization state (its ``hf_quantizer``)."""
    quantizer = getattr(model, "hf_quantizer", None)
    return getattr(getattr(quantizer, "quantization_config", None), "quant_method", None) == "qlora_kernels"


def output_embedding_names(model: nn.Module) -> set[str]:
    """The names of the output layer (``get_output_embeddings()``, else an ``lm_head``, else a sequence-classification
    head ``score`` / ``classifier``: PEFT's rule), which "all-linear" and :func:`~qlora_kernels.load_4bit_model` leave
    dense."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    names = {name for name, m in model.named_modules() if out is not None and m is out}
    if names:
        return names
    if hasattr(model, "lm_head"):
        return {"lm_head"}
    return {n for n in SEQ_CLS_HEADS if isinstance(getattr(model, n, None), nn.Linear)}


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every linear layer of ``model``; the parts of an adapted or NF4 layer (its adapters,
    a DenseLoraLinear's base layer) are not layers."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        kind = layer_kind(module)
        if kind is None:
            continue
        if kind in ("qlora", "lora", "nf4"):
            inside += (name + ".",)
        yield name, module, kind


def linear_layer_names(model: nn.Module) -> list[str]:
    """The names of the modules of ``model`` that :func:`apply_qlora` can target (all kinds, lm_head included)."""
    return [name for name, _, _ in linear_modules(model)]


def matches(name: str, spec: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list entry matches the name or
    its last components (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def check_spec(value: object, arg: str, allow_none: bool = False) -> None:
    """A module spec (``target_modules``, ``exclude_modules``, ``skip_modules``) must be a regex or a non-empty list
    of names (or None, with ``allow_none``); ValueError / TypeError naming ``arg`` otherwise."""
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


def dense_layer(module: NF4Linear, dtype: torch.dtype | None = None, delta: Tensor | None = None) -> nn.Module:
    """The dense layer an :class:`NF4Linear` (or :class:`QLoraLinear`, its adapter included) stands for: an
    ``nn.Linear`` with weight ``deq(W) (+ delta)`` computed in fp32 and rounded once to ``dtype`` (default: the layer's
    compute dtype, see :meth:`NF4Linear.to_linear`), or transformers' ``Conv1D`` (weight ``[in, out]``) for a layer
    that replaced one, so that a state dict of the result has the model's own layout. ``delta`` is ``[out, in]``."""
    linear = module.to_linear(dtype, delta)
    if not module.fan_in_fan_out:
        return linear
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(module.out_features, module.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous())
    conv.bias = nn.Parameter(linear.bias.detach()) if linear.bias is not None else None
    return conv.to(linear.weight.device)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule ``name`` (``setattr`` on its parent; no class is patched)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---------------------------------------------------------------------------------------------
# plain LoRA on a dense layer


class DenseLoraLinear(LoraAdapterMixin, nn.Module):
    """Plain LoRA on a frozen dense layer: ``y = base(x) + scaling * dropout(x) @ A^T @ B^T``, as PEFT's LoRA layer
    computes it.

    What :func:`apply_qlora` puts on a layer that a 4-bit loader kept dense (see this module's docstring): the dense
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
        kind = layer_kind(base_layer)
        if kind not in ("linear", "conv1d"):
            raise TypeError(f"base_layer must be a dense nn.Linear or Conv1D; got {type(base_layer).__name__}")
        r, lora_alpha, lora_dropout = self._check_lora_args(r, lora_alpha, lora_dropout, lora_dtype)
        weight = base_layer.weight
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"base_layer.weight must be float32, float16 or bfloat16; got {weight.dtype}")
        self.fan_in_fan_out = kind == "conv1d"  # Conv1D: weight [in, out]
        self.in_features, self.out_features = (
            tuple(weight.shape) if self.fan_in_fan_out else (weight.shape[1], weight.shape[0]))
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.base_layer = base_layer
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, lora_dtype, weight.device)

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
        return self._lora_repr()


LORA_TYPES = (QLoraLinear, DenseLoraLinear)

