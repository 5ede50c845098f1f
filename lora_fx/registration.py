"""Adapters as parameters of the model they adapt, where DDP, FSDP2 and `state_dict` see them.

An attached backend registers every adapter tensor (and every `modules_to_save` copy) in the
model's module tree under PEFT's in-model name, minus PEFT's `base_model.model.` wrapper:
`model.layers.0.self_attn.q_proj.lora_A.default.weight`, `score.modules_to_save.default.weight`.
The tensors hang from `AdapterHolder` modules (containers that are never called) added as
children of the adapted layer, so a wrapper that works per block (`fully_shard(block)`) finds a
block's adapters in that block, and `DistributedDataParallel(model)` reduces their gradients.

Who owns the tensor object: the model. Wrappers replace registered parameters with their own
(FSDP2 swaps a sharded DTensor parameter in at rest and the unsharded one during the block's
forward), so a compiled graph reads each adapter from its registration at every call
(`Registration.slot`), and `sync` makes the `AdapterSet` hold what the model holds now. One
exception: `to_empty` on a model built on the meta device replaces meta parameters with
uninitialised ones. The `AdapterSet` then materialises and initialises its own (values a state
dict loaded meanwhile are kept); a plain parameter gets the `AdapterSet`'s object back (optimizers
built on meta hold it), a sharded one (FSDP2) receives its shard of the initialised values.

Invariants: holders hold only lora_fx tensors and are never called; the scaling tensors are not
registered (they are not trained, and wrappers must not shard or cast them); `unregister`
removes every holder this registration added.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .adapters import AdapterSet
from .distributed import copy_value, full_value, is_fsdp_sharded, is_sharded
from .errors import LoraFxError
from .layers import AdapterHolder, wrapped_child
from .passes.substitute_saved_modules import COPY_PREFIX

ADAPTER_NAME = "default"  # PEFT's name for the one adapter of a model


# PEFT keeps DoRA's magnitude in a module (`.weight`) but saves it without the leaf.
_LEAF_NOT_SAVED = {"lora_magnitude_vector": "weight"}


def in_model_name(owner: str, key: str, adapter: str = ADAPTER_NAME) -> str:
    """The FQN of an adapter tensor in the model: PEFT's, the adapter's name after the tensor's
    first component (`q_proj` + `lora_A.weight` -> `q_proj.lora_A.default.weight`)."""
    head, _, rest = key.partition(".")
    rest = rest or _LEAF_NOT_SAVED.get(head, "")
    name = f"{owner}.{head}.{adapter}" if owner else f"{head}.{adapter}"
    return f"{name}.{rest}" if rest else name


class Registration:
    """Where each tensor of one named adapter of an attached model is registered; see the module
    docstring. Several named adapters share holders (`q_proj.lora_A` holds `default`, `b`, ...)."""

    def __init__(self, model: nn.Module, adapter: str = ADAPTER_NAME):
        self.model = model
        self.adapter = adapter
        # (owner, key) as `provide` asks for them -> (holder, leaf)
        self.slots: dict[tuple[str, str], tuple[nn.Module, str]] = {}

    @classmethod
    def register(cls, model: nn.Module, adapters: AdapterSet, adapter: str = ADAPTER_NAME) -> Registration:
        """Register `adapters`' tensors in `model` under the adapter name `adapter`. Nothing is
        added unless every name is free."""
        reg = cls(model, adapter)
        wanted = list(_tensors_by_slot(adapters))
        for (owner, key), _ in wanted:
            reg._check_free(owner, in_model_name(owner, key, adapter))
        for slot, tensor in wanted:
            holder, leaf = reg._holder_for(in_model_name(*slot, adapter))
            holder.register_parameter(leaf, tensor)
            reg.slots[slot] = (holder, leaf)
        return reg

    def unregister(self) -> None:
        """Remove this adapter's tensors, and every holder left empty by that (holders another named
        adapter still uses stay, whoever added them)."""
        for holder, leaf in self.slots.values():
            holder._parameters.pop(leaf, None)
        for slot in self.slots:
            _prune_empty_holders(self.model, in_model_name(*slot, self.adapter))
        self.slots = {}

    def slot(self, owner: str, key: str) -> tuple[dict[str, torch.Tensor], str] | None:
        """(mapping, key) such that `mapping[key]` is the tensor registered for `(owner, key)` at
        the time it is read, or None if that is not a registered tensor (a scaling)."""
        slot = self.slots.get((owner, key))
        return None if slot is None else (slot[0]._parameters, slot[1])

    def named_tensors(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(FQN in the model, the tensor registered there now)."""
        for (owner, key), (holder, leaf) in self.slots.items():
            yield in_model_name(owner, key, self.adapter), holder._parameters[leaf]

    def held_ids(self) -> set[int]:
        """The ids of the tensors registered now."""
        return {id(holder._parameters[leaf]) for holder, leaf in self.slots.values()}

    def sync(self, adapters: AdapterSet, *, in_forward: bool = False) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                                  Callable]]:
        """Make `adapters` hold the tensors the model holds now, except where the model's replace a
        meta tensor of ours (`to_empty`; see the module docstring). Returns what `adopt` must
        finish once `AdapterSet.follow` has materialised ours: (theirs, ours, setter).

        `in_forward`: called while the model runs (compiling). A sharded model's adapters made on
        meta cannot be initialised then (FSDP2 may have gathered some already): refused."""
        pending = []
        for (slot, ours, setter, deferred) in _adapter_tensors(adapters):
            holder, leaf = self.slots[slot]
            theirs = holder._parameters[leaf]
            loaded = leaf in holder.loaded
            holder.loaded.discard(leaf)
            if theirs is ours:
                continue
            if ours.device.type != "meta":
                setter(theirs)
            elif theirs.device.type != "meta":
                if loaded:  # a state dict wrote it: keep the value through the initialisation
                    deferred(full_value(theirs))
                if is_sharded(theirs) and not in_forward:
                    pending.append((theirs, ours, setter))
                elif is_sharded(theirs) or is_fsdp_sharded(self.model):  # FSDP2's, in a forward
                    raise LoraFxError(
                        f"the adapter {in_model_name(*slot, self.adapter)!r} was made on the meta device and the "
                        "sharded model now has storage, but its adapters are not initialised yet: call "
                        "lora.parameters() after to_empty and before the first call (it initialises them, the same on "
                        "every process: seed alike)")
                else:
                    holder._parameters[leaf] = ours
        return pending

    @staticmethod
    def adopt(pending: list[tuple[torch.Tensor, torch.Tensor, Callable]]) -> None:
        """Give each sharded replacement its shard of our (now initialised) values; hold it."""
        for theirs, ours, setter in pending:
            copy_value(theirs, ours)
            setter(theirs)

    def set_merged(self, merged: bool) -> None:
        for holder, _ in self.slots.values():
            holder.merged = merged

    # -- building -------------------------------------------------------------------------------
    def _check_free(self, owner: str, fqn: str) -> None:
        """Refuse a name the model already uses for something else. Up to `owner` the path may
        run through any module (the adapted layer and its parents); the components lora_fx adds
        after it (`lora_A`, `default`, the leaf) must be absent, or holders: those of a copy of an
        attached model are reused and their tensors replaced."""
        module = self.model
        parts = fqn.split(".")
        ours_from = len(owner.split(".")) if owner else 0
        for i, part in enumerate(parts):
            if isinstance(module, AdapterHolder):
                return
            child = wrapped_child(module, part)
            if child is None and not hasattr(module, part):
                return  # free from here on
            if child is None or i == len(parts) - 1 or (i >= ours_from and not isinstance(child, AdapterHolder)):
                raise LoraFxError(
                    f"cannot register the adapter tensor {fqn!r} in the model: {'.'.join(parts[: i + 1])!r} is "
                    f"already an attribute of {type(module).__name__} (lora_fx needs that name for the adapter, "
                    "as PEFT names it)")
            module = child

    def _holder_for(self, fqn: str) -> tuple[nn.Module, str]:
        *path, leaf = fqn.split(".")
        module = self.model
        for part in path:
            child = wrapped_child(module, part)
            if child is None:
                child = AdapterHolder()
                module.add_module(part, child)
            module = child
        return module, leaf


def _prune_empty_holders(model: nn.Module, fqn: str) -> None:
    """Delete the holders on `fqn`'s path that hold nothing any more, deepest first."""
    chain = [(None, "", model)]
    for part in fqn.split(".")[:-1]:
        child = wrapped_child(chain[-1][2], part)
        if child is None:
            break
        chain.append((chain[-1][2], part, child))
    for parent, part, module in reversed(chain[1:]):
        if (isinstance(module, AdapterHolder) and not module._parameters and not module._modules
                and parent._modules.get(part) is module):
            del parent._modules[part]


def _tensors_by_slot(adapters: AdapterSet) -> Iterator[tuple[tuple[str, str], nn.Parameter]]:
    for slot, tensor, _, _ in _adapter_tensors(adapters):
        yield slot, tensor


def _adapter_tensors(adapters: AdapterSet):
    """Per adapter tensor: (slot, tensor, a function making `adapters` hold another tensor there,
    a function keeping a value to copy in once the tensor is materialised)."""
    storage = adapters.storage_names()
    for name, entry in adapters.entries.items():
        for key, t in entry.tensors.items():
            yield ((storage[name], key), t, functools.partial(entry.tensors.__setitem__, key),
                   functools.partial(entry.deferred.__setitem__, key))
    for module, copies in adapters.saved.items():
        for name, t in copies.items():
            yield ((module, COPY_PREFIX + name), t, functools.partial(copies.__setitem__, name),
                   functools.partial(adapters.defer_saved, module, name))
