"""QALoRA (`use_qalora=True`): LoRA whose input is the layer input mean-pooled over groups.

With G = `qalora_group_size` and n = in / G pooled features:

    y = base(x) + s · B(A(n · pool_G(x))),    pool_G(x)[..., j] = mean(x[..., j·G : (j+1)·G])

A is (r, n) and B (out, r), under PEFT's keys (`lora_A.weight`, `lora_B.weight`). The order of the
operations is PEFT's (`QALoraLinearVariant`): adapter dtype cast, dropout, pooling, the factor n,
then the two factors. PEFT runs this on GPTQ layers only; here it runs on every linear-family kind
(`LayerKind.linear_family`: Linear, transformers' Conv1D, bitsandbytes' quantized linears), each
through its own `apply_a` / `apply_b`. Adapters of a half-precision base are fp32 and their output
is added in fp32 and rounded once, as PEFT adds a variant's output on all of its layers. Other
kinds are refused by name: pooling "consecutive input features" has no meaning for an embedding's
indices, a conv's channels-by-kernel window, or a raw parameter.

Pooling is linear, so the adapter is a fixed linear map of the input and merges into a float
weight: A expanded to (r, in) by repeating each column over its group, times n / G
(`delta_weight`). A quantized base refuses, as for plain LoRA (its kind's `merge_blocker`).
"""

from __future__ import annotations

import torch

from ..config import LoraConfig
from ..errors import ConfigError, UnsupportedFeatureError
from ..init_modes import kaiming_like_linear, mode_for
from ..layers import LayerInfo
from ..rules import Resolved
from . import register
from .base import SiteCall, TensorSpec
from .lora import LoraVariant, add_to_base, params_dtype

aten = torch.ops.aten


class QALoraVariant(LoraVariant):
    name = "qalora"
    fallback = False

    def pads_with_zeros(self, res: Resolved, cfg: LoraConfig) -> bool:
        return False  # A's width is in / group size: a padded width is another pooling, not zeros

    def claims(self, cfg: LoraConfig) -> bool:
        return bool(cfg.use_qalora)

    def check(self, res: Resolved, cfg: LoraConfig) -> None:
        super().check(res, cfg)
        layer = res.layer
        if not layer.kind.linear_family:
            what = f"{layer.kind} layer ({layer.class_name})" if layer.class_name else f"{layer.kind} target"
            raise UnsupportedFeatureError(
                f"{layer.name}: QALoRA adapts linear layers only (Linear, transformers' Conv1D, bitsandbytes "
                f"linears), not this {what}: its input has no groups of consecutive features to pool. Leave it out "
                "of this adapter's targets")
        group = cfg.qalora_group_size
        if layer.in_features % group:
            raise ConfigError(f"{layer.name}: use_qalora needs in_features ({layer.in_features}) to be divisible by "
                              f"qalora_group_size ({group})")
        if cfg.lora_bias:
            # PEFT creates lora_B's bias for QALoRA but its forward never reads it: refused rather
            # than train a parameter that does nothing, or silently differ from PEFT by using it.
            raise UnsupportedFeatureError(f"{layer.name}: lora_bias=True with use_qalora: PEFT's QALoRA ignores "
                                          "lora_B's bias; set lora_bias=False")

    def tensors(self, res: Resolved, cfg: LoraConfig) -> dict[str, TensorSpec]:
        layer = res.layer
        a_key, b_key = layer.kind.factor_keys()
        (rank, in_features), b_shape = layer.kind.factor_shapes(layer, res.r)
        return {a_key: TensorSpec((rank, in_features // cfg.qalora_group_size)), b_key: TensorSpec(b_shape)}

    def init(self, tensors, res: Resolved, cfg: LoraConfig, generator=None) -> None:
        # PEFT replaces A by a fresh nn.Linear(n, r) whatever `init_lora_weights` says (its Gaussian
        # or Kaiming init of the (r, in) factor is discarded); B follows `init_lora_weights`.
        a_key, b_key = res.layer.kind.factor_keys()
        mode_for(cfg.init_lora_weights).init_factors(tensors[a_key], tensors[b_key], None, res, generator)
        with torch.no_grad():
            kaiming_like_linear(tensors[a_key], generator)

    # -- graph -----------------------------------------------------------------------------------
    def emit(self, b, site: SiteCall, res: Resolved, cfg: LoraConfig, params, scale):
        layer = site.layer
        out_dtype = b.dtype_of(site.base_out, layer.weight_dtype)
        adapter_dtype = params_dtype(params)
        a_key, b_key = layer.kind.factor_keys()
        x = layer.kind.adapter_input(b, site.x, adapter_dtype, layer.weight_dtype,
                                     cfg.lora_dropout if site.training else 0.0)
        pooled = pool(b, x, layer.in_features, cfg.qalora_group_size)
        h = layer.kind.apply_a(b, layer, pooled, params[a_key])
        if adapter_dtype != out_dtype:
            # Mixed precision (fp32 adapters on a half-precision output), PEFT's arithmetic: scaled
            # after B, added in the wider dtype, the sum rounded once. PEFT's layers add a variant's
            # result this way on every base, its bitsandbytes ones included (their rounding of the
            # delta first, `rounds_delta_first`, is their plain-LoRA path only), so the kind's
            # flag is not asked here.
            delta = b.call(aten.mul.Tensor, layer.kind.apply_b(b, layer, h, params[b_key], None), scale)
            return add_to_base(b, site.base_out, delta, out_dtype, adapter_dtype)
        # Same dtype: the scaling multiplies the rank-r intermediate (r/out of the work), as LoRA.
        h = b.call(aten.mul.Tensor, h, scale)
        return b.call(aten.add.Tensor, site.base_out, layer.kind.apply_b(b, layer, h, params[b_key], None))

    # -- merging ---------------------------------------------------------------------------------
    def delta_weight(self, weight, tensors, scaling: float, layer: LayerInfo) -> torch.Tensor:
        """`s·B·A_full` in the weight's layout, A_full (r, in) being A with each pooled column
        repeated over its group and multiplied by n / G (the mean's 1/G and PEFT's factor n), so
        that `A_full x = A (n · pool_G(x))`."""
        a_key, b_key = layer.kind.factor_keys()
        a, b = tensors[a_key].float(), tensors[b_key].float()
        pooled = a.shape[-1]
        if pooled == 0 or layer.in_features % pooled:
            raise ConfigError(f"{layer.name}: {a_key} has {pooled} columns, which do not divide in_features "
                              f"({layer.in_features}) into QALoRA groups")
        group = layer.in_features // pooled
        a_full = a.repeat_interleave(group, dim=-1) * (pooled / group)
        return layer.kind.delta_weight(a_full, b, layer, weight.shape) * scaling


def pool(b, x, in_features: int, group: int):
    """The nodes of `n · pool_G(x)` over the last dimension: (..., in) -> (..., n), n = in / G.

    Splitting the last dimension is a view for any strides, so any leading shape works, symbolic
    ones included.

    Args:
        b: the `GraphBuilder` adding the nodes.
        x: the node of the adapter's input (already in the adapters' dtype, after dropout).
        in_features: the layer's input features (a multiple of `group`; `check` made sure).
        group: `qalora_group_size`.

    Example:
        >>> import torch, torch.fx as fx
        >>> from lora_fx.graph_builder import GraphBuilder
        >>> graph = fx.Graph()
        >>> x = graph.placeholder("x")
        >>> _ = graph.output(pool(GraphBuilder(graph, x), x, 8, 4))
        >>> fx.GraphModule(torch.nn.Module(), graph)(torch.arange(8.0).view(1, 8))  # 2·mean(0..3), 2·mean(4..7)
        tensor([[ 3., 11.]])
    """
    pooled = in_features // group
    grouped = b.call(aten.unflatten.int, x, -1, [pooled, group])
    mean = b.call(aten.mean.dim, grouped, [-1])
    return b.call(aten.mul.Tensor, mean, pooled)


register(QALoraVariant())
