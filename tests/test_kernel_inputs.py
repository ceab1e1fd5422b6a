"""What every backend does with inputs at the edges: autocast regions, strided tensors, empty batches.

Each case runs on every backend live for the device (forced with QLORA_KERNELS_BACKEND), so the
same rule holds whichever kernel the dispatcher picks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import _extension
from qlora_kernels.ops import _dispatch
from qlora_kernels.reference import nf4 as ref

from . import bounds

OPS = torch.ops.qlora_kernels


def _backends(device: str) -> list[str]:
    if device == "cpu":
        return ["reference"] + (["cpp"] if _dispatch.status("cpp", "cpu")[0] else [])
    return ["reference"] + [b for b in ("cuda", "triton") if _dispatch.status(b, "cuda")[0]]


def _strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with t's values (every other element of a wider tensor)."""
    wide = torch.stack([t.reshape(-1), torch.full_like(t.reshape(-1), 7 if not t.is_floating_point() else -3.0)], 1)
    view = wide[:, 0].view(t.shape) if t.dim() == 1 else wide[:, 0].reshape(t.shape)
    assert t.dim() != 1 or t.numel() < 2 or not view.is_contiguous()
    return view


# ---------------------------------------------------------------------------------------------
# autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_layers_behave_as_nn_linear(dtype, device, monkeypatch):
    if device == "cpu" and dtype == torch.float16 and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(device)
    for backend in _backends(device):
        monkeypatch.setenv("QLORA_KERNELS_BACKEND", backend)
        layer = qk.QLoraLinear.from_linear(lin, r=8, lora_alpha=16)
        nn.init.normal_(layer.lora_B.weight, std=0.1)
        base = qk.nn.NF4Linear.from_linear(lin)
        dense = layer.to_linear(torch.float32)  # deq(W) + s B A, fp32
        x = torch.randn(5, 64, device=device, requires_grad=True)
        with torch.autocast(device, dtype):
            y = layer(x)
            y_base = base(x)
            want = dense(x)  # nn.Linear under the same autocast
            y_op = OPS.nf4_matmul(x.detach(), *layer.qweight.tensors(), 48, 64, False)
        assert y.dtype == want.dtype == y_base.dtype == y_op.dtype == dtype, backend
        # ours: the NF4 base plus the LoRA path; nn.Linear: the merged weight (itself rounded to the dtype), one
        # product; both on x rounded to the dtype, results rounded to it
        w = qk.dequantize_nf4(layer.qweight, torch.float32)
        a, b = layer.lora_A.weight, layer.lora_B.weight
        inputs = (x.to(dtype), a, b, lin.bias)
        mag_y, _ = bounds.abs_twin(bounds.lora_formula(layer.scaling), [inputs[0], w, a, b, lin.bias],
                                   torch.zeros(5, 48))
        bound, why = bounds.chained(mag_y, want, 64 + 8 + 1, dtype, roundings=7)
        bounds.assert_within(f"{backend}: y under autocast", y, want, bound, why=why)
        y.float().square().sum().backward()
        assert x.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32, backend
        gx = x.grad.clone()
        x.grad = None
        y_dense = dense.float()(x.to(dtype).float())
        y_dense.square().sum().backward()
        # dx = (2 y) (W + s B A): the two y's differ by the bound above, the products by their own roundings
        _, mags = bounds.abs_twin(bounds.lora_formula(layer.scaling), [inputs[0], w, a, b, lin.bias],
                                  2 * (y_dense.detach().abs() + bound.float()))
        bound_x, why = bounds.chained(mags[0], x.grad, 48 + 8 + 64, dtype, roundings=7)
        bounds.assert_within(f"{backend}: x.grad under autocast", gx, x.grad, bound_x + bounds.abs_matmul(
            2 * bound.float(), (w + layer.scaling * b @ a).t()), why=why + " + 2 |dy bound| |W + s B A|")
        x.grad = None
    # outside autocast everything stays in x's dtype
    monkeypatch.delenv("QLORA_KERNELS_BACKEND")
    assert layer(torch.randn(2, 64, device=device)).dtype == torch.float32


def test_autocast_backward_runs_in_the_forward_dtype(device):
    # a backward started inside another autocast region (activation checkpointing does this) still
    # computes in the dtype the forward chose
    layer = qk.QLoraLinear.from_linear(nn.Linear(32, 32).to(device), r=4)
    x = torch.randn(3, 32, device=device, requires_grad=True)
    with torch.autocast(device, torch.bfloat16):
        y = layer(x)
    with torch.autocast(device, torch.float16):
        y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# strided inputs


@pytest.mark.parametrize("nested", [False, True])
def test_strided_weight_tensors_read_as_their_values(nested, device, monkeypatch):
    # absmax taken as a column of a wider tensor (and the same for every tensor): once read as dense
    qw = qk.quantize_nf4(torch.randn(64, 128, device=device), 64, nested)
    strided = qk.NF4Weight(_strided(qw.packed.reshape(-1)), _strided(qw.absmax), qw.shape, qw.dtype, qw.blocksize,
                           _strided(qw.code), _strided(qw.nested_absmax) if nested else None,
                           _strided(qw.nested_code) if nested else None, qw.offset)
    assert not strided.absmax.is_contiguous()
    want = ref.dequantize_nf4(*qw.tensors(), qw.numel, torch.float32)
    x = torch.randn(8, 128, device=device)
    xt = torch.randn(16, 128, device=device)[::2]  # a strided activation too
    for backend in _backends(device):
        monkeypatch.setenv("QLORA_KERNELS_BACKEND", backend)
        assert torch.equal(qk.dequantize_nf4(strided).reshape(-1), want), backend
        out = torch.empty(qw.numel, device=device)
        OPS.dequantize_nf4_into(*strided.tensors(), qw.numel, out)
        assert torch.equal(out, want), backend
        w = want.view(64, 128)
        for m in (1, 8):
            got, ref_y = qk.nf4_linear(x[:m], strided), x[:m] @ w.t()
            bounds.assert_within(f"{backend} m={m}", got, ref_y, *bounds.kernel_matmul(x[:m], w, ref_y))
        ref_y = xt @ w.t()
        bounds.assert_within("strided x", qk.nf4_linear(xt, qw), ref_y, *bounds.kernel_matmul(xt, w, ref_y))


@pytest.mark.skipif(not _dispatch.status("cpp", "cpu")[0], reason="C++ backend not built")
def test_cpp_kernel_itself_reads_strided_absmax():
    # the C++ kernel is also safe when called directly (its own contiguous copies stay alive)
    qw = qk.quantize_nf4(torch.randn(64, 128), 64, False)
    a = _strided(qw.absmax)
    got = _extension.kernel("dequantize_nf4")(qw.packed.reshape(-1), a, qw.code, None, None, 0.0, 64, qw.numel,
                                              torch.float32)
    assert torch.equal(got, ref.dequantize_nf4(*qw.tensors(), qw.numel, torch.float32))
    x = torch.randn(3, 128)
    y = _extension.kernel("nf4_matmul")(x, qw.packed.reshape(-1), a, qw.code, None, None, 0.0, 64, 64, 128, False)
    want = ref.nf4_matmul(x, *qw.tensors(), 64, 128, False)
    bounds.assert_within("cpp nf4_matmul", y, want, *bounds.kernel_matmul(x, got.view(64, 128), want))


# ---------------------------------------------------------------------------------------------
# empty batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch_gives_empty_results(dtype, device, monkeypatch):
    qw = qk.quantize_nf4(torch.randn(48, 64, device=device))
    for backend in _backends(device):
        monkeypatch.setenv("QLORA_KERNELS_BACKEND", backend)
        for transposed, inner, outer in ((False, 64, 48), (True, 48, 64)):
            y = OPS.nf4_matmul(torch.empty(0, inner, device=device, dtype=dtype), *qw.tensors(), 48, 64, transposed)
            assert y.shape == (0, outer) and y.dtype == dtype, backend
        layer = qk.QLoraLinear.from_linear(nn.Linear(64, 48).to(device), r=4, lora_dropout=0.1)
        x = torch.empty(2, 0, 64, device=device, dtype=dtype, requires_grad=True)
        y = layer(x)
        assert y.shape == (2, 0, 48), backend
        y.sum().backward()
        assert x.grad.shape == x.shape and float(layer.lora_A.weight.grad.abs().sum()) == 0.0, backend
        assert qk.nf4_linear(x.detach(), qw).shape == (2, 0, 48)


def test_meta_inputs_give_shapes_and_a_mixed_call_names_both_devices():
    """On the meta device (shape inference, as ``nn.Linear`` on meta) the layers and functions return meta outputs
    of the right shape and dtype, inside an autocast region too; an x on meta with a weight on the CPU is the op's
    device error (both used to fail inside autocast with "unknown device type")."""
    qw = qk.quantize_nf4(torch.randn(32, 64))
    x = torch.randn(3, 5, 64, device="meta")
    with pytest.raises(ValueError, match="x and the weight must be on one device; got x on meta, weight on cpu"):
        qk.nf4_linear(x, qw)
    layer = qk.QLoraLinear(qw, torch.randn(32), r=4).to("meta")
    for fn in (layer, lambda t: qk.nf4_linear(t, layer.qweight, layer.bias),
               lambda t: qk.lora_linear(t, layer.qweight, layer.lora_A.weight, layer.lora_B.weight, 2.0)):
        y = fn(x)
        assert y.device.type == "meta" and y.shape == (3, 5, 32) and y.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fn(x).shape == (3, 5, 32)
