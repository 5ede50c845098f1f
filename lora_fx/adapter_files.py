"""`lora_fx.save_adapter` / `lora_fx.load_adapter`: PEFT adapter directories for every object that
carries adapters (a backend, a transformed or merged program, a transformed GraphModule).

It sits above `backend`, `program` and `merging` (it needs all three, none of them needs it), so
the dispatch over kinds of object lives here and nowhere else.
"""

from __future__ import annotations

import os

from torch.export import ExportedProgram

from .adapters import BASE_LAYER_SUFFIX, PEFT_PREFIX, AdapterSet
from .backend import LoraBackend
from .errors import LoraFxError
from .graph_builder import attr_at, install_attr
from .io import read_adapter_dir, write_adapter_dir
from .merging import MERGED_ATTR, unmerge
from .program import NamedWeights, frozen, graph_base_weights
from .program_adapters import adapters_of, is_trained_program, program_sites, record_config


def save_adapter(obj, path: str | os.PathLike) -> None:
    """Write the adapter of a backend / transformed program / GraphModule as a PEFT directory.

    Writes what `PeftModel.save_pretrained` writes for the same adapter: the adapter tensors, the
    copies of `modules_to_save`, and the base weights of targeted `embed_tokens` / `lm_head`
    layers. From a merged program, the adapter that was merged and the original base weights.

    Example:
        >>> import torch, lora_fx, tempfile
        >>> ep = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(1, 4),))
        >>> ep2 = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["0"]))
        >>> lora_fx.save_adapter(ep2, tempfile.mkdtemp() + "/adapter")
    """
    if isinstance(obj, LoraBackend):
        obj.save_adapter(path)
        return
    if _is_merged(obj):  # a merged program's weights hold the adapter: the base is the unmerged one's
        adapters, base = _merged_adapters(obj), _base_weights_of(unmerge(obj))
    else:
        sites = program_sites(obj)
        adapters, base = adapters_of(obj, sites), _base_weights_of(obj, sites)
    adapters.check_savable()
    tensors = adapters.peft_state_dict()
    for layer in adapters.base_layers_to_save(base.names):
        tensors[f"{PEFT_PREFIX}{layer}{BASE_LAYER_SUFFIX}"] = base.get(layer)
    write_adapter_dir(path, adapters.config_to_save(), tensors)


def load_adapter(obj, path: str | os.PathLike) -> None:
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
        obj.load_adapter(path)
        return
    if _is_merged(obj):
        raise LoraFxError("this program has its adapters merged into its weights; loading another adapter would "
                          "leave those merged values in place. Call lora_fx.unmerge on it first")
    sites = program_sites(obj)
    adapters: AdapterSet = adapters_of(obj, sites)
    cfg, tensors = read_adapter_dir(path)
    baked = adapters.cfg.lora_dropout if is_trained_program(obj) else None
    adapters.load(cfg, tensors, source=str(path), baked_dropout=baked, base=_base_weights_of(obj, sites))
    record_config(obj, cfg)  # the program's record follows what it now holds


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
