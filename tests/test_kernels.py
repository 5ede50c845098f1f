"""lora_fx:: custom ops: opcheck for each; the Triton kernels in the interpreter vs the references."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import lora_fx.kernels.ops  # noqa: F401  (registers the ops)
from lora_fx.kernels import dora

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
    assert lines[-1] == "ok 18", lines[-3:]  # 2 dtypes x (3 layouts x 2 bias + 3 norm shapes)
