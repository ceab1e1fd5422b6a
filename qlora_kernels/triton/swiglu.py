"""Triton SwiGLU forward and backward (the formulas: qlora_kernels/reference/swiglu.py).

Elementwise over flat contiguous tensors: one program owns ``BLOCK`` elements (int64 offsets), loads
g and u (and dh) once, computes in fp32 and stores in the inputs' dtype. The backward writes dg, du
and h in the same pass, so the MLP's fused backward reads g and u once and never keeps h from the
forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_matmul import on_device


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(dg_ptr + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        with on_device(g):
            _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, h, n, BLOCK=_BLOCK)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    dg, du, h = torch.empty_like(g), torch.empty_like(u), torch.empty_like(g)
    n = g.numel()
    if n:
        with on_device(g):
            _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dh, g, u, dg, du, h, n, BLOCK=_BLOCK)
    return dg, du, h
