"""Data parallelism for the trainer under ``torchrun`` (torch.distributed + DDP, or FSDP2 with ``fsdp: true``;
nccl on GPUs, gloo on CPUs).

``torchrun --nproc_per_node=N -m qlora_kernels.train CONFIG.yaml`` starts N copies of the trainer; each
reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun) in :func:`init_distributed`. Then:

* **Data**: ``micro_batch_size`` stays per process; the items of one *global* micro-batch
  (``micro_batch_size × world_size`` in the shuffled order every rank computes alike) are split into
  contiguous parts, one per rank (:func:`shard`, used by :class:`.data.MicroBatchStream`). So N processes
  see exactly the items a single process with ``micro_batch_size × N`` would see, step for step.
* **Gradients**: the model runs inside :class:`torch.nn.parallel.DistributedDataParallel`, which
  all-reduces (averages) the LoRA gradients in backward; accumulation micro-batches run under
  ``no_sync`` so only the last one communicates. The NF4 weights are *buffers*, so DDP must not
  broadcast buffers (``broadcast_buffers=False``); they are identical on every rank anyway (same
  checkpoint, same deterministic quantizer) and are skipped by DDP's start-up sync too.
* **Normalization**: the loss of a step is normalized by the number of target tokens (SFT) or
  pairs (DPO) of the *global* accumulated batch, all-reduced before the first backward
  (:func:`all_reduce_sum`); each rank scales its loss by ``world_size / global_count`` to undo DDP's
  averaging. The step's gradient then equals the single-process one up to float summation order.
* **Output**: only rank 0 writes the config, metrics, checkpoints and the adapter, and prints.

A rank whose share of a global micro-batch is empty (the last, smaller micro-batch of an epoch)
still runs a forward and backward on a placeholder that counts for nothing (zero weight), because
every rank must take part in each all-reduce.

With ``fsdp: true`` (:mod:`.fsdp`) the data, normalization and output rules are the same; the model is sharded
instead of replicated (FSDP2 reduce-scatters the gradients, averaged over ranks as DDP's are), so
:func:`wrap_model` adds no DDP wrapper, :func:`no_sync` turns FSDP2's gradient sync off for the accumulation
micro-batches and :func:`clip_grad_norm_` takes the norm over every rank's shards.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank, backend (None when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when this process is in a process group: under torchrun with more than one process, or in a group of
        one asked for (``fsdp_config.shard_one_process``), whose collectives then run for real over one rank."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs (rank 0)."""
        return self.rank == 0


SINGLE = DistContext()
T = TypeVar("T")


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables (``(0, 1, 0)`` without them)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))


def init_distributed(device_type: str, timeout_s: float = 1800.0, one_process_group: bool = False) -> DistContext:
    """Join the process group torchrun set up, if there is one; returns the :class:`DistContext`.

    Backend: nccl for ``device_type == "cuda"``, gloo otherwise. On CUDA the process uses GPU
    ``LOCAL_RANK``. A process group already initialised (e.g. by a test) is reused as it is. With one process,
    ``one_process_group`` joins a group of one (on torchrun's rendezvous address, else a free local port), so the
    code paths of N ranks run over one; without it one process is not distributed (:data:`SINGLE`).
    """
    import torch.distributed as dist

    rank, world, local = env_world()
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    if world <= 1 and not one_process_group:
        return SINGLE
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE {world}{' (a group of one asked for)' if world <= 1 else ''} but this torch "
                           f"build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=timeout_s)
    if world <= 1 and "MASTER_ADDR" not in os.environ:  # no torchrun: a rendezvous of our own
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, backend)


def teardown(ctx: DistContext) -> None:
    """Leave the process group (if this module joined one)."""
    import torch.distributed as dist

    if ctx.enabled and dist.is_initialized():
        # A DDP wrapper sits in reference cycles (its hooks refer back to it): collect it now, while
        # the process group is alive. Left to interpreter shutdown, its reducer is torn down after
        # the group and the process can abort ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA device under torchrun, else ``device``."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def all_reduce_sum(values: Tensor | Sequence[float], ctx: DistContext, device: torch.device | None = None) -> Tensor:
    """Sum over ranks (a copy; float64 for Python numbers, so counts stay exact). Identity when not distributed.

    ``device``: where the collective runs (nccl needs a CUDA tensor); the result comes back on the
    input's device (CPU for a list).
    """
    return _all_reduce(values, ctx, device, "SUM")


def all_reduce_max(values: Tensor | Sequence[float], ctx: DistContext, device: torch.device | None = None) -> Tensor:
    """The largest value over ranks, elementwise (as :func:`all_reduce_sum`)."""
    return _all_reduce(values, ctx, device, "MAX")


def _all_reduce(values: Tensor | Sequence[float], ctx: DistContext, device: torch.device | None, op: str) -> Tensor:
    t = values if isinstance(values, Tensor) else torch.tensor(list(values), dtype=torch.float64)
    if not ctx.enabled:
        return t.clone()
    import torch.distributed as dist

    home = t.device
    work = t.to(device if device is not None else home).clone()
    dist.all_reduce(work, op=getattr(dist.ReduceOp, op))
    return work.to(home)


def all_gather_cat(t: Tensor, sizes: Sequence[int], ctx: DistContext) -> Tensor:
    """The 1-D tensors of all ranks concatenated in rank order (rank ``r``'s has ``sizes[r]`` elements; every
    rank passes the same ``sizes``), on ``t``'s device. Identity when not distributed."""
    if len(sizes) != ctx.world_size or t.dim() != 1 or t.numel() != sizes[ctx.rank]:
        raise ValueError(f"all_gather_cat: expected a 1-D tensor of sizes[{ctx.rank}] = "
                         f"{sizes[ctx.rank] if ctx.rank < len(sizes) else '?'} elements and {ctx.world_size} sizes; "
                         f"got shape {list(t.shape)} and {len(sizes)} sizes")
    if not ctx.enabled:
        return t.clone()
    import torch.distributed as dist

    buf = t.new_zeros(max(max(sizes), 1))  # all_gather needs equal sizes: pad, then trim
    buf[:t.numel()] = t
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def any_rank(flag: bool, ctx: DistContext, device: torch.device | None = None) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a Ctrl-C seen by one process)."""
    if not ctx.enabled:
        return flag
    return bool(all_reduce_sum([1.0 if flag else 0.0], ctx, device)[0] > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous part of n items split into ``world`` near-equal parts."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's contiguous part of ``items`` (:func:`shard_bounds`); all of them when not distributed.

    The one rule by which the trainer splits work across ranks: each global micro-batch
    (:class:`.data.MicroBatchStream`), the eval items (their sums are all-reduced after), and the pairs whose
    reference log-probs a rank precomputes.
    """
    lo, hi = shard_bounds(len(items), ctx.rank, ctx.world_size)
    return list(items[lo:hi])


# --------------------------------------------------------------------------- the model wrapper


class ForwardRunner(nn.Module):
    """Runs ``fn(causal_lm, *args)`` as its forward, so that DDP sees (and hooks) the trainer's forward pass.

    The trainer's losses call the decoder and the output projection separately (chunked losses), not
    ``model(...)``; wrapping this module instead of the model lets DDP prepare its gradient reduction
    for any such function.
    """

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.causal_lm, *args, **kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal LM inside DDP and/or :class:`ForwardRunner` wrappers (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, ForwardRunner)):
        model = model.module if isinstance(model, DistributedDataParallel) else model.causal_lm
    return model


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, fsdp: bool = False) -> nn.Module:
    """``ForwardRunner(model)``, inside DDP when distributed (not with ``fsdp``: the model's FSDP2 units reduce their
    own gradients); call it as ``wrapped(fn, *args)``.

    DDP: no buffer sync in forward (``broadcast_buffers=False``, spelled ``forward_sync_buffers=False`` in
    newer torch): the NF4 weights are buffers. DDP ignores the buffers and the frozen parameters
    altogether (they are equal on every rank: same checkpoint, deterministic quantizer), so its
    start-up broadcast sends only the trainable adapters, from rank 0: every rank starts from rank 0's
    initialization.
    """
    runner = ForwardRunner(model)
    if fsdp and ctx.enabled:
        runner.fsdp_units = root_units(model)  # (no_sync sets their gradient sync)
    if not ctx.enabled or fsdp:
        return runner
    from torch.nn.parallel import DistributedDataParallel

    frozen = [f"causal_lm.{n}" for n, p in model.named_parameters() if not p.requires_grad]
    buffers = [f"causal_lm.{n}" for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(runner, frozen + buffers)
    ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    # Never sync buffers in forward. Newer torch spells broadcast_buffers=False as forward_sync_buffers=False
    # (which alone would still sync buffers at init; the ignore list above keeps the NF4 buffers out of that).
    import inspect

    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(runner, device_ids=ids, **no_buffer_sync)


def no_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` unless ``sync`` (the last micro-batch of a step) or not under DDP; for a model sharded by
    FSDP2, its gradient sync set to ``sync`` (``set_requires_gradient_sync``: accumulated, then reduce-scattered
    once in the last micro-batch's backward)."""
    if hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    for unit in getattr(wrapped, "fsdp_units", ()):
        unit.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def root_units(model: nn.Module) -> list[nn.Module]:
    """The outermost FSDP2 units of ``model`` (its root; none when it is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule) and not any(n == "" or name.startswith(f"{n}.") for n, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over ``params``; returns the total norm as a float. For DTensor parameters
    (FSDP2's shards) torch computes the norm over all ranks' shards (a collective), the same on every rank."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(total, "full_tensor"):  # a DTensor (partial sums over the shards, reduced here)
        total = total.full_tensor()
    return float(total)
