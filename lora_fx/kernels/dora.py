"""DoRA's two kernels: the compose (forward and backward) and the weight-norm assembly.

Compose, with `g` the per-output-channel magnitude scale `m / ‖W + s·B·A‖`:

    out = g ⊙ (base − bias + s·lora) + bias
        = base + (g − 1) ⊙ (base − bias) + g ⊙ s·lora          (PEFT's form)

`base` is the base layer's output (bias included), so no second base matmul is needed. Its
backward: `d_base = g ⊙ d_out`, `d_lora = s·g ⊙ d_out`, `d_g = Σ d_out ⊙ (base − bias + s·lora)`
over every position of the channel. The channel is the last dim (linear, Conv1D, embedding) or
dim 1 (conv): kernels index it as `(flat_index // inner) % channels`.

Norm assembly, all fp32, per output row `i`, from pieces computed by GEMMs that never form
`B·A` (an [out, in] tensor):

    ‖W + s·B·A‖²_i = ‖W_i‖² + 2s·Σ_j B_ij (W Aᵀ)_ij + s²·Σ_j (B (A Aᵀ))_ij B_ij

clamped below by `eps` (the norm is detached, as in the DoRA paper §4.3).

Each has a pure-torch reference (also the CPU kernel) and a Triton kernel (CUDA; on the CPU
under `TRITON_INTERPRET=1` for tests).
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional on CPU-only machines: the reference math is then the only path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI installs triton
    triton = None


# -- references ------------------------------------------------------------------------------

def channel_view(v: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against `like` along `channel_dim`."""
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return v.reshape(shape)


def dora_compose_reference(base, lora, g, scale, bias, channel_dim: int):
    gv = channel_view(g, base, channel_dim)
    inner = lora * scale
    if bias is not None:
        bv = channel_view(bias, base, channel_dim)
        return (gv * (base - bv + inner) + bv).to(base.dtype)
    return (gv * (base + inner)).to(base.dtype)


def dora_compose_backward_reference(grad, base, lora, g, scale, bias, channel_dim: int):
    gv = channel_view(g, base, channel_dim)
    grad32 = grad.float()
    d_base = (gv * grad32).to(base.dtype)
    d_lora = (gv * scale * grad32).to(lora.dtype)
    pre = base.float() + lora.float() * scale
    if bias is not None:
        pre = pre - channel_view(bias, base, channel_dim).float()
    dims = [d for d in range(base.dim()) if d != channel_dim % base.dim()]
    d_g = (grad32 * pre).sum(dims).to(g.dtype)
    return d_base, d_lora, d_g


def dora_norm_reference(wsq, b, wa, baa, scale, eps: float):
    sq = wsq + 2 * scale * (b * wa).sum(1) + scale * scale * (baa * b).sum(1)
    return sq.clamp_min(0).sqrt().clamp_min(eps)


# -- triton kernels --------------------------------------------------------------------------

def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _compose_fwd_kernel(base_ptr, lora_ptr, g_ptr, bias_ptr, scale_ptr, out_ptr, n, channels, inner,
                            HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        c = (offs // inner) % channels
        base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lora = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
            out = g * (base - bias + s * lora) + bias
        else:
            out = g * (base + s * lora)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _compose_bwd_kernel(grad_ptr, base_ptr, lora_ptr, g_ptr, bias_ptr, scale_ptr, d_base_ptr, d_lora_ptr,
                            d_g_ptr, n, channels, inner, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        c = (offs // inner) % channels
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lora = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + c, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr).to(tl.float32)
        pre = base + s * lora
        if HAS_BIAS:
            pre = pre - tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(d_base_ptr + offs, (g * grad).to(d_base_ptr.dtype.element_ty), mask=mask)
        tl.store(d_lora_ptr + offs, (g * s * grad).to(d_lora_ptr.dtype.element_ty), mask=mask)
        # Per-channel partial sums land in an fp32 buffer; one atomic per element of the block.
        tl.atomic_add(d_g_ptr + c, grad * pre, mask=mask)

    @triton.jit
    def _norm_kernel(wsq_ptr, b_ptr, wa_ptr, baa_ptr, scale_ptr, out_ptr, rows, r, eps,
                     BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
        rows_idx = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_R)
        row_mask = rows_idx < rows
        mask = row_mask[:, None] & (cols[None, :] < r)
        idx = rows_idx[:, None] * r + cols[None, :]
        b = tl.load(b_ptr + idx, mask=mask, other=0.0)
        wa = tl.load(wa_ptr + idx, mask=mask, other=0.0)
        baa = tl.load(baa_ptr + idx, mask=mask, other=0.0)
        wsq = tl.load(wsq_ptr + rows_idx, mask=row_mask, other=0.0)
        s = tl.load(scale_ptr)
        sq = wsq + 2.0 * s * tl.sum(b * wa, axis=1) + s * s * tl.sum(baa * b, axis=1)
        norm = tl.maximum(tl.sqrt(tl.maximum(sq, 0.0)), eps)
        tl.store(out_ptr + rows_idx, norm, mask=row_mask)


_BLOCK = 1024


def _launch(kernel):
    """`wrap_triton(kernel)` so Inductor can see inside the op; the raw kernel when interpreting
    on the CPU (the interpreter's kernels are not JITFunctions)."""
    if interpreting():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _channels(x: torch.Tensor, channel_dim: int) -> tuple[int, int]:
    dim = channel_dim % x.dim()
    inner = 1
    for size in x.shape[dim + 1:]:
        inner *= size
    return x.shape[dim], inner


def dora_compose_triton(base, lora, g, scale, bias, channel_dim: int):
    base, lora = base.contiguous(), lora.contiguous()
    out = torch.empty_like(base)
    n = base.numel()
    channels, inner = _channels(base, channel_dim)
    grid = (triton.cdiv(n, _BLOCK),)
    _launch(_compose_fwd_kernel)[grid](base, lora, g.contiguous(), bias if bias is not None else g, scale, out, n,
                                       channels, inner, HAS_BIAS=bias is not None, BLOCK=_BLOCK)
    return out


def dora_compose_backward_triton(grad, base, lora, g, scale, bias, channel_dim: int):
    grad, base, lora = grad.contiguous(), base.contiguous(), lora.contiguous()
    d_base = torch.empty_like(base)
    d_lora = torch.empty_like(lora)
    d_g = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
    n = base.numel()
    channels, inner = _channels(base, channel_dim)
    grid = (triton.cdiv(n, _BLOCK),)
    _launch(_compose_bwd_kernel)[grid](grad, base, lora, g.contiguous(), bias if bias is not None else g, scale,
                                       d_base, d_lora, d_g, n, channels, inner, HAS_BIAS=bias is not None,
                                       BLOCK=_BLOCK)
    return d_base, d_lora, d_g.to(g.dtype)


def dora_norm_triton(wsq, b, wa, baa, scale, eps: float):
    rows, r = b.shape
    out = torch.empty(rows, dtype=torch.float32, device=b.device)
    block_rows = 32
    grid = (triton.cdiv(rows, block_rows),)
    _launch(_norm_kernel)[grid](wsq.contiguous(), b.contiguous(), wa.contiguous(), baa.contiguous(), scale, out,
                                rows, r, eps, BLOCK_ROWS=block_rows, BLOCK_R=triton.next_power_of_2(r))
    return out
