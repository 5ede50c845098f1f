"""substitute_saved_modules: reads of a `modules_to_save` module's parameters go to trainable copies.

PEFT trains a deep copy of each such module (a classifier head) and leaves the original as it
was. In graph form, every read of a parameter inside a call of the module (by `nn_module_stack`)
is pointed at a graph input holding the copy; reads outside it keep the original. A weight tied
to another module (an embedding and its LM head) is therefore copied for the saved module only,
as PEFT's deep copy unties it.

Matching (`find_saved_module_reads`) annotates each reading node with
`node.meta["lora_fx_saved_reads"] = {input node: (module, parameter name inside the module)}`;
rewriting (`substitute_saved_modules`) reads the annotations and asks `provide` for the copies.

Names inside the module are PEFT's (the keys it saves, `<module>.<name>`): the parameter's path
below the module, or, for a weight read under another module's name (a tied weight), the name
of the layer call that reads it (`weight` / `bias`). Non-persistent buffers (Gemma's
`embed_scale`) are read from the original, as PEFT's copy does not save them either; a
persistent buffer is refused (its copy would be saved by PEFT and loading would need it).

Invariants: only inputs of annotated nodes change; the original parameter inputs stay (other
modules may read them); every provided copy carries the `INPUT` mark `[module, key]`; nodes an
adapter added, and inputs lora_fx provided, are never matched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from ..errors import UnsupportedFeatureError
from ..layer_kinds.base import untransposed
from ..marks import ADAPTER, INPUT, has_mark, set_mark
from .find_targets import SITE_KEY, bias_node, normalize_path, weight_node

SAVED_READS_KEY = "lora_fx_saved_reads"
COPY_PREFIX = "modules_to_save."

# (input node) -> ("parameter" | "buffer" | "persistent_buffer", FQN), or None for anything else.
StateKind = Callable[[fx.Node], tuple[str, str] | None]


def module_paths(gm: fx.GraphModule) -> set[str]:
    """Every module path a call of `gm` runs under (all levels of each `nn_module_stack`)."""
    paths = set()
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            paths.add(normalize_path(path))
    return paths


def select_saved_modules(names: list[str], paths: Iterable[str]) -> list[str]:
    """The modules `modules_to_save` names: PEFT's rule, a module whose path ends with a name (a
    plain suffix), outermost first; a module inside a selected one is part of it.

    Example:
        >>> select_saved_modules(["classifier", "pooler"], ["bert.pooler", "bert.pooler.dense", "classifier"])
        ['classifier', 'bert.pooler']
    """
    chosen: list[str] = []
    for path in sorted({p for p in paths if p and any(p.endswith(n) for n in names)}, key=len):
        if not any(path.startswith(c + ".") for c in chosen):
            chosen.append(path)
    return chosen


def find_saved_module_reads(gm: fx.GraphModule, modules: list[str], state_kind: StateKind) -> list[fx.Node]:
    """Annotate the nodes that read a parameter inside a call of one of `modules`; return them.

    Raises:
        UnsupportedFeatureError: a saved module called as a `call_module` node (symbolic_trace
            graphs), a persistent buffer inside one, or a parameter whose name in the module
            cannot be told.
    """
    if not modules:
        return []
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and _owner([node.target], modules) is not None:
            raise UnsupportedFeatureError(
                f"modules_to_save: {node.target!r} is called as a submodule of a symbolic_trace graph; lora_fx "
                "copies a saved module's parameters where the graph reads them (torch.export / torch.compile graphs)")
        if node.op not in ("call_function", "call_method") or has_mark(node, ADAPTER):
            continue
        owner = _owner([normalize_path(p) for p, _ in (node.meta.get("nn_module_stack") or {}).values()], modules)
        if owner is None:
            continue
        reads = {}
        for inp in node.all_input_nodes:
            kind = None if has_mark(inp, INPUT) else state_kind(inp)
            if kind is None or kind[0] == "buffer":
                continue
            if kind[0] == "persistent_buffer":
                raise UnsupportedFeatureError(
                    f"modules_to_save: module {owner!r} reads the persistent buffer {kind[1]!r} (e.g. BatchNorm "
                    "running statistics); saving modules with buffers is not supported yet")
            reads[inp] = (owner, _name_in_module(node, inp, kind[1], owner))
        if reads:
            node.meta[SAVED_READS_KEY] = reads
            found.append(node)
    return found


def substitute_saved_modules(nodes: list[fx.Node], copy_of: Callable[[str, str, fx.Node], torch.Tensor],
                             provide: Callable[[str, str, torch.Tensor], fx.Node]) -> int:
    """Point the annotated reads at the copies; return the number of reads rewritten.

    Args:
        nodes: what `find_saved_module_reads` returned.
        copy_of: `(module, name, original input node) -> the trainable copy`.
        provide: the route's graph input for a tensor (see `inject_adapters.Provide`).
    """
    done = 0
    for node in nodes:
        for inp, (module, name) in node.meta[SAVED_READS_KEY].items():
            key = COPY_PREFIX + name
            new = provide(module, key, copy_of(module, name, inp))
            set_mark(new, INPUT, [module, key])
            node.replace_input_with(inp, new)
            done += 1
    if nodes:
        graph = nodes[0].graph
        graph.lint()
        graph.owning_module.recompile()
    return done


def _owner(paths: list[str], modules: list[str]) -> str | None:
    for path in paths:
        for module in modules:
            if path == module or path.startswith(module + "."):
                return module
    return None


def _name_in_module(node: fx.Node, inp: fx.Node, fqn: str, owner: str) -> str:
    if fqn.startswith(owner + "."):
        return fqn[len(owner) + 1:]
    # A weight read under another module's name (tied): name it as the reading layer does.
    for call in _calls_reading(node):
        site = call.meta.get(SITE_KEY)
        if site is None:
            continue
        layer = site.layer.name
        if layer != owner and not layer.startswith(owner + "."):
            continue
        prefix = "" if layer == owner else layer[len(owner) + 1:] + "."
        if weight_node(call) is inp:
            return prefix + "weight"
        if bias_node(call) is inp:
            return prefix + "bias"
    raise UnsupportedFeatureError(
        f"modules_to_save: module {owner!r} reads the parameter {fqn!r}, which belongs to another module (tied "
        "weights) and is not the weight or bias of one of its layers; lora_fx cannot tell its name in the copy")


def _calls_reading(node: fx.Node) -> list[fx.Node]:
    """`node` itself, or the calls a transposed weight (`node`) feeds."""
    if untransposed(node) is None:
        return [node]
    return list(node.users)
