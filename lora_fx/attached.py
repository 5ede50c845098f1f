"""The adapter state of an attached model: what `lora_fx.backend(...)` does to the model itself.

`AttachedModel` owns everything about one `nn.Module` and its adapters that is not compiling:
creating the adapters for its layers (`attach`), the base parameters' `requires_grad` flags
(frozen on attach, restored on `detach`), saving and loading PEFT directories with the model's
base weights, the scale factor, and merging into / unmerging from the model's weights. The
Dynamo callable (`backend.py`) reads this state; it never changes the model.

Invariants: one attached model per backend and one backend per model (`_ATTACHED`); while
merged, the model's adapted `nn.Parameter` objects are the same ones (their `.data` holds merged
values), and anything that would change what is merged (load, scale, detach) is refused.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from . import init_modes
from .adapters import BASE_LAYER_SUFFIX, PEFT_PREFIX, AdapterSet
from .distributed import copy_value, full_value, guard_eager_calls, is_sharded, writes_files
from .errors import LoraFxError, UnsupportedFeatureError
from .io import read_adapter_dir, write_adapter_dir
from .layers import layers_of_module, output_layer_names, parameters_outside_holders, without_wrappers
from .named_adapters import NamedAdapters
from .passes.merge_adapters import MergedLayer, check_mergeable, merged_layer, subtracted_layer
from .passes.substitute_saved_modules import select_saved_modules
from .registration import ADAPTER_NAME, Registration
from .rules import effective_config, resolve

# model -> the backend attached to it. Weak both ways: the table keeps neither alive, so a
# backend that is gone no longer blocks its model.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Attribute names under which torch's wrappers hold the module they wrap: `torch.compile`'s
# OptimizedModule and DistributedDataParallel.
_WRAPPED = {OptimizedModule: "_orig_mod", nn.parallel.DistributedDataParallel: "module"}


def unwrap(model: nn.Module) -> nn.Module:
    """The model a `torch.compile` or DDP wrapper wraps (the model itself otherwise)."""
    while type(model) in _WRAPPED:
        model = getattr(model, _WRAPPED[type(model)])
    return model


class AttachedModel:
    """One model with its adapters; see the module docstring. Made by `attach`."""

    def __init__(self, model: nn.Module, named: NamedAdapters, saved_paths: list[str],
                 requires_grad_before: dict[str, bool], registrations: dict[str, Registration],
                 adapter_dtype: torch.dtype | None = None):
        self.model = model
        self.named = named
        self.registrations = registrations  # adapter name -> its tensors as parameters of the model
        self.saved_paths = saved_paths  # modules_to_save of the model
        self.adapter_dtype = adapter_dtype
        self._requires_grad_before = requires_grad_before
        self.merged = False
        # While merged: layer -> (original weight data, original bias data) in the exact mode, or
        # layer -> (what subtraction needs besides the adapter, whether the bias was merged too).
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._undo: dict[str, tuple[Any, bool]] = {}
        self._merged_set: AdapterSet | None = None  # the adapter merged in
        self._guards: list = []  # (EagerCallGuard, hook handle) per adapted layer, in a process group

    @property
    def adapters(self) -> AdapterSet:
        """The adapter the model reports as its own (`NamedAdapters.primary`): merged, saved by default."""
        return self._merged_set if self._merged_set is not None else self.named.primary()

    @classmethod
    def attach(cls, model: nn.Module, owner: object, named: NamedAdapters, pending: dict[str, dict | None],
               adapter_dtype: torch.dtype | None) -> AttachedModel:
        """Create every named adapter for `model`'s targeted layers (loading `pending[name]`, a PEFT
        state dict, where given), freeze its base weights, and register `owner` as the model's one
        backend."""
        holder = _ATTACHED.get(model)
        if holder is not None and holder() is not None:
            raise LoraFxError(
                "this model is already attached to another lora_fx backend; two backends on one model would fight "
                "over its weights (merging one changes what the other's graphs compute) and its requires_grad "
                "flags. Use that backend (load_adapter, set_scale), or call its detach() first")
        attached = cls(model, named, [], {}, {}, adapter_dtype)
        try:
            for name, adapters in list(named.items()):
                attached._create(name, adapters, pending.get(name))
        except BaseException:
            for reg in attached.registrations.values():
                reg.unregister()
            raise
        named.generation += 1
        cfg = named.primary().cfg
        resolved = {layer for aset in named.sets.values() for layer in aset.entries}
        adapter_ids = attached.held_ids()
        base = [(name, p) for name, p in model.named_parameters() if id(p) not in adapter_ids]
        attached._requires_grad_before = {name: p.requires_grad for name, p in base}
        for name, p in base:
            p.requires_grad_(_base_trainable(cfg.bias, without_wrappers(name), resolved))
        _ATTACHED[model] = weakref.ref(owner)
        attached._guard_if_distributed()
        return attached

    def _create(self, name: str, adapters: AdapterSet, pending: dict | None) -> None:
        """Create the adapter `adapters` (its config resolved on this model's layers), load `pending`
        into it and register it under `name` (adding it to the table if it is not there yet);
        nothing of the model changes if any step fails."""
        model = self.model
        others = [self.named.sets[n] for n in self.registrations if n != name]
        if others and (adapters.cfg.saved_module_names() or self.saved_paths):
            raise UnsupportedFeatureError(
                f"adapter {name!r}: modules_to_save (or a task_type with a head, as PEFT's SEQ_CLS) with more than "
                "one named adapter is not supported yet; give the adapters no modules_to_save")
        if others and init_modes.mode_for(adapters.cfg.init_lora_weights).rewrites_base:
            raise UnsupportedFeatureError(
                f"adapter {name!r}: init_lora_weights={adapters.cfg.init_lora_weights!r} rewrites the base weights, "
                "which the other loaded adapters were trained against; initialise it in a model of its own and "
                "load the converted adapter (docs/init.md)")
        for other in others:
            if other.cfg.bias != adapters.cfg.bias:
                raise UnsupportedFeatureError(
                    f"adapter {name!r}: bias={adapters.cfg.bias!r}, but the loaded adapters train base biases per "
                    f"bias={other.cfg.bias!r}; named adapters share the base model, so they must agree")
        layers, output_layers = layers_of_module(model), output_layer_names(model)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        adapters.cfg = cfg = effective_config(adapters.cfg, layers, output_layers, model_type)
        resolved = resolve(layers, cfg, output_layers)
        saved_paths = select_saved_modules(cfg.saved_module_names(),
                                           [without_wrappers(n) for n, _ in model.named_modules()])
        for path in saved_paths:
            module = model.get_submodule(path)
            buffers = sorted(set(module.state_dict()) - {n for n, _ in module.named_parameters()})
            if buffers:
                raise UnsupportedFeatureError(
                    f"modules_to_save: module {path!r} has persistent buffers ({', '.join(buffers[:3])}: e.g. "
                    "BatchNorm running statistics); saving modules with buffers is not supported yet")
        adapters.add(resolved, dtype=self.adapter_dtype, base=ModelWeights(model))
        for path in saved_paths:
            for pname, p in parameters_outside_holders(model.get_submodule(path)):
                adapters.saved_copy(path, pname, p)
        if pending is not None:
            adapters.load_peft_state_dict(pending, source="adapter directory", base=ModelWeights(model))
        self.registrations[name] = Registration.register(model, adapters, name)
        self.saved_paths = self.saved_paths or saved_paths
        if name not in self.named:
            self.named.add(name, adapters)

    def add_adapter(self, name: str, adapters: AdapterSet, pending: dict | None = None) -> None:
        """Add a named adapter to the attached model (see `_create`); its base weights stay frozen."""
        self.refuse_if_merged("adding an adapter")
        self.named.check_new_name(name)
        self._create(name, adapters, pending)

    def delete_adapter(self, name: str) -> None:
        self.refuse_if_merged("delete_adapter")
        self.named.delete(name)
        self.registrations.pop(name).unregister()

    def held_ids(self) -> set[int]:
        return {i for reg in self.registrations.values() for i in reg.held_ids()}

    def named_tensors(self):
        for reg in self.registrations.values():
            yield from reg.named_tensors()

    def slot(self, adapter: str, owner: str, key: str):
        reg = self.registrations.get(adapter)
        return None if reg is None else reg.slot(owner, key)

    def _guard_if_distributed(self) -> None:
        """Guard the adapted layers once a process group exists (attach may come before
        `init_process_group`; `lora.parameters()` for the optimizer comes after DDP)."""
        if not self._guards:
            self._guards = guard_eager_calls(self.model, sorted({e.resolved.layer.module_path
                                                                 for aset in self.named.sets.values()
                                                                 for e in aset.entries.values()}))
            for guard, _ in self._guards:
                guard.merged = self.merged

    def detach(self) -> None:
        """Take the adapters out of the model and give its parameters back the `requires_grad`
        flags they had before `attach`."""
        self.refuse_if_merged("detach")
        for reg in self.registrations.values():
            reg.unregister()
        for _, handle in self._guards:
            handle.remove()
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(name, p.requires_grad))
        _ATTACHED.pop(self.model, None)

    def trainable_base_parameters(self) -> list[nn.Parameter]:
        """The base parameters trained with the adapters (`bias="all"` / `"lora_only"`)."""
        if self.adapters.cfg.bias == "none":
            return []
        adapters = self.held_ids()
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in adapters]

    # -- adapter values ----------------------------------------------------------------------
    def save_adapter(self, path: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write PEFT directories in `save_pretrained`'s layout: the adapter `default` at `path`, every
        other name in `path/<name>` (all of them, or `adapter_name` alone). A sharded model's tensors
        are gathered (every process calls this) and the process of rank 0 writes."""
        self.follow()
        names = list(self.named) if adapter_name is None else [self.named.check_name(adapter_name)]
        for name in names:
            self._write(self.named[name], os.fspath(path) if name == ADAPTER_NAME else os.path.join(path, name))

    def _write(self, adapters: AdapterSet, path: str) -> None:
        adapters.check_savable()
        tensors = adapters.peft_state_dict()
        base = ModelWeights(self.model)
        merged = set(self._originals or {}) | set(self._undo)  # the merged adapter's layers
        for layer in adapters.base_layers_to_save(adapters.entries):
            # While merged the model's weight holds the adapter: save the original.
            weight = self._original_weight(layer) if self.merged and layer in merged else base.get(layer)
            tensors[f"{PEFT_PREFIX}{layer}{BASE_LAYER_SUFFIX}"] = full_value(weight)
        if writes_files():
            write_adapter_dir(path, adapters.config_to_save(), tensors)

    def load_adapter(self, path: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Load a PEFT directory: into the named adapter in place (None: the primary one), or as a
        new adapter under a new name. Nothing changes unless every check passes."""
        self.refuse_if_merged("load_adapter")
        self.follow()
        cfg, tensors = read_adapter_dir(path)
        if adapter_name is not None and adapter_name not in self.named:
            self.add_adapter(adapter_name, AdapterSet(cfg), tensors)
            return
        target = self.adapters if adapter_name is None else self.named[adapter_name]
        target.load(cfg, tensors, source=os.fspath(path), base=ModelWeights(self.model))

    def follow(self, *, in_forward: bool = False) -> None:
        """The adapters the model holds now (a wrapper such as FSDP2 may have replaced them), on
        their base weights' devices (materialised if made on the meta device). `in_forward`: the
        model is running (see `Registration.sync`)."""
        self._guard_if_distributed()
        for name, adapters in self.named.items():
            registration = self.registrations[name]
            pending = registration.sync(adapters, in_forward=in_forward)
            sources = {(module, pname): self.model.get_submodule(module).get_parameter(pname)
                       for module, copies in adapters.saved.items() for pname in copies}
            adapters.follow(layer_weights(self.model, adapters.entries), sources)
            registration.adopt(pending)

    def refuse_if_merged(self, what: str) -> None:
        if self.merged:
            raise LoraFxError(f"{what} while the adapters are merged would leave stale merged weights; "
                              "call lora_fx.unmerge(lora) first")

    # -- merging ------------------------------------------------------------------------------
    def merge(self, *, safe_merge: bool = False, keep_original: bool = True) -> None:
        """Point the adapted `nn.Parameter`s at merged values (see `LoraBackend.merge`)."""
        if self.merged:
            raise LoraFxError("the adapters are already merged")
        if self.named.running.mode != "uniform":
            raise LoraFxError(f"merge folds one adapter into the weights, but {self._running()}; "
                              "set_adapter(name) first")
        check_mergeable(self.adapters)
        self.follow()
        sharded = [name for name, t in self.named_tensors() if is_sharded(t)]
        if sharded:
            raise UnsupportedFeatureError(
                f"cannot merge adapters sharded across processes ({sharded[0]!r} is a DTensor): merging writes whole "
                "weights. Save the adapter (lora.save_adapter on every rank), load it into an unsharded model, and "
                "merge there")
        params = _layer_params(self.model, self.adapters.entries)
        _check_untied(self.model, {name: w for name, (w, _) in params.items()})
        merged = {name: merged_layer(self.adapters.entries[name], w, b, safe_merge=safe_merge)
                  for name, (w, b) in params.items()}  # all computed (and checked) before any is installed
        self._originals = {} if keep_original else None
        self._undo = {}
        with torch.no_grad():
            for name, (w, b) in params.items():
                m = merged[name]
                new_bias = b if m.bias is None else m.bias
                if keep_original:
                    self._originals[name] = (w.data, b.data if b is not None else None)
                    w.data = m.weight
                    if b is not None:
                        b.data = new_bias
                else:
                    w.copy_(m.weight)
                    if m.bias is not None:
                        b.copy_(m.bias)
                    self._undo[name] = (m.undo, m.bias is not None)
        self._set_merged(True)

    def unmerge(self) -> None:
        if not self.merged:
            raise LoraFxError("the adapters are not merged")
        params = _layer_params(self.model, self.adapters.entries)
        with torch.no_grad():
            for name, (w, b) in params.items():
                if self._originals is not None:
                    w.data, original_bias = self._originals[name]
                    if b is not None:
                        b.data = original_bias
                    continue
                undo, bias_changed = self._undo[name]
                weight, bias = subtracted_layer(self.adapters.entries[name],
                                                MergedLayer(w, b if bias_changed else None, undo))
                w.copy_(weight)
                if bias is not None:
                    b.copy_(bias)
        self._originals = None
        self._undo = {}
        self._set_merged(False)

    def _running(self) -> str:
        sel = self.named.running
        if sel.mode == "base":
            return "the adapters are disabled"
        return f"each row runs its own adapter ({list(sel.names)})"

    def _set_merged(self, merged: bool) -> None:
        self._merged_set = self.named.primary() if merged else None
        self.merged = merged
        for reg in self.registrations.values():
            reg.set_merged(merged)  # loading adapter values into the model is refused while merged
        for guard, _ in self._guards:  # merged weights are right outside compiled graphs too
            guard.merged = merged

    def _original_weight(self, layer: str) -> torch.Tensor:
        """A merged layer's weight as it was before the merge."""
        if self._originals is not None:
            return self._originals[layer][0]
        undo, _ = self._undo[layer]
        weight = layer_weight(self.model, layer)
        return subtracted_layer(self.adapters.entries[layer], MergedLayer(weight, None, undo))[0]


def _base_trainable(bias: str, param_name: str, resolved) -> bool:
    if bias == "all":
        return "bias" in param_name
    if bias == "lora_only":
        owner, _, leaf = param_name.rpartition(".")
        return leaf == "bias" and owner in resolved
    return False


def submodule_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


class ModelWeights:
    """`BaseWeights` of an attached model: loaded base weights are copied into its parameters in
    place, as PEFT's loading does."""

    def __init__(self, model: nn.Module):
        self.model = model

    def get(self, layer: str) -> torch.Tensor | None:
        module = submodule_or_none(self.model, layer)
        if module is None:  # a parameter layer
            try:
                return self.model.get_parameter(layer)
            except AttributeError:
                return None
        weight = getattr(module, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else None

    def set(self, layer: str, value: torch.Tensor) -> None:
        copy_value(self.get(layer), value)

    def sharing(self, layer: str) -> list[str]:
        weight = self.get(layer)
        own = layer if submodule_or_none(self.model, layer) is not None else layer.rpartition(".")[0]
        return sorted({name for name, module in self.model.named_modules(remove_duplicate=False) if name != own
                       and any(p is weight for p in module.parameters(recurse=False))})

    def is_embedding(self, layer: str) -> bool:
        module = self.model.get_submodule(layer)
        ends = [getattr(self.model, f"get_{side}_embeddings", lambda: None) for side in ("input", "output")]
        try:
            ends = [get() for get in ends]
        except (NotImplementedError, AttributeError):
            ends = []
        return isinstance(module, nn.Embedding) or any(module is end for end in ends if end is not None)


def copy_into(tensors: dict[str, torch.Tensor]) -> Callable[[str, torch.Tensor], None]:
    def write(name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            tensors[name].copy_(value)
    return write


def layer_weight(model: nn.Module, name: str) -> nn.Parameter:
    """A layer's weight: a module layer's `weight`, or the parameter a parameter layer is."""
    module = submodule_or_none(model, name)
    return module.weight if module is not None else model.get_parameter(name)


def layer_weights(model: nn.Module, names) -> dict[str, nn.Parameter]:
    return {name: layer_weight(model, name) for name in names}


def _layer_params(model: nn.Module, names) -> dict[str, tuple[nn.Parameter, nn.Parameter | None]]:
    """layer -> (its weight, its bias or None; a parameter layer has no bias)."""
    return {name: (layer_weight(model, name), getattr(submodule_or_none(model, name), "bias", None))
            for name in names}


def _check_untied(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Refuse to merge into a weight that another module also uses (tied weights)."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod_name)
    for name, w in weights.items():
        own = name if submodule_or_none(model, name) is not None else name.rpartition(".")[0]  # a parameter's module
        others = sorted(set(owners.get(id(w), [])) - {own})
        if others:
            raise UnsupportedFeatureError(
                f"cannot merge the adapter of {name!r}: its weight is shared with {', '.join(map(repr, others))} "
                "(tied weights); merging would change those layers too. Untie the weights, or run unmerged")
