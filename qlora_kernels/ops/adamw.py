"""The AdamW ops: schema, fake (meta) implementation and dispatch of each, declared once.

Both ops update many tensors in place in ONE kernel launch (no per-tensor launch, no host
synchronization). The work is a chunk table, int64 ``chunks [n, 4]`` on the CPU, whose row
``(i, start, length, offset)`` names ``params[i].view(-1)[start : start + length]``, the same slice
of ``grads[i]``, and the state elements ``[offset, offset + length)`` of the flat state buffers.
Chunks must not overlap, neither in a param nor in the states. The math and the non-finite
policy are in ``qlora_kernels/reference/adamw.py``.

* ``adamw_step_(params, grads, exp_avg, exp_avg_sq, master, found_inf, chunks, steps, lr, beta1,
  beta2, eps, weight_decay)``: fp32 states ``exp_avg`` and ``exp_avg_sq`` (flat fp32, one length).
* ``adamw8bit_step_(params, grads, exp_avg, exp_avg_sq, absmax_m, absmax_v, qmap_m, qmap_v, master,
  found_inf, chunks, steps, lr, beta1, beta2, eps, weight_decay)``: blockwise 8-bit states: uint8
  codes ``exp_avg`` / ``exp_avg_sq`` (flat, one length L), fp32 ``absmax_m`` / ``absmax_v``
  ``[ceil(L / 256)]``, the 256-entry fp32 maps ``qmap_m`` (signed) and ``qmap_v`` (unsigned);
  chunk ``start`` and ``offset`` are multiples of 256.

Common arguments: ``params`` contiguous float32/float16/bfloat16 tensors, ``grads`` contiguous,
same dtype and size; ``master`` None or a flat fp32 buffer as long as the states (the fp32 master
copy of the params); ``found_inf`` fp32 ``[1]``, set to 1 when a gradient element is non-finite
(never cleared here); ``steps[i] >= 1`` the step number of ``params[i]`` after this update.
Every tensor except ``chunks`` is on one device.

Which kernel runs is chosen here, from each op's table (``ADAMW``, ``ADAMW_8BIT``; the rules in
``_dispatch``): CPU: the C++ kernel, else the reference; CUDA: the CUDA kernel, else the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import _extension
from ..dtypes import FLOAT_DTYPES
from ..reference import adamw as ref
from ._dispatch import Kernel, choose, declare

STATE_BLOCKSIZE = ref.STATE_BLOCKSIZE


def _kernels(op: str, kernel: str, reference) -> tuple[Kernel, ...]:
    return declare(
        op,
        Kernel(op, "cpp", "cpu", "C++ (OpenMP, bitwise equal to the reference)", needs=kernel,
               run=lambda *a: _extension.kernel(kernel)(*a)),
        Kernel(op, "cuda", "cuda", "CUDA (multi-tensor, one launch)", needs=kernel,
               run=lambda *a: _extension.kernel(kernel)(*a)),
        Kernel(op, "reference", "any", "PyTorch", run=reference),
    )


ADAMW = _kernels("adamw_step_", "adamw_step", ref.adamw_step_)
ADAMW_8BIT = _kernels("adamw8bit_step_", "adamw8bit_step", ref.adamw8bit_step_)


# ---------------------------------------------------------------------------------------------
# Checks (once, at the op boundary; the fake implementations run them too)


def _check_hparams(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0; got {lr}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {beta}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")


def _check_flat(t: Tensor, name: str, dtype: torch.dtype, device: torch.device, numel: Optional[int] = None) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}; got {t.dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a flat contiguous tensor; got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of the states); got {t.device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements; got {t.numel()}")


def _check_common(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: Tensor,
    master: Optional[Tensor],
    found_inf: Tensor,
    chunks: Tensor,
    steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    blockwise: bool,
    values: bool,
) -> None:
    """Every check of the ops' contract. ``values``: also check the chunk table's values (real
    tensors only; fake tensors have none)."""
    _check_hparams(lr, beta1, beta2, eps, weight_decay)
    n = len(params)
    if len(grads) != n or len(steps) != n:
        raise ValueError(f"params, grads and steps must have one entry per tensor; got {n}, {len(grads)}, {len(steps)}")
    device = exp_avg.device
    for i, (p, g) in enumerate(zip(params, grads)):
        # One cheap pass (this runs every optimizer step over hundreds of tensors); the detailed
        # message is built only on failure.
        dt = p.dtype
        if (
            dt not in FLOAT_DTYPES
            or g.dtype is not dt
            or not p.is_contiguous()
            or not g.is_contiguous()
            or g.numel() != p.numel()
        ):
            _raise_tensor_error(i, p, g)
    devices = {p.device for p in params} | {g.device for g in grads}
    if devices - {device}:
        raise ValueError(
            f"params and grads must be on {device} (the device of the states); got {sorted(map(str, devices))}"
        )
    if n and min(steps) < 1:
        raise ValueError(f"steps must be >= 1; got {min(steps)}")
    if master is not None:
        _check_flat(master, "master", torch.float32, device, exp_avg.numel())
    _check_flat(found_inf, "found_inf", torch.float32, device, 1)
    if chunks.dtype != torch.int64 or chunks.dim() != 2 or chunks.shape[1] != 4 or chunks.device.type != "cpu":
        raise ValueError(
            f"chunks must be a CPU int64 tensor [n, 4]; got {chunks.dtype} {list(chunks.shape)} on {chunks.device}"
        )
    if values and chunks.shape[0]:
        _check_chunk_values(params, chunks, exp_avg.numel(), blockwise)


def _raise_tensor_error(i: int, p: Tensor, g: Tensor) -> None:
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"params[{i}] must be float32, float16 or bfloat16; got {p.dtype}")
    if g.layout != torch.strided:
        raise TypeError(f"grads[{i}] must be a dense (strided) tensor; got {g.layout}")
    if g.dtype != p.dtype or g.shape != p.shape:
        raise ValueError(
            f"grads[{i}] must match params[{i}] ({p.dtype}, {list(p.shape)}); got {g.dtype}, {list(g.shape)}"
        )
    raise ValueError(f"params[{i}] and grads[{i}] must be contiguous")


# Chunk tables already checked against the same tensor sizes (an optimizer passes the same table
# every step): table -> (its version, numels, state length, blockwise).
_checked_tables: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _check_chunk_values(params: list[Tensor], chunks: Tensor, state_len: int, blockwise: bool) -> None:
    sizes = [p.numel() for p in params]
    key = (chunks._version, sizes, state_len, blockwise)
    if _checked_tables.get(chunks) == key:
        return
    _check_chunk_rows(sizes, chunks, state_len, blockwise)
    _checked_tables[chunks] = key


def _check_chunk_rows(sizes: list[int], chunks: Tensor, state_len: int, blockwise: bool) -> None:
    idx, start, length, off = chunks.unbind(1)
    if not bool(((idx >= 0) & (idx < len(sizes))).all()):
        raise ValueError(f"chunks: tensor indices must be in [0, {len(sizes)}); got {chunks[:, 0].tolist()}")
    numels = torch.tensor(sizes, dtype=torch.int64)[idx]
    if not bool(((start >= 0) & (length > 0) & (start + length <= numels)).all()):
        raise ValueError("chunks: every (start, length) must be a non-empty range inside its tensor")
    if not bool(((off >= 0) & (off + length <= state_len)).all()):
        raise ValueError(f"chunks: every (offset, length) must lie inside the state buffers of {state_len} elements")
    if blockwise and not bool(((start % STATE_BLOCKSIZE == 0) & (off % STATE_BLOCKSIZE == 0)).all()):
        raise ValueError(f"chunks: 8-bit states need start and offset to be multiples of {STATE_BLOCKSIZE}")
    # No two chunks may share a state element or a param element (the kernels update in parallel).
    order = torch.argsort(off)
    if not bool((off[order][1:] >= (off + length)[order][:-1]).all()):
        raise ValueError("chunks: state ranges overlap")
    key = idx * (int(numels.max()) + 1) + start
    order = torch.argsort(key)
    same = idx[order][1:] == idx[order][:-1]
    if not bool((~same | (start[order][1:] >= (start + length)[order][:-1])).all()):
        raise ValueError("chunks: param ranges overlap")


# ---------------------------------------------------------------------------------------------
# adamw_step_ (fp32 states)


@torch.library.custom_op(
    "qlora_kernels::adamw_step_", mutates_args=("params", "exp_avg", "exp_avg_sq", "master", "found_inf")
)
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
    _check_adamw(params, grads, exp_avg, exp_avg_sq, master, found_inf, chunks, steps, lr, beta1, beta2, eps,
                 weight_decay, values=True)
    args = (params, grads, exp_avg, exp_avg_sq, master, found_inf, chunks, steps, lr, beta1, beta2, eps, weight_decay)
    choose("adamw_step_", exp_avg.device).run(*args)


def _check_adamw(params, grads, exp_avg, exp_avg_sq, master, found_inf, chunks, steps, lr, beta1, beta2, eps,
                 weight_decay, values: bool) -> None:
    _check_flat(exp_avg, "exp_avg", torch.float32, exp_avg.device)
    _check_flat(exp_avg_sq, "exp_avg_sq", torch.float32, exp_avg.device, exp_avg.numel())
    _check_common(params, grads, exp_avg, master, found_inf, chunks, steps, lr, beta1, beta2, eps, weight_decay,
                  blockwise=False, values=values)


@adamw_step_.register_fake
def _(params, grads, exp_avg, exp_avg_sq, master, found_inf, chunks, steps, lr, beta1, beta2, eps, weight_decay):
    _check_adamw(params, grads, exp_avg, exp_avg_sq, master, found_inf, chunks, steps, lr, beta1, beta2, eps,
                 weight_decay, values=False)


# ---------------------------------------------------------------------------------------------
# adamw8bit_step_ (blockwise 8-bit states)


@torch.library.custom_op(
    "qlora_kernels::adamw8bit_step_",
    mutates_args=("params", "exp_avg", "exp_avg_sq", "absmax_m", "absmax_v", "master", "found_inf"),
)
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
    args = (params, grads, exp_avg, exp_avg_sq, absmax_m, absmax_v, qmap_m, qmap_v, master, found_inf, chunks, steps,
            lr, beta1, beta2, eps, weight_decay)
    _check_adamw8bit(*args, values=True)
    choose("adamw8bit_step_", exp_avg.device).run(*args)


def _check_adamw8bit(params, grads, exp_avg, exp_avg_sq, absmax_m, absmax_v, qmap_m, qmap_v, master, found_inf,
                     chunks, steps, lr, beta1, beta2, eps, weight_decay, values: bool) -> None:
    device = exp_avg.device
    _check_flat(exp_avg, "exp_avg", torch.uint8, device)
    n = exp_avg.numel()
    nblocks = -(-n // STATE_BLOCKSIZE)
    _check_flat(exp_avg_sq, "exp_avg_sq", torch.uint8, device, n)
    _check_flat(absmax_m, "absmax_m", torch.float32, device, nblocks)
    _check_flat(absmax_v, "absmax_v", torch.float32, device, nblocks)
    _check_flat(qmap_m, "qmap_m", torch.float32, device, 256)
    _check_flat(qmap_v, "qmap_v", torch.float32, device, 256)
    _check_common(params, grads, exp_avg, master, found_inf, chunks, steps, lr, beta1, beta2, eps, weight_decay,
                  blockwise=True, values=values)


@adamw8bit_step_.register_fake
def _(params, grads, exp_avg, exp_avg_sq, absmax_m, absmax_v, qmap_m, qmap_v, master, found_inf, chunks, steps, lr,
      beta1, beta2, eps, weight_decay):
    _check_adamw8bit(params, grads, exp_avg, exp_avg_sq, absmax_m, absmax_v, qmap_m, qmap_v, master, found_inf,
                     chunks, steps, lr, beta1, beta2, eps, weight_decay, values=False)
