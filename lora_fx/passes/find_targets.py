"""find_targets: annotate every adaptable call site of a graph with a frozen `TargetSite`.

What it matches, in any of the graphs lora_fx sees:
- Dynamo torch IR: `torch._C._nn.linear`, `F.embedding`, `torch.conv{1,2,3}d`, `torch.addmm`
  (transformers Conv1D), with weights as parameter placeholders (`grapharg` sources);
- export aten IR: `aten.linear`, `aten.embedding`, `aten.conv{1,2,3}d` (both overloads),
  `aten.convolution` (not transposed), `aten.addmm`, with weights as parameter placeholders
  named by the graph signature;
- GraphModules: the same ops with weights as `get_attr` nodes (`ep.module()`), or `call_module`
  nodes of Linear / Conv1D / Embedding / ConvNd (`symbolic_trace`).
A call is a site only if the innermost module on its `nn_module_stack` is an adaptable layer
of the op's kind (PEFT adapts modules, not functional calls); the layer's name is that
module's path. Tied weights therefore adapt by module: GPT-2's `lm_head` and `wte` share a
weight but are separate sites.

Invariants: the pass only writes `node.meta["lora_fx_site"]`; the graph is unchanged.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph_builder import attr_at, node_value
from ..layers import (
    CONV,
    EMBEDDING,
    HF_CONV1D,
    LINEAR,
    LINEAR_KINDS,
    LayerInfo,
    class_qualname,
    kind_of_class,
    layer_of_module,
)

SITE_KEY = "lora_fx_site"
aten = torch.ops.aten


@dataclass(frozen=True)
class TargetSite:
    """An adaptable call: `node.args[input_index]` is the layer input (`None` for call_module,
    whose input is `args[0]`); `weight` names the weight (parameter FQN or get_attr target)."""

    layer: LayerInfo
    input_index: int
    weight: str


# -- op table ---------------------------------------------------------------------------------
_LINEAR_OPS = {torch._C._nn.linear, aten.linear.default}
_EMBEDDING_TORCH = {F.embedding}
_EMBEDDING_ATEN = {aten.embedding.default}
_ADDMM_OPS = {torch.addmm, aten.addmm.default}
_CONV_TORCH = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
               aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
               aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tuple(value, n: int) -> tuple[int, ...] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 and n > 1 else value


def _parse_call(node: fx.Node):
    """(kind, input_index, weight_node, extras) for an adaptable op call, else None."""
    t = node.target
    if t in _LINEAR_OPS:
        return LINEAR, 0, _arg(node, 1, "weight"), {}
    if t in _EMBEDDING_TORCH:
        pad = _arg(node, 2, "padding_idx")
        return EMBEDDING, 0, _arg(node, 1, "weight"), {"padding_idx": pad}
    if t in _EMBEDDING_ATEN:
        pad = _arg(node, 2, "padding_idx", -1)
        return EMBEDDING, 1, _arg(node, 0, "weight"), {"padding_idx": None if pad == -1 else pad}
    if t in _ADDMM_OPS:
        return HF_CONV1D, 1, _arg(node, 2, "mat2"), {}
    if t in _CONV_TORCH:
        n = _CONV_TORCH[t]
        return CONV, 0, _arg(node, 1, "weight"), {
            "stride": _tuple(_arg(node, 3, "stride", 1), n), "padding": _tuple(_arg(node, 4, "padding", 0), n),
            "dilation": _tuple(_arg(node, 5, "dilation", 1), n), "groups": int(_arg(node, 6, "groups", 1))}
    if t is aten.convolution.default and not node.args[6]:
        w = node.args[1]
        n = len(node_value(w).shape) - 2 if isinstance(w, fx.Node) and node_value(w) is not None else 2
        return CONV, 0, w, {"stride": _tuple(node.args[3], n), "padding": _tuple(node.args[4], n),
                            "dilation": _tuple(node.args[5], n), "groups": int(node.args[8])}
    return None


# -- names ------------------------------------------------------------------------------------
_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]")
_ITEM = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def normalize_path(path: str) -> str:
    """`L['self']._modules['model'].layers[0]` -> `model.layers.0` (Dynamo spellings of a path)."""
    path = _ROOT.sub("", path)
    path = re.sub(r"\._(modules|parameters|buffers)(?=\[)", "", path)
    path = _ITEM.sub(lambda m: "." + m.group(1), path)
    return path.lstrip(".")


def _module_stack_entry(node: fx.Node):
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return normalize_path(path), cls


def _weight_name(weight: fx.Node, param_names: dict[str, str]) -> str | None:
    if weight.op == "get_attr":
        return weight.target
    if weight.op != "placeholder":
        return None
    if weight.name in param_names:
        return param_names[weight.name]
    grapharg = weight.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is not None and "_parameters" in source.name:
        return normalize_path(source.name)
    return None


def _weight_tensor(gm: fx.GraphModule, weight: fx.Node):
    if weight.op == "get_attr":
        return attr_at(gm, weight.target)
    return node_value(weight)


def _site_of_call(gm: fx.GraphModule, node: fx.Node, param_names: dict[str, str]) -> TargetSite | None:
    parsed = _parse_call(node)
    if parsed is None:
        return None
    kind, input_index, weight, extras = parsed
    if not isinstance(weight, fx.Node):
        return None
    weight_name = _weight_name(weight, param_names)
    if weight_name is None:
        return None  # a computed weight (e.g. a dequantised one): not a parameter site
    w = _weight_tensor(gm, weight)
    if not isinstance(w, torch.Tensor):
        return None
    entry = _module_stack_entry(node)
    if entry is not None:
        name, cls = entry
        if kind_of_class(cls) != kind:
            return None
        class_name = class_qualname(cls)
    else:
        name, class_name = weight_name.rsplit(".", 1)[0], ""
    if kind == LINEAR:
        dims = dict(in_features=w.shape[1], out_features=w.shape[0])
    elif kind in (HF_CONV1D, EMBEDDING):
        dims = dict(in_features=w.shape[0], out_features=w.shape[1])
    else:
        groups = extras["groups"]
        dims = dict(in_features=w.shape[1] * groups, out_features=w.shape[0], kernel_size=tuple(w.shape[2:]))
    has_bias = kind in (LINEAR, CONV) and _arg(node, 2, "bias") is not None or kind == HF_CONV1D
    layer = LayerInfo(name=name, kind=kind, class_name=class_name, has_bias=has_bias,
                      weight_dtype=w.dtype, weight_device=str(w.device), **dims, **extras)
    return TargetSite(layer, input_index, weight_name)


def _site_of_module_call(gm: fx.GraphModule, node: fx.Node) -> TargetSite | None:
    module = gm.get_submodule(node.target)
    layer = layer_of_module(node.target, module)
    if layer is None:
        return None
    return TargetSite(layer, 0, f"{node.target}.weight")


def find_targets(gm: fx.GraphModule, param_names: dict[str, str] | None = None) -> list[fx.Node]:
    """Annotate the adaptable call sites of `gm`; return their nodes in graph order.

    Args:
        gm: a Dynamo, export (aten) or plain GraphModule.
        param_names: placeholder name -> parameter FQN (an ExportedProgram's signature).
    """
    param_names = param_names or {}
    found = []
    for node in gm.graph.nodes:
        site = None
        if node.op == "call_function":
            site = _site_of_call(gm, node, param_names)
        elif node.op == "call_module":
            site = _site_of_module_call(gm, node)
        if site is not None:
            node.meta[SITE_KEY] = site
            found.append(node)
    return found


def weight_node(node: fx.Node) -> fx.Node | None:
    """The weight argument of an adaptable op call (None for `call_module` sites)."""
    parsed = _parse_call(node) if node.op == "call_function" else None
    weight = parsed[2] if parsed is not None else None
    return weight if isinstance(weight, fx.Node) else None


def bias_node(node: fx.Node) -> fx.Node | None:
    """The bias argument of an adaptable op call, if any (`addmm`'s is its first argument)."""
    if node.op != "call_function":
        return None
    t = node.target
    if t in _ADDMM_OPS:
        bias = _arg(node, 0, "input")
    elif t in _LINEAR_OPS or t in _CONV_TORCH or t is aten.convolution.default:
        bias = _arg(node, 2, "bias")
    else:
        bias = None
    return bias if isinstance(bias, fx.Node) else None


def site_layers(nodes: list[fx.Node]) -> list[LayerInfo]:
    """One LayerInfo per layer name (a layer called twice is one layer)."""
    seen: dict[str, LayerInfo] = {}
    for node in nodes:
        layer = node.meta[SITE_KEY].layer
        seen.setdefault(layer.name, layer)
    return list(seen.values())


# Ops through which a value still "is" the layer's output (shape, dtype, slicing only).
_PASS_THROUGH = {
    "view", "reshape", "_unsafe_view", "slice", "select", "getitem", "contiguous", "clone", "alias",
    "detach", "float", "to", "_to_copy", "type_as", "squeeze", "unsqueeze", "permute", "transpose",
    "flatten", "expand", "t",
}


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    return getattr(t, "__name__", str(t))


def output_layer_names_of_graph(site_nodes: list[fx.Node]) -> set[str]:
    """The layers `"all-linear"` leaves out when no model object is at hand: the linear layers
    whose output is returned from the graph unchanged up to shape/dtype ops (the LM head of a
    causal or masked LM). With a model at hand, `layers.output_layer_names` (PEFT's rule) is used."""
    out = set()
    for node in site_nodes:
        site = node.meta[SITE_KEY]
        if site.layer.kind not in LINEAR_KINDS:
            continue
        todo, seen = [node], set()
        while todo:
            cur = todo.pop()
            for user in cur.users:
                if user.op == "output":
                    out.add(site.layer.name)
                elif user not in seen and user.op in ("call_function", "call_method") \
                        and _target_name(user) in _PASS_THROUGH:
                    seen.add(user)
                    todo.append(user)
    return out


def with_layer(site: TargetSite, layer: LayerInfo) -> TargetSite:
    return replace(site, layer=layer)
