"""`lora_fx.backend(spec)`: a `torch.compile` backend that injects adapters into Dynamo's graph.

Per graph Dynamo hands over: copy it, find the sites, append one placeholder per adapter tensor
(and per 0-d scaling), inject the variant subgraphs, compile with the inner backend, and return
a callable that feeds the current adapter tensors after Dynamo's own arguments. Adapter values
can therefore change (training, `load_adapter`, `set_scale`) with zero recompiles, and
gradients flow to them through AOTAutograd like to any input.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .adapters import PEFT_PREFIX, AdapterSet, base_weight_keys
from .attached import AttachedModel, copy_into, layer_weights, submodule_or_none, unwrap
from .call_inputs import batch_input, user_input_names
from .config import LoraConfig
from .distributed import check_attachable, check_synchronised
from .errors import LoraFxError, TargetNotFoundError, UnsupportedFeatureError
from .graph_builder import copy_graph_module, fake_like, graph_fake_mode, node_value
from .io import Spec, read_adapter_dir, read_spec, write_adapter_dir
from .layers import without_wrappers
from .named_adapters import NamedAdapters
from .passes.differentiate_base_ops import differentiate_base_ops
from .passes.find_targets import (
    SITE_KEY,
    find_targets,
    graph_base_weights,
    graph_layers,
    is_buffer_source,
    is_parameter_source,
    normalize_path,
    output_layer_names_of_graph,
    unmatched_layers,
    weight_node,
)
from .passes.inject_adapter_bank import inject_adapter_bank, zero_padding
from .passes.inject_adapters import inject_adapters, sanitize
from .passes.substitute_saved_modules import (
    SAVED_READS_KEY,
    find_saved_module_reads,
    module_paths,
    select_saved_modules,
    substitute_saved_modules,
)
from .registration import ADAPTER_NAME, in_model_name
from .rules import effective_config, resolve


def _inner_backend(inner: str | Callable) -> Callable:
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(inner)


class LoraBackend:
    """The object `lora_fx.backend(spec)` returns; pass it as `torch.compile(..., backend=)`.

    Args:
        spec: a `LoraConfig` or the path of a PEFT adapter directory (one adapter, named
            `"default"`), or a dict `{name: LoraConfig | directory}` of named adapters (the first
            is active; see `set_adapter`).
        inner: the backend that compiles the rewritten graph: "inductor" (default),
            "aot_eager", any registered name, or a callable `(gm, example_inputs) -> fn`.
        adapter_dtype: dtype of the adapter tensors (default: fp32 for a half-precision base,
            else the base weight's dtype).
        inference_form: in graphs compiled without grad, accumulate the adapter into the base
            output with one `addmm` (faster; same values). False: always the training form.

    Example:
        >>> import torch, lora_fx
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["0"]), inner="aot_eager")
        >>> opt = torch.optim.AdamW(lora.parameters(model), lr=1e-3)   # before the first call
        >>> fast = torch.compile(model, backend=lora, fullgraph=True)
        >>> fast(torch.randn(3, 8)).sum().backward(); opt.step()
    """

    def __init__(self, spec: Spec, *, inner: str | Callable = "inductor", adapter_dtype: torch.dtype | None = None,
                 inference_form: bool = True):
        specs = spec if isinstance(spec, dict) else {ADAPTER_NAME: spec}
        if not specs:
            raise LoraFxError("backend({}) names no adapter; give at least one {name: LoraConfig | directory}")
        self.named = NamedAdapters()
        self._pending: dict[str, dict | None] = {}
        for name, one in specs.items():
            config, self._pending[name] = read_spec(one)
            self.named.add(name, AdapterSet(config))
        self.inference_form = inference_form
        self.adapter_dtype = adapter_dtype
        self._inner = _inner_backend(inner)
        self._attached: AttachedModel | None = None
        self._param_names: dict[int, list[str]] | None = None  # id(parameter) -> its names in the model
        self._renames: dict[int, tuple] = {}  # id(parameter) -> (weakref, graph name, Rename)
        self._carried: dict[str, torch.Tensor] = {}  # state crossing calls (`call_inputs.CarriedState`)
        self.graphs_compiled = 0

    @property
    def adapters(self) -> AdapterSet:
        """The active adapter (the first active one of a mixed batch; the merged one while merged)."""
        if self._attached is not None:
            return self._attached.adapters
        return self.named.primary()

    @property
    def config(self) -> LoraConfig:
        """The config of the active adapter (changes with `load_adapter` and `set_adapter`)."""
        return self.adapters.cfg

    @property
    def active_adapters(self) -> list[str]:
        """The names of the adapters some row runs, in load order (PEFT's `active_adapters`)."""
        return self.named.active

    @property
    def adapter_names(self) -> list[str]:
        """Every loaded adapter's name, in load order (the `adapter_index` order of programs)."""
        return list(self.named)

    @property
    def merged(self) -> bool:
        """Whether the attached model's weights hold the merged adapters."""
        return self._attached is not None and self._attached.merged

    @property
    def _model(self) -> nn.Module | None:
        return self._attached.model if self._attached is not None else None

    # -- setup -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> LoraBackend:
        """Create the adapters for `model` now (so an optimizer can hold them before the first
        compiled call), freeze its base weights, and follow its train/eval mode for dropout."""
        inner = unwrap(model)
        if self._model is inner:
            return self
        check_attachable(model)
        model = inner
        if self._attached is not None:
            raise LoraFxError("this backend is already attached to another model; make one backend per model")
        self._attached = AttachedModel.attach(model, self, self.named, self._pending, self.adapter_dtype)
        self._pending = {}
        self._train_active_only()
        self._carried.clear()
        return self

    def detach(self) -> None:
        """Release the attached model: its parameters get back the `requires_grad` flags they had
        before `attach`, and another backend may attach to it. Refused while merged."""
        if self._attached is None:
            return
        self._attached.detach()
        self._attached = None
        self._param_names, self._renames = None, {}
        self._carried.clear()

    def parameters(self, model: nn.Module | None = None) -> list[nn.Parameter]:
        """The trainable tensors: adapters (and base biases per `bias=`). With `model`, attach
        to it first."""
        if model is not None:
            self.attach(model)
        self._follow_model()  # the tensors the model holds now (FSDP2 shards them)
        active = self.named.active if self._attached is None or not self.merged else []
        params = [p for name in active for p in self.named[name].parameters()] or self.adapters.parameters()
        if self._attached is not None:
            params += self._attached.trainable_base_parameters()
        return params

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """`(name, tensor)` for the trainable adapter tensors, named as in PEFT's files without
        the `base_model.model.` prefix (`layers.0.q_proj.lora_A.weight`)."""
        self._follow_model()
        if len(self.named) == 1:
            return self.adapters.named_parameters()
        return self._named_parameters_of_active()

    def _named_parameters_of_active(self) -> Iterator[tuple[str, nn.Parameter]]:
        """With several adapters: the active ones' trainable tensors, named as in the model
        (`q.lora_A.<adapter>.weight`, PEFT's in-model names)."""
        for name in self.named.active:
            adapters = self.named[name]
            storage = adapters.storage_names()
            for layer, entry in adapters.entries.items():
                for key, t in entry.tensors.items():
                    if t.requires_grad:
                        yield in_model_name(storage[layer], key, name), t

    def model_state_keys(self) -> list[str]:
        """The keys of the adapters (and `modules_to_save` copies) in the attached model's
        `state_dict()`, which holds them as PEFT's model does (`q_proj.lora_A.default.weight`):
        what a `torch.distributed.checkpoint` of the adapters alone keeps (docs/distributed.md).

        Example:
            >>> import torch, lora_fx
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"])).attach(model)
            >>> lora.model_state_keys()
            ['0.lora_A.default.weight', '0.lora_B.default.weight']
        """
        if self._attached is None:
            raise LoraFxError("the adapters are in the model only once it is attached: call lora.attach(model)")
        return [name for name, _ in self._attached.named_tensors()]

    # -- adapter values ----------------------------------------------------------------------
    def save_adapter(self, path: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write PEFT adapter directories (`PeftModel.from_pretrained` reads them).

        PEFT's `save_pretrained` layout: the adapter `"default"` (a backend made from one config or
        directory) at `path`, every other name in `path/<name>`; `adapter_name` saves only that one
        (at the place that layout gives it)."""
        if not len(self.adapters):
            raise LoraFxError("no adapters yet: call lora.parameters(model) or run the compiled model first")
        if self._attached is not None:
            self._attached.save_adapter(path, adapter_name)
            return
        self.adapters.check_savable()
        write_adapter_dir(path, self.adapters.config_to_save(), self.adapters.peft_state_dict())

    def load_adapter(self, path: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Load a PEFT adapter directory.

        Into an adapter already loaded (`adapter_name` of one, or None: the active one): in place,
        same shapes; compiled code is reused as is. Its config becomes that adapter's: scalings
        follow its `lora_alpha` (and patterns), `save_adapter` writes it, and the scale factor goes
        back to 1. A different `lora_dropout` takes effect too (training graphs are rebuilt for it).

        Under a new `adapter_name` (the model must be attached): a new adapter beside the others,
        of any rank and target set; graphs are built anew once for the new set of adapters, and
        switching between them afterwards recompiles nothing (`set_adapter`).

        Nothing changes unless every check passes (shapes, keys, values, config).

        Example:
            >>> import tempfile, torch, lora_fx
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"])).attach(model)
            >>> path = tempfile.mkdtemp(); lora.save_adapter(path)
            >>> lora.load_adapter(path, adapter_name="copy"); lora.adapter_names
            ['default', 'copy']
        """
        self._carried.clear()  # state between calls belongs to the sequences of the old adapter
        if self._attached is not None:
            self._attached.load_adapter(path, adapter_name)
            self._train_active_only()
            return
        if adapter_name is not None and adapter_name not in self.named:
            raise LoraFxError("loading a new named adapter needs the model: attach it first with "
                              "lora.parameters(model) (or lora.attach(model))")
        cfg, tensors = read_adapter_dir(path)
        target = self.adapters if adapter_name is None else self.named[adapter_name]
        target.load(cfg, tensors, source=os.fspath(path))

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add a new adapter, initialised from `config`, beside the loaded ones (PEFT's
        `add_adapter`); the active adapter does not change. The model must be attached."""
        if self._attached is None:
            raise LoraFxError("add_adapter needs the model: attach it first with lora.parameters(model)")
        if not isinstance(config, LoraConfig):
            raise LoraFxError(f"add_adapter takes a LoraConfig, got {type(config).__name__}")
        self._attached.add_adapter(adapter_name, AdapterSet(config))
        self._train_active_only()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs) -> None:
        """Add `adapter_name`, the combination of loaded adapters (PEFT's `add_weighted_adapter`;
        `lora_fx.weighted.add_weighted_adapter` does the arithmetic and takes the same `**kwargs`:
        svd_rank, svd_clamp, density, majority_sign_method, ...). The active adapter does not change.

        Example:
            >>> import torch, lora_fx
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> cfg = lora_fx.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
            >>> lora = lora_fx.backend({"a": cfg, "b": cfg}).attach(model)
            >>> lora.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab", combination_type="cat")
            >>> lora.adapter_names
            ['a', 'b', 'ab']
        """
        from .weighted import add_weighted_adapter

        if self._attached is None:
            raise LoraFxError("add_weighted_adapter needs the model: attach it first with lora.parameters(model)")
        self.named.check_new_name(adapter_name)
        self._follow_model()
        sources = [(self.named[n].cfg, self.named[n].peft_state_dict()) for n in adapters]
        cfg, tensors = add_weighted_adapter(sources, weights, combination_type, **kwargs)
        self._attached.add_adapter(adapter_name, AdapterSet(cfg), tensors)
        self._train_active_only()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter that no row runs (its tensors leave the model; graphs over the remaining
        adapters are built once)."""
        if self._attached is not None:
            self._attached.delete_adapter(adapter_name)
        else:
            self.named.delete(adapter_name)
        self._pending.pop(adapter_name, None)

    def set_adapter(self, adapter_name: str | list[str | None]) -> None:
        """Choose what runs: one adapter name for every row, or a list with one name per row of
        the batch (`None` or `"__base__"`: that row runs the base model), as PEFT's `set_adapter`
        and `adapter_names=`. Only the graphs' index input changes: nothing recompiles.

        Example:
            >>> import torch, lora_fx
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> lora = lora_fx.backend({"a": lora_fx.LoraConfig(r=2, target_modules=["0"]),
            ...                         "b": lora_fx.LoraConfig(r=4, target_modules=["0"])},
            ...                        inner="aot_eager").attach(model)
            >>> fast = torch.compile(model, backend=lora)
            >>> lora.set_adapter(["a", "b", None]); y = fast(torch.randn(3, 8))
            >>> lora.active_adapters
            ['a', 'b']
        """
        if self._attached is not None:
            self._attached.refuse_if_merged("set_adapter")
        before = self.named.active
        if isinstance(adapter_name, str):
            self.named.set_uniform(adapter_name)
        else:
            if self._attached is not None and self._attached.saved_paths and (
                    None in adapter_name or "__base__" in adapter_name):
                raise UnsupportedFeatureError(
                    f"rows that run the base model need the original modules of modules_to_save "
                    f"({self._attached.saved_paths}), and every row of a graph reads their trained copies; run the "
                    "base rows in a batch of their own (with lora.disable_adapter())")
            self.named.set_rows(adapter_name)
        if self.named.active != before:  # a serving loop switching per batch pays nothing here
            self._train_active_only()
        self._carried.clear()

    def _train_active_only(self) -> None:
        """PEFT's rule: the adapters some row runs train, the others are frozen (an optimizer over the
        model's trainable parameters then leaves them alone: no zero gradients, no weight decay)."""
        if len(self.named) < 2:
            return
        for name, adapters in self.named.items():
            adapters.set_trainable(name in self.named.active)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model runs without adapters (PEFT's `disable_adapter`): the base
        model, with the original modules of `modules_to_save`. The selection is kept (and runs again
        after the block)."""
        if self._attached is not None:
            self._attached.refuse_if_merged("disable_adapter")
        self.named.disabled += 1
        try:
            yield
        finally:
            self.named.disabled -= 1

    def set_scale(self, factor: float, adapter_name: str | None = None) -> None:
        """Multiply the configured scaling of every layer of `adapter_name` (None: of every adapter)
        by `factor` (0 disables it; 1 restores the loaded adapter's own scaling)."""
        if self._attached is not None:
            self._attached.refuse_if_merged("set_scale")
        names = list(self.named) if adapter_name is None else [self.named.check_name(adapter_name)]
        for name in names:
            self.named[name].set_scale(factor)

    # -- merging ------------------------------------------------------------------------------
    def merge(self, *, safe_merge: bool = False, keep_original: bool = True) -> None:
        """Run merged weights and no adapter compute (see `lora_fx.merge`).

        The attached model's adapted weights get merged values: with `keep_original`, each
        `nn.Parameter` is pointed at a new merged tensor and the original tensor is kept aside
        (unmerge points it back: bit-exact; costs one weight-sized tensor per adapted layer
        while merged); without, the merged values are written in place (no extra memory) and
        unmerge subtracts. The compiled model switches to a graph without adapters: compiled
        once per mode, ever, however often merge/unmerge alternate.
        """
        if self._attached is None:
            raise LoraFxError("merge needs the model: attach it first with lora.parameters(model)")
        self._attached.merge(safe_merge=safe_merge, keep_original=keep_original)

    def unmerge(self) -> None:
        """Back to adapter compute over the original weights (bit-exact after a default merge)."""
        if self._attached is None:
            raise LoraFxError("the adapters are not merged")
        self._attached.unmerge()

    def _saved_modules_in(self, gm: fx.GraphModule) -> list[str]:
        """The modules saved in full (modules_to_save): the attached model's, else those of this graph."""
        if self._attached is not None:
            return self._attached.saved_paths
        return select_saved_modules(self.config.saved_module_names(), module_paths(gm))

    def _follow_model(self, *, in_forward: bool = False) -> None:
        if self._attached is not None:
            self._attached.follow(in_forward=in_forward)

    # -- the backend -------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]):
        # Our own copy: Dynamo keeps using (and later strips the metadata of) its graph, and a
        # second train/eval build may happen long after this call.
        gm = copy_graph_module(gm)
        self._follow_model(in_forward=True)
        check_synchronised(self._attached.held_ids() if self._attached is not None else None)
        # Names in a Dynamo graph are relative to the frame it compiled: the model itself, a
        # function using it (`G.model...`), or a submodule whose forward resumed after a graph
        # break. With a model attached, the graph's names are translated to the model's by the
        # identity of the parameters it receives, call by call (a submodule's frame can be shared
        # by several layers, each with its own adapters).
        rename, probe = self._graph_rename(gm, example_inputs)
        named = self._renamed(gm, rename)
        site_nodes = find_targets(named.gm, named.state_names)
        if self._model is None:
            self._adopt_sites(site_nodes, named, example_inputs)
        self._check_sites(named, site_nodes, example_inputs)
        saved_reads = find_saved_module_reads(named.gm, self._saved_modules_in(named.gm), named.state_kind)
        adapted = any(n.meta[SITE_KEY].layer.name in aset.entries
                      for n in site_nodes for aset in self.named.sets.values())
        if probe is None and not saved_reads and not adapted:
            return self._compile(gm, list(example_inputs))
        # Adapter dropout depends on train/eval, which Dynamo does not guard on unless the model
        # reads `self.training` itself: follow the attached model's mode at call time, compiling
        # a graph per (mode, dropout) the first time it is seen (two per graph, unless a loaded
        # adapter brings another lora_dropout). The dropout is read from the loaded config at
        # call time, never remembered from compile time.
        # Merged, the graph is Dynamo's own (the weights it reads hold merged values), reading the
        # copies of modules saved in full (modules_to_save) if there are any.
        def current_key():
            sel = self.named.running
            if self.merged:
                return "merged"
            if sel.mode == "base":
                return "base"
            if len(self.named) == 1 and sel.mode == "uniform":
                dropout = self.config.lora_dropout
                training = self._model is not None and bool(self._model.training) and dropout > 0
                # The adapter's name and the table's generation: a graph reads one adapter's tensors.
                return (training, dropout if training else 0.0, sel.names[0], self.named.generation)
            dropouts = tuple(a.cfg.lora_dropout for a in self.named.sets.values())
            training = self._model is not None and bool(self._model.training) and max(dropouts) > 0
            return ("bank", sel.mode == "mixed", self.named.generation, training, dropouts if training else ())

        def build(key, inputs, graph=None):
            self._follow_model(in_forward=True)  # the adapters the model holds now
            mode, renamed = key
            graph = graph or self._renamed(gm, renamed)  # each build rewrites a graph of its own
            if mode == "base":  # Dynamo's own graph: the base model (original modules_to_save too)
                return self._compile(copy_graph_module(gm), list(inputs)), Feeds()
            if mode == "merged":
                if not saved_reads:  # Dynamo's own graph: its inputs keep their sources (symbolic floats)
                    return self._compile(copy_graph_module(gm), list(inputs)), Feeds()
                return self._build_and_compile(graph, inputs, training=False, with_adapters=False)
            if mode[0] == "bank":
                stale = [k for k in compiled if k[0][0] == "bank" and k[0][2] != mode[2]]
                for k in stale:  # built for a set of adapters that has changed since
                    del compiled[k]
                return self._build_and_compile(graph, inputs, training=mode[3], mixed=mode[1])
            return self._build_and_compile(graph, inputs, training=mode[0])

        first = (current_key(), rename)
        tracing = torch._guards.TracingContext.try_get()
        compiled: dict = {}
        compiled[first] = build(first, list(example_inputs), named)

        def run(*args):
            renamed = rename if probe is None else self._rename_at_call(args[probe[0]], probe[1])
            key = (current_key(), renamed)
            if key not in compiled:
                # Built as the first one was: from Dynamo's example inputs (its fakes, which know the
                # graph's symbolic sizes and floats: a float input read with .item() is data-dependent
                # otherwise) in the tracing context Dynamo compiled the graph in.
                with torch._guards.tracing(tracing):
                    compiled[key] = build(key, list(example_inputs))
            fn, feeds = compiled[key]
            fed = feeds.values(self._attached, args)
            return feeds.keep_carried(fn(*args, *fed))

        return run

    # -- names: Dynamo's frame vs the attached model -----------------------------------------------
    def _graph_rename(self, gm: fx.GraphModule, example_inputs) -> tuple[Rename, tuple[int, str] | None]:
        """The translation of this graph's names to the attached model's, and the probe that tells
        it at call time: (the index of a parameter input, its name in the graph). Identity, no
        probe, without an attached model or without parameter inputs."""
        if self._model is None:
            return IDENTITY, None
        for index, (node, value) in enumerate(zip(_placeholders(gm), example_inputs, strict=False)):
            source = _source_name(node)
            if source is None or "_parameters" not in source or not isinstance(value, torch.Tensor):
                continue
            graph_name = normalize_path(source)
            return self._rename_at_call(value, graph_name), (index, graph_name)
        return IDENTITY, None

    def _rename_at_call(self, value: torch.Tensor, graph_name: str) -> Rename:
        """How the graph that received `value` under `graph_name` names the attached model's modules."""
        cached = self._renames.get(id(value))
        if cached is not None and cached[0]() is value and cached[1] == graph_name:
            return cached[2]
        names = self._parameter_names().get(id(value))
        if not names:
            self._param_names = None  # the model's parameters may have been replaced: look again
            names = self._parameter_names().get(id(value))
        if not names and is_fake(value):  # DDP's graph splitting compiles and runs fragments on fakes
            return self._rename_by_name(graph_name)
        if not names:
            raise LoraFxError(
                f"the compiled graph received a parameter ({graph_name!r}) that is not one of the attached model's; "
                "this backend adapts the model it is attached to: use one backend per model")
        rename = Rename.between(graph_name, max(names, key=lambda n: _common_suffix(n, graph_name)))
        self._renames[id(value)] = (weakref.ref(value), graph_name, rename)
        return rename

    def _rename_by_name(self, graph_name: str) -> Rename:
        """The translation by names alone, for a graph whose example parameters are fakes (DDP's
        graph splitting compiles fragments of the whole model's graph): the one model parameter
        that shares the most trailing components with `graph_name`."""
        names = [n for ns in self._parameter_names().values() for n in ns]
        best = max((_common_suffix(n, graph_name) for n in names), default=0)
        matches = [n for n in names if _common_suffix(n, graph_name) == best]
        if best == 0 or len(matches) != 1:
            raise UnsupportedFeatureError(
                f"the compiled graph names a parameter {graph_name!r} that lora_fx cannot match to one of the attached "
                f"model's ({len(matches)} candidates) from a graph fragment; set "
                "torch._dynamo.config.optimize_ddp = False to compile DDP models whole")
        return Rename.between(graph_name, matches[0])

    def _parameter_names(self) -> dict[int, list[str]]:
        if self._param_names is None:
            self._param_names = {}
            for name, p in self._model.named_parameters(remove_duplicate=False):
                self._param_names.setdefault(id(p), []).append(without_wrappers(name))
        return self._param_names

    def _renamed(self, gm: fx.GraphModule, rename: Rename) -> RenamedGraph:
        """A copy of `gm` whose module paths and parameter / buffer names are the attached model's."""
        gm = _with_renamed_stacks(copy_graph_module(gm), rename)
        state_names, kinds = {}, {}
        for node in gm.graph.nodes:
            source = _source_name(node)
            # Parameters and buffers themselves, not tensors reached through them (quant_state.absmax).
            if source is None or not (is_parameter_source(source) or is_buffer_source(source)):
                continue
            fqn = rename(normalize_path(source))
            state_names[node.name] = fqn
            if is_parameter_source(source):
                kinds[node.name] = ("parameter", fqn)
            else:  # persistence is read from the attached model; without one a buffer counts as persistent
                owner, _, leaf = fqn.rpartition(".")
                transient = self._model is not None and leaf in getattr(
                    submodule_or_none(self._model, owner), "_non_persistent_buffers_set", set())
                kinds[node.name] = ("buffer" if transient else "persistent_buffer", fqn)
        return RenamedGraph(gm, state_names, lambda node: kinds.get(node.name) if node.op == "placeholder" else None)

    def _compile(self, gm, example_inputs):
        self.graphs_compiled += 1
        return self._inner(gm, example_inputs)

    def _build_and_compile(self, named: RenamedGraph, example_inputs: list[Any], *, training: bool,
                           with_adapters: bool = True, mixed: bool | None = None):
        """Rewrite and compile one graph. `mixed` None: the one loaded adapter's graph; False / True:
        every named adapter's, with an index input choosing one for all rows / one per row."""
        work = named.gm
        graph = work.graph
        site_nodes = find_targets(work, named.state_names)
        saved_reads = find_saved_module_reads(work, self._saved_modules_in(work), named.state_kind)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        values = dict(zip(placeholders, example_inputs, strict=False))
        feeds = Feeds()
        fake_mode = graph_fake_mode(graph)
        cache: dict[tuple[str, str, str], fx.Node] = {}
        last = [placeholders[-1]]

        def new_input(name: str, val) -> fx.Node:
            # Fed inputs follow the graph's own, in the order they are made (`Feeds` keeps it).
            with graph.inserting_after(last[0]):
                node = graph.placeholder(name)
            if val is not None:
                node.meta["val"] = node.meta["example_value"] = val
            last[0] = node
            return node

        # Graphs over named adapters differentiate every adapter the variant trains, frozen or not:
        # `set_adapter` freezes the adapters no row runs (PEFT's rule), and unfreezes them when they
        # run again; the gradients of a frozen input are dropped by autograd (no `.grad`), so one
        # graph serves every selection.
        trainable = set().union(*(a.trainable_ids() for a in self.named.sets.values())) if mixed is not None else None

        def provide_named(adapter: str, owner: str, key: str, tensor: torch.Tensor) -> fx.Node:
            if (adapter, owner, key) not in cache:
                val = fake_like(fake_mode, tensor) if fake_mode is not None else None
                if val is not None and trainable is not None and id(tensor) in trainable and torch.is_grad_enabled():
                    val.requires_grad_(True)
                prefix = "lora" if mixed is None else f"lora_{sanitize(adapter)}"
                node = new_input(f"{prefix}_{sanitize(owner)}_{sanitize(key)}".lower(), val)
                cache[adapter, owner, key] = node
                values[node] = tensor
                feeds.add(adapter, owner, key, tensor)
            return cache[adapter, owner, key]

        selected_cache: dict[tuple[str, str], fx.Node] = {}

        def provide_selected(layer: str, key: str, members: dict[str, tuple[str, torch.Tensor]],
                             shape: list[int]) -> fx.Node:
            if (layer, key) not in selected_cache:
                like = next(iter(members.values()))[1]
                val = None
                if fake_mode is not None:
                    with fake_mode:
                        val = torch.empty(shape, dtype=like.dtype, device=like.device)
                    if torch.is_grad_enabled() and any(id(t) in trainable for _, t in members.values()):
                        val.requires_grad_(True)
                node = new_input(f"lora_selected_{sanitize(layer)}_{sanitize(key)}".lower(), val)
                item = _SelectedInput(self.named, {name: (owner, key, t) for name, (owner, t) in members.items()},
                                      shape, like)
                selected_cache[layer, key] = node
                item.resolve(None)  # the tensors themselves while building; `Feeds` resolves them again
                values[node] = item.value(example_inputs)
                feeds.add_carried(item)
            return selected_cache[layer, key]

        active = self.named.running.names[0] if mixed is None and with_adapters else None

        def provide(owner: str, key: str, tensor: torch.Tensor) -> fx.Node:
            return provide_named(active or ADAPTER_NAME, owner, key, tensor)

        carry = _Carry(feeds, new_input, placeholders, example_inputs, values, self._carried)
        user_inputs = user_input_names(placeholders, positional=self._forward_arguments())

        # Dynamo guards on grad mode, so a graph built without grad only ever runs without it.
        needs_grad = torch.is_grad_enabled() or not self.inference_form
        if with_adapters and mixed is None:
            inject_adapters(work, site_nodes, self.adapters, provide, training=training, user_inputs=user_inputs,
                            needs_grad=needs_grad, carry=carry, mutable=True)
            carry.finish(graph)
        elif with_adapters:
            index = self._index_input(new_input, user_inputs, placeholders, example_inputs, values, feeds, mixed)
            inject_adapter_bank(work, site_nodes, self.named, provide_named, index, mixed=mixed, training=training,
                                user_inputs=user_inputs, needs_grad=needs_grad, carry=carry,
                                provide_selected=provide_selected)
            carry.finish(graph)
        substitute_saved_modules(saved_reads, lambda m, n, inp: self.adapters.saved_copy(m, n, values[inp]),
                                 provide)
        if with_adapters and needs_grad:  # after both: the trained inputs are the INPUT-marked ones
            differentiate_base_ops(work)
        # A fresh plain GraphModule: compile_fx must not look for Dynamo sources of new inputs.
        work = fx.GraphModule(work, graph)
        # The new inputs' example values are the static-shaped fakes already on their placeholders:
        # handed real tensors, AOTAutograd would give them symbolic sizes that have no Dynamo
        # source, and Dynamo then fails to build its guards (seen on a conv adapter).
        new_inputs = [n for n in work.graph.nodes if n.op == "placeholder"][len(placeholders):]
        examples = [n.meta.get("val", values[n]) for n in new_inputs]
        fn = self._compile(work, example_inputs + examples)
        return fn, feeds

    def _index_input(self, new_input, user_inputs: dict[str, fx.Node], placeholders, example_inputs, values,
                     feeds: Feeds, mixed: bool) -> fx.Node:
        """The graph input saying which named adapter runs: 0-d, or one per row of the batch (its
        size that of the batch's first user input, symbolic where the batch is dynamic)."""
        device = next(t.device for aset in self.named.sets.values() for e in aset.entries.values()
                      for t in e.tensors.values())
        batch_of = None
        if mixed:
            # The input with as many rows as names (`forward(gain, x)`: x), else the likeliest batch
            # (then the names' count is refused against it below, naming both numbers).
            examples = dict(zip(placeholders, example_inputs, strict=False))
            batch_of = (batch_input(user_inputs, rows=len(self.named.running.names), examples=examples)
                        or batch_input(user_inputs, examples=examples))
            if batch_of is None:
                raise LoraFxError("set_adapter with one name per row needs a batched tensor input to the model; "
                                  f"this graph's inputs are {sorted(user_inputs)}")
        like = node_value(batch_of) if batch_of is not None else None
        val = None
        fake = like if like is not None and is_fake(like) else None
        fake_mode = fake.fake_mode if fake is not None else graph_fake_mode(placeholders[0].graph)
        if fake_mode is not None:
            with fake_mode:
                val = (torch.zeros(fake.shape[0], dtype=torch.int64, device=device) if mixed
                       else torch.zeros((), dtype=torch.int64, device=device))
        node = new_input("lora_adapter_index", val)
        item = _IndexInput(self.named, placeholders.index(batch_of) if batch_of is not None else None, device)
        values[node] = item.value(example_inputs)
        feeds.add_carried(item)
        return node

    def _forward_arguments(self) -> list[str] | None:
        """The attached model's `forward` parameters that can be given by position (names the
        inputs of a graph whose frame takes `*args`); None without a model."""
        if self._model is None:
            return None
        try:
            signature = inspect.signature(unwrap(self._model).forward)
        except (TypeError, ValueError):
            return None
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [p.name for p in signature.parameters.values() if p.kind in kinds]

    def _adopt_sites(self, site_nodes: list[fx.Node], named: RenamedGraph, example_inputs) -> None:
        """No model attached: create (or load) adapters for the layers this graph holds."""
        if len(self.named) > 1:
            raise LoraFxError(f"{len(self.named)} named adapters ({list(self.named)}) need the model: attach it with "
                              "lora.parameters(model) or lora.attach(model) before the first compiled call")
        gm = named.gm
        placeholders = _placeholders(gm)
        layers, output_layers = graph_layers(gm, site_nodes, named.state_names), output_layer_names_of_graph(site_nodes)
        if not len(self.adapters):  # the first graph decides, as the model would (all-linear on MoE experts)
            self.adapters.cfg = effective_config(self.config, layers, output_layers)
        try:
            resolved = resolve(layers, self.config, output_layers, require_match=not len(self.adapters))
        except TargetNotFoundError as e:
            raise TargetNotFoundError(
                f"{e}. This backend is not attached to the model, so it sees only the layer names of the graph "
                "Dynamo compiled, which are relative to the compiled frame (after a graph break inside a "
                "submodule they lose their prefix); attach the model with lora.parameters(model)") from None
        # Base weights, for variants initialised from them and for base weights saved with the
        # adapter: Dynamo's example inputs are the model's own tensors, written in place as PEFT's
        # loading writes into the model.
        values = dict(zip(placeholders, example_inputs, strict=False))
        by_name = {named.state_names[node.name]: value for node, value in values.items()
                   if node.name in named.state_names}
        base = graph_base_weights(site_nodes, by_name.get, copy_into(by_name))
        added = self.adapters.add(resolved, dtype=self.adapter_dtype, base=base)
        new_saved: list[str] = []
        for node in find_saved_module_reads(gm, self._saved_modules_in(gm), named.state_kind):
            for inp, (module, name) in node.meta[SAVED_READS_KEY].items():
                if module not in self.adapters.saved and module not in new_saved:
                    new_saved.append(module)
                self.adapters.saved_copy(module, name, values[inp])
        pending = next(iter(self._pending.values()), None)
        if pending is None:
            return
        storage = self.adapters.storage_names()
        # Names here are relative to the compiled frame: a layer the directory has no tensors for
        # would silently run with freshly initialised factors. Refuse it by name instead.
        for name in added:
            if not any(k.startswith(f"{PEFT_PREFIX}{storage[name]}.") for k in pending):
                raise LoraFxError(
                    f"layer {name!r} (as the compiled graph names it) is targeted by the adapter's config but the "
                    "adapter directory holds no tensors under that name. Names in the graph are relative to the "
                    "frame Dynamo compiled; attach the model with lora.parameters(model) so that lora_fx uses its "
                    "names")
        prefixes = tuple(f"{PEFT_PREFIX}{storage[name]}." for name in added) + tuple(
            f"{PEFT_PREFIX}{name}." for name in new_saved)
        base_keys = base_weight_keys(pending, base)
        mine = {k: v for k, v in pending.items() if k.startswith(prefixes) or k in base_keys}
        if mine:
            sub = AdapterSet(self.config)
            sub.entries = {name: self.adapters.entries[name] for name in added}
            sub.saved = {module: self.adapters.saved[module] for module in new_saved}
            sub.load_peft_state_dict(mine, source="adapter directory", base=base)

    def _check_sites(self, named: RenamedGraph, site_nodes: list[fx.Node], example_inputs) -> None:
        """Every adapted layer this graph runs is a site here, under its own name, of the shape its
        adapter was made for."""
        gm = named.gm
        entries = {}  # every named adapter's layers (one adapter's entry per layer: shapes agree)
        for aset in self.named.sets.values():
            entries.update(aset.entries)
        if self._model is not None:
            values = dict(zip(_placeholders(gm), example_inputs, strict=False))
            adapted_weights = {id(w): name for name, w in layer_weights(self._model, entries).items()}
            for node in site_nodes:
                layer = node.meta[SITE_KEY].layer.name
                weight = values.get(weight_node(node))
                owner = adapted_weights.get(id(weight)) if weight is not None else None
                if owner is not None and owner != layer and getattr(
                        submodule_or_none(self._model, layer), "weight", None) is not weight:
                    raise LoraFxError(f"layer {owner!r}'s weight is read in the compiled graph under the name "
                                      f"{layer!r}, which lora_fx cannot match to the attached model; compile the "
                                      "model itself")
        for layer in unmatched_layers(gm, site_nodes, named.state_names):
            if layer.name in entries:
                raise UnsupportedFeatureError(f"layer {layer.name!r} has an adapter, but lora_fx cannot adapt its call "
                                              f"in the compiled graph: {layer.unsupported}")
        # A quantized layer is found by its module call; one whose weight this graph reads with no
        # whole call of it here (a graph break inside its forward) would silently lose its adapter.
        sited = {node.meta[SITE_KEY].layer.name for node in site_nodes}
        read = set(named.state_names.values())
        for name, entry in entries.items():
            if entry.resolved.layer.kind.module_boundary and name not in sited and f"{name}.weight" in read:
                raise UnsupportedFeatureError(
                    f"layer {name!r} has an adapter, but its forward does not run whole in this compiled graph (it "
                    "reads the layer's weight without the layer's call: a graph break inside its forward?), so "
                    "lora_fx cannot tell its output")
        for node in site_nodes:
            layer = node.meta[SITE_KEY].layer
            entry = entries.get(layer.name)
            if entry is None:
                continue
            have = entry.resolved.layer
            if (have.in_features, have.out_features, have.kind) != (layer.in_features, layer.out_features,
                                                                     layer.kind):
                raise LoraFxError(
                    f"{layer.name}: the compiled graph has a {layer.kind} ({layer.in_features} -> "
                    f"{layer.out_features}) but the adapter was made for a {have.kind} ({have.in_features} -> "
                    f"{have.out_features})")


class Feeds:
    """What the inputs a compiled graph gained read at every call: the tensor registered in the
    attached model now (a wrapper such as FSDP2 swaps its own in), else the tensor itself (new
    values are copied into it). Where each one is read is resolved once per registration (a
    detach / attach replaces it). Carried state (`call_inputs.CarriedState`) is read from, and its
    new value kept in, the backend's store: the graph returns it after the model's outputs."""

    def __init__(self):
        self._items: list[tuple[str, str, str, torch.Tensor] | _CarriedInput | _IndexInput | _SelectedInput] = []
        self._resolved_for: object = self  # no registration resolved yet (None is one: detached)
        self._slots: list[tuple[dict, str] | _CarriedInput | _IndexInput | _SelectedInput] = []
        self._carried_out: list[str] = []  # keys of the graph's extra outputs, in order
        self._store: dict[str, torch.Tensor] = {}

    def add(self, adapter: str, owner: str, key: str, tensor: torch.Tensor) -> None:
        self._items.append((adapter, owner, key, tensor))

    def add_carried(self, item: _CarriedInput | _IndexInput | _SelectedInput) -> None:
        self._items.append(item)
        self._resolved_for = self

    def carry_out(self, key: str, store: dict[str, torch.Tensor]) -> None:
        self._carried_out.append(key)
        self._store = store

    def values(self, attached, args=()) -> list[torch.Tensor]:
        """The fed inputs' values for this call; `attached` (an `AttachedModel`, or None) says where
        each adapter tensor is registered."""
        if attached is not self._resolved_for:
            self._slots = []
            for item in self._items:  # an adapter tensor (a tuple), or an input computed per call
                if isinstance(item, tuple):
                    self._slots.append(_slot(attached, *item))
                else:
                    item.resolve(attached)
                    self._slots.append(item)
            self._resolved_for = attached
        return [slot[0][slot[1]] if isinstance(slot, tuple) else slot.value(args) for slot in self._slots]

    def keep_carried(self, outputs):
        """The model's outputs, after storing the carried values the graph appended to them."""
        if not self._carried_out:
            return outputs
        n = len(self._carried_out)
        for key, value in zip(self._carried_out, outputs[-n:], strict=True):
            self._store[key] = value.detach()
        return type(outputs)(outputs[:-n]) if isinstance(outputs, tuple) else outputs[:-n]


def _slot(attached, adapter: str, owner: str, key: str, tensor: torch.Tensor) -> tuple[dict, str]:
    """Where an adapter tensor is read at each call: its registration in the attached model, else
    the tensor itself."""
    return (attached.slot(adapter, owner, key) if attached is not None else None) or ({key: tensor}, key)


class _SelectedInput:
    """A graph input of one adapter for all rows (`inject_adapter_bank`'s `provide_selected`): the
    running adapter's tensor for one layer and key, zero-padded to the widest adapter's shape there,
    zeros where the running adapter has no such layer. Read, and padded, at each call (so new values
    need nothing): the graph computes one adapter, not a stack of all of them. With gradients the pad
    is an autograd op, so the adapter's own tensor gets its gradient."""

    def __init__(self, named: NamedAdapters, members: dict[str, tuple[str, str, torch.Tensor]], shape: list[int],
                 like: torch.Tensor):
        self.named, self.members, self.shape = named, members, list(shape)
        self.dtype, self.device = like.dtype, like.device
        self._slots: dict[str, tuple[dict, str]] = {}
        self._zeros: torch.Tensor | None = None

    def resolve(self, attached) -> None:
        self._slots = {name: _slot(attached, name, *member) for name, member in self.members.items()}

    def value(self, args) -> torch.Tensor:
        slot = self._slots.get(self.named.running.names[0])
        tensor = slot[0][slot[1]] if slot is not None else None
        if tensor is None:
            if self._zeros is None:
                self._zeros = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            return self._zeros
        if list(tensor.shape) == self.shape:
            return tensor
        return torch.nn.functional.pad(tensor, zero_padding(list(tensor.shape), self.shape))


@dataclass
class _CarriedInput:
    """A carried graph input: the stored value if it fits this call's batch, else zeros."""

    key: str
    batch_index: int  # the graph input whose first dimension is the batch
    store: dict[str, torch.Tensor]
    dtype: torch.dtype

    def resolve(self, attached) -> None:
        pass  # reads the backend's store, not the model

    def value(self, args) -> torch.Tensor:
        like = args[self.batch_index]
        held = self.store.get(self.key)
        if held is None or held.shape[0] != like.shape[0] or held.device != like.device or held.dtype != self.dtype:
            return torch.zeros(like.shape[0], dtype=self.dtype, device=like.device)
        return held


class _IndexInput:
    """The index input of a graph over named adapters: which adapter runs (per row when `batch_index`
    names the input whose first dimension is the batch). Cached per selection and batch size."""

    def __init__(self, named: NamedAdapters, batch_index: int | None, device: torch.device):
        self.named, self.batch_index, self.device = named, batch_index, device
        self._cache: tuple | None = None

    def resolve(self, attached) -> None:
        pass  # reads the selection, not the model

    def value(self, args) -> torch.Tensor:
        rows = args[self.batch_index].shape[0] if self.batch_index is not None else 0
        key = (self.named.running, rows, self.named.generation)
        if self._cache is None or self._cache[0] != key:
            sel = self.named.running
            if (self.batch_index is None) != (sel.mode == "uniform"):
                raise LoraFxError("internal: an adapter index built for another kind of selection")  # pragma: no cover
            self._cache = (key, self.named.row_index(rows, self.device))
        return self._cache[1]


class _Carry:
    """The backend's `CarriedState` for one graph being built: inputs fed from, and outputs kept
    in, `store` (shared by every graph of this backend: a decode step reads what the prefill left)."""

    def __init__(self, feeds: Feeds, new_input, placeholders, example_inputs, values, store):
        self.feeds, self.new_input, self.store, self.values = feeds, new_input, store, values
        self.index = {node: i for i, node in enumerate(placeholders)}
        self.examples = example_inputs
        self.outputs: list[fx.Node] = []

    def input(self, key: str, batch_of: fx.Node, dtype: torch.dtype) -> fx.Node:
        index = self.index[batch_of]
        item = _CarriedInput(key, index, self.store, dtype)
        like = node_value(batch_of)
        val = None
        if is_fake(like):  # the batch size stays the input's own (symbolic where it is dynamic)
            with like.fake_mode:
                val = torch.zeros(like.shape[0], dtype=dtype, device=like.device)
        node = self.new_input(f"lora_carried_{sanitize(key)}", val)
        self.values[node] = item.value(self.examples)
        self.feeds.add_carried(item)
        return node

    def output(self, key: str, node: fx.Node) -> None:
        self.outputs.append(node)
        self.feeds.carry_out(key, self.store)

    def finish(self, graph: fx.Graph) -> None:
        """Append the carried values to the graph's outputs (`Feeds.keep_carried` takes them off)."""
        if not self.outputs:
            return
        out = graph.output_node()
        results = out.args[0]
        if not isinstance(results, (tuple, list)):
            raise LoraFxError("internal: a Dynamo graph returns a tuple; this one returns "
                              f"{type(results).__name__}")  # pragma: no cover
        out.args = (type(results)([*results, *self.outputs]),)


@dataclass(frozen=True)
class Rename:
    """Graph path -> attached model path: a leading `graph_prefix` becomes `model_prefix`."""

    graph_prefix: str = ""
    model_prefix: str = ""

    @staticmethod
    def between(graph_name: str, model_name: str) -> Rename:
        """The translation under which `graph_name` is `model_name` (they share a dotted suffix)."""
        k = _common_suffix(graph_name, model_name)
        graph_parts, model_parts = graph_name.split("."), model_name.split(".")
        return Rename(".".join(graph_parts[: len(graph_parts) - k]), ".".join(model_parts[: len(model_parts) - k]))

    def __call__(self, path: str) -> str:
        if self.graph_prefix:
            if path != self.graph_prefix and not path.startswith(self.graph_prefix + "."):
                return path
            path = path[len(self.graph_prefix):].lstrip(".")
        if self.model_prefix:
            return f"{self.model_prefix}.{path}" if path else self.model_prefix
        return path


IDENTITY = Rename()


@dataclass
class RenamedGraph:
    """A Dynamo graph with the attached model's names: module paths in `nn_module_stack`, and
    placeholder name -> parameter / buffer FQN (`state_names`, `state_kind`)."""

    gm: fx.GraphModule
    state_names: dict[str, str]
    state_kind: Callable[[fx.Node], tuple[str, str] | None]


def _with_renamed_stacks(gm: fx.GraphModule, rename: Rename) -> fx.GraphModule:
    """`gm` (a copy) with the module paths of its `nn_module_stack`s translated by `rename`, in the
    bodies of its higher-order ops too (activation checkpointing, torch.cond: a layer called there
    must be recognised by its own name, to be refused rather than silently left out). A body is
    copied before it is renamed: the copy shares its submodules with Dynamo's graph."""
    if rename == IDENTITY:
        return gm
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (rename(normalize_path(path)), cls) for k, (path, cls) in stack.items()}
        if node.op == "get_attr" and isinstance(body := getattr(gm, node.target, None), fx.GraphModule):
            setattr(gm, node.target, _with_renamed_stacks(copy_graph_module(body), rename))
    return gm


def _common_suffix(a: str, b: str) -> int:
    """How many trailing dotted components `a` and `b` share."""
    n = 0
    for x, y in zip(reversed(a.split(".")), reversed(b.split(".")), strict=False):
        if x != y:
            break
        n += 1
    return n


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _source_name(node: fx.Node) -> str | None:
    source = getattr(node.meta.get("grapharg"), "source", None) if node.op == "placeholder" else None
    return None if source is None else source.name


def backend(spec: Spec, **kwargs) -> LoraBackend:
    """Make a `torch.compile` backend that adds LoRA adapters to the compiled model.

    Args:
        spec: a `LoraConfig` (new adapter) or a PEFT adapter directory (config + weights).
        **kwargs: see `LoraBackend`.

    Example:
        >>> import torch, lora_fx
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"]), inner="aot_eager")
        >>> y = torch.compile(model, backend=lora, fullgraph=True)(torch.randn(2, 8))
        >>> sorted(name for name, _ in lora.named_parameters())
        ['0.lora_A.weight', '0.lora_B.weight']
    """
    return LoraBackend(spec, **kwargs)
