"""The adapters of a transformed program, read from the program itself.

A transformed `ExportedProgram` or GraphModule records which adapter it carries in its own
graph and signature, not in Python attributes: every adapter output node carries the `CONFIG`
mark (the loaded config and whether dropout was compiled in, as JSON), the adapted layers are
the `OUTPUT` marks, and the adapter tensors are the program's state under `<layer>.<PEFT key>`
(a program, and its `.module()`) or the `INPUT`-marked attributes (a GraphModule from
`transform`). Marks live in `node.meta["custom"]`, which `run_decompositions()`, `.module()` and
`torch.export.save` / `load` keep, so `save_adapter`, `load_adapter` and `merge` work on every
such copy, and the `AdapterSet` built here holds the program's own tensors (by reference:
loading writes into the program).

A merged program is node for node the base program (merging removes the adapter's inputs);
only the object `lora_fx.merge` returned keeps what was merged (`merging.MergeRecord`). A copy of
a merged program made afterwards is recognised by its `MERGED` marks and refused with that
reason.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.export import ExportedProgram

from . import variants
from .adapters import SCALING_KEY, AdapterEntry, AdapterSet, storage_prefixes
from .config import LoraConfig
from .errors import LoraFxError
from .graph_builder import attr_at, copy_graph_module
from .marks import CONFIG, INPUT, MERGED, OUTPUT, config_mark, get_mark, marked_layers, read_config_mark, set_mark
from .passes.find_targets import find_targets, signature_parameters, signature_state_names, site_layers
from .passes.substitute_saved_modules import COPY_PREFIX
from .rules import resolve_layer


def _read_record(graph: fx.Graph) -> tuple[LoraConfig, bool] | None:
    recorded = read_config_mark(graph)
    if recorded is None:
        return None
    return LoraConfig.from_peft_dict(recorded[0], source="the program's lora_fx record",
                                    recorded=True), recorded[1]


def record_config(obj, cfg: LoraConfig) -> None:
    """Write `cfg` (a newly loaded adapter's config) into the program's `CONFIG` marks."""
    graph = obj.graph
    recorded = _read_record(graph)
    value = config_mark(cfg.to_peft_dict(), recorded[1] if recorded else False)
    for node in graph.nodes:
        if get_mark(node, CONFIG) is not None:
            set_mark(node, CONFIG, value)


def is_trained_program(obj) -> bool:
    """Whether `obj` was transformed with `train=True` (its dropout is compiled in)."""
    recorded = _read_record(obj.graph)
    return bool(recorded and recorded[1])


def merged_copy_error(obj) -> LoraFxError:
    """The refusal for a copy of a merged program (it holds no adapter and no merge record)."""
    return LoraFxError(
        f"this {type(obj).__name__} is a copy of a merged program (made by run_decompositions, .module() or "
        "torch.export.save/load after lora_fx.merge): a merged program is the base program with merged weights and "
        "holds no adapter, so there is nothing to save or unmerge. Use the program lora_fx.merge returned, or the "
        "transformed program it was merged from")


def adapters_of(obj, sites: list[fx.Node] | None = None) -> AdapterSet:
    """The `AdapterSet` of a transformed program / GraphModule, over the program's own tensors.

    `sites`: the program's call sites annotated on a copy of its graph (`program_sites`), if the
    caller has them already.

    Raises:
        LoraFxError: `obj` carries no lora_fx adapter, is a copy of a merged program, or its
            scalings disagree with its recorded config.
    """
    graph = obj.graph
    layers = marked_layers(graph, OUTPUT)
    recorded = _read_record(graph)
    if not layers or recorded is None:
        if marked_layers(graph, MERGED):
            raise merged_copy_error(obj)
        raise LoraFxError(f"{type(obj).__name__} carries no lora_fx adapters (was it made by lora_fx.transform?)")
    cfg, _ = recorded
    tensor_at = _tensor_reader(obj)
    found = {layer.name: layer for layer in site_layers(sites if sites is not None else program_sites(obj))}
    variant = variants.variant_for(cfg)
    adapters = AdapterSet(cfg)
    missing = [name for name in layers if name not in found]
    if missing:
        raise LoraFxError(f"the program marks layer {missing[0]!r} as adapted but has no call of it")
    prefixes = storage_prefixes(found[name] for name in layers)
    for name in layers:
        res = resolve_layer(found[name], cfg)
        tensors = {key: tensor_at(name, prefixes[name], key) for key in variant.tensors(res, cfg)}
        scaling = tensor_at(name, prefixes[name], SCALING_KEY)
        if not math.isclose(float(scaling), res.scaling, rel_tol=1e-6, abs_tol=1e-12):
            raise LoraFxError(
                f"layer {name!r}: the program's scaling {float(scaling)} is not the {res.scaling} its recorded config "
                "gives (lora_alpha / r); the scaling was changed outside lora_fx. Load an adapter with "
                "lora_fx.load_adapter instead")
        adapters.entries[name] = AdapterEntry(res, variant, tensors, scaling)
    for module, name, tensor in _saved_copies(obj):
        adapters.saved.setdefault(module, {})[name] = tensor
    return adapters


def _tensor_reader(obj):
    """`(layer, its storage prefix, key) -> tensor` over the program's state."""
    if isinstance(obj, ExportedProgram):
        state = {**obj.state_dict, **obj.constants}

        def read(owner: str, prefix: str, key: str) -> torch.Tensor:
            target = f"{prefix}.{key}"
            if target not in state:
                raise LoraFxError(f"the program marks layer {owner!r} as adapted but has no input {target!r}")
            return state[target]
        return read
    by_mark = {tuple(get_mark(n, INPUT)): n.target for n in obj.graph.nodes
               if n.op == "get_attr" and get_mark(n, INPUT) is not None}

    def read_attr(owner: str, prefix: str, key: str) -> torch.Tensor:
        path = by_mark.get((owner, key), f"{owner}.{key}")
        try:
            return attr_at(obj, path)
        except AttributeError:
            raise LoraFxError(f"the GraphModule marks layer {owner!r} as adapted but has no attribute {path!r}") \
                from None
    return read_attr


def _saved_copies(obj):
    """(module, parameter name, copy) of the modules saved in full (modules_to_save)."""
    infix = "." + COPY_PREFIX
    if isinstance(obj, ExportedProgram):
        for target, tensor in obj.state_dict.items():
            if infix in target:
                module, _, name = target.partition(infix)
                yield module, name, tensor
        return
    for node in obj.graph.nodes:
        mark = get_mark(node, INPUT) if node.op == "get_attr" else None
        if mark is not None and mark[1].startswith(COPY_PREFIX):
            yield mark[0], mark[1].removeprefix(COPY_PREFIX), attr_at(obj, node.target)


def program_sites(obj) -> list[fx.Node]:
    """The call sites of a program / GraphModule, annotated on a copy of its graph (the program's
    own nodes are never annotated)."""
    if isinstance(obj, ExportedProgram):
        return find_targets(copy_graph_module(obj.graph_module), signature_state_names(obj.graph_signature),
                            signature_parameters(obj.graph_signature))
    return find_targets(copy_graph_module(obj))
