"""DoRA's Triton ops inside Inductor graphs, and LoRA / DoRA parity with PEFT, on CUDA in bf16 (and fp32,
the tight check of the same paths).

- DoRA on a small Llama through the backend with Inductor: the graph Inductor is handed contains
  `lora_fx::dora_norm` and `lora_fx::dora_compose` (the `triton_op` path that CUDA sites take,
  `variants/dora.py`), Inductor's code contains their Triton kernels (forward and backward), and
  the logits and every adapter gradient match PEFT's DoRA on the same device and dtype (`TOL`).
- The same DoRA adapter through `transform(torch.export.export(...))` (the ops run eagerly).
- LoRA through the backend (Inductor) and through `transform(torch.export.export(...))` vs PEFT.
- The compose kernel's bandwidth: the bytes it must move over its time, against the device's peak
  HBM bandwidth (`HBM_PEAK`; issue 14's goal is >= 70 %). Printed, never asserted.

Skipped without CUDA; written for the sessions that are lent a GPU (`python -m pytest tests/gpu -q -s`:
`-s` shows the bandwidth lines). Not yet run on a GPU when written: a failure here may be the
test's own. `DEVICE` is a module constant so that the test logic can be dry-run on the CPU (with
`variants.dora.USE_OPS = "always"`: there the ops are plain custom ops and the Triton-kernel checks
are skipped).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"
# (logits, grads) tolerances: max |Δ| against PEFT over max |PEFT|. In bf16 both sides round: on the
# CPU (dry run, the same tiny Llama), PEFT bf16 and lora_fx bf16 were each up to ~1.6 % (logits) and
# ~5 % (grads, the magnitudes' sums over tokens most) from an fp64 run of the same weights, and up
# to ~7 % from each other. fp32 is the tight check of the same code paths.
TOL = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (4e-2, 1.2e-1)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])

# Peak HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name() (first match wins).
HBM_PEAK = [
    ("GH200", 4.0e12),            # 96 GB HBM3 (the 144 GB HBM3e part: 4.9e12)
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),            # "NVIDIA H100 80GB HBM3": SXM
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),           # 40 GB, SXM4 or PCIe
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
    ("RTX 4090", 1.008e12),
]


def hbm_peak(name: str) -> float | None:
    return next((peak for key, peak in HBM_PEAK if key in name), None)


def fwd_bwd(model, x):
    """Logits (fp32) after `(logits * w).sum()` was back-propagated, `w` fixed and random (every
    logit weighs differently in the gradients), on the logits' device."""
    out = model(x).logits.float()
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out * w).sum().backward()
    return out.detach()


def _close(got, want, rel, what):
    err = (got.detach().float() - want.detach().float()).abs().max().item()
    scale = want.detach().float().abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"{what}: max abs err {err:.3e} > {rel} * max|ref| ({scale:.3e})"


def _check(out, expected, named, ref_grads, dtype, what):
    logits_rel, grad_rel = TOL[dtype]
    _close(out, expected, logits_rel, f"{what}: logits")
    named = dict(named)
    assert set(named) == set(ref_grads), f"{what}: {sorted(set(named) ^ set(ref_grads))[:5]}"
    for key, p in named.items():
        assert p.grad is not None, f"{what}: no grad for {key}"
        _close(p.grad, ref_grads[key], grad_rel, f"{what}: grad of {key}")


def _reference(tmp_path, dtype, **cfg):
    """(base in `dtype` on DEVICE, its adapter dir, input, logits and adapter grads (keyed by lora_fx's
    names) of PEFT over a copy of the base with that random adapter)."""
    from conftest import peft_adapter, peft_adapter_grads, tiny_llama, token_input

    base = tiny_llama().to(DEVICE, dtype)
    peft_model, path = peft_adapter(base, tmp_path, r=8, lora_alpha=16, target_modules="all-linear", **cfg)
    x = token_input().to(DEVICE)
    expected = fwd_bwd(peft_model, x)
    return base, path, x, expected, peft_adapter_grads(peft_model)


def _through_backend(base, path, x):
    """The backend (inner: Inductor, wrapped to keep the graphs it is handed) over a copy of `base`:
    (logits, adapter params by name, captured FX graphs, Inductor's generated code)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code

    import lora_fx

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    lora = lora_fx.backend(path, inner=capture)
    model = copy.deepcopy(base)
    lora.parameters(model)
    out, codes = run_and_get_code(lambda: fwd_bwd(torch.compile(model, backend=lora, fullgraph=True), x))
    assert lora.graphs_compiled == 1 and len(graphs) == 1
    return out, dict(lora.named_parameters()), graphs, codes


@DTYPES
def test_dora_llama_through_inductor_runs_the_triton_ops_and_matches_peft(dtype, tmp_path):
    base, path, x, expected, ref_grads = _reference(tmp_path, dtype, use_dora=True)
    out, params, graphs, codes = _through_backend(base, path, x)
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"lora_fx.dora_compose.default", "lora_fx.dora_norm.default"} <= targets, \
        sorted(t for t in targets if "lora_fx" in t)
    if torch.device(DEVICE).type == "cuda":  # the Triton kernels are in Inductor's code, not behind an opaque call
        for kernel in ("_compose_fwd_kernel", "_norm_kernel", "_compose_bwd_kernel"):
            assert any(kernel in code for code in codes), f"{kernel} not in the compiled code"
    assert any(k.endswith("lora_magnitude_vector") for k in params)
    _check(out, expected, params, ref_grads, dtype, "DoRA backend")


@DTYPES
def test_dora_exported_program_matches_peft(dtype, tmp_path):
    import lora_fx

    base, path, x, expected, ref_grads = _reference(tmp_path, dtype, use_dora=True)
    ep = lora_fx.transform(torch.export.export(copy.deepcopy(base), (x,)), path, train=True)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lora_fx.dora_compose.default" in targets and "lora_fx.dora_norm.default" in targets
    module = ep.module()
    out = fwd_bwd(module, x)
    _check(out, expected, {k: module.get_parameter(k) for k in ref_grads}, ref_grads, dtype, "DoRA transform(ep)")


@DTYPES
def test_lora_backend_matches_peft(dtype, tmp_path):
    base, path, x, expected, ref_grads = _reference(tmp_path, dtype)
    out, params, _, _ = _through_backend(base, path, x)
    _check(out, expected, params, ref_grads, dtype, "LoRA backend")


@DTYPES
def test_lora_exported_program_matches_peft(dtype, tmp_path):
    import lora_fx

    base, path, x, expected, ref_grads = _reference(tmp_path, dtype)
    ep = lora_fx.transform(torch.export.export(copy.deepcopy(base), (x,)), path)
    module = ep.module()
    out = fwd_bwd(module, x)
    _check(out, expected, {k: module.get_parameter(k) for k in ref_grads}, ref_grads, dtype, "LoRA transform(ep)")


def _time_ms(fn, reps: int = 50) -> float:
    if torch.device(DEVICE).type != "cuda":
        import time

        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def test_dora_compose_bandwidth_line(tokens=8192, out_features=11008):
    """`lora_fx::dora_compose` alone (and its backward) on a Llama-7B MLP output (tokens x 11008):
    bf16 base output, fp32 adapter product (the backend's adapter dtype on a bf16 base), fp32 g,
    bf16 result. Bytes: what the kernel must read and write once; beside it, the same math as aten
    ops compiled by Inductor. Printed with the share of the device's peak HBM bandwidth."""
    import lora_fx.kernels.ops  # noqa: F401
    from lora_fx.kernels.dora import dora_compose_backward_reference, dora_compose_reference

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(tokens, out_features, generator=gen).to(DEVICE, torch.bfloat16)
    lora = torch.randn(tokens, out_features, generator=gen).to(DEVICE)
    grad = torch.randn(tokens, out_features, generator=gen).to(DEVICE, torch.bfloat16)
    g = (1 + 0.1 * torch.rand(out_features, generator=gen)).to(DEVICE)
    scale = torch.tensor(2.0, device=DEVICE)
    ops = torch.ops.lora_fx
    got = ops.dora_compose(base, lora, g, scale, None, -1)
    _close(got, dora_compose_reference(base, lora, g, scale, None, -1), 1e-2, "dora_compose")

    fwd_bytes = base.nbytes + lora.nbytes + g.nbytes + got.nbytes
    # backward: reads grad, base, lora; writes d_base (base's dtype), d_lora (lora's); d_g is per channel
    bwd_bytes = grad.nbytes + base.nbytes + lora.nbytes + base.nbytes + lora.nbytes + 2 * g.nbytes
    inductor_fwd = torch.compile(lambda: dora_compose_reference(base, lora, g, scale, None, -1))
    inductor_bwd = torch.compile(lambda: dora_compose_backward_reference(grad, base, lora, g, scale, None, -1))
    peak = hbm_peak(torch.cuda.get_device_name()) if torch.device(DEVICE).type == "cuda" else None
    lines = []
    for what, nbytes, fns in (
            ("forward", fwd_bytes, (("op", lambda: ops.dora_compose(base, lora, g, scale, None, -1)),
                                    ("inductor aten", inductor_fwd))),
            ("backward", bwd_bytes, (("op", lambda: ops.dora_compose_backward(grad, base, lora, g, scale, None, -1)),
                                     ("inductor aten", inductor_bwd)))):
        cells = []
        for name, fn in fns:
            ms = _time_ms(fn)
            rate = nbytes / (ms * 1e-3)
            share = f", {rate / peak:.0%} of peak" if peak else ""
            cells.append(f"{name} {ms:.3f} ms = {rate / 1e9:.0f} GB/s{share}")
        moved = f"{nbytes / 2**20:.0f} MiB moved"
        lines.append(f"dora_compose {what} {tokens}x{out_features} ({moved}): " + "; ".join(cells))
    device = torch.cuda.get_device_name() if torch.device(DEVICE).type == "cuda" else DEVICE
    peak_text = f"{peak / 1e12:.2f} TB/s" if peak else "unknown (add the device to HBM_PEAK)"
    print(f"\n{device}, peak HBM {peak_text}; goal: the op's forward >= 70% of peak\n" + "\n".join(lines))
