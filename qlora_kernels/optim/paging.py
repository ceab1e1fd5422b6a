"""Paged optimizer state: fixed-size pages, a device-memory budget, host pages streamed in and out.

Layout. The params of one param group that share a state format form a *space*: each param owns
a range of the space's flat element index, starting at a multiple of 256 (the 8-bit block), and
every state component (``exp_avg``, ``exp_avg_sq``, the 8-bit absmax, the fp32 master copy) is
indexed by that same flat index. A space is cut into pages of ``E`` elements, ``E`` the largest
multiple of 256 whose components fit in ``page_bytes``.

Placement. Pages are taken in a fixed global order (groups, then fp32 / 8-bit spaces, then page
index); the longest prefix that fits in ``gpu_budget_bytes`` is *resident* (component arrays in
device memory that never move), the rest live in a *host pool* of pinned memory, one page per
row, the components laid out inside the row. Every step touches every page once, in order, so
a fixed placement is optimal (an LRU would evict the page needed next); with no budget every
page is resident and no host memory or stream is used.

Streaming. A step first updates the resident pages (one launch per space), then walks the host
pages through two device *slots* of ``page_bytes`` each (double buffering): on CUDA the copy in
(host -> slot) runs on one side stream, the update kernel on the current stream, the copy out
(slot -> host) on a second side stream, ordered by events, so the copies of pages i + 1 and
i - 1 overlap the update of page i. Device memory held: the resident pages (<= budget) plus the
two slots. On the CPU the same code runs with synchronous copies (there is no separate device
memory, but the pages still move between the pools), so the tests exercise the paging path; a
page's bytes are copied, never converted, so paging cannot change a single bit of the result.
No CUDA managed memory is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..reference.adamw import STATE_BLOCKSIZE

_ALIGN = 64  # bytes: alignment of each component inside a page row


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Component:
    """One state buffer: its name, dtype, and whether it has one value per element or per 256."""

    name: str
    dtype: torch.dtype
    per_block: bool = False

    def count(self, elems: int) -> int:
        return _ceil_div(elems, STATE_BLOCKSIZE) if self.per_block else elems


@dataclass(frozen=True)
class Layout:
    """The state format of a space: ``fp32`` (exp_avg, exp_avg_sq in fp32) or ``8bit`` (uint8
    codes plus fp32 absmax per 256 elements), with or without an fp32 master copy."""

    kind: str
    master: bool
    components: tuple[Component, ...]

    @staticmethod
    def make(kind: str, master: bool) -> Layout:
        if kind == "fp32":
            comps = [Component("exp_avg", torch.float32), Component("exp_avg_sq", torch.float32)]
        elif kind == "8bit":
            comps = [
                Component("exp_avg", torch.uint8),
                Component("exp_avg_sq", torch.uint8),
                Component("absmax_m", torch.float32, per_block=True),
                Component("absmax_v", torch.float32, per_block=True),
            ]
        else:
            raise ValueError(f"layout kind must be 'fp32' or '8bit'; got {kind!r}")
        if master:
            comps.append(Component("master", torch.float32))
        return Layout(kind, master, tuple(comps))

    def offsets(self, elems: int) -> tuple[list[int], int]:
        """Byte offset of each component in a page row of ``elems`` elements, and the row's bytes."""
        offs, pos = [], 0
        for c in self.components:
            offs.append(pos)
            pos += _ceil_div(c.count(elems) * c.dtype.itemsize, _ALIGN) * _ALIGN
        return offs, pos

    def nbytes(self, elems: int) -> int:
        return self.offsets(elems)[1]

    def elems_per_page(self, page_bytes: int) -> int:
        """The largest multiple of 256 elements whose page row fits in ``page_bytes`` (0 if none)."""
        per_elem = sum(c.dtype.itemsize / (STATE_BLOCKSIZE if c.per_block else 1) for c in self.components)
        e = int(page_bytes / per_elem) // STATE_BLOCKSIZE * STATE_BLOCKSIZE
        while e > 0 and self.nbytes(e) > page_bytes:
            e -= STATE_BLOCKSIZE
        return e

    def views(self, row: Tensor, elems: int) -> dict[str, Tensor]:
        """The components of a page row (a uint8 buffer) holding ``elems`` elements."""
        offs, _ = self.offsets(elems)
        out = {}
        for c, off in zip(self.components, offs):
            n = c.count(elems) * c.dtype.itemsize
            out[c.name] = row[off : off + n].view(c.dtype)
        return out

    def allocate(self, elems: int, device: torch.device) -> dict[str, Tensor]:
        """Component-major arrays for ``elems`` elements (the resident pages of a space)."""
        return {c.name: torch.empty(c.count(elems), dtype=c.dtype, device=device) for c in self.components}


@dataclass
class Unit:
    """The work of one launch: the resident part of a space, or one of its host pages."""

    space: Space
    page: int | None  # None: the resident pages; else the page index (>= space.n_resident)
    params: list[Tensor]
    chunks: Tensor  # int64 [n, 4] (index into params, start, length, offset in the unit's buffers)
    host_row: int = -1


@dataclass
class Space:
    """The params of one group sharing one layout, and where their pages live."""

    group: int
    layout: Layout
    elems_per_page: int
    params: list[Tensor]
    offsets: list[int]
    total: int
    n_resident: int = 0
    resident: dict[str, Tensor] = field(default_factory=dict)
    host_rows: list[int] = field(default_factory=list)  # host pool row of page n_resident + j

    @property
    def n_pages(self) -> int:
        return _ceil_div(self.total, self.elems_per_page)

    @property
    def resident_elems(self) -> int:
        return min(self.n_resident * self.elems_per_page, self.total)

    def chunk_table(self, lo: int, hi: int) -> tuple[list[Tensor], Tensor]:
        """Params and chunk rows covering the space's elements [lo, hi), offsets relative to lo."""
        params: list[Tensor] = []
        rows: list[tuple[int, int, int, int]] = []
        for p, off in zip(self.params, self.offsets):
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                rows.append((len(params), a - off, b - a, a - lo))
                params.append(p)
        return params, torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)


class _Streams:
    """Side streams and events of the pipeline on CUDA; on the CPU copies are synchronous and the
    ordering calls do nothing.

    Every stream and event belongs to the params' device (not whichever device is current when a
    step runs). The slots were allocated on that device's current stream, whose queued kernels may
    still be using their memory (the caching allocator hands out freed blocks at once): the first
    copy into a slot waits for that stream. The slots are marked as used by the side streams, so
    that freeing them (a new pager after add_param_group / load_state_dict) never lets the
    allocator reuse their memory while a copy is still in flight.
    """

    def __init__(self, device: torch.device, slots: Sequence[Tensor]) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_in = torch.cuda.Stream(device)
            self.copy_out = torch.cuda.Stream(device)
            n_slots = len(slots)
            self.loaded = [torch.cuda.Event() for _ in range(n_slots)]
            self.computed = [torch.cuda.Event() for _ in range(n_slots)]
            self.freed = [torch.cuda.Event() for _ in range(n_slots)]
            self.slots_allocated = torch.cuda.Event()
            self.slots_allocated.record(self.current())
            self.first_step = True
            for slot in slots:
                slot.record_stream(self.copy_in)
                slot.record_stream(self.copy_out)

    def current(self) -> torch.cuda.Stream:
        """The current stream of the params' device (where the update kernels run)."""
        return torch.cuda.current_stream(self.device)

    def begin(self) -> None:
        if self.cuda:
            if self.first_step:  # queued work that used the slots' memory before they were ours
                self.copy_in.wait_event(self.slots_allocated)
                self.first_step = False
            # the previous step's copies out must land before a page is read again
            self.copy_in.wait_stream(self.copy_out)

    def load(self, slot: int, dst: Tensor, src: Tensor) -> None:
        if not self.cuda:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.copy_in):
            self.copy_in.wait_event(self.freed[slot])  # the slot's previous page has been copied out
            dst.copy_(src, non_blocking=True)
            self.loaded[slot].record(self.copy_in)

    def before_compute(self, slot: int) -> None:
        if self.cuda:
            self.current().wait_event(self.loaded[slot])

    def store(self, slot: int, dst: Tensor, src: Tensor) -> None:
        if not self.cuda:
            dst.copy_(src)
            return
        self.computed[slot].record(self.current())
        with torch.cuda.stream(self.copy_out):
            self.copy_out.wait_event(self.computed[slot])
            dst.copy_(src, non_blocking=True)
            self.freed[slot].record(self.copy_out)

    def end(self) -> None:
        if self.cuda:  # work queued after the step sees the state written back
            self.current().wait_stream(self.copy_out)

    def synchronize(self) -> None:
        """Wait for every copy (before the host reads or writes the host pool)."""
        if self.cuda:
            self.copy_in.synchronize()
            self.copy_out.synchronize()


#: Device slots for pages in flight (double buffering).
N_SLOTS = 2


class Pager:
    """The pages of an optimizer's states (see the module docstring).

    ``groups``: the params of each param group; ``kinds[g][i]``: the layout kind ('fp32' or
    '8bit') of param i of group g; ``budget``: device bytes for resident pages (None: all);
    ``init(pager, space)`` writes the fresh states of a space once its pages are allocated.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[Tensor]],
        kinds: Sequence[Sequence[str]],
        *,
        master: bool,
        page_bytes: int,
        budget: int | None,
        device: torch.device,
        init: Callable[[Pager, Space], None],
    ) -> None:
        self.device = device
        self.page_bytes = page_bytes
        self.budget = budget
        self.spaces: list[Space] = []
        self.where: dict[Tensor, tuple[Space, int]] = {}
        for gi, (params, pkinds) in enumerate(zip(groups, kinds)):
            for kind in ("fp32", "8bit"):
                members = [p for p, k in zip(params, pkinds) if k == kind]
                if not members:
                    continue
                layout = Layout.make(kind, master)
                e = layout.elems_per_page(page_bytes)
                if e == 0:
                    raise ValueError(f"page_bytes must hold at least {STATE_BLOCKSIZE} state elements "
                                     f"({layout.nbytes(STATE_BLOCKSIZE)} bytes for {kind} states); got {page_bytes}")
                offsets, pos = [], 0
                for p in members:
                    offsets.append(pos)
                    pos += _ceil_div(p.numel(), STATE_BLOCKSIZE) * STATE_BLOCKSIZE
                space = Space(gi, layout, e, members, offsets, pos)
                self.spaces.append(space)
                for p, off in zip(members, offsets):
                    self.where[p] = (space, off)
        self._place()
        self._allocate(init)
        self.units = self._units()
        self.stats = {"pages_in": 0, "pages_out": 0, "bytes_in": 0, "bytes_out": 0}

    # -- placement and allocation --------------------------------------------------------------

    def _place(self) -> None:
        used = 0
        full = True  # every earlier page is resident: only a prefix of the global order may be
        for s in self.spaces:
            if self.budget is None:
                s.n_resident = s.n_pages
                continue
            r = 0
            while full and r < s.n_pages:
                need = s.layout.nbytes(min((r + 1) * s.elems_per_page, s.total))
                if used + need > self.budget:
                    full = False
                    break
                r += 1
            s.n_resident = r
            used += s.layout.nbytes(s.resident_elems) if r else 0

    def _allocate(self, init: Callable[[Pager, Space], None]) -> None:
        n_host = 0
        for s in self.spaces:
            s.resident = s.layout.allocate(s.resident_elems, self.device) if s.n_resident else {}
            s.host_rows = list(range(n_host, n_host + s.n_pages - s.n_resident))
            n_host += len(s.host_rows)
        pinned = self.device.type == "cuda" and n_host > 0
        self.host = torch.zeros((n_host, self.page_bytes), dtype=torch.uint8, pin_memory=pinned)
        self.slots = [
            torch.empty(self.page_bytes if n_host else 0, dtype=torch.uint8, device=self.device)
            for _ in range(N_SLOTS if n_host else 0)
        ]
        self.streams = _Streams(self.device, self.slots)
        for s in self.spaces:
            init(self, s)

    def _units(self) -> list[Unit]:
        units = []
        for s in self.spaces:
            if s.n_resident:
                params, chunks = s.chunk_table(0, s.resident_elems)
                units.append(Unit(s, None, params, chunks))
            for j, row in enumerate(s.host_rows):
                k = s.n_resident + j
                lo = k * s.elems_per_page
                params, chunks = s.chunk_table(lo, min(lo + s.elems_per_page, s.total))
                units.append(Unit(s, k, params, chunks, row))
        return units

    # -- sizes -----------------------------------------------------------------------------------

    @property
    def n_pages(self) -> int:
        return sum(s.n_pages for s in self.spaces)

    @property
    def n_resident_pages(self) -> int:
        return sum(s.n_resident for s in self.spaces)

    @property
    def n_host_pages(self) -> int:
        return self.host.shape[0]

    def device_bytes(self) -> int:
        """Device memory held for state: the resident pages plus the slots of pages in flight."""
        resident = sum(t.nbytes for s in self.spaces for t in s.resident.values())
        return resident + sum(t.nbytes for t in self.slots)

    def host_bytes(self) -> int:
        return self.host.nbytes

    # -- access to one param's state ------------------------------------------------------------

    def _segments(self, space: Space, lo: int, hi: int) -> Iterator[tuple[dict[str, Tensor], int, int, int]]:
        """Pieces of the space's elements [lo, hi): (component views, start, end within them,
        position of the piece in [lo, hi))."""
        res = space.resident_elems
        if lo < res:
            yield space.resident, lo, min(hi, res), 0
        e = space.elems_per_page
        for k in range(max(lo, res) // e, _ceil_div(hi, e)):
            a, b = max(lo, k * e), min(hi, (k + 1) * e)
            if a >= b or k < space.n_resident:
                continue
            row = self.host[space.host_rows[k - space.n_resident]]
            yield space.layout.views(row, e), a - k * e, b - k * e, a - lo

    def _component(self, space: Space, name: str) -> Component:
        return next(c for c in space.layout.components if c.name == name)

    def read(self, param: Tensor, name: str, device: torch.device) -> Tensor:
        """A copy of component ``name`` of ``param``'s state (flat; per-block components hold
        ceil(numel / 256) values), on ``device``."""
        space, off = self.where[param]
        comp = self._component(space, name)
        n = param.numel()
        self.streams.synchronize()
        out = torch.empty(comp.count(n), dtype=comp.dtype, device=device)
        for views, a, b, pos in self._segments(space, off, off + n):
            if comp.per_block:
                a, b, pos = a // STATE_BLOCKSIZE, _ceil_div(b, STATE_BLOCKSIZE), pos // STATE_BLOCKSIZE
            out[pos : pos + b - a].copy_(views[name][a:b])
        return out

    def write(self, param: Tensor, name: str, values: Tensor) -> None:
        """Set component ``name`` of ``param``'s state from ``values`` (flat, as ``read`` returns)."""
        space, off = self.where[param]
        comp = self._component(space, name)
        n = param.numel()
        values = values.reshape(-1)
        if values.numel() != comp.count(n):
            raise ValueError(
                f"{name} of a param of {n} elements must have {comp.count(n)} values; got {values.numel()}"
            )
        self.streams.synchronize()
        for views, a, b, pos in self._segments(space, off, off + n):
            if comp.per_block:
                a, b, pos = a // STATE_BLOCKSIZE, _ceil_div(b, STATE_BLOCKSIZE), pos // STATE_BLOCKSIZE
            views[name][a:b].copy_(values[pos : pos + b - a])

    def fill(self, space: Space, name: str, value: float) -> None:
        """Set component ``name`` of every page of ``space`` to ``value``."""
        self.streams.synchronize()
        for views, a, b, _ in self._segments(space, 0, space.total):
            comp = self._component(space, name)
            if comp.per_block:
                a, b = a // STATE_BLOCKSIZE, _ceil_div(b, STATE_BLOCKSIZE)
            views[name][a:b].fill_(value)

    # -- a step ----------------------------------------------------------------------------------

    def run(self, launch: Callable[[Unit, dict[str, Tensor]], None], active: Callable[[Unit], bool]) -> None:
        """Call ``launch(unit, buffers)`` on the current stream for every active unit: first the
        resident pages (their buffers are the resident arrays), then the host pages, each loaded
        into a slot (its buffers are the slot's views) and written back after its launch."""
        resident = [u for u in self.units if u.page is None and active(u)]
        streamed = [u for u in self.units if u.page is not None and active(u)]
        if streamed:
            self.streams.begin()
            for i in range(min(N_SLOTS, len(streamed))):  # prefetch while the resident pages update
                self._load(i, streamed[i])
        for u in resident:
            launch(u, u.space.resident)
        for i, u in enumerate(streamed):
            slot = i % N_SLOTS
            self.streams.before_compute(slot)
            launch(u, u.space.layout.views(self.slots[slot], u.space.elems_per_page))
            nbytes = u.space.layout.nbytes(u.space.elems_per_page)
            self.streams.store(slot, self.host[u.host_row, :nbytes], self.slots[slot][:nbytes])
            self.stats["pages_out"] += 1
            self.stats["bytes_out"] += nbytes
            if i + N_SLOTS < len(streamed):
                self._load(slot, streamed[i + N_SLOTS])
        if streamed:
            self.streams.end()

    def _load(self, i: int, unit: Unit) -> None:
        slot = i % N_SLOTS
        nbytes = unit.space.layout.nbytes(unit.space.elems_per_page)
        self.streams.load(slot, self.slots[slot][:nbytes], self.host[unit.host_row, :nbytes])
        self.stats["pages_in"] += 1
        self.stats["bytes_in"] += nbytes
