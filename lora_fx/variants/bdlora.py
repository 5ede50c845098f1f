"""Block-diagonal LoRA (BdLoRA, `use_bdlora=BdLoraConfig(...)`): one factor of each adapted layer is
block-diagonal with `nblocks` blocks, the other dense, so that under tensor parallelism the adapter
shards exactly as the base weight does (docs/bdlora.md).

PEFT's semantics (`BdLoraLinearVariant`, `BlockDiagonalLinear`):
- a layer whose name contains a `target_modules_bd_a` pattern (a substring test, not PEFT's target
  rules) gets a block-diagonal A, one containing a `target_modules_bd_b` pattern a block-diagonal
  B; both is an error, neither an error under `match_strict` (else plain LoRA for that layer);
- the block-diagonal factor is stored compactly, blocks stacked on dim 0 under PEFT's keys:
  `lora_A.weight` (r, in/nblocks), `lora_B.weight` (out, r/nblocks); the dense factor keeps its
  LoRA shape, so `nblocks` must divide in and r (A) or r and out (B);
- initialisation: the dense factor as `init_lora_weights` says; a block-diagonal A by
  `kaiming_uniform_` with its defaults (a=0, fan_in = in/nblocks), a block-diagonal B zero, whatever
  `init_lora_weights` is;
- `y = base(x) + s·B(A(dropout(x)))` with the block-diagonal factor applied block by block, never as
  a dense matrix; merging folds `s·B·A` with the block-diagonal factor expanded (`delta_weight`).
Layers: Linear and transformers' Conv1D (PEFT builds BdLoRA on Linear only: its Conv1D path fails);
any other targeted kind is refused by name, as PEFT refuses it.

The block-diagonal product has three forms (`LOWERING` below): the compact factor expanded to its
dense block-diagonal matrix in the graph and applied by a plain `linear`, PEFT's `einsum` over
(tokens, nblocks, width), or the custom op `lora_fx::block_diag_matmul` (kernels/block_diag.py:
Triton on CUDA). A site gets the form measured fastest on its device (docs/performance.md, "BdLoRA").
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BdLoraConfig, LoraConfig
from ..errors import ConfigError, UnsupportedFeatureError
from ..kernels import ops as _ops  # noqa: F401  (registers the lora_fx:: ops)
from ..kernels.block_diag import block_diag_dense
from ..layers import LayerInfo
from ..rules import Resolved
from . import register
from .base import SiteCall, TensorSpec
from .lora import LoraVariant, add_to_base, params_dtype

aten = torch.ops.aten

A_BLOCKS, B_BLOCKS, BOTH = "A", "B", "A and B"

# How a site computes its block-diagonal product:
# - "expand": the compact factor expanded in the graph to its dense block-diagonal matrix (zeros
#   off the blocks: a factor-sized tensor, never activation-sized), then a plain `linear`: what
#   plain LoRA costs, and no batched GEMM with a tiny dimension;
# - "einsum": PEFT's einsum over (..., nblocks, width) (Inductor: one batched GEMM, permutes around it);
# - "op": `lora_fx::block_diag_matmul` (kernels/block_diag.py: Triton on CUDA, the einsum on CPU).
# "auto" takes `BEST[device type]`, else `DEFAULT`; tests and benchmarks force one.
LOWERING = "auto"
# The form measured fastest per device type (one adapted linear compiled by Inductor, forward and
# training step, nblocks 2 and 8, both factors: docs/performance.md, "BdLoRA"). CPU: "expand",
# fastest or within noise everywhere (the einsum reaches 1.8x the base layer's forward where
# "expand" is 1.1x; the op, the einsum behind an opaque call, never wins). CUDA (H200, bf16 base,
# 4096 tokens, 4096 -> 11008): "expand" 1.28-1.31x the base layer, as dense LoRA; the einsum's
# training step 1.37x, the op's 1.34-1.44x (the op alone reaches 0.76 TB/s on B, 16% of HBM peak:
# r/nblocks = 8 is too thin a GEMM to fill the machine).
BEST = {"cpu": "expand", "cuda": "expand"}
DEFAULT = "expand"
FORMS = ("expand", "einsum", "op")


def block_role(name: str, bd: BdLoraConfig) -> str | None:
    """Which factor of layer `name` is block-diagonal: `A_BLOCKS`, `B_BLOCKS`, `BOTH` (an error
    for the caller to raise) or None. A pattern matches when it is a substring of the name (PEFT's
    test).

    Example:
        >>> bd = BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2)
        >>> block_role("model.layers.0.self_attn.o_proj", bd), block_role("model.layers.0.mlp.up_proj", bd)
        ('A', None)
    """
    in_a = any(p in name for p in bd.target_modules_bd_a or ())
    in_b = any(p in name for p in bd.target_modules_bd_b or ())
    return BOTH if in_a and in_b else A_BLOCKS if in_a else B_BLOCKS if in_b else None


def lowering(layer: LayerInfo) -> str:
    """The form of this site's block-diagonal product (one of `FORMS`)."""
    if LOWERING != "auto":
        if LOWERING not in FORMS:
            raise ValueError(f"bdlora.LOWERING={LOWERING!r}; expected 'auto' or one of {FORMS}")
        return LOWERING
    return BEST.get(layer.weight_device.split(":")[0], DEFAULT)


class BdLoraVariant(LoraVariant):
    name = "bdlora"
    fallback = False

    def pads_with_zeros(self, res: Resolved, cfg: LoraConfig) -> bool:
        return False  # the rank is split into blocks: a larger rank moves every block's columns

    def claims(self, cfg: LoraConfig) -> bool:
        return cfg.use_bdlora is not None

    def role(self, res: Resolved, cfg: LoraConfig) -> str | None:
        return block_role(res.layer.name, cfg.use_bdlora)

    def check(self, res: Resolved, cfg: LoraConfig) -> None:
        super().check(res, cfg)
        layer, bd = res.layer, cfg.use_bdlora
        kind = layer.kind
        if not kind.linear_family or kind.module_boundary or kind.targets_parameter or kind.lookup:
            raise UnsupportedFeatureError(
                f"{layer.name}: block-diagonal LoRA (use_bdlora) adapts Linear and transformers Conv1D layers, not "
                f"{kind.name} layers (class {layer.class_name or '?'}); leave it out of target_modules (PEFT refuses "
                "it too)")
        role = self.role(res, cfg)
        if role == BOTH:
            raise ConfigError(f"{layer.name}: its name matches both target_modules_bd_a {bd.target_modules_bd_a} and "
                              f"target_modules_bd_b {bd.target_modules_bd_b}; a layer has one block-diagonal factor")
        if role is None:
            if bd.match_strict:
                raise ConfigError(
                    f"{layer.name}: its name matches neither target_modules_bd_a {bd.target_modules_bd_a} nor "
                    f"target_modules_bd_b {bd.target_modules_bd_b} (BdLoraConfig.match_strict=True); add a pattern "
                    "for it, or set match_strict=False to give it plain LoRA")
            return
        nb = bd.nblocks
        sizes = ((("in_features", layer.in_features), ("r", res.r)) if role == A_BLOCKS
                 else (("r", res.r), ("out_features", layer.out_features)))
        bad = [f"{what}={value}" for what, value in sizes if value % nb]
        if bad:
            raise ConfigError(f"{layer.name}: a block-diagonal {role} with nblocks={nb} needs {sizes[0][0]} and "
                              f"{sizes[1][0]} divisible by {nb}; {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'}"
                              " not")
        if role == B_BLOCKS and cfg.lora_bias:
            raise UnsupportedFeatureError(
                f"{layer.name}: lora_bias=True with a block-diagonal B: PEFT's block-diagonal factor has no bias (it "
                "would drop the adapter's bias and cannot merge it), so there is no PEFT form to match; use "
                "lora_bias=False, or give this layer a block-diagonal A")

    def tensors(self, res: Resolved, cfg: LoraConfig) -> dict[str, TensorSpec]:
        specs = super().tensors(res, cfg)
        role, nb = self.role(res, cfg), cfg.use_bdlora.nblocks
        a_key, b_key = res.layer.kind.factor_keys()
        if role == A_BLOCKS:
            specs[a_key] = TensorSpec((res.r, res.layer.in_features // nb))
        elif role == B_BLOCKS:
            specs[b_key] = TensorSpec((res.layer.out_features, res.r // nb))
        return specs

    def init(self, tensors, res: Resolved, cfg: LoraConfig, generator=None) -> None:
        super().init(tensors, res, cfg, generator)  # the dense factor (and the bias) as plain LoRA
        role = self.role(res, cfg)
        a_key, b_key = res.layer.kind.factor_keys()
        with torch.no_grad():
            if role == A_BLOCKS:  # PEFT's BlockDiagonalLinear: kaiming_uniform_ with its defaults
                nn.init.kaiming_uniform_(tensors[a_key], generator=generator)
            elif role == B_BLOCKS:
                tensors[b_key].zero_()

    # -- graph -----------------------------------------------------------------------------------
    def emit(self, b, site: SiteCall, res: Resolved, cfg: LoraConfig, params, scale):
        role = self.role(res, cfg)
        if role is None:  # match_strict=False: plain LoRA for this layer
            return super().emit(b, site, res, cfg, params, scale)
        layer = site.layer
        nb = cfg.use_bdlora.nblocks
        a_key, b_key = layer.kind.factor_keys()
        out_dtype = b.dtype_of(site.base_out, layer.weight_dtype)
        adapter_dtype = params_dtype(params)
        bias = params.get("lora_B.bias")
        mixed = adapter_dtype != out_dtype
        # The scale on the rank-r intermediate where PEFT's rounding allows it (see LoraVariant.emit).
        scale_early = bias is None and not mixed
        x = layer.kind.adapter_input(b, site.x, adapter_dtype, layer.weight_dtype,
                                     cfg.lora_dropout if site.training else 0.0)
        form = lowering(layer)
        if role == A_BLOCKS:
            h = _block_diag(b, x, params[a_key], nb, form, res.r // nb, layer.in_features // nb)
        else:
            h = layer.kind.apply_a(b, layer, x, params[a_key])
        if role == A_BLOCKS and scale_early and not site.needs_grad and b.shape_of(site.base_out) is not None:
            return _accumulate_into_base(b, site, h, params[b_key], scale, res.r)
        if scale_early:
            h = b.call(aten.mul.Tensor, h, scale)
        if role == B_BLOCKS:
            delta = _block_diag(b, h, params[b_key], nb, form, layer.out_features // nb, res.r // nb)
        else:
            delta = layer.kind.apply_b(b, layer, h, params[b_key], bias)
        if not scale_early:
            delta = b.call(aten.mul.Tensor, delta, scale)
        return add_to_base(b, site.base_out, delta, out_dtype, adapter_dtype)

    # -- merging ---------------------------------------------------------------------------------
    def merged_weight(self, weight, tensors, scaling: float, layer: LayerInfo):
        """PEFT's BdLoRA merge rounds the delta to the weight's dtype, then adds in that dtype (its
        plain LoRA adds in fp32): on a half base the merged weights differ by an ulp otherwise."""
        return weight + self.delta_weight(weight, tensors, scaling, layer).to(weight.dtype), None

    def unmerged_weight(self, merged, tensors, scaling: float, layer: LayerInfo, undo) -> torch.Tensor:
        return merged - self.delta_weight(merged, tensors, scaling, layer).to(merged.dtype)

    def delta_weight(self, weight, tensors, scaling: float, layer: LayerInfo) -> torch.Tensor:
        """`s·B·A` in the weight's layout, the block-diagonal factor expanded. Which factor is
        block-diagonal, and into how many blocks, is read from the compact shapes: A (r, in/nb),
        B (out, r/nb)."""
        a_key, b_key = layer.kind.factor_keys()
        a, bb = tensors[a_key].float(), tensors[b_key].float()
        if a.shape[1] != layer.in_features:
            a = block_diag_dense(a, layer.in_features // a.shape[1])
        if bb.shape[1] != a.shape[0]:
            bb = block_diag_dense(bb, a.shape[0] // bb.shape[1])
        return layer.kind.delta_weight(a, bb, layer, weight.shape) * scaling


def _accumulate_into_base(b, site: SiteCall, h, weight_b, scale, r: int):
    """Inference form with a dense B (a block-diagonal A): `addmm(base_out, s·h, Bᵀ)` on 2-D views, as
    plain LoRA's (no output-sized delta written and read again)."""
    layer = site.layer
    h2 = b.call(aten.mul.Tensor, b.call(aten.reshape.default, h, [-1, r]), scale)
    out_shape = [d if type(d) is int else b.call(aten.sym_size.int, site.base_out, i)
                 for i, d in enumerate(b.shape_of(site.base_out))]
    y2 = b.call(aten.reshape.default, site.base_out, [-1, layer.out_features])
    out2 = b.call(aten.addmm.default, y2, h2, b.call(aten.t.default, weight_b))
    return b.call(aten.reshape.default, out2, out_shape)


def _block_diag(b, x, w, nblocks: int, form: str, n: int, m: int):
    """`x · blockdiag(w)ᵀ` for the compact `w` (nblocks·n, m), in the given form (see `LOWERING`)."""
    if form == "op":
        return b.call(torch.ops.lora_fx.block_diag_matmul.default, x, w, nblocks)
    if form == "einsum":
        xs = b.call(aten.unflatten.int, x, -1, [nblocks, m])      # (..., nblocks, m)
        ws = b.call(aten.reshape.default, w, [nblocks, n, m])
        y = b.call(aten.einsum.default, "...im,inm->...in", [xs, ws])
        return b.call(aten.flatten.using_ints, y, -2, -1)
    # expand: dense[i·n + j, k·m + l] = w[i·n + j, l] if i == k else 0, built as (nblocks, n, nblocks, m)
    # from the blocks put on the diagonal of the last two dims (diag_embed: no device or dtype to pick)
    blocks = b.call(aten.permute.default, b.call(aten.reshape.default, w, [nblocks, n, m]), [1, 2, 0])
    diagonal = b.call(aten.diag_embed.default, blocks)                                  # (n, m, nblocks, nblocks)
    dense = b.call(aten.permute.default, diagonal, [2, 0, 3, 1])                         # (nblocks, n, nblocks, m)
    dense = b.call(aten.reshape.default, dense, [nblocks * n, nblocks * m])
    return b.call(aten.linear.default, x, dense)


register(BdLoraVariant())
