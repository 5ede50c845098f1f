"""`lora_fx.transform`: adapters injected into an `ExportedProgram` or a `GraphModule`.

ExportedProgram: adapter tensors become new parameter placeholders (after the existing ones,
as the signature requires), listed as PARAMETER inputs and stored in the state_dict; each
layer's scaling is a persistent 0-d buffer. Base weights are frozen views of the original
tensors (no copy; the caller's model is not modified). GraphModule: adapter tensors are
registered as parameters of a `lora_fx_adapters` submodule and read with `get_attr`, so the
result is called exactly like the input and its `.parameters()` include the adapters.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module

from .adapters import SCALING_KEY, AdapterSet, NamedWeights
from .call_inputs import user_input_names
from .config import LoraConfig
from .errors import LoraFxError
from .graph_builder import attr_at, copy_graph_module, graph_fake_mode, install_attr
from .io import Spec, read_spec
from .marks import ADAPTER, MERGED, clear_mark, marked_layers
from .passes.find_targets import (
    find_targets,
    graph_base_weights,
    graph_layers,
    output_layer_names_of_graph,
    signature_parameters,
    signature_state_names,
)
from .passes.inject_adapters import inject_adapters, sanitize
from .passes.substitute_saved_modules import (
    SAVED_READS_KEY,
    find_saved_module_reads,
    module_paths,
    select_saved_modules,
    substitute_saved_modules,
)
from .rules import effective_config, resolve

ADAPTERS_ATTR = "lora_fx_adapters"
# `named_programs.transform_named` (dict specs), which builds on this module: the package's
# `__init__` imports it, and it registers itself here, so that this module never imports it back.
_NAMED_TRANSFORM: list[Callable] = []


def register_named_transform(fn: Callable) -> None:
    _NAMED_TRANSFORM[:] = [fn]


def _make_adapters(gm, site_nodes, cfg: LoraConfig, pending, adapter_dtype, base: NamedWeights,
                   saved_reads: list[fx.Node], original: Callable[[fx.Node], torch.Tensor],
                   state_names: dict[str, str] | None = None,
                   ) -> AdapterSet:
    """Adapters for the layers `cfg` targets in `gm` and copies of the modules it saves in full,
    loaded from `pending` (a PEFT state dict) if given; base weights saved with it go to `base`,
    whose values also initialise variants that depend on them."""
    layers, output_layers = graph_layers(gm, site_nodes, state_names), output_layer_names_of_graph(site_nodes)
    cfg = effective_config(cfg, layers, output_layers)
    resolved = resolve(layers, cfg, output_layers)
    adapters = AdapterSet.create(cfg, resolved, dtype=adapter_dtype, base=base)
    for node in saved_reads:
        for inp, (module, name) in node.meta[SAVED_READS_KEY].items():
            adapters.saved_copy(module, name, original(inp))
    if pending is not None:
        adapters.load_peft_state_dict(pending, source="adapter directory", base=base)
    return adapters


def _saved_modules(gm: fx.GraphModule, cfg: LoraConfig, adapters: AdapterSet | None) -> list[str]:
    """The modules saved in full: those of an existing adapter set (unmerge), else `cfg`'s names
    matched against the modules the graph runs."""
    if adapters is not None:
        return list(adapters.saved)
    return select_saved_modules(cfg.saved_module_names(), module_paths(gm))


def program_state_kind(sig: ExportGraphSignature):
    """`StateKind` of an exported program's placeholders, from its signature."""
    kinds = {}
    for spec in sig.input_specs:
        name = getattr(spec.arg, "name", None)
        if spec.kind == InputKind.PARAMETER:
            kinds[name] = ("parameter", spec.target)
        elif spec.kind == InputKind.BUFFER:
            kinds[name] = ("persistent_buffer" if spec.persistent else "buffer", spec.target)
    return lambda node: kinds.get(node.name) if node.op == "placeholder" else None


def module_state_kind(gm: fx.GraphModule):
    """`StateKind` of a GraphModule's `get_attr` nodes, from the modules that own them."""
    def kind(node: fx.Node):
        if node.op != "get_attr":
            return None
        owner_path, _, leaf = node.target.rpartition(".")
        owner = attr_at(gm, owner_path) if owner_path else gm
        if leaf in getattr(owner, "_parameters", {}):
            return ("parameter", node.target)
        if leaf in getattr(owner, "_buffers", {}):
            transient = leaf in getattr(owner, "_non_persistent_buffers_set", set())
            return ("buffer" if transient else "persistent_buffer", node.target)
        return None
    return kind


def frozen(value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach(), requires_grad=False)


def transform(program, spec: Spec, *, train: bool = False, adapter_dtype: torch.dtype | None = None,
              stack_on_merged: bool = False):
    """Inject LoRA adapters into an exported program or a GraphModule.

    Args:
        program: a `torch.export.ExportedProgram` (a new one is returned) or a
            `torch.fx.GraphModule` (a new GraphModule is returned; e.g. `ep.module()` or
            `torch.fx.symbolic_trace(model)`).
        spec: a `LoraConfig` (new adapter) or a PEFT adapter directory; for an ExportedProgram
            also a dict `{name: LoraConfig | directory}` of named adapters: the program then takes
            one more keyword input, `adapter_index` (int64, one per row of the batch: the row's
            adapter's position in the dict, -1 for the base model; `named_programs.py`).
        train: emit adapter dropout (`lora_dropout`) as in training mode.
        adapter_dtype: dtype of new adapter tensors (default: fp32 for half bases).
        stack_on_merged: accept a merged program (`lora_fx.merge`) and take its merged weights as
            the new base, as PEFT's `merge_and_unload` followed by a new adapter does. Without
            it, a merged program is refused: the new adapter would silently sit on the old one.

    Example:
        >>> import torch, lora_fx
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> ep = torch.export.export(model, (torch.randn(2, 8),))
        >>> ep2 = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["0"]))
        >>> sorted(k for k in ep2.state_dict if "lora" in k)
        ['0.lora_A.weight', '0.lora_B.weight', '0.lora_scaling']
    """
    if isinstance(spec, dict):
        if not isinstance(program, ExportedProgram):
            raise LoraFxError(f"named adapters ({list(spec)}) are injected into an ExportedProgram (torch.export); got "
                              f"{type(program).__name__}")
        refuse_lora_fx_graph(program.graph, allow_merged=stack_on_merged)
        with _gc_paused():
            return _NAMED_TRANSFORM[0](program, spec, train=train, adapter_dtype=adapter_dtype)
    cfg, pending = read_spec(spec)
    if isinstance(program, (ExportedProgram, fx.GraphModule)):
        refuse_lora_fx_graph(program.graph, allow_merged=stack_on_merged)
    with _gc_paused():
        if isinstance(program, ExportedProgram):
            return _transform_program(program, cfg, pending, train, adapter_dtype)
        if isinstance(program, fx.GraphModule):
            return _transform_graph_module(program, cfg, pending, train, adapter_dtype)
    raise LoraFxError(f"transform takes an ExportedProgram or a torch.fx.GraphModule, got {type(program).__name__}")


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector paused while a transform runs. A transform allocates
    many small objects (nodes, metadata, fake tensors) that live until it returns; collections
    triggered meanwhile rescan the whole heap, so their cost grew with the program (measured on a
    7B-shaped program: 32 layers 1.24 s, 5.5 ms per site, against 4.3 ms per site for 8-16 layers;
    paused: 0.95 s, 4.3 ms per site). Garbage made meanwhile is collected afterwards as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def refuse_lora_fx_graph(graph: fx.Graph, *, allow_merged: bool = False) -> None:
    """Refuse a graph that already carries lora_fx adapters, live or merged (read from its marks,
    which survive decompositions, `.module()` and export round trips).

    Transforming it again would add a second adapter on top of the first: silently doubled for a
    merged program, a clash of input names for a transformed one."""
    merged = marked_layers(graph, MERGED)
    if merged and not allow_merged:
        raise LoraFxError(
            f"this program has lora_fx adapters merged into its weights (layers {_few(merged)}); transforming it "
            "would apply an adapter on top of the merged one. Call lora_fx.unmerge on the merged program, "
            "transform the original base program, or pass stack_on_merged=True to train a new adapter on top")
    adapted = marked_layers(graph, ADAPTER)
    if adapted:
        raise LoraFxError(
            f"this program is already transformed by lora_fx (adapters on layers {_few(adapted)}); one adapter per "
            "program: transform the original base program, or load other weights with lora_fx.load_adapter")


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _copy_program_graph(ep: ExportedProgram) -> tuple[fx.GraphModule, ExportGraphSignature]:
    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(ep.graph, copied))  # the caller's program stays as it was
    # A working copy: never run, and the ExportedProgram built from it generates its own code, so
    # its Python code is generated lazily (on first use), not here (a plain GraphModule generates it
    # when built: ~0.2 s of a 32-layer 7B-shaped transform).
    gm = _make_graph_module(ep.graph_module, graph, graph_module_cls=_LazyGraphModule)
    # Copying may rename nodes (FX avoids builtins such as `input`): carry the signature over.
    renamed = {old.name: new.name for old, new in copied.items()}
    return gm, _renamed_signature(ep.graph_signature, renamed)


def _transform_program(ep: ExportedProgram, cfg, pending, train, adapter_dtype, *,
                       adapters: AdapterSet | None = None, weights: dict | None = None) -> ExportedProgram:
    """`adapters`/`weights`: re-inject an existing adapter set over these base weights (unmerge)."""
    gm, sig = _copy_program_graph(ep)
    graph = gm.graph
    _clear_merged_marks(graph)  # unmerge re-injects into a merged program's graph
    state_names = signature_state_names(sig)
    site_nodes = find_targets(gm, state_names, signature_parameters(sig))
    weights = dict(weights or {})
    state_kind = program_state_kind(sig)
    saved = _saved_modules(gm, cfg, adapters)
    saved_reads = find_saved_module_reads(gm, saved, state_kind)

    def original(node: fx.Node) -> torch.Tensor:
        key = state_kind(node)[1]
        return weights.get(key, ep.state_dict[key])

    if adapters is None:
        base = graph_base_weights(site_nodes, lambda key: weights.get(key, ep.state_dict[key]),
                                  lambda key, value: weights.__setitem__(key, frozen(value)))
        adapters = _make_adapters(gm, site_nodes, cfg, pending, adapter_dtype, base, saved_reads, original,
                                  state_names)

    fake_mode = graph_fake_mode(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = StateInputs(graph, sig, fake_mode)
    cache: dict[tuple[str, str], fx.Node] = {}

    def provide(owner: str, key: str, tensor: torch.Tensor) -> fx.Node:
        if (owner, key) not in cache:
            cache[owner, key] = inputs.add(f"{owner}.{key}", tensor, buffer=key == SCALING_KEY)
        return cache[owner, key]

    user_inputs = user_input_names(placeholders, set(sig.user_inputs))
    # No code generated here: the ExportedProgram built below generates its own.
    inject_adapters(gm, site_nodes, adapters, provide, training=train, user_inputs=user_inputs, needs_grad=train,
                    recompile=False)
    substitute_saved_modules(saved_reads, lambda m, n, inp: adapters.saved_copy(m, n, original(inp)), provide)

    old_specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    input_specs = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        spec = inputs.specs.get(node.name) or old_specs.get(node.name)
        if spec is None:
            raise LoraFxError(f"internal: placeholder {node.name!r} has no input spec")  # pragma: no cover
        input_specs.append(spec)
    new_sig = ExportGraphSignature(input_specs=input_specs, output_specs=_repointed_outputs(graph, sig))

    state_dict = {}
    for key, value in {**ep.state_dict, **weights}.items():
        if isinstance(value, nn.Parameter):
            owner, _, leaf = key.rpartition(".")
            trainable = (cfg.bias == "all" and leaf == "bias") or (
                cfg.bias == "lora_only" and leaf == "bias" and owner in adapters.entries)
            value = nn.Parameter(value.detach(), requires_grad=trainable)  # shares storage
        state_dict[key] = value
    state_dict.update(inputs.state)
    return _new_program(ep, gm, new_sig, state_dict)


def _clear_merged_marks(graph: fx.Graph) -> None:
    for node in graph.nodes:
        clear_mark(node, MERGED)


def _new_program(ep: ExportedProgram, gm: fx.GraphModule, sig: ExportGraphSignature, state_dict) -> ExportedProgram:
    return ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=sig, state_dict=state_dict,
        range_constraints=copy.copy(ep.range_constraints), module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=ep.constants, verifiers=[ep.verifier],
    )


def _repointed_outputs(graph: fx.Graph, sig: ExportGraphSignature) -> list:
    """Output specs naming the graph's current output nodes (an adapted layer's output may be a
    program output: injecting renames it to the adapter's result, merging back)."""
    outputs = next(n for n in graph.nodes if n.op == "output").args[0]
    output_specs = []
    for spec, node in zip(sig.output_specs, outputs, strict=True):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node):
            spec = dataclasses.replace(spec, arg=TensorArgument(name=node.name))
        output_specs.append(spec)
    return output_specs


def _renamed_signature(sig: ExportGraphSignature, renamed: dict[str, str]) -> ExportGraphSignature:
    def fix(spec):
        arg = spec.arg
        if hasattr(arg, "name") and arg.name in renamed:
            arg = dataclasses.replace(arg, name=renamed[arg.name])
        return dataclasses.replace(spec, arg=arg)

    return ExportGraphSignature(input_specs=[fix(s) for s in sig.input_specs],
                                output_specs=[fix(s) for s in sig.output_specs])


class StateInputs:
    """New parameter and buffer inputs of a program being transformed: placeholders where the
    signature requires them (parameters before buffers, buffers before user inputs and lifted
    constants), their input specs, and the tensors for the new program's state."""

    def __init__(self, graph: fx.Graph, sig: ExportGraphSignature, fake_mode):
        self.graph, self.fake_mode = graph, fake_mode
        param_names = set(sig.inputs_to_parameters)
        # New inputs go before these and never become them: found once, not per provided tensor.
        self.after_params = next((n for n in graph.nodes if n.op == "placeholder" and n.name not in param_names),
                                 None)
        self.first_user_input = _first_user_input(graph, sig)
        self.specs: dict[str, InputSpec] = {}
        self.state: dict[str, torch.Tensor] = {}

    def add(self, target: str, tensor: torch.Tensor, *, buffer: bool) -> fx.Node:
        """A placeholder reading `tensor` as the program's state `target` (a persistent buffer, or a
        parameter)."""
        before = self.first_user_input if buffer else self.after_params
        name = (("b_" if buffer else "p_") + sanitize(target)).lower()
        if before is None:
            with self.graph.inserting_after([n for n in self.graph.nodes if n.op == "placeholder"][-1]):
                node = self.graph.placeholder(name)
        else:
            with self.graph.inserting_before(before):
                node = self.graph.placeholder(name)
        node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        kind = InputKind.BUFFER if buffer else InputKind.PARAMETER
        self.specs[node.name] = InputSpec(kind=kind, arg=TensorArgument(name=node.name), target=target,
                                          persistent=True if buffer else None)
        self.state[target] = tensor
        return node


def _first_user_input(graph: fx.Graph, sig: ExportGraphSignature):
    non_buffer_or_param = set(sig.user_inputs) | {
        s.arg.name for s in sig.input_specs
        if s.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ, InputKind.TOKEN) and hasattr(s.arg, "name")}
    return next((n for n in graph.nodes if n.op == "placeholder" and n.name in non_buffer_or_param), None)


def _transform_graph_module(gm_in: fx.GraphModule, cfg, pending, train, adapter_dtype, *,
                            adapters: AdapterSet | None = None) -> fx.GraphModule:
    gm = copy_graph_module(gm_in)
    graph = gm.graph
    _clear_merged_marks(graph)
    site_nodes = find_targets(gm)
    saved_reads = find_saved_module_reads(gm, _saved_modules(gm, cfg, adapters), module_state_kind(gm))

    def original(node: fx.Node) -> torch.Tensor:
        return attr_at(gm, node.target)

    if adapters is None:
        base = graph_base_weights(site_nodes, lambda path: attr_at(gm, path),
                                  lambda path, value: install_attr(gm, gm_in, path, frozen(value)))
        adapters = _make_adapters(gm, site_nodes, cfg, pending, adapter_dtype, base, saved_reads, original)
    container = nn.Module()
    old = getattr(gm, ADAPTERS_ATTR, None)  # a merged GraphModule's: the saved modules' copies it reads
    if old is not None:
        for name, p in old.named_parameters(recurse=False):
            container.register_parameter(name, p)
    gm.add_module(ADAPTERS_ATTR, container)
    fake_mode = graph_fake_mode(graph)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    cache: dict[tuple[str, str], fx.Node] = {}

    def provide(owner: str, key: str, tensor: torch.Tensor) -> fx.Node:
        if (owner, key) not in cache:
            attr = f"{sanitize(owner)}__{sanitize(key)}"
            if key == SCALING_KEY:
                container.register_buffer(attr, tensor)
            else:
                container.register_parameter(attr, tensor)
            with graph.inserting_before(first):
                node = graph.get_attr(f"{ADAPTERS_ATTR}.{attr}")
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
            cache[owner, key] = node
        return cache[owner, key]

    inject_adapters(gm, site_nodes, adapters, provide, training=train, needs_grad=train,
                    user_inputs=user_input_names([n for n in graph.nodes if n.op == "placeholder"]))
    substitute_saved_modules(saved_reads, lambda m, n, inp: adapters.saved_copy(m, n, original(inp)), provide)
    for name, p in gm.named_parameters():
        if not name.startswith(ADAPTERS_ATTR + "."):
            p.requires_grad_(False)
    return gm
