"""The mixed-adapter row ops (`lora_fx::lora_shrink`, `lora_fx::lora_expand`, and the bank gradient
`lora_fx::lora_row_weight_grad`) on CUDA: their Triton kernels compiled inside Inductor graphs
(forward and backward, fp32 and bf16 activations on fp32 adapters, and all-bf16) against fp64
autograd through the gather reference; a dynamic token count; slots out of range (treated as
-1 on CUDA); the ops' eager speed beside the gather form (printed, never asserted).

Skipped without CUDA; written for the sessions that are lent a GPU (`python -m pytest tests/gpu -q -s`).
Not yet run on a GPU when written: a failure here may be the test's own. `DEVICE` is a module
constant so that the test logic can be dry-run on the CPU (there the ops are plain custom ops and
the Triton-kernel checks are skipped)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16_on_fp32_adapters": (torch.bfloat16, torch.float32),
          "bf16": (torch.bfloat16, torch.bfloat16)}
SHAPES = {  # tokens, slots, r, in, out
    "prefill": (1000, 4, 16, 512, 384),
    "decode": (8, 4, 16, 512, 384),
    "ragged_r1": (77, 3, 1, 40, 24),
}


def _inputs(tokens, slots, r, din, dout, act, bank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, din, generator=gen).to(DEVICE, act).requires_grad_()
    y = torch.randn(tokens, dout, generator=gen).to(DEVICE, act).requires_grad_()
    a = (torch.randn(slots, r, din, generator=gen) * din ** -0.5).to(DEVICE, bank).requires_grad_()
    b = (torch.randn(slots, dout, r, generator=gen) * 0.1).to(DEVICE, bank).requires_grad_()
    scale = (torch.rand(slots, generator=gen) + 0.5).to(DEVICE)
    index = torch.randint(-1, slots, (tokens,), generator=gen).to(DEVICE)
    index[0] = -1
    return x, y, a, b, scale, index


def _f(x, y, a, b, scale, index, weights):
    h = torch.ops.lora_fx.lora_shrink(x, a, scale, index)
    return (torch.nn.functional.silu(torch.ops.lora_fx.lora_expand(y, h, b, index)).float() * weights).sum()


def _reference(x, y, a, b, scale, index, weights):
    """fp64 autograd through the gather reference: (loss, grads of x, y, a, b, sum |terms|)."""
    from lora_fx.kernels.row_lora import lora_expand_reference, lora_shrink_reference

    leaves = [t.detach().double().requires_grad_() for t in (x, y, a, b)]
    x64, y64, a64, b64 = leaves
    terms = torch.nn.functional.silu(lora_expand_reference(y64, lora_shrink_reference(x64, a64, scale, index), b64,
                                                           index)) * weights.double()
    loss = terms.sum()
    return loss, torch.autograd.grad(loss, leaves), terms.abs().sum()


@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_triton_ops_inside_an_inductor_graph_match_the_reference(shape, dtypes):
    from torch._inductor.utils import run_and_get_code

    import lora_fx.kernels.ops  # noqa: F401

    act, bank = dtypes
    x, y, a, b, scale, index = _inputs(*shape, act, bank)
    weights = torch.randn(shape[0], shape[4], generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step():
        loss = torch.compile(_f, backend="inductor", fullgraph=True)(x, y, a, b, scale, index, weights)
        return (loss, *torch.autograd.grad(loss, (x, y, a, b)))

    (loss, *grads), codes = run_and_get_code(step)
    if DEVICE == "cuda":  # the Triton kernels are in Inductor's code (wrap_triton), not behind an opaque call
        assert any("_row_mm_kernel" in code for code in codes), "shrink/expand kernel not in the compiled code"
        assert any("_row_wgrad_kernel" in code for code in codes), "bank-gradient kernel not in the compiled code"
    ref, ref_grads, loss_scale = _reference(x, y, a, b, scale, index, weights)
    tol = 1e-4 if act == bank == torch.float32 else 3e-2
    assert (loss.double() - ref).abs().item() <= tol * loss_scale.item(), "loss"
    for name, got, want in zip("xyab", grads, ref_grads, strict=True):
        assert got.dtype == {"x": act, "y": act, "a": bank, "b": bank}[name], name
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(want.abs().max().item(), 1.0), f"grad of {name}: max err {err}"


def test_dynamic_token_count_and_out_of_range_slots():
    from torch._dynamo.testing import CompileCounterWithBackend

    import lora_fx.kernels.ops  # noqa: F401
    from lora_fx.kernels.row_lora import lora_expand_reference, lora_shrink_reference

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def f(x, y, a, b, scale, index):
        return torch.ops.lora_fx.lora_expand(y, torch.ops.lora_fx.lora_shrink(x, a, scale, index), b, index)

    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    for tokens in (33, 64, 129):
        x, y, a, b, scale, index = _inputs(tokens, 3, 8, 64, 48, torch.bfloat16, torch.float32, seed=tokens)
        with torch.no_grad():
            got = compiled(x, y, a, b, scale, index)
            want = lora_expand_reference(y, lora_shrink_reference(x, a, scale, index), b, index)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert counter.frame_count == 1
    # slots outside [-1, S) read nothing on CUDA: those rows are y's, unchanged (no device-side check)
    x, y, a, b, scale, index = _inputs(6, 3, 8, 64, 48, torch.float32, torch.float32)
    index = torch.tensor([0, 5, -3, 2, 3, 1], device=DEVICE)
    with torch.no_grad():
        h = torch.ops.lora_fx.lora_shrink(x, a, scale, index)
        out = torch.ops.lora_fx.lora_expand(y, h, b, index)
    bad = torch.tensor([False, True, True, False, True, False], device=DEVICE)
    assert not h[bad].any() and torch.equal(out[bad], y.detach()[bad])


def test_op_speed_line():
    """Eager, decode- and prefill-shaped (4 adapters, r=16, 4096 -> 4096, fp32 adapters on a bf16 base):
    the ops against the gather form, per call, beside the base GEMM."""
    import lora_fx.kernels.ops  # noqa: F401
    from bench.row_lora import row_lora_delta

    lines = []
    for tokens in (8, 32, 4096):
        x, y, a, b, scale, index = _inputs(tokens, 4, 16, 4096, 4096, torch.bfloat16, torch.float32)
        x, y, a, b = (t.detach() for t in (x, y, a, b))
        index = (torch.arange(tokens, device=DEVICE) % 4)
        w = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
        fns = {"base": lambda x=x, w=w: x @ w.t(),
               "gather": lambda x=x, y=y, a=a, b=b, s=scale, i=index: row_lora_delta(x, a, b, s, i, y, "gather"),
               "op": lambda x=x, y=y, a=a, b=b, s=scale, i=index: row_lora_delta(x, a, b, s, i, y, "op")}
        torch.testing.assert_close(fns["op"]().float(), fns["gather"]().float(), rtol=2e-2, atol=2e-2)
        cells = []
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    fn()
                end.record()
                torch.cuda.synchronize()
                cells.append(f"{name} {start.elapsed_time(end) / 20:.3f} ms")
        lines.append(f"tokens {tokens}: " + "; ".join(cells))
    print("\nrow ops, 4 adapters r=16, 4096 -> 4096, bf16 base, eager:\n" + "\n".join(lines))
