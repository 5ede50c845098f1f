"""Variant registry. A variant is one file in this package plus one `register` call.

The core pass never names a variant: it asks `variant_for(cfg)` and calls the protocol in
`base.py`.
"""

from __future__ import annotations

from ..config import LoraConfig
from .base import SiteCall, TensorSpec, Variant

_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in _REGISTRY:
        raise ValueError(f"variant {variant.name!r} is registered twice")
    _REGISTRY[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    """Remove a registered variant (a variant defined in a test or notebook, when done with it)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Variant:
    return _REGISTRY[name]


def variant_for(cfg: LoraConfig) -> Variant:
    """The variant a config selects: the specific variant that claims it, else the fallback (plain
    LoRA, which claims everything)."""
    ordered = sorted(_REGISTRY.values(), key=lambda v: v.fallback)
    for variant in ordered:
        if variant.claims(cfg):
            return variant
    raise LookupError("no variant claims this config")  # pragma: no cover - lora claims all


def _register_all() -> None:
    """Import every module of this package: each registers its variant (one file, one `register`).
    Claims never overlap (a config selects at most one variant, `config.VARIANT_FIELDS`), so the
    import order does not matter."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_register_all()

__all__ = ["SiteCall", "TensorSpec", "Variant", "get", "register", "unregister", "variant_for"]
