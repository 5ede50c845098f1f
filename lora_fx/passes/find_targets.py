"""find_targets: annotate every adaptable call site of a graph with a frozen `TargetSite`.

What it matches, in any of the graphs lora_fx sees:
- Dynamo torch IR: `torch._C._nn.linear`, `F.embedding`, `torch.conv{1,2,3}d`, `torch.addmm`
  (transformers Conv1D), with weights as parameter placeholders (`grapharg` sources);
- export aten IR: `aten.linear`, `aten.embedding`, `aten.conv{1,2,3}d` (both overloads),
  `aten.convolution` (not transposed), `aten.addmm`, with weights as parameter placeholders
  named by the graph signature; and the decomposed linear of `run_decompositions()`:
  `addmm` / `mm` / `matmul` whose second operand is the transposed weight (`t` / `permute`);
- GraphModules: the same ops with weights as `get_attr` nodes (`ep.module()`), or `call_module`
  nodes of Linear / Conv1D / Embedding / ConvNd (`symbolic_trace`).
A call is a site only if the innermost module on its `nn_module_stack` is an adaptable layer
of the op's kind (PEFT adapts modules, not functional calls), subclasses included; the layer's
name is that module's path. Export records module classes as strings: they are imported to
read their base classes; a local class (`<locals>`, never importable) counts when the call
reads that module's own `weight`, and another class whose module is not imported in this process
is refused by name if targeted (the answer must not depend on what happens to be imported).
Tied weights adapt by module: GPT-2's `lm_head` and `wte` share a weight but are separate sites.

The adapter is added at the op, which is where PEFT's "module output + delta(module input)" lands
only if the module does nothing else to its activations. So a call is a site only if, within
that module call, the path from the module's input through the op to its output holds nothing
but views, the add of the layer's own bias (a decomposed or hand-written linear), or, for an
embedding, the multiply by the module's `embed_scale` (which PEFT applies to its delta too).
Other calls of adaptable classes (a subclass that pads, routes, rescales; a quantized layer's
own matmul) are annotated as refused with the reason: rule resolution refuses to target them
(`unmatched_layers`) rather than silently leaving them unadapted or adapting them differently.

Quantized layers (kinds with `module_boundary`: bitsandbytes' Linear4bit / Linear8bitLt) compute
with the library's own ops, in forms that change with grad mode and device; they are found by
their module call instead (`boundary_sites`): the site is the node whose value leaves the module
call, and its `module_input` the one activation entering it, where PEFT's wrapper puts the
adapter too. A call without exactly one of each, or that does not read its weight, is refused.

Invariants: the pass only writes `node.meta["lora_fx_site"]` (sites) and
`node.meta["lora_fx_refused"]` (refused calls of adaptable layers); the graph is unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from ..adapters import NamedWeights
from ..graph_builder import attr_at, node_value
from ..layer_kinds import (
    GROUPED_MM,
    LINEAR,
    LINEAR_READ,
    LayerKind,
    ParsedCall,
    class_qualname,
    is_grouped_mm,
    kind_of_class,
    parse_call,
    resolve_class,
)
from ..layer_kinds.base import target_name as _target_name
from ..layers import LayerInfo, layer_of_module, parameter_layer, without_wrappers
from ..marks import ADAPTER, INPUT, has_mark

SITE_KEY = "lora_fx_site"
# Ops that reshape a weight for a matmul (seen through when looking for a weight's readers).
_WEIGHT_SHAPING = {"t", "numpy_T", "permute", "transpose", "T", "expand", "view", "_unsafe_view", "reshape",
                   "unsqueeze"}
REFUSED_KEY = "lora_fx_refused"
aten = torch.ops.aten


@dataclass(frozen=True)
class TargetSite:
    """An adaptable call: `node.args[input_index]` is the layer input (`None` for call_module,
    whose input is `args[0]`); `weight` names the weight (parameter FQN or get_attr target),
    `bias` the bias the layer adds, if any."""

    layer: LayerInfo
    input_index: int | None
    weight: str
    # The bias the layer adds: an argument of the call, or a separate add of the layer's own bias
    # after it (a decomposed 3-D linear: bmm, then add); FQN or get_attr target.
    bias: str | None = None
    # A parameter site (the node is the parameter): how each call reads it, `(call, form, input
    # index)`, when every read is one lora_fx can adapt in factored form; None: the weight form.
    reads: tuple[tuple[fx.Node, LayerKind, int], ...] | None = None
    # A module-boundary site (a quantized layer; the node is the module's output): the module's input.
    module_input: fx.Node | None = None


# -- names ------------------------------------------------------------------------------------
# The frame's root: a local (`L['self']`, `L['model']`), or `L['args'][0]`: the module itself when
# the compiled frame is a `(*args, **kwargs)` wrapper around `forward` (transformers decorates
# `forward` so since 5.24), whose first argument is `self`.
_ROOT = re.compile(r"^L\[['\"]args['\"]\]\[0\]|^L\[['\"][^'\"]+['\"]\]")
_ITEM = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def normalize_path(path: str) -> str:
    """`L['self']._modules['model'].layers[0]` -> `model.layers.0` (Dynamo spellings of a path;
    `L['args'][0]` is a root too, see `_ROOT`; wrapper components such as `_orig_mod` are dropped)."""
    path = _ROOT.sub("", path)
    path = re.sub(r"\._(modules|parameters|buffers)(?=\[)", "", path)
    path = _ITEM.sub(lambda m: "." + m.group(1), path)
    return without_wrappers(path.lstrip("."))  # a compiled block inside the model is its inner module


def module_stack_entry(node: fx.Node):
    """(module path, class) of the innermost module call `node` runs in, or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return normalize_path(path), cls


def _state_name(node: fx.Node, state_names: dict[str, str]) -> str | None:
    """The FQN of the parameter or buffer a node is (placeholder or get_attr), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target
    if node.op != "placeholder":
        return None
    if node.name in state_names:
        return state_names[node.name]
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is not None and ("_parameters" in source.name or "_buffers" in source.name):
        return normalize_path(source.name)
    return None


def _weight_tensor(gm: fx.GraphModule, weight: fx.Node):
    if weight.op == "get_attr":
        return attr_at(gm, weight.target)
    return node_value(weight)


def _site_of_call(gm: fx.GraphModule, node: fx.Node, state_names: dict[str, str],
                  scopes: dict[str, list[fx.Node]]) -> TargetSite | LayerInfo | None:
    """The site `node` is; a LayerInfo with `unsupported` set for a call of an adaptable layer that
    cannot be adapted at the op; None for anything else."""
    parsed = parse_call(node)
    if parsed is None:
        return None
    kind, weight, extras = parsed.kind, parsed.weight, parsed.extras
    if not isinstance(weight, fx.Node):
        return None
    weight_name = _state_name(weight, state_names)
    if weight_name is None:
        return None  # a computed weight (e.g. a dequantised one): not a parameter site
    w = _weight_tensor(gm, weight)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    entry = module_stack_entry(node)
    unresolved = False
    if entry is not None:
        name, cls = entry
        layer_kind = _layer_kind(cls, name, weight_name, kind)
        unresolved = layer_kind == UNRESOLVED
        if layer_kind != kind and not unresolved:
            return None
        class_name = class_qualname(cls)
    else:
        name, class_name = weight_name.rsplit(".", 1)[0], ""
    dims = kind.dims_of_weight(w, extras)
    bias = _state_name(parsed.bias, state_names) if isinstance(parsed.bias, fx.Node) else None
    layer = LayerInfo(name=name, kind=kind, class_name=class_name, has_bias=isinstance(parsed.bias, fx.Node),
                      weight_dtype=w.dtype, weight_device=str(w.device), **dims, **extras)
    if unresolved:
        return replace(layer, unsupported=(
            f"its class {class_name} is not imported in this process, so lora_fx cannot tell whether it is a "
            f"{kind} layer; import {class_name.rsplit('.', 1)[0]} before transforming"))
    if entry is not None:
        problem, added_bias = _placement_problem(node, parsed, name, cls, state_names,
                                                 scopes.get(_stack_key(node), []))
        if problem is not None:
            return replace(layer, unsupported=f"its class {class_name} {problem}")
        if bias is None and added_bias is not None:
            bias, layer = added_bias, replace(layer, has_bias=True)
    return TargetSite(layer, parsed.input_index, weight_name, bias)


# Ops that only re-view an activation: the adapter commutes with them.
_VIEWS = {"view", "reshape", "_unsafe_view", "expand", "squeeze", "unsqueeze", "flatten", "contiguous", "clone",
          "alias", "detach"}
_CASTS = {"to", "_to_copy", "type_as", "float", "half", "bfloat16", "type"}


def _placement_problem(op: fx.Node, parsed: ParsedCall, layer: str, cls, state_names: dict[str, str],
                       scope: list[fx.Node]) -> tuple[str | None, str | None]:
    """(why the adapter added at `op` would not equal PEFT's adapter added to the module's output
    (computed from its input), or None; the layer's own bias if the module adds it after the op).
    The activation path through the module call, in `scope`, must hold only views, the add of the
    layer's own bias, or (embedding) the multiply by its `embed_scale` (PEFT scales its delta by a
    module's `embed_scale`, buffer or number)."""
    in_scope = {n for n in scope if not has_mark(n, ADAPTER)}  # an adapter's own nodes are not the module's
    x = op.args[parsed.input_index] if len(op.args) > parsed.input_index else None
    upstream, cur = [], x
    while isinstance(cur, fx.Node) and cur in in_scope and cur.op in ("call_function", "call_method"):
        upstream.append(cur)
        cur = cur.args[0] if cur.args else None
    downstream, todo, seen = [], [op], set()
    while todo:
        for user in todo.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if has_mark(user, ADAPTER):  # a transformed graph: the module's own nodes follow the adapter's
                todo.append(user)
            elif user in in_scope and _is_tensor(user):
                downstream.append(user)
                todo.append(user)
    for n in upstream:
        if _target_name(n) not in _VIEWS:
            return f"transforms its input ({_target_name(n)}) before the {parsed.kind} op", None
    added_bias = None
    for n in downstream:
        name = _target_name(n)
        if name in _VIEWS:
            continue
        others = [a for a in n.args if isinstance(a, fx.Node) and a not in downstream and a is not op
                  and not has_mark(a, ADAPTER)]
        if name == "add" and len(others) == 1 and _state_name(others[0], state_names) == f"{layer}.bias":
            added_bias = f"{layer}.bias"
            continue
        if name == "mul" and parsed.kind.lookup and _is_embed_scale(n, others, cls, state_names):
            continue
        return (f"computes {name} on the {parsed.kind} op's output inside its forward; PEFT adds the adapter to "
                "the module's output, lora_fx adds it at the op, so the two would differ"), None
    return None, added_bias


def _is_embed_scale(mul: fx.Node, others: list, cls, state_names: dict[str, str]) -> bool:
    """`mul` multiplies by the module's `embed_scale`: a buffer of that name, or a number when the
    module's class sets an `embed_scale` attribute (BART's family keeps it as a float)."""
    if len(others) == 1:
        return (_state_name(_uncast(others[0]), state_names) or "").endswith(".embed_scale")
    scalars = [a for a in mul.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if others or len(scalars) != 1:
        return False
    klass = resolve_class(cls) if isinstance(cls, str) else cls
    init = getattr(getattr(klass, "__init__", None), "__code__", None)
    return init is not None and "embed_scale" in init.co_names


def _uncast(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") \
            and _target_name(node) in _CASTS and node.args:
        node = node.args[0]
    return node


_NON_TENSOR = {"size", "dim", "numel", "stride", "getattr", "sym_size", "sym_numel", "sym_stride",
               "_assert_tensor_metadata"}


def _is_tensor(node: fx.Node) -> bool:
    """Whether the node computes a tensor: from its value where the graph has values; else (a
    `symbolic_trace` graph) anything but a size query counts."""
    val = node_value(node)
    if val is not None:
        return isinstance(val, torch.Tensor)
    return _target_name(node) not in _NON_TENSOR


def _stack_key(node: fx.Node) -> str | None:
    """The key of the innermost module call on the node's stack (one per call: `...@1` for a second)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack)[-1] if stack else None


def _layer_kind(cls, module_path: str, weight_name: str, call_kind: str) -> str | None:
    """The site kind of the module a call runs in: by its class (base classes included). A class
    export recorded by a name that does not resolve here counts by what the call computes on the
    module's own weight if it is a local class (`<locals>`: it never resolves, in any process);
    otherwise the answer would depend on what this process imported, so it is `UNRESOLVED`."""
    kind = kind_of_class(cls)
    if kind is not None or not isinstance(cls, str) or resolve_class(cls) is not None:
        return kind
    if weight_name != f"{module_path}.weight":
        return None
    return call_kind if "<locals>" in cls else UNRESOLVED


UNRESOLVED = "unresolved"


def _site_of_module_call(gm: fx.GraphModule, node: fx.Node) -> TargetSite | None:
    module = gm.get_submodule(node.target)
    layer = layer_of_module(node.target, module)
    if layer is None:
        return None
    return TargetSite(layer, 0, f"{node.target}.weight", f"{node.target}.bias" if layer.has_bias else None)


def find_targets(gm: fx.GraphModule, state_names: dict[str, str] | None = None,
                 parameters: set[str] | None = None) -> list[fx.Node]:
    """Annotate the adaptable call sites of `gm` (and the refused calls of adaptable layers) and
    its parameters (`target_parameters` candidates); return the parameters' nodes, then the call
    sites' in graph order.

    Args:
        gm: a Dynamo, export (aten) or plain GraphModule.
        state_names: placeholder name -> parameter / buffer FQN (an ExportedProgram's signature).
        parameters: which of those FQNs are parameters (an ExportedProgram's signature).
    """
    state_names = state_names or {}
    scopes: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        key = _stack_key(node)
        if key is not None:
            scopes.setdefault(key, []).append(node)
    found = []
    boundaries = boundary_sites(scopes, state_names)
    for node in gm.graph.nodes:
        if has_mark(node, ADAPTER):  # an adapter's own linear (of a transformed graph) is no site
            continue
        site = boundaries.get(node)
        if site is None and node.op in ("call_function", "call_method"):
            site = _site_of_call(gm, node, state_names, scopes)
        elif site is None and node.op == "call_module":
            site = _site_of_module_call(gm, node)
        if isinstance(site, LayerInfo):
            node.meta[REFUSED_KEY] = site
        elif site is not None:
            node.meta[SITE_KEY] = site
            found.append(node)
    return parameter_sites(gm, state_names, parameters) + found


def boundary_sites(scopes: dict[str, list[fx.Node]],
                   state_names: dict[str, str]) -> dict[fx.Node, TargetSite | LayerInfo]:
    """The sites of module-boundary kinds (quantized layers), keyed by the module call's output node:
    a `TargetSite` whose `module_input` is the one activation entering the call, or a refusal
    (`LayerInfo` with `unsupported`) when the call has no single input and output in this graph."""
    out: dict[fx.Node, TargetSite | LayerInfo] = {}
    for nodes in scopes.values():
        entry = module_stack_entry(nodes[-1])
        kind = kind_of_class(entry[1]) if entry is not None else None
        if kind is None or not kind.module_boundary:
            continue
        name, cls = entry
        body = [n for n in nodes if n.op in ("call_function", "call_method") and not has_mark(n, ADAPTER)]
        inside = set(body)
        outputs = [n for n in body if _is_tensor(n) and any(u not in inside for u in n.users)]
        inputs, state = [], set()
        for n in body:
            for a in _flat_nodes((n.args, n.kwargs)):
                if a in inside or a in inputs or a in state:
                    continue
                if _is_module_state(a, state_names):
                    state.add(a)
                elif _is_tensor(a):
                    inputs.append(a)
        layer = LayerInfo(name=name, kind=kind, in_features=0, out_features=0, class_name=class_qualname(cls))
        x_val, y_val = (node_value(inputs[0]) if len(inputs) == 1 else None,
                        node_value(outputs[0]) if len(outputs) == 1 else None)
        if len(outputs) != 1 or len(inputs) != 1 or not all(isinstance(v, torch.Tensor) for v in (x_val, y_val)):
            if outputs:
                out[outputs[-1]] = replace(layer, unsupported=(
                    f"lora_fx cannot find its call's one input and one output in this graph ({len(inputs)} inputs, "
                    f"{len(outputs)} outputs: a graph break inside its forward?)"))
            continue
        state_read = {_state_name(a, state_names) for a in state}
        if f"{name}.weight" not in state_read:
            # Not a whole call of the layer: its output here would not be the layer's output.
            out[outputs[0]] = replace(layer, unsupported=(
                "its forward does not run whole in this graph (it does not read its weight here: a graph break inside "
                "its forward?), so lora_fx cannot tell its output"))
            continue
        has_bias = f"{name}.bias" in state_read
        layer = replace(layer, in_features=x_val.shape[-1], out_features=y_val.shape[-1], has_bias=has_bias,
                        weight_device=str(y_val.device))
        out[outputs[0]] = TargetSite(layer, None, f"{name}.weight", f"{name}.bias" if has_bias else None,
                                     module_input=inputs[0])
    return out


def _is_module_state(node: fx.Node, state_names: dict[str, str]) -> bool:
    """Whether `node` is a module's own tensor (parameter, buffer, or an attribute such as a
    quantized weight's statistics), not an activation."""
    if node.op == "get_attr" or _state_name(node, state_names) is not None:  # parameters, buffers, through them
        return True
    source = getattr(node.meta.get("grapharg"), "source", None) if node.op == "placeholder" else None
    name = getattr(source, "name", "") if source is not None else ""
    return name.startswith("L['self']") or "_modules[" in name  # any other attribute of a module


def parameter_sites(gm: fx.GraphModule, state_names: dict[str, str],
                    parameters: set[str] | None = None) -> list[fx.Node]:
    """Annotate every parameter the graph reads as a `target_parameters` candidate (the node is
    the parameter itself); return those nodes. `parameters`: the FQNs that are parameters (not
    buffers), where the graph cannot tell (an exported program's signature)."""
    positions: dict[str, int] = {}
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr") or not node.users or has_mark(node, INPUT):
            continue
        name = _state_name(node, state_names)
        if name is None or not _is_parameter(gm, node, name, parameters):
            continue
        value = _weight_tensor(gm, node)
        if not isinstance(value, torch.Tensor):
            continue
        module = name.rpartition(".")[0]
        positions[module] = positions.get(module, -1) + 1
        reads = _parameter_reads(node, value)
        transposed = any(form is GROUPED_MM and not via_transpose for _, form, _, via_transpose in reads or ())
        layer = parameter_layer(name, value, positions[module], transposed)
        reads = None if reads is None else tuple((call, form, index) for call, form, index, _ in reads)
        node.meta[SITE_KEY] = TargetSite(layer, None, name, reads=reads)
        out.append(node)
    return out


def _is_parameter(gm: fx.GraphModule, node: fx.Node, name: str, parameters: set[str] | None) -> bool:
    if node.op == "get_attr":
        return isinstance(attr_at(gm, node.target), torch.nn.Parameter)
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is not None:
        return is_parameter_source(source.name)
    return parameters is None or name in parameters


def _parameter_reads(param: fx.Node, value: torch.Tensor) -> list[tuple] | None:
    """How the graph reads a parameter, `(call, form, input index, through a transpose)` per read,
    if every read is one with a factored adapter form; else None (the weight form)."""
    reads = []
    for user in param.users:
        via_transpose = value.dim() == 3 and _target_name(user) == "transpose" and \
            sorted(int(d) % 3 for d in user.args[1:3]) == [1, 2]
        if via_transpose:
            if not user.users or not all(is_grouped_mm(c) and c.args[1] is user for c in user.users):
                return None
            reads += [(c, GROUPED_MM, 0, True) for c in user.users]
        elif value.dim() == 3 and is_grouped_mm(user) and len(user.args) > 1 and user.args[1] is param:
            reads.append((user, GROUPED_MM, 0, False))
        elif value.dim() == 2 and (parsed := parse_call(user)) is not None and parsed.kind is LINEAR \
                and parsed.weight is param and parsed.input_index is not None:
            reads.append((user, LINEAR_READ, parsed.input_index, False))
        else:
            return None
    return reads


_PARAMETER_SOURCE = re.compile(r"\._parameters\[['\"][^'\"]+['\"]\]$")
_BUFFER_SOURCE = re.compile(r"\._buffers\[['\"][^'\"]+['\"]\]$")


def is_parameter_source(source: str) -> bool:
    """Whether a Dynamo source names a parameter itself (`..._parameters['weight']`), not a tensor
    reached through one (a quantized weight's `quant_state.absmax`)."""
    return _PARAMETER_SOURCE.search(source) is not None


def is_buffer_source(source: str) -> bool:
    """Whether a Dynamo source names a buffer itself (`..._buffers['inv_freq']`)."""
    return _BUFFER_SOURCE.search(source) is not None


def signature_state_names(sig) -> dict[str, str]:
    """placeholder name -> parameter / buffer FQN, from an ExportedProgram's graph signature."""
    return {**sig.inputs_to_buffers, **sig.inputs_to_parameters}


def signature_parameters(sig) -> set[str]:
    """The parameter FQNs of an ExportedProgram's graph signature."""
    return set(sig.inputs_to_parameters.values())


def weight_node(node: fx.Node) -> fx.Node | None:
    """The weight parameter an adaptable op call reads (seen through a transpose; None for
    `call_module` sites)."""
    parsed = parse_call(node) if node.op == "call_function" else None
    weight = parsed.weight if parsed is not None else None
    return weight if isinstance(weight, fx.Node) else None


def bias_node(node: fx.Node) -> fx.Node | None:
    """The bias argument of an adaptable op call, if any (`addmm`'s is its first argument)."""
    parsed = parse_call(node) if node.op == "call_function" else None
    bias = parsed.bias if parsed is not None else None
    return bias if isinstance(bias, fx.Node) else None


def weight_readers(weight: fx.Node) -> set[fx.Node]:
    """The nodes that compute with `weight`: its users, seen through the transposes, views and
    broadcasts that reshape it for a matmul."""
    readers, todo = set(), list(weight.users)
    while todo:
        user = todo.pop()
        if _target_name(user) in _WEIGHT_SHAPING:
            todo.extend(user.users)
        else:
            readers.add(user)
    return readers


def unmatched_layers(gm: fx.GraphModule, site_nodes: list[fx.Node],
                     state_names: dict[str, str] | None = None) -> list[LayerInfo]:
    """Adaptable modules (by class) whose code runs in `gm` but none of whose calls is a site:
    e.g. a bitsandbytes `Linear4bit` (a Linear subclass whose matmul reads a packed 4-bit weight),
    or a layer called inside a higher-order op's subgraph. Each is described with `unsupported`
    set, so targeting it is an error, never a silent skip."""
    found = {n.meta[SITE_KEY].layer.name for n in site_nodes}
    out: dict[str, LayerInfo] = {}
    for layer in _subgraph_layers(gm, lambda node: _state_name(node, state_names or {})):
        if layer.name not in found:
            out.setdefault(layer.name, layer)
    for node in gm.graph.nodes:
        refused = node.meta.get(REFUSED_KEY)
        if refused is not None and refused.name not in found:
            out.setdefault(refused.name, refused)
    for node in gm.graph.nodes:
        entry = module_stack_entry(node) if node.op == "call_function" else None
        if entry is None or entry[0] in found or entry[0] in out:
            continue
        name, cls = entry
        kind = kind_of_class(cls)
        if kind is not None:
            out[name] = LayerInfo(name=name, kind=kind, in_features=0, out_features=0, class_name=class_qualname(cls),
                                  unsupported=unsupported_reason(class_qualname(cls)))
    return list(out.values())


def _subgraph_layers(gm: fx.GraphModule, name_of: Callable[[fx.Node], str | None]) -> list[LayerInfo]:
    """The adaptable calls inside the subgraphs of higher-order ops (activation checkpointing,
    `torch.cond`, `while_loop`, `scan`, ...), recursively. A layer is named by its module stack
    where the subgraph keeps one (Dynamo), else through the subgraph's inputs: they are the
    operands of the higher-order call, in order, which lead back to the parameter's name."""
    out = []
    for call in gm.graph.nodes:
        if call.op != "call_function":
            continue
        flat = _flat_nodes((call.args, call.kwargs))
        bodies = [a for a in flat if a.op == "get_attr" and isinstance(attr_at(gm, a.target), fx.GraphModule)]
        if not bodies:
            continue
        # The operands come after the subgraph arguments (cond's predicate comes before them).
        operands = flat[max(flat.index(b) for b in bodies) + 1:]
        for body_node in bodies:
            body = attr_at(gm, body_node.target)
            inputs = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], operands, strict=False))

            def inner_name(node, inputs=inputs):
                outer = inputs.get(node)
                return name_of(outer) if outer is not None else None

            out += _subgraph_layers(body, inner_name)
            for node in body.graph.nodes:
                entry = module_stack_entry(node) if node.op in ("call_function", "call_method") else None
                kind = kind_of_class(entry[1]) if entry is not None else None
                if kind is not None and kind.module_boundary:  # found by its module call, not by an op
                    out.append(LayerInfo(name=entry[0], kind=kind, in_features=0, out_features=0,
                                         unsupported=_in_subgraph(call)))
                    continue
                parsed = parse_call(node) if node.op in ("call_function", "call_method") else None
                if parsed is None or not isinstance(parsed.weight, fx.Node):
                    continue
                if kind is parsed.kind:  # the innermost module is a layer of the op's kind
                    name = entry[0]
                else:
                    weight_name = inner_name(parsed.weight)
                    if weight_name is None or not weight_name.endswith(".weight"):
                        continue
                    name = weight_name[: -len(".weight")]
                out.append(LayerInfo(name=name, kind=parsed.kind, in_features=0, out_features=0,
                                     unsupported=_in_subgraph(call)))
    return out


def _in_subgraph(call: fx.Node) -> str:
    return (f"it is called inside the subgraph of a higher-order op ({call.target}: activation checkpointing, "
            "torch.cond, while_loop, scan), and lora_fx does not adapt layers there yet")


def _flat_nodes(value) -> list[fx.Node]:
    """The nodes in a (nested) argument structure, in order, repeats kept."""
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _flat_nodes(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _flat_nodes(v)]
    return []


def unsupported_reason(class_name: str) -> str:
    return (f"its class {class_name} computes with a weight lora_fx cannot adapt (quantized, or not a parameter "
            "the graph reads directly); the quantized layers lora_fx adapts are bitsandbytes' Linear4bit and "
            "Linear8bitLt")


def graph_layers(gm: fx.GraphModule, site_nodes: list[fx.Node],
                 state_names: dict[str, str] | None = None) -> list[LayerInfo]:
    """Every layer the rules may target in `gm`: the sites' layers, then the unmatched ones."""
    return site_layers(site_nodes) + unmatched_layers(gm, site_nodes, state_names)


def graph_base_weights(site_nodes: list[fx.Node], read: Callable[[str], torch.Tensor],
                       write: Callable[[str, torch.Tensor], None]) -> NamedWeights:
    """`NamedWeights` over a graph's sites: every layer's weight by name; the input embeddings and
    the output layer are those PEFT may save base weights of (`<layer>.weight`)."""
    embeddings = {n.meta[SITE_KEY].layer.name for n in site_nodes if n.meta[SITE_KEY].layer.kind.lookup}
    return NamedWeights(site_weight_names(site_nodes), read, write,
                        embeddings | output_layer_names_of_graph(site_nodes))


def site_weight_names(site_nodes: list[fx.Node]) -> dict[str, str]:
    """layer -> the name its (first) call reads the weight by."""
    names: dict[str, str] = {}
    for node in site_nodes:
        names.setdefault(node.meta[SITE_KEY].layer.name, node.meta[SITE_KEY].weight)
    return names


def site_layers(nodes: list[fx.Node]) -> list[LayerInfo]:
    """One LayerInfo per layer name (a layer called twice is one layer)."""
    seen: dict[str, LayerInfo] = {}
    for node in nodes:
        layer = node.meta[SITE_KEY].layer
        seen.setdefault(layer.name, layer)
    return list(seen.values())


def output_layer_names_of_graph(site_nodes: list[fx.Node]) -> set[str]:
    """The layers `"all-linear"` leaves out when no model object is at hand: a linear layer that
    feeds no other adaptable layer (an output layer) and whose weight is tied to an embedding's or
    shaped like the vocabulary (the largest embedding): the LM head `get_output_embeddings()`
    returns. A classifier head is not one: PEFT adapts it (unless `task_type="SEQ_CLS"`, see
    rules.py). With a model at hand, `layers.output_layer_names` (PEFT's own rule) is used instead."""
    if not site_nodes:
        return set()
    graph = site_nodes[0].graph
    # Every embedding call, adaptable or refused (BART's scaled embedding may be refused and still
    # be the vocabulary the LM head mirrors).
    embeddings = [n for n in graph.nodes
                  if (n.meta.get(SITE_KEY) or n.meta.get(REFUSED_KEY)) is not None
                  and _layer_of(n).kind.lookup]
    if not embeddings:
        return set()
    tied = {weight_node(n) for n in embeddings} - {None}
    # The vocabulary is the largest embedding: a head shaped like a small one (BERT's two token
    # types, a 2-label classifier) is not an LM head.
    vocab = max((_layer_of(n).in_features, _layer_of(n).out_features) for n in embeddings)
    feeds_a_site = _feeds_a_site(site_nodes)
    out = set()
    for node in site_nodes:
        layer = node.meta[SITE_KEY].layer
        if not layer.kind.linear_family or feeds_a_site[node]:
            continue
        if weight_node(node) in tied or (layer.out_features, layer.in_features) == vocab:
            out.add(layer.name)
    return out


def _layer_of(node: fx.Node) -> LayerInfo:
    site = node.meta.get(SITE_KEY)
    return site.layer if site is not None else node.meta[REFUSED_KEY]


def _feeds_a_site(site_nodes: list[fx.Node]) -> dict[fx.Node, bool]:
    """For every node of the graph: whether another site is computed from its value (one
    reverse pass over the graph)."""
    graph = site_nodes[0].graph
    sites = set(site_nodes)
    feeds: dict[fx.Node, bool] = {}
    for node in reversed(graph.nodes):
        feeds[node] = any(user in sites or feeds.get(user, False) for user in node.users)
    return feeds


def with_layer(site: TargetSite, layer: LayerInfo) -> TargetSite:
    return replace(site, layer=layer)
