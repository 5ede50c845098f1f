"""Plain LoRA (and rsLoRA, which only changes the scaling): `y = base(x) + s * B(A(dropout(x)))`.

Tensors and initialisation follow PEFT exactly, including its key names:
- Linear / Conv1D: `lora_A.weight` (r, in), `lora_B.weight` (out, r), `lora_B.bias` (lora_bias).
- Conv{1,2,3}d: `lora_A.weight` (r, in, *kernel) with the base stride/padding/dilation,
  `lora_B.weight` (out, r / groups, 1, ...) grouped like the base.
- Embedding: `lora_embedding_A` (r, num_embeddings), `lora_embedding_B` (dim, r); no dropout.
The adapter runs in the adapters' dtype (fp32 for a half-precision base, as PEFT's
`autocast_adapter_dtype`); its result is added to the base output in the wider dtype and the sum
is rounded to the base output's dtype once, as PEFT does (bit-equal to PEFT on a bf16 base).
"""

from __future__ import annotations

import operator

import torch

from .. import init_modes
from ..config import LoraConfig
from ..errors import ConfigError
from ..graph_builder import node_value
from ..kernels import ops as _ops  # noqa: F401  (registers the lora_fx:: ops)
from ..layers import LayerInfo
from ..rules import Resolved
from . import register
from .base import SiteCall, TensorSpec, Variant

aten = torch.ops.aten

# Mixed batches (`emit_rows`): "auto" (the ops where gradients flow, gathered factors otherwise),
# "op" or "gather" (tests force one).
ROW_FORM = "auto"


class LoraVariant(Variant):
    name = "lora"
    fallback = True
    zero_neutral = True

    def claims(self, cfg: LoraConfig) -> bool:
        return True

    def check(self, res: Resolved, cfg: LoraConfig) -> None:
        problem = res.layer.kind.check(res.layer, res.r, cfg)
        if problem is not None:
            raise ConfigError(f"{res.layer.name}: {problem}")

    def tensors(self, res: Resolved, cfg: LoraConfig) -> dict[str, TensorSpec]:
        layer = res.layer
        a_key, b_key = layer.kind.factor_keys()
        a_shape, b_shape = layer.kind.factor_shapes(layer, res.r)
        specs = {a_key: TensorSpec(a_shape), b_key: TensorSpec(b_shape)}
        if cfg.lora_bias:
            specs["lora_B.bias"] = TensorSpec((layer.out_features,))
        return specs

    def init(self, tensors, res: Resolved, cfg: LoraConfig, generator=None) -> None:
        """The factors' values that need no base weight, by `cfg.init_lora_weights`'s mode
        (`init_modes`); modes derived from the base weight (PiSSA, OLoRA, LoftQ) then set them from
        it (`AdapterSet`, which can write the base weight)."""
        a_key, b_key = res.layer.kind.factor_keys()
        mode = init_modes.mode_for(cfg.init_lora_weights)
        mode.init_factors(tensors[a_key], tensors[b_key], tensors.get("lora_B.bias"), res, generator)

    def emit(self, b, site: SiteCall, res: Resolved, cfg: LoraConfig, params, scale):
        layer = site.layer
        out_dtype = b.dtype_of(site.base_out, layer.weight_dtype)
        adapter_dtype = params_dtype(params)
        bias = params.get("lora_B.bias")
        # The scaling multiplies the rank-r intermediate, not the full-width delta: r/out of the
        # work and no extra pass over an output-sized tensor (measured in docs/performance.md).
        # With lora_bias the bias is scaled too, so the product is scaled after B as PEFT does.
        scale_early = bias is None
        x = layer.kind.adapter_input(b, site.x, adapter_dtype, layer.weight_dtype,
                                     cfg.lora_dropout if site.training else 0.0)
        if (layer.kind.linear_family and scale_early and not site.needs_grad
                and adapter_dtype == out_dtype and b.shape_of(site.base_out) is not None):
            a_key, b_key = layer.kind.factor_keys()
            return _accumulate_into_base(b, site, x, params[a_key], params[b_key], scale)
        if adapter_dtype != out_dtype:
            # Mixed precision (fp32 adapters on a half base), PEFT's arithmetic exactly: the product
            # scaled after B, added to the base output in the wider dtype, rounded once.
            delta = b.call(aten.mul.Tensor, self.adapter_product(b, layer, x, params), scale)
            if layer.kind.rounds_delta_first:  # PEFT's quantized layers round the delta, then add
                return b.call(aten.add.Tensor, site.base_out, b.cast(delta, out_dtype, adapter_dtype))
            return add_to_base(b, site.base_out, delta, out_dtype, adapter_dtype)
        delta = self.adapter_product(b, layer, x, params, scale if scale_early else None)
        if not scale_early:
            delta = b.call(aten.mul.Tensor, delta, scale)
        return b.call(aten.add.Tensor, site.base_out, delta)

    def pads_with_zeros(self, res: Resolved, cfg: LoraConfig) -> bool:
        # Zero rows of A and columns of B add nothing; a grouped conv's B splits the rank by group.
        return res.layer.groups == 1

    def emit_rows(self, b, site: SiteCall, res: Resolved, cfg: LoraConfig, banks, scales, index):
        """`out[i] = base[i] + s[i]·(x[i] A[i]ᵀ) B[i]ᵀ` with row i's adapter (s = 0 for -1), for LoRA's
        own linear layers (a subclass that emits another form has no row form here). Two lowerings
        (`ROW_FORM`), measured per adapted linear (docs/performance.md, "Mixed-adapter row ops"):
        graphs with gradients call `lora_fx::lora_shrink` / `lora_expand` (compiled training step
        1.20x the base linear, against 3.66x for gathered factors, whose backward scatter-adds a
        (tokens, r, in) gradient); inference graphs gather each row's factors and run batched
        matmuls, which Inductor fuses (decode: +0.0-0.2 ms against +0.5-0.6 ms for the ops)."""
        layer = site.layer
        if (type(self).emit is not LoraVariant.emit or not layer.kind.linear_family or cfg.lora_bias
                or b.shape_of(site.base_out) is None):
            return None
        a_key, b_key = layer.kind.factor_keys()
        adapter_dtype = params_dtype(banks)
        out_dtype = b.dtype_of(site.base_out, layer.weight_dtype)
        rows = b.shape_of(index)[0]
        rows = rows if type(rows) is int else b.call(aten.sym_size.int, index, 0)
        x = layer.kind.adapter_input(b, site.x, adapter_dtype, layer.weight_dtype,
                                     cfg.lora_dropout if site.training else 0.0)
        shape = [d if type(d) is int else b.call(aten.sym_size.int, site.base_out, i)
                 for i, d in enumerate(b.shape_of(site.base_out))]
        form = ROW_FORM if ROW_FORM != "auto" else ("op" if site.needs_grad else "gather")
        if form == "op":
            x2 = b.call(aten.reshape.default, x, [-1, layer.in_features])
            tokens = b.shape_of(x2)[0]
            per_row = (tokens // rows if type(tokens) is int and type(rows) is int else
                       b.call(operator.floordiv, b.call(aten.sym_size.int, x2, 0), rows))
            per_token = b.call(aten.reshape.default, b.call(
                aten.expand.default, b.call(aten.reshape.default, index, [rows, 1]), [rows, per_row]), [-1])
            h = b.call(torch.ops.lora_fx.lora_shrink.default, x2, banks[a_key], scales, per_token)
            y2 = b.call(aten.reshape.default, site.base_out, [-1, layer.out_features])
            out = b.call(torch.ops.lora_fx.lora_expand.default, y2, h, banks[b_key], per_token)
            return b.call(aten.reshape.default, out, shape)
        x3 = b.call(aten.reshape.default, x, [rows, -1, layer.in_features])
        slot = b.call(aten.clamp_min.default, index, 0)
        scale = b.call(aten.where.ScalarOther, b.call(aten.ge.Scalar, index, 0),
                       b.call(aten.index.Tensor, scales, [slot]), 0.0)
        scale = b.cast(b.call(aten.reshape.default, scale, [rows, 1, 1]), adapter_dtype, torch.float32)
        a_rows = b.call(aten.index.Tensor, banks[a_key], [slot])              # (rows, r, in)
        b_rows = b.call(aten.index.Tensor, banks[b_key], [slot])              # (rows, out, r)
        h = b.call(aten.bmm.default, x3, b.call(aten.transpose.int, a_rows, 1, 2))
        if adapter_dtype == out_dtype:  # as the one-adapter form: the scaling on the rank-r product
            h = b.call(aten.mul.Tensor, h, scale)
        delta = b.call(aten.bmm.default, h, b.call(aten.transpose.int, b_rows, 1, 2))
        if adapter_dtype != out_dtype:  # PEFT's mixed precision: scaled after B, summed wide, rounded once
            delta = b.call(aten.mul.Tensor, delta, scale)
        delta = b.call(aten.reshape.default, delta, shape)
        return add_to_base(b, site.base_out, delta, out_dtype, adapter_dtype)

    def adapter_product(self, b, layer: LayerInfo, x, params, h_scale=None):
        """`B(h_scale · A(x))` (`B(A(x))` without `h_scale`) in the layer's own form: linear,
        embedding lookup of Aᵀ, or a conv A with the base's geometry and a 1x1 grouped conv B."""
        a_key, b_key = layer.kind.factor_keys()
        h = layer.kind.apply_a(b, layer, x, params[a_key])
        if h_scale is not None:
            h = b.call(aten.mul.Tensor, h, h_scale)
        return layer.kind.apply_b(b, layer, h, params[b_key], params.get("lora_B.bias"))

    def merge_blocker(self, res: Resolved, cfg: LoraConfig) -> str | None:
        layer = res.layer
        blocker = layer.kind.merge_blocker(layer)
        if blocker is not None:
            return blocker
        if cfg.lora_bias and not layer.has_bias:
            return ("lora_bias=True and the base layer has no bias to fold the adapter's bias into (PEFT cannot "
                    "merge this either)")
        return None

    def merged_bias(self, bias, tensors, scaling: float, layer: LayerInfo):
        lora_bias = tensors.get("lora_B.bias")
        if lora_bias is None:
            return None
        return (bias.float() + scaling * lora_bias.float()).to(bias.dtype)

    def unmerged_bias(self, merged, tensors, scaling: float, layer: LayerInfo):
        return (merged.float() - scaling * tensors["lora_B.bias"].float()).to(merged.dtype)

    def delta_weight(self, weight, tensors, scaling: float, layer: LayerInfo) -> torch.Tensor:
        a, b = (tensors[k].float() for k in layer.kind.factor_keys())
        return layer.kind.delta_weight(a, b, layer, weight.shape) * scaling


# In place where `SiteCall.base_exclusive` allows it, on the CPU (`_accumulate_into_base`). A switch
# for A/B runs (`python -m bench.site_forms --model`), read when a graph is built.
INPLACE_ACCUMULATE = True


def _accumulate_into_base(b, site: SiteCall, x, a, weight_b, scale):
    """Inference form: `addmm(base_out, s·(x Aᵀ), Bᵀ)` on 2-D views. The GEMM accumulates into the
    base output, so no output-sized delta is written and read again (measured: 1.13x -> 1.08x of
    one adapted linear's base time on CPU; slower in training, hence inference only).

    Where the site allows it (`SiteCall.base_exclusive`: a Dynamo graph, the base output read by
    this site alone) and on the CPU, in place: `lora_fx::addmm_`. ATen's out-of-place CPU `addmm`
    copies the base output into its result first, an output-sized pass; Inductor re-inplaces the
    op onto the base GEMM's buffer (the whole forward: 0.98x the out-of-place one, docs/performance.md,
    issue 14 goal 1). CUDA keeps the out-of-place form (unmeasured there)."""
    layer = site.layer
    x2 = b.call(aten.reshape.default, x, [-1, layer.in_features])
    h = b.call(aten.mm.default, x2, b.call(aten.t.default, a))
    h = b.call(aten.mul.Tensor, h, scale)
    out_shape = [d if type(d) is int else b.call(aten.sym_size.int, site.base_out, i)
                 for i, d in enumerate(b.shape_of(site.base_out))]
    y2 = b.call(aten.reshape.default, site.base_out, [-1, layer.out_features])
    if INPLACE_ACCUMULATE and site.base_exclusive and _on_cpu(site.base_out):
        # Nothing but this site reads the base output, so the GEMM may accumulate into it (were
        # the reshape a copy, the copy is what is accumulated and returned).
        b.call(torch.ops.lora_fx.addmm_.default, y2, h, b.call(aten.t.default, weight_b))
        return b.call(aten.reshape.default, y2, out_shape)
    out2 = b.call(aten.addmm.default, y2, h, b.call(aten.t.default, weight_b))
    return b.call(aten.reshape.default, out2, out_shape)


def _on_cpu(node) -> bool:
    val = node_value(node)
    return isinstance(val, torch.Tensor) and val.device.type == "cpu"


def add_to_base(b, base_out, delta, out_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """`base_out + delta`. With adapters in a wider dtype than the base output (fp32 adapters on a
    half base) the sum is taken in the wider dtype and rounded to the base output's once, as PEFT's
    `result = result + delta` does: bit-equal to PEFT on a bf16 base."""
    out = b.call(aten.add.Tensor, base_out, delta)
    if adapter_dtype == out_dtype:
        return out
    return b.cast(out, out_dtype, torch.promote_types(out_dtype, adapter_dtype))


def params_dtype(params) -> torch.dtype:
    for node in params.values():
        val = node_value(node)
        if isinstance(val, torch.Tensor):
            return val.dtype
    return torch.float32


register(LoraVariant())
