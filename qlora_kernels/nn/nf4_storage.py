"""Where a 4-bit module keeps its NF4 tensors: buffers (the default) or frozen parameters (for FSDP2).

:class:`~qlora_kernels.nn.NF4Linear` and :class:`~qlora_kernels.nn.experts.NF4Experts` hold their NF4 tensors
(packed codes, absmax codes, code table, nested absmax, nested code table) as non-persistent *buffers*: ``.to()``
moves them, nothing treats them as weights. ``torch.distributed.fsdp.fully_shard`` shards a module's
*parameters* only (buffers stay whole on every rank), so to shard the 4-bit weights with the rest of a
transformer block they must be parameters: :func:`hold_nf4_as_parameters` switches the modules of a model
instance (``requires_grad=False`` parameters of the same tensors; uint8 and fp32 alike) and back.

Both modes behave the same: the same tensors under the same attribute names, the same forward, ``.to()`` /
``.half()`` move them and never cast them, the state dict holds them under bitsandbytes' keys only (never
under the attribute names), ``qweight`` and merging work. In parameter mode they are listed by
``parameters()`` (frozen), so code that collects *trainable* parameters is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class NF4TensorHolder(nn.Module):
    """The storage switch shared by the 4-bit modules; a subclass names its NF4 tensors in :meth:`_nf4_names`."""

    _nf4_params = False  # the default (class attribute): buffers; an instance switched to parameters sets True

    def _nf4_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def nf4_as_parameters(self) -> bool:
        """True when this module holds its NF4 tensors as frozen parameters (see :func:`hold_nf4_as_parameters`)."""
        return self._nf4_params

    def set_nf4_parameters(self, enabled: bool = True) -> None:
        """Hold this module's NF4 tensors as frozen ``nn.Parameter``\\ s (``enabled``) or as buffers (the default);
        the tensors themselves are not copied."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool; got {enabled!r}")
        if enabled == self._nf4_params:
            return
        tensors = self._pop_nf4()
        self._nf4_params = enabled
        for name, t in tensors.items():
            self._put_nf4(name, t)

    def _put_nf4(self, name: str, t: Tensor | None) -> None:
        """Register one NF4 tensor under ``name`` as this module's mode says (a parameter stays the same object when
        it is one already: FSDP2 keeps references to its sharded parameters)."""
        if self._nf4_params:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
            if t is not None and not (isinstance(t, nn.Parameter) and not t.requires_grad):
                t = nn.Parameter(t.detach(), requires_grad=False)
            self.register_parameter(name, t)
        else:
            self._parameters.pop(name, None)
            if isinstance(t, nn.Parameter):
                t = t.detach()
            # Non-persistent: the state dict holds bitsandbytes' keys instead (see the modules).
            self.register_buffer(name, t, persistent=False)

    def _pop_nf4(self) -> dict[str, Tensor | None]:
        """Take the NF4 tensors out of the module (parameters or buffers), by name."""
        out = {}
        for name in self._nf4_names():
            if name in self._parameters:
                out[name] = self._parameters.pop(name)
            else:
                out[name] = self._buffers.pop(name, None)
        return out

    def _restore_nf4(self, tensors: dict[str, Tensor | None], fn: Callable[[Tensor], Tensor] | None = None) -> None:
        """Put the tensors :meth:`_pop_nf4` took back, moved to the device ``fn`` sends an empty probe on theirs to
        (``.to()``, ``.cuda()``, ``.cpu()``, ``.to_empty()``; never a dtype cast: the NF4 bytes and fp32 constants only
        ever change device). A meta tensor has no data to copy: it is materialised empty (to_empty), dtype kept."""
        for name, t in tensors.items():
            if t is not None and fn is not None:
                device = fn(torch.empty(0, device=t.device)).device
                t = torch.empty_like(t, device=device) if t.is_meta else t.to(device)
            self._put_nf4(name, t)

    def _save_without_nf4(self, destination, prefix, keep_vars) -> None:
        """``nn.Module._save_to_state_dict`` without the NF4 tensors (the modules write bitsandbytes' keys)."""
        nf4 = self._pop_nf4()
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._restore_nf4(nf4)

    def _load_without_nf4(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs) -> None:
        """``nn.Module._load_from_state_dict`` of everything but the NF4 tensors (read from bitsandbytes' keys)."""
        nf4 = self._pop_nf4()
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            for name, t in nf4.items():  # the subclass may have registered new NF4 tensors meanwhile: keep those
                if name not in self._parameters and name not in self._buffers:
                    self._put_nf4(name, t)

    def _check_not_sharded(self) -> None:
        """A clear error where the whole NF4 weight is needed but FSDP2 holds only this rank's shard."""
        from torch.distributed.tensor import DTensor

        sharded = [n for n in self._nf4_names() if isinstance(getattr(self, n, None), DTensor)]
        if sharded:
            raise RuntimeError(
                f"{type(self).__name__}: the NF4 tensors ({', '.join(sharded[:2])}, ...) are sharded by FSDP2 (each "
                "rank holds a DTensor shard); the whole weight exists inside the FSDP unit's forward and backward, "
                "or between unit.unshard() and unit.reshard()")


def hold_nf4_as_parameters(model: nn.Module, enabled: bool = True) -> int:
    """Switch every NF4 module of ``model`` (``NF4Linear``, ``QLoraLinear``, ``NF4Experts``; on the instance) to hold
    its NF4 tensors as frozen parameters (``enabled``), so that ``fully_shard`` shards them, or back to buffers.

    Returns how many modules hold NF4 tensors. Nothing is copied; forward, state dicts, ``qweight``, merging and
    adapters behave the same in both modes (see the module docstring).
    """
    count = 0
    for m in model.modules():
        if isinstance(m, NF4TensorHolder):
            m.set_nf4_parameters(enabled)
            count += 1
    return count


def nf4_tensors(model: nn.Module) -> list[Tensor]:
    """Every NF4 tensor of ``model``'s NF4 modules (each once; FSDP2 shards as DTensors, as they are)."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, NF4TensorHolder):
            for name in m._nf4_names():
                t = getattr(m, name, None)
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


def resident_nf4_bytes(model: nn.Module) -> int:
    """Bytes of the NF4 tensors this process holds for ``model``: the whole tensors, or under FSDP2 this rank's
    (padded) shards."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in nf4_tensors(model):
        if isinstance(t, DTensor):  # the local shard's storage, with FSDP2's padding to equal shards
            total += t.to_local().untyped_storage().nbytes()
        else:
            total += t.numel() * t.element_size()
    return total
