"""The SwiGLU ops of the fused QLoRA MLP: schema, fake implementation, dispatch.

* ``swiglu(g, u) -> h = silu(g) * u``
* ``swiglu_backward(dh, g, u) -> (dg, du, h)``

g, u, dh: one shape, one float dtype, one device; results in that dtype. The formulas:
``qlora_kernels/reference/swiglu.py``. Kernels: Triton on a GPU, the reference elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dtypes import FLOAT_DTYPES
from ..reference import swiglu as ref
from ._dispatch import Kernel, choose, declare
from .nf4 import _triton


def _check(**tensors: Tensor) -> None:
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{name} must have {first_name}'s shape, dtype and device {list(first.shape)}, "
                             f"{first.dtype}, {first.device}; got {list(t.shape)}, {t.dtype}, {t.device}")


def _rows(op: str, name: str, reference) -> tuple[Kernel, ...]:
    return declare(
        op,
        Kernel(op, "triton", "cuda", "Triton", run=lambda *a: _triton("swiglu", name)(*a)),
        Kernel(op, "triton", "cpu", "Triton (interpreter)", default=False, run=lambda *a: _triton("swiglu", name)(*a)),
        Kernel(op, "reference", "any", "PyTorch", run=reference),
    )


SWIGLU = _rows("swiglu", "swiglu", ref.swiglu)
SWIGLU_BACKWARD = _rows("swiglu_backward", "swiglu_backward", ref.swiglu_backward)


@torch.library.custom_op("qlora_kernels::swiglu", mutates_args=())
def swiglu(g: Tensor, u: Tensor) -> Tensor:
    _check(g=g, u=u)
    return choose("swiglu", g.device).run(g, u)


@swiglu.register_fake
def _(g, u):
    _check(g=g, u=u)
    return torch.empty_like(g)


@torch.library.custom_op("qlora_kernels::swiglu_backward", mutates_args=())
def swiglu_backward(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check(dh=dh, g=g, u=u)
    return choose("swiglu_backward", g.device).run(dh, g, u)


@swiglu_backward.register_fake
def _(dh, g, u):
    _check(dh=dh, g=g, u=u)
    return torch.empty_like(g), torch.empty_like(u), torch.empty_like(g)
