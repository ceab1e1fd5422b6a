"""transformers' own loader into this package's NF4: ``from_pretrained(..., quantization_config=QLoraKernelsConfig())``.

Registered through transformers' API for third-party quantizers (``register_quantization_config`` /
``register_quantizer``, method ``"qlora_kernels"``) when this module is imported (``import qlora_kernels.hf`` does it
when transformers is installed). What the quantizer does, in transformers' loading order:

1. Before the weights load (the model is on the meta device), it picks the linear layers to hold in NF4: every
   ``nn.Linear`` / GPT-2 ``Conv1D`` but the output embedding and ``skip_modules``, the rule of
   :func:`~qlora_kernels.load_4bit_model`; and, with ``quantize_experts`` (the default, as there), the fused experts
   of a mixture-of-experts model (transformers 5's 3-D ``gate_up_proj`` / ``down_proj``; the routers stay dense).
   When the checkpoint holds bitsandbytes 4-bit weights, the layers stored so are taken as stored (no requantizing)
   and the ones stored dense stay dense, as ``load_4bit_model`` does; experts stored dense (bitsandbytes leaves them
   so) are quantized with a :class:`~qlora_kernels.hf.loading.QuantizedExpertsWarning`, or kept as stored with
   ``quantize_experts=False``.
2. transformers reads the checkpoint one tensor at a time onto the device ``device_map`` gives it (``"auto"``
   counts a quantized weight at half a byte per element); each float weight of a chosen layer is quantized there,
   as it arrives (:class:`NF4Quantize`), and dropped, so the full-precision model never exists.
3. After loading, each chosen layer becomes an :class:`~qlora_kernels.nn.NF4Linear` (compute dtype: the ``dtype``
   given to ``from_pretrained``), each chosen experts module an :class:`~qlora_kernels.nn.experts.NF4Experts`; the
   layers left dense are marked so, for ``apply_qlora``. The model keeps
   ``hf_quantizer`` (trainable, serializable), so ``Trainer`` accepts it once it carries PEFT adapters
   (``peft.get_peft_model(model, qlora_kernels.hf.LoraConfig(...))``), and ``model.config.quantization_config``
   becomes the :class:`transformers.BitsAndBytesConfig` that describes the stored bytes: ``save_pretrained`` writes
   a bitsandbytes 4-bit checkpoint that transformers itself (with bitsandbytes) loads (the description is renewed at
   each save, so that layers merged dense since, e.g. by PEFT's ``merge_and_unload``, are listed as dense).

The result equals :func:`~qlora_kernels.load_4bit_model` of the same directory and dtype bit for bit.

A bitsandbytes checkpoint's ``config.json`` carries a bitsandbytes ``quantization_config``, and transformers refuses a
``quantization_config`` argument of another class beside it; load one with :func:`bnb_free_config`:
``from_pretrained(path, config=bnb_free_config(path), quantization_config=QLoraKernelsConfig())``.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import bnb_format
from ..dtypes import SAFETENSORS_DTYPES
from ..nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from ..nn import NF4Linear
from ..nn.experts import NF4Experts
from ..quant_maps import ALLOWED_BLOCKSIZES
from . import experts as moe
from .layers import (
    KEEP_DENSE,
    check_spec,
    dense_layer,
    layer_kind,
    linear_modules,
    matches,
    output_embedding_names,
    replace_module,
)
from .loading import _Checkpoint, _KeyPlan, _read_nf4_weight, bnb_quantization_config, warn_quantized_experts

QUANT_METHOD = "qlora_kernels"
# Set on a module while it loads: "quantize" (a float weight, quantized as it arrives) or "stored" (bitsandbytes 4-bit);
# on a fused-experts module, "experts" (its 3-D float tensors quantized as they arrive) or "experts-stored".
_PLAN = "_qlora_kernels_nf4"
# The experts module's expected shapes of its two tensors, kept while their meta stand-ins take the stored codes' shape.
_EXPERT_SHAPES = "_qlora_kernels_expert_shapes"
# The stored 4-bit weight's companions in a bitsandbytes checkpoint (read by the quantizer, not by transformers).
_COMPANIONS = rf"\.weight\.({'|'.join(re.escape(s) for s in bnb_format.STATE_SUFFIXES)})$"

__all__ = ["QLoraKernelsConfig", "QLoraKernelsHfQuantizer", "bnb_free_config", "bnb_quantization_config"]


class QLoraKernelsConfig(QuantizationConfigMixin):
    """Load a model's linear layers into this package's NF4 (:class:`~qlora_kernels.nn.NF4Linear`).

    Args:
        blocksize: NF4 block size for the weights quantized while loading (32, 64, ..., 4096; bitsandbytes' 64).
        double_quant: quantize the absmax constants too (bitsandbytes' ``bnb_4bit_use_double_quant``).
        skip_modules: linear layers to keep dense, besides the output embedding: a list of names or last components,
            or a regex of full names (PEFT's rule, as ``load_4bit_model``'s); ``None``: none. An experts module
            whose name matches is kept dense too.
        quantize_experts: the fused experts of a mixture-of-experts model become
            :class:`~qlora_kernels.nn.experts.NF4Experts` (as ``load_4bit_model``'s ``quantize_experts``); ``False``
            keeps them as stored (dense, or NF4 when the checkpoint holds them so).

    A checkpoint's bitsandbytes 4-bit weights are used as stored, whatever these say.
    """

    def __init__(self, blocksize: int = 64, double_quant: bool = True, skip_modules: list[str] | None = None,
                 quantize_experts: bool = True, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.quantize_experts = quantize_experts
        check_spec(skip_modules, "skip_modules", allow_none=True)
        listed = skip_modules is not None and not isinstance(skip_modules, str)
        self.skip_modules = list(skip_modules) if listed else skip_modules
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise TypeError(f"QLoraKernelsConfig got unexpected arguments {unknown}; it takes blocksize, double_quant, "
                            f"skip_modules, quantize_experts")
        self.post_init()

    def post_init(self) -> None:
        """Check the arguments: ValueError / TypeError naming the bad one."""
        if isinstance(self.blocksize, bool) or self.blocksize not in ALLOWED_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}; got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool; got {self.double_quant!r}")
        if not isinstance(self.quantize_experts, bool):
            raise TypeError(f"quantize_experts must be a bool; got {self.quantize_experts!r}")
        check_spec(self.skip_modules, "skip_modules", allow_none=True)


class NF4Quantize(ConversionOps):
    """transformers' conversion op for a chosen layer's float weight: NF4 on the device it was read to.

    Returns a frozen ``nn.Parameter`` of the packed codes carrying the whole :class:`NF4Weight`
    (``.nf4_weight``), which the quantizer turns into the layer's :class:`NF4Linear` after loading."""

    def __init__(self, hf_quantizer: QLoraKernelsHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, **kwargs: Any) -> dict[str, Tensor]:
        q = self.hf_quantizer
        out = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, key)
            w = value.t() if layer_kind(module) == "conv1d" else value
            if q.dtype is not None and w.dtype != q.dtype:
                w = w.to(q.dtype)  # the load dtype, whatever dtype plan transformers had for the tensor
            try:
                qw = quantize_nf4(w, blocksize=q.quantization_config.blocksize,
                                  double_quant=q.quantization_config.double_quant)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"checkpoint tensor {key!r}: {exc}") from None
            param = nn.Parameter(qw.packed, requires_grad=False)
            param.nf4_weight = qw
            module._is_hf_initialized = True
            out[key] = param
        return out


class QLoraKernelsHfQuantizer(HfQuantizer):
    """The quantizer behind :class:`QLoraKernelsConfig` (see this module's docstring for what it does when)."""

    requires_calibration = False
    quantization_config: QLoraKernelsConfig

    def __init__(self, quantization_config: QLoraKernelsConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.dtype: torch.dtype | None = None
        self._warn_experts = False  # set before loading: the checkpoint is 4-bit, so experts it stores dense are news
        self._ckpt: _Checkpoint | None = None
        self._plan: _KeyPlan | None = None

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        """The NF4 layers compute where their tensors are: no disk offload, no CPU offload beside accelerators."""
        if isinstance(device_map, dict):
            places = {str(v) for v in device_map.values()}
            if "disk" in places or ("cpu" in places and len(places) > 1):
                raise ValueError(f"device_map must not offload modules to the CPU or the disk next to accelerators "
                                 f"(the NF4 layers compute where their weights are); got the places {sorted(places)}")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module, name = get_module_from_name(model, param_name)
        plan = getattr(module, _PLAN, None)
        return (name == "weight" and plan == "quantize") or (name in moe.PROJECTIONS and plan == "experts")

    def preprocess_model(self, model: nn.Module, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        self.dtype = dtype if isinstance(dtype, torch.dtype) else None  # the model's dtype: the layers' compute dtype
        super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        keep = output_embedding_names(model)
        skip = self.quantization_config.skip_modules
        stored: set[str] = set()
        if checkpoint_files:
            self._ckpt = _Checkpoint(Path(checkpoint_files[0]).parent)
            self._plan = _KeyPlan(self._ckpt, model)
            stored = {k[: -len(".weight")] for k in self._plan.direct
                      if k.endswith(".weight") and bnb_format.has_quant_state(self._plan.direct, k)}
        for name, module, kind in list(linear_modules(model)):
            if kind not in ("linear", "conv1d"):
                continue
            if name in stored:
                key = self._plan.direct[f"{name}.weight"]
                handle = self._ckpt.slice(key)
                want = SAFETENSORS_DTYPES.get(handle.get_dtype(), torch.uint8)
                # the meta weight takes the stored codes' shape and dtype, so transformers reads them uncast
                module.weight = nn.Parameter(torch.empty(handle.get_shape(), dtype=want, device="meta"),
                                             requires_grad=False)
                setattr(module, _PLAN, "stored")
            elif stored or name in keep or (skip and matches(name, skip)):
                setattr(module, KEEP_DENSE, True)  # a 4-bit checkpoint's dense layers, lm_head, skip_modules
            else:
                setattr(module, _PLAN, "quantize")
        self._plan_experts(model, stored)
        if stored or any(getattr(m, _PLAN, None) == "experts-stored" for m in model.modules()):
            # transformers reports checkpoint tensors the model lacks; the quantizer reads these itself
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = ignore | {_COMPANIONS}
        return model

    def _plan_experts(self, model: nn.Module, stored_linear: set[str]) -> None:
        """Mark each dense fused-experts module: "experts-stored" when the checkpoint holds its two tensors in NF4
        (whatever the config says, as for linear layers; the meta tensors take the stored codes' shape), else
        "experts" to quantize them as they arrive, or nothing to keep them dense (``quantize_experts=False``,
        ``skip_modules``)."""
        config = self.quantization_config
        direct = self._plan.direct if self._plan is not None else {}
        for name, module in moe.experts_modules(model):
            if isinstance(module, NF4Experts):
                continue
            keys = [f"{name}.{p}" for p in moe.PROJECTIONS]
            shapes = {p: tuple(getattr(module, p).shape) for p in moe.PROJECTIONS}
            if all(k in direct and bnb_format.has_quant_state(direct, k) for k in keys):
                for key, proj in zip(keys, moe.PROJECTIONS):
                    handle = self._ckpt.slice(direct[key])
                    want = SAFETENSORS_DTYPES.get(handle.get_dtype(), torch.uint8)
                    setattr(module, proj, nn.Parameter(torch.empty(handle.get_shape(), dtype=want, device="meta"),
                                                       requires_grad=False))
                setattr(module, _PLAN, "experts-stored")
            elif config.quantize_experts and not (config.skip_modules and matches(name, config.skip_modules)):
                setattr(module, _PLAN, "experts")
            else:
                continue
            setattr(module, _EXPERT_SHAPES, shapes)
        self._warn_experts = bool(stored_linear)  # a 4-bit checkpoint whose experts are stored dense

    def get_quantize_ops(self) -> NF4Quantize:
        return NF4Quantize(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        quantized: list[str] = []
        try:
            for name, module in list(model.named_modules()):
                plan = getattr(module, _PLAN, None)
                if plan is None:
                    continue
                if plan.startswith("experts"):
                    if plan == "experts":
                        quantized.append(name)
                    replace_module(model, name, self._experts(name, module, plan))
                    continue
                qw = self._stored_weight(name, module) if plan == "stored" else getattr(module.weight, "nf4_weight",
                                                                                         None)
                if qw is None:
                    raise ValueError(f"the checkpoint has no float weight for the linear layer {name!r}")
                conv = layer_kind(module) == "conv1d"
                out_f, in_f = (module.nf, module.nx) if conv else (module.out_features, module.in_features)
                if tuple(qw.shape) != (out_f, in_f):
                    raise ValueError(f"{name}.weight: the checkpoint's 4-bit weight has shape {list(qw.shape)}; the "
                                     f"model expects {[out_f, in_f]} (out_features, in_features)")
                bias = None if module.bias is None else module.bias.detach()
                layer = NF4Linear(qw, bias, fan_in_fan_out=conv)
                layer.compute_dtype = self.dtype
                replace_module(model, name, _keep_device_hook(module, layer))
        finally:
            self._ckpt = self._plan = None  # closes the checkpoint files
        if quantized and self._warn_experts:
            warn_quantized_experts(quantized, "QLoraKernelsConfig(quantize_experts=False)")
        model.config.quantization_config = bnb_quantization_config(model)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Tensor] | None, dict]:
        """``save_pretrained`` asks this before it writes ``config.json``: the ``quantization_config`` it writes then
        describes the NF4 layers the model has now (PEFT's ``merge_and_unload`` makes adapted layers dense), or is left
        out once none is left (a plain dense checkpoint). The state dict is the model's own (bitsandbytes' keys), but
        for NF4 experts: those are written dense (the NF4 weights dequantized, in the dtype they were quantized from),
        as bitsandbytes' own checkpoints hold experts, so that transformers' legacy per-expert layout
        (``save_original_format``) and transformers + bitsandbytes can read them; reloading quantizes them again
        (NF4 of an NF4-dequantized tensor is the same NF4, but for the double-quant rounding of the constants)."""
        if any(isinstance(m, NF4Linear) for m in model.modules()):
            model.config.quantization_config = bnb_quantization_config(model)
        else:
            with contextlib.suppress(AttributeError):
                delattr(model.config, "quantization_config")
        experts = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Experts)]
        if not experts:
            return None, {}
        state = model.state_dict()
        for name, module in experts:
            for proj in moe.PROJECTIONS:
                key = f"{name}.{proj}"
                for k in [k for k in state if k == key or k.startswith(key + ".")]:
                    del state[k]
                qw = module.qweight(proj)
                state[key] = dequantize_nf4(qw, qw.dtype)
        return state, {}

    def _experts(self, name: str, module: nn.Module, plan: str) -> NF4Experts:
        """The :class:`NF4Experts` of a loaded experts module: its tensors quantized as they arrived, or stored."""
        shapes = getattr(module, _EXPERT_SHAPES)
        weights = []
        for proj in moe.PROJECTIONS:
            t = getattr(module, proj)
            qw = getattr(t, "nf4_weight", None) if plan == "experts" else _read_nf4_weight(
                self._ckpt, self._plan.direct, f"{name}.{proj}", "checkpoint", t.detach())
            if qw is None:
                raise ValueError(f"the checkpoint has no float tensor for the experts' {name}.{proj}")
            if tuple(qw.shape) != shapes[proj]:
                raise ValueError(f"{name}.{proj}: the checkpoint's weight has shape {list(qw.shape)}; the model "
                                 f"expects {list(shapes[proj])}")
            weights.append(qw)
        return _keep_device_hook(module, moe.nf4_experts(module, weights))

    def _stored_weight(self, name: str, module: nn.Module) -> NF4Weight:
        # the packed codes transformers read into the meta weight, the quant state from the checkpoint
        return _read_nf4_weight(self._ckpt, self._plan.direct, f"{name}.weight", "checkpoint", module.weight.detach())

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        for name, module in list(model.named_modules()):
            if type(module) is NF4Linear:
                replace_module(model, name, dense_layer(module, dtype))
            elif isinstance(module, NF4Experts):
                replace_module(model, name, moe.dense_experts(module, dtype))
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _keep_device_hook(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` with accelerate's device hook of the module it replaces (a dispatched model's), if it had one."""
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    return new


def bnb_free_config(path: str | Path, **kwargs: Any) -> PretrainedConfig:
    """``AutoConfig`` of a local model directory without its bitsandbytes ``quantization_config``, for
    ``from_pretrained(path, config=bnb_free_config(path), quantization_config=QLoraKernelsConfig())`` (transformers
    refuses a quantization_config argument of another class than the checkpoint's). Other quantization methods are an
    error naming the method (their bytes are not NF4). ``kwargs`` go to ``AutoConfig.from_pretrained``."""
    config = AutoConfig.from_pretrained(path, **kwargs)
    if getattr(config, "quantization_config", None) is not None:
        bnb_format.read_quantization_config(config)  # ValueError unless bitsandbytes 4-bit nf4
        config.quantization_config = None
    return config


# transformers' registration points (once: a module reload must not register twice)
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(QLoraKernelsConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(QLoraKernelsHfQuantizer)
