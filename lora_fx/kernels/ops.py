"""Every lora_fx custom op, registered through `torch.library` under the `lora_fx::` namespace.

- `dora_compose(Tensor base, Tensor lora, Tensor g, Tensor scale, Tensor? bias, int channel_dim) -> Tensor`
- `dora_compose_backward(Tensor grad, Tensor base, Tensor lora, Tensor g, Tensor scale, Tensor? bias,
  int channel_dim) -> (Tensor, Tensor, Tensor)`
- `dora_norm(Tensor wsq, Tensor b, Tensor wa, Tensor baa, Tensor scale, float eps) -> Tensor`
- `block_diag_matmul(Tensor x, Tensor w, int nblocks) -> Tensor` and
  `block_diag_matmul_weight_grad(Tensor grad, Tensor x, int nblocks) -> Tensor`: BdLoRA's
  block-diagonal product and its weight gradient (`kernels/block_diag.py`, which registers them
  through `_define` below).
- `lora_shrink(Tensor x, Tensor a, Tensor scale, Tensor index) -> Tensor`,
  `lora_expand(Tensor y, Tensor h, Tensor b, Tensor index) -> Tensor` and
  `lora_row_weight_grad(Tensor grad, Tensor x, Tensor index, int num_slots) -> Tensor`: per-row LoRA
  for mixed-adapter batches (each token picks an adapter of a bank by `index`, -1 for none) and the
  per-slot gradient of a bank (`kernels/row_lora.py`, registered through `_define` too; their CPU
  kernel is a GEMM per slot over the rows sorted by slot, not the gather reference).
- `gemm_4bit(...)`: bitsandbytes' `gemm_4bit` (same schema) with the gradient of its input, for
  QLoRA bases traced without gradients (see its section below; no Triton kernel: the compute is
  bitsandbytes').
- `addmm_(Tensor(a!) y, Tensor h, Tensor bt) -> ()`: `y += h·bt` in place, LoRA's accumulation into the
  base output in inference graphs on the CPU (its section below; ATen's GEMM is the kernel on every
  device, no autograd: inference only).

Each op: a Triton kernel through `triton_op` + `wrap_triton` (so Inductor sees inside it on CUDA),
the pure-torch reference as its CPU kernel, a fake impl, and autograd (`dora_compose` through
`dora_compose_backward`; `dora_norm` is detached by design: no gradient flows through it). The
math and the kernels live in `kernels/dora.py`; `tests/test_kernels.py` runs `opcheck` on each
and the Triton kernels under `TRITON_INTERPRET=1` against the references.

Graphs use these ops at CUDA sites only: a `triton_op` graph cannot compile on a machine without a
GPU driver, so CPU sites emit the reference math as aten ops (see `variants/dora.py`).
"""

from __future__ import annotations

import torch

from . import block_diag, dora, row_lora

# triton_op needs a GPU driver to run what it traces: on a machine without CUDA the ops are plain
# custom ops over the reference math (the Triton kernels are still tested, in the interpreter).
_TRITON = dora.triton_available() and torch.cuda.is_available()


def _define(name: str, triton_impl, reference):
    if _TRITON:
        op = torch.library.triton_op(f"lora_fx::{name}", triton_impl, mutates_args=())
        op.register_kernel("cpu", reference)
    else:
        op = torch.library.custom_op(f"lora_fx::{name}", reference, mutates_args=())
    return op


# -- dora_compose ------------------------------------------------------------------------------

def _compose(base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    return dora.dora_compose_triton(base, lora, g, scale, bias, channel_dim)


def _compose_ref(base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    return dora.dora_compose_reference(base, lora, g, scale, bias, channel_dim).contiguous()


dora_compose = _define("dora_compose", _compose, _compose_ref)


@dora_compose.register_fake
def _(base, lora, g, scale, bias, channel_dim):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


# -- dora_compose_backward ---------------------------------------------------------------------

def _compose_bwd(grad: torch.Tensor, base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dora.dora_compose_backward_triton(grad, base, lora, g, scale, bias, channel_dim)


def _compose_bwd_ref(grad: torch.Tensor, base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor,
                     scale: torch.Tensor, bias: torch.Tensor | None,
                     channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_base, d_lora, d_g = dora.dora_compose_backward_reference(grad, base, lora, g, scale, bias, channel_dim)
    return d_base.contiguous(), d_lora.contiguous(), d_g.contiguous()


dora_compose_backward = _define("dora_compose_backward", _compose_bwd, _compose_bwd_ref)


@dora_compose_backward.register_fake
def _(grad, base, lora, g, scale, bias, channel_dim):
    return (torch.empty_like(base, memory_format=torch.contiguous_format),
            torch.empty_like(lora, memory_format=torch.contiguous_format),
            torch.empty_like(g, memory_format=torch.contiguous_format))


def _compose_setup(ctx, inputs, output):
    base, lora, g, scale, bias, channel_dim = inputs
    ctx.save_for_backward(base, lora, g, scale, bias)
    ctx.channel_dim = channel_dim
    ctx.has_bias = bias is not None


def _compose_backward(ctx, grad):
    base, lora, g, scale, bias = ctx.saved_tensors
    d_base, d_lora, d_g = torch.ops.lora_fx.dora_compose_backward(grad, base, lora, g, scale, bias,
                                                                  ctx.channel_dim)
    d_bias = None
    if ctx.has_bias and ctx.needs_input_grad[4]:  # a trainable base bias (bias="all" / "lora_only")
        dims = [d for d in range(grad.dim()) if d != ctx.channel_dim % grad.dim()]
        d_bias = (grad.float().sum(dims) * (1 - g.float())).to(bias.dtype)
    return d_base, d_lora, d_g, None, d_bias, None


dora_compose.register_autograd(_compose_backward, setup_context=_compose_setup)


# -- dora_norm ---------------------------------------------------------------------------------

def _norm(wsq: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, baa: torch.Tensor, scale: torch.Tensor,
          eps: float) -> torch.Tensor:
    return dora.dora_norm_triton(wsq, b, wa, baa, scale, eps)


def _norm_ref(wsq: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, baa: torch.Tensor, scale: torch.Tensor,
              eps: float) -> torch.Tensor:
    return dora.dora_norm_reference(wsq, b, wa, baa, scale, eps)


dora_norm = _define("dora_norm", _norm, _norm_ref)


@dora_norm.register_fake
def _(wsq, b, wa, baa, scale, eps):
    return b.new_empty((b.shape[0],), dtype=torch.float32)


def _norm_setup(ctx, inputs, output):
    pass


def _norm_backward(ctx, grad):
    return None, None, None, None, None, None  # detached by design (DoRA §4.3)


dora_norm.register_autograd(_norm_backward, setup_context=_norm_setup)


# -- block_diag_matmul, block_diag_matmul_weight_grad (BdLoRA) ------------------------------------

block_diag_matmul, block_diag_matmul_weight_grad = block_diag.register(_define)


# -- lora_shrink, lora_expand, lora_row_weight_grad (mixed-adapter batches) -------------------------

lora_shrink, lora_expand, lora_row_weight_grad = row_lora.register(_define)


# -- gemm_4bit -----------------------------------------------------------------------------------
# bitsandbytes' 4-bit matmul with the gradient of its input. bitsandbytes calls its own op
# `bitsandbytes::gemm_4bit`, which has no autograd formula, whenever the input does not require
# grad, and adds the gradient through an autograd.Function otherwise. Dynamo traces the base model
# before lora_fx adds adapters, when no activation requires grad: every 4-bit matmul is then the
# gradient-less op, and the adapters upstream of it would get no (or a wrong) gradient. The
# backend swaps those calls for this op (`passes/differentiate_base_ops.py`). Forward: the very same
# bitsandbytes kernel (bit-identical); backward: bitsandbytes' own rule, dA = dY · dequantize(B).
# There is no Triton kernel: the compute is bitsandbytes'.

_GEMM_4BIT_SCHEMA = ("(Tensor A, Tensor B, int[] shapeB, Tensor absmax, int blocksize, str quant_type, "
                     "Tensor? bias=None, Tensor? absmax_8bit=None, Tensor? absmax_code=None, "
                     "Tensor? absmax_offset=None) -> Tensor")


def _gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
               absmax_offset=None):
    nested = {} if absmax_8bit is None else dict(absmax_8bit=absmax_8bit, absmax_code=absmax_code,
                                                 absmax_offset=absmax_offset)
    return torch.ops.bitsandbytes.gemm_4bit.default(A, B, shapeB, absmax, blocksize, quant_type, bias=bias, **nested)


gemm_4bit = torch.library.custom_op("lora_fx::gemm_4bit", _gemm_4bit, mutates_args=(), schema=_GEMM_4BIT_SCHEMA)


@gemm_4bit.register_fake
def _(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
      absmax_offset=None):
    torch._check(len(shapeB) == 2, lambda: f"lora_fx::gemm_4bit: shapeB must be [N, K], got {list(shapeB)}")
    torch._check(A.shape[-1] == shapeB[1],
                 lambda: f"lora_fx::gemm_4bit: the input's last dim {A.shape[-1]} is not K={shapeB[1]}")
    torch._check(bias is None or tuple(bias.shape) == (shapeB[0],),
                 lambda: f"lora_fx::gemm_4bit: bias of shape {tuple(bias.shape)} for N={shapeB[0]}")
    return A.new_empty((*A.shape[:-1], shapeB[0]))


def dequantize_4bit_weight(B, shapeB, absmax, blocksize, quant_type, dtype, absmax_8bit=None, absmax_code=None,
                           absmax_offset=None) -> torch.Tensor:
    """The (N, K) weight a `gemm_4bit` call multiplies by, in `dtype`. With nested statistics
    (`absmax_8bit`: bitsandbytes' double quantization) `absmax` are the second-level scales of
    the 8-bit first-level ones, in blocks of 256."""
    if absmax_8bit is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code, 256,
                                                                     torch.float32) + absmax_offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, quant_type, list(shapeB), dtype)


def _gemm_4bit_setup(ctx, inputs, output):
    A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset = inputs
    ctx.save_for_backward(B, absmax, absmax_8bit, absmax_code, absmax_offset)
    ctx.meta = (list(shapeB), blocksize, quant_type)
    # A trainable base bias (bias="all"); read here, as needs_input_grad may not list defaulted args.
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _gemm_4bit_backward(ctx, grad):
    B, absmax, absmax_8bit, absmax_code, absmax_offset = ctx.saved_tensors
    shapeB, blocksize, quant_type = ctx.meta
    d_a = d_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_4bit_weight(B, shapeB, absmax, blocksize, quant_type, grad.dtype, absmax_8bit,
                                        absmax_code, absmax_offset)
        d_a = torch.matmul(grad, weight)
    if ctx.bias_needs_grad:
        d_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return d_a, None, None, None, None, None, d_bias, None, None, None


gemm_4bit.register_autograd(_gemm_4bit_backward, setup_context=_gemm_4bit_setup)


# -- addmm_ (in-place accumulation, inference graphs on the CPU) ---------------------------------
# `y += h·bt` in place, for LoRA's inference form in the backend's (Dynamo) graphs on the CPU, where
# the adapter's second GEMM accumulates into the base output. ATen's out-of-place `addmm` first copies
# its accumulator into the result: one read and one write of an output-sized tensor per adapted
# linear, ~7 % of a compiled Llama forward (docs/performance.md, issue 14 goal 1). In place, ATen's
# CPU addmm skips that copy, and Inductor re-inplaces the functionalized op onto the base GEMM's own
# buffer. The caller guarantees that nothing else reads `y` (`SiteCall.base_exclusive`).
#
# Defined through `torch.library.Library` with a plain Python kernel: the dispatcher calls it in ~5 us
# where `custom_op`'s wrapper took ~20 us per call (measured: the gain is lost in the wrapper). The
# kernel is ATen's own in-place GEMM on every device (MKL / cuBLAS): a Triton GEMM would be a
# slower copy of it. No autograd formula: graphs that differentiate keep the out-of-place form, and
# calling it on tensors that require grad raises autograd's "not implemented" error in backward.

_LIB = torch.library.Library("lora_fx", "FRAGMENT")
_LIB.define("addmm_(Tensor(a!) y, Tensor h, Tensor bt) -> ()")


def addmm_reference(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """What `lora_fx::addmm_` leaves in `y` (out of place)."""
    return y + h @ bt


def _check_addmm_shapes(y, h, bt) -> None:
    torch._check(y.dim() == 2 and h.dim() == 2 and bt.dim() == 2,
                 lambda: f"lora_fx::addmm_: 2-D tensors expected, got y {tuple(y.shape)}, h {tuple(h.shape)}, "
                         f"bt {tuple(bt.shape)}")
    torch._check(h.shape[0] == y.shape[0] and h.shape[1] == bt.shape[0] and bt.shape[1] == y.shape[1],
                 lambda: f"lora_fx::addmm_: y {tuple(y.shape)} += h {tuple(h.shape)} · bt {tuple(bt.shape)} "
                         "does not multiply")
    torch._check(y.dtype == h.dtype == bt.dtype,
                 lambda: f"lora_fx::addmm_: one dtype expected, got y {y.dtype}, h {h.dtype}, bt {bt.dtype}")


def _addmm_inplace(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor) -> None:
    _check_addmm_shapes(y, h, bt)
    y.addmm_(h, bt)


def _addmm_fake(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor) -> None:
    _check_addmm_shapes(y, h, bt)


_LIB.impl("addmm_", _addmm_inplace, "CompositeExplicitAutograd")
torch.library.register_fake("lora_fx::addmm_", _addmm_fake, lib=_LIB)
addmm_ = torch.ops.lora_fx.addmm_.default
