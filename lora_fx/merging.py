"""`lora_fx.merge` / `lora_fx.unmerge`: bake adapters into base weights and take them out again.

- ExportedProgram / GraphModule (made by `transform`): a new program whose graph is node for
  node the base graph (the `merge_adapters` pass), reading merged weights under the base
  weights' names. `unmerge` re-injects the same adapter tensors over the original weights.
- The backend: the attached model's adapted weights are swapped for merged ones (the same
  `nn.Parameter` objects, so optimizers and compiled code keep working) and the compiled model
  runs a graph without adapter compute; one compile per mode, ever.

Unmerging is bit-exact by default: merging keeps a reference to each original weight (the
merged weights are the only new memory: one tensor per adapted weight) and unmerging puts it
back. `keep_original=False` keeps nothing and unmerges by subtracting the adapter, PEFT's way:
less memory, but the weights come back rounded (see docs/merging.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature

from .adapters import AdapterSet
from .backend import LoraBackend
from .errors import LoraFxError, UnsupportedFeatureError
from .graph_builder import attr_at, copy_graph_module, install_attr
from .marks import INPUT, MERGED, clear_mark, get_mark, marked_layers
from .named_adapters import NamedAdapters
from .named_programs import INDEX_INPUT, inject_named, is_named_program, named_adapters_of, without_index_kwarg
from .passes.find_targets import find_targets, signature_parameters, signature_state_names
from .passes.merge_adapters import (
    MergedLayer,
    check_mergeable,
    check_untied,
    merged_layer,
    merged_names,
    strip_adapters,
    subtracted_layer,
)
from .passes.substitute_saved_modules import COPY_PREFIX
from .program import (
    ADAPTERS_ATTR,
    _copy_program_graph,
    _new_program,
    _repointed_outputs,
    _transform_graph_module,
    _transform_program,
)
from .program_adapters import adapters_of, is_trained_program, merged_copy_error

MERGED_ATTR = "lora_fx_merged"


@dataclass
class MergeRecord:
    """What `unmerge` needs: the adapters, where each layer's weight (and bias) lives, and either
    the original tensors (bit-exact mode) or what subtraction needs besides the adapter."""

    adapters: AdapterSet
    train: bool
    names: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # layer -> (weight, bias or None)
    named: Any = None  # a named program's: all of its adapters (`NamedAdapters`), unmerge restores them
    originals: dict[str, Any] | None = None  # name -> original tensor (or module, call_module sites)
    undo: dict[str, tuple[Any, bool]] = field(default_factory=dict)  # layer -> (undo, bias merged too)


def merge(obj, *, safe_merge: bool = False, keep_original: bool = True, adapter_name: str | None = None):
    """Fold the adapters into the base weights.

    Args:
        obj: an `ExportedProgram` or `GraphModule` returned by `lora_fx.transform` (a new,
            merged one is returned; `obj` is unchanged), or a `LoraBackend` attached to a model
            (merged in place; returned).
        safe_merge: check every merged weight for NaN/inf first and raise naming the layer.
        keep_original: keep the original weights so `unmerge` restores them bit for bit (costs
            nothing extra for programs, whose originals the caller's program holds anyway; for
            the backend the originals stay alive beside the merged weights). False: unmerge
            subtracts instead (rounding error).
        adapter_name: a program of named adapters (`transform(ep, {name: ...})`): the one to
            merge (required there); the merged program takes no `adapter_index`, and `unmerge`
            gives back the program with all of them.

    Example:
        >>> import torch, lora_fx
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> ep = torch.export.export(model, (torch.randn(2, 8),))
        >>> ep_lora = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> ep_merged = lora_fx.merge(ep_lora)
        >>> [n.target for n in ep_merged.graph.nodes if n.op == "call_function"] == \\
        ...     [n.target for n in ep.graph.nodes if n.op == "call_function"]
        True
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(ep_merged.module()(x), ep_lora.module()(x), atol=1e-6)
        True
    """
    if isinstance(obj, LoraBackend):
        obj.merge(safe_merge=safe_merge, keep_original=keep_original)
        return obj
    if hasattr(obj, MERGED_ATTR):
        raise LoraFxError(f"this {type(obj).__name__} is already merged")
    if is_named_program(obj):
        if not isinstance(obj, ExportedProgram):
            raise UnsupportedFeatureError(
                "merging one adapter of named adapters rewrites the program's inputs (adapter_index goes away): "
                "merge the ExportedProgram (lora_fx.merge(program, adapter_name=...)), then take its .module()")
        return _merge_named_program(obj, adapter_name, safe_merge, keep_original)
    if adapter_name is not None:
        raise LoraFxError("adapter_name names one adapter of a program of named adapters (transform(ep, {name: ...})); "
                          f"this {type(obj).__name__} carries one adapter")
    if isinstance(obj, ExportedProgram):
        return _merge_program(obj, safe_merge, keep_original)
    if isinstance(obj, fx.GraphModule):
        return _merge_graph_module(obj, safe_merge, keep_original)
    raise LoraFxError(f"merge takes a transformed ExportedProgram or GraphModule, or a lora_fx backend; "
                      f"got {type(obj).__name__}")


def unmerge(obj):
    """The inverse of `merge`: adapter compute back, original weights back (bit-exact unless the
    merge was made with `keep_original=False`).

    Example:
        >>> import torch, lora_fx
        >>> ep = torch.export.export(torch.nn.Sequential(torch.nn.Linear(8, 8)), (torch.randn(2, 8),))
        >>> ep_lora = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        >>> again = lora_fx.unmerge(lora_fx.merge(ep_lora))
        >>> torch.equal(again.state_dict["0.weight"], ep_lora.state_dict["0.weight"])
        True
    """
    if isinstance(obj, LoraBackend):
        obj.unmerge()
        return obj
    record = getattr(obj, MERGED_ATTR, None)
    if not isinstance(record, MergeRecord) and isinstance(obj, (ExportedProgram, fx.GraphModule)) \
            and marked_layers(obj.graph, MERGED):
        raise merged_copy_error(obj)
    if not isinstance(record, MergeRecord):
        raise LoraFxError(f"this {type(obj).__name__} was not made by lora_fx.merge; nothing to unmerge")
    if record.named is not None:
        return _unmerge_named_program(obj, record)
    if isinstance(obj, ExportedProgram):
        return _unmerge_program(obj, record)
    return _unmerge_graph_module(obj, record)


# -- ExportedProgram ---------------------------------------------------------------------------

def _merge_program(ep: ExportedProgram, safe_merge: bool, keep_original: bool) -> ExportedProgram:
    gm, sig = _copy_program_graph(ep)
    # The sites, read afresh.
    adapters = adapters_of(ep, find_targets(gm, signature_state_names(sig), signature_parameters(sig)))
    sites, erased = strip_adapters(gm)
    check_mergeable(adapters, sites)
    check_untied(sites)
    record = MergeRecord(adapters.snapshot(), is_trained_program(ep),
                         originals={} if keep_original else None)
    new_values = _merged_state(ep, adapters, sites, record, safe_merge)
    erased_specs = [s for s in sig.input_specs if getattr(s.arg, "name", None) in erased]
    input_specs = [s for s in sig.input_specs if s not in erased_specs]
    new_sig = ExportGraphSignature(input_specs=input_specs, output_specs=_repointed_outputs(gm.graph, sig))
    dropped = {s.target for s in erased_specs}
    state_dict = {k: v for k, v in ep.state_dict.items() if k not in dropped}
    state_dict.update(new_values)
    for module, copies in record.adapters.saved.items():  # the merged program reads the record's copies
        for name, t in copies.items():
            if f"{module}.{COPY_PREFIX}{name}" in state_dict:
                state_dict[f"{module}.{COPY_PREFIX}{name}"] = t
    new_ep = _new_program(ep, gm, new_sig, state_dict)
    setattr(new_ep, MERGED_ATTR, record)
    return new_ep


def _merged_state(ep: ExportedProgram, adapters: AdapterSet, sites: dict[str, list[fx.Node]], record: MergeRecord,
                  safe_merge: bool) -> dict[str, nn.Parameter]:
    """The merged weights (and biases) of `sites`' layers under their state names, all computed (and
    checked) before any is installed; `record` notes what unmerge needs."""
    new_values = {}
    for layer, calls in sites.items():
        weight_key, bias_key = merged_names(calls[0], layer)
        m = merged_layer(adapters.entries[layer], ep.state_dict[weight_key],
                         ep.state_dict[bias_key] if bias_key else None, safe_merge=safe_merge)
        changed = {weight_key: m.weight, **({bias_key: m.bias} if m.bias is not None else {})}
        for key, value in changed.items():
            new_values[key] = nn.Parameter(value, requires_grad=False)
            if record.originals is not None:
                record.originals[key] = ep.state_dict[key]
        record.names[layer] = (weight_key, bias_key if m.bias is not None else None)
        record.undo[layer] = (m.undo, m.bias is not None)
    return new_values


def _restored_state(ep: ExportedProgram, record: MergeRecord) -> dict[str, torch.Tensor]:
    """The original weights (and biases) of a merged program's layers, under their state names: the
    kept originals, else the merged values minus the adapter."""
    restored = {}
    for layer, (weight_key, bias_key) in record.names.items():
        if record.originals is not None:
            restored.update({k: record.originals[k] for k in (weight_key, bias_key) if k is not None})
            continue
        undo, bias_changed = record.undo[layer]
        weight, bias = subtracted_layer(record.adapters.entries[layer], MergedLayer(
            ep.state_dict[weight_key], ep.state_dict[bias_key] if bias_changed else None, undo))
        restored[weight_key] = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            restored[bias_key] = nn.Parameter(bias, requires_grad=False)
    return restored


def _unmerge_program(ep: ExportedProgram, record: MergeRecord) -> ExportedProgram:
    restored = _restored_state(ep, record)
    return _transform_program(ep, record.adapters.cfg, None, record.train, None, adapters=record.adapters,
                              weights=restored)


def _merge_named_program(ep: ExportedProgram, adapter_name: str | None, safe_merge: bool,
                         keep_original: bool) -> ExportedProgram:
    """One adapter of a named program folded into its weights: the base graph (no `adapter_index`)."""
    gm, sig = _copy_program_graph(ep)
    named, train = named_adapters_of(ep, find_targets(gm, signature_state_names(sig), signature_parameters(sig)))
    if adapter_name is None:
        raise LoraFxError(f"this program runs {len(named)} named adapters ({list(named)}), one per row; merging folds "
                          "one into the weights: name it, lora_fx.merge(program, adapter_name=...)")
    adapters = named[adapter_name]
    sites, erased = strip_adapters(gm)
    mine = [layer for layer in sites if layer in adapters.entries]
    check_mergeable(adapters, mine)
    check_untied({layer: sites[layer] for layer in mine})
    snapshot = NamedAdapters()
    for name, aset in named.items():
        snapshot.add(name, aset.snapshot())
    record = MergeRecord(snapshot[adapter_name], train, originals={} if keep_original else None, named=snapshot)
    new_values = _merged_state(ep, adapters, {layer: sites[layer] for layer in mine}, record, safe_merge)
    for node in gm.graph.nodes:  # layers only other adapters had are base calls again, not merged ones
        if get_mark(node, MERGED) is not None and get_mark(node, MERGED) not in mine:
            clear_mark(node, MERGED)
    erased_specs = [s for s in sig.input_specs if getattr(s.arg, "name", None) in erased]
    new_sig = ExportGraphSignature(input_specs=[s for s in sig.input_specs if s not in erased_specs],
                                   output_specs=_repointed_outputs(gm.graph, sig))
    dropped = {s.target for s in erased_specs if s.target is not None}
    state_dict = {k: v for k, v in ep.state_dict.items() if k not in dropped}
    state_dict.update(new_values)
    example = ep.example_inputs
    if example is not None:
        example = (example[0], {k: v for k, v in example[1].items() if k != INDEX_INPUT})
    new_ep = ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=new_sig, state_dict=state_dict,
        range_constraints=copy.copy(ep.range_constraints), module_call_graph=without_index_kwarg(ep.module_call_graph),
        example_inputs=example, constants=ep.constants, verifiers=[ep.verifier])
    setattr(new_ep, MERGED_ATTR, record)
    return new_ep


def _unmerge_named_program(ep: ExportedProgram, record: MergeRecord) -> ExportedProgram:
    restored = _restored_state(ep, record)
    gm, sig = _copy_program_graph(ep)
    for node in gm.graph.nodes:
        clear_mark(node, MERGED)
    site_nodes = find_targets(gm, signature_state_names(sig), signature_parameters(sig))
    return inject_named(ep, gm, sig, site_nodes, record.named, record.train, restored)


# -- GraphModule -------------------------------------------------------------------------------

def _merge_graph_module(gm_in: fx.GraphModule, safe_merge: bool, keep_original: bool) -> fx.GraphModule:
    gm = copy_graph_module(gm_in)
    adapters = adapters_of(gm_in, find_targets(gm))  # the sites, read afresh (a program's copy keeps only marks)
    sites, _ = strip_adapters(gm)
    check_mergeable(adapters, sites)
    check_untied(sites)
    record = MergeRecord(adapters.snapshot(), is_trained_program(gm_in),
                         originals={} if keep_original else None)
    _keep_only_read_inputs(gm, record.adapters)
    installs = []
    for layer, calls in sites.items():
        entry, (weight_path, bias_path) = adapters.entries[layer], _paths_of(calls[0], layer)
        original = attr_at(gm, weight_path)  # the layer's module (call_module sites) or its weight
        if isinstance(original, nn.Module):
            m = merged_layer(entry, original.weight, original.bias, safe_merge=safe_merge)
            installs.append((weight_path, original, _with_params(original, m.weight, m.bias)))
        else:
            bias = attr_at(gm, bias_path) if bias_path is not None else None
            m = merged_layer(entry, original, bias, safe_merge=safe_merge)
            installs.append((weight_path, original, nn.Parameter(m.weight, requires_grad=False)))
            if m.bias is not None:
                installs.append((bias_path, bias, nn.Parameter(m.bias, requires_grad=False)))
        record.names[layer] = (weight_path, bias_path if m.bias is not None and not isinstance(original, nn.Module)
                               else None)
        record.undo[layer] = (m.undo, m.bias is not None)
    for path, original, new in installs:  # only after every merged weight was computed (and checked)
        install_attr(gm, gm_in, path, new)
        if record.originals is not None:
            record.originals[path] = original
    setattr(gm, MERGED_ATTR, record)
    return gm


def _unmerge_graph_module(gm_in: fx.GraphModule, record: MergeRecord) -> fx.GraphModule:
    gm = copy_graph_module(gm_in)
    for layer, (weight_path, bias_path) in record.names.items():
        if record.originals is not None:
            install_attr(gm, gm_in, weight_path, record.originals[weight_path])
            if bias_path is not None:
                install_attr(gm, gm_in, bias_path, record.originals[bias_path])
            continue
        undo, bias_changed = record.undo[layer]
        entry = record.adapters.entries[layer]
        current = attr_at(gm, weight_path)
        if isinstance(current, nn.Module):
            weight, bias = subtracted_layer(entry, MergedLayer(current.weight, current.bias if bias_changed else None,
                                                               undo))
            install_attr(gm, gm_in, weight_path, _with_params(current, weight, bias))
            continue
        bias_now = attr_at(gm, bias_path) if bias_changed else None
        weight, bias = subtracted_layer(entry, MergedLayer(current, bias_now, undo))
        install_attr(gm, gm_in, weight_path, nn.Parameter(weight, requires_grad=False))
        if bias is not None:
            install_attr(gm, gm_in, bias_path, nn.Parameter(bias, requires_grad=False))
    return _transform_graph_module(gm, record.adapters.cfg, None, record.train, None, adapters=record.adapters)


def _keep_only_read_inputs(gm: fx.GraphModule, adapters: AdapterSet) -> None:
    """A new `lora_fx_adapters` container holding what the merged graph still reads (the copies of
    modules saved in full, from `adapters`); the adapter tensors went with their subgraphs."""
    container = nn.Module()
    for node in gm.graph.nodes:
        mark = get_mark(node, INPUT)
        if node.op != "get_attr" or mark is None or not node.target.startswith(ADAPTERS_ATTR + "."):
            continue
        owner, key = mark
        copy_ = adapters.saved[owner][key.removeprefix(COPY_PREFIX)]
        container.register_parameter(node.target.removeprefix(ADAPTERS_ATTR + "."), copy_)
    if hasattr(gm, ADAPTERS_ATTR):
        delattr(gm, ADAPTERS_ATTR)
    if len(container._parameters):  # without saved modules, the merged GraphModule is the base one
        gm.add_module(ADAPTERS_ATTR, container)


def _paths_of(call: fx.Node, layer: str) -> tuple[str, str | None]:
    """(weight path, bias path or None) of a GraphModule site: the module itself for a
    call_module site (its parameters are replaced together), else the get_attr targets."""
    if call.op == "call_module":
        return call.target, None
    return merged_names(call, layer)


def _with_params(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A shallow copy of `module` with a new frozen `weight` (and `bias`, if given); the original
    is untouched."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        new._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
    return new
