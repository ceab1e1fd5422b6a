"""Reference AdamW steps (fp32 states and blockwise 8-bit states) over chunked multi-tensor work.

This is the readable oracle for the kernels behind ``torch.ops.qlora_kernels.adamw_step_`` and
``adamw8bit_step_`` (see ``qlora_kernels/ops/adamw.py`` for the argument contract).

The work is a list of chunks, rows of the int64 table ``chunks [n, 4]``::

    (i, start, length, offset):  params[i].view(-1)[start : start + length]
                                 grads[i].view(-1)[start : start + length]
                                 exp_avg[offset : offset + length]   (and every other state buffer)

The update of one element, in fp32, each operation rounded once to fp32 (no fused multiply-add),
so that every backend can reproduce it bit for bit whatever the chunking::

    if not isfinite(g):  skip the element (p, m, v, master unchanged) and set found_inf = 1
    p = p * decay                                  decay         = fl(1 - lr * weight_decay)
    m = m * beta1 + g * omb1                       omb1          = fl(1 - beta1)
    v = v * beta2 + (g * g) * omb2                 omb2          = fl(1 - beta2)
    d = sqrt(v) * inv_bc2 + eps                    inv_bc2       = fl(1 / sqrt(1 - beta2 ** step))
    p = p + (m / d) * neg_step_size                neg_step_size = fl(-lr / (1 - beta1 ** step))

``p`` is the fp32 master copy when one is given (the param then receives ``p`` rounded to its
dtype), else the param itself read as fp32. The constants are computed on the host in double
precision (as ``torch.optim.AdamW`` computes its bias corrections) and rounded once to fp32.
This is the math of ``torch.optim.AdamW`` (decoupled weight decay) up to the order of rounding:
torch uses ``lerp`` for ``m`` and divides by ``sqrt(bias_correction2)``; the results agree to
about one fp32 ulp per step.

8-bit states (bitsandbytes-style blockwise quantization, blocks of 256 consecutive state
elements; chunk starts and offsets are multiples of 256)::

    m = qmap_m[qm] * absmax_m[block]      v = qmap_v[qv] * absmax_v[block]      (dequantize)
    ... the update above, in fp32, with the unquantized new m and v ...
    absmax_m[block] = max |m|,  absmax_v[block] = max v          (over the block's own elements)
    qm = nearest(qmap_m, m / absmax_m)  qv = nearest(qmap_v, v / absmax_v)   (0 if absmax is 0)

``nearest(map, x) = #{i : x > mid_i}`` over the 255 fp32 midpoints ``(map[i] + map[i+1]) / 2``:
the nearest entry, ties to the lower one, NaN to 0. ``qmap_m`` is bitsandbytes' signed dynamic
map (``quant_maps.dynamic_map()``), ``qmap_v`` its unsigned one (``unsigned_dynamic_map()``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..quant_maps import unsigned_dynamic_map  # noqa: F401  (the second moment's code table)

#: Elements per quantization block of the 8-bit states (as bitsandbytes' blockwise optimizers).
STATE_BLOCKSIZE = 256


def midpoints(qmap: Tensor) -> Tensor:
    """The 255 fp32 midpoints between consecutive entries of a sorted code table."""
    return (qmap[:-1] + qmap[1:]) / 2


# ---------------------------------------------------------------------------------------------
# Blockwise 8-bit codec (the format of the 8-bit states)


def _blocks(x: Tensor, blocksize: int = STATE_BLOCKSIZE) -> Tensor:
    """``x`` (flat) zero-padded to whole blocks, as ``[nblocks, blocksize]``."""
    pad = (-x.numel()) % blocksize
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, blocksize)


def nearest_code(x: Tensor, mids: Tensor) -> Tensor:
    """uint8 code of each element of ``x``: ``#{i : x > mids[i]}`` (NaN -> 0)."""
    codes = torch.searchsorted(mids, x.contiguous())  # #{mid < x} for every non-NaN x
    codes = torch.where(torch.isnan(x), torch.zeros_like(codes), codes)
    return codes.to(torch.uint8)


def quantize_blockwise(x: Tensor, qmap: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization of a flat fp32 tensor: ``(codes uint8 [n], absmax fp32 [ceil(n/256)])``.

    ``absmax`` is ``max |x|`` per block (``max x`` for an unsigned map, whose values are >= 0).
    """
    x = x.reshape(-1).float()
    n = x.numel()
    blocks = _blocks(x)
    absmax = (blocks.abs() if signed else blocks).amax(dim=1)
    scale = absmax.repeat_interleave(STATE_BLOCKSIZE)[:n]
    normed = torch.where(scale > 0, x / scale, torch.zeros_like(x))
    return nearest_code(normed, midpoints(qmap)), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """fp32 values of blockwise 8-bit codes: ``qmap[codes] * absmax[i // 256]``."""
    n = codes.numel()
    return qmap[codes.reshape(-1).long()] * absmax.repeat_interleave(STATE_BLOCKSIZE)[:n]


# ---------------------------------------------------------------------------------------------
# The constants of one step


def step_constants(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int
) -> dict[str, float]:
    """The step's scalars in double precision (each is rounded once to fp32 where it is used)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return {
        "decay": 1 - lr * weight_decay,
        "beta1": beta1,
        "omb1": 1 - beta1,
        "beta2": beta2,
        "omb2": 1 - beta2,
        "eps": eps,
        "inv_bc2": 1 / math.sqrt(bias_correction2),
        "neg_step_size": -(lr / bias_correction1),
    }


def _update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: dict[str, float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One AdamW update of fp32 tensors; returns (p, m, v, finite) with skipped elements unchanged."""
    finite = torch.isfinite(g)
    g0 = torch.where(finite, g, torch.zeros_like(g))
    p_new = p * c["decay"]
    m_new = m * c["beta1"] + g0 * c["omb1"]
    v_new = v * c["beta2"] + (g0 * g0) * c["omb2"]
    # sqrt in fp64 rounded to fp32 is the correctly rounded fp32 sqrt (torch's CPU fp32 sqrt is not).
    denom = torch.sqrt(v_new.double()).float() * c["inv_bc2"] + c["eps"]
    p_new = p_new + (m_new / denom) * c["neg_step_size"]
    return (
        torch.where(finite, p_new, p),
        torch.where(finite, m_new, m),
        torch.where(finite, v_new, v),
        finite,
    )


def _flag(found_inf: Tensor, finite: Tensor) -> None:
    # Device-side: no host synchronization.
    found_inf.copy_(torch.maximum(found_inf, (~finite).any().to(found_inf.dtype).reshape(found_inf.shape)))


def _rows(chunks: Tensor) -> list[tuple[int, int, int, int]]:
    return [tuple(int(x) for x in row) for row in chunks.tolist()]


# ---------------------------------------------------------------------------------------------
# The steps


def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Optional[Tensor],
    found_inf: Tensor,
    chunks: Tensor,
    steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW with fp32 states over the chunks (see the module docstring); updates in place."""
    consts = [step_constants(lr, beta1, beta2, eps, weight_decay, s) for s in steps]
    for i, start, length, off in _rows(chunks):
        param = params[i].view(-1)[start : start + length]
        g = grads[i].view(-1)[start : start + length].float()
        m = exp_avg[off : off + length]
        v = exp_avg_sq[off : off + length]
        w = master[off : off + length] if master is not None else param.float()
        p_new, m_new, v_new, finite = _update(w, g, m, v, consts[i])
        m.copy_(m_new)
        v.copy_(v_new)
        if master is not None:
            w.copy_(p_new)
        param.copy_(torch.where(finite, p_new.to(param.dtype), param))
        _flag(found_inf, finite)


def adamw8bit_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    absmax_m: Tensor,
    absmax_v: Tensor,
    qmap_m: Tensor,
    qmap_v: Tensor,
    master: Optional[Tensor],
    found_inf: Tensor,
    chunks: Tensor,
    steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW with blockwise 8-bit states (uint8 ``exp_avg`` / ``exp_avg_sq`` codes, fp32 absmax per
    256 elements) over the chunks (see the module docstring); updates in place."""
    consts = [step_constants(lr, beta1, beta2, eps, weight_decay, s) for s in steps]
    mids_m, mids_v = midpoints(qmap_m), midpoints(qmap_v)
    for i, start, length, off in _rows(chunks):
        nb = -(-length // STATE_BLOCKSIZE)
        b0 = off // STATE_BLOCKSIZE
        param = params[i].view(-1)[start : start + length]
        g = grads[i].view(-1)[start : start + length].float()
        qm = exp_avg[off : off + length]
        qv = exp_avg_sq[off : off + length]
        am = absmax_m[b0 : b0 + nb]
        av = absmax_v[b0 : b0 + nb]
        w = master[off : off + length] if master is not None else param.float()
        m = dequantize_blockwise(qm, am, qmap_m)
        v = dequantize_blockwise(qv, av, qmap_v)
        p_new, m_new, v_new, finite = _update(w, g, m, v, consts[i])
        # Requantize with the new block maxima (over the chunk's own elements only).
        new_am = _blocks(m_new).abs().amax(dim=1)
        new_av = _blocks(v_new).amax(dim=1)
        scale_m = new_am.repeat_interleave(STATE_BLOCKSIZE)[:length]
        scale_v = new_av.repeat_interleave(STATE_BLOCKSIZE)[:length]
        qm.copy_(nearest_code(torch.where(scale_m > 0, m_new / scale_m, torch.zeros_like(m_new)), mids_m))
        qv.copy_(nearest_code(torch.where(scale_v > 0, v_new / scale_v, torch.zeros_like(v_new)), mids_v))
        am.copy_(new_am)
        av.copy_(new_av)
        if master is not None:
            w.copy_(p_new)
        param.copy_(torch.where(finite, p_new.to(param.dtype), param))
        _flag(found_inf, finite)
