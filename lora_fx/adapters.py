"""Adapter tensors: creation, initialisation, PEFT key names, strict loading.

An `AdapterSet` owns, per adapted layer, the variant's tensors (trainable `nn.Parameter`s) and a
0-d scaling tensor. Compiled graphs read both as inputs, so copying new values in (another
adapter of the same shapes, a new alpha, scale 0 to disable) never recompiles.

Invariant: every scaling tensor equals `resolved.scaling * scale_factor`, where `resolved` comes
from `cfg`, the config of the adapter currently loaded. `load` replaces `cfg` and the tensors
together (all checked before anything is written); `set_scale` changes only the factor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from . import init_modes, variants
from .config import ALL_LINEAR, LoraConfig
from .distributed import copy_value, full_value
from .errors import AdapterFileError, LoraFxError, UnsupportedFeatureError
from .layers import LayerInfo
from .rules import Resolved, resolve_layer

PEFT_PREFIX = "base_model.model."
SCALING_KEY = "lora_scaling"
BASE_LAYER_SUFFIX = ".base_layer.weight"
# PEFT's `save_embedding_layers="auto"`: config names that make it save base embedding weights.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


class BaseWeights(Protocol):
    """A route's access to the base weights (an attached model, a program's state, a GraphModule)."""

    def get(self, layer: str) -> torch.Tensor | None:
        """The weight the layer (module path) computes with, or None if there is no such layer."""

    def set(self, layer: str, value: torch.Tensor) -> None:
        """Make the layer compute with `value` (same shape) from now on."""

    def is_embedding(self, layer: str) -> bool:
        """Whether the layer is an input or output embedding (PEFT saves `<layer>.weight` for those
        only, for a resized vocabulary)."""

    def sharing(self, layer: str) -> list[str]:
        """The other layers / modules that compute with the same weight tensor (tied weights):
        rewriting the layer's weight (PiSSA, OLoRA, LoftQ) would change them too."""


@dataclass
class NamedWeights:
    """`BaseWeights` of a graph: layer -> the name its weight is read by (a state_dict key, a
    GraphModule attribute path), and the route's read and write of such a name."""

    names: dict[str, str]
    read: Callable[[str], torch.Tensor | None]
    write: Callable[[str, torch.Tensor], None]
    embeddings: set[str] = field(default_factory=set)  # may carry `<layer>.weight` keys

    def is_embedding(self, layer: str) -> bool:
        return layer in self.embeddings

    def get(self, layer: str) -> torch.Tensor | None:
        name = self.names.get(layer)
        return None if name is None else self.read(name)

    def set(self, layer: str, value: torch.Tensor) -> None:
        self.write(self.names[layer], value)

    def sharing(self, layer: str) -> list[str]:
        # Raw parameters are layers too (`target_parameters` candidates): the layer's own weight,
        # `<layer>.weight`, is not another user of it.
        name = self.names.get(layer)
        return sorted(other for other, n in self.names.items()
                      if n == name and other != layer and not other.startswith(layer + "."))


@dataclass
class AdapterEntry:
    resolved: Resolved
    variant: variants.Variant
    tensors: dict[str, nn.Parameter]
    scaling: torch.Tensor  # 0-d fp32; a graph input like the weights
    # Values loaded while the tensors were on the meta device: copied in when they get real
    # storage (`AdapterSet.follow`).
    deferred: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.resolved.layer.name


def adapter_dtype(weight_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """PEFT's `autocast_adapter_dtype`: half-precision bases get fp32 adapters."""
    if requested is not None:
        return requested
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


class AdapterSet:
    """The adapters of one model, keyed by layer name.

    Example:
        >>> from lora_fx.layers import LayerInfo
        >>> from lora_fx.rules import resolve
        >>> cfg = LoraConfig(r=2, target_modules=["fc"])
        >>> aset = AdapterSet.create(cfg, resolve([LayerInfo("fc", "linear", 4, 3)], cfg))
        >>> sorted(aset.peft_state_dict())
        ['base_model.model.fc.lora_A.weight', 'base_model.model.fc.lora_B.weight']
    """

    def __init__(self, cfg: LoraConfig):
        self.cfg = cfg
        self.scale_factor = 1.0
        self.entries: dict[str, AdapterEntry] = {}
        # modules_to_save: module path -> {parameter name inside the module: its trainable copy}
        self.saved: dict[str, dict[str, nn.Parameter]] = {}
        self._saved_deferred: dict[tuple[str, str], torch.Tensor] = {}  # loaded while the copy was on meta

    def storage_names(self) -> dict[str, str]:
        """layer -> the prefix of its tensors in files and programs (`storage_prefixes`)."""
        return storage_prefixes(e.resolved.layer for e in self.entries.values())

    def snapshot(self) -> AdapterSet:
        """An independent copy of these adapters (tensors cloned, same config, variants and
        scalings): what a merge keeps, so that later loads into the unmerged program cannot change
        what the merged one holds or how it unmerges."""
        copy_ = AdapterSet(self.cfg)
        copy_.scale_factor = self.scale_factor
        for name, e in self.entries.items():
            tensors = {k: nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad) for k, t in e.tensors.items()}
            copy_.entries[name] = AdapterEntry(e.resolved, e.variant, tensors, e.scaling.detach().clone(),
                                               dict(e.deferred))
        copy_.saved = {m: {n: nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad) for n, t in c.items()}
                       for m, c in self.saved.items()}
        return copy_

    def defer_saved(self, module: str, name: str, value: torch.Tensor) -> None:
        """Keep `value` for the `modules_to_save` copy of `module`'s `name` until it has storage."""
        self._saved_deferred[module, name] = value

    def saved_copy(self, module: str, name: str, value: torch.Tensor) -> nn.Parameter:
        """The trainable copy of `module`'s parameter `name` (`modules_to_save`), made from `value`
        the first time it is asked for; PEFT trains a deep copy of the module the same way."""
        copies = self.saved.setdefault(module, {})
        if name not in copies:
            copies[name] = nn.Parameter(value.detach().clone(), requires_grad=True)
        return copies[name]

    @classmethod
    def create(cls, cfg: LoraConfig, resolved: dict[str, Resolved], *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, generator: torch.Generator | None = None,
               weights: dict[str, torch.Tensor] | None = None, base: BaseWeights | None = None) -> AdapterSet:
        aset = cls(cfg)
        aset.add(resolved, dtype=dtype, device=device, generator=generator, weights=weights, base=base)
        return aset

    def add(self, resolved: dict[str, Resolved], *, dtype=None, device=None, generator=None,
            weights: dict[str, torch.Tensor] | None = None, base: BaseWeights | None = None) -> list[str]:
        """Create adapters for the layers not yet present; return their names.

        `base` (the route's base weights; or `weights`, layer -> base weight, read-only) feeds
        variants whose initial values depend on the base weight (DoRA's magnitude) and init modes
        derived from it, which also rewrite it through `base` (PiSSA, OLoRA, LoftQ). Every layer is
        checked before any is created, so a refused layer leaves the base weights as they were.

        Raises:
            ConfigError / UnsupportedFeatureError: a layer the variant or the init mode cannot
                adapt, named.
        """
        variant = variants.variant_for(self.cfg)
        mode = init_modes.mode_for(self.cfg.init_lora_weights)
        new = {name: res for name, res in resolved.items() if name not in self.entries}
        for res in new.values():
            variant.check(res, self.cfg)
            if mode.rewrites_base:
                self._check_rewritable(mode, variant, res, base, device)
        if base is not None:
            weights = {name: base.get(name) for name in new}
        added = []
        for name, res in new.items():
            dt = adapter_dtype(res.layer.weight_dtype, dtype)
            dev = device if device is not None else res.layer.weight_device
            tensors = {key: nn.Parameter(torch.empty(spec.shape, dtype=dt, device=dev),
                                         requires_grad=spec.trainable)
                       for key, spec in variant.tensors(res, self.cfg).items()}
            scaling = torch.tensor(res.scaling * self.scale_factor, dtype=torch.float32, device=dev)
            entry = AdapterEntry(res, variant, tensors, scaling)
            if str(dev) != "meta":  # meta adapters are initialised when they get storage (`follow`)
                self._initialise(entry, (weights or {}).get(name), generator, base)
            self.entries[name] = entry
            added.append(name)
        return added

    def _check_rewritable(self, mode: init_modes.InitMode, variant: variants.Variant, res: Resolved,
                          base: BaseWeights | None, device) -> None:
        """Refuse, naming the layer, an init mode that rewrites base weights where it cannot."""
        name = res.layer.name
        why = mode.layer_problem(res, {k: spec.shape for k, spec in variant.tensors(res, self.cfg).items()})
        shared = base.sharing(name) if why is None and base is not None else []
        if shared:
            why = (f"its weight is shared with {', '.join(map(repr, shared))} (tied weights), which "
                   "rewriting it would change too")
        if why is None and "meta" in (str(device), res.layer.weight_device):
            why = ("the model has no weights yet (meta device); attach or transform it after loading its weights, "
                   "since the adapter is computed from them")
        if why is not None:
            raise UnsupportedFeatureError(f"layer {name!r}: init_lora_weights={self.cfg.init_lora_weights!r} "
                                          f"cannot initialise it: {why}")
        if base is None:
            raise LoraFxError(f"internal: layer {name!r}: init_lora_weights={self.cfg.init_lora_weights!r} rewrites "
                              "the base weight, and no base weights were given")  # pragma: no cover

    def _initialise(self, entry: AdapterEntry, weight: torch.Tensor | None, generator=None,
                    base: BaseWeights | None = None) -> None:
        """The variant's initial values; for init modes derived from the base weight, the factors
        from `weight` and the rewritten weight written through `base`, before the variant's values
        that depend on the base weight (DoRA's magnitude from the rewritten weight, PEFT's order)."""
        entry.variant.init(entry.tensors, entry.resolved, self.cfg, generator)
        mode = init_modes.mode_for(self.cfg.init_lora_weights)
        if mode.rewrites_base:
            a_key, b_key = entry.resolved.layer.kind.factor_keys()
            weight = mode.from_base(entry.tensors[a_key], entry.tensors[b_key], full_value(weight), entry.resolved,
                                    self.cfg, generator)
            base.set(entry.name, weight)
        if entry.variant.needs_base_weight:
            if weight is None:
                raise LoraFxError(f"internal: {entry.name}: the {entry.variant.name} variant needs the base weight "
                                  "to initialise its adapter")  # pragma: no cover
            with torch.no_grad():
                entry.variant.init_from_base(entry.tensors, full_value(weight), entry.resolved, self.cfg)

    def follow(self, weights: dict[str, torch.Tensor],
               saved_sources: dict[tuple[str, str], torch.Tensor] | None = None) -> None:
        """Put each layer's adapter on the device of its base weight (`weights`: layer -> weight).

        Adapters made while the model was on the meta device get storage here and are initialised
        from the real weights, then receive any values loaded meanwhile; adapters of a model moved
        with `.to(device)` move with it. The `nn.Parameter` objects stay the same (their `.data` is
        swapped), so an optimizer holding them keeps working.

        Raises:
            LoraFxError: a base weight is (still) on the meta device while its adapter is real.
        """
        for name, entry in self.entries.items():
            weight = weights.get(name)
            if weight is None or entry.scaling.device == weight.device:
                continue
            dev = weight.device
            if dev.type == "meta":
                raise LoraFxError(f"layer {name!r}: the base weight is on the meta device; give the model real weights "
                                  "(to_empty + load_state_dict, or from_pretrained) before running or saving it")
            with torch.no_grad():
                if entry.scaling.device.type == "meta":
                    for t in entry.tensors.values():
                        _replace_storage(t, torch.empty(t.shape, dtype=t.dtype, device=dev))
                    _replace_storage(entry.scaling, torch.tensor(entry.resolved.scaling * self.scale_factor,
                                                                 dtype=torch.float32, device=dev))
                    self._initialise(entry, weight)
                    for key, value in entry.deferred.items():
                        entry.tensors[key].copy_(value)
                    entry.deferred = {}
                else:
                    for t in entry.tensors.values():
                        _replace_storage(t, t.detach().to(dev))
                    _replace_storage(entry.scaling, entry.scaling.to(dev))
        for (module, name), source in (saved_sources or {}).items():
            copy_ = self.saved.get(module, {}).get(name)
            if copy_ is None or copy_.device == source.device or source.device.type == "meta":
                continue
            with torch.no_grad():
                if copy_.device.type == "meta":  # made before the model had weights: copy them now
                    _replace_storage(copy_, source.detach().clone())
                    if (module, name) in self._saved_deferred:
                        copy_.copy_(self._saved_deferred.pop((module, name)))
                else:
                    _replace_storage(copy_, copy_.detach().to(source.device))

    # -- views -------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """`(layer.key, tensor)` for every trainable adapter tensor, then
        `(module.modules_to_save.name, copy)` for the modules saved in full."""
        prefixes = self.storage_names()
        for name, entry in self.entries.items():
            for key, t in entry.tensors.items():
                if t.requires_grad:
                    yield f"{prefixes[name]}.{key}", t
        for module, copies in self.saved.items():
            for name, t in copies.items():
                yield f"{module}.modules_to_save.{name}", t

    def parameters(self) -> list[nn.Parameter]:
        return [t for _, t in self.named_parameters()]

    def set_trainable(self, trainable: bool) -> None:
        """Make the tensors the variant trains require grad (or none of them, `trainable=False`)."""
        for entry in self.entries.values():
            specs = entry.variant.tensors(entry.resolved, self.cfg)
            for key, t in entry.tensors.items():
                t.requires_grad_(trainable and specs[key].trainable)

    def trainable_ids(self) -> set[int]:
        """The ids of the tensors the variant trains (whether or not they are frozen now)."""
        out = set()
        for entry in self.entries.values():
            specs = entry.variant.tensors(entry.resolved, self.cfg)
            out.update(id(t) for key, t in entry.tensors.items() if specs[key].trainable)
        return out

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the keys `PeftModel.save_pretrained` writes, whole (sharded ones gathered:
        every process of their group must call this together).

        Raises:
            LoraFxError: an adapter has no values yet (made on the meta device, never materialised).
        """
        out = {}
        prefixes = self.storage_names()
        for name, entry in self.entries.items():
            for key, t in entry.tensors.items():
                if t.device.type == "meta":
                    raise LoraFxError(f"layer {name!r}: its adapter is on the meta device and has no values yet "
                                      "(the model had no real weights when it was attached); nothing to save")
                out[f"{PEFT_PREFIX}{prefixes[name]}.{key}"] = full_value(t)
        for module, copies in self.saved.items():  # PEFT's key for a module copy: `<module>.<param>`
            for name, t in copies.items():
                if t.device.type == "meta":
                    raise LoraFxError(f"module {module!r} (modules_to_save) is on the meta device and has no values "
                                      "yet; nothing to save")
                out[f"{PEFT_PREFIX}{module}.{name}"] = full_value(t)
        return out

    def load(self, cfg: LoraConfig, state: dict[str, torch.Tensor], *, source: str = "adapter",
             baked_dropout: float | None = None, base: BaseWeights | None = None) -> None:
        """Load another adapter (its config and tensors) into these adapters, in place.

        Afterwards `cfg` is the loaded adapter's config: scalings follow its alpha / rsLoRA /
        patterns, saving writes it, and the scale factor is back to 1. Nothing changes unless
        every check passes.

        Args:
            baked_dropout: the `lora_dropout` compiled into a program that cannot be rebuilt
                (a `transform(..., train=True)` program); the adapter must have the same.
            base: where base weights saved with the adapter go (see `load_peft_state_dict`).

        Raises:
            AdapterFileError: a config that does not fit these adapters (variant, rank,
                dropout, bias), or a bad tensor (see `load_peft_state_dict`).
        """
        plan = self._reconfigured(cfg, source, baked_dropout)
        self.load_peft_state_dict(state, source=source, base=base)
        for name, res in plan.items():
            self.entries[name].resolved = res
        self.cfg = cfg
        self.set_scale(1.0)

    def set_scale(self, factor: float) -> None:
        """Scale every adapter by `factor` times its configured scaling (0 disables them)."""
        self.scale_factor = float(factor)
        with torch.no_grad():
            for entry in self.entries.values():
                entry.scaling.fill_(entry.resolved.scaling * self.scale_factor)

    def _reconfigured(self, cfg: LoraConfig, source: str, baked_dropout: float | None) -> dict[str, Resolved]:
        """Each layer resolved under `cfg`, checked to fit the tensors and graphs built for `self.cfg`."""
        new_variant = variants.variant_for(cfg)
        old_variant = variants.variant_for(self.cfg)
        if new_variant is not old_variant:
            raise AdapterFileError(f"{source}: a {new_variant.name!r} adapter cannot be loaded over "
                                   f"{old_variant.name!r} adapters; build a new backend / program for it")
        if new_variant.baked(cfg) != old_variant.baked(self.cfg):
            raise AdapterFileError(f"{source}: {new_variant.baked(cfg)}, but the graphs were built with "
                                   f"{old_variant.baked(self.cfg)}; build a new backend / program for it")
        new_mode, old_mode = init_modes.mode_for(cfg.init_lora_weights), init_modes.mode_for(self.cfg.init_lora_weights)
        if (new_mode.rewrites_base or old_mode.rewrites_base) and new_mode.name != old_mode.name:
            # The base weights were rewritten for one of them (or for neither): the other's factors
            # were trained against a different base.
            raise AdapterFileError(
                f"{source}: init_lora_weights={cfg.init_lora_weights!r}, but these adapters were initialised with "
                f"{self.cfg.init_lora_weights!r}; {_rewritten_base(new_mode, old_mode)}. Build a new backend / "
                "program from the original base for it (docs/init.md)")
        if cfg.bias != self.cfg.bias:
            raise AdapterFileError(f"{source}: bias={cfg.bias!r}, but these adapters were made with "
                                   f"bias={self.cfg.bias!r} (which base biases train)")
        if cfg.saved_module_names() != self.cfg.saved_module_names():
            raise AdapterFileError(f"{source}: modules_to_save={cfg.saved_module_names()}, but these adapters were "
                                   f"made with {self.cfg.saved_module_names()} (task_type included); build a new "
                                   "backend / program for it")
        if baked_dropout is not None and cfg.lora_dropout != baked_dropout:
            raise AdapterFileError(
                f"{source}: lora_dropout={cfg.lora_dropout}, but this program was transformed with train=True "
                f"and lora_dropout={baked_dropout} built into its graph; transform the base program again")
        plan = {}
        for name, entry in self.entries.items():
            res = resolve_layer(entry.resolved.layer, cfg)
            if res.r != entry.resolved.r:
                raise AdapterFileError(f"{source}: layer {name!r} has rank {res.r} in this adapter's config, "
                                       f"the loaded adapters have rank {entry.resolved.r}")
            plan[name] = res
        return plan

    def load_peft_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "adapter",
                             strict_extra: bool = True, base: BaseWeights | None = None) -> set[str]:
        """Copy `state` into the adapters (in place: compiled graphs see it without recompiling).

        Every adapter tensor must be present with its exact shape, a floating-point dtype and
        finite values. Base weights PEFT saves with an adapter (embedding layers: `<layer>.base_layer.weight`
        for a targeted one, `<layer>.weight` for a resized vocabulary) go to `base`, which must have
        that layer with that shape, as PEFT's loading requires. Other keys are an error when
        `strict_extra`, else returned. Nothing is written unless every key passes.

        Raises:
            AdapterFileError: naming the missing / unexpected / mis-shaped / non-float / non-finite key.
        """
        # file key -> (the tensor it loads into, where to keep it while that tensor is on meta)
        prefixes = self.storage_names()
        own: dict[str, tuple[torch.Tensor, dict, Any]] = {
            f"{PEFT_PREFIX}{prefixes[name]}.{key}": (t, entry.deferred, key)
            for name, entry in self.entries.items() for key, t in entry.tensors.items()}
        own.update({f"{PEFT_PREFIX}{module}.{name}": (t, self._saved_deferred, (module, name))
                    for module, copies in self.saved.items() for name, t in copies.items()})
        missing = [k for k in own if k not in state]
        if missing:
            raise AdapterFileError(f"{source}: missing adapter key {missing[0]!r}"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        base_values = base_weight_keys([k for k in state if k not in own], base)
        extra = {k for k in state if k not in own and k not in base_values}
        if extra and strict_extra:
            first = sorted(extra)[0]
            raise AdapterFileError(
                f"{source}: unexpected key {first!r}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "; the config's target rules select no such layer among the layers this model calls (an adapter "
                  "of a module that is never called, such as T5's `shared`, has no effect in PEFT either)")
        for full, (t, _, _) in own.items():
            check_adapter_value(full, state[full], tuple(t.shape), source)
        for full, layer in base_values.items():
            current = base.get(layer)
            check_adapter_value(full, state[full], tuple(current.shape), source, what=f"the model's {layer!r} weight")
            if current.device.type == "meta":
                raise AdapterFileError(f"{source}: key {full!r} holds base weights for layer {layer!r}, but the model "
                                       "is on the meta device; load the adapter after the model has real weights")
        with torch.no_grad():
            for full, (t, deferred, key) in own.items():
                if t.device.type == "meta":
                    deferred[key] = state[full]  # copied in when the tensor gets storage (`follow`)
                else:
                    copy_value(t, state[full])
            for full, layer in base_values.items():
                current = base.get(layer)
                base.set(layer, state[full].to(dtype=current.dtype, device=current.device))
        return extra

    def config_to_save(self) -> dict[str, Any]:
        """The config as PEFT saves it: `"all-linear"` expanded to the layer names it chose,
        `modules_to_save` with the task's heads."""
        data = self.cfg.to_peft_dict()
        tm = self.cfg.target_modules
        if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
            data["target_modules"] = sorted(n for n, e in self.entries.items()
                                            if not e.resolved.layer.kind.targets_parameter)
        data["modules_to_save"] = self.cfg.saved_module_names() or None
        return data

    def check_savable(self) -> None:
        """Refuse to save what the adapter file would leave out (trained base biases)."""
        if self.cfg.bias != "none":
            raise UnsupportedFeatureError(
                f"LoraConfig.bias={self.cfg.bias!r}: the base biases train, but saving them into the adapter file "
                "is not supported yet; use bias='none' to save, or save the model's biases yourself")

    def base_layers_to_save(self, base_names) -> list[str]:
        """The targeted layers whose base weights PEFT writes with the adapter by default
        (`save_embedding_layers="auto"`): when the config names `embed_tokens` / `lm_head`
        (list entry, or a regex matching such a layer), every targeted layer of that name."""
        tm = self.cfg.target_modules
        named = [n for n in self.entries if n.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES]
        if isinstance(tm, str):
            return [] if tm.lower() == ALL_LINEAR else [n for n in named if re.fullmatch(tm, n)]
        if not any(k in tm for k in EMBEDDING_LAYER_NAMES):
            return []
        return [n for n in named if n in base_names]


def _rewritten_base(new: init_modes.InitMode, old: init_modes.InitMode) -> str:
    """Why an adapter of init mode `new` does not fit base weights prepared for mode `old`."""
    if old.rewrites_base:
        return f"{old.name} rewrote the base weights, and this adapter expects them as {new.name} leaves them"
    return f"this adapter expects base weights rewritten by {new.name}, and these are the original ones"


def storage_prefixes(layers: Iterable[LayerInfo]) -> dict[str, str]:
    """layer name -> the prefix of its adapter's keys (`<prefix>.lora_A.weight`): a module layer's
    name; for a parameter, its module's path with one `.base_layer` per parameter of the same
    module adapted after it in registration order (PEFT nests a wrapper per parameter).

    Example:
        >>> from lora_fx.layers import LayerInfo
        >>> up = LayerInfo("experts.gate_up_proj", "parameter", 4, 8, position=0)
        >>> down = LayerInfo("experts.down_proj", "parameter", 8, 4, position=1)
        >>> storage_prefixes([up, down])
        {'experts.gate_up_proj': 'experts.base_layer', 'experts.down_proj': 'experts'}
    """
    layers = list(layers)
    positions: dict[str, list[int]] = {}
    for layer in layers:
        if layer.kind.targets_parameter:
            positions.setdefault(layer.module_path, []).append(layer.position)
    out = {}
    for layer in layers:
        if not layer.kind.targets_parameter:
            out[layer.name] = layer.name
            continue
        later = sum(1 for p in positions[layer.module_path] if p > layer.position)
        out[layer.name] = layer.module_path + ".base_layer" * later
    return out


def _replace_storage(t: torch.Tensor, new: torch.Tensor) -> None:
    """Give `t` the values (and device) of `new`, keeping the Python object: optimizers and compiled
    graphs' feeds refer to it. `.data` cannot cross from meta to a real device; swapping can."""
    if "meta" not in (t.device.type, new.device.type):
        t.data = new
    else:
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        torch.utils.swap_tensors(t, new)


def base_weight_keys(keys, base: BaseWeights | None) -> dict[str, str]:
    """file key -> layer, for the keys that are base weights of the model's layers."""
    if base is None:
        return {}
    out = {}
    for key in keys:
        body = key.removeprefix(PEFT_PREFIX)
        if body.endswith(BASE_LAYER_SUFFIX):  # a targeted layer's base weight
            layer = body[: -len(BASE_LAYER_SUFFIX)]
        elif body.endswith(".weight") and "lora_" not in body:  # an embedding of a resized vocabulary
            layer = body[: -len(".weight")]
            if not base.is_embedding(layer):
                continue
        else:
            continue
        if base.get(layer) is not None:
            out[key] = layer
    return out


def check_adapter_value(key: str, value: torch.Tensor, shape: tuple[int, ...], source: str, *,
                        what: str = "the model") -> None:
    """A tensor read from an adapter file: the expected shape, floating point, all values finite."""
    if tuple(value.shape) != shape:
        if what == "the model":
            raise AdapterFileError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model needs {shape}")
        raise AdapterFileError(f"{source}: key {key!r} has shape {tuple(value.shape)}, {what} has {shape} (saved for "
                               "another vocabulary size? resize the model's token embeddings to match first)")
    if not value.is_floating_point():
        raise AdapterFileError(f"{source}: key {key!r} has dtype {value.dtype}; adapter tensors are floating point")
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        raise AdapterFileError(f"{source}: key {key!r} has {int((~finite).sum())} NaN/inf values "
                               f"(of {value.numel()})")
