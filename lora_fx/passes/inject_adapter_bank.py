"""inject_adapter_bank: give every annotated site the adapters of several named adapters at once.

Reads the `TargetSite` annotations `find_targets` wrote, like `inject_adapters`, but the graph gets
every named adapter's tensors as inputs (through `provide`, per adapter) and one more input, the
index of the adapter that runs (`named_adapters.py`): a 0-d int64 when one adapter runs every row,
an int64 per row of the batch (-1: the base model) in a mixed batch. Switching adapters or rows
changes only the index's value, so nothing recompiles.

Per site, the cheapest form the adapters there allow:
- stacked: when the adapters share a variant and its graph structure, and zero-padding their
  tensors to a common shape changes nothing (`Variant.pads_with_zeros`; an adapter without this
  layer is a zero slot where the variant is `zero_neutral`): each tensor is padded, stacked and
  indexed. One adapter for all rows: the variant's own `emit` over the selected tensors, so the
  work is one adapter's; where the caller picks the running adapter at each call
  (`provide_selected`, the backend), the graph's inputs are that adapter's tensors, padded outside
  the graph, and nothing is stacked (stacking costs a copy of every adapter per call). A mixed
  batch: the variant's `emit_rows` (LoRA: per-row gathered factors and batched matmuls), where it
  has one.
- selected: otherwise, every adapter's own `emit`, and per row (or for the whole batch) the output
  of the adapter that runs there, the base output where none does. Any variant and site kind, at
  the cost of computing every adapter.
A mixed batch needs the layer's rows to be the batch's: the site's leading dimension must provably
be the batch (or, for a kind that flattens each row's tokens together, `LayerKind.rows_flattened`:
GPT-2's Conv1D, a multiple of it), as PEFT's `adapter_names` requires; anything else (a batch
concatenated with itself) is refused, never guessed. Raw parameter sites have no rows and are
refused.

Invariants: those of `inject_adapters` (marks, untouched base call, metadata). Each provided input
is marked `INPUT` with `[layer, key, adapter name]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..adapters import SCALING_KEY, AdapterEntry
from ..call_inputs import CarriedState
from ..errors import UnsupportedFeatureError
from ..graph_builder import GraphBuilder, graph_fake_mode, node_value
from ..marks import ADAPTER, INPUT, config_mark, set_mark
from ..named_adapters import NamedAdapters
from ..variants import SiteCall
from .inject_adapters import rewrite_sites

aten = torch.ops.aten

# (adapter name, owner, key, tensor) -> the graph input reading it
BankProvide = Callable[[str, str, str, torch.Tensor], fx.Node]
# (layer, key, {adapter name: (owner, tensor)}, the padded shape) -> the graph input reading, at each
# call, the running adapter's tensor zero-padded to that shape (zeros where it has no such layer)
SelectedProvide = Callable[[str, str, dict[str, tuple[str, torch.Tensor]], list[int]], fx.Node]


def inject_adapter_bank(gm: fx.GraphModule, site_nodes: list[fx.Node], named: NamedAdapters, provide: BankProvide,
                        index: fx.Node, *, mixed: bool, training: bool = False,
                        user_inputs: dict[str, fx.Node] | None = None, needs_grad: bool = True,
                        recompile: bool = True, carry: CarriedState | None = None,
                        provide_selected: SelectedProvide | None = None) -> int:
    """Rewrite `gm` in place for every adapter of `named`; return the number of sites adapted.

    `index` is the graph input choosing the adapter (0-d, or one per row when `mixed`).
    `provide_selected` (one adapter for all rows, a caller that picks it at each call: the backend):
    stackable sites read the running adapter's padded tensors from it, instead of stacking every
    adapter's in the graph and indexing the stack, whose cost grows with the number of adapters."""
    storages = {name: aset.storage_names() for name, aset in named.items()}
    slots = list(named.items())

    def inputs_of(name: str, entry: AdapterEntry):
        owner = storages[name][entry.name]
        params = {key: provide(name, owner, key, t) for key, t in entry.tensors.items()}
        scale = provide(name, owner, SCALING_KEY, entry.scaling)
        for key, node in [*params.items(), (SCALING_KEY, scale)]:
            set_mark(node, INPUT, [entry.name, key, name])
        return params, scale

    def selected_of(present: list[_Slot]):
        """The running adapter's tensors at this site, one input per key (padded to the widest)."""
        layer = present[0].entry.name
        out = {}
        for key in [*present[0].entry.tensors, SCALING_KEY]:
            members = {s.name: (storages[s.name][layer],
                                s.entry.scaling if key == SCALING_KEY else s.entry.tensors[key]) for s in present}
            out[key] = provide_selected(layer, key, members, padded_shape([m for _, m in members.values()]))
            set_mark(out[key], INPUT, [layer, key, None])
        scale = out.pop(SCALING_KEY)
        return out, scale

    def emitter(site):
        present = [_Slot(pos, name, aset.cfg, aset.entries[site.layer.name], inputs_of)
                   for pos, (name, aset) in enumerate(slots) if site.layer.name in aset.entries]
        if not present:
            return None
        widest = max(present, key=lambda s: s.entry.resolved.r)
        selected = selected_of if provide_selected is not None and not mixed else None
        return widest.entry.resolved.layer, lambda b, call: _emit(b, call, present, len(slots), index, mixed,
                                                                   selected)

    first = next(iter(named.sets.values()))
    recorded = config_mark(first.cfg.to_peft_dict(), training,
                           named={name: aset.cfg.to_peft_dict() for name, aset in named.items()})
    done = rewrite_sites(gm, site_nodes, emitter, recorded, training=training, user_inputs=user_inputs,
                         needs_grad=needs_grad, recompile=False, carry=carry,
                         needs_base_weight=lambda layer: any(
                             aset.entries[layer].variant.needs_base_weight for _, aset in slots
                             if layer in aset.entries))
    if mixed:
        _check_index(gm.graph, index, len(slots))
    if recompile:
        gm.recompile()
    return done


def _check_index(graph: fx.Graph, index: fx.Node, count: int) -> None:
    """An assertion, run with every call, that each row's index is -1 or an adapter's position: a
    larger one would otherwise run no adapter at some layers and fail at others."""
    b = GraphBuilder(graph, [n for n in graph.nodes if n.op == "placeholder"][-1], graph_fake_mode(graph))
    valid = b.call(aten.logical_and.default, b.call(aten.ge.Scalar, index, -1), b.call(aten.lt.Scalar, index, count))
    b.call(aten._assert_async.msg, b.call(aten.all.default, valid),
           f"adapter_index out of range: each row's index must be -1 (the base model) or an adapter's position, "
           f"0 to {count - 1}")
    for n in b.created:
        set_mark(n, ADAPTER, "adapter_index")
    graph.lint()


class _Slot:
    """One adapter at one site: its position in the index, name, config, entry and input nodes
    (made when a form first reads them: a site fed the running adapter's tensors has none)."""

    def __init__(self, pos: int, name: str, cfg, entry: AdapterEntry, inputs_of):
        self.pos, self.name, self.cfg, self.entry = pos, name, cfg, entry
        self._inputs_of = inputs_of
        self._inputs: tuple[dict[str, fx.Node], fx.Node] | None = None

    def _made(self) -> tuple[dict[str, fx.Node], fx.Node]:
        if self._inputs is None:
            self._inputs = self._inputs_of(self.name, self.entry)
        return self._inputs

    @property
    def params(self) -> dict[str, fx.Node]:
        return self._made()[0]

    @property
    def scale(self) -> fx.Node:
        return self._made()[1]


def _emit(b: GraphBuilder, call: SiteCall, present: list[_Slot], count: int, index: fx.Node, mixed: bool,
          selected_of=None):
    layer = call.layer
    if mixed and layer.kind.targets_parameter:
        raise UnsupportedFeatureError(
            f"{layer.name}: a raw parameter (target_parameters) has no rows of the batch to give different "
            "adapters; run a mixed batch with adapters that do not target parameters, or one adapter at a time")
    if mixed:
        _check_rows(b, call, index)
    if _stackable(present, count, call.training):
        head = max(present, key=lambda s: s.entry.resolved.r)
        if selected_of is not None:  # one adapter, picked (and padded) outside the graph at each call
            params, scale = selected_of(present)
            return head.entry.variant.emit(b, call, head.entry.resolved, head.cfg, params, scale)
        params, scale = _stacked(b, present, count)
        if not mixed:
            picked = {key: b.call(aten.index.Tensor, bank, [index]) for key, bank in params.items()}
            return head.entry.variant.emit(b, call, head.entry.resolved, head.cfg, picked,
                                           b.call(aten.index.Tensor, scale, [index]))
        out = head.entry.variant.emit_rows(b, call, head.entry.resolved, head.cfg, params, scale, index)
        if out is not None:
            return out
    return _selected(b, call, present, index, mixed)


def _stackable(present: list[_Slot], count: int, training: bool) -> bool:
    """Whether the adapters at this site can run as one stacked adapter (see the module docstring)."""
    head = present[0]
    variant = head.entry.variant
    keys = set(head.entry.tensors)
    for slot in present:
        e, cfg = slot.entry, slot.cfg
        if (e.variant is not variant or set(e.tensors) != keys or cfg.lora_bias != head.cfg.lora_bias
                or (training and cfg.lora_dropout != head.cfg.lora_dropout)
                or variant.baked(cfg) != variant.baked(head.cfg)
                or {t.dtype for t in e.tensors.values()} != {t.dtype for t in head.entry.tensors.values()}):
            return False
    shapes = {tuple(t.shape) for s in present for t in s.entry.tensors.values()}
    same = all({tuple(s.entry.tensors[k].shape) for s in present} == {tuple(head.entry.tensors[k].shape)}
               for k in keys)
    if not same and not all(variant.pads_with_zeros(s.entry.resolved, s.cfg) for s in present):
        return False
    return bool(shapes) and (len(present) == count or variant.zero_neutral)


def _stacked(b: GraphBuilder, present: list[_Slot], count: int) -> tuple[dict[str, fx.Node], fx.Node]:
    """Per tensor key, the adapters' tensors zero-padded to one shape and stacked in index order
    (zeros for an adapter without this layer), and their scalings likewise (0 where absent)."""
    by_pos = {s.pos: s for s in present}
    head = present[0]
    banks = {}
    for key, t in head.entry.tensors.items():
        shape = padded_shape([s.entry.tensors[key] for s in present])
        members = []
        for pos in range(count):
            slot = by_pos.get(pos)
            if slot is None:
                members.append(b.call(aten.zeros.default, shape, dtype=t.dtype, device=t.device))
                continue
            have = list(slot.entry.tensors[key].shape)
            node = slot.params[key]
            if have != shape:
                node = b.call(aten.constant_pad_nd.default, node, zero_padding(have, shape), 0.0)
            members.append(node)
        banks[key] = b.call(aten.stack.default, members, 0)
    scales = [by_pos[pos].scale if pos in by_pos else
              b.call(aten.zeros.default, [], dtype=torch.float32, device=head.entry.scaling.device)
              for pos in range(count)]
    return banks, b.call(aten.stack.default, scales, 0)


def padded_shape(tensors: list[torch.Tensor]) -> list[int]:
    """The shape every adapter's tensor at a site is padded to: the largest size in each dim."""
    return [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]


def zero_padding(have: list[int], want: list[int]) -> list[int]:
    """`constant_pad_nd` / `F.pad` widths that pad `have` with zeros after its entries, up to `want`
    (extra ranks at the end, where zeros leave the product unchanged)."""
    return [p for d in reversed(range(len(have))) for p in (0, want[d] - have[d])]


def _selected(b: GraphBuilder, call: SiteCall, present: list[_Slot], index: fx.Node, mixed: bool) -> fx.Node:
    """Every adapter's own output; each row takes the one its index names (the base output: -1)."""
    out = call.base_out
    rows = _rows(b, index) if mixed else None
    for slot in present:
        mine = slot.entry.variant.emit(b, call, slot.entry.resolved, slot.cfg, slot.params, slot.scale)
        chosen = b.call(aten.eq.Scalar, index, slot.pos)
        out = _where_rows(b, chosen, mine, out, rows) if mixed else b.call(aten.where.self, chosen, mine, out)
    return out


def _rows(b: GraphBuilder, index: fx.Node):
    """The batch size: an int, or a node reading it (dynamic batch; a graph without values)."""
    shape = b.shape_of(index)
    if shape is not None and type(shape[0]) is int:
        return shape[0]
    return b.call(aten.sym_size.int, index, 0)


def _shape_list(b: GraphBuilder, node: fx.Node) -> list:
    shape = b.shape_of(node)
    if shape is None:
        return b.call(aten.sym_size.default, node)
    return [d if type(d) is int else b.call(aten.sym_size.int, node, i) for i, d in enumerate(shape)]


def _check_rows(b: GraphBuilder, call: SiteCall, index: fx.Node) -> None:
    """Refuse a site whose leading dimension is not provably the batch (or, for a kind that flattens
    each row's tokens together, a multiple of it): rows built otherwise (a batch concatenated with
    itself, as classifier-free guidance does) would silently take other rows' adapters."""
    val, rows = node_value(call.base_out), node_value(index)
    if not isinstance(val, torch.Tensor) or not isinstance(rows, torch.Tensor):
        return  # a graph without values: the reshape to [rows, -1] is checked when it runs
    lead, batch = val.shape[0], rows.shape[0]
    ok = (statically_known_true(lead % batch == 0) if call.layer.kind.rows_flattened
          else statically_known_true(lead == batch))
    if not ok:
        raise UnsupportedFeatureError(
            f"{call.layer.name}: its input has {lead} leading rows where the batch has {batch}, so lora_fx cannot "
            "tell which adapter each of them belongs to in a mixed batch (PEFT's adapter_names refuses such "
            "inputs too); run one adapter at a time, or leave this layer out of the adapters' targets")


def _where_rows(b: GraphBuilder, chosen: fx.Node, new: fx.Node, old: fx.Node, rows) -> fx.Node:
    """`new` in the rows where `chosen` ([batch] bool) holds, else `old`, for outputs whose leading
    dimension is the batch or a multiple of it (each row's tokens together)."""
    shape = _shape_list(b, old)
    flat_new = b.call(aten.reshape.default, new, [rows, -1])
    flat_old = b.call(aten.reshape.default, old, [rows, -1])
    mask = b.call(aten.reshape.default, chosen, [rows, 1])
    return b.call(aten.reshape.default, b.call(aten.where.self, mask, flat_new, flat_old), shape)
