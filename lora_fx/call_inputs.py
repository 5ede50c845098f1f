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
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.fx as fx

from .errors import LoraFxError
from .graph_builder import GraphBuilder

_SOURCE = re.compile(r"^L\[['\"]([^'\"]+)['\"]\]$")


def user_input_names(placeholders: list[fx.Node], user: set[str] | None = None) -> dict[str, fx.Node]:
    """argument name -> placeholder, for the placeholders that are the model's own inputs.

    Args:
        placeholders: the graph's placeholders.
        user: the names of the user-input placeholders, where the route knows them (an exported
            program's signature); else Dynamo's sources tell them apart from parameters, and in a
            GraphModule every placeholder is a user input.
    """
    out: dict[str, fx.Node] = {}
    for node in placeholders:
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is not None:
            m = _SOURCE.match(source.name)
            if m is not None:
                out[m.group(1)] = node
            continue
        if user is None or node.name in user:
            out[node.name] = node
    return out


class CallValues:
    """Per-call values for the sites of one graph; see the module docstring."""

    def __init__(self, graph: fx.Graph, user_inputs: dict[str, fx.Node], fake_mode=None):
        self.graph = graph
        self.user_inputs = user_inputs
        self.fake_mode = fake_mode
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
