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
    """The variant a config selects: the first specific variant (in registration order) that
    claims it, else the fallback (plain LoRA, which claims everything)."""
    ordered = sorted(_REGISTRY.values(), key=lambda v: v.fallback)
    for variant in ordered:
        if variant.claims(cfg):
            return variant
    raise LookupError("no variant claims this config")  # pragma: no cover - lora claims all


from . import dora, lora  # noqa: E402,F401  (registration)

__all__ = ["SiteCall", "TensorSpec", "Variant", "get", "register", "unregister", "variant_for"]
