"""PagedAdamW and the AdamW ops: lockstep with torch.optim.AdamW, paging, state dicts, 8-bit states,
bad input and the non-finite-gradient policy.

Tolerances (stated once):
* fp32 states vs ``torch.optim.AdamW(foreach=False)`` over 50 steps: params within
  ``|ours - torch| <= 1e-6 * max|torch|`` per tensor (1e-6 relative to the tensor's scale; 6e-8
  measured), exp_avg / exp_avg_sq within 4e-6 (6e-7 measured). The two differ by the order of fp32
  roundings (torch uses lerp, divides by sqrt(bias_correction2), and its CPU fp32 sqrt is not
  correctly rounded), about one ulp per step; a moment is a running sum of such terms.
* paging, backends (C++ vs reference), state-dict resume: bit for bit.
* 8-bit states vs fp32 states over a 100-step least-squares run: final losses within 1 % of the
  initial loss, and the weights within 2 % of the distance they travelled (0.5 % measured).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.ops import _dispatch
from qlora_kernels.ops.adamw import ADAMW
from qlora_kernels.quant_maps import dynamic_map
from qlora_kernels.reference import adamw as ref

OPS = torch.ops.qlora_kernels
ENV = _dispatch.ENV_VAR
HAS_CPP = _dispatch.status("cpp", "cpu")[0] and ADAMW[0].registered("cpu")

# Odd sizes; with state_bits=8 the three of >= 4096 elements get 8-bit states, the rest fp32.
SHAPES = [(5, 123), (1, 7), (300,), (64, 64), (3, 4097), (96, 80)]
# Tiny pages: ~50 pages of fp32 states, 3 resident, the rest streamed through the two slots.
TINY = {"page_bytes": 4096, "gpu_budget_bytes": 3 * 4096}
PAGINGS = {"unpaged": {}, "tiny_pages": TINY}


def _groups(params: list[nn.Parameter]) -> list[dict]:
    return [
        {"params": params[:3], "lr": 3e-3, "weight_decay": 0.1},
        {"params": params[3:], "weight_decay": 0.0, "betas": (0.8, 0.99)},
    ]


def _make_params(device, dtype=torch.float32, seed=0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in SHAPES]


def _set_grads(params, step: int, seed: int = 1, skip_none: bool = True) -> None:
    """Fresh random grads (the same for every run with the same step); param 1 has none every 7th step."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen)
        p.grad = None if (skip_none and i == 1 and step % 7 == 3) else g.to(device=p.device, dtype=p.dtype)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6, what: str = "") -> None:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"{what}: max |diff| {err:.3e} > {rel} * max|expected| ({scale:.3e})"


def _equal_state_dicts(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key].cpu(), sb[key].cpu()), (k, key)


def _run(opt, params, steps: range, scheduler=None) -> None:
    for t in steps:
        _set_grads(params, t)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10) * 0.97**t)


# ---------------------------------------------------------------------------------------------
# Code tables


def test_unsigned_dynamic_map_equals_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(ref.unsigned_dynamic_map(), F.create_dynamic_map(signed=False))
    assert torch.equal(dynamic_map(), F.create_dynamic_map(signed=True))


def test_blockwise_codec_round_trip_and_nearest():
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    for qmap, signed, vals in ((dynamic_map(), True, x), (ref.unsigned_dynamic_map(), False, x.abs())):
        codes, absmax = ref.quantize_blockwise(vals, qmap, signed)
        assert codes.dtype == torch.uint8 and absmax.shape == (4,)
        deq = ref.dequantize_blockwise(codes, absmax, qmap)
        # nearest code: no other table entry is closer to the normalized value
        normed = vals / absmax.repeat_interleave(256)[:1000]
        best = (normed[:, None] - qmap[None, :]).abs().min(dim=1).values
        assert torch.equal((normed - qmap[codes.long()]).abs(), best)
        assert torch.equal(ref.quantize_blockwise(deq, qmap, signed)[0], codes)


# ---------------------------------------------------------------------------------------------
# The ops


def _op_inputs(device, dtype, state_bits, master, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in SHAPES]
    grads[2].view(-1)[7] = float("nan")
    grads[4].view(-1)[300] = float("inf")
    rows, off = [], 0
    for i, p in enumerate(params):  # chunks of at most 512 elements, in a shuffled order
        for s in range(0, p.numel(), 512):
            rows.append((i, s, min(512, p.numel() - s), off + s))
        off += math.ceil(p.numel() / 256) * 256
    chunks = torch.tensor(rows)[torch.randperm(len(rows), generator=gen)]
    if state_bits == 8:
        states = [
            torch.randint(0, 256, (off,), generator=gen, dtype=torch.uint8),
            torch.randint(0, 256, (off,), generator=gen, dtype=torch.uint8),
            torch.rand(off // 256, generator=gen),
            torch.rand(off // 256, generator=gen),
            dynamic_map(),
            ref.unsigned_dynamic_map(),
        ]
    else:
        states = [torch.randn(off, generator=gen), torch.rand(off, generator=gen)]
    states = [s.to(device) for s in states]
    m = torch.randn(off, generator=gen).to(device) if master else None
    return params, grads, states, m, torch.zeros(1, device=device), chunks


def _call(state_bits, params, grads, states, master, found, chunks, steps=None):
    steps = steps or [3, 1, 7, 2, 5, 4]
    hp = (1e-2, 0.9, 0.999, 1e-8, 0.1)
    if state_bits == 8:
        OPS.adamw8bit_step_(params, grads, *states, master, found, chunks, steps, *hp)
    else:
        OPS.adamw_step_(params, grads, *states, master, found, chunks, steps, *hp)


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("master", [False, True])
def test_opcheck(state_bits, master, device):
    params, grads, states, m, found, chunks = _op_inputs(device, torch.bfloat16, state_bits, master)
    hp = (1e-2, 0.9, 0.999, 1e-8, 0.1)
    op = OPS.adamw8bit_step_ if state_bits == 8 else OPS.adamw_step_
    torch.library.opcheck(op.default, (params, grads, *states, m, found, chunks, [3] * 6, *hp))


def _backends_for(device) -> list[str]:
    if device == "cpu":
        return ["reference"] + (["cpp"] if HAS_CPP else [])
    return ["reference"] + (["cuda"] if _dispatch.status("cuda", "cuda")[0] else [])


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_backend_equals_reference_bitwise(state_bits, master, dtype, device, monkeypatch):
    inputs = _op_inputs(device, dtype, state_bits, master)
    results = {}
    for backend in _backends_for(device):
        monkeypatch.setenv(ENV, backend)
        params, grads, states, m, found, chunks = copy.deepcopy(inputs)
        _call(state_bits, params, grads, states, m, found, chunks)
        results[backend] = (params, states, m, found)
    base = results["reference"]
    assert base[3].item() == 1.0  # the NaN / Inf were seen
    assert all(torch.isfinite(p).all() for p in base[0])
    def flat(r):
        return r[0] + r[1] + ([r[2]] if master else []) + [r[3]]

    for backend, result in results.items():
        for a, b in zip(flat(result), flat(base)):
            assert torch.equal(a, b), backend


def test_dispatch_uses_the_extension_when_built(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    expected = "cpp" if HAS_CPP else "reference"
    assert _dispatch.choose("adamw_step_", torch.device("cpu")).backend == expected
    monkeypatch.setenv(ENV, "cuda")  # cuda implements nothing for CPU tensors: forcing it is an error
    with pytest.raises(RuntimeError, match="cuda does not implement adamw_step_ on cpu"):
        _dispatch.choose("adamw_step_", torch.device("cpu"))


def test_op_rejects_bad_arguments():
    params, grads, states, m, found, chunks = _op_inputs("cpu", torch.float32, 32, False)
    with pytest.raises(ValueError, match=r"grads\[0\] must match params\[0\]"):
        _call(32, params, [grads[0].half()] + grads[1:], states, m, found, chunks)
    with pytest.raises(ValueError, match="lr must be >= 0; got -1.0"):
        OPS.adamw_step_(params, grads, *states, m, found, chunks, [1] * 6, -1.0, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\); got 1.0"):
        OPS.adamw_step_(params, grads, *states, m, found, chunks, [1] * 6, 1e-3, 0.9, 1.0, 1e-8, 0.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        _call(32, params, grads, states, m, found, chunks, steps=[0] * 6)
    bad = chunks.clone()
    bad[0, 2] = 10**6
    with pytest.raises(ValueError, match="inside its tensor"):
        _call(32, params, grads, states, m, found, bad)
    overlap = torch.cat([chunks, chunks[:1]])
    with pytest.raises(ValueError, match="overlap"):
        _call(32, params, grads, states, m, found, overlap)
    with pytest.raises(ValueError, match="multiples of 256"):
        q = _op_inputs("cpu", torch.float32, 8, False)
        shifted = q[5].clone()
        shifted[int(shifted[:, 3].argmin()), 3] += 1
        _call(8, q[0], q[1], q[2], q[3], q[4], shifted)


# ---------------------------------------------------------------------------------------------
# Lockstep with torch.optim.AdamW


@pytest.mark.parametrize("backend", ["default", "reference"])
@pytest.mark.parametrize("paging", list(PAGINGS))
def test_lockstep_with_torch_adamw(backend, paging, device, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv(ENV, "reference")
    ours_p, torch_p = _make_params(device), _make_params(device)
    ours = qk.PagedAdamW(_groups(ours_p), lr=1e-2, eps=1e-8, **PAGINGS[paging])
    theirs = torch.optim.AdamW(_groups(torch_p), lr=1e-2, eps=1e-8, foreach=False)
    s_ours, s_theirs = _schedule(ours), _schedule(theirs)
    for t in range(50):
        for params, opt, sched in ((ours_p, ours, s_ours), (torch_p, theirs, s_theirs)):
            _set_grads(params, t)
            opt.step()
            sched.step()
            opt.zero_grad()
    sd = ours.state_dict()
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        _assert_rel(a, b, what=f"param {i}")
        st, st_t = sd["state"][i], theirs.state[b]
        assert st["step"].item() == st_t["step"].item() == (43 if i == 1 else 50)
        _assert_rel(st["exp_avg"], st_t["exp_avg"], rel=4e-6, what=f"exp_avg {i}")
        _assert_rel(st["exp_avg_sq"], st_t["exp_avg_sq"], rel=4e-6, what=f"exp_avg_sq {i}")
    assert [g["lr"] for g in sd["param_groups"]] == [g["lr"] for g in theirs.param_groups]


def test_add_param_group_midway_keeps_states(device):
    ours_p, torch_p = _make_params(device), _make_params(device)
    ours = qk.PagedAdamW(ours_p[:4], lr=1e-2, **TINY)
    theirs = torch.optim.AdamW(torch_p[:4], lr=1e-2, weight_decay=0.0, foreach=False)
    for t in range(20):
        if t == 10:
            ours.add_param_group({"params": ours_p[4:], "lr": 1e-3})
            theirs.add_param_group({"params": torch_p[4:], "lr": 1e-3})
        for params, opt in ((ours_p, ours), (torch_p, theirs)):
            _set_grads(params, t)
            opt.step()
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        _assert_rel(a, b, what=f"param {i}")


# ---------------------------------------------------------------------------------------------
# Paging


@pytest.mark.parametrize(
    "state_bits, dtype, master",
    [(32, torch.float32, False), (8, torch.float32, False), (32, torch.bfloat16, True), (8, torch.float16, True)],
)
def test_paging_changes_no_bit(state_bits, dtype, master, device):
    results = []
    for paging in (PAGINGS["unpaged"], TINY, {"page_bytes": 8192, "gpu_budget_bytes": 8192}):
        params = _make_params(device, dtype)
        opt = qk.PagedAdamW(_groups(params), lr=1e-2, state_bits=state_bits, master_weights=master, **paging)
        _run(opt, params, range(12))
        results.append((params, opt.state_dict()))
        if paging:
            pager = opt.pager
            assert pager.n_host_pages > 0 and pager.stats["pages_in"] > 0
    for params, sd in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][0]))
        _equal_state_dicts(sd, results[0][1])


@pytest.mark.parametrize("state_bits", [32, 8])
def test_budget_bounds_device_memory(state_bits, device):
    params = _make_params(device)
    for budget in (4096, 3 * 4096, 10 * 4096, 10**9):
        opt = qk.PagedAdamW(params, state_bits=state_bits, page_bytes=4096, gpu_budget_bytes=budget)
        pager = opt.pager
        resident = pager.device_bytes() - sum(t.nbytes for t in pager.slots)
        assert resident <= budget
        assert pager.device_bytes() <= budget + 2 * 4096  # the budget plus the pages in flight
        assert pager.n_resident_pages + pager.n_host_pages == pager.n_pages
        if pager.n_host_pages:
            _set_grads(params, 0, skip_none=False)
            before = dict(pager.stats)
            opt.step()
            assert pager.stats["pages_in"] - before["pages_in"] == pager.n_host_pages
            assert pager.stats["pages_out"] - before["pages_out"] == pager.n_host_pages
        else:
            assert budget == 10**9 and not pager.slots
    if device == "cuda":  # physical device memory, not just the pager's accounting
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        opt = qk.PagedAdamW(params, state_bits=state_bits, page_bytes=4096, gpu_budget_bytes=3 * 4096)
        _ = opt.pager
        assert torch.cuda.memory_allocated() - base <= 5 * 4096 + 8192  # + found_inf, maps, allocator rounding


def test_state_memory_of_8bit_is_a_quarter(device):
    params = [nn.Parameter(torch.randn(256, 1024, device=device)) for _ in range(4)]
    fp32 = qk.PagedAdamW(params).pager.device_bytes()
    q8 = qk.PagedAdamW(params, state_bits=8).pager.device_bytes()
    assert q8 / fp32 == pytest.approx(0.2539, abs=1e-3)  # (2 + 8/256) / 8


def test_small_params_keep_fp32_states_in_8bit_mode(device):
    params = _make_params(device)
    opt = qk.PagedAdamW(params, state_bits=8)
    kinds = {p.numel(): opt.pager.where[p][0].layout.kind for p in params}
    assert kinds == {615: "fp32", 7: "fp32", 300: "fp32", 4096: "8bit", 12291: "8bit", 7680: "8bit"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronization is a CUDA notion; needs a GPU")
@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("paging", list(PAGINGS))
def test_step_never_synchronizes_the_device(state_bits, paging):
    params = _make_params("cuda")
    opt = qk.PagedAdamW(_groups(params), lr=1e-2, state_bits=state_bits, **PAGINGS[paging])
    _run(opt, params, range(2))  # builds the pages (that may synchronize, once)
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.found_nonfinite.item() == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="stream ordering is a CUDA notion; needs a GPU")
def test_first_copy_into_fresh_slots_waits_for_queued_work():
    # The slots are allocated on the current stream; the caching allocator may hand them the memory
    # of a tensor that a kernel still queued on that stream (behind a long sleep) is about to write.
    # The first copy-in must wait for that kernel, or it lands first and is overwritten by NaN.
    params = _make_params("cuda")
    want = copy.deepcopy(params)
    ref_opt = torch.optim.AdamW(want, lr=1e-2, foreach=False)
    page = 4096
    junk = [torch.empty(page, dtype=torch.uint8, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the current stream
    for j in junk:
        j.fill_(255)  # queued behind the sleep: writes NaN bytes into memory the slots may get
    del junk, j
    opt = qk.PagedAdamW(params, lr=1e-2, page_bytes=page, gpu_budget_bytes=page)
    _set_grads(params, 0, skip_none=False)
    _set_grads(want, 0, skip_none=False)
    opt.step()
    ref_opt.step()
    for p, q in zip(params, want):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# State dicts


def _save_load(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("paging", list(PAGINGS))
def test_state_dict_round_trip_midway_resumes_identically(state_bits, paging, device):
    params = _make_params(device)
    opt = qk.PagedAdamW(_groups(params), lr=1e-2, state_bits=state_bits, **PAGINGS[paging])
    _run(opt, params, range(25))
    sd = _save_load(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    _run(opt, params, range(25, 50))

    # Resume into a fresh optimizer with the other paging configuration.
    other = PAGINGS["unpaged" if paging != "unpaged" else "tiny_pages"]
    params2 = [nn.Parameter(s.clone()) for s in snapshot]
    opt2 = qk.PagedAdamW(_groups(params2), lr=5.0, state_bits=state_bits, **other)  # lr comes from the sd
    opt2.load_state_dict(sd)
    _run(opt2, params2, range(25, 50))
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    _equal_state_dicts(opt.state_dict(), opt2.state_dict())

    # Loading into an optimizer that has already stepped replaces its states.
    params3 = [nn.Parameter(s.clone()) for s in snapshot]
    opt3 = qk.PagedAdamW(_groups(params3), lr=1e-2, state_bits=state_bits, **PAGINGS[paging])
    _run(opt3, params3, range(3))
    with torch.no_grad():
        for p, s in zip(params3, snapshot):
            p.copy_(s)
    opt3.load_state_dict(sd)
    _run(opt3, params3, range(25, 50))
    assert all(torch.equal(a, b) for a, b in zip(params, params3))


def test_state_dict_moves_between_torch_adamw_and_back(device):
    # ours -> torch
    ours_p = _make_params(device)
    ours = qk.PagedAdamW(_groups(ours_p), lr=1e-2)
    _run(ours, ours_p, range(10))
    torch_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    theirs = torch.optim.AdamW(_groups(torch_p), lr=1e-2, foreach=False)
    theirs.load_state_dict(ours.state_dict())
    for t in range(10, 30):
        for params, opt in ((ours_p, ours), (torch_p, theirs)):
            _set_grads(params, t)
            opt.step()
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        _assert_rel(a, b, what=f"ours->torch param {i}")
    # torch -> ours
    ours2_p = [nn.Parameter(p.detach().clone()) for p in torch_p]
    ours2 = qk.PagedAdamW(_groups(ours2_p), lr=1.0, **TINY)
    ours2.load_state_dict(theirs.state_dict())
    for t in range(30, 50):
        for params, opt in ((ours2_p, ours2), (torch_p, theirs)):
            _set_grads(params, t)
            opt.step()
    for i, (a, b) in enumerate(zip(ours2_p, torch_p)):
        _assert_rel(a, b, what=f"torch->ours param {i}")
    sd = ours2.state_dict()
    for i, p in enumerate(torch_p):
        assert sd["state"][i]["step"].item() == theirs.state[p]["step"].item()


def test_8bit_state_dict_is_portable_and_exact(device):
    params = _make_params(device)
    opt = qk.PagedAdamW(params, lr=1e-2, state_bits=8)
    _run(opt, params, range(5))
    sd = opt.state_dict()
    st = sd["state"][3]  # a (64, 64) param: 8-bit states
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].shape == (64, 64)
    assert st["exp_avg_q8"].dtype == torch.uint8 and st["exp_avg_absmax"].shape == (16,)
    # torch's AdamW takes it (and ignores the raw keys) ...
    torch_p = [nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(torch_p, lr=1e-2, weight_decay=0.0, foreach=False)
    theirs.load_state_dict(sd)
    assert torch.equal(theirs.state[torch_p[3]]["exp_avg"], st["exp_avg"].to(device))
    _run(theirs, torch_p, range(5, 8))
    # ... and back: the stale raw keys are ignored, the fp32 values are requantized.
    back = qk.PagedAdamW([nn.Parameter(p.detach().clone()) for p in torch_p], state_bits=8)
    back.load_state_dict(theirs.state_dict())
    new = back.state_dict()["state"][3]
    exp = theirs.state[torch_p[3]]["exp_avg"].cpu()
    assert (new["exp_avg"].cpu() - exp).abs().max() <= exp.abs().max() * 0.02
    assert not torch.equal(new["exp_avg_q8"].cpu(), st["exp_avg_q8"].cpu())


# ---------------------------------------------------------------------------------------------
# 8-bit states and low-precision params


def _regression(state_bits: int, device, steps: int = 100) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(initial loss, final loss, final W, initial W) of a least-squares fit of a 64 x 64 W (8-bit
    states when asked) and a bias (fp32 states: under 4096 elements)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen).to(device)
    w_true = torch.randn(64, 64, generator=gen).to(device) / 8
    y = x @ w_true.T + 0.01 * torch.randn(256, 64, generator=gen).to(device)
    w0 = (torch.randn(64, 64, generator=gen) / 16).to(device)
    w = nn.Parameter(w0.clone())
    b = nn.Parameter(torch.zeros(64, device=device))
    opt = qk.PagedAdamW([w, b], lr=1e-2, weight_decay=0.01, state_bits=state_bits)
    first = None
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(x @ w.T + b, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(x @ w.T + b, y).item()
    return first, final, w.detach(), w0


def test_8bit_states_track_fp32_states_over_a_training_run(device):
    first, loss32, w32, w0 = _regression(32, device)
    _, loss8, w8, _ = _regression(8, device)
    assert loss32 < 0.01 * first  # it trains
    assert abs(loss8 - loss32) <= 0.01 * first
    assert (w8 - w32).norm() <= 0.02 * (w32 - w0).norm()


def test_low_precision_params_with_master_weights_follow_the_fp32_run_exactly(device):
    bf16 = _make_params(device, torch.bfloat16)
    fp32 = [nn.Parameter(p.detach().float()) for p in bf16]
    opt_b = qk.PagedAdamW(_groups(bf16), lr=1e-2, master_weights=True, **TINY)
    opt_f = qk.PagedAdamW(_groups(fp32), lr=1e-2)
    for t in range(20):
        _set_grads(bf16, t)
        for pb, pf in zip(bf16, fp32):  # the same (bf16-representable) gradient values
            pf.grad = None if pb.grad is None else pb.grad.float()
        opt_b.step()
        opt_f.step()
    sd = opt_b.state_dict()
    for i, (pb, pf) in enumerate(zip(bf16, fp32)):
        assert torch.equal(sd["state"][i]["master_param"].to(device), pf.detach())
        assert torch.equal(pb.detach(), pf.detach().to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_without_master_stay_close(dtype, device):
    low = _make_params(device, dtype)
    fp32 = [nn.Parameter(p.detach().float()) for p in low]
    opt_l = qk.PagedAdamW(low, lr=1e-3)
    opt_f = qk.PagedAdamW(fp32, lr=1e-3)
    for t in range(20):
        _set_grads(low, t)
        for pl, pf in zip(low, fp32):
            pf.grad = None if pl.grad is None else pl.grad.float()
        opt_l.step()
        opt_f.step()
    assert all(p.dtype == dtype for p in low)
    assert "master_param" not in opt_l.state_dict()["state"][0]
    for pl, pf in zip(low, fp32):
        # each step rounds to the param's precision: the drift stays within a few of its ulps
        assert (pl.float() - pf).abs().max() <= 8 * 2**-8 * pf.abs().max()


# ---------------------------------------------------------------------------------------------
# Non-finite gradients


@pytest.mark.parametrize("state_bits", [32, 8])
def test_nonfinite_gradient_elements_are_skipped(state_bits, device):
    params, twins = _make_params(device), _make_params(device)
    opt = qk.PagedAdamW(params, lr=1e-2, state_bits=state_bits, **TINY)
    twin = qk.PagedAdamW(twins, lr=1e-2, state_bits=state_bits, **TINY)
    _run(opt, params, range(3))
    _run(twin, twins, range(3))
    assert opt.found_nonfinite.item() == 0.0
    before = [p.detach().clone() for p in params]
    sd_before = opt.state_dict()
    _set_grads(params, 3, skip_none=False)
    _set_grads(twins, 3, skip_none=False)
    bad = {0: [0, 5], 3: [100], 4: [4096, 12290]}  # param -> flat indices
    for i, idx in bad.items():
        params[i].grad.view(-1)[idx[0]] = float("nan")
        for j in idx[1:]:
            params[i].grad.view(-1)[j] = float("-inf") if j % 2 else float("inf")
        twins[i].grad.view(-1)[idx] = 0.0
    opt.step()
    twin.step()
    assert opt.found_nonfinite.item() == 1.0 and twin.found_nonfinite.item() == 0.0
    sd = opt.state_dict()
    for i, p in enumerate(params):
        skipped = torch.zeros(p.numel(), dtype=torch.bool, device=device)
        skipped[bad.get(i, [])] = True
        flat, flat0 = p.detach().view(-1), before[i].view(-1)
        assert torch.equal(flat[skipped], flat0[skipped])  # untouched
        assert torch.equal(flat[~skipped], twins[i].detach().view(-1)[~skipped])  # the rest as usual
        assert torch.isfinite(flat).all()
        if state_bits == 32 or p.numel() < 4096:
            for key in ("exp_avg", "exp_avg_sq"):
                new, old = sd["state"][i][key].view(-1).cpu(), sd_before["state"][i][key].view(-1).cpu()
                assert torch.equal(new[skipped.cpu()], old[skipped.cpu()])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.isfinite(sd["state"][i][key]).all()
    _run(opt, params, range(4, 5))
    assert opt.found_nonfinite.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input


def test_rejects_bad_constructor_arguments():
    p = [nn.Parameter(torch.randn(4, 4))]
    cases = [
        ({"lr": -1e-3}, ValueError, "lr must be >= 0; got -0.001"),
        ({"betas": (1.0, 0.999)}, ValueError, r"betas must be in \[0, 1\); got beta1=1.0"),
        ({"betas": (0.9, -0.1)}, ValueError, r"betas must be in \[0, 1\); got beta2=-0.1"),
        ({"eps": -1.0}, ValueError, "eps must be >= 0"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0"),
        ({"state_bits": 4}, ValueError, "state_bits must be 32 or 8; got 4"),
        ({"page_bytes": 100}, ValueError, "page_bytes must be an int >= 4096; got 100"),
        ({"gpu_budget_bytes": 4096, "page_bytes": 8192}, ValueError, "gpu_budget_bytes must hold at least one page"),
        ({"gpu_budget_bytes": 1.5e9}, TypeError, "gpu_budget_bytes must be an int or None"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            qk.PagedAdamW(p, **kwargs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.complex64])
def test_rejects_unsupported_param_dtypes(dtype):
    with pytest.raises(TypeError, match=f"float32, float16 and bfloat16 params; got {dtype}"):
        qk.PagedAdamW([torch.zeros(3, dtype=dtype)])


def test_rejects_sparse_gradients_without_changing_anything():
    emb = nn.Embedding(10, 4, sparse=True)
    dense = nn.Parameter(torch.randn(3))
    opt = qk.PagedAdamW([dense, emb.weight])
    dense.grad = torch.ones(3)
    emb(torch.tensor([1, 2])).sum().backward()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(dense, before) and opt.state_dict()["state"] == {}


def test_rejects_bad_hyperparameters_set_later_and_bad_state_dicts():
    params = _make_params("cpu")
    opt = qk.PagedAdamW(params)
    _run(opt, params, range(2))
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()
    opt.param_groups[0]["lr"] = 1e-3
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["amsgrad"] = True
    with pytest.raises(ValueError, match="does not support amsgrad=True"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'exp_avg' must have 615 elements"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": sd["param_groups"] * 2})


def test_zero_grad_and_params_without_grads():
    params = _make_params("cpu")
    opt = qk.PagedAdamW(params, **TINY)
    opt.zero_grad()
    assert opt.step() is None and opt.state_dict()["state"] == {}
    params[2].grad = torch.ones_like(params[2])
    before = [p.detach().clone() for p in params]
    opt.step()
    changed = [not torch.equal(a, b) for a, b in zip(params, before)]
    assert changed == [False, False, True, False, False, False]
    assert list(opt.state_dict()["state"]) == [2]
    loss = opt.step(lambda: 3.0)
    assert loss == 3.0
