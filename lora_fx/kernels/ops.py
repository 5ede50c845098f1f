"""Every lora_fx custom op, registered through `torch.library` under the `lora_fx::` namespace.

- `dora_compose(Tensor base, Tensor lora, Tensor g, Tensor scale, Tensor? bias, int channel_dim) -> Tensor`
- `dora_compose_backward(Tensor grad, Tensor base, Tensor lora, Tensor g, Tensor scale, Tensor? bias,
  int channel_dim) -> (Tensor, Tensor, Tensor)`
- `dora_norm(Tensor wsq, Tensor b, Tensor wa, Tensor baa, Tensor scale, float eps) -> Tensor`

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

from . import dora

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
