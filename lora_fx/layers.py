"""`LayerInfo`: what the rule engine and the variants need to know about an adaptable layer.

One description, filled either from an `nn.Module` (`layers_of_module`) or from a graph site
(`passes/find_targets.py`), so both routes resolve rules and shape adapters identically.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

LINEAR = "linear"          # y = x W^T + b, W: (out, in)
HF_CONV1D = "hf_conv1d"    # transformers Conv1D: y = x W + b, W: (in, out)
EMBEDDING = "embedding"    # y = W[idx], W: (num_embeddings, dim)
CONV = "conv"              # torch.nn.ConvNd, W: (out, in / groups, *kernel)

LINEAR_KINDS = (LINEAR, HF_CONV1D)

# Module classes whose calls are adaptable sites, by qualified name (graphs store names or types).
_CLASS_KIND = {
    "torch.nn.modules.linear.Linear": LINEAR,
    "transformers.pytorch_utils.Conv1D": HF_CONV1D,
    "torch.nn.modules.sparse.Embedding": EMBEDDING,
    "torch.nn.modules.conv.Conv1d": CONV,
    "torch.nn.modules.conv.Conv2d": CONV,
    "torch.nn.modules.conv.Conv3d": CONV,
}


@dataclass(frozen=True)
class LayerInfo:
    """An adaptable layer, independent of how it was found.

    `in_features`/`out_features` are PEFT's: for an embedding, num_embeddings and embedding_dim;
    for a conv, in_channels and out_channels.
    """

    name: str
    kind: str
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
    # Why lora_fx cannot adapt this layer (a quantized weight, a call it cannot read), or None.
    # Such layers are listed so that targeting one is an error naming it, not a silent skip.
    unsupported: str | None = None

    @property
    def conv_dims(self) -> int:
        return len(self.kernel_size)


def class_qualname(cls: type | str) -> str:
    if isinstance(cls, str):
        return cls
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(name: str) -> type | None:
    """The class an exported graph names as `module.Qual.Name`, if its module is imported and
    the name leads to a class (local classes, `<locals>` in the name, do not resolve)."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        obj = module
        for attr in parts[split:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj if isinstance(obj, type) else None
    return None


def kind_of_class(cls: type | str) -> str | None:
    """The site kind of a module class, subclasses of supported classes included (a class given
    by name is imported first to read its base classes)."""
    if isinstance(cls, str):
        kind = _CLASS_KIND.get(cls)
        if kind is not None:
            return kind
        resolved = resolve_class(cls)
        if resolved is None:
            return None
        cls = resolved
    for klass in cls.__mro__:
        kind = _CLASS_KIND.get(class_qualname(klass))
        if kind is not None:
            return kind
    return None


def layer_of_module(name: str, module: nn.Module) -> LayerInfo | None:
    """Describe `module` if it is an adaptable layer, else None."""
    kind = kind_of_class(type(module))
    if kind is None:
        return None
    w = module.weight
    common = dict(name=name, kind=kind, class_name=class_qualname(type(module)),
                  has_bias=getattr(module, "bias", None) is not None,
                  weight_dtype=w.dtype, weight_device=str(w.device))
    if not w.is_floating_point():
        reason = (f"its class {class_qualname(type(module))} holds a {w.dtype} weight of shape {tuple(w.shape)} "
                  "(quantized); QLoRA and quantized bases are not supported yet")
        return LayerInfo(in_features=0, out_features=0, unsupported=reason, **common)
    if kind == LINEAR:
        return LayerInfo(in_features=w.shape[1], out_features=w.shape[0], **common)
    if kind == HF_CONV1D:
        return LayerInfo(in_features=w.shape[0], out_features=w.shape[1], **common)
    if kind == EMBEDDING:
        return LayerInfo(in_features=w.shape[0], out_features=w.shape[1],
                         padding_idx=module.padding_idx, **common)
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return LayerInfo(in_features=module.in_channels, out_features=module.out_channels,
                     kernel_size=tuple(module.kernel_size), stride=tuple(module.stride),
                     padding=padding, dilation=tuple(module.dilation), groups=module.groups, **common)


def layers_of_module(model: nn.Module) -> list[LayerInfo]:
    """Every adaptable layer of `model`, in `named_modules` order."""
    out = []
    for name, module in model.named_modules():
        info = layer_of_module(name, module)
        if info is not None:
            out.append(info)
    return out


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
    return {name for name, module in model.named_modules() if module is emb}
