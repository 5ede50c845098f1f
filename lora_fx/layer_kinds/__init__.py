"""Layer-kind registry. A kind is one file in this package plus one `register` call below.

The rest of lora_fx never names a kind: `find_targets` asks every registered kind to `parse` a
call, `layers.py` asks `kind_of_class` which kind a module class is, and variants call the kind
a `LayerInfo` carries (`base.py` lists what a kind provides).
"""

from __future__ import annotations

import sys

from .base import LayerKind, ParsedCall

_REGISTRY: dict[str, LayerKind] = {}
_BY_CLASS: dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add a kind (asked in registration order: a call two kinds could read goes to the first)."""
    if kind.name in _REGISTRY:
        raise ValueError(f"layer kind {kind.name!r} is registered twice")
    _REGISTRY[kind.name] = kind
    for cls in kind.module_classes:
        _BY_CLASS[cls] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a registered kind (one defined in a test or notebook, when done with it)."""
    kind = _REGISTRY.pop(name, None)
    for cls in getattr(kind, "module_classes", ()):
        _BY_CLASS.pop(cls, None)


def get(name: str) -> LayerKind:
    """The registered kind called `name` (e.g. "linear")."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no layer kind {name!r}; registered: {sorted(_REGISTRY)}") from None


def all_kinds() -> list[LayerKind]:
    return list(_REGISTRY.values())


def parse_call(node) -> ParsedCall | None:
    """The adaptable op call `node` is, read by the first kind that recognises it, else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    for kind in _REGISTRY.values():
        parsed = kind.parse(node)
        if parsed is not None:
            return parsed
    return None


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


def kind_of_class(cls: type | str) -> LayerKind | None:
    """The kind of a module class, subclasses of registered classes included (a class given by
    name is imported first to read its base classes)."""
    if isinstance(cls, str):
        kind = _BY_CLASS.get(cls)
        if kind is not None:
            return kind
        resolved = resolve_class(cls)
        if resolved is None:
            return None
        cls = resolved
    for klass in cls.__mro__:
        kind = _BY_CLASS.get(class_qualname(klass))
        if kind is not None:
            return kind
    return None


from .bnb import Linear4bitKind, Linear8bitKind  # noqa: E402
from .conv import ConvKind  # noqa: E402
from .embedding import EmbeddingKind  # noqa: E402
from .hf_conv1d import HFConv1DKind  # noqa: E402
from .linear import LinearKind  # noqa: E402
from .parameter import GROUPED_MM, LINEAR_READ, PARAMETER, is_grouped_mm  # noqa: E402

LINEAR = register(LinearKind())
HF_CONV1D = register(HFConv1DKind())
EMBEDDING = register(EmbeddingKind())
CONV = register(ConvKind())
LINEAR_4BIT = register(Linear4bitKind())
LINEAR_8BIT = register(Linear8bitKind())
register(PARAMETER)  # found as parameters; its read forms (LINEAR_READ, GROUPED_MM) are bound per site

__all__ = ["CONV", "EMBEDDING", "GROUPED_MM", "HF_CONV1D", "LINEAR", "LINEAR_4BIT", "LINEAR_8BIT", "LINEAR_READ",
           "PARAMETER", "LayerKind",
           "ParsedCall", "all_kinds", "class_qualname", "get", "is_grouped_mm", "kind_of_class", "parse_call",
           "register", "resolve_class", "unregister"]
