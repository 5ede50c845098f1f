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
uninitialised ones; those are put back (the `AdapterSet` materialises and initialises its own,
which optimizers built on meta already hold).

Invariants: holders hold only lora_fx tensors and are never called; the scaling tensors are not
registered (they are not trained, and wrappers must not shard or cast them); `unregister`
removes every holder this registration added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .adapters import AdapterSet
from .errors import LoraFxError
from .layers import AdapterHolder, wrapped_child
from .passes.substitute_saved_modules import COPY_PREFIX

ADAPTER_NAME = "default"  # PEFT's name for the one adapter of a model


# PEFT keeps DoRA's magnitude in a module (`.weight`) but saves it without the leaf.
_LEAF_NOT_SAVED = {"lora_magnitude_vector": "weight"}


def in_model_name(owner: str, key: str) -> str:
    """The FQN of an adapter tensor in the model: PEFT's, the adapter's name after the tensor's
    first component (`q_proj` + `lora_A.weight` -> `q_proj.lora_A.default.weight`)."""
    head, _, rest = key.partition(".")
    rest = rest or _LEAF_NOT_SAVED.get(head, "")
    name = f"{owner}.{head}.{ADAPTER_NAME}" if owner else f"{head}.{ADAPTER_NAME}"
    return f"{name}.{rest}" if rest else name


class Registration:
    """Where each adapter tensor of one attached model is registered; see the module docstring."""

    def __init__(self, model: nn.Module):
        self.model = model
        # (owner, key) as `provide` asks for them -> (holder, leaf)
        self.slots: dict[tuple[str, str], tuple[nn.Module, str]] = {}
        self._added: list[tuple[nn.Module, str]] = []  # (parent, child name): the holders to remove
        self._load_hook = None

    @classmethod
    def register(cls, model: nn.Module, adapters: AdapterSet) -> Registration:
        """Register `adapters`' tensors in `model`. Nothing is added unless every name is free."""
        reg = cls(model)
        wanted = list(_tensors_by_slot(adapters))
        for (owner, key), _ in wanted:
            reg._check_free(owner, in_model_name(owner, key))
        for slot, tensor in wanted:
            holder, leaf = reg._holder_for(in_model_name(*slot))
            holder.register_parameter(leaf, tensor)
            reg.slots[slot] = (holder, leaf)
        reg._load_hook = reg.model.register_load_state_dict_post_hook(_missing_keys_filter(reg))
        return reg

    def unregister(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
        for holder, leaf in self.slots.values():
            holder._parameters.pop(leaf, None)
        for parent, child in reversed(self._added):
            delattr(parent, child)
        self._added, self.slots = [], {}

    def slot(self, owner: str, key: str) -> tuple[dict[str, torch.Tensor], str] | None:
        """(mapping, key) such that `mapping[key]` is the tensor registered for `(owner, key)` at
        the time it is read, or None if that is not a registered tensor (a scaling)."""
        slot = self.slots.get((owner, key))
        return None if slot is None else (slot[0]._parameters, slot[1])

    def named_tensors(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(FQN in the model, the tensor registered there now)."""
        for (owner, key), (holder, leaf) in self.slots.items():
            yield in_model_name(owner, key), holder._parameters[leaf]

    def held_ids(self) -> set[int]:
        """The ids of the tensors registered now."""
        return {id(holder._parameters[leaf]) for holder, leaf in self.slots.values()}

    def sync(self, adapters: AdapterSet) -> None:
        """Make `adapters` hold the tensors the model holds, except where the model's are
        uninitialised replacements of meta tensors (`to_empty`): those get ours back."""
        for (slot, ours), setter in zip(_tensors_by_slot(adapters), _setters(adapters), strict=True):
            holder, leaf = self.slots[slot]
            theirs = holder._parameters[leaf]
            if theirs is ours:
                continue
            if ours.device.type == "meta" and theirs.device.type != "meta":
                holder._parameters[leaf] = ours  # materialised by AdapterSet.follow
            else:
                setter(theirs)

    # -- building -------------------------------------------------------------------------------
    def _check_free(self, owner: str, fqn: str) -> None:
        """Refuse a name the model already uses for something else: below `owner`, every existing
        module on the path must be a holder. Holders found there (a copy of an attached model)
        are reused: their tensors are replaced by this backend's."""
        module = self.model
        parts = fqn.split(".")
        ours_from = len(owner.split(".")) if owner else 0  # the components lora_fx adds (lora_A.default...)
        for i, part in enumerate(parts):
            child = wrapped_child(module, part)
            last = i == len(parts) - 1
            taken = (child is not None and (last or (i >= ours_from and not isinstance(child, AdapterHolder)))) or (
                child is None and hasattr(module, part) and not isinstance(module, AdapterHolder))
            if last and isinstance(module, AdapterHolder) and part in module._parameters:
                taken = False
            if taken:
                raise LoraFxError(
                    f"cannot register the adapter tensor {fqn!r} in the model: {'.'.join(parts[: i + 1])!r} is "
                    f"already an attribute of {type(module).__name__} (lora_fx needs that name for the adapter, "
                    "as PEFT names it)")
            if child is None:
                return
            module = child

    def _holder_for(self, fqn: str) -> tuple[nn.Module, str]:
        *path, leaf = fqn.split(".")
        module = self.model
        for part in path:
            child = wrapped_child(module, part)
            if child is None:
                child = AdapterHolder()
                module.add_module(part, child)
                self._added.append((module, part))
            module = child
        return module, leaf


def _tensors_by_slot(adapters: AdapterSet) -> Iterator[tuple[tuple[str, str], nn.Parameter]]:
    storage = adapters.storage_names()
    for name, entry in adapters.entries.items():
        for key, t in entry.tensors.items():
            yield (storage[name], key), t
    for module, copies in adapters.saved.items():
        for name, t in copies.items():
            yield (module, COPY_PREFIX + name), t


def _setters(adapters: AdapterSet) -> Iterator[Callable[[nn.Parameter], None]]:
    """In `_tensors_by_slot`'s order: a function that makes `adapters` hold a new tensor there."""
    for entry in adapters.entries.values():
        for key in entry.tensors:
            yield lambda t, d=entry.tensors, k=key: d.__setitem__(k, t)
    for copies in adapters.saved.values():
        for name in copies:
            yield lambda t, d=copies, k=name: d.__setitem__(k, t)


def _missing_keys_filter(reg: Registration):
    """A load_state_dict post-hook keeping `model.load_state_dict(base_checkpoint)` working: adapter
    keys a state dict lacks are not "missing" (the adapters keep their values)."""
    ours = {fqn for fqn, _ in reg.named_tensors()}

    def hook(module, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in ours]

    return hook
