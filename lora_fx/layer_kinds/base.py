"""The layer-kind protocol: everything lora_fx knows about one kind of adaptable layer.

A kind (Linear, transformers' Conv1D, Embedding, ConvNd, ...) says
- which module classes are of that kind (`module_classes`) and how such a module is described
  (`describe_module`);
- how a call of that kind is read from a graph (`parse`: the op, the input, the weight, the
  bias, the hyperparameters) and the layer's sizes from its weight (`dims_of_weight`);
- the weight's layout: `rows` views the weight with one row per output channel, `from_rows`
  turns such rows back into the stored layout, `channel_view` shapes a per-output-channel
  vector to broadcast over the stored weight, `channel_of_output` over the layer's output;
- the adapter in this kind's form: the PEFT keys and shapes of the LoRA factors
  (`factor_keys` / `factor_shapes`), the graph nodes of `A(x)` and `B(h)` (`apply_a` /
  `apply_b`), the base op without its bias (`apply_base`), and the factors as matrices in the
  row layout (`factor_matrices`), from which every variant's merge math follows; where PEFT's
  DoRA normalises another tensor than `B·A` (grouped convs), that tensor (`dora_norm_delta`).
Variants ask the kind (`layer.kind`); they never branch on which kind it is. Adding a kind is
one file in this package and one `register` call (`layer_kinds/__init__.py`).

This module also holds the graph readers the kinds share (`ParsedCall`, `untransposed`,
`broadcast_weight`, `target_name`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from ..graph_builder import node_value

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..layers import LayerInfo

aten = torch.ops.aten


@dataclass(frozen=True)
class ParsedCall:
    """An adaptable op call as read from the graph: `node.args[input_index]` is the layer input,
    `weight` the node the weight comes from (the parameter itself, seen through a transpose),
    `bias` the bias node or None, `extras` the layer hyperparameters the call carries."""

    kind: LayerKind
    input_index: int
    weight: Any
    bias: Any = None
    extras: dict = field(default_factory=dict)


class LayerKind:
    """Base class of the registered layer kinds; see the module docstring."""

    name: str = ""
    module_classes: tuple[str, ...] = ()
    linear_family: bool = False   # a candidate of target_modules="all-linear"
    lookup: bool = False          # its input is indices: no dtype cast, no dropout (as PEFT)
    output_channel_dim: int = -1  # the output's channel dimension (per-channel DoRA vectors)
    targets_parameter: bool = False  # chosen by `target_parameters` (a raw parameter), not `target_modules`
    # The adapter reads the module's input and is added to the module's output, whatever ops the
    # module computes in between (quantized layers: PEFT wraps the module, and the op is the
    # library's own). Such kinds `parse` nothing (they return None); find_targets reads the
    # module's boundary.
    module_boundary: bool = False
    # Its call reads the model's rows flattened with their tokens (a leading dimension of batch x
    # tokens, each row's tokens together: transformers' Conv1D views its input as 2-D). Other kinds'
    # leading dimension must be the batch itself for a mixed-adapter batch (`inject_adapter_bank`).
    rows_flattened: bool = False
    # PEFT rounds the adapter's output to the base output's dtype before adding it (its bitsandbytes
    # layers), instead of adding in the wider dtype and rounding the sum once (its other layers).
    rounds_delta_first: bool = False
    # Ops of this kind's base that have no autograd formula -> a thunk giving their differentiable
    # twin (same schema and forward); ops that have no twin -> why (passes/differentiate_base_ops.py).
    gradient_twins: Mapping[str, Callable[[], Any]] = MappingProxyType({})
    gradientless_ops: Mapping[str, str] = MappingProxyType({})

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__

    # -- reading -----------------------------------------------------------------------------
    def parse(self, node: fx.Node) -> ParsedCall | None:
        """The call of this kind `node` is, else None."""
        raise NotImplementedError

    def dims_of_weight(self, weight: torch.Tensor, extras: dict) -> dict:
        """`in_features` / `out_features` (PEFT's meaning) and shape hyperparameters, from the weight."""
        raise NotImplementedError

    def describe_module(self, module: torch.nn.Module) -> dict:
        """The `LayerInfo` fields of a module of this kind besides name, class and dtype."""
        raise NotImplementedError

    # -- the adapter's form ------------------------------------------------------------------
    def check(self, layer: LayerInfo, r: int, cfg: LoraConfig) -> str | None:
        """Why a rank-`r` LoRA under `cfg` does not fit this layer, or None."""
        return None

    def factor_keys(self) -> tuple[str, str]:
        """PEFT's keys of the A and B factors."""
        return "lora_A.weight", "lora_B.weight"

    def factor_shapes(self, layer: LayerInfo, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, layer.in_features), (layer.out_features, r)

    def adapter_input(self, b, x: fx.Node, adapter_dtype: torch.dtype, weight_dtype: torch.dtype,
                      dropout: float) -> fx.Node:
        """The adapter's input made from the layer's: cast to the adapters' dtype, then dropout
        (`dropout` is 0 outside training). Kinds whose input is indices or the weight override it."""
        x = b.cast(x, adapter_dtype, b.dtype_of(x, weight_dtype))
        return b.call(aten.dropout.default, x, float(dropout), True) if dropout > 0 else x

    def apply_a(self, b, layer: LayerInfo, x: fx.Node, a: fx.Node) -> fx.Node:
        """`A(x)`: the rank-r intermediate."""
        return b.call(aten.linear.default, x, a)

    def apply_b(self, b, layer: LayerInfo, h: fx.Node, weight_b: fx.Node, bias: fx.Node | None) -> fx.Node:
        """`B(h)` (+ the adapter's own bias)."""
        return b.call(aten.linear.default, h, weight_b, bias)

    def apply_base(self, b, layer: LayerInfo, x: fx.Node, weight: fx.Node) -> fx.Node:
        """The base op on `x` without its bias (DoRA with dropout)."""
        raise NotImplementedError

    def factor_matrices(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as matrices with `rows(delta) = B @ A`."""
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor, layer: LayerInfo,
                     weight_shape: torch.Size) -> torch.Tensor:
        """`B·A` (unscaled) in the stored weight's layout."""
        a, b = self.factor_matrices(a, b)
        return self.from_rows(b @ a, weight_shape)

    def merge_blocker(self, layer: LayerInfo) -> str | None:
        """Why no weight of the base's shape can hold B·A, or None."""
        return None

    def dora_norm_delta(self, call: Callable, layer: LayerInfo, a: Any, b: Any, r: int) -> Any | None:
        """The tensor (rows layout, unscaled) that PEFT's DoRA adds, times the scaling, to `rows(W)`
        before taking each output channel's norm, when that tensor is not this kind's `B·A`; None
        when it is (the variant then uses its factored norm of `W + s·B·A`, which never builds it).

        `a`, `b` are the factors in PEFT's stored shapes, and `call(op, *args)` applies an aten op:
        to tensors (the magnitude's init) or, given a `GraphBuilder.call`, as graph nodes, so one
        definition serves both."""
        return None

    # -- the weight's layout -------------------------------------------------------------------
    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored weight with one row per output channel (a view)."""
        return weight.reshape(weight.shape[0], -1)

    def rows_node(self, b, layer: LayerInfo, weight: fx.Node) -> fx.Node:
        return weight

    def from_rows(self, rows: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
        """`rows` (one per output channel) in the stored weight's layout."""
        return rows.reshape(weight_shape)

    def channel_view(self, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over the stored weight."""
        return g.view(-1, *([1] * (weight.dim() - 1)))

    def channel_of_output(self, b, vec: fx.Node, like: fx.Node) -> fx.Node:
        """A per-output-channel vector node shaped to broadcast against the output `like`."""
        return vec

    def magnitude_shape(self, layer: LayerInfo) -> tuple[int, ...]:
        """The shape PEFT stores a per-output-channel vector (DoRA's magnitude) in."""
        return (layer.out_features,)


class OutputColumnsLayout:
    """Mixin for kinds whose stored 2-D weight has one column per output channel (Conv1D's
    (in, out), an embedding's (num_embeddings, dim))."""

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def rows_node(self, b, layer: LayerInfo, weight: fx.Node) -> fx.Node:
        return b.call(aten.t.default, weight)

    def from_rows(self, rows: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
        return rows.t()

    def channel_view(self, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return g.view(1, -1)


# -- graph readers shared by the kinds -------------------------------------------------------
def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def as_tuple(value, n: int) -> tuple[int, ...] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 and n > 1 else value


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, torch.t}


def untransposed(node) -> fx.Node | None:
    """`W` if `node` is `Wᵀ` of a 2-D `W` (`t`, `.T`, `permute(·, [1, 0])`, `transpose(·, 0, 1)`, in
    aten or Dynamo's torch IR), else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    t, args = node.target, node.args
    if t in _TRANSPOSES or (node.op == "call_method" and t == "t"):
        return args[0]
    if t is getattr and len(args) == 2 and args[1] == "T":
        return args[0]
    if t in (aten.permute.default, "permute") and [int(d) for d in _flat(args[1:])] == [1, 0]:
        return args[0]
    if t in (aten.transpose.int, torch.transpose, "transpose") and len(args) == 3 \
            and sorted(int(d) % 2 for d in args[1:3]) == [0, 1]:
        return args[0]
    return None


def _flat(args) -> list:
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)


def broadcast_weight(node) -> fx.Node | None:
    """`W` if `node` is `Wᵀ` of a 2-D `W` broadcast over leading batch dims (the second operand
    of the `bmm` a decomposed `matmul` becomes: `view(expand(permute(W)))`), else None."""
    want = None
    while isinstance(node, fx.Node):
        w = untransposed(node)
        if w is not None:
            val = node_value(node)
            ok = want is None or (isinstance(val, torch.Tensor) and tuple(val.shape) == want)
            return w if ok and val is not None and val.dim() == 2 else None
        if target_name(node) not in ("expand", "view", "_unsafe_view", "reshape", "unsqueeze"):
            return None
        val = node_value(node)
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            return None
        if want is not None and tuple(val.shape[-2:]) != want:
            return None
        want = tuple(val.shape[-2:])
        node = node.args[0]
    return None


def target_name(node: fx.Node) -> str:
    """The op's short name (`linear`, `add`, `view`, ...) whatever IR spells it."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    return getattr(t, "__name__", str(t))
