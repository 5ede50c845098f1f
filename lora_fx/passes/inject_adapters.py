"""inject_adapters: give every annotated site its adapter subgraph.

Reads the `TargetSite` annotations `find_targets` wrote. For each site whose layer has an
adapter, asks the variant for the nodes computing the new output and points every former user
of the base output at it. Adapter tensors (and the 0-d scaling) come from `provide`, which the
caller implements as new placeholders (Dynamo graphs, exported programs) or `get_attr`s of
registered parameters (plain GraphModules): never as constants, so new adapter values need no
recompilation.

Invariants: the base call and its inputs are untouched; every added node carries the `ADAPTER`
mark (`marks.py`: the layer name; what the merge pass removes); the node replacing the base
output carries the `OUTPUT` mark and the `CONFIG` mark (so a program's adapters can be read back
from it), the base call the `BASE` mark, every provided input the `INPUT` mark
(`[layer name, key]`); each added node inherits the site's `nn_module_stack`/`stack_trace`;
`meta["val"]` is kept right where the graph has values. Marks survive decompositions and export
round trips, so a transformed program is recognisable as one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.fx as fx

from ..adapters import SCALING_KEY, AdapterSet
from ..call_inputs import CallValues, CarriedState
from ..graph_builder import GraphBuilder, graph_fake_mode
from ..marks import ADAPTER, BASE, CONFIG, INPUT, OUTPUT, config_mark, set_mark
from ..variants import SiteCall
from .find_targets import SITE_KEY, bias_node, weight_node

# (owner: a layer or module name, key: e.g. "lora_A.weight", the tensor) -> the graph input reading
# it. The tensor is held by reference (new values are copied into it), never baked in.
Provide = Callable[[str, str, torch.Tensor], fx.Node]


def inject_adapters(gm: fx.GraphModule, site_nodes: list[fx.Node], adapters: AdapterSet, provide: Provide,
                    *, training: bool = False, user_inputs: dict[str, fx.Node] | None = None,
                    needs_grad: bool = True, recompile: bool = True, carry: CarriedState | None = None,
                    mutable: bool = False) -> int:
    """Rewrite `gm` in place; return the number of sites adapted. `recompile=False` leaves `gm`'s
    code stale, for a caller that builds a new module over the graph anyway (an ExportedProgram).
    `carry`: the route's state between calls (`call_inputs.CarriedState`), where it keeps one.
    `mutable`: the graph may hold in-place ops (a Dynamo graph; never an exported program), so a
    variant may accumulate into a base output it alone reads (`SiteCall.base_exclusive`)."""
    storage = adapters.storage_names()

    def inputs_of(entry):
        owner = storage[entry.name]  # where the program stores them (PEFT's key prefix)
        params = {key: provide(owner, key, t) for key, t in entry.tensors.items()}
        scale = provide(owner, SCALING_KEY, entry.scaling)
        for key, provided in [*params.items(), (SCALING_KEY, scale)]:
            set_mark(provided, INPUT, [entry.name, key])
        return params, scale

    def emitter(site):
        entry = adapters.entries.get(site.layer.name)
        if entry is None:
            return None
        params, scale = inputs_of(entry)
        return entry.resolved.layer, lambda b, call: entry.variant.emit(b, call, entry.resolved, adapters.cfg,
                                                                         params, scale)

    return rewrite_sites(gm, site_nodes, emitter, config_mark(adapters.cfg.to_peft_dict(), training),
                         training=training, user_inputs=user_inputs, needs_grad=needs_grad, recompile=recompile,
                         carry=carry, needs_base_weight=lambda name: adapters.entries[name].variant.needs_base_weight,
                         mutable=mutable)


# Per site: None (not adapted), or (the layer as resolved, a function emitting its new output).
Emitter = Callable[[object], "tuple[object, Callable[[GraphBuilder, SiteCall], fx.Node]] | None"]


def rewrite_sites(gm: fx.GraphModule, site_nodes: list[fx.Node], emitter: Emitter, recorded: str, *,
                  training: bool, user_inputs: dict[str, fx.Node] | None, needs_grad: bool, recompile: bool,
                  carry: CarriedState | None, needs_base_weight: Callable[[str], bool],
                  call_values: CallValues | None = None, mutable: bool = False) -> int:
    """The site loop shared by the rewrites of this package (one adapter; several, `inject_adapter_bank`):
    for each site `emitter` adapts, emit the new output at every call of the site, mark the nodes and
    point the base output's users at it. `mutable`: one emit per site, in a graph that may hold
    in-place ops (`SiteCall.base_exclusive`). See the module docstring for the invariants."""
    fake_mode = graph_fake_mode(gm.graph)
    if call_values is None:
        call_values = CallValues(gm.graph, dict(user_inputs or {}), fake_mode, carry)
    # base output -> the node now standing for it. A module-boundary site's input was recorded
    # when targets were found; if it is an earlier site's output, its adapter reads the new one.
    replaced: dict[fx.Node, fx.Node] = {}
    done = 0
    for node in site_nodes:
        site = node.meta[SITE_KEY]
        found = emitter(site)
        if found is None:
            continue
        resolved_layer, emit = found
        for anchor, x, base_out, layer in _calls_of(node, site, resolved_layer, replaced):
            builder = GraphBuilder(gm.graph, anchor, fake_mode)
            call_values.site, call_values.layer = anchor, site.layer.name
            weight, bias = _weight_and_bias(gm, base_out, needs_base_weight(site.layer.name))
            call = SiteCall(layer=layer, x=x, base_out=base_out, training=training, call_values=call_values,
                            needs_grad=needs_grad, weight=weight, bias=bias,
                            base_exclusive=mutable and _fresh_output(base_out))
            new_out = emit(builder, call)
            created = set(builder.created)
            for n in created:
                set_mark(n, ADAPTER, site.layer.name)
            set_mark(new_out, OUTPUT, site.layer.name)
            set_mark(new_out, CONFIG, recorded)  # the program's adapters are read back from it
            set_mark(base_out, BASE, site.layer.name)
            base_out.replace_all_uses_with(new_out, delete_user_cb=lambda user, mine=created: user not in mine)
            replaced[base_out] = new_out
        done += 1
    for n, layer in call_values.created:  # values derived from the call's inputs belong to the adapters
        set_mark(n, ADAPTER, layer)
    gm.graph.lint()
    if recompile:
        gm.recompile()
    return done


def _calls_of(node: fx.Node, site, resolved_layer,
              replaced: dict[fx.Node, fx.Node]) -> list[tuple[fx.Node, fx.Node, fx.Node, object]]:
    """`(anchor, x, base output, layer)` for each place the site's adapter is added: the call
    itself for a call site; the module's output, fed by its input, for a module-boundary site;
    for a parameter site, each call reading it (the factored form, the layer bound to that read)
    or, for the weight form, the parameter (its users then read
    `W + s·B·A`, built just before the first of them). A parameter layer's layout is the
    resolved one (an attached model knows `is_transposed`; a graph only what its reads show)."""
    if site.module_input is not None:
        return [(node, replaced.get(site.module_input, site.module_input), node, site.layer)]
    if site.input_index is not None:
        return [(node, node.args[site.input_index], node, site.layer)]
    if site.reads is not None:
        out = []
        for call, form, index in site.reads:
            out.append((call, call.args[index], call, replace(resolved_layer, kind=form.bind(call))))
        return out
    first_user = node.next  # users follow the parameter: walk to the first of them
    while first_user not in node.users:
        first_user = first_user.next
    return [(first_user.prev, node, node, resolved_layer)]


# Calls whose output is a new tensor, never a view of an input: an adapter may accumulate into it.
_FRESH_OUTPUT = {torch._C._nn.linear, torch.nn.functional.linear, torch.addmm, torch.mm, torch.matmul,
                 torch.ops.aten.linear.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default}


def _fresh_output(base_out: fx.Node) -> bool:
    return base_out.op == "call_function" and base_out.target in _FRESH_OUTPUT


def _weight_and_bias(gm: fx.GraphModule, node: fx.Node, needed: bool):
    if node.op != "call_module":
        return weight_node(node), bias_node(node)
    if not needed:
        return None, None
    module = gm.get_submodule(node.target)
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if getattr(module, "bias", None) is not None else None
    for n in (weight, bias):
        if n is not None:
            set_mark(n, ADAPTER, node.target)  # the merge pass removes them with the adapter
    return weight, bias


def sanitize(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
