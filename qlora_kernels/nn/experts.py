"""Mixture-of-experts weights in NF4: :class:`NF4Experts`, in place of transformers 5's fused experts modules.

transformers 5 stores a MoE layer's experts as two 3-D parameters, ``gate_up_proj [E, 2I, H]`` (the gate
and up projections concatenated, gate first) and ``down_proj [E, H, I]``, and calls the experts module as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` (Mixtral, Qwen2-MoE,
Qwen3-MoE, ...). Those tensors are most of a MoE model's weights, and bitsandbytes leaves them dense.
:class:`NF4Experts` holds both in NF4 (each one NF4 tensor, blocks in its flattened order: the same
bytes bitsandbytes' ``quantize_4bit`` makes of the 3-D tensor) and computes the same function with the
grouped NF4 matmul: the (token, slot) pairs are sorted by expert once, each projection is one
:func:`qlora_kernels.functional.nf4_grouped_linear` over all experts, and the outputs are weighted and
summed back per token. The router stays dense (it is not part of this module).

Optional LoRA (``add_lora``): per expert e, ``W_e + s B_e A_e`` for each projection, with
``lora_A [E, r, in]`` and ``lora_B [E, out, r]`` (B zeros at init, as PEFT), trained through the grouped
rows of each expert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..dtypes import FLOAT_DTYPES
from ..functional import _nf4_grouped_linear
from ..nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from .lora_args import check_lora_args, lora_scaling
from .nf4_storage import NF4TensorHolder

# The two 3-D parameters of a fused-experts module, by transformers' names.
PROJECTIONS = ("gate_up_proj", "down_proj")


class NF4Experts(NF4TensorHolder):
    """The experts of a MoE layer with NF4 weights: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``, as
    transformers' experts modules: ``sum_j w_j * down_e(act(gate_e(x)) * up_e(x))`` over the k experts
    e = top_k_index[t, j] of each token (an index equal to E, or negative, is a dropped slot).
    """

    def __init__(self, gate_up_proj: NF4Weight, down_proj: NF4Weight, act_fn: nn.Module) -> None:
        super().__init__()
        for name, qw in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            if not isinstance(qw, NF4Weight) or len(qw.shape) != 3:
                got = list(qw.shape) if isinstance(qw, NF4Weight) else type(qw).__name__
                raise ValueError(f"{name} must be an NF4Weight [experts, out, in]; got {got}")
        e, two_i, h = gate_up_proj.shape
        if two_i % 2 or tuple(down_proj.shape) != (e, h, two_i // 2):
            raise ValueError(f"down_proj must be [{e}, {h}, {two_i // 2}] for gate_up_proj {list(gate_up_proj.shape)}; "
                             f"got {list(down_proj.shape)}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = e, h, two_i // 2
        self.act_fn = act_fn
        self._weights: dict[str, tuple] = {}
        for name, qw in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            self._set_weight(name, qw)
        self.r = 0
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling = 0.0
        self.lora_dropout = 0.0
        self.disable_adapters = False

    def _set_weight(self, name: str, qw: NF4Weight) -> None:
        # buffers (non-persistent: the state dict gets the bitsandbytes keys, see _save_to_state_dict), or frozen
        # parameters when this instance holds them so (nf4_storage)
        tensors = dict(packed=qw.packed, absmax=qw.absmax, code=qw.code, nested_absmax=qw.nested_absmax,
                       nested_code=qw.nested_code)
        for part, t in tensors.items():
            self._put_nf4(f"{name}_{part}", t)
        self._weights[name] = (tuple(qw.shape), qw.dtype, qw.blocksize, float(qw.offset))

    def qweight(self, name: str) -> NF4Weight:
        """The NF4 weight of ``gate_up_proj`` or ``down_proj`` (sharing this module's NF4 tensors; RuntimeError when
        FSDP2 holds only this rank's shards of them, outside the unit's forward)."""
        self._check_not_sharded()
        shape, dtype, blocksize, offset = self._weights[name]
        return NF4Weight(packed=getattr(self, f"{name}_packed"), absmax=getattr(self, f"{name}_absmax"),
                         shape=torch.Size(shape), dtype=dtype, blocksize=blocksize, code=getattr(self, f"{name}_code"),
                         nested_absmax=getattr(self, f"{name}_nested_absmax"),
                         nested_code=getattr(self, f"{name}_nested_code"), offset=offset)

    def _nf4_names(self) -> tuple[str, ...]:
        return tuple(f"{n}_{part}" for n in PROJECTIONS for part in ("packed", "absmax", "code", "nested_absmax",
                                                                        "nested_code"))

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) / .half() must not cast the NF4 codes and fp32 constants: they only change device
        # (the device is what fn does to an empty probe on theirs: .to(), .cuda(), .cpu(), .to_empty()).
        nf4 = self._pop_nf4()
        try:
            super()._apply(fn, recurse)
        finally:
            self._restore_nf4(nf4, fn)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._save_without_nf4(destination, prefix, keep_vars)
        for name in PROJECTIONS:  # bitsandbytes' keys of a 4-bit tensor, under the parameter's own name
            for key, t in self.qweight(name).to_bnb_state_dict(prefix + name).items():
                destination[key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in PROJECTIONS:
            key = prefix + name
            ours = [k for k in state_dict if k == key or k.startswith(key + ".")]
            if not ours:
                if strict:
                    missing_keys.append(key)
                continue
            try:
                qw = NF4Weight.from_bnb_state_dict(state_dict, key)
                want = self._weights[name][0]
                if tuple(qw.shape) != want:
                    raise ValueError(f"shape must be {list(want)}; got {list(qw.shape)}")
                self._set_weight(name, qw.to(getattr(self, f"{name}_packed").device))
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"While loading the 4-bit experts tensor {key!r}: {exc}")
        self._load_without_nf4(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name in PROJECTIONS:
            for k in [k for k in unexpected_keys if k == prefix + name or k.startswith(prefix + name + ".")]:
                unexpected_keys.remove(k)

    # -- LoRA ------------------------------------------------------------------------------------

    def add_lora(self, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32, projections: tuple[str, ...] = PROJECTIONS) -> None:
        """Trainable LoRA on every expert of ``projections`` (default both; A Kaiming-uniform, B zeros: no
        change at init)."""
        r, lora_alpha, lora_dropout = check_lora_args(r, lora_alpha, lora_dropout)
        bad = [p for p in projections if p not in PROJECTIONS] or ([] if projections else ["(none)"])
        if bad:
            raise ValueError(f"projections must be a non-empty subset of {PROJECTIONS}; got {tuple(projections)}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, lora_dropout, bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, self.use_rslora)
        device = self.gate_up_proj_packed.device
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in projections:
            e, out_f, in_f = self._weights[name][0]
            a = torch.empty(e, self.r, in_f, device=device, dtype=dtype)
            for i in range(e):  # PEFT's init, expert by expert
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(e, out_f, self.r, device=device, dtype=dtype))

    def _lora_delta(self, name: str, x: Tensor, bounds: list[int]) -> Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        if self.training and self.lora_dropout > 0:
            x = nn.functional.dropout(x, self.lora_dropout)
        parts = []
        for e in range(self.num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                parts.append((x[lo:hi] @ a[e].to(x.dtype).t()) @ b[e].to(x.dtype).t())
        if not parts:
            return x.new_zeros(0, b.shape[1])
        return torch.cat(parts)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        t, k = top_k_index.shape
        if hidden_states.dim() != 2 or hidden_states.shape[0] != t or hidden_states.shape[1] != self.hidden_dim:
            raise ValueError(f"hidden_states must be [{t}, {self.hidden_dim}]; got {list(hidden_states.shape)}")
        flat = top_k_index.reshape(-1)
        keep = (flat >= 0) & (flat < self.num_experts)
        slots = torch.nonzero(keep).squeeze(1)
        experts = flat[slots]
        order = torch.argsort(experts, stable=True)
        slots, experts = slots[order], experts[order]
        token = slots // k
        counts = torch.bincount(experts, minlength=self.num_experts)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        lora = self.r > 0 and not self.disable_adapters
        bounds = offsets.tolist() if lora else None  # the LoRA rows are cut on the host
        x = hidden_states[token]
        gu = self._grouped("gate_up_proj", x, offsets)
        if lora and "gate_up_proj" in self.lora_A:
            gu = gu + self.scaling * self._lora_delta("gate_up_proj", x, bounds)
        gate, up = gu.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        out = self._grouped("down_proj", h, offsets)
        if lora and "down_proj" in self.lora_A:
            out = out + self.scaling * self._lora_delta("down_proj", h, bounds)
        out = out * top_k_weights.reshape(-1)[slots].unsqueeze(1).to(out.dtype)
        final = torch.zeros_like(hidden_states, dtype=out.dtype)
        return final.index_add_(0, token, out).to(hidden_states.dtype)

    def _grouped(self, name: str, x: Tensor, offsets: Tensor) -> Tensor:
        shape, _, blocksize, offset = self._weights[name]
        weight = (getattr(self, f"{name}_packed"), getattr(self, f"{name}_absmax"), getattr(self, f"{name}_code"),
                  getattr(self, f"{name}_nested_absmax"), getattr(self, f"{name}_nested_code"), offset, blocksize)
        return _nf4_grouped_linear(x, offsets, weight, shape[1], shape[2])

    # -- conversions -----------------------------------------------------------------------------

    def dense(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """``deq(W) (+ s B A per expert)`` of one projection, [E, out, in], in ``dtype`` (default: as quantized)."""
        qw = self.qweight(name)
        w = dequantize_nf4(qw, torch.float32)
        if self.r > 0 and name in self.lora_A:
            w = w + self.scaling * (self.lora_B[name].detach().float() @ self.lora_A[name].detach().float())
        return w.to(qw.dtype if dtype is None else dtype)

    def extra_repr(self) -> str:
        lora = f", r={self.r}, scaling={self.scaling:g}" if self.r else ""
        dims = f"hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}"
        return f"num_experts={self.num_experts}, {dims}{lora}"

    @classmethod
    def from_experts(cls, module: nn.Module, blocksize: int = 64, double_quant: bool = True) -> NF4Experts:
        """Quantize a transformers experts module (``gate_up_proj``, ``down_proj`` 3-D parameters and ``act_fn``)."""
        weights = []
        for name in PROJECTIONS:
            w = getattr(module, name, None)
            if not isinstance(w, Tensor) or w.dim() != 3:
                raise TypeError(f"module must hold a 3-D {name} (transformers' fused experts); "
                                f"{type(module).__name__} has {type(w).__name__}")
            if w.device.type == "meta":
                raise ValueError(f"{type(module).__name__}.{name} is on the meta device: nothing to quantize")
            weights.append(quantize_nf4(w.detach(), blocksize=blocksize, double_quant=double_quant))
        if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
            raise NotImplementedError(f"{type(module).__name__} has expert biases, which NF4Experts does not take")
        return cls(weights[0], weights[1], module.act_fn)
