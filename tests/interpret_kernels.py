"""Run every Triton kernel of lora_fx/kernels in Triton's CPU interpreter against its pure-torch
reference, forward and backward, fp32 and bf16. Run by tests/test_kernels.py in a subprocess with
TRITON_INTERPRET=1 (the variable must be set before the kernels are defined).

    python tests/interpret_kernels.py            # DoRA and BdLoRA kernels (tests/test_kernels.py)
    python tests/interpret_kernels.py row_lora   # the mixed-adapter row ops (tests/test_row_lora_kernels.py)
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
from lora_fx.kernels import block_diag, dora, row_lora  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def main() -> int:
    ran = []
    g_gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for channel_dim, shape in ((-1, (3, 5, 12)), (1, (2, 12, 3, 4)), (1, (2, 12, 7))):
            for with_bias in (False, True):
                base = torch.randn(shape, generator=g_gen).to(dtype)
                lora = torch.randn(shape, generator=g_gen)           # adapters are fp32 (half bases too)
                g = torch.rand(12, generator=g_gen) + 0.5
                scale = torch.tensor(1.7)
                bias = torch.randn(12, generator=g_gen).to(dtype) if with_bias else None
                want = dora.dora_compose_reference(base, lora, g, scale, bias, channel_dim)
                got = dora.dora_compose_triton(base, lora, g, scale, bias, channel_dim)
                assert got.dtype == want.dtype == dtype
                torch.testing.assert_close(got, want, **TOL[dtype])
                grad = torch.randn(shape, generator=g_gen).to(dtype)
                want_b = dora.dora_compose_backward_reference(grad, base, lora, g, scale, bias, channel_dim)
                got_b = dora.dora_compose_backward_triton(grad, base, lora, g, scale, bias, channel_dim)
                for name, x, y in zip(("d_base", "d_lora", "d_g"), got_b, want_b, strict=True):
                    assert x.dtype == y.dtype, name
                    tol = TOL[dtype] if name != "d_g" else dict(rtol=1e-4, atol=1e-4 * y.abs().max().item())
                    torch.testing.assert_close(x, y, **tol, msg=lambda m, n=name: f"{n}: {m}")
                ran.append(f"compose {dtype} {shape} bias={with_bias}")
        for rows, cols, r in ((40, 48, 4), (33, 20, 16), (7, 9, 3)):
            w = torch.randn(rows, cols, generator=g_gen).to(dtype)
            a = torch.randn(r, cols, generator=g_gen)
            b = torch.randn(rows, r, generator=g_gen) * 0.1
            scale = torch.tensor(2.0)
            wsq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32) ** 2
            wa = (w.float() @ a.t())
            baa = b @ (a @ a.t())
            want = dora.dora_norm_reference(wsq, b, wa, baa, scale, 1e-12)
            got = dora.dora_norm_triton(wsq, b, wa, baa, scale, 1e-12)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            dense = (w.float() + 2.0 * b @ a).norm(dim=1)   # the factored norm is the dense norm
            torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
            ran.append(f"norm {dtype} {rows}x{cols} r={r}")
        # BdLoRA's block-diagonal product: forward, and the backward autograd builds from the kernels
        # (dx: the forward kernel over the blocks transposed; dw: the weight-gradient kernel), against
        # plain autograd of the dense formula. Shapes: ragged tiles, r/nblocks = 1, 3-D inputs, 8 blocks.
        for lead, nblocks, n, m in (((3, 5), 2, 3, 5), ((70,), 4, 8, 40), ((2, 33), 2, 20, 16), ((130,), 8, 2, 24)):
            x = torch.randn(*lead, nblocks * m, generator=g_gen).to(dtype).requires_grad_()
            w = torch.randn(nblocks * n, m, generator=g_gen).to(dtype).requires_grad_()
            grad = torch.randn(*lead, nblocks * n, generator=g_gen).to(dtype)
            ref = x.float() @ block_diag.block_diag_dense(w.float(), nblocks).t()
            want_dx, want_dw = torch.autograd.grad(ref, (x, w), grad.float())
            with torch.no_grad():
                got = block_diag.block_diag_matmul_triton(x, w, nblocks)
                got_dx = block_diag.block_diag_matmul_triton(grad, block_diag.block_transpose(w, nblocks), nblocks)
                got_dw = block_diag.block_diag_matmul_weight_grad_triton(grad, x, nblocks)
                want = block_diag.block_diag_matmul_reference(x, w, nblocks)
            for name, a, b in (("out", got, want), ("out (dense)", got, ref), ("dx", got_dx, want_dx),
                               ("dw", got_dw, want_dw)):
                assert a.dtype == dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.shape)
                tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * b.abs().max().item())
                torch.testing.assert_close(a.float(), b.float().to(dtype).float(), **tol,
                                           msg=lambda msg, n=name: f"block_diag {n}: {msg}")
            ran.append(f"block_diag {dtype} {lead} nblocks={nblocks} n={n} m={m}")
    print("\n".join(ran))
    print(f"ok {len(ran)}")
    return 0


def row_lora_main() -> int:
    """lora_shrink / lora_expand / lora_row_weight_grad: forward against the gather references, and
    the gradients autograd builds from the kernels against plain autograd of the reference math.
    Shapes: ragged tiles, S=1 and r=1, rows with -1, a slot with no rows, every row -1, slots out
    of range (treated as -1 on this path). x / y in fp32 or bf16, the banks fp32 or bf16."""
    ran = []
    gen = torch.Generator().manual_seed(0)
    cases = (  # T, S, r, in, out, index (None: random in [-1, S))
        (37, 3, 4, 40, 20, None), (70, 1, 1, 17, 33, None), (5, 4, 16, 64, 8, [3, -1, 3, 0, 3]),
        (9, 2, 3, 6, 5, [-1] * 9), (6, 3, 2, 8, 4, [2, 7, -1, -5, 0, 2]),
    )
    dtypes = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16))
    for act, bank in dtypes:
        for tokens, slots, r, din, dout, index in cases:
            x = torch.randn(tokens, din, generator=gen).to(act).requires_grad_()
            y = torch.randn(tokens, dout, generator=gen).to(act).requires_grad_()
            a = (torch.randn(slots, r, din, generator=gen) * 0.3).to(bank).requires_grad_()
            b = (torch.randn(slots, dout, r, generator=gen) * 0.3).to(bank).requires_grad_()
            scale = torch.rand(slots, generator=gen) + 0.5
            idx = (torch.randint(-1, slots, (tokens,), generator=gen) if index is None
                   else torch.tensor(index, dtype=torch.int64))
            # plain autograd through the gather reference, in fp32 (fp64 rounds nothing that matters here)
            h_ref = row_lora.lora_shrink_reference(x, a, scale, idx)
            out_ref = row_lora.lora_expand_reference(y, h_ref, b, idx)
            dout_grad = torch.randn(tokens, dout, generator=gen).to(act)
            want = torch.autograd.grad(out_ref, (x, y, a, b), dout_grad)
            with torch.no_grad():
                h = row_lora.lora_shrink_triton(x, a, scale, idx)
                out = row_lora.lora_expand_triton(y, h, b, idx)
                # the backward ops.py registers, step by step
                gp = dout_grad.to(bank)
                ones = torch.ones(slots)
                d_h = row_lora.lora_shrink_triton(gp, b.transpose(1, 2), ones, idx)
                d_b = row_lora.lora_row_weight_grad_triton(gp, h, idx, slots)
                d_x = row_lora.lora_shrink_triton(d_h, a.transpose(1, 2), scale, idx).to(act)
                d_a = (row_lora.lora_row_weight_grad_triton(d_h, x.to(bank), idx, slots)
                       * scale.view(-1, 1, 1)).to(bank)
            checks = (("h", h, h_ref), ("out", out, out_ref), ("dx", d_x, want[0]), ("dy", dout_grad, want[1]),
                      ("da", d_a, want[2]), ("db", d_b, want[3]))
            for name, got, ref in checks:
                assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, ref.dtype, got.shape)
                half = torch.bfloat16 in (act, bank)
                tol = dict(rtol=1e-5, atol=1e-5) if not half else dict(rtol=2e-2, atol=2e-2 * ref.abs().max().item())
                torch.testing.assert_close(got.float(), ref.float(), **tol,
                                           msg=lambda msg, n=name: f"row_lora {n}: {msg}")
            no_adapter = (idx < 0) | (idx >= slots)
            assert torch.equal(out[no_adapter], y.detach()[no_adapter]) and not h[no_adapter].any()
            ran.append(f"row_lora {act}/{bank} T={tokens} S={slots} r={r} in={din} out={dout}")
    print("\n".join(ran))
    print(f"ok {len(ran)}")
    return 0


if __name__ == "__main__":
    sys.exit(row_lora_main() if sys.argv[1:] == ["row_lora"] else main())
