"""The LoRA adapter pair of a linear layer, one implementation for the NF4 base (:class:`~qlora_kernels.nn.QLoraLinear`)
and the dense base (:class:`~qlora_kernels.hf.DenseLoraLinear`): ``lora_A`` / ``lora_B`` and their init, the scaling,
the ``merged`` / ``disable_adapters`` flags, :meth:`~LoraAdapterMixin.merge` / :meth:`~LoraAdapterMixin.unmerge` and
the dense update :meth:`~LoraAdapterMixin.delta_weight`. Each layer checks its own arguments and computes its own
forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..dtypes import FLOAT_DTYPES
from .lora_args import check_lora_args, lora_scaling


class LoraAdapterMixin:
    """The adapters of an ``nn.Module`` with ``in_features`` / ``out_features``: ``lora_A`` (``nn.Linear(in, r)``,
    weight ``[r, in]``) and ``lora_B`` (``nn.Linear(r, out)``, weight ``[out, r]``), PEFT's names and init."""

    @staticmethod
    def _check_lora_args(r: object, lora_alpha: object, lora_dropout: object,
                         lora_dtype: object) -> tuple[int, int | float, float]:
        """:func:`~qlora_kernels.nn.lora_args.check_lora_args`, then ``lora_dtype`` (TypeError unless a float dtype)."""
        checked = check_lora_args(r, lora_alpha, lora_dropout)
        if lora_dtype not in FLOAT_DTYPES:
            raise TypeError(f"lora_dtype must be float32, float16 or bfloat16; got {lora_dtype}")
        return checked

    def _init_lora(self, r: int, lora_alpha: int | float, lora_dropout: float, use_rslora: bool,
                   lora_dtype: torch.dtype, device: torch.device) -> None:
        """Set the (checked) hyper-parameters and the scaling, and add fresh adapters on ``device``."""
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, lora_dropout, bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, self.use_rslora)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        self.reset_lora_parameters()
        self.merged = False
        self.disable_adapters = False

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform (a=√5), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def merge(self) -> None:
        """Freeze the adapter into the layer (exact: the layer keeps computing the same output): no gradients to
        lora_A / lora_B, no dropout."""
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: the adapter trains again."""
        self.merged = False

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` in fp32, [out, in]."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    def _lora_repr(self) -> str:
        """The adapter's part of ``extra_repr``."""
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}")
