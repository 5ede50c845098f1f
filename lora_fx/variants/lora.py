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

import torch

from .. import init_modes
from ..config import LoraConfig
from ..errors import ConfigError
from ..graph_builder import node_value
from ..layers import LayerInfo
from ..rules import Resolved
from . import register
from .base import SiteCall, TensorSpec, Variant

aten = torch.ops.aten


class LoraVariant(Variant):
    name = "lora"
    fallback = True

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


def _accumulate_into_base(b, site: SiteCall, x, a, weight_b, scale):
    """Inference form: `addmm(base_out, s·(x Aᵀ), Bᵀ)` on 2-D views. The GEMM accumulates into the
    base output, so no output-sized delta is written and read again (measured: 1.13x -> 1.08x of
    one adapted linear's base time on CPU; slower in training, hence inference only)."""
    layer = site.layer
    x2 = b.call(aten.reshape.default, x, [-1, layer.in_features])
    h = b.call(aten.mm.default, x2, b.call(aten.t.default, a))
    h = b.call(aten.mul.Tensor, h, scale)
    out_shape = [d if type(d) is int else b.call(aten.sym_size.int, site.base_out, i)
                 for i, d in enumerate(b.shape_of(site.base_out))]
    y2 = b.call(aten.reshape.default, site.base_out, [-1, layer.out_features])
    out2 = b.call(aten.addmm.default, y2, h, b.call(aten.t.default, weight_b))
    return b.call(aten.reshape.default, out2, out_shape)


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
