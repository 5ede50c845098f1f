"""The marks lora_fx leaves on graph nodes, and how they are read.

Marks live in `node.meta["custom"]`, the metadata torch.export carries through
`run_decompositions()`, `.module()`, re-export and (for call nodes) `torch.export.save/load`, so a
program can be recognised as transformed or merged from its graph alone. Values are strings (the
layer name) or lists of strings, so they serialise.

- `ADAPTER`: on every node an adapter subgraph added (the layer name).
- `OUTPUT`: on the node that replaced a base call's output (the layer name).
- `INPUT`: on the graph inputs that feed adapter tensors (`[layer, key]`).
- `BASE`: on the base call of an adapted site (the layer name); decompositions copy it onto every
  node the call becomes, so the base output an adapter reads stays recognisable.
- `MERGED`: on a base call whose weight holds a merged adapter (the layer name).
- `CONFIG`: on every adapter output (and merged base call): the adapter's config and whether
  its dropout is compiled in, as JSON (`program_adapters.py` reads a program's adapters from it).

`meta["custom"]` is never mutated in place: graph copies share node meta dicts shallowly, and
the caller's graph must not change when a copy is marked.
"""

from __future__ import annotations

import json
from typing import Any

import torch.fx as fx

CUSTOM = "custom"
ADAPTER = "lora_fx.adapter"
OUTPUT = "lora_fx.output"
INPUT = "lora_fx.input"
MERGED = "lora_fx.merged"
BASE = "lora_fx.base"
CONFIG = "lora_fx.config"


def config_mark(config: dict, train: bool, named: dict[str, dict] | None = None) -> str:
    """The `CONFIG` mark's value: the config as PEFT saves it, and whether dropout is compiled in;
    for a graph over several named adapters also `named`, each adapter's config by name, in index
    order (`named_programs.py`)."""
    data = {"config": config, "train": bool(train)}
    if named is not None:
        data["named"] = [[name, cfg] for name, cfg in named.items()]
    return json.dumps(data, sort_keys=True, default=list)


def read_config_mark(graph: fx.Graph) -> tuple[dict, bool] | None:
    """(config dict, train) from the first `CONFIG` mark of `graph`, or None."""
    for node in graph.nodes:
        value = get_mark(node, CONFIG)
        if value is not None:
            data = json.loads(value)
            return data["config"], bool(data["train"])
    return None


def read_named_mark(graph: fx.Graph) -> tuple[dict[str, dict], bool] | None:
    """({adapter name: config dict}, in index order; train) of a graph over named adapters, or None."""
    for node in graph.nodes:
        value = get_mark(node, CONFIG)
        if value is not None:
            data = json.loads(value)
            if "named" not in data:
                return None
            return {name: cfg for name, cfg in data["named"]}, bool(data["train"])
    return None


def set_mark(node: fx.Node, key: str, value: Any) -> None:
    node.meta[CUSTOM] = {**(node.meta.get(CUSTOM) or {}), key: value}


def get_mark(node: fx.Node, key: str, default: Any = None) -> Any:
    return (node.meta.get(CUSTOM) or {}).get(key, default)


def has_mark(node: fx.Node, key: str) -> bool:
    return key in (node.meta.get(CUSTOM) or {})


def clear_mark(node: fx.Node, key: str) -> None:
    custom = node.meta.get(CUSTOM) or {}
    if key in custom:
        node.meta[CUSTOM] = {k: v for k, v in custom.items() if k != key}


def marked_layers(graph: fx.Graph, key: str) -> list[str]:
    """The distinct layer names the nodes of `graph` are marked with under `key`, sorted."""
    names = set()
    for node in graph.nodes:
        value = get_mark(node, key)
        if value is not None:
            names.add(value[0] if isinstance(value, (list, tuple)) else value)
    return sorted(names)
