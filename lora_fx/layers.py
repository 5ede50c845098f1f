"""`LayerInfo`: what the rule engine and the variants need to know about an adaptable layer.

One description, filled either from an `nn.Module` (`layers_of_module`) or from a graph site
(`passes/find_targets.py`), so both routes resolve rules and shape adapters identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import layer_kinds
from .errors import LoraFxError
from .layer_kinds import LayerKind, class_qualname, kind_of_class, resolve_class

__all__ = ["WRAPPER_COMPONENTS", "AdapterHolder", "LayerInfo", "class_qualname", "kind_of_class", "layer_of_module",
           "layers_of_module", "output_layer_names", "parameters_outside_holders", "resolve_class",
           "without_wrappers", "wrapped_child"]


@dataclass(frozen=True)
class LayerInfo:
    """An adaptable layer, independent of how it was found.

    `in_features`/`out_features` are PEFT's: for an embedding, num_embeddings and embedding_dim;
    for a conv, in_channels and out_channels.
    """

    name: str
    kind: LayerKind
    in_features: int
    out_features: int
    class_name: str = ""
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_idx: int | None = None
    has_bias: bool = False
    weight_dtype: torch.dtype = torch.float32
    weight_device: str = "cpu"
    # A raw parameter (`target_parameters`): its experts, whether stored (E, in, out), its shape,
    # and its index among its module's own parameters (PEFT nests their wrappers in that order).
    num_experts: int = 1
    transposed: bool = False
    parameter_shape: tuple[int, ...] = ()
    position: int = 0
    # Why lora_fx cannot adapt this layer (a quantized weight, a call it cannot read), or None.
    # Such layers are listed so that targeting one is an error naming it, not a silent skip.
    unsupported: str | None = None

    def __post_init__(self):
        if isinstance(self.kind, str):  # a kind given by name ("linear")
            object.__setattr__(self, "kind", layer_kinds.get(self.kind))

    @property
    def conv_dims(self) -> int:
        return len(self.kernel_size)

    @property
    def module_path(self) -> str:
        """The module the layer is (a module layer) or holds the parameter (a parameter layer)."""
        return self.name.rpartition(".")[0] if self.kind.targets_parameter else self.name


# Attribute names under which torch's wrappers inside a model hold the module they wrap:
# `torch.compile(block)`'s OptimizedModule, activation checkpointing's CheckpointWrapper.
WRAPPER_COMPONENTS = ("_orig_mod", "_checkpoint_wrapped_module")


def without_wrappers(name: str) -> str:
    """A module or parameter name with the components of wrappers inside the model removed: a block
    replaced by `torch.compile(block)` names its weights `layers.0._orig_mod.mlp...`; its layers
    are still `layers.0.mlp...` to lora_fx, as to PEFT (the wrappers forward attribute access)."""
    parts = name.split(".")
    if not any(p in WRAPPER_COMPONENTS for p in parts):
        return name
    return ".".join(p for p in parts if p not in WRAPPER_COMPONENTS)


def wrapped_child(module: nn.Module, name: str) -> nn.Module | None:
    """`module`'s child `name`, looking through the wrappers of `WRAPPER_COMPONENTS`."""
    while True:
        child = module._modules.get(name)
        if child is not None:
            return child
        inner = next((module._modules[w] for w in WRAPPER_COMPONENTS if w in module._modules), None)
        if inner is None:
            return None
        module = inner


class AdapterHolder(nn.Module):
    """A container of lora_fx tensors in an attached model's module tree (`registration.py`):
    never called, never a layer, its tensors never `target_parameters` candidates.

    Loading a state dict into the model: keys a state dict lacks are not missing (a base
    checkpoint leaves the adapters as they are), whatever prefix the model is loaded under (a
    compiled wrapper, DDP, a parent module); keys it has are recorded in `loaded` (the registration
    keeps such values when it replaces tensors); while `merged`, loading adapter values is refused
    (unmerge would subtract a delta that was never added).
    """

    def __init__(self):
        super().__init__()
        self.merged = False
        self.loaded: set[str] = set()

    def forward(self, *args, **kwargs):  # pragma: no cover - a holder is not a layer
        raise TypeError("an AdapterHolder holds adapter tensors and is never called")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        present = [name for name in self._parameters if prefix + name in state_dict]
        if present and self.merged:
            raise LoraFxError(f"loading {prefix + present[0]!r} while the adapters are merged into the model's weights "
                              "would make unmerge subtract a delta that was never added; call lora.unmerge() first")
        missing_before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        del missing_keys[missing_before:]
        self.loaded.update(present)


def parameters_outside_holders(module: nn.Module):
    """`module.named_parameters()` without the tensors of `AdapterHolder`s inside it (a copy of an
    attached model carries the adapters it had)."""
    holders = tuple(name + "." for name, m in module.named_modules() if isinstance(m, AdapterHolder))
    return [(name, p) for name, p in module.named_parameters() if not name.startswith(holders)]


def parameter_layer(name: str, value: torch.Tensor, position: int, transposed: bool = False,
                    class_name: str = "") -> LayerInfo:
    """The `target_parameters` candidate a parameter is (named by its FQN). A shape PEFT has no
    LoRA form for is listed as unsupported, so that targeting it is an error naming it."""
    common = dict(name=name, kind=layer_kinds.PARAMETER, class_name=class_name, weight_dtype=value.dtype,
                  weight_device=str(value.device), position=position)
    if value.dim() not in (2, 3) or not value.is_floating_point():
        return LayerInfo(in_features=0, out_features=0, parameter_shape=tuple(value.shape), **common, unsupported=(
            f"its shape {tuple(value.shape)} ({value.dtype}) has no LoRA form: target_parameters takes 2-D weights "
            "and 3-D expert stacks of floating point (as PEFT)"))
    return LayerInfo(**layer_kinds.PARAMETER.dims_of_parameter(tuple(value.shape), transposed), **common)


def layer_of_module(name: str, module: nn.Module) -> LayerInfo | None:
    """Describe `module` if it is an adaptable layer, else None."""
    kind = kind_of_class(type(module))
    if kind is None:
        return None
    w = module.weight
    common = dict(name=name, kind=kind, class_name=class_qualname(type(module)),
                  has_bias=getattr(module, "bias", None) is not None,
                  weight_dtype=w.dtype, weight_device=str(w.device))
    if not w.is_floating_point() and not kind.module_boundary:
        reason = (f"its class {class_qualname(type(module))} holds a {w.dtype} weight of shape {tuple(w.shape)} "
                  "(quantized) and is not a quantized layer lora_fx knows (bitsandbytes Linear4bit, Linear8bitLt)")
        return LayerInfo(in_features=0, out_features=0, unsupported=reason, **common)
    return LayerInfo(**{**common, **kind.describe_module(module)})


def layers_of_module(model: nn.Module) -> list[LayerInfo]:
    """Every adaptable layer of `model`, in `named_modules` order, then every parameter (the
    candidates of `target_parameters`)."""
    out, params = [], []
    for name, module in model.named_modules():
        if isinstance(module, AdapterHolder):
            continue
        name = without_wrappers(name)
        info = layer_of_module(name, module)
        if info is not None:
            out.append(info)
        transposed = bool(getattr(module, "is_transposed", False))
        for position, (leaf, p) in enumerate(module.named_parameters(recurse=False)):
            fqn = f"{name}.{leaf}" if name else leaf
            params.append(parameter_layer(fqn, p, position, transposed, class_qualname(type(module))))
    return out + params


def output_layer_names(model: nn.Module) -> set[str]:
    """The layer `"all-linear"` leaves out, as PEFT decides it: a transformers model's output
    embeddings; nothing for other models."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return set()
    if not isinstance(model, PreTrainedModel) or get is None:
        return set()
    emb = get()
    if emb is None:
        return set()
    return {without_wrappers(name) for name, module in model.named_modules() if module is emb}
