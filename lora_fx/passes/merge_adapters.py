"""merge_adapters: fold each adapter into its base weight and take its subgraph out of the graph.

Reads the marks `inject_adapters` wrote (`marks.py`): `OUTPUT` on the node that replaced a base
output, `ADAPTER` on every node it added, `INPUT` on the graph inputs (placeholders or
`get_attr`s) that feed adapter tensors; and `find_targets`' `lora_fx_site` on the base call.
Each base call left behind gets the `MERGED` mark, so a merged program is recognisable as one
(`transform` refuses it rather than adding the adapter a second time).
For every adapted call, users of the adapter's output are pointed back at the base call, then
the adapter's nodes and the inputs only they read are erased. What remains is node for node the
graph the adapters were injected into; the caller installs the merged weights (and biases, for
adapters with a bias of their own: `merged_layer`) under the base names, so the merged graph
reads `W'` where the base graph read `W`. Unmerging is `inject_adapters` again, with the
original weights back.

Invariants: the base calls and their inputs are never modified; a layer whose variant cannot
merge, or whose weight is also read by a call of another layer (a tied weight: folding the
adapter in would change that call too), is refused with an error naming it, before anything
is changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..adapters import AdapterEntry, AdapterSet
from ..errors import LoraFxError, UnsupportedFeatureError
from ..marks import ADAPTER, BASE, INPUT, MERGED, OUTPUT, get_mark, has_mark, set_mark
from .find_targets import SITE_KEY, weight_node, weight_readers


def check_mergeable(adapters: AdapterSet, layers: Iterable[str] | None = None) -> None:
    """Raise, naming the layer and the reason, if any adapter cannot be merged."""
    for name in layers if layers is not None else adapters.entries:
        entry = adapters.entries[name]
        reason = entry.variant.merge_blocker(entry.resolved, adapters.cfg)
        if reason is not None:
            raise UnsupportedFeatureError(f"cannot merge the adapter of {name!r}: {reason}")


def strip_adapters(gm: fx.GraphModule) -> tuple[dict[str, list[fx.Node]], list[str]]:
    """Remove every adapter subgraph of `gm` in place.

    Returns:
        ({layer name: its base call nodes}, names of the erased adapter input nodes).
    """
    graph = gm.graph
    # The adapters' inputs: marked `INPUT`, or (a program loaded with torch.export.load keeps no
    # placeholder marks) read by adapter nodes only.
    adapter_inputs = [n for n in graph.nodes if has_mark(n, INPUT) or (
        n.op in ("placeholder", "get_attr") and n.users and all(has_mark(u, ADAPTER) for u in n.users))]
    sites: dict[str, list[fx.Node]] = {}
    for node in list(graph.nodes):
        layer = get_mark(node, OUTPUT)
        if layer is None:
            continue
        call, base_out = _base_call_of(node, layer)
        node.replace_all_uses_with(base_out)
        set_mark(call, MERGED, layer)
        sites.setdefault(layer, []).append(call)
    for node in reversed(list(graph.nodes)):
        if has_mark(node, ADAPTER):
            if node.users:
                raise LoraFxError(f"internal: adapter node {node.name} of {get_mark(node, ADAPTER)!r} is still "
                                  f"used by {[u.name for u in node.users]}")  # pragma: no cover
            graph.erase_node(node)
    erased = []
    for node in adapter_inputs:
        if not node.users:
            erased.append(node.name)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return sites, erased


def _base_call_of(output: fx.Node, layer: str) -> tuple[fx.Node, fx.Node]:
    """(the base call, the base output the adapter read) of an adapter output, reached from it
    through the layer's adapter nodes. They differ in a decomposed program, where the call is an
    `addmm` and the output a view of it (both carry the `BASE` mark)."""
    todo, seen = [output], set()
    while todo:
        node = todo.pop()
        for arg in node.all_input_nodes:
            if has_mark(arg, ADAPTER):
                if get_mark(arg, ADAPTER) == layer and not has_mark(arg, OUTPUT) and arg not in seen:
                    seen.add(arg)
                    todo.append(arg)
                continue
            call = _site_behind(arg, layer)
            if call is not None:
                return call, arg
    raise LoraFxError(f"internal: no base call found for the adapter output {output.name} of {layer!r}")


def _site_behind(node: fx.Node, layer: str) -> fx.Node | None:
    """`node` if it is a call site of `layer`, else the site it views (through nodes carrying the
    layer's `BASE` mark), else None. A `BASE`-marked node with no marked input is the call itself
    (a parameter's read: a grouped matmul, a linear of a 2-D parameter)."""
    while True:
        site = node.meta.get(SITE_KEY)
        if site is not None and site.layer.name == layer:
            return node
        if get_mark(node, BASE) != layer:
            return None
        inputs = [n for n in node.all_input_nodes if get_mark(n, BASE) == layer or
                  (n.meta.get(SITE_KEY) is not None and n.meta[SITE_KEY].layer.name == layer)]
        if not inputs:
            return node
        if len(inputs) != 1:
            return None
        node = inputs[0]


def merged_names(call: fx.Node, layer: str) -> tuple[str, str | None]:
    """(weight name, bias name or None) a layer's base call reads: from its site annotation; a
    parameter's read carries none, and the parameter's name is the layer's."""
    site = call.meta.get(SITE_KEY)
    if site is not None and site.layer.name == layer:
        return site.weight, site.bias
    return layer, None


def check_untied(sites: dict[str, list[fx.Node]]) -> None:
    """Refuse layers whose weight node is also read by a call that is not one of the layer's own."""
    for layer, calls in sites.items():
        for call in calls:
            w = weight_node(call)
            if w is None:
                continue
            others = [u for u in weight_readers(w) if u not in calls]
            if others:
                readers = ", ".join(sorted(_reader_name(u) for u in others))
                raise UnsupportedFeatureError(
                    f"cannot merge the adapter of {layer!r}: its weight is shared with {readers} (tied weights); "
                    "merging would change those calls too. Untie the weights, or run the adapter unmerged")


def _reader_name(node: fx.Node) -> str:
    site = node.meta.get(SITE_KEY)
    return repr(site.layer.name) if site is not None else f"node {node.name}"


@dataclass
class MergedLayer:
    """One layer's merge: the merged weight, the merged bias (None: the base bias is unchanged),
    and what a subtract-mode unmerge needs besides the adapter (`Variant.merged_weight`'s undo)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    undo: Any


def merged_layer(entry: AdapterEntry, weight: torch.Tensor, bias: torch.Tensor | None, *,
                 safe_merge: bool = False) -> MergedLayer:
    """`W'` (and `b'`) for one layer: fp32 math, cast to the base dtypes; NaN/inf refused if `safe_merge`."""
    scaling = float(entry.scaling)
    layer = entry.resolved.layer
    with torch.no_grad():
        tensors = {k: t.detach() for k, t in entry.tensors.items()}
        merged, undo = entry.variant.merged_weight(weight.detach(), tensors, scaling, layer)
        new_bias = entry.variant.merged_bias(None if bias is None else bias.detach(), tensors, scaling, layer)
    if safe_merge:
        for what, value in (("weight", merged), ("bias", new_bias)):
            if value is not None and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise LoraFxError(f"safe_merge: the merged {what} of {entry.name!r} has {bad} NaN/inf values "
                                  f"(shape {tuple(value.shape)}, {value.dtype}); nothing was merged")
    return MergedLayer(merged, new_bias, undo)


def subtracted_layer(entry: AdapterEntry, merged: MergedLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The original weight (and bias, if the merge changed it) recovered by arithmetic (subtract
    mode: rounding makes it inexact). `merged` holds the current merged values and the undo."""
    scaling = float(entry.scaling)
    layer = entry.resolved.layer
    with torch.no_grad():
        tensors = {k: t.detach() for k, t in entry.tensors.items()}
        weight = entry.variant.unmerged_weight(merged.weight.detach(), tensors, scaling, layer, merged.undo)
        bias = None if merged.bias is None else entry.variant.unmerged_bias(merged.bias.detach(), tensors, scaling,
                                                                             layer)
    return weight, bias
