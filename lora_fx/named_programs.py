"""Exported programs over several named adapters: `lora_fx.transform(ep, {name: spec, ...})`.

The program gets every adapter's tensors as state (PEFT's in-model names: `q.lora_A.<name>.weight`,
and `q.lora_scaling.<name>` for the scalings) and one more user input, the keyword argument
`adapter_index`: int64, one per row of the batch, the position of the row's adapter in the dict
(-1: the base model). Its graph is `inject_adapter_bank`'s mixed-batch form, so any assignment of
adapters to rows runs the same program; the batch stays dynamic where the program's is.

The program records its adapters' names and configs in its `CONFIG` marks (`marks.config_mark`'s
`named`), so `named_adapters_of` reads them back from the program alone (after
`run_decompositions`, `.module()`, `torch.export.save/load`), over the program's own tensors:
`lora_fx.load_adapter(ep, dir, adapter_name=...)` writes into them, and an AOTInductor package
of the program takes new values of the same shapes as constants (`docs/many_adapters.md`).
`lora_fx.merge` folds one named adapter into the weights and drops `adapter_index`; unmerge gives
the named program back.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from . import init_modes, variants
from .adapters import SCALING_KEY, AdapterEntry, AdapterSet, storage_prefixes
from .call_inputs import batch_input, user_input_names
from .config import LoraConfig
from .errors import LoraFxError, UnsupportedFeatureError
from .graph_builder import graph_fake_mode, node_value
from .io import read_spec
from .marks import CONFIG, INPUT, OUTPUT, config_mark, get_mark, marked_layers, read_named_mark, set_mark
from .named_adapters import NamedAdapters
from .passes.find_targets import find_targets, graph_base_weights, signature_parameters, signature_state_names
from .passes.inject_adapter_bank import inject_adapter_bank
from .program import (
    StateInputs,
    _copy_program_graph,
    _make_adapters,
    _repointed_outputs,
    frozen,
    register_named_transform,
)
from .program_adapters import program_sites
from .registration import in_model_name
from .rules import resolve_layer

INDEX_INPUT = "adapter_index"


def storage_key(prefix: str, key: str, adapter: str) -> str:
    """Where a named program keeps an adapter tensor: PEFT's in-model name (`q.lora_A.b.weight`);
    the scaling under `q.lora_scaling.b`."""
    if key == SCALING_KEY:
        return f"{prefix}.{SCALING_KEY}.{adapter}"
    return in_model_name(prefix, key, adapter)


def transform_named(ep: ExportedProgram, specs: dict, *, train: bool = False,
                    adapter_dtype: torch.dtype | None = None) -> ExportedProgram:
    """`lora_fx.transform(ep, {name: LoraConfig | directory})`: see the module docstring."""
    if not specs:
        raise LoraFxError("transform(ep, {}) names no adapter; give {name: LoraConfig | adapter directory}")
    gm, sig = _copy_program_graph(ep)
    site_nodes = find_targets(gm, signature_state_names(sig), signature_parameters(sig))
    weights: dict[str, torch.Tensor] = {}
    base = graph_base_weights(site_nodes, lambda key: weights.get(key, ep.state_dict[key]),
                              lambda key, value: weights.__setitem__(key, frozen(value)))
    named = NamedAdapters()
    for name, spec in specs.items():
        cfg, pending = read_spec(spec)
        if cfg.saved_module_names():
            raise UnsupportedFeatureError(
                f"adapter {name!r}: modules_to_save (or a task_type with a head) in a program of named adapters is "
                "not supported yet; give the adapters no modules_to_save")
        if len(specs) > 1 and init_modes.mode_for(cfg.init_lora_weights).rewrites_base:
            raise UnsupportedFeatureError(
                f"adapter {name!r}: init_lora_weights={cfg.init_lora_weights!r} rewrites the base weights the other "
                "adapters run on; initialise it in a program of its own and load the converted adapter (docs/init.md)")
        adapters = _make_adapters(gm, site_nodes, cfg, pending, adapter_dtype, base, [], None,
                                  signature_state_names(sig))
        named.add(name, adapters)
    return inject_named(ep, gm, sig, site_nodes, named, train, weights)


register_named_transform(transform_named)


def inject_named(ep: ExportedProgram, gm: fx.GraphModule, sig: ExportGraphSignature, site_nodes, named: NamedAdapters,
                 train: bool, weights: dict[str, torch.Tensor]) -> ExportedProgram:
    """A new program: `gm` (a copy of `ep`'s graph, `sig` its signature) with `named`'s adapters and
    the `adapter_index` input; `weights` replace base weights of `ep`'s state."""
    graph = gm.graph
    fake_mode = graph_fake_mode(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user = set(sig.user_inputs)
    if INDEX_INPUT in user:
        raise LoraFxError(f"the program already has an input named {INDEX_INPUT!r}, which lora_fx needs for the "
                          "adapter index of named adapters")
    inputs = StateInputs(graph, sig, fake_mode)
    cache: dict[tuple[str, str, str], fx.Node] = {}

    def provide(adapter: str, owner: str, key: str, tensor: torch.Tensor) -> fx.Node:
        if (adapter, owner, key) not in cache:
            cache[adapter, owner, key] = inputs.add(storage_key(owner, key, adapter), tensor,
                                                    buffer=key == SCALING_KEY)
        return cache[adapter, owner, key]

    user_inputs = user_input_names(placeholders, user)
    index = _index_placeholder(graph, user_inputs, named, fake_mode)
    inputs.specs[index.name] = InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=index.name),
                                         target=None)
    inject_adapter_bank(gm, site_nodes, named, provide, index, mixed=True, training=train, user_inputs=user_inputs,
                        needs_grad=train, recompile=False)

    old_specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    input_specs = [inputs.specs.get(n.name) or old_specs[n.name] for n in graph.nodes if n.op == "placeholder"]
    new_sig = ExportGraphSignature(input_specs=input_specs, output_specs=_repointed_outputs(graph, sig))
    state_dict = {key: frozen(value) if isinstance(value, torch.nn.Parameter) else value
                  for key, value in {**ep.state_dict, **weights}.items()}
    state_dict.update(inputs.state)
    example = ep.example_inputs
    if example is not None:
        args, kwargs = example
        like = next((v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor) and v.dim()), None)
        rows = like.shape[0] if like is not None else 1
        example = (args, {**kwargs, INDEX_INPUT: torch.full((rows,), -1, dtype=torch.int64)})
    return _program(ep, gm, new_sig, state_dict, _with_index_kwarg(ep.module_call_graph), example)


def _index_placeholder(graph: fx.Graph, user_inputs: dict[str, fx.Node], named: NamedAdapters, fake_mode) -> fx.Node:
    """The `adapter_index` user input, last of the placeholders (the last keyword argument); its
    size is the batch's (`call_inputs.batch_input`: `input_ids` and the like first, then the first
    input of two or more dimensions), symbolic where the batch is dynamic."""
    batch_of = batch_input(user_inputs)
    like = node_value(batch_of) if batch_of is not None else None
    device = next(t.device for _, aset in named.items() for e in aset.entries.values() for t in e.tensors.values())
    with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
        node = graph.placeholder(INDEX_INPUT)
    with fake_mode:
        node.meta["val"] = torch.zeros(like.shape[0], dtype=torch.int64, device=device)
    return node


def _with_index_kwarg(module_call_graph):
    """The program's calling convention with `adapter_index` as one more (last) keyword argument."""
    graph = copy.deepcopy(module_call_graph)
    root = graph[0].signature
    args, kwargs = pytree.tree_unflatten([0] * root.in_spec.num_leaves, root.in_spec)
    _, root.in_spec = pytree.tree_flatten((args, {**kwargs, INDEX_INPUT: 0}))
    root.forward_arg_names = [*(root.forward_arg_names or []), INDEX_INPUT]
    return graph


def without_index_kwarg(module_call_graph):
    graph = copy.deepcopy(module_call_graph)
    root = graph[0].signature
    args, kwargs = pytree.tree_unflatten([0] * root.in_spec.num_leaves, root.in_spec)
    _, root.in_spec = pytree.tree_flatten((args, {k: v for k, v in kwargs.items() if k != INDEX_INPUT}))
    root.forward_arg_names = [n for n in (root.forward_arg_names or []) if n != INDEX_INPUT]
    return graph


def _program(ep: ExportedProgram, gm: fx.GraphModule, sig: ExportGraphSignature, state_dict, module_call_graph,
             example_inputs) -> ExportedProgram:
    return ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=sig, state_dict=state_dict,
        range_constraints=copy.copy(ep.range_constraints), module_call_graph=module_call_graph,
        example_inputs=example_inputs, constants=ep.constants, verifiers=[ep.verifier],
    )


# -- reading a named program back ------------------------------------------------------------------

def is_named_program(obj) -> bool:
    """A program of named adapters (`transform(ep, {...})`), or a GraphModule copy of one (`.module()`)."""
    return isinstance(obj, (ExportedProgram, fx.GraphModule)) and read_named_mark(obj.graph) is not None


def named_adapters_of(ep, sites: list[fx.Node] | None = None) -> tuple[NamedAdapters, bool]:
    """(the program's named adapters over its own tensors, whether dropout is compiled in); `ep` an
    ExportedProgram or its `.module()` (whose attributes hold the same tensors under the same names).

    Raises:
        LoraFxError: the program's scalings disagree with its recorded configs.
    """
    recorded, train = read_named_mark(ep.graph)
    if isinstance(ep, ExportedProgram):
        state = {**ep.state_dict, **ep.constants}
    else:
        state = {**dict(ep.named_parameters(remove_duplicate=False)), **dict(ep.named_buffers(remove_duplicate=False))}
    found = {layer.name: layer for layer in _site_layers(sites if sites is not None else program_sites(ep))}
    layers = [name for name in marked_layers(ep.graph, OUTPUT) if name in found]
    prefixes = storage_prefixes(found[name] for name in layers)
    named = NamedAdapters()
    for name, data in recorded.items():
        cfg = LoraConfig.from_peft_dict(data, source=f"the program's record of adapter {name!r}", recorded=True)
        variant = variants.variant_for(cfg)
        adapters = AdapterSet(cfg)
        for layer in layers:
            res = resolve_layer(found[layer], cfg)
            keys = list(variant.tensors(res, cfg))
            targets = {key: storage_key(prefixes[layer], key, name) for key in [*keys, SCALING_KEY]}
            if not all(t in state for t in targets.values()):
                continue  # this adapter has no tensors for the layer
            scaling = state[targets[SCALING_KEY]]
            if not math.isclose(float(scaling), res.scaling, rel_tol=1e-6, abs_tol=1e-12):
                raise LoraFxError(f"adapter {name!r}, layer {layer!r}: the program's scaling {float(scaling)} is not "
                                  f"the {res.scaling} its recorded config gives; it was changed outside lora_fx")
            adapters.entries[layer] = AdapterEntry(res, variant, {k: state[targets[k]] for k in keys}, scaling)
        named.add(name, adapters)
    return named, train


def record_named_config(ep, name: str, cfg: LoraConfig) -> None:
    """Write `cfg` (newly loaded into adapter `name`) into the program's record."""
    recorded, train = read_named_mark(ep.graph)
    recorded[name] = cfg.to_peft_dict()
    first = next(iter(recorded.values()))
    value = config_mark(first, train, named=recorded)
    for node in ep.graph.nodes:
        if get_mark(node, CONFIG) is not None:
            set_mark(node, CONFIG, value)


def adapter_state(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """The adapter tensors and scalings of a transformed program, by their names in the program's
    state: what `runner.load_constants(..., check_full_update=False)` of an AOTInductor package of
    the program takes, after `lora_fx.load_adapter(ep, ...)` wrote new values into them.

    Example:
        >>> import torch, lora_fx
        >>> ep = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> cfg = lora_fx.LoraConfig(r=2, target_modules=["0"])
        >>> state = lora_fx.adapter_state(lora_fx.transform(ep, {"a": cfg, "b": cfg}))
        >>> sorted(k for k in state if k.endswith(".b") or ".b." in k)
        ['0.lora_A.b.weight', '0.lora_B.b.weight', '0.lora_scaling.b']
    """
    sig = ep.graph_signature
    marked = {n.name for n in ep.graph.nodes if n.op == "placeholder" and get_mark(n, INPUT) is not None}
    targets = [s.target for s in sig.input_specs if getattr(s.arg, "name", None) in marked and s.target is not None]
    if not targets:
        raise LoraFxError("this program carries no lora_fx adapter inputs (was it made by lora_fx.transform?)")
    return {t: ep.state_dict[t] for t in targets}


def aoti_package(program: ExportedProgram, path: str, **options) -> str:
    """`torch._inductor.aoti_compile_and_package(program, package_path=path)`, with every tensor of
    the program's state kept as a named constant: Inductor otherwise folds 0-d tensors (the
    adapters' scalings: a "uniform value") into literals and inlines small 1-D ones, and new adapter
    values loaded into the package (`runner.load_constants(adapter_state(program),
    check_full_update=False)`) would then run with the old scalings. Returns the package's path.

    Example:
        >>> import tempfile, torch, lora_fx
        >>> ep = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> cfg = lora_fx.LoraConfig(r=2, target_modules=["0"])
        >>> path = lora_fx.aoti_package(lora_fx.transform(ep, cfg), tempfile.mkdtemp() + "/m.pt2")  # doctest: +SKIP
    """
    from torch._inductor import config as inductor_config

    with inductor_config.patch(always_keep_tensor_constants=True, joint_graph_constant_folding=False):
        return torch._inductor.aoti_compile_and_package(program, package_path=path, **options)


def _site_layers(sites):
    from .passes.find_targets import site_layers

    return site_layers(sites)


__all__ = ["INDEX_INPUT", "adapter_state", "aoti_package", "inject_named", "is_named_program", "named_adapters_of",
           "record_named_config", "storage_key", "transform_named", "without_index_kwarg"]
