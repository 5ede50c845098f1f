"""The per-call input channel: values a variant computes from each call's inputs.

Some adapters depend on the call, not only on their weights: aLoRA applies from the invocation
tokens in `input_ids` onward, a mixed batch picks an adapter per row. Such values are graph
nodes computed from the graph's user inputs, so they change with every call at no cost: no
constant is baked in, nothing recompiles when the values change (only, as for any graph, when
shapes do under static shapes).

`CallValues` is what a variant gets at every site of one graph (`SiteCall.call_values`):
- `user_input(name)`: the graph input of the model's argument `name` ("input_ids"), in every
  route: Dynamo graphs (named by their source, `L['input_ids']`), exported programs (the
  signature's user inputs) and GraphModules (`.module()`, `symbolic_trace`: placeholders);
- `derived(key, build)`: a value built once per graph from user inputs and shared by every site
  that asks for the same key (an aLoRA mask is computed once, not once per layer). It is built
  just before the first site that asks, so every later site can read it.
- `carried(key, batch_of=..., dtype=...)` / `carry_forward(key, node)`: a per-row value that
  crosses calls (aLoRA's "this row was invoked" while generating with a KV cache, where a decode
  step sees only the new token). The graph reads the value the previous call left, and leaves its
  own; rows start at zero (False), and a call with another batch size starts afresh. Routes that
  run one call at a time with no state (exported programs) do not offer it: asking raises, naming
  who asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

import torch
import torch.fx as fx

from .errors import LoraFxError, UnsupportedFeatureError
from .graph_builder import GraphBuilder, node_value

# Dynamo's sources of a frame's inputs: `L['x']`, `L['kwargs']['x']` (a `**kwargs` frame: the
# module's `__call__`, a decorated `forward`), `L['args'][i]` (a `*args` frame).
_SOURCE = re.compile(r"^L\[['\"]([^'\"]+)['\"]\]$")
_KWARG = re.compile(r"^L\[['\"]kwargs['\"]\]\[['\"]([^'\"]+)['\"]\]$")
_ARG = re.compile(r"^L\[['\"]args['\"]\]\[(\d+)\]$")
# `args[0]` is the module itself (`__call__`): its parameters / buffers / submodules are read through it
# (not `L['args'][0].size()[0]`, the dynamic batch size of a first tensor argument).
_MODULE_ARG = re.compile(r"^L\[['\"]args['\"]\]\[0\]\.(_modules|_parameters|_buffers)\b")


def user_input_names(placeholders: list[fx.Node], user: set[str] | None = None,
                     positional: list[str] | None = None) -> dict[str, fx.Node]:
    """argument name -> placeholder, for the placeholders that are the model's own inputs.

    Args:
        placeholders: the graph's placeholders.
        user: the names of the user-input placeholders, where the route knows them (an exported
            program's signature); else Dynamo's sources tell them apart from parameters, and in a
            GraphModule every placeholder is a user input.
        positional: the model's `forward` parameter names, in order (names inputs given by position
            to a `*args` frame); without them such inputs are not named.
    """
    out: dict[str, fx.Node] = {}
    sources = {node: getattr(node.meta.get("grapharg"), "source", None) for node in placeholders}
    module_first = any(s is not None and _MODULE_ARG.match(s.name) for s in sources.values())
    for node in placeholders:
        source = sources[node]
        if source is None:
            if user is None or node.name in user:
                out[node.name] = node
            continue
        m = _SOURCE.match(source.name) or _KWARG.match(source.name)
        if m is not None and m.group(1) not in ("args", "kwargs"):
            out[m.group(1)] = node
            continue
        m = _ARG.match(source.name)
        if m is not None and positional is not None:
            index = int(m.group(1)) - module_first
            if 0 <= index < len(positional):
                out.setdefault(positional[index], node)
    return out


# The model inputs a batch is read from first, by name (transformers' conventions), as PEFT's
# `adapter_names=` checks against them.
BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def batch_input(user_inputs: dict[str, fx.Node], *, rows=None, examples: dict | None = None) -> fx.Node | None:
    """The user input whose first dimension is the batch: `input_ids` (and the other names of
    `BATCH_INPUTS`) first, then inputs of two or more dimensions, then 1-D ones, in graph order.
    `rows`: the batch size the caller knows (a per-row list): only an input with that many rows
    (by its example value in `examples`, else its fake value) qualifies."""
    def value(node):
        return (examples or {}).get(node, node_value(node))

    def qualifies(node) -> bool:
        v = value(node)
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return False
        return rows is None or not isinstance(v.shape[0], int) or v.shape[0] == rows

    named = [user_inputs[n] for n in BATCH_INPUTS if n in user_inputs]
    rest = [n for n in user_inputs.values() if n not in named]
    ordered = named + [n for n in rest if value(n) is not None and getattr(value(n), "dim", lambda: 0)() >= 2] + \
        [n for n in rest if value(n) is not None and getattr(value(n), "dim", lambda: 0)() == 1]
    return next((n for n in ordered if qualifies(n)), None)


class CarriedState(Protocol):
    """A route's way of carrying per-row values between calls (the backend implements it)."""

    def input(self, key: str, batch_of: fx.Node, dtype: torch.dtype) -> fx.Node:
        """A new graph input: `key`'s value from the previous call, of shape [batch] where batch
        is `batch_of`'s first dimension (a user input); zeros where there is none."""

    def output(self, key: str, node: fx.Node) -> None:
        """Make `node` ([batch]) the value the next call reads as `key`."""


class CallValues:
    """Per-call values for the sites of one graph; see the module docstring."""

    def __init__(self, graph: fx.Graph, user_inputs: dict[str, fx.Node], fake_mode=None,
                 carry: CarriedState | None = None):
        self.graph = graph
        self.user_inputs = user_inputs
        self.fake_mode = fake_mode
        self.carry = carry
        self._carried: dict[str, fx.Node] = {}
        self._derived: dict[str, fx.Node] = {}
        # (node, the layer whose site built it): derived nodes are part of the adapters (merging
        # removes them with the last adapter that reads them).
        self.created: list[tuple[fx.Node, str]] = []
        self.site: fx.Node | None = None  # set by inject_adapters before each site's emit
        self.layer = ""

    def user_input(self, name: str, *, needed_by: str = "this adapter") -> fx.Node:
        """The graph input of the model's argument `name`.

        Raises:
            LoraFxError: the graph has no such input (the error lists those it has).
        """
        node = self.user_inputs.get(name)
        if node is None:
            raise LoraFxError(f"{needed_by} needs the model input {name!r} at every call, but the graph's inputs are "
                              f"{sorted(self.user_inputs)}; call the model with {name}=...")
        return node

    def derived(self, key: str, build: Callable[[GraphBuilder], fx.Node]) -> fx.Node:
        """The value `build` computes from user inputs: built once per graph, just before the first
        site that asks for `key`, and shared by every later one."""
        if key not in self._derived:
            builder = GraphBuilder(self.graph, self.site.prev, self.fake_mode)
            self._derived[key] = build(builder)
            self.created += [(n, self.layer) for n in builder.created]
        return self._derived[key]

    def carried(self, key: str, *, batch_of: fx.Node, dtype: torch.dtype = torch.bool,
                needed_by: str = "this adapter") -> fx.Node:
        """The per-row value `key` as the previous call left it (zeros at first, and whenever the
        batch size changes).

        Raises:
            UnsupportedFeatureError: this route keeps no state between calls.
        """
        if self.carry is None:
            raise UnsupportedFeatureError(
                f"{needed_by} needs state carried from one call to the next (a KV-cache decode step sees only the "
                "new tokens), which an exported program does not keep; run the model through lora_fx.backend, or "
                "export a program that takes whole sequences (no position_ids / cache_position input)")
        if key not in self._carried:
            self._carried[key] = self.carry.input(key, batch_of, dtype)
        return self._carried[key]

    def carry_forward(self, key: str, node: fx.Node) -> None:
        """Make `node` the value the next call reads as `carried(key)` (one writer per key)."""
        self.carry.output(key, node)
