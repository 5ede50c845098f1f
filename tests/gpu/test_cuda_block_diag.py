"""BdLoRA's `lora_fx::block_diag_matmul` on CUDA: the Triton kernels compiled inside an Inductor
graph (forward and backward) against the reference, and a BdLoRA Llama through the backend against
PEFT with each form of the product (expanded, einsum, the op). Skipped without CUDA; written for
the sessions that are lent a GPU (`python -m pytest tests/gpu -q -s`: `-s` shows the bandwidth
line). Not yet run on a GPU when written: a failure here may be the test's own."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,nblocks,n,m", [((4, 128), 2, 8, 256), ((300,), 4, 688, 4), ((2, 33), 8, 3, 24)],
                         ids=["block_a", "block_b", "ragged"])
def test_triton_op_inside_an_inductor_graph_matches_the_reference(dtype, lead, nblocks, n, m):
    from torch._inductor.utils import run_and_get_code

    import lora_fx.kernels.ops  # noqa: F401
    from lora_fx.kernels.block_diag import block_diag_dense

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(*lead, nblocks * m, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = torch.randn(nblocks * n, m, device="cuda", generator=gen).to(dtype).requires_grad_()
    weights = torch.randn(*lead, nblocks * n, device="cuda", generator=gen)

    def f(x, w):
        return (torch.nn.functional.silu(torch.ops.lora_fx.block_diag_matmul(x, w, nblocks)).float() * weights).sum()

    def step():
        loss = torch.compile(f, backend="inductor", fullgraph=True)(x, w)
        return (loss, *torch.autograd.grad(loss, (x, w)))

    (loss, dx, dw), codes = run_and_get_code(step)
    # the Triton kernels are in Inductor's code (wrap_triton), not behind an opaque call
    assert any("_bd_fwd_kernel" in code for code in codes), "forward kernel not in the compiled code"
    assert any("_bd_wgrad_kernel" in code for code in codes), "weight-gradient kernel not in the compiled code"
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = (torch.nn.functional.silu(x64 @ block_diag_dense(w64, nblocks).t()) * weights.double()).sum()
    rdx, rdw = torch.autograd.grad(ref, (x64, w64))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    # The loss sums ~x.numel() rounded terms: its bound scales with their magnitudes, not with the sum.
    loss_scale = (torch.nn.functional.silu(x64 @ block_diag_dense(w64, nblocks).t()) * weights.double()).abs().sum()
    assert (loss.double() - ref).abs().item() <= tol * loss_scale.item(), "loss"
    for name, got, want in (("dx", dx, rdx), ("dw", dw, rdw)):
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(want.abs().max().item(), 1.0), f"{name}: max err {err}"


def test_op_bandwidth_line():
    """The op alone on a Llama-7B-shaped block-diagonal B (tokens 8192, r=16 -> 11008, 2 blocks):
    the bytes it must move over its time, beside the einsum's."""
    import lora_fx.kernels.ops  # noqa: F401
    from lora_fx.kernels.block_diag import block_diag_matmul_reference

    tokens, r, out, nb = 8192, 16, 11008, 2
    h = torch.randn(tokens, r, device="cuda")
    w = torch.randn(out, r // nb, device="cuda")
    nbytes = (h.numel() + w.numel() + tokens * out) * 4
    line = []
    for name, fn in (("op", lambda: torch.ops.lora_fx.block_diag_matmul(h, w, nb)),
                     ("einsum", lambda: block_diag_matmul_reference(h, w, nb))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 50
        line.append(f"{name} {ms:.3f} ms = {nbytes / ms / 1e6:.0f} GB/s")
    torch.testing.assert_close(torch.ops.lora_fx.block_diag_matmul(h, w, nb), block_diag_matmul_reference(h, w, nb))
    print(f"\nblock_diag_matmul {tokens}x{r} -> {tokens}x{out}, {nb} blocks, fp32: " + "; ".join(line))


@pytest.mark.parametrize("form", ["expand", "einsum", "op"])
def test_bdlora_llama_backend_matches_peft_on_cuda(form, tmp_path, monkeypatch):
    from conftest import check_grads, forward_backward, peft_adapter, peft_adapter_grads, tiny_llama, token_input
    from peft import BdLoraConfig as PeftBdLoraConfig

    import lora_fx
    from lora_fx.variants import bdlora

    monkeypatch.setattr(bdlora, "LOWERING", form)
    base = tiny_llama().to("cuda", torch.bfloat16)
    bd = PeftBdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"],
                          target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], nblocks=2)
    peft_model, path = peft_adapter(base, tmp_path, r=8, lora_alpha=16, target_modules="all-linear", use_bdlora=bd)
    x = token_input().cuda()
    expected = forward_backward(peft_model, x, lambda o: o.logits.float())
    lora = lora_fx.backend(path, inner="inductor")
    model = copy.deepcopy(base)
    lora.parameters(model)
    params = dict(lora.named_parameters())
    out = forward_backward(torch.compile(model, backend=lora, fullgraph=True), x, lambda o: o.logits.float())
    assert lora.graphs_compiled == 1
    err = (out - expected).abs().max().item()
    assert err <= 2e-2 * expected.abs().max().item(), f"logits err {err}"
    # bf16 base: every form (and PEFT against an fp32 run) is ~5% off in the worst gradient element
    check_grads(params, peft_adapter_grads(peft_model), f"bdlora cuda ({form})", rel=1e-1)
