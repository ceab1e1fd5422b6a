"""Activation offloading (``activation_offloading: true`` / ``gradient_checkpointing: offload``): the tensors the
decoder saves for backward go to host memory in the forward and come back for the backward.

:class:`ActivationOffloader` is a pair of ``torch.autograd.graph.saved_tensors_hooks``, pushed while the
decoder runs (forward hooks on the decoder module instance; nothing is patched), and a host store:

* **pack** (forward): a saved tensor on the training device, not a parameter or buffer of the model (nor a
  view of one: the frozen NF4 codes and the adapters stay where they are) and of at least ``min_bytes``, is
  copied into a host tensor of the same shape and strides, and autograd keeps only the handle, so the
  device memory is freed as soon as the forward has no other use for it. On a GPU the host tensor is
  pinned and the copy runs on a side stream, overlapped with the forward's compute (the side stream waits
  for the compute stream first; ``record_stream`` keeps the device memory from reuse until the copy has
  read it). A tensor saved twice (the input of q, k and v) is copied once.
* **unpack** (backward): the host copy goes back to the device on the side stream, and the compute stream
  waits for it. The first unpack of a decoder layer's tensors starts the copies of the layer before it
  (the next one the backward reaches), so loading overlaps the backward's compute, one layer ahead. A
  reloaded tensor lives as long as autograd holds its handle (until its last use in the backward).

On the CPU the same code runs: the "host store" is a second CPU tensor (no memory is saved there, and
the copies are synchronous), which is what makes it testable without a GPU. The counters
(:attr:`ActivationOffloader.tensors`, :attr:`~ActivationOffloader.bytes`) say what was moved.

With ``gradient_checkpointing: true`` as well, the decoder layers are recomputed and what they save
outside the recomputation, the layer inputs (the checkpoints), is offloaded instead (the least device
memory: one hidden-state tensor per layer moves to the host, nothing else is kept).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn


class _Saved:
    """One offloaded tensor: its host copy, the events ordering the copies, and its device copy once reloaded."""

    __slots__ = ("host", "group", "version", "offloaded", "device_copy", "ready", "__weakref__")

    def __init__(self, host: Tensor, group: int, version: int, offloaded: Any) -> None:
        self.host, self.group, self.version, self.offloaded = host, group, version, offloaded
        self.device_copy: Tensor | None = None
        self.ready: Any = None


class ActivationOffloader:
    """Moves the decoder's saved activations to host memory and back (see the module docstring).

    ``attach(model)`` installs it on a Hugging Face causal LM (its decoder and decoder layers, by forward
    hooks); ``detach()`` removes it. ``min_bytes``: smaller tensors stay where they are (a copy costs more
    than they take).
    """

    def __init__(self, device: torch.device, min_bytes: int = 1024) -> None:
        self.device = torch.device(device)
        self.min_bytes = min_bytes
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.tensors = 0  # tensors moved to the host store, since construction
        self.bytes = 0  # their bytes
        self.reloaded = 0  # tensors brought back
        self._keep: set[int] = set()  # storages of the model's parameters and buffers
        self._groups: dict[int, list[weakref.ref]] = {}
        self._seen: dict[int, tuple[weakref.ref, _Saved]] = {}
        self._group = 0
        self._ctx: Any = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ installing

    def attach(self, model: nn.Module) -> ActivationOffloader:
        """Offload what ``model``'s decoder saves, from now on (every forward with gradients)."""
        self.detach()
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self._keep = {_storage_ptr(t) for t in (*model.parameters(), *model.buffers())}
        self._handles.append(decoder.register_forward_pre_hook(self._begin))
        self._handles.append(decoder.register_forward_hook(self._end, always_call=True))
        # group 0: before the first layer (embeddings); i + 1: layer i; after layer i (the final norm): i + 2
        for i, layer in enumerate(getattr(decoder, "layers", None) or []):
            self._handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._set_group(i + 1)))
            self._handles.append(layer.register_forward_hook(lambda m, a, out, i=i: self._set_group(i + 2)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._end()

    def _set_group(self, group: int) -> None:
        self._group = group

    def _begin(self, module: nn.Module, args: Any) -> None:
        self._end()
        if not torch.is_grad_enabled():
            return
        self._group, self._groups, self._seen = 0, {}, {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()

    def _end(self, *args: Any) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)
        self._seen = {}

    # ------------------------------------------------------------------ the hooks

    def _offloadable(self, t: Tensor) -> bool:
        return (type(t) is Tensor and t.device.type == self.device.type and t.layout == torch.strided
                and t.numel() * t.element_size() >= self.min_bytes
                and t.untyped_storage().data_ptr() not in self._keep)

    def _pack(self, t: Tensor) -> Any:
        if not self._offloadable(t):
            return t
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t and seen[1].version == t._version:
            return seen[1]
        if _dense(t):  # the same strides (a transposed activation stays transposed)
            host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=self.cuda)
        else:  # overlapping or expanded: stored contiguous
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
        event = None
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                event = self.stream.record_event()
            t.record_stream(self.stream)
        else:
            host.copy_(t)
        saved = _Saved(host, self._group, t._version, event)
        self._seen[id(t)] = (weakref.ref(t), saved)
        self._groups.setdefault(self._group, []).append(weakref.ref(saved))
        self.tensors += 1
        self.bytes += host.numel() * host.element_size()
        return saved

    def _unpack(self, saved: Any) -> Tensor:
        if not isinstance(saved, _Saved):
            return saved
        if saved.device_copy is None:
            self._reload(saved)
        self._prefetch(saved.group - 1)  # the backward has reached this layer: bring the one before it
        t = saved.device_copy
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(saved.ready)
            t.record_stream(current)
        return t

    def _reload(self, saved: _Saved) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(saved.offloaded)
                saved.device_copy = saved.host.to(self.device, non_blocking=True)
                saved.ready = self.stream.record_event()
        else:
            saved.device_copy = saved.host
        self.reloaded += 1

    def _prefetch(self, group: int) -> None:
        """Start bringing back every still-saved tensor of ``group`` (the layer the backward reaches next)."""
        for ref in self._groups.pop(group, ()):
            saved = ref()
            if saved is not None and saved.device_copy is None:
                self._reload(saved)


def _storage_ptr(t: Tensor) -> int:
    """Where ``t``'s storage starts; of a DTensor (a parameter FSDP2 sharded), its local shard's."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.untyped_storage().data_ptr()


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s strides describe a dense, non-overlapping layout (a permutation of a contiguous one)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
