"""DoRA (weight-decomposed LoRA, `use_dora=True`): magnitude times direction.

    out = base(x) + (g − 1) ⊙ (base(x) − bias) + g ⊙ s·B(A(x)),   g = m / ‖W + s·B·A‖

per output channel (Linear / Conv1D rows, Conv output channels over all other dims, Embedding
columns, as PEFT does), with the norm computed in fp32, detached, clamped below by eps (1e-12;
1e-6 for half-precision weights), and never from a materialised `B·A`:
`‖W + sBA‖² = ‖W‖² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B)` — the largest tensor the
norm path creates is [out, r]. Grouped convs are the exception: there PEFT normalises `W + s·Δ`
with Δ its reshape of the flattened B times A across channel groups (not `B·A`, which has no
grouped form); the kind builds that Δ (`LayerKind.dora_norm_delta`, the grouped weight's size)
and the norm is taken of the sum, as PEFT does (docs/dora.md). The base output is reused (its
bias subtracted); only with adapter dropout in training does PEFT's form need the base applied
to the dropped input, and then that is what we compute.

Lowering is device-aware: CUDA sites call `lora_fx::dora_norm` / `lora_fx::dora_compose` (Triton);
CPU sites emit the same math as aten ops (Inductor fuses it; `triton_op` graphs need a GPU driver).

Tensors (PEFT's keys): LoRA's, plus `lora_magnitude_vector` of shape (out,) — (1, out, 1, …) for
convs, (embedding_dim,) for embeddings — initialised to the norm the graph computes (`‖W + s·B·A‖`;
grouped convs: `‖W + s·Δ‖`) of the base weight.
"""

from __future__ import annotations

import torch

from ..config import LoraConfig
from ..errors import UnsupportedFeatureError
from ..kernels import ops as _ops  # noqa: F401  (registers the lora_fx:: ops)
from ..layers import LayerInfo
from ..rules import Resolved
from . import register
from .base import SiteCall, TensorSpec
from .lora import LoraVariant, params_dtype

aten = torch.ops.aten
MAGNITUDE = "lora_magnitude_vector"

# "auto": Triton ops at CUDA sites, aten math elsewhere; "always" / "never" force one (tests).
USE_OPS = "auto"


def norm_eps(weight_dtype: torch.dtype) -> float:
    return 1e-6 if weight_dtype in (torch.float16, torch.bfloat16) else 1e-12


def channel_dim(layer: LayerInfo) -> int:
    return layer.kind.output_channel_dim


class DoraVariant(LoraVariant):
    name = "dora"
    fallback = False
    needs_base_weight = True
    zero_neutral = False  # a zero magnitude zeroes the output; an absent adapter's rows take the base output

    def claims(self, cfg: LoraConfig) -> bool:
        return bool(cfg.use_dora)

    def tensors(self, res: Resolved, cfg: LoraConfig) -> dict[str, TensorSpec]:
        specs = super().tensors(res, cfg)
        specs[MAGNITUDE] = TensorSpec(res.layer.kind.magnitude_shape(res.layer))
        return specs

    def init_from_base(self, tensors, weight, res: Resolved, cfg: LoraConfig) -> None:
        kind = res.layer.kind
        factors = [tensors[k].detach() for k in kind.factor_keys()]
        w = kind.rows(weight).float()
        # The same tensor the graph's norm adds to W (see `_norm`), so a fresh adapter has g = 1.
        delta = kind.dora_norm_delta(_eager, res.layer, *(f.float() for f in factors), res.r)
        if delta is None:
            a, b = kind.factor_matrices(*factors)
            delta = b.float() @ a.float()
        norm = (w + res.scaling * delta).norm(dim=1)
        tensors[MAGNITUDE].copy_(norm.view(tensors[MAGNITUDE].shape))

    # -- graph -----------------------------------------------------------------------------------
    def emit(self, b, site: SiteCall, res: Resolved, cfg: LoraConfig, params, scale):
        layer = site.layer
        if site.weight is None:
            raise UnsupportedFeatureError(f"{layer.name}: DoRA needs the base weight as a graph value at this call")
        out_dtype = b.dtype_of(site.base_out, layer.weight_dtype)
        adapter_dtype = params_dtype(params)
        use_ops = USE_OPS == "always" or (USE_OPS == "auto" and layer.weight_device.startswith("cuda"))

        norm = self._norm(b, site, params, scale, use_ops, res.r)
        magnitude = b.call(aten.reshape.default, params[MAGNITUDE], [-1])
        g = b.call(aten.div.Tensor, magnitude, norm)

        dropped = site.training and cfg.lora_dropout > 0 and not layer.kind.lookup
        x = site.x
        if not layer.kind.lookup:
            x = b.cast(site.x, adapter_dtype, b.dtype_of(site.x, layer.weight_dtype))
            if dropped:
                x = b.call(aten.dropout.default, x, float(cfg.lora_dropout), True)
        lora = self.adapter_product(b, layer, x, params)         # B(A(x)), unscaled, adapter dtype

        if dropped:
            # PEFT's training-with-dropout form: the base applied to the dropped input, no bias.
            x_base = b.cast(x, b.dtype_of(site.x, layer.weight_dtype), adapter_dtype)
            base_drop = layer.kind.apply_base(b, layer, x_base, site.weight)
            g_v = layer.kind.channel_of_output(b, g, site.base_out)
            g_1 = b.call(aten.sub.Tensor, g_v, 1)
            term = b.call(aten.add.Tensor, b.call(aten.mul.Tensor, g_1, base_drop),
                          b.call(aten.mul.Tensor, g_v, b.call(aten.mul.Tensor, lora, scale)))
            out = b.call(aten.add.Tensor, site.base_out, term)
            return b.cast(out, out_dtype, b.dtype_of(out, out_dtype))
        if use_ops:
            return b.call(torch.ops.lora_fx.dora_compose.default, site.base_out, lora, g, scale, site.bias,
                          channel_dim(layer))
        # Reference math as aten ops: out = g ⊙ (base − bias + s·lora) + bias.
        g_v = layer.kind.channel_of_output(b, g, site.base_out)
        pre = b.call(aten.add.Tensor, site.base_out, b.call(aten.mul.Tensor, lora, scale))
        if site.bias is not None:
            bias_v = layer.kind.channel_of_output(b, site.bias, site.base_out)
            pre = b.call(aten.sub.Tensor, pre, bias_v)
            out = b.call(aten.add.Tensor, b.call(aten.mul.Tensor, g_v, pre), bias_v)
        else:
            out = b.call(aten.mul.Tensor, g_v, pre)
        return b.cast(out, out_dtype, b.dtype_of(out, out_dtype))

    def _norm(self, b, site: SiteCall, params, scale, use_ops: bool, r: int):
        """‖W + s·B·A‖ per output channel, fp32, detached, from [out, r] pieces only — or, where the
        kind says PEFT normalises another tensor than `B·A` (grouped convs), `_norm_of_delta`."""
        layer = site.layer
        w_dtype = b.dtype_of(site.weight, layer.weight_dtype)
        w = layer.kind.rows_node(b, layer, site.weight)              # a view: [out, in·k]
        a_key, b_key = layer.kind.factor_keys()
        a_detached = b.call(aten.detach.default, params[a_key])
        b_detached = b.call(aten.detach.default, params[b_key])
        delta = layer.kind.dora_norm_delta(b.call, layer, a_detached, b_detached, r)
        if delta is not None:
            return _norm_of_delta(b, w, delta, scale, w_dtype)
        a = _matrix(b, a_detached, r)                                # [r, in·k]
        bb = _matrix(b, b_detached, layer.out_features)              # [out, r]
        a32 = b.cast(a, torch.float32, b.dtype_of(a, torch.float32))
        b32 = b.cast(bb, torch.float32, b.dtype_of(bb, torch.float32))
        w = b.call(aten.detach.default, w)
        wsq = b.call(aten.pow.Tensor_Scalar,
                     b.call(aten.linalg_vector_norm.default, w, 2, [1], False, dtype=torch.float32), 2)
        # W·Aᵀ in W's dtype (a half W is not copied to fp32: that copy would be [out, in]); GEMMs
        # accumulate in fp32, the [out, r] result is then fp32.
        a_w = b.cast(a32, w_dtype, torch.float32)
        wa = b.cast(b.call(aten.mm.default, w, b.call(aten.t.default, a_w)), torch.float32, w_dtype)
        aat = b.call(aten.mm.default, a32, b.call(aten.t.default, a32))             # [r, r]
        baa = b.call(aten.mm.default, b32, aat)                                      # [out, r]
        scale32 = b.call(aten.detach.default, scale)
        eps = norm_eps(w_dtype)
        if use_ops:
            return b.call(torch.ops.lora_fx.dora_norm.default, wsq, b32, wa, baa, scale32, eps)
        cross = b.call(aten.sum.dim_IntList, b.call(aten.mul.Tensor, b32, wa), [1])
        quad = b.call(aten.sum.dim_IntList, b.call(aten.mul.Tensor, baa, b32), [1])
        sq = b.call(aten.add.Tensor, wsq, b.call(aten.mul.Tensor, cross, b.call(aten.mul.Tensor, scale32, 2)))
        sq = b.call(aten.add.Tensor, sq, b.call(aten.mul.Tensor, quad, b.call(aten.mul.Tensor, scale32, scale32)))
        norm = b.call(aten.sqrt.default, b.call(aten.clamp_min.default, sq, 0))
        return b.call(aten.clamp_min.default, norm, eps)

    # -- merging ---------------------------------------------------------------------------------
    def merge_blocker(self, res: Resolved, cfg: LoraConfig) -> str | None:
        if cfg.lora_bias:
            return "DoRA with lora_bias=True has no merge rule (the bias would be scaled by the magnitude)"
        return super().merge_blocker(res, cfg)

    def merged_weight(self, weight, tensors, scaling: float, layer: LayerInfo):
        """`W' = g ⊙ (W + s·B·A)` per output channel, g from the current W (fp32, cast back); `g` is
        kept for the subtract-mode unmerge (as PEFT caches the weight norm)."""
        full = weight.float() + self.delta_weight(weight, tensors, scaling, layer)
        rows = layer.kind.rows(full)
        g = tensors[MAGNITUDE].float().reshape(-1) / rows.norm(dim=1).clamp_min(norm_eps(weight.dtype))
        return (full * layer.kind.channel_view(g, full)).to(weight.dtype), g

    def unmerged_weight(self, merged, tensors, scaling: float, layer: LayerInfo, undo) -> torch.Tensor:
        """`W = W' / g − s·B·A` with the `g` of the merge (not bit-exact: W' was rounded)."""
        full = merged.float() / layer.kind.channel_view(undo, merged)
        return (full - self.delta_weight(merged, tensors, scaling, layer)).to(merged.dtype)


def _norm_of_delta(b, w_rows, delta, scale, w_dtype: torch.dtype):
    """‖W + s·Δ‖ per row for a kind-given Δ (rows layout, adapter dtype, built from detached
    factors), fp32, detached, clamped below by eps. Δ is formed in the adapter dtype, as PEFT forms
    it; the sum and the norm are fp32 (adding a half W to the fp32 Δ promotes it)."""
    delta32 = b.cast(delta, torch.float32, b.dtype_of(delta, torch.float32))
    full = b.call(aten.add.Tensor, b.call(aten.detach.default, w_rows),
                  b.call(aten.mul.Tensor, delta32, b.call(aten.detach.default, scale)))
    norm = b.call(aten.linalg_vector_norm.default, full, 2, [1], False, dtype=torch.float32)
    return b.call(aten.clamp_min.default, norm, norm_eps(w_dtype))


def _eager(op, *args):
    """`call` for `LayerKind.dora_norm_delta` on tensors: apply the op now."""
    return op(*args)


def _matrix(b, node, rows: int):
    """`node` as a [rows, -1] matrix (conv factors are 3- to 5-D; linear ones already 2-D)."""
    shape = b.shape_of(node)
    if shape is not None and len(shape) == 2:
        return node
    return b.call(aten.reshape.default, node, [rows, -1])


register(DoraVariant())
