"""A raw parameter targeted by `target_parameters` (PEFT's `ParamWrapper`): fused MoE experts
stored as one 3-D tensor (E, out, in) — or (E, in, out) where the experts module says
`is_transposed` — and 2-D weights read by any op (a router's `F.linear`, ...).

PEFT's form, keys and layout:
- `lora_A.weight` (r·E, in): expert e's A is rows e·r .. e·r+r-1;
- `lora_B.weight` (out, r·E): expert e's B is columns e, E+e, 2E+e, ... (rank-major);
- delta_e = scaling · B_e @ A_e, added to expert e's slice; a 2-D parameter is one "expert";
- no dropout, no adapter bias, no fan_in_fan_out, no variants (PEFT refuses them all);
- the key prefix is the module's path, with one `base_layer.` per parameter of the same module
  targeted after it (PEFT nests one wrapper per parameter, in registration order).

Two graph forms, chosen per parameter by how the graph reads it (`passes/find_targets.py`):
- the factored form, where every read is a recognised call: grouped matmuls over the experts
  (`GROUPED_MM`, the adapter as two more grouped matmuls of rank r), or a 2-D parameter read as
  a linear weight (`LINEAR_READ`): no E×out×in delta is ever materialised;
- the weight form (`PARAMETER`) otherwise: every read sees `W + scaling · B·A` (what PEFT's
  parametrization computes, for any op), built once per graph.
Both compute in the weight's dtype, as PEFT's wrapper casts its factors to it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import LayerKind, target_name

aten = torch.ops.aten


class ParameterKind(LayerKind):
    """The weight form: site input and base output are the parameter itself."""

    name = "parameter"
    targets_parameter = True

    def parse(self, node):
        return None  # found as parameters, not as calls (find_targets.parameter_sites)

    @staticmethod
    def dims_of_parameter(shape: tuple[int, ...], transposed: bool) -> dict:
        """PEFT's in/out features and expert count of a 2-D or 3-D parameter."""
        if len(shape) == 2:
            return dict(in_features=shape[1], out_features=shape[0], num_experts=1, parameter_shape=tuple(shape))
        experts, first, second = shape
        if transposed:  # stored (E, in, out)
            return dict(in_features=first, out_features=second, num_experts=experts, transposed=True,
                        parameter_shape=tuple(shape))
        return dict(in_features=second, out_features=first, num_experts=experts, parameter_shape=tuple(shape))

    def check(self, layer, r, cfg):
        for field, bad in (("lora_dropout", cfg.lora_dropout), ("lora_bias", cfg.lora_bias),
                           ("fan_in_fan_out", cfg.fan_in_fan_out), ("use_dora", cfg.use_dora)):
            if bad:
                return (f"parameter targets (target_parameters) take plain LoRA only; {field}={bad!r} is not "
                        "supported for them (PEFT refuses it too)")
        return None

    def factor_shapes(self, layer, r):
        e = layer.num_experts
        return (r * e, layer.in_features), (layer.out_features, r * e)

    def adapter_input(self, b, x, adapter_dtype, weight_dtype, dropout):
        return x

    def bind(self, call: fx.Node) -> ParameterKind:
        """This form for one reading call (a form that repeats the call's arguments keeps it)."""
        return self

    # -- the weight form: "A(x)" is A itself, per expert; "B(h)" is the delta in W's layout ----
    def apply_a(self, b, layer, x, a):
        # x is W: the factors take its dtype, as PEFT's; the scaling then multiplies r·in per expert.
        return _experts_a(b, layer, a, b.dtype_of(x, layer.weight_dtype))

    def apply_b(self, b, layer, h, weight_b, bias):
        dtype = b.dtype_of(h, layer.weight_dtype)
        b3 = _experts_b(b, layer, b.cast(weight_b, dtype, b.dtype_of(weight_b, dtype)))
        delta = b.call(aten.bmm.default, b3, h)  # (E, out, in)
        if layer.transposed:
            delta = b.call(aten.transpose.int, delta, -2, -1)
        return b.call(aten.reshape.default, delta, list(layer.parameter_shape))

    def delta_weight(self, a, b, layer, weight_shape):
        e = layer.num_experts
        delta = b.reshape(layer.out_features, -1, e).permute(2, 0, 1) @ a.reshape(e, -1, layer.in_features)
        return (delta.transpose(-2, -1) if layer.transposed else delta).reshape(weight_shape)

    def merge_blocker(self, layer):
        return None

    def rows(self, weight):
        raise NotImplementedError("a parameter target has no per-channel rows (DoRA is refused for it)")


def _experts_a(b, layer, a: fx.Node, dtype: torch.dtype) -> fx.Node:
    """A (r·E, in) as (E, r, in) in `dtype`: expert e's rows are e·r .. e·r+r-1 (PEFT's layout)."""
    a3 = b.call(aten.reshape.default, a, [layer.num_experts, -1, layer.in_features])
    return b.cast(a3, dtype, b.dtype_of(a, dtype))


def _experts_b(b, layer, weight_b: fx.Node) -> fx.Node:
    """B (out, r·E) as (E, out, r): expert e's columns are e, E+e, 2E+e, ... (PEFT's layout)."""
    shaped = b.call(aten.reshape.default, weight_b, [layer.out_features, -1, layer.num_experts])
    return b.call(aten.permute.default, shaped, [2, 0, 1])


class LinearRead(ParameterKind):
    """A 2-D parameter read as a linear weight (`F.linear(x, W)`): the adapter is LoRA's linear
    form on the call's input, added to its output."""

    name = "parameter:linear"

    def apply_a(self, b, layer, x, a):
        dtype = b.dtype_of(x, layer.weight_dtype)
        return b.call(aten.linear.default, x, b.cast(a, dtype, b.dtype_of(a, dtype)))

    def apply_b(self, b, layer, h, weight_b, bias):
        dtype = b.dtype_of(h, layer.weight_dtype)
        return b.call(aten.linear.default, h, b.cast(weight_b, dtype, b.dtype_of(weight_b, dtype)))


class GroupedMMRead(ParameterKind):
    """Experts read by a grouped matmul `op(x (S, in), Wᵀ (E, in, out), offs)` — aten's
    `_grouped_mm`, `F.grouped_mm`, transformers' `grouped_mm_fallback` — the adapter is the same op
    twice, with Aᵀ (E, in, r) and Bᵀ (E, r, out) and the call's own group offsets. Bound to its
    call (`bind`) so the adapter repeats the call's extra arguments."""

    name = "parameter:grouped_mm"

    def __init__(self, call: fx.Node | None = None):
        self.call = call

    def bind(self, call: fx.Node) -> GroupedMMRead:
        return GroupedMMRead(call)

    def _same_op(self, b, x, weight):
        args = (x, weight, *self.call.args[2:])
        return b.call(self.call.target, *args, **self.call.kwargs)

    def apply_a(self, b, layer, x, a):
        dtype = b.dtype_of(x, layer.weight_dtype)
        a3 = _experts_a(b, layer, a, dtype)
        pad = _rank_padding(b, layer, a, 0, dtype)
        if pad:  # zero rows of A: h gains zero columns, its row stride becomes aligned
            a3 = b.call(aten.constant_pad_nd.default, a3, [0, 0, 0, pad], 0.0)
        # (E, in, r), laid out so each expert's matrix is column-major as the base's transposed weight.
        return self._same_op(b, x, b.call(aten.transpose.int, a3, -2, -1))

    def apply_b(self, b, layer, h, weight_b, bias):
        dtype = b.dtype_of(h, layer.weight_dtype)
        b3 = _experts_b(b, layer, b.cast(weight_b, dtype, b.dtype_of(weight_b, dtype)))
        pad = _rank_padding(b, layer, weight_b, 1, dtype)
        if pad:  # zero columns of B meet h's zero columns: the product is unchanged
            b3 = b.call(aten.constant_pad_nd.default, b3, [0, pad], 0.0)
        else:
            b3 = b.call(aten.clone.default, b3, memory_format=torch.contiguous_format)
        b3 = _pinned_contiguous(b, b3)
        return self._same_op(b, h, b.call(aten.transpose.int, b3, -2, -1))


def _pinned_contiguous(b, node: fx.Node) -> fx.Node:
    """`node` (a fresh contiguous tensor: the pad's or clone's output) read through an `as_strided`
    of its own contiguous strides. Inductor lays out a copy's output in the order of the tensor it
    reads (here B's rank-major (out, r, E): experts innermost), and neither `clone(contiguous_format)`
    nor the grouped matmul's lowering pins it; strides with experts innermost are neither row- nor
    column-major per expert, and `aten._grouped_mm` refuses them ("Invalid strides/sizes").
    Inductor keeps an `as_strided` input at its eager strides (graph.py's `as_strided_ops`)."""
    shape = b.shape_of(node)
    if shape is None:
        return node
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return b.call(aten.as_strided.default, node, shape, strides, 0)


def _rank_padding(b, layer, factor: fx.Node, rank_dim: int, dtype: torch.dtype) -> int:
    """How many zero ranks to add so that a rank-r operand's rows are 16-byte aligned, as
    `aten._grouped_mm` requires of both operands' strides (bf16: r a multiple of 8; seen with r=2
    on a bf16 MoE). `factor` holds r·E along `rank_dim`: A (r·E, in) along 0, B (out, r·E) along 1."""
    shape = b.shape_of(factor)
    if shape is None:
        return 0
    align = 16 // dtype.itemsize
    return -(shape[rank_dim] // layer.num_experts) % align


def is_grouped_mm(node: fx.Node) -> bool:
    return node.op == "call_function" and "grouped_mm" in target_name(node)


PARAMETER = ParameterKind()
LINEAR_READ = LinearRead()
GROUPED_MM = GroupedMMRead()
