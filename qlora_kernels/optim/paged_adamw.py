"""``PagedAdamW``: AdamW with a fused multi-tensor step and optimizer states paged under a budget.

Math: ``torch.optim.AdamW`` (decoupled weight decay, bias-corrected moments; no amsgrad, no
maximize), computed in fp32 by ``torch.ops.qlora_kernels.adamw_step_`` / ``adamw8bit_step_``
(one launch for all resident pages of a param group, one per streamed page; no host sync).
States: fp32 ``exp_avg`` / ``exp_avg_sq``, or with ``state_bits=8`` blockwise 8-bit codes
(blocks of 256, bitsandbytes' signed / unsigned dynamic maps) for params of at least
``min_8bit_size`` elements. Paging: see ``qlora_kernels.optim.paging``.

Sharded params (``DTensor``, as ``torch.distributed.fsdp.fully_shard`` makes them): each rank keeps and
updates the states of its local shards only (the kernels run on ``to_local()`` of the param and of its
gradient, which FSDP2 has reduce-scattered); the state dict holds them as DTensors of the param's shape
and placements, as ``torch.optim.AdamW`` does, so ``torch.distributed.checkpoint`` saves and reshards them.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..dtypes import FLOAT_DTYPES
from ..ops.adamw import adamw8bit_step_, adamw_step_
from ..quant_maps import dynamic_map
from ..reference.adamw import dequantize_blockwise, quantize_blockwise, unsigned_dynamic_map
from .paging import Pager, Space, Unit

#: Default page size: large enough that one copy reaches the PCIe/NVLink bandwidth, small enough
#: that the two pages in flight are a small fraction of any sensible budget.
DEFAULT_PAGE_BYTES = 16 * 2**20
#: Smallest page accepted (256 elements of the largest layout, fp32 states with a master copy).
MIN_PAGE_BYTES = 4096
#: Keys of the raw 8-bit state in a state dict (beside the portable fp32 ``exp_avg``/``exp_avg_sq``).
Q8_KEYS = {"exp_avg": ("exp_avg_q8", "exp_avg_absmax"), "exp_avg_sq": ("exp_avg_sq_q8", "exp_avg_sq_absmax")}
MASTER_KEY = "master_param"
_Q8_COMPONENTS = {"exp_avg": ("exp_avg", "absmax_m"), "exp_avg_sq": ("exp_avg_sq", "absmax_v")}

ParamsT = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


@functools.cache  # resolved on first use (importing this module imports no torch.distributed), then kept
def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return None
    return DTensor


def _is_sharded(t: Any) -> bool:
    """True for a ``DTensor`` (e.g. a param FSDP2 has sharded)."""
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if _is_sharded(t) else t


def _like_param(local: Tensor, p: Tensor) -> Tensor:
    """A state of the local shard of ``p`` as the state dict holds it: a DTensor of ``p``'s shape and placements
    when ``p`` is one, else ``local`` viewed in ``p``'s shape."""
    if not _is_sharded(p):
        return local.view(p.shape)
    shard = p.to_local()
    return _dtensor_type().from_local(local.view(shard.shape), p.device_mesh, p.placements, shape=p.shape,
                                      stride=p.stride(), run_check=False)


def _local_values(value: Tensor, p: Tensor) -> Tensor:
    """The part of a state-dict tensor for ``p`` that this rank keeps: the local shard of a DTensor, this rank's
    slice of a whole (plain) tensor of a sharded ``p``'s shape, or ``value`` itself."""
    if _is_sharded(value):
        return value.to_local()
    if _is_sharded(p) and value.numel() == p.numel() and value.numel() != p.to_local().numel():
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        whole = value.reshape(p.shape)
        for dim, (n, start) in enumerate(zip(shape, offset)):
            whole = whole.narrow(dim, start, n)
        return whole
    return value


def _hparams(group: dict[str, Any], where: str) -> tuple[float, float, float, float, float]:
    """(lr, beta1, beta2, eps, weight_decay) of a param group as floats, validated."""
    for key in ("amsgrad", "maximize"):
        if group.get(key, False):
            raise ValueError(f"PagedAdamW does not support {key}=True ({where})")
    lr = float(group["lr"])
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0; got {lr} ({where})")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r} ({where})")
    beta1, beta2 = float(betas[0]), float(betas[1])
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas must be in [0, 1); got {name}={beta} ({where})")
    eps = float(group["eps"])
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0; got {eps} ({where})")
    wd = float(group["weight_decay"])
    if not wd >= 0.0:
        raise ValueError(f"weight_decay must be >= 0; got {wd} ({where})")
    return lr, beta1, beta2, eps, wd


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose step is one fused multi-tensor kernel and whose states live in fixed-size pages.

    Args:
        params: an iterable of tensors or of param-group dicts (each may set its own ``lr``,
            ``betas``, ``eps``, ``weight_decay``). float32, float16 and bfloat16 contiguous
            tensors, all on one device.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay is decoupled:
            ``p *= 1 - lr * weight_decay``). ``lr >= 0``, betas in [0, 1).
        state_bits: 32 (fp32 states) or 8 (blockwise 8-bit states for params of at least
            ``min_8bit_size`` elements, fp32 states for smaller ones, as bitsandbytes).
        gpu_budget_bytes: device bytes for resident state pages; the other pages live in pinned
            host memory and are streamed through two device slots of ``page_bytes`` each every
            step. None (default): every page stays on the device. Must be >= ``page_bytes``.
        page_bytes: size of a page (and of each of the two slots of pages in flight).
        master_weights: keep an fp32 master copy of float16/bfloat16 params in the state (paged
            like the rest); the update is applied to it and the param receives it rounded. Off by
            default: low-precision params are then updated in fp32 and rounded back each step.
        min_8bit_size: params with fewer elements keep fp32 states when ``state_bits=8``.

    Non-finite gradients: an element whose gradient is NaN or +-Inf is *skipped* — its param,
    ``exp_avg``, ``exp_avg_sq`` and master copy keep their values (in an 8-bit block it is
    requantized with the block's new absmax); the other elements and the step counters advance
    as usual. Nothing is synchronized: ``found_nonfinite`` is a device tensor set to 1 when the
    last ``step()`` skipped an element (read it when convenient). ``torch.optim.AdamW`` instead
    writes NaN into the param and its states forever.

    State dict: per param ``step`` (fp32 scalar tensor), ``exp_avg`` and ``exp_avg_sq`` (fp32,
    the param's shape) as ``torch.optim.AdamW`` names them, so a checkpoint loads into either
    optimizer. 8-bit states add their raw codes and absmax (``exp_avg_q8``, ``exp_avg_absmax``,
    ``exp_avg_sq_q8``, ``exp_avg_sq_absmax``) for a bit-exact resume (they are ignored when they
    no longer match the fp32 values, e.g. after a trip through torch's AdamW); a master copy is
    saved as ``master_param``. The tensors are copies, on the params' device, or on the CPU when a
    budget is set.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        state_bits: int = 32,
        gpu_budget_bytes: Optional[int] = None,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        master_weights: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8; got {state_bits!r}")
        if isinstance(page_bytes, bool) or not isinstance(page_bytes, int) or page_bytes < MIN_PAGE_BYTES:
            raise ValueError(f"page_bytes must be an int >= {MIN_PAGE_BYTES}; got {page_bytes!r}")
        if gpu_budget_bytes is not None:
            if isinstance(gpu_budget_bytes, bool) or not isinstance(gpu_budget_bytes, int):
                raise TypeError(f"gpu_budget_bytes must be an int or None; got {gpu_budget_bytes!r}")
            if gpu_budget_bytes < page_bytes:
                raise ValueError(
                    f"gpu_budget_bytes must hold at least one page (page_bytes={page_bytes}); got {gpu_budget_bytes}"
                )
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0; got {min_8bit_size!r}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        _hparams(defaults, "defaults")
        self.state_bits = state_bits
        self.gpu_budget_bytes = gpu_budget_bytes
        self.page_bytes = page_bytes
        self.master_weights = bool(master_weights)
        self.min_8bit_size = min_8bit_size
        self._pager: Optional[Pager] = None
        # Step count of each param that has a state, keyed by id(param) (the param groups keep
        # the params alive; an int key hashes much faster than a Tensor on the hot path).
        self._steps: dict[int, int] = {}
        self._pending: dict[Tensor, dict[str, Any]] = {}
        self._found_inf: Optional[Tensor] = None
        self._qmaps: dict[str, Tensor] = {}
        self._keys: dict[int, Tensor] = {}  # id(DTensor param) -> its local shard, the pager's key (see _key)
        self._param_of: dict[int, Tensor] = {}  # id(that key) -> the param
        super().__init__(params, defaults)

    # -- param groups ----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated: dtypes, device, contiguity, hyperparameters). States of
        the existing groups are kept."""
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {n_before}"
        try:
            _hparams(group, where)
            devices = {p.device for g in self.param_groups for p in g["params"]}
            for i, p in enumerate(group["params"]):
                if p.dtype not in FLOAT_DTYPES:
                    raise TypeError(
                        f"PagedAdamW supports float32, float16 and bfloat16 params; got {p.dtype} (param {i}, {where})"
                    )
                if p.layout != torch.strided or not p.is_contiguous():
                    raise ValueError(f"PagedAdamW needs dense contiguous params (param {i}, {where})")
            if len(devices) > 1:
                raise ValueError(f"PagedAdamW needs every param on one device; got {sorted(map(str, devices))}")
        except Exception:
            self.param_groups.pop()
            raise
        if self._pager is not None:  # re-page: carry the existing states over
            self._pending = self._export()
            self._pager = None

    # -- the pager -------------------------------------------------------------------------------

    def _kind(self, p: Tensor) -> str:
        # p.numel() of a DTensor is the whole param's: every rank (and a single process) decides alike
        return "8bit" if self.state_bits == 8 and p.numel() >= self.min_8bit_size else "fp32"

    def _key(self, p: Tensor) -> Tensor:
        """What the pager holds the states of ``p`` under: ``p``, or for a DTensor its local shard (a view made once
        when the pager is built; the kernels always get a fresh ``to_local()``)."""
        if not _is_sharded(p):
            return p
        key = self._keys.get(id(p))
        if key is None:
            key = self._keys[id(p)] = p.to_local()
            self._param_of[id(key)] = p
        return key

    def _param(self, key: Tensor) -> Tensor:
        """The param whose states the pager holds under ``key``."""
        return self._param_of.get(id(key), key)

    def _ensure_pager(self) -> Pager:
        if self._pager is not None:
            return self._pager
        params = [p for g in self.param_groups for p in g["params"]]
        device = _local(params[0]).device if params else torch.device("cpu")
        self._keys, self._param_of = {}, {}
        self._qmaps = {"m": dynamic_map(device), "v": unsigned_dynamic_map(device)}
        self._found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self._pager = Pager(
            [[self._key(p) for p in g["params"]] for g in self.param_groups],
            [[self._kind(p) for p in g["params"]] for g in self.param_groups],
            master=self.master_weights,
            page_bytes=self.page_bytes,
            budget=self.gpu_budget_bytes,
            device=device,
            init=self._init_space,
        )
        pending, self._pending = self._pending, {}
        self._steps = {}
        for p, st in pending.items():
            self._import(p, st)
        return self._pager

    def _init_space(self, pager: Pager, space: Space) -> None:
        """Fresh states: zeros (8-bit: the codes of 0.0 with absmax 0), master = the params."""
        if space.layout.kind == "8bit":
            pager.fill(space, "exp_avg", int(torch.nonzero(self._qmaps["m"] == 0)[0]))
            pager.fill(space, "exp_avg_sq", int(torch.nonzero(self._qmaps["v"] == 0)[0]))
            pager.fill(space, "absmax_m", 0.0)
            pager.fill(space, "absmax_v", 0.0)
        else:
            pager.fill(space, "exp_avg", 0.0)
            pager.fill(space, "exp_avg_sq", 0.0)
        if space.layout.master:
            for p in space.params:
                pager.write(p, "master", p.detach().float())

    @property
    def found_nonfinite(self) -> Optional[Tensor]:
        """Device tensor, fp32 [1]: 1 if the last ``step()`` skipped a non-finite gradient element,
        else 0 (None before the first step)."""
        return self._found_inf

    @property
    def pager(self) -> Pager:
        """The pages of the states (built on the first step or state-dict load)."""
        return self._ensure_pager()

    # -- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One AdamW update of every param that has a gradient (params with ``grad is None`` are
        skipped and their step counters do not advance, as in ``torch.optim.AdamW``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hparams = [_hparams(g, f"param group {i}") for i, g in enumerate(self.param_groups)]
        stepped = []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse or grad.layout != torch.strided:
                    raise RuntimeError(f"PagedAdamW does not support sparse gradients (param {i}, param group {gi})")
                stepped.append(p)
        if not stepped:
            return loss
        pager = self._ensure_pager()
        steps = self._steps
        for p in stepped:
            key = id(self._key(p))
            steps[key] = steps.get(key, 0) + 1
        self._found_inf.zero_()

        def active(unit: Unit) -> bool:
            return any(self._param(k).grad is not None for k in unit.params)

        def launch(unit: Unit, bufs: dict[str, Tensor]) -> None:
            self._launch(unit, bufs, hparams[unit.space.group])

        pager.run(launch, active)
        return loss

    def _launch(self, unit: Unit, bufs: dict[str, Tensor], hp: tuple[float, float, float, float, float]) -> None:
        keys, chunks = unit.params, unit.chunks
        owners = [self._param(k) for k in keys]
        # the local shards of sharded params and of their (reduce-scattered) gradients
        params = [_local(p) for p in owners]
        grads = [None if p.grad is None else _local(p.grad) for p in owners]
        if any(g is None for g in grads):  # drop the chunks of params without a gradient
            keep = [i for i, g in enumerate(grads) if g is not None]
            remap = torch.full((len(params),), -1, dtype=torch.int64)
            remap[keep] = torch.arange(len(keep))
            rows = chunks[remap[chunks[:, 0]] >= 0]
            chunks = torch.cat([remap[rows[:, 0]].unsqueeze(1), rows[:, 1:]], dim=1)
            params = [params[i] for i in keep]
            keys = [keys[i] for i in keep]
            grads = [grads[i] for i in keep]
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        steps = [self._steps[id(k)] for k in keys]
        master = bufs.get("master")
        if unit.space.layout.kind == "8bit":
            adamw8bit_step_(params, grads, bufs["exp_avg"], bufs["exp_avg_sq"], bufs["absmax_m"], bufs["absmax_v"],
                            self._qmaps["m"], self._qmaps["v"], master, self._found_inf, chunks, steps, *hp)
        else:
            adamw_step_(params, grads, bufs["exp_avg"], bufs["exp_avg_sq"], master, self._found_inf, chunks, steps,
                        *hp)

    # -- state dict ------------------------------------------------------------------------------

    def _state_device(self, p: Tensor) -> torch.device:
        return _local(p).device if self.gpu_budget_bytes is None else torch.device("cpu")

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        """The state of one param as a state dict holds it (copies; DTensors for a DTensor param)."""
        pager = self._ensure_pager()
        dev = self._state_device(p)
        k = self._key(p)
        space, _ = pager.where[k]
        out: dict[str, Any] = {"step": torch.tensor(float(self._steps[id(k)]), dtype=torch.float32)}
        if space.layout.kind == "8bit":
            for key, (codes_name, absmax_name) in _Q8_COMPONENTS.items():
                codes = pager.read(k, codes_name, dev)
                absmax = pager.read(k, absmax_name, dev)
                qmap = self._qmaps["m" if key == "exp_avg" else "v"].to(dev)
                out[key] = _like_param(dequantize_blockwise(codes, absmax, qmap), p)
                if not _is_sharded(p):
                    # Raw codes for an exact resume. A shard's blocks of 256 are its own (they depend on the
                    # sharding), so a DTensor's state holds the fp32 values only, requantized when loaded.
                    out[Q8_KEYS[key][0]] = codes
                    out[Q8_KEYS[key][1]] = absmax
        else:
            out["exp_avg"] = _like_param(pager.read(k, "exp_avg", dev), p)
            out["exp_avg_sq"] = _like_param(pager.read(k, "exp_avg_sq", dev), p)
        if space.layout.master:
            out[MASTER_KEY] = _like_param(pager.read(k, "master", dev), p)
        return out

    def _export(self) -> dict[Tensor, dict[str, Any]]:
        if self._pager is None:
            return dict(self._pending)
        return {p: self._param_state(p) for g in self.param_groups for p in g["params"]
                if id(self._key(p)) in self._steps}

    def _import(self, p: Tensor, st: dict[str, Any]) -> None:
        """Write one param's state-dict entry into the pages (the pager exists). For a DTensor param, a DTensor
        state gives its local shard and a whole plain tensor this rank's slice."""
        pager = self._pager
        k = self._key(p)
        st = {name: _local_values(v, p) if isinstance(v, Tensor) and name != "step" and name not in (
            *Q8_KEYS["exp_avg"], *Q8_KEYS["exp_avg_sq"]) else v for name, v in st.items()}
        space, _ = pager.where[k]
        step = float(st["step"])
        if step != math.floor(step) or step < 0:
            raise ValueError(f"state 'step' must be a whole number >= 0; got {step}")
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                raise ValueError(f"state of a param of shape {list(p.shape)} has no {key!r}")
            if st[key].numel() != k.numel():
                raise ValueError(f"state {key!r} must have {k.numel()} elements (param shape {list(k.shape)}); "
                                 f"got shape {list(st[key].shape)}")
        if space.layout.kind == "8bit":
            for key, (codes_name, absmax_name) in _Q8_COMPONENTS.items():
                qmap = self._qmaps["m" if key == "exp_avg" else "v"]
                values = st[key].detach().to(device=qmap.device, dtype=torch.float32).reshape(-1)
                codes, absmax = self._raw_q8(st, key, values, qmap)
                if codes is None:
                    codes, absmax = quantize_blockwise(values, qmap, signed=key == "exp_avg")
                pager.write(k, codes_name, codes)
                pager.write(k, absmax_name, absmax)
        else:
            pager.write(k, "exp_avg", st["exp_avg"].detach().float())
            pager.write(k, "exp_avg_sq", st["exp_avg_sq"].detach().float())
        if space.layout.master:
            master = st.get(MASTER_KEY)
            pager.write(k, "master", (master if master is not None else _local(p)).detach().float())
        if step >= 1:
            self._steps[id(k)] = int(step)
        else:
            self._steps.pop(id(k), None)

    @staticmethod
    def _raw_q8(
        st: dict[str, Any], key: str, values: Tensor, qmap: Tensor
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The raw 8-bit codes and absmax of a state-dict entry, if present and still describing
        exactly the fp32 values (a checkpoint trained on elsewhere keeps stale raw keys)."""
        codes_key, absmax_key = Q8_KEYS[key]
        if codes_key not in st or absmax_key not in st:
            return None, None
        codes = st[codes_key].detach().to(qmap.device).reshape(-1)
        absmax = st[absmax_key].detach().to(device=qmap.device, dtype=torch.float32).reshape(-1)
        n = values.numel()
        if codes.numel() != n or absmax.numel() != -(-n // 256):
            return None, None
        if codes.dtype != torch.uint8:  # e.g. cast to the param dtype by torch.optim's loader
            if not bool(((codes >= 0) & (codes <= 255) & (codes == codes.round())).all()):
                return None, None
            codes = codes.to(torch.uint8)
        if not torch.equal(dequantize_blockwise(codes, absmax, qmap), values):
            return None, None
        return codes, absmax

    def state_dict(self) -> dict[str, Any]:
        """``{'state': {index: {...}}, 'param_groups': [...]}`` as ``torch.optim.AdamW`` writes it
        (see the class docstring for the state keys)."""
        exported = self._export()
        saved = self.state
        try:
            self.state = defaultdict(dict, exported)
            return super().state_dict()
        finally:
            self.state = saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of ``torch.optim.AdamW`` (the groups' hyperparameters
        replace the current ones; params without a saved state start fresh)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups; the optimizer has {len(self.param_groups)}")
        id_map: dict[Any, Tensor] = {}
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi} of the state dict has {len(saved['params'])} params; "
                                 f"the optimizer's has {len(group['params'])}")
            _hparams(saved, f"param group {gi} of the state dict")
            id_map.update(zip(saved["params"], group["params"]))
        for idx in state_dict["state"]:
            if idx not in id_map:
                raise ValueError(f"state dict has a state for param {idx!r}, which no param group lists")
        super().load_state_dict({"state": {}, "param_groups": groups})
        self._pending = {id_map[idx]: st for idx, st in state_dict["state"].items()}
        if self._pager is not None:
            # Reuse the pages: reset them to fresh states, then write the loaded ones.
            for space in self._pager.spaces:
                self._init_space(self._pager, space)
        self._steps = {}
        if self._pager is not None:
            pending, self._pending = self._pending, {}
            for p, st in pending.items():
                self._import(p, st)
        else:
            self._ensure_pager()
