"""Node creation for the rewrite passes.

Every node a pass adds goes through `GraphBuilder.call`, which (1) inserts it in order,
(2) copies `nn_module_stack` / `stack_trace` from the site it belongs to, so profiles and
error messages point at the user's layer, and (3) keeps `meta["val"]` right by running the op
on the inputs' fake values when the graph carries them (export and Dynamo graphs do; a
`symbolic_trace` graph does not, and then no values are computed).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr")


def node_value(node: Any) -> Any:
    """The fake value a node carries (`val` in aten graphs, `example_value` in Dynamo graphs)."""
    if not isinstance(node, fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of `gm`'s graph (node.meta copied shallowly), keeping its calling
    convention (`ep.module()`'s pytree codegen and in/out specs). Passes rewrite the copy, never
    the caller's graph (Dynamo also keeps reading its own after the backend returns)."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, graph)
    if hasattr(gm, "_in_spec"):
        new._in_spec, new._out_spec = gm._in_spec, gm._out_spec
    return new


def attr_at(root: Any, path: str) -> Any:
    """`root.a.b.c` for the dotted `path` (a get_attr target, a parameter FQN, a module path)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def install_attr(gm: nn.Module, original_root: nn.Module, path: str, value) -> None:
    """Set `gm.<path> = value` without touching a module `gm` shares with `original_root` (a
    GraphModule copy shares submodules with the one it was copied from: copy-on-write). Without
    `original_root`, every module on the path is copied (shallowly) first.

    Example:
        >>> import torch
        >>> root = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> copy_ = torch.fx.GraphModule(root, torch.fx.symbolic_trace(root).graph)
        >>> install_attr(copy_, root, "0.bias", torch.nn.Parameter(torch.zeros(2)))
        >>> bool(root[0].bias.abs().sum() > 0) and torch.equal(copy_.get_submodule("0").bias, torch.zeros(2))
        True
    """
    *prefix, leaf = path.split(".")
    mod, orig = gm, original_root
    for part in prefix:
        child = getattr(mod, part)
        orig_child = getattr(orig, part, None) if orig is not None else None
        # Shared with the caller's module (or, without `original_root`, possibly shared): copy this
        # level before writing below it.
        if original_root is None or child is orig_child:
            child = copy.copy(child)
            child._modules, child._parameters, child._buffers = (dict(child._modules), dict(child._parameters),
                                                                 dict(child._buffers))
            setattr(mod, part, child)
        mod, orig = child, orig_child
    setattr(mod, leaf, value)


def graph_fake_mode(graph: fx.Graph):
    """The fake mode the graph's own values live in (not the ambient tracing context's)."""
    for node in graph.nodes:
        val = node_value(node)
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def fake_like(fake_mode, tensor: torch.Tensor) -> torch.Tensor:
    """A fake of `tensor` in `fake_mode` with static shapes and `tensor`'s `requires_grad` as it is
    now. Made afresh each time: `from_tensor` memoises per tensor, and a fake made while the tensor
    was frozen would keep `requires_grad=False` after it trains again (AOTAutograd would then compute
    no gradient for it: a graph built after `set_adapter` changed which adapters train)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter):  # a subclass (DTensor): its own fake conversion
        return fake_mode.from_tensor(tensor, static_shapes=True)
    with fake_mode:
        fake = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype,
                                   device=tensor.device)
    return fake.requires_grad_(tensor.requires_grad) if tensor.is_floating_point() else fake


class GraphBuilder:
    """Appends nodes after an anchor node, in program order, with metadata."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode=None):
        self.graph = graph
        self.anchor = anchor
        self.fake_mode = fake_mode
        self.created: list[fx.Node] = []
        # Insert before the node that currently follows the anchor: successive calls then
        # come out in call order (`inserting_after` would reverse them).
        self._next = anchor.next

    def call(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self._next):
            node = self.graph.call_function(target, args, kwargs)
        for key in _COPIED_META:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        if self.fake_mode is not None:
            fargs, fkwargs = fx.node.map_arg((args, kwargs), node_value)
            with self.fake_mode:
                node.meta["val"] = target(*fargs, **fkwargs)
            if "example_value" in self.anchor.meta:  # a Dynamo graph: its passes (and AOTAutograd's
                node.meta["example_value"] = node.meta["val"]  # cache check) read this key
        self.created.append(node)
        return node

    @staticmethod
    def dtype_of(node: fx.Node, default: torch.dtype) -> torch.dtype:
        val = node_value(node)
        return val.dtype if isinstance(val, torch.Tensor) else default

    @staticmethod
    def shape_of(node: fx.Node) -> list | None:
        """The node's shape (ints where static, SymInts where dynamic); None if the graph has no values."""
        val = node_value(node)
        return list(val.shape) if isinstance(val, torch.Tensor) else None

    def cast(self, node: fx.Node, dtype: torch.dtype, current: torch.dtype) -> fx.Node:
        if dtype == current:
            return node
        return self.call(torch.ops.aten._to_copy.default, node, dtype=dtype)
