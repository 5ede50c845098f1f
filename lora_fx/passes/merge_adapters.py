"""merge_adapters: fold each adapter into its base weight and take its subgraph out of the graph.

Reads the marks `inject_adapters` wrote (`marks.py`): `OUTPUT` on the node that replaced a base
output, `ADAPTER` on every node it added, `INPUT` on the graph inputs (placeholders or
`get_attr`s) that feed adapter tensors; and `find_targets`' `lora_fx_site` on the base call.
Each base call left behind gets the `MERGED` mark, so a merged program is recognisable as one
(`transform` refuses it rather than adding the adapter a second time).
For every adapted call, users of the adapter's output are pointed back at the base call, then
the adapter's nodes and the inputs only they read are erased. What remains is node for node the
graph the adapters were injected into; the caller installs the merged weights (from
`merged_weights`) under the base weights' own names, so the merged graph reads `W'` where the
base graph read `W`. Unmerging is `inject_adapters` again, with the original weights back.

Invariants: the base calls and their inputs are never modified; a layer whose variant cannot
merge, or whose weight is also read by a call of another layer (a tied weight: folding the
adapter in would change that call too), is refused with an error naming it, before anything
is changed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

from ..adapters import AdapterEntry, AdapterSet
from ..errors import LoraFxError, UnsupportedFeatureError
from ..marks import ADAPTER, INPUT, MERGED, OUTPUT, get_mark, has_mark, set_mark
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
    sites: dict[str, list[fx.Node]] = {}
    for node in list(graph.nodes):
        layer = get_mark(node, OUTPUT)
        if layer is None:
            continue
        base = _base_call_of(node, layer)
        node.replace_all_uses_with(base)
        set_mark(base, MERGED, layer)
        sites.setdefault(layer, []).append(base)
    for node in reversed(list(graph.nodes)):
        if has_mark(node, ADAPTER):
            if node.users:
                raise LoraFxError(f"internal: adapter node {node.name} of {get_mark(node, ADAPTER)!r} is still "
                                  f"used by {[u.name for u in node.users]}")  # pragma: no cover
            graph.erase_node(node)
    erased = []
    for node in list(graph.nodes):
        if has_mark(node, INPUT) and not node.users:
            erased.append(node.name)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return sites, erased


def _base_call_of(output: fx.Node, layer: str) -> fx.Node:
    """The base call an adapter output replaced: reached from it through the layer's adapter nodes."""
    todo, seen = [output], set()
    while todo:
        node = todo.pop()
        for arg in node.all_input_nodes:
            site = arg.meta.get(SITE_KEY)
            if site is not None and site.layer.name == layer and not has_mark(arg, ADAPTER):
                return arg
            if get_mark(arg, ADAPTER) == layer and arg not in seen:
                seen.add(arg)
                todo.append(arg)
    raise LoraFxError(f"internal: no base call found for the adapter output {output.name} of {layer!r}")


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


def merged_weight(entry: AdapterEntry, weight: torch.Tensor, *, safe_merge: bool = False) -> torch.Tensor:
    """`W'` for one layer: computed in fp32, cast to the weight's dtype; NaN/inf refused if `safe_merge`."""
    with torch.no_grad():
        tensors = {k: t.detach() for k, t in entry.tensors.items()}
        merged = entry.variant.merged_weight(weight.detach(), tensors, float(entry.scaling), entry.resolved.layer)
    if safe_merge and not bool(torch.isfinite(merged).all()):
        bad = int((~torch.isfinite(merged)).sum())
        raise LoraFxError(f"safe_merge: the merged weight of {entry.name!r} has {bad} NaN/inf values "
                          f"(shape {tuple(merged.shape)}, {merged.dtype}); nothing was merged")
    return merged


def subtracted_weight(entry: AdapterEntry, merged: torch.Tensor) -> torch.Tensor:
    """The original weight recovered by arithmetic (subtract mode; rounding makes it inexact)."""
    with torch.no_grad():
        tensors = {k: t.detach() for k, t in entry.tensors.items()}
        return entry.variant.unmerged_weight(merged.detach(), tensors, float(entry.scaling), entry.resolved.layer)
