"""Modules: a frozen 4-bit linear (:class:`NF4Linear`) and the QLoRA layer on top of it (:class:`QLoraLinear`).

Both keep the NF4 weight as (non-persistent) buffers, so ``.to()`` / ``.cuda()`` move it (or, switched on the
instance for FSDP2, as frozen parameters: :mod:`qlora_kernels.nn.nf4_storage`), and write it
to the state dict under bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a
state dict moves both ways between these modules, ``bitsandbytes.nn.Linear4bit`` and transformers'
4-bit checkpoints. The adapters are ``lora_A`` / ``lora_B`` submodules, so their keys are PEFT's
(``lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import bnb_format
from ..dtypes import FLOAT_DTYPES, dtype_name
from ..functional import _lora_linear, _nf4_linear
from ..nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from .lora_adapter import LoraAdapterMixin
from .nf4_storage import NF4TensorHolder

_NF4_BUFFERS = ("nf4_packed", "nf4_absmax", "nf4_code", "nf4_nested_absmax", "nf4_nested_code")


class NF4Linear(NF4TensorHolder, nn.Linear):
    """A frozen linear layer whose weight is NF4: ``y = x @ deq(W)^T + bias``.

    What :func:`qlora_kernels.load_4bit_model` puts in place of each quantized linear layer, and the base of
    :class:`QLoraLinear`. Gradients flow to x (and to the bias if it requires grad); the weight is frozen.

    It is an ``nn.Linear`` subclass (as bitsandbytes' ``Linear4bit`` is), so code that looks for linear layers by type
    finds it: PEFT's ``target_modules="all-linear"``, its in/out-feature lookup, transformers' helpers. It never calls
    ``nn.Linear.__init__`` (there is no dense weight), and :meth:`reset_parameters` leaves the frozen weight alone.

    Attributes:
        in_features, out_features: the layer's shape.
        bias: ``nn.Parameter [out_features]`` (frozen by default) or None.
        fan_in_fan_out: True when the layer replaced a GPT-2 style ``Conv1D`` (weight stored ``[in, out]``
            there); the NF4 weight itself is always ``[out, in]``. Used to turn it back into a Conv1D.
        compute_dtype: the dtype of the model the layer sits in, or None when unknown. The NF4 weight keeps the
            dtype it was quantized from (``qweight.dtype``, what a bitsandbytes quant state records); a model can
            compute in another (:func:`qlora_kernels.load_4bit_model` sets its ``dtype`` here; ``Module.to(dtype)``,
            ``.half()`` etc. update it). :meth:`to_linear` (so :func:`qlora_kernels.merge_and_unload`) makes its
            dense layer in this dtype.
        weight: the packed NF4 codes, uint8 (as ``bitsandbytes.nn.Linear4bit.weight``); :attr:`qweight`
            gives the whole :class:`NF4Weight`.
    """

    def __init__(self, qweight: NF4Weight, bias: Tensor | None = None, fan_in_fan_out: bool = False) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no dense weight is allocated
        if not isinstance(qweight, NF4Weight):
            raise TypeError(f"qweight must be an NF4Weight; got {type(qweight).__name__}")
        if len(qweight.shape) != 2:
            raise ValueError(f"qweight must be 2-D [out_features, in_features]; got shape {list(qweight.shape)}")
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self._set_qweight(qweight)
        if bias is not None:
            if not isinstance(bias, Tensor) or bias.dtype not in FLOAT_DTYPES:
                got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
                raise TypeError(f"bias must be a float32, float16 or bfloat16 tensor; got {got}")
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape [{self.out_features}]; got {list(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone().to(qweight.device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.compute_dtype: torch.dtype | None = None

    # -- the NF4 weight -------------------------------------------------------------------------

    def _nf4_names(self) -> tuple[str, ...]:
        return _NF4_BUFFERS

    def _set_qweight(self, qw: NF4Weight) -> None:
        tensors = (qw.packed, qw.absmax, qw.code, qw.nested_absmax, qw.nested_code)
        for name, t in zip(_NF4_BUFFERS, tensors):
            # Buffers (non-persistent: the state dict gets them under bitsandbytes' keys instead, see below), or
            # frozen parameters when this instance holds them so (nf4_storage).
            self._put_nf4(name, t)
        self.nf4_offset = float(qw.offset)
        self.nf4_blocksize = int(qw.blocksize)
        self.nf4_dtype = qw.dtype

    @property
    def qweight(self) -> NF4Weight:
        """The frozen base weight as an :class:`NF4Weight` (sharing this module's NF4 tensors).

        Raises RuntimeError when FSDP2 holds only this rank's shards of them (outside the unit's forward)."""
        self._check_not_sharded()
        return NF4Weight(
            packed=self.nf4_packed, absmax=self.nf4_absmax, shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.nf4_dtype, blocksize=self.nf4_blocksize, code=self.nf4_code,
            nested_absmax=self.nf4_nested_absmax, nested_code=self.nf4_nested_code, offset=self.nf4_offset,
        )

    @property
    def weight(self) -> Tensor:
        return self.nf4_packed

    def reset_parameters(self) -> None:
        """Nothing to do: the NF4 weight is frozen data, not an initialisable parameter (``nn.Linear``'s hook)."""

    def _weight_args(self) -> tuple:
        return (self.nf4_packed, self.nf4_absmax, self.nf4_code, self.nf4_nested_absmax, self.nf4_nested_code,
                self.nf4_offset, self.nf4_blocksize)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) / .half() would cast the fp32 NF4 constants (code, absmax, nested maps) and
        # corrupt the weight; the NF4 buffers only ever change device. The device comes from what fn does
        # to an empty probe tensor on their device, which covers .to(), .cuda(), .cpu() and .to_empty().
        # (Buffers or frozen parameters alike: nf4_storage.)
        nf4 = self._pop_nf4()
        try:
            super()._apply(fn, recurse)
            # A dtype cast of the module (.to(dtype), .half()) moves the model to another compute dtype.
            probe = fn(torch.empty(0, dtype=self.compute_dtype or self.nf4_dtype))
            if probe.dtype in FLOAT_DTYPES:
                self.compute_dtype = probe.dtype
        finally:
            self._restore_nf4(nf4, fn)
        return self

    # -- state dict in bitsandbytes' keys ---------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._save_without_nf4(destination, prefix, keep_vars)
        for key, t in self.qweight.to_bnb_state_dict(prefix + "weight").items():
            destination[key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        ours = [key for key in state_dict if key == wkey or key.startswith(wkey + ".")]
        if ours:
            try:
                qw = NF4Weight.from_bnb_state_dict(state_dict, wkey)
                want = (self.out_features, self.in_features)
                if tuple(qw.shape) != want:
                    raise ValueError(f"shape must be {list(want)} (out_features, in_features); got {list(qw.shape)}")
                here = self.nf4_packed.device
                if here.type != "meta" and not local_metadata.get("assign_to_params_buffers", False):
                    qw = _copy_nf4(qw, here)
                self._set_qweight(qw)
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"While loading the 4-bit weight {wkey!r}: {exc}")
        elif strict:
            missing_keys.append(wkey)
        self._load_without_nf4(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for key in ours:
            if key in unexpected_keys:
                unexpected_keys.remove(key)

    # -- forward and conversions ------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x must be a float32, float16 or bfloat16 tensor; got {got}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}] (in_features); got {list(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return _nf4_linear(x, self._weight_args(), self.out_features, self.in_features, self.bias)

    def _dense_weight(self) -> Tensor:
        """``deq(W)`` in fp32, [out, in]."""
        return dequantize_nf4(self.qweight, torch.float32)

    def to_linear(self, dtype: torch.dtype | None = None, delta: Tensor | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight and this layer's bias, in ``dtype``; by default the
        layer's :attr:`compute_dtype` (the model's dtype), else (unknown) the dtype the weight was quantized from.
        ``delta`` (``[out_features, in_features]``, e.g. a LoRA update ``scaling * B @ A``) is added to the weight in
        fp32 before the one rounding to ``dtype``. A :class:`QLoraLinear`'s weight includes its adapter:
        ``deq(W) + scaling * B @ A`` (+ ``delta``)."""
        if dtype is None:
            dtype = self.compute_dtype or self.nf4_dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
        want = (self.out_features, self.in_features)
        if delta is not None and (not isinstance(delta, Tensor) or tuple(delta.shape) != want):
            got = list(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__
            raise ValueError(f"delta must be a tensor of shape {list(want)} (out_features, in_features); got {got}")
        device = self.nf4_packed.device
        with torch.no_grad():
            weight = self._dense_weight()
            if delta is not None:
                weight = weight + delta.detach().to(device=weight.device, dtype=torch.float32)
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype))
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone())
        return linear

    def extra_repr(self) -> str:
        dq = self.nf4_nested_absmax is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.nf4_blocksize}, double_quant={dq}, dtype={dtype_name(self.nf4_dtype)}"
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantize an ``nn.Linear`` (weight and bias are copied; the original is left alone)."""
        weight, bias = _linear_weight(linear)
        return cls(quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant), bias)

    @classmethod
    def from_bnb(cls, module: nn.Module) -> NF4Linear:
        """Wrap a ``bitsandbytes.nn.Linear4bit`` (nf4) without requantizing (see :func:`nf4_weight_from_bnb`)."""
        return cls(nf4_weight_from_bnb(module), module.bias)


class QLoraLinear(LoraAdapterMixin, NF4Linear):
    """The QLoRA layer: ``y = x @ deq(W)^T + bias + scaling * dropout(x) @ A^T @ B^T``.

    W is a frozen NF4 weight (as in :class:`NF4Linear`); ``lora_A`` (``nn.Linear(in, r)``, weight ``[r, in]``)
    and ``lora_B`` (``nn.Linear(r, out)``, weight ``[out, r]``) are the trainable adapters, initialised as
    PEFT does (A kaiming-uniform with a=√5, B zeros: the output is unchanged at step 0). ``scaling`` is
    ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``. The forward and backward are the
    fused :func:`qlora_kernels.lora_linear`; dropout applies in training mode only.

    Merging: a 4-bit base cannot absorb ``scaling * B @ A`` without requantizing it, and NF4's step between
    codes (~0.1-0.3 of a block's absmax) is larger than typical LoRA updates, so a requantized merge would
    round most of the fine-tuning away. So :meth:`merge` is exact instead: it freezes the adapter into the
    layer (no gradients to A and B, no dropout) and the layer keeps computing the same output, the LoRA
    term folded into the base matmul's output; :meth:`unmerge` undoes it. :meth:`to_linear` (and
    :func:`qlora_kernels.merge_and_unload`) make the real dense merge ``deq(W) + scaling * B @ A``.

    ``disable_adapters = True`` turns the adapter off (the base layer alone), e.g. for DPO's reference model.
    """

    def __init__(
        self,
        qweight: NF4Weight,
        bias: Tensor | None = None,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__(qweight, bias, fan_in_fan_out)
        r, lora_alpha, lora_dropout = self._check_lora_args(r, lora_alpha, lora_dropout, lora_dtype)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, lora_dtype, qweight.device)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        n, k = self.out_features, self.in_features
        if self.disable_adapters:
            return _nf4_linear(x, self._weight_args(), n, k, self.bias)
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.merged:
            a, b = a.detach(), b.detach()
        p = self.lora_dropout if (self.training and not self.merged) else 0.0
        return _lora_linear(x, self._weight_args(), n, k, a, b, self.scaling, self.bias, p)

    def _dense_weight(self) -> Tensor:
        # The adapter is part of the layer whether or not it is disabled for the moment.
        return super()._dense_weight() + self.delta_weight()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._lora_repr()}"

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
        lora_dtype: torch.dtype = torch.float32,
    ) -> QLoraLinear:
        """Quantize an ``nn.Linear`` to NF4 and add fresh adapters (weight and bias are copied; the original
        is left alone). The NF4 bytes are bitsandbytes'."""
        weight, bias = _linear_weight(linear)
        qw = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        return cls(qw, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                   lora_dtype=lora_dtype)

    @classmethod
    def from_bnb(
        cls,
        module: nn.Module,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ) -> QLoraLinear:
        """Add adapters to a ``bitsandbytes.nn.Linear4bit`` (nf4): its packed weight and quant state are
        used as they are, never requantized (see :func:`nf4_weight_from_bnb`)."""
        return cls(nf4_weight_from_bnb(module), module.bias, r=r, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, use_rslora=use_rslora, lora_dtype=lora_dtype)

    @classmethod
    def from_nf4(
        cls,
        module: NF4Linear,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ) -> QLoraLinear:
        """Add adapters to an :class:`NF4Linear` (sharing its NF4 tensors and bias; nothing is requantized)."""
        if not isinstance(module, NF4Linear) or isinstance(module, QLoraLinear):
            raise TypeError(f"module must be an NF4Linear without adapters; got {type(module).__name__}")
        layer = cls(module.qweight, None, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    use_rslora=use_rslora, lora_dtype=lora_dtype, fan_in_fan_out=module.fan_in_fan_out)
        layer.bias = module.bias
        layer.compute_dtype = module.compute_dtype
        return layer


# ---------------------------------------------------------------------------------------------
# helpers


def _copy_nf4(qw: NF4Weight, device: torch.device) -> NF4Weight:
    def copy(t):
        return None if t is None else t.to(device=device, copy=True)

    return NF4Weight(copy(qw.packed), copy(qw.absmax), qw.shape, qw.dtype, qw.blocksize, copy(qw.code),
                     copy(qw.nested_absmax), copy(qw.nested_code), qw.offset)


def _linear_weight(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    if isinstance(linear, NF4Linear):
        raise TypeError(f"linear is already 4-bit ({type(linear).__name__}): use QLoraLinear.from_nf4, which does not "
                        f"requantize")
    if bnb_format.linear4bit_quant_type(linear) is not None:
        raise TypeError(f"linear is a bitsandbytes {type(linear).__name__}: use from_bnb, which does not requantize")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
    w = linear.weight
    if w.device.type == "meta":
        raise ValueError("linear.weight is on the meta device: there is nothing to quantize")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"linear.weight must be float32, float16 or bfloat16; got {w.dtype}")
    return w.detach(), None if linear.bias is None else linear.bias.detach()


def nf4_weight_from_bnb(module: nn.Module) -> NF4Weight:
    """The :class:`NF4Weight` of a ``bitsandbytes.nn.Linear4bit`` (quant_type nf4), sharing its tensors.

    A quantized layer's packed codes and quant state are taken as they are, no requantizing (from bitsandbytes'
    CPU inference layout too: see :func:`qlora_kernels.bnb_format.linear4bit_fields`); a layer whose weight
    bitsandbytes has not quantized yet is quantized here as bitsandbytes would.
    """
    pending = bnb_format.linear4bit_float_weight(module)
    if pending is not None:
        weight, blocksize, double_quant = pending
        return quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    return NF4Weight(**bnb_format.linear4bit_fields(module))
