"""Per-row LoRA ops for mixed-adapter batches (`lora_fx::lora_shrink`, `lora_fx::lora_expand`,
`lora_fx::lora_row_weight_grad`): opcheck, values and gradients against a plain per-row loop,
gradcheck in fp64, the Triton kernels in the interpreter, torch.compile with a dynamic token
count, and the errors for bad inputs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import lora_fx.kernels.ops  # noqa: F401  (registers the ops)
from lora_fx.kernels import row_lora

HERE = pathlib.Path(__file__).resolve().parent
ops = torch.ops.lora_fx


def _banks(tokens, slots, r, din, dout, index=None, act=torch.float32, bank=torch.float32, seed=0,
           requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, din, generator=gen).to(act)
    y = torch.randn(tokens, dout, generator=gen).to(act)
    a = (torch.randn(slots, r, din, generator=gen) * 0.3).to(bank)
    b = (torch.randn(slots, dout, r, generator=gen) * 0.3).to(bank)
    scale = torch.rand(slots, generator=gen) + 0.5
    if index is None:
        index = torch.randint(-1, slots, (tokens,), generator=gen)
        index[0] = -1  # always a row without an adapter
    else:
        index = torch.tensor(index, dtype=torch.int64)
    for t in (x, y, a, b):
        t.requires_grad_(requires_grad)
    return x, y, a, b, scale, index


# T not a multiple of any tile, S=1, r=1, -1 rows, a slot with no rows, every row -1
CASES = {
    "ragged": (37, 3, 4, 20, 12, None),
    "one_slot_r1": (11, 1, 1, 9, 7, None),
    "slot_without_rows": (6, 4, 3, 8, 5, [3, -1, 3, 0, 3, 0]),
    "all_minus_one": (4, 2, 2, 6, 3, [-1, -1, -1, -1]),
}
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16_act_fp32_bank": (torch.bfloat16, torch.float32),
          "fp64": (torch.float64, torch.float64)}


@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_opcheck(case, dtypes):
    tokens, slots, r, din, dout, index = case
    act, bank = dtypes
    x, y, a, b, scale, idx = _banks(tokens, slots, r, din, dout, index, act, bank, requires_grad=True)
    opcheck(ops.lora_shrink.default, (x, a, scale, idx))
    h = ops.lora_shrink(x, a, scale, idx).detach().requires_grad_()
    opcheck(ops.lora_expand.default, (y, h, b, idx))
    opcheck(ops.lora_row_weight_grad.default, (y.detach().to(bank).requires_grad_(), h, idx, slots))


def _loop(x, y, a, b, scale, idx):
    """The per-row definition, one row at a time (PEFT's math for the adapter each row picks)."""
    wide = torch.promote_types(y.dtype, b.dtype)
    hs, outs = [], []
    for t in range(x.shape[0]):
        i = int(idx[t])
        if i < 0:
            hs.append(torch.zeros(a.shape[1], dtype=a.dtype))
            outs.append(y[t])
            continue
        h = (x[t].to(a.dtype) @ a[i].t()) * scale[i]
        hs.append(h.to(a.dtype))
        outs.append((y[t].to(wide) + (hs[-1] @ b[i].t()).to(wide)).to(y.dtype))
    return torch.stack(hs), torch.stack(outs)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16_act_fp32_bank"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_values_and_gradients_match_a_per_row_loop(case, dtypes):
    tokens, slots, r, din, dout, index = case
    act, bank = dtypes
    x, y, a, b, scale, idx = _banks(tokens, slots, r, din, dout, index, act, bank, seed=1, requires_grad=True)
    y_before = y.detach().clone()
    h = ops.lora_shrink(x, a, scale, idx)
    out = ops.lora_expand(y, h, b, idx)
    assert h.dtype == bank and out.dtype == act and torch.equal(y.detach(), y_before)  # out of place
    h_loop, out_loop = _loop(x, y, a, b, scale, idx)
    tol = dict(rtol=1e-5, atol=1e-5) if act == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h, h_loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_loop, **tol)
    assert torch.equal(out[idx < 0], y_before[idx < 0]) and not h[idx < 0].any()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(act)
    got = torch.autograd.grad(out, (x, y, a, b), weights)
    want = torch.autograd.grad(out_loop, (x, y, a, b), weights, allow_unused=True, materialize_grads=True)
    for name, g, w in zip("xyab", got, want, strict=True):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_bf16_base_with_fp32_adapters_rounds_once_like_peft():
    # y bf16, banks fp32: the sum is fp32 and rounds to bf16 once; exactly PEFT's
    # (result + lora_B(lora_A(x.to(fp32))) * s).to(bf16) when one adapter serves every row.
    x, y, a, b, _, _ = _banks(16, 1, 4, 32, 24, [0] * 16, torch.bfloat16, torch.float32, seed=3)
    scale = torch.tensor([2.0])
    out = ops.lora_expand(y, ops.lora_shrink(x, a, scale, torch.zeros(16, dtype=torch.int64)), b,
                          torch.zeros(16, dtype=torch.int64))
    peft = (y + ((x.to(torch.float32) @ a[0].t()) @ b[0].t()) * 2.0).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # the scale multiplies h here and lora_B's output in PEFT: the fp32 sums differ by rounding only,
    # so at most one bf16 rounding step apart
    ulp = torch.finfo(torch.bfloat16).eps * peft.float().abs().clamp_min(1e-3)
    assert ((out.float() - peft.float()).abs() <= ulp).all()
    assert (out == peft).float().mean() > 0.9


def test_cpu_kernels_match_the_gather_references():
    x, y, a, b, scale, idx = _banks(50, 5, 8, 24, 16, seed=4)
    h = row_lora.lora_shrink_cpu(x, a, scale, idx)
    torch.testing.assert_close(h, row_lora.lora_shrink_reference(x, a, scale, idx))
    torch.testing.assert_close(row_lora.lora_expand_cpu(y, h, b, idx), row_lora.lora_expand_reference(y, h, b, idx))
    for grad, inp in ((y, x), (x, y)):  # the reference spreads the narrower operand: both branches
        want = torch.stack([grad[idx == s].t() @ inp[idx == s] for s in range(5)])
        torch.testing.assert_close(row_lora.lora_row_weight_grad_cpu(grad, inp, idx, 5), want)
        torch.testing.assert_close(row_lora.lora_row_weight_grad_reference(grad, inp, idx, 5), want)


def test_gradcheck_fp64():
    x, y, a, b, scale, idx = _banks(7, 3, 2, 5, 4, [2, -1, 0, 2, 1, -1, 2], torch.float64, torch.float64, seed=5,
                                    requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: ops.lora_shrink(x, a, scale, idx), (x, a))
    h = ops.lora_shrink(x, a, scale, idx).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda y, h, b: ops.lora_expand(y, h, b, idx), (y, h, b))
    assert torch.autograd.gradgradcheck(lambda x, a: ops.lora_shrink(x, a, scale, idx), (x, a))
    assert torch.autograd.gradcheck(
        lambda x, y, a, b: ops.lora_expand(y, ops.lora_shrink(x, a, scale, idx), b, idx), (x, y, a, b))
    assert torch.autograd.gradgradcheck(lambda y, h, b: ops.lora_expand(y, h, b, idx), (y, h, b))
    g = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, x: ops.lora_row_weight_grad(g, x, idx, 3), (g, x))


def test_triton_kernels_in_the_interpreter():
    assert row_lora.triton_available(), "triton is a test dependency (pip install -e '.[test]')"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "interpret_kernels.py"), "row_lora"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "ok 15", lines[-3:]  # 3 dtype pairs x 5 shapes
    assert sum(line.startswith("row_lora ") for line in lines) == 15, lines


def test_compiles_with_a_dynamic_token_count_without_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    _, _, a, b, scale, _ = _banks(1, 3, 4, 12, 10, [0], requires_grad=True)

    def f(x, y, index):
        h = ops.lora_shrink(x, a, scale, index)
        return torch.nn.functional.silu(ops.lora_expand(y, h, b, index)).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    breaks = sum(counters["graph_break"].values())
    for tokens in (5, 9, 13):
        x, y, _, _, _, idx = _banks(tokens, 3, 4, 12, 10, seed=tokens, requires_grad=True)
        got = torch.autograd.grad(compiled(x, y, idx), (x, y, a, b))
        want = torch.autograd.grad(f(x, y, idx), (x, y, a, b))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    assert counter.frame_count == 1, "recompiled for a new token count"
    assert sum(counters["graph_break"].values()) == breaks


def test_bad_inputs_raise_errors_naming_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, y, a, b, scale, idx = _banks(6, 3, 4, 8, 5)
    h = ops.lora_shrink(x, a, scale, idx)
    eager = [
        (lambda: ops.lora_shrink(x[:, :7], a, scale, idx), r"x's width 7 is not the bank's in=8 .*a \(3, 4, 8\)"),
        (lambda: ops.lora_shrink(x, a, scale[:2], idx), r"scale has 2 slots, the bank S=3"),
        (lambda: ops.lora_shrink(x, a, scale, idx[:5]), r"index has 5 rows, x T=6"),
        (lambda: ops.lora_shrink(x, a, scale, idx.int()), r"index must be int64 .*index \(6,\) torch.int32"),
        (lambda: ops.lora_shrink(x, a[0], scale, idx), r"expected x \(T, in\), a \(S, r, in\).*a \(4, 8\)"),
        (lambda: ops.lora_expand(y[:, :4], h, b, idx), r"y's width 4 is not the bank's out=5"),
        (lambda: ops.lora_expand(y, h[:, :3], b, idx), r"h's width 3 is not the bank's r=4"),
        (lambda: ops.lora_expand(y, h, b, idx[:4]), r"y, h and index disagree on T .*index \(4,\)"),
        (lambda: ops.lora_expand(y, h.double(), b, idx), r"h torch.float64 and b torch.float32 differ"),
        (lambda: ops.lora_row_weight_grad(y, x, idx[:2], 3), r"grad, x and index disagree on T"),
    ]
    for call, match in eager:
        with pytest.raises(ValueError, match=match):
            call()
    # slots out of range: the CPU kernels refuse them (never read past the bank)
    for bad in (torch.tensor([0, 1, 3, -1, 0, 2]), torch.tensor([0, -2, 1, 1, 0, 2])):
        with pytest.raises(ValueError, match=r"index values must lie in \[-1, 3\) for a bank of 3 adapters"):
            ops.lora_shrink(x, a, scale, bad)
        with pytest.raises(ValueError, match=r"lora_expand: index values must lie in \[-1, 3\)"):
            ops.lora_expand(y, h, b, bad)
    # fake tensors (what torch.compile traces with): the same checks as RuntimeErrors
    with FakeTensorMode():
        fx, fa, fs, fi = torch.empty(6, 8), torch.empty(3, 4, 8), torch.empty(3), torch.empty(6, dtype=torch.int64)
        with pytest.raises(RuntimeError, match=r"x's width 7 is not the bank's in=8"):
            ops.lora_shrink(torch.empty(6, 7), fa, fs, fi)
        with pytest.raises(RuntimeError, match=r"index must be int64"):
            ops.lora_shrink(fx, fa, fs, torch.empty(6, dtype=torch.int32))
        with pytest.raises(RuntimeError, match=r"index has 4 rows, x T=6"):
            ops.lora_shrink(fx, fa, fs, torch.empty(4, dtype=torch.int64))
        with pytest.raises(RuntimeError, match=r"y's width 6 is not the bank's out=5"):
            ops.lora_expand(torch.empty(6, 6), torch.empty(6, 4), torch.empty(3, 5, 4), fi)
        with pytest.raises(RuntimeError, match=r"h's width 2 is not the bank's r=4"):
            ops.lora_expand(torch.empty(6, 5), torch.empty(6, 2), torch.empty(3, 5, 4), fi)
        with pytest.raises(RuntimeError, match=r"grad torch.bfloat16 and x torch.float32 differ"):
            ops.lora_row_weight_grad(torch.empty(6, 5, dtype=torch.bfloat16), fx, fi, 3)
        assert ops.lora_shrink(fx, fa, fs, fi).shape == (6, 4)


def test_bench_helper_forms_agree_and_smoke_table():
    from bench.row_lora import BEST, FORMS, main, row_lora_delta

    x, y, a, b, scale, idx = _banks(20, 4, 4, 16, 12, seed=6)
    want = _loop(x, y, a, b, scale, idx)[1]
    for form in FORMS:
        torch.testing.assert_close(row_lora_delta(x, a, b, scale, idx, y, form), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="form"):
        row_lora_delta(x, a, b, scale, idx, y, "dense")
    assert set(BEST) == {"cpu", "cuda"} and set(BEST.values()) <= set(FORMS)
    table = main(["--smoke"])
    assert "| op |" in table and "| gather |" in table and "| single adapter |" in table
