"""lora_fx:: custom ops: opcheck for each; the Triton kernels in the interpreter vs the references."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import lora_fx.kernels.ops  # (registers the ops)
from lora_fx.kernels import block_diag, dora

HERE = pathlib.Path(__file__).resolve().parent


def _compose_args(dtype, channel_dim, shape, with_bias, requires_grad):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen).to(dtype).requires_grad_(requires_grad)
    lora = torch.randn(shape, generator=gen).requires_grad_(requires_grad)
    g = (torch.rand(shape[channel_dim], generator=gen) + 0.5).requires_grad_(requires_grad)
    bias = torch.randn(shape[channel_dim], generator=gen).to(dtype) if with_bias else None
    return base, lora, g, torch.tensor(1.5), bias, channel_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channel_dim,shape", [(-1, (3, 4, 6)), (1, (2, 6, 3, 3))], ids=["linear", "conv"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_dora_compose_and_backward(dtype, channel_dim, shape, with_bias):
    args = _compose_args(dtype, channel_dim, shape, with_bias, requires_grad=True)
    opcheck(torch.ops.lora_fx.dora_compose.default, args)
    plain = _compose_args(dtype, channel_dim, shape, with_bias, requires_grad=False)
    grad = torch.randn(shape).to(dtype)
    opcheck(torch.ops.lora_fx.dora_compose_backward.default, (grad, *plain))


def test_opcheck_dora_norm():
    gen = torch.Generator().manual_seed(1)
    w, a, b = torch.randn(7, 9, generator=gen), torch.randn(3, 9, generator=gen), torch.randn(7, 3, generator=gen)
    args = ((w * w).sum(1), b, w @ a.t(), b @ (a @ a.t()), torch.tensor(2.0), 1e-12)
    opcheck(torch.ops.lora_fx.dora_norm.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_addmm_inplace_and_its_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    y, h, bt = (torch.randn(s, generator=gen).to(dtype) for s in ((5, 7), (5, 3), (3, 7)))
    opcheck(torch.ops.lora_fx.addmm_.default, (y.clone(), h, bt))
    want = lora_fx.kernels.ops.addmm_reference(y, h, bt)
    got = y.clone()
    assert torch.ops.lora_fx.addmm_.default(got, h, bt) is None
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, y)  # it accumulated


def test_addmm_inplace_names_the_shapes_that_do_not_multiply():
    y, h, bt = torch.zeros(5, 7), torch.zeros(5, 3), torch.zeros(4, 7)
    with pytest.raises(RuntimeError, match=r"y \(5, 7\) \+= h \(5, 3\) · bt \(4, 7\)"):
        torch.ops.lora_fx.addmm_.default(y, h, bt)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (y, h, bt)]
        with pytest.raises(RuntimeError, match="does not multiply"):
            torch.ops.lora_fx.addmm_.default(*fakes)


def test_compose_autograd_matches_the_reference_math():
    base, lora, g, scale, bias, cd = _compose_args(torch.float32, -1, (3, 4, 6), True, requires_grad=True)
    out = torch.ops.lora_fx.dora_compose(base, lora, g, scale, bias, cd)
    weights = torch.randn(out.shape)
    got = torch.autograd.grad((out * weights).sum(), (base, lora, g))
    ref_out = g * (base - bias + scale * lora) + bias  # plain autograd through the formula
    want = torch.autograd.grad((ref_out * weights).sum(), (base, lora, g))
    torch.testing.assert_close(out, ref_out)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)


def test_triton_kernels_in_the_interpreter():
    assert dora.triton_available(), "triton is a test dependency (pip install -e '.[test]')"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "interpret_kernels.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    # 2 dtypes x (3 layouts x 2 bias + 3 norm shapes + 4 block-diagonal shapes)
    assert lines[-1] == "ok 26", lines[-3:]
    assert sum(line.startswith("block_diag ") for line in lines) == 8, lines


# -- block_diag_matmul: BdLoRA's block-diagonal product -------------------------------------------

def _block_diag_args(dtype, lead, nblocks, n, m, requires_grad):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*lead, nblocks * m, generator=gen).to(dtype).requires_grad_(requires_grad)
    w = torch.randn(nblocks * n, m, generator=gen).to(dtype).requires_grad_(requires_grad)
    return x, w, nblocks


BLOCK_SHAPES = [((6,), 2, 3, 5), ((2, 3), 4, 2, 4), ((2, 2, 3), 1, 4, 6), ((5,), 8, 1, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,nblocks,n,m", BLOCK_SHAPES, ids=["2d", "3d", "4d_one_block", "8_blocks_n1"])
def test_opcheck_block_diag_matmul_and_weight_grad(dtype, lead, nblocks, n, m):
    args = _block_diag_args(dtype, lead, nblocks, n, m, requires_grad=True)
    opcheck(torch.ops.lora_fx.block_diag_matmul.default, args)
    x, _, _ = _block_diag_args(dtype, lead, nblocks, n, m, requires_grad=False)
    grad = torch.randn(*lead, nblocks * n).to(dtype)
    opcheck(torch.ops.lora_fx.block_diag_matmul_weight_grad.default, (grad, x, nblocks))


@pytest.mark.parametrize("lead,nblocks,n,m", BLOCK_SHAPES, ids=["2d", "3d", "4d_one_block", "8_blocks_n1"])
def test_block_diag_matmul_is_the_dense_block_diagonal_product_with_its_gradients(lead, nblocks, n, m):
    x, w, _ = _block_diag_args(torch.float32, lead, nblocks, n, m, requires_grad=True)
    out = torch.ops.lora_fx.block_diag_matmul(x, w, nblocks)
    dense = torch.block_diag(*w.chunk(nblocks))             # (nblocks·n, nblocks·m), zeros off the blocks
    ref = x @ dense.t()
    torch.testing.assert_close(out, ref)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((out * weights).sum(), (x, w))
    want = torch.autograd.grad((ref * weights).sum(), (x, w))
    for name, a, b in zip(("x", "w"), got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda msg, n=name: f"grad of {n}: {msg}")
    # the compact gradient is the dense matrix's gradient restricted to its diagonal blocks
    dense_leaf = torch.block_diag(*w.detach().chunk(nblocks)).requires_grad_()
    dense_grad = torch.autograd.grad(((x.detach() @ dense_leaf.t()) * weights).sum(), dense_leaf)[0]
    blocks = [dense_grad[i * n:(i + 1) * n, i * m:(i + 1) * m] for i in range(nblocks)]
    torch.testing.assert_close(got[1], torch.cat(blocks))


def test_block_diag_matmul_refuses_shapes_that_are_not_block_diagonal():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"input width 10 and weight \(6, 4\) do not form 2 diagonal blocks"):
        torch.ops.lora_fx.block_diag_matmul(x, torch.randn(6, 4), 2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(RuntimeError, match=r"input width 10 is not nblocks·m = 2·4"):
        torch.ops.lora_fx.block_diag_matmul(torch.empty(3, 10), torch.empty(6, 4), 2)
    with FakeTensorMode(), pytest.raises(RuntimeError, match=r"weight \(5, 5\) is not \(nblocks·n, m\) for nblocks=2"):
        torch.ops.lora_fx.block_diag_matmul(torch.empty(3, 10), torch.empty(5, 5), 2)
    with FakeTensorMode(), pytest.raises(RuntimeError, match=r"input torch.bfloat16 and weight torch.float32 differ"):
        torch.ops.lora_fx.block_diag_matmul(torch.empty(3, 10, dtype=torch.bfloat16), torch.empty(6, 5), 2)


def test_block_diag_matmul_compiles_in_an_inductor_graph_on_cpu():
    # CPU: the op is a custom op over the reference (no GPU driver for triton_op); Inductor calls it
    # as an extern kernel, forward and backward, fullgraph.
    x, w, nb = _block_diag_args(torch.float32, (4, 6), 2, 3, 5, requires_grad=True)

    def f(x, w):
        return torch.nn.functional.silu(torch.ops.lora_fx.block_diag_matmul(x, w, nb)).sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w), (x, w))
    want = torch.autograd.grad(f(x, w), (x, w))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert block_diag.block_transpose(w, nb).shape == (10, 3)


# -- gemm_4bit: bitsandbytes' 4-bit matmul with the input's gradient ------------------------------

def _gemm_4bit_args(quant_type, nested, with_bias, requires_grad):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 128, generator=gen)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=nested)
    x = torch.randn(3, 5, 128, generator=gen).requires_grad_(requires_grad)
    bias = torch.randn(32, generator=gen).requires_grad_(requires_grad) if with_bias else None
    nested_args = (state.absmax, state.state2.code, state.offset) if nested else (None, None, None)
    absmax = state.state2.absmax if nested else state.absmax
    args = (x, packed.view(-1, 1), list(state.shape), absmax, state.blocksize, quant_type, bias, *nested_args)
    return args, state


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck_gemm_4bit(quant_type, nested, with_bias):
    args, _ = _gemm_4bit_args(quant_type, nested, with_bias, requires_grad=True)
    opcheck(torch.ops.lora_fx.gemm_4bit.default, args)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_gemm_4bit_is_bitsandbytes_forward_with_the_dequantized_weights_gradient(quant_type, nested):
    import bitsandbytes.functional as bnb_functional

    args, state = _gemm_4bit_args(quant_type, nested, True, requires_grad=True)
    x, bias = args[0], args[6]
    out = torch.ops.lora_fx.gemm_4bit(*args)
    with torch.no_grad():  # the same kernel bitsandbytes runs
        assert torch.equal(out, torch.ops.bitsandbytes.gemm_4bit.default(*args[:6], bias=bias, absmax_8bit=args[7],
                                                                          absmax_code=args[8], absmax_offset=args[9]))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out * weights).sum(), (x, bias))
    # Reference: plain autograd through a linear of the dequantized weight (bitsandbytes' own rule).
    weight = bnb_functional.dequantize_4bit(args[1], state)
    ref = torch.nn.functional.linear(x, weight, bias)
    want = torch.autograd.grad((ref * weights).sum(), (x, bias))
    for g, w, name in zip(got, want, ("input", "bias"), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"grad of the {name}")
