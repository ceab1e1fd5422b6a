"""SwiGLU, the gated activation of Llama-style MLPs: ``h = silu(g) * u`` with ``silu(g) = g * sigmoid(g)``.

Backward, for the upstream gradient dh: ``du = dh * silu(g)`` and
``dg = dh * u * silu'(g)`` with ``silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))``; the fused
backward also returns h itself (the MLP's down projection needs it for its LoRA gradients, so it is
recomputed there instead of kept from the forward). Computed in fp32, returned in the inputs' dtype.
"""

from __future__ import annotations

import torch


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    gf = g.float()
    return (gf * torch.sigmoid(gf) * u.float()).to(g.dtype)


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """``(dg, du, h)``."""
    gf, uf, dhf = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(gf)
    silu = gf * sig
    dg = dhf * uf * sig * (1.0 + gf * (1.0 - sig))
    return dg.to(g.dtype), (dhf * silu).to(u.dtype), (silu * uf).to(g.dtype)
