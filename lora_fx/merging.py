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

import torch
import torch.fx as fx
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature

from .adapters import AdapterSet
from .errors import LoraFxError
from .graph_builder import attr_at, copy_graph_module
from .passes.find_targets import SITE_KEY, weight_node
from .passes.merge_adapters import check_mergeable, check_untied, merged_weight, strip_adapters, subtracted_weight
from .program import (
    ADAPTERS_ATTR,
    _adapters_of,
    _copy_program_graph,
    _new_program,
    _repointed_outputs,
    _transform_graph_module,
    _transform_program,
)

MERGED_ATTR = "lora_fx_merged"


@dataclass
class MergeRecord:
    """What `unmerge` needs: the adapters, the weight each layer merged into, and (bit-exact
    mode) the original weights."""

    adapters: AdapterSet
    train: bool
    weights: dict[str, str] = field(default_factory=dict)  # layer -> weight name / module path
    originals: dict[str, torch.Tensor | nn.Module] | None = None  # weight name -> original


def merge(obj, *, safe_merge: bool = False, keep_original: bool = True):
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
    from .backend import LoraBackend

    if isinstance(obj, LoraBackend):
        obj.merge(safe_merge=safe_merge, keep_original=keep_original)
        return obj
    if hasattr(obj, MERGED_ATTR):
        raise LoraFxError(f"this {type(obj).__name__} is already merged")
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
    from .backend import LoraBackend

    if isinstance(obj, LoraBackend):
        obj.unmerge()
        return obj
    record = getattr(obj, MERGED_ATTR, None)
    if not isinstance(record, MergeRecord):
        raise LoraFxError(f"this {type(obj).__name__} was not made by lora_fx.merge; nothing to unmerge")
    if isinstance(obj, ExportedProgram):
        return _unmerge_program(obj, record)
    return _unmerge_graph_module(obj, record)


# -- ExportedProgram ---------------------------------------------------------------------------

def _merge_program(ep: ExportedProgram, safe_merge: bool, keep_original: bool) -> ExportedProgram:
    adapters = _adapters_of(ep)
    gm, sig = _copy_program_graph(ep)
    sites, erased = strip_adapters(gm)
    check_mergeable(adapters, sites)
    check_untied(sites)
    record = MergeRecord(adapters, bool(getattr(ep, "lora_fx_train", False)), originals={} if keep_original else None)
    merged = {}
    for layer, calls in sites.items():
        key = calls[0].meta[SITE_KEY].weight
        original = ep.state_dict[key]
        merged[key] = nn.Parameter(merged_weight(adapters.entries[layer], original, safe_merge=safe_merge),
                                   requires_grad=False)
        record.weights[layer] = key
        if record.originals is not None:
            record.originals[key] = original
    erased_specs = [s for s in sig.input_specs if getattr(s.arg, "name", None) in erased]
    input_specs = [s for s in sig.input_specs if s not in erased_specs]
    new_sig = ExportGraphSignature(input_specs=input_specs, output_specs=_repointed_outputs(gm.graph, sig))
    dropped = {s.target for s in erased_specs}
    state_dict = {k: v for k, v in ep.state_dict.items() if k not in dropped}
    state_dict.update(merged)
    new_ep = _new_program(ep, gm, new_sig, state_dict)
    setattr(new_ep, MERGED_ATTR, record)
    return new_ep


def _unmerge_program(ep: ExportedProgram, record: MergeRecord) -> ExportedProgram:
    weights = {}
    for layer, key in record.weights.items():
        if record.originals is not None:
            weights[key] = record.originals[key]
        else:
            weights[key] = nn.Parameter(subtracted_weight(record.adapters.entries[layer], ep.state_dict[key]),
                                        requires_grad=False)
    return _transform_program(ep, record.adapters.cfg, None, record.train, None, adapters=record.adapters,
                              weights=weights)


# -- GraphModule -------------------------------------------------------------------------------

def _merge_graph_module(gm_in: fx.GraphModule, safe_merge: bool, keep_original: bool) -> fx.GraphModule:
    adapters = _adapters_of(gm_in)
    gm = copy_graph_module(gm_in)
    sites, _ = strip_adapters(gm)
    check_mergeable(adapters, sites)
    check_untied(sites)
    if hasattr(gm, ADAPTERS_ATTR):
        delattr(gm, ADAPTERS_ATTR)
    record = MergeRecord(adapters, bool(getattr(gm_in, "lora_fx_train", False)),
                         originals={} if keep_original else None)
    installs = []
    for layer, calls in sites.items():
        entry, path = adapters.entries[layer], _path_of(calls[0])
        original = attr_at(gm, path)  # the layer's module (call_module sites) or its weight
        if isinstance(original, nn.Module):
            new = _with_weight(original, merged_weight(entry, original.weight, safe_merge=safe_merge))
        else:
            new = nn.Parameter(merged_weight(entry, original, safe_merge=safe_merge), requires_grad=False)
        installs.append((layer, path, original, new))
    for layer, path, original, new in installs:  # only after every merged weight was computed (and checked)
        _install(gm, gm_in, path, new)
        record.weights[layer] = path
        if record.originals is not None:
            record.originals[path] = original
    setattr(gm, MERGED_ATTR, record)
    return gm


def _unmerge_graph_module(gm_in: fx.GraphModule, record: MergeRecord) -> fx.GraphModule:
    gm = copy_graph_module(gm_in)
    for layer, path in record.weights.items():
        if record.originals is not None:
            restored = record.originals[path]
        else:
            current = attr_at(gm, path)
            weight = current.weight if isinstance(current, nn.Module) else current
            plain = nn.Parameter(subtracted_weight(record.adapters.entries[layer], weight), requires_grad=False)
            restored = _with_weight(current, plain.data) if isinstance(current, nn.Module) else plain
        _install(gm, gm_in, path, restored)
    return _transform_graph_module(gm, record.adapters.cfg, None, record.train, None, adapters=record.adapters)


def _path_of(call: fx.Node) -> str:
    return call.target if call.op == "call_module" else weight_node(call).target


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A shallow copy of `module` whose `weight` is a new frozen parameter (the original is untouched)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    return new


def _install(gm: nn.Module, original_root: nn.Module, path: str, value) -> None:
    """Set `gm.<path> = value` without touching a module `gm` shares with `original_root`."""
    *prefix, leaf = path.split(".")
    mod, orig = gm, original_root
    for part in prefix:
        child = getattr(mod, part)
        orig_child = getattr(orig, part, None) if orig is not None else None
        if child is orig_child:  # shared with the caller's module: copy this level before writing below it
            child = copy.copy(child)
            child._modules, child._parameters, child._buffers = (dict(child._modules), dict(child._parameters),
                                                                 dict(child._buffers))
            setattr(mod, part, child)
        mod, orig = child, orig_child
    setattr(mod, leaf, value)
