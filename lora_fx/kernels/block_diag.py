"""The block-diagonal product of BdLoRA: `y = x · blockdiag(W_0, …, W_{nb-1})ᵀ`.

Storage is PEFT's compact one: `w` is (nb·n, m), the blocks `W_i = w[i·n:(i+1)·n]` stacked on dim 0;
`x` is (..., nb·m). Block `i` maps the `i`-th m-wide slice of the input to the `i`-th n-wide slice of
the output, nothing else:

    y[..., i·n + j] = Σ_k x[..., i·m + k] · w[i·n + j, k]

Backward: `dx = block_diag_matmul(dy, wᵀ per block)` (the same op over the blocks transposed,
(nb·m, n)), and `dw[i·n + j, k] = Σ_t dy[t, i·n + j] · x[t, i·m + k]`
(`block_diag_matmul_weight_grad`), both with no block ever expanded to the dense
(nb·n, nb·m) matrix.

Each has a pure-torch reference (also the CPU kernel: PEFT's `einsum` over (tokens, nb, m)) and a
Triton kernel (CUDA; on the CPU under `TRITON_INTERPRET=1` for tests). The Triton forward is a
GEMM per (token tile, block, output tile) that reads `x` in place and writes `y` in its final
layout, so neither side is transposed into a (nb, tokens, ·) copy as a batched matmul needs; the
weight gradient splits the token reduction over programs into fp32 partials (summed afterwards:
deterministic, no atomics). Accumulation is fp32; fp32 inputs use IEEE products (no TF32), as
PyTorch's default matmul does.
"""

from __future__ import annotations

import torch

from .dora import _launch, interpreting, triton_available

try:  # triton is optional on CPU-only machines: the reference math is then the only path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI installs triton
    triton = None


# -- references ------------------------------------------------------------------------------

def block_sizes(x_last: int, w: torch.Tensor, nblocks: int) -> tuple[int, int]:
    """(n, m): the output and input width of one block. Raises ValueError naming the sizes when
    `x`'s last dim, `w` and `nblocks` do not describe a block-diagonal product."""
    if nblocks <= 0 or w.dim() != 2 or w.shape[0] % nblocks or x_last != nblocks * w.shape[1]:
        raise ValueError(f"block_diag_matmul: input width {x_last} and weight {tuple(w.shape)} do not form "
                         f"{nblocks} diagonal blocks (the weight must be (nblocks·n, m) and the input width nblocks·m)")
    return w.shape[0] // nblocks, w.shape[1]


def block_diag_matmul_reference(x: torch.Tensor, w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """`x · blockdiag(w)ᵀ`, as PEFT's `BlockDiagonalLinear` computes it (one einsum)."""
    n, m = block_sizes(x.shape[-1], w, nblocks)
    lead = x.shape[:-1]
    out = torch.einsum("bim,inm->bin", x.reshape(-1, nblocks, m), w.view(nblocks, n, m))
    return out.reshape(*lead, nblocks * n)


def block_diag_matmul_weight_grad_reference(grad: torch.Tensor, x: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The gradient of `block_diag_matmul(x, w, nblocks)` with respect to `w` (compact layout)."""
    m = x.shape[-1] // nblocks
    n = grad.shape[-1] // nblocks
    dw = torch.einsum("bin,bim->inm", grad.reshape(-1, nblocks, n), x.reshape(-1, nblocks, m))
    return dw.reshape(nblocks * n, m)


def block_transpose(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """Each block transposed, compact layout: (nb·n, m) -> (nb·m, n)."""
    n, m = w.shape[0] // nblocks, w.shape[1]
    return w.view(nblocks, n, m).transpose(1, 2).reshape(nblocks * m, n)


def block_diag_dense(w: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The compact (nb·n, m) factor as the dense (nb·n, nb·m) block-diagonal matrix (merging)."""
    return torch.block_diag(*w.chunk(nblocks, dim=0))


# -- triton kernels --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _bd_fwd_kernel(x_ptr, w_ptr, out_ptr, tokens, n, m, nblocks, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        blk = tl.program_id(1)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        t_mask = offs_t < tokens
        n_mask = offs_n < n
        # int64 row offsets: tokens x width can pass 2^31 elements
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * (nblocks * m) + blk * m
        w_cols = w_ptr + (blk * n + offs_n)[None, :] * m
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, m, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < m
            xt = tl.load(x_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            if IEEE:
                acc += tl.dot(xt, wt, input_precision="ieee")
            else:
                acc += tl.dot(xt, wt)
        out = out_ptr + offs_t.to(tl.int64)[:, None] * (nblocks * n) + blk * n + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _bd_wgrad_kernel(g_ptr, x_ptr, part_ptr, tokens, n, m, nblocks, k_tiles, tokens_per_split,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        tile = tl.program_id(0)
        blk = tl.program_id(1)
        split = tl.program_id(2)
        offs_n = (tile // k_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = (tile % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = offs_n < n
        k_mask = offs_k < m
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        start = split * tokens_per_split
        for t0 in range(start, start + tokens_per_split, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < tokens
            rows = offs_t.to(tl.int64)
            # dyᵀ tile (BLOCK_N, BLOCK_T) loaded transposed; x tile (BLOCK_T, BLOCK_K)
            gt = tl.load(g_ptr + rows[None, :] * (nblocks * n) + blk * n + offs_n[:, None],
                         mask=n_mask[:, None] & t_mask[None, :], other=0.0)
            xt = tl.load(x_ptr + rows[:, None] * (nblocks * m) + blk * m + offs_k[None, :],
                         mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                gt, xt = gt.to(tl.float32), xt.to(tl.float32)
            if IEEE:
                acc += tl.dot(gt, xt, input_precision="ieee")
            else:
                acc += tl.dot(gt, xt)
        part = part_ptr + split * (nblocks * n * m) + (blk * n + offs_n)[:, None] * m + offs_k[None, :]
        tl.store(part, acc, mask=n_mask[:, None] & k_mask[None, :])


def _precision(dtype: torch.dtype) -> dict:
    # IEEE: fp32 products without TF32 (PyTorch's default matmul precision). UPCAST: Triton's CPU
    # interpreter computes bf16/fp16 `tl.dot` wrongly (garbage values, triton 3.9), so interpreted runs
    # multiply the tiles in fp32; a half-precision product is exact in fp32 and both accumulate in
    # fp32, so the result is the one the GPU's half-precision dot gives up to summation order.
    up = interpreting()
    return dict(IEEE=up or dtype == torch.float32, UPCAST=up)


def _tile(size: int, cap: int = 64) -> int:
    # tl.dot needs every tile dimension >= 16
    return max(16, min(cap, triton.next_power_of_2(size)))


def block_diag_matmul_triton(x: torch.Tensor, w: torch.Tensor, nblocks: int) -> torch.Tensor:
    n, m = block_sizes(x.shape[-1], w, nblocks)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, nblocks * m).contiguous()
    tokens = x2.shape[0]
    out = torch.empty((tokens, nblocks * n), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out.reshape(*lead, nblocks * n)
    block_t, block_n, block_k = 64, _tile(n), _tile(m)
    grid = (triton.cdiv(tokens, block_t), nblocks, triton.cdiv(n, block_n))
    _launch(_bd_fwd_kernel)[grid](x2, w.contiguous(), out, tokens, n, m, nblocks, **_precision(x.dtype),
                                  BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.reshape(*lead, nblocks * n)


def block_diag_matmul_weight_grad_triton(grad: torch.Tensor, x: torch.Tensor, nblocks: int) -> torch.Tensor:
    m = x.shape[-1] // nblocks
    n = grad.shape[-1] // nblocks
    g2 = grad.reshape(-1, nblocks * n).contiguous()
    x2 = x.reshape(-1, nblocks * m).contiguous()
    tokens = x2.shape[0]
    block_t, block_n, block_k = 64, _tile(n), _tile(m)
    n_tiles, k_tiles = triton.cdiv(n, block_n), triton.cdiv(m, block_k)
    t_tiles = max(1, triton.cdiv(tokens, block_t))
    # Enough programs to fill the device (~128 per weight), each summing a contiguous token range.
    splits = min(t_tiles, max(1, 128 // (n_tiles * k_tiles * nblocks)))
    tokens_per_split = triton.cdiv(t_tiles, splits) * block_t
    splits = max(1, triton.cdiv(tokens, tokens_per_split))
    part = torch.empty((splits, nblocks * n, m), dtype=torch.float32, device=x.device)
    grid = (n_tiles * k_tiles, nblocks, splits)
    _launch(_bd_wgrad_kernel)[grid](g2, x2, part, tokens, n, m, nblocks, k_tiles, tokens_per_split,
                                    **_precision(x.dtype), BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k)
    return part.sum(0).to(x.dtype)


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# -- registration (called once by kernels/ops.py with its `_define`) --------------------------

def register(define):
    """Define `lora_fx::block_diag_matmul` and `lora_fx::block_diag_matmul_weight_grad` with
    `define(name, triton_impl, reference)` (ops.py's device-aware definer), their fake impls
    (which check the shapes) and the autograd of the product. Returns the two ops."""

    def _fwd(x: torch.Tensor, w: torch.Tensor, nblocks: int) -> torch.Tensor:
        if x.dtype not in TRITON_DTYPES:  # the kernels accumulate in fp32: fp64 takes the reference
            return block_diag_matmul_reference(x, w, nblocks).contiguous()
        return block_diag_matmul_triton(x, w, nblocks)

    def _fwd_ref(x: torch.Tensor, w: torch.Tensor, nblocks: int) -> torch.Tensor:
        return block_diag_matmul_reference(x, w, nblocks).contiguous()

    matmul = define("block_diag_matmul", _fwd, _fwd_ref)

    @matmul.register_fake
    def _(x, w, nblocks):
        _check_fake(x, w, nblocks, "block_diag_matmul")
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    def _wgrad(grad: torch.Tensor, x: torch.Tensor, nblocks: int) -> torch.Tensor:
        if x.dtype not in TRITON_DTYPES:
            return block_diag_matmul_weight_grad_reference(grad, x, nblocks).contiguous()
        return block_diag_matmul_weight_grad_triton(grad, x, nblocks)

    def _wgrad_ref(grad: torch.Tensor, x: torch.Tensor, nblocks: int) -> torch.Tensor:
        return block_diag_matmul_weight_grad_reference(grad, x, nblocks).contiguous()

    weight_grad = define("block_diag_matmul_weight_grad", _wgrad, _wgrad_ref)

    @weight_grad.register_fake
    def _(grad, x, nblocks):
        torch._check(nblocks > 0 and x.shape[-1] % nblocks == 0 and grad.shape[-1] % nblocks == 0,
                     lambda: f"lora_fx::block_diag_matmul_weight_grad: widths {grad.shape[-1]} (grad) and "
                             f"{x.shape[-1]} (input) are not multiples of nblocks={nblocks}")
        torch._check(grad.dtype == x.dtype, lambda: f"lora_fx::block_diag_matmul_weight_grad: grad {grad.dtype} "
                                                    f"and input {x.dtype} differ")
        torch._check(grad.shape[:-1] == x.shape[:-1],
                     lambda: f"lora_fx::block_diag_matmul_weight_grad: grad {tuple(grad.shape)} and input "
                             f"{tuple(x.shape)} differ in their leading dims")
        return x.new_empty((grad.shape[-1], x.shape[-1] // nblocks))

    def _setup(ctx, inputs, output):
        x, w, nblocks = inputs
        ctx.save_for_backward(x, w)
        ctx.nblocks = nblocks

    def _backward(ctx, grad):
        x, w = ctx.saved_tensors
        d_x = d_w = None
        if ctx.needs_input_grad[0]:
            d_x = torch.ops.lora_fx.block_diag_matmul(grad, block_transpose(w, ctx.nblocks), ctx.nblocks)
        if ctx.needs_input_grad[1]:
            d_w = torch.ops.lora_fx.block_diag_matmul_weight_grad(grad, x, ctx.nblocks)
        return d_x, d_w, None

    matmul.register_autograd(_backward, setup_context=_setup)
    return matmul, weight_grad


def _check_fake(x, w, nblocks: int, name: str) -> None:
    torch._check(w.dim() == 2 and nblocks > 0 and w.shape[0] % nblocks == 0,
                 lambda: f"lora_fx::{name}: weight {tuple(w.shape)} is not (nblocks·n, m) for nblocks={nblocks}")
    torch._check(x.shape[-1] == nblocks * w.shape[1],
                 lambda: f"lora_fx::{name}: input width {x.shape[-1]} is not nblocks·m = {nblocks}·{w.shape[1]} "
                         f"for weight {tuple(w.shape)}")
    torch._check(x.dtype == w.dtype, lambda: f"lora_fx::{name}: input {x.dtype} and weight {w.dtype} differ")


__all__ = ["block_diag_dense", "block_diag_matmul_reference", "block_diag_matmul_triton",
           "block_diag_matmul_weight_grad_reference", "block_diag_matmul_weight_grad_triton", "block_transpose",
           "register", "triton_available"]
