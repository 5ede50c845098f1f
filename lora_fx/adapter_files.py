"""`lora_fx.save_adapter` / `lora_fx.load_adapter`: PEFT adapter directories for every object that
carries adapters (a backend, a transformed or merged program, a transformed GraphModule).

It sits above `backend`, `program` and `merging` (it needs all three, none of them needs it), so
the dispatch over kinds of object lives here and nowhere else.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

import torch
from torch.export import ExportedProgram

from . import init_modes, variants
from .adapters import BASE_LAYER_SUFFIX, PEFT_PREFIX, AdapterSet
from .backend import LoraBackend
from .config import LoraConfig
from .distributed import writes_files
from .errors import AdapterFileError, LoraFxError, UnsupportedFeatureError
from .graph_builder import attr_at, install_attr
from .io import CONFIG_NAME, read_adapter_dir, write_adapter_dir
from .merging import MERGED_ATTR, unmerge
from .named_programs import is_named_program, named_adapters_of, record_named_config
from .program import NamedWeights, frozen, graph_base_weights
from .program_adapters import adapters_of, is_trained_program, program_sites, record_config
from .registration import ADAPTER_NAME


def save_adapter(obj, path: str | os.PathLike, *, initial_adapter: str | os.PathLike | None = None,
                 adapter_name: str | None = None) -> None:
    """Write the adapter of a backend / transformed program / GraphModule as a PEFT directory.

    Writes what `PeftModel.save_pretrained` writes for the same adapter: the adapter tensors, the
    copies of `modules_to_save`, and the base weights of targeted `embed_tokens` / `lm_head`
    layers. From a merged program, the adapter that was merged and the original base weights.

    Args:
        obj: a `LoraBackend`, or a program / GraphModule returned by `lora_fx.transform`.
        path: the directory to write.
        adapter_name: with named adapters (a backend's, a program's): save only that one. All
            of them are saved in PEFT's `save_pretrained` layout: `"default"` at `path`, every
            other name in `path/<name>`.
        initial_adapter: PEFT's `path_initial_model_for_weight_conversion`: the directory this
            adapter was saved to right after it was made (PiSSA, OLoRA: before training). The
            adapter is then written as the plain LoRA it amounts to on the *original* base weights:
            `ΔW = s·(B·A − B₀·A₀)` as rank 2r, `A' = [A; A₀]`, `B' = [B, −B₀]` (PEFT's layout), with
            the config PEFT writes (`init_lora_weights=True`, `r`, `lora_alpha` and the patterns
            doubled; `lora_alpha` × √2 with rsLoRA). See docs/init.md.

    Raises:
        UnsupportedFeatureError: `initial_adapter` for an adapter that has no plain-LoRA form
            (DoRA and other variants, LoftQ, `init_lora_weights=False`, rsLoRA with rank / alpha
            patterns, conv / embedding / parameter layers).
        AdapterFileError: `initial_adapter` does not hold this adapter's initial factors.

    Example:
        >>> import torch, lora_fx, tempfile
        >>> ep = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(1, 4),))
        >>> ep2 = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["0"]))
        >>> lora_fx.save_adapter(ep2, tempfile.mkdtemp() + "/adapter")
    """
    if initial_adapter is not None:
        if adapter_name is not None:
            raise LoraFxError("initial_adapter converts one adapter; save named adapters one by one without it, or "
                              "convert each from a backend holding it alone")
        _save_converted(obj, path, initial_adapter)
        return
    if isinstance(obj, LoraBackend):
        obj.save_adapter(path, adapter_name)
        return
    record = getattr(obj, MERGED_ATTR, None)
    if is_named_program(obj) or (record is not None and record.named is not None):
        _save_named(obj, path, adapter_name)
        return
    if adapter_name is not None:
        raise LoraFxError(f"adapter_name={adapter_name!r}: this {type(obj).__name__} carries one adapter")
    write_adapter_dir(path, *_adapter_files_of(obj))


def _save_named(ep, path, adapter_name: str | None) -> None:
    """Each named adapter of a program as PEFT saves a model's (`default` at `path`, others in
    `path/<name>`); from a merged one, the adapters it was merged from."""
    record = getattr(ep, MERGED_ATTR, None)
    sites = None
    if record is not None:
        named, source = record.named, unmerge(ep)
    else:
        sites, source = program_sites(ep), ep
        named, _ = named_adapters_of(ep, sites)
    base = _base_weights_of(source, sites)
    names = list(named) if adapter_name is None else [named.check_name(adapter_name)]
    for name in names:
        adapters = named[name]
        adapters.check_savable()
        tensors = adapters.peft_state_dict()
        for layer in adapters.base_layers_to_save(base.names):
            tensors[f"{PEFT_PREFIX}{layer}{BASE_LAYER_SUFFIX}"] = base.get(layer)
        where = os.fspath(path) if name == ADAPTER_NAME else os.path.join(path, name)
        write_adapter_dir(where, adapters.config_to_save(), tensors)


def _adapter_files_of(obj) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors) that `save_adapter` writes for a transformed program / GraphModule."""
    if _is_merged(obj):  # a merged program's weights hold the adapter: the base is the unmerged one's
        adapters, base = _merged_adapters(obj), _base_weights_of(unmerge(obj))
    else:
        sites = program_sites(obj)
        adapters, base = adapters_of(obj, sites), _base_weights_of(obj, sites)
    adapters.check_savable()
    tensors = adapters.peft_state_dict()
    for layer in adapters.base_layers_to_save(base.names):
        tensors[f"{PEFT_PREFIX}{layer}{BASE_LAYER_SUFFIX}"] = base.get(layer)
    return adapters.config_to_save(), tensors


# -- conversion to a plain LoRA (PEFT's path_initial_model_for_weight_conversion) -----------------
# Adapter keys the conversion knows: the 2-D factors (stacked along the rank) and lora_B's bias.
_A_KEY, _B_KEY, _BIAS_KEY = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"


def _save_converted(obj, path, initial_adapter) -> None:
    """`save_adapter(obj, path, initial_adapter=...)`: the adapter as saved plainly, converted."""
    # Only its tensors count: its config may say True (PEFT's example saves the initial adapter so).
    _, initial = read_adapter_dir(initial_adapter)
    if isinstance(obj, LoraBackend):
        # The backend writes its own directory (gathering sharded tensors: every process calls it);
        # it is written next to `path`, converted, and removed.
        parent = os.path.dirname(os.path.abspath(os.fspath(path)))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.fspath(path))}.plain-", dir=parent)
        try:
            obj.save_adapter(tmp)
            if not writes_files():
                return
            _, tensors = read_adapter_dir(tmp)
            with open(os.path.join(tmp, CONFIG_NAME)) as f:
                config = json.load(f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        config, tensors = _adapter_files_of(obj)
    config, tensors = converted_to_plain_lora(config, tensors, initial, source=os.fspath(initial_adapter))
    write_adapter_dir(path, config, tensors)


def converted_to_plain_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                            initial: dict[str, torch.Tensor], *, source: str = "initial adapter",
                            ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter (PEFT config dict and tensors) as the plain LoRA it adds to the original base
    weights, given its initial tensors: PEFT's `subtract_mutated_init` and config rewrite.

    `B·A − B₀·A₀ = [B, −B₀]·[A; A₀]`, so the result has rank 2r and the same scaling (alpha
    doubled with r; × √2 with rsLoRA, whose scaling is alpha/√r); lora_B's bias becomes
    `bias − bias₀`. Base weights saved with the adapter (`<layer>.base_layer.weight`) are left
    out when the init mode rewrote them (they are not the original ones); copies of
    `modules_to_save` are kept (PEFT drops them).

    Example:
        >>> cfg = LoraConfig(r=1, target_modules=["fc"], init_lora_weights="pissa").to_peft_dict()
        >>> a, b = torch.ones(1, 3), torch.ones(2, 1)
        >>> keys = {"base_model.model.fc.lora_A.weight": a, "base_model.model.fc.lora_B.weight": b}
        >>> new_cfg, new = converted_to_plain_lora(cfg, keys, {k: v / 2 for k, v in keys.items()})
        >>> new_cfg["r"], new_cfg["init_lora_weights"], tuple(new["base_model.model.fc.lora_B.weight"].shape)
        (2, True, (2, 2))
    """
    cfg = LoraConfig.from_peft_dict(config, recorded=True)
    mode = init_modes.mode_for(cfg.init_lora_weights)
    problem = mode.conversion_problem()
    if problem is None and not variants.variant_for(cfg).fallback:
        problem = (f"it is a {variants.variant_for(cfg).name!r} adapter, which has no plain-LoRA form "
                   "(PEFT's conversion drops its extra tensors and keeps the variant in the config)")
    if problem is None and cfg.use_rslora and (cfg.rank_pattern or cfg.alpha_pattern):
        problem = "rsLoRA with rank_pattern / alpha_pattern cannot keep its scalings at rank 2r (PEFT refuses it too)"
    if problem is None and cfg.target_parameters:
        problem = "parameter targets (target_parameters) stack their experts along the rank; there is no 2r form"
    if problem is not None:
        raise UnsupportedFeatureError(f"save_adapter(initial_adapter=...): {problem}")
    out = {}
    for key, value in tensors.items():
        if ".lora_" not in key:
            if not (mode.rewrites_base and key.endswith(BASE_LAYER_SUFFIX)):  # a rewritten weight: not the base's
                out[key] = value
            continue
        start = initial.get(key)
        if start is None:
            raise AdapterFileError(f"{source}: missing key {key!r}; initial_adapter must be this adapter as saved "
                                   "right after it was made")
        if tuple(start.shape) != tuple(value.shape):
            raise AdapterFileError(f"{source}: key {key!r} has shape {tuple(start.shape)}, the adapter has "
                                   f"{tuple(value.shape)} (another rank or layer?)")
        if key.endswith(_A_KEY) and value.dim() == 2:
            out[key] = torch.cat([value, start.to(value.dtype)], dim=0)
        elif key.endswith(_B_KEY) and value.dim() == 2:
            out[key] = torch.cat([value, -start.to(value.dtype)], dim=1)
        elif key.endswith(_BIAS_KEY):
            out[key] = value - start.to(value.dtype)
        else:
            raise UnsupportedFeatureError(f"save_adapter(initial_adapter=...): key {key!r} has no rank-2r form; the "
                                          "conversion takes linear layers' factors (the layers PiSSA / OLoRA adapt)")
    data = dict(config)
    data["init_lora_weights"] = True
    data["r"] = 2 * cfg.r
    data["lora_alpha"] = cfg.lora_alpha * (math.sqrt(2) if cfg.use_rslora else 2)
    data["rank_pattern"] = {k: 2 * v for k, v in cfg.rank_pattern.items()}
    data["alpha_pattern"] = {k: 2 * v for k, v in cfg.alpha_pattern.items()}
    return data, out


def load_adapter(obj, path: str | os.PathLike, *, adapter_name: str | None = None) -> None:
    """Load a PEFT adapter directory into a backend / transformed program / GraphModule, in place.

    Same shapes required; nothing recompiles. The adapter's config (alpha, rsLoRA, patterns)
    sets the scalings, and `save_adapter` afterwards writes that config. Nothing changes unless
    every check passes.

    Example:
        >>> import torch, lora_fx, tempfile
        >>> ep = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(1, 4),))
        >>> ep2 = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
        >>> ep3 = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, lora_alpha=8, target_modules=["0"]))
        >>> path = tempfile.mkdtemp() + "/a"; lora_fx.save_adapter(ep3, path)
        >>> lora_fx.load_adapter(ep2, path)
        >>> float(ep2.state_dict["0.lora_scaling"])
        4.0
    """
    if isinstance(obj, LoraBackend):
        obj.load_adapter(path, adapter_name)
        return
    if _is_merged(obj):
        raise LoraFxError("this program has its adapters merged into its weights; loading another adapter would "
                          "leave those merged values in place. Call lora_fx.unmerge on it first")
    if is_named_program(obj):
        _load_named(obj, path, adapter_name)
        return
    if adapter_name is not None:
        raise LoraFxError(f"adapter_name={adapter_name!r}: this {type(obj).__name__} carries one adapter")
    sites = program_sites(obj)
    adapters: AdapterSet = adapters_of(obj, sites)
    cfg, tensors = read_adapter_dir(path)
    baked = adapters.cfg.lora_dropout if is_trained_program(obj) else None
    adapters.load(cfg, tensors, source=str(path), baked_dropout=baked, base=_base_weights_of(obj, sites))
    record_config(obj, cfg)  # the program's record follows what it now holds


def _load_named(ep, path, adapter_name: str | None) -> None:
    """New values for one named adapter of a program, in place (its set of adapters is fixed)."""
    sites = program_sites(ep)
    named, train = named_adapters_of(ep, sites)
    if adapter_name is None:
        raise LoraFxError(f"this program runs {len(named)} named adapters ({list(named)}); say which one the "
                          "directory replaces: lora_fx.load_adapter(program, dir, adapter_name=...)")
    if adapter_name not in named:
        raise LoraFxError(f"no adapter named {adapter_name!r} in this program, whose adapters are {list(named)}; a "
                          "program's set of adapters is fixed: transform the base program with the new set")
    adapters = named[adapter_name]
    cfg, tensors = read_adapter_dir(path)
    baked = adapters.cfg.lora_dropout if train else None
    adapters.load(cfg, tensors, source=str(path), baked_dropout=baked, base=_base_weights_of(ep, sites))
    record_named_config(ep, adapter_name, cfg)


def _is_merged(obj) -> bool:
    return getattr(obj, MERGED_ATTR, None) is not None


def _merged_adapters(obj) -> AdapterSet:
    return getattr(obj, MERGED_ATTR).adapters


def _base_weights_of(obj, sites: list | None = None) -> NamedWeights:
    """The base weights of a transformed program / GraphModule, by layer (read from its graph;
    `sites`: its `program_sites`, if the caller has them). New values replace the program's (never
    written into tensors it may share with the caller)."""
    sites = program_sites(obj) if sites is None else sites
    if isinstance(obj, ExportedProgram):
        return graph_base_weights(sites, obj.state_dict.__getitem__,
                                  lambda key, value: obj.state_dict.__setitem__(key, frozen(value)))
    return graph_base_weights(sites, lambda path: attr_at(obj, path),
                              lambda path, value: install_attr(obj, None, path, frozen(value)))
