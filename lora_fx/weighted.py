"""Combine several LoRA adapters into one: PEFT's `LoraModel.add_weighted_adapter` as a function.

PEFT does this on a model holding the adapters; here the inputs are adapter files (or their
`(LoraConfig, state_dict)`), the output is a new adapter: a `LoraConfig` and PEFT-keyed tensors,
optionally written as a PEFT adapter directory. No model is needed: everything PEFT reads from
the model's LoRA layers (kind, shapes, scaling) follows from the adapters' configs and tensors.

The numbers follow PEFT's recipe operation for operation (same factors, same order of the
float operations, same random draws for DARE given the same generator state), so the result
is PEFT's, bit for bit where the arithmetic is deterministic. See docs/weighted.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import io
from .adapters import PEFT_PREFIX
from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterFileError, ConfigError, UnsupportedFeatureError
from .layers import LayerInfo
from .rules import pattern_key, resolve

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
# The types that combine A with A and B with B: every adapter must have the same rank (PEFT's rule).
_FACTORWISE = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
# The types that combine full delta weights and factor the result again with an SVD.
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_NEED_DENSITY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                 "magnitude_prune", "magnitude_prune_svd")
_SIGN_METHODS = ("total", "frequency")

# Key suffixes of an adapter's factors: (A, B) for module layers, (A, B) for embeddings.
_LINEAR_KEYS = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING_KEYS = (".lora_embedding_A", ".lora_embedding_B")

Adapter = str | os.PathLike | tuple[LoraConfig, dict[str, torch.Tensor]]


@dataclass
class _Factors:
    """One adapter's factors for one layer, as PEFT stores them."""

    A: torch.Tensor
    B: torch.Tensor
    embedding: bool
    scaling: float

    @property
    def groups(self) -> int:  # a grouped conv's B has r / groups input channels
        return self.A.shape[0] // self.B.shape[1] if self.A.dim() > 2 else 1


@dataclass
class _Adapter:
    source: str                    # how messages name it
    cfg: LoraConfig
    layers: dict[str, _Factors]    # layer name -> factors, in file order
    base: dict[str, torch.Tensor]  # base weights saved with the adapter (full key -> tensor)

    @property
    def max_rank(self) -> int:  # PEFT's rank of the adapter: r, or the largest rank_pattern value
        return max(self.cfg.r, *self.cfg.rank_pattern.values()) if self.cfg.rank_pattern else self.cfg.r


def add_weighted_adapter(
    adapters: list[Adapter],
    weights: list[float],
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    output_dir: str | os.PathLike | None = None,
    generator: torch.Generator | None = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Combine LoRA adapters into a new one, as PEFT's `LoraModel.add_weighted_adapter` does.

    The new adapter's config is the first adapter's with `r` = the new rank, `lora_alpha` = the
    new rank (scaling 1, or `sqrt(r)` with `use_rslora`, as PEFT), `target_modules` = the union of
    the adapters' (lists: their union; regexes: `"(a)|(b)"`), and no rank/alpha patterns. Each
    layer combines the adapters that have it, each factor or delta weighted by `weight * scaling`
    of its adapter:

    - `cat`: A's stacked (each times weight and scaling), B's side by side; rank = sum of ranks.
      Exact: the new adapter computes `sum_i w_i * s_i * B_i A_i`.
    - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: A's combined with each other,
      B's with each other (each side weighted by `sqrt(|w * s|)`, the sign on A), by PEFT's task
      arithmetic / TIES / DARE / magnitude pruning. Every adapter must have the same rank.
    - `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the delta
      weights `s * B A` combined the same way, then factored again by a truncated SVD of rank
      `svd_rank` (default: the largest rank).

    With one adapter, the type is always `linear` (PEFT's rule).

    Args:
        adapters: PEFT adapter directories, or `(LoraConfig, state_dict)` pairs as
            `lora_fx.io.read_adapter_dir` returns them.
        weights: One weight per adapter (negative subtracts an adapter).
        combination_type: One of `COMBINATION_TYPES` (PEFT's names).
        svd_rank: Rank of the result of the `*svd` types; default the largest input rank.
        svd_clamp: Quantile in [0, 1]: clamp the SVD factors to +-that quantile of their values.
        svd_full_matrices: Passed to `torch.linalg.svd` (PEFT's default, True).
        svd_driver: Passed to `torch.linalg.svd` (CUDA only).
        density: Fraction of values kept by the pruning types (ties, dare, magnitude_prune).
        majority_sign_method: `"total"` or `"frequency"`: how TIES elects each value's sign.
        output_dir: If given, the new adapter is also written there as a PEFT adapter directory
            (atomically), which `PeftModel.from_pretrained` and lora_fx load.
        generator: The random generator of the DARE types' masks (default: torch's global one,
            as PEFT draws them).

    Returns:
        `(config, tensors)`: the new adapter's `LoraConfig` and its tensors under PEFT's keys
        (`base_model.model.<layer>.lora_A.weight`, `...lora_embedding_A` for embeddings).

    Raises:
        ConfigError: an unknown combination type, `weights` not one per adapter, no adapters,
            different ranks where the type needs equal ones, mixed list/regex `target_modules`,
            a missing or invalid `density`, an invalid SVD option.
        UnsupportedFeatureError: an adapter PEFT cannot combine, or whose combination needs the
            base model (DoRA and other variants, `target_parameters`, modules saved in full,
            `lora_bias`, trained base biases, base-rewriting initialisations such as PiSSA).
        AdapterFileError: unreadable adapters, or a layer whose shapes differ between adapters
            (adapters of different base models).

    Example:
        >>> import torch, lora_fx
        >>> g = torch.Generator().manual_seed(0)
        >>> def adapter(r):
        ...     cfg = lora_fx.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc"])
        ...     return cfg, {"base_model.model.fc.lora_A.weight": torch.randn(r, 8, generator=g),
        ...                  "base_model.model.fc.lora_B.weight": torch.randn(6, r, generator=g)}
        >>> cfg, tensors = lora_fx.add_weighted_adapter([adapter(2), adapter(4)], [0.7, 0.3], "cat")
        >>> cfg.r, cfg.lora_alpha, tensors["base_model.model.fc.lora_A.weight"].shape
        (6, 6, torch.Size([6, 8]))
    """
    combination_type = _check_arguments(adapters, weights, combination_type, svd_rank, svd_clamp, density,
                                        majority_sign_method)
    loaded = [_read(a, i) for i, a in enumerate(adapters)]
    weights = [float(w) for w in weights]
    _check_combinable(loaded)
    if len(loaded) == 1:
        combination_type = "linear"  # PEFT: one adapter is always combined linearly

    ranks = [a.max_rank for a in loaded]
    if combination_type in _FACTORWISE:
        if len(set(ranks)) != 1:
            listed = ", ".join(f"{a.source}: r={r}" for a, r in zip(loaded, ranks, strict=True))
            raise ConfigError(f"combination_type={combination_type!r} needs adapters of the same rank, got {listed}; "
                              "use 'cat' or an '*svd' type for adapters of different ranks")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    config = dataclasses.replace(copy.deepcopy(loaded[0].cfg), r=new_rank, lora_alpha=new_rank,
                                 target_modules=_union_targets(loaded), rank_pattern={}, alpha_pattern={})
    layers = _layers_in_order(loaded)
    layers = _selected(layers, loaded, config)
    if combination_type in _NEED_DENSITY and density >= 1:
        warnings.warn(f"add_weighted_adapter: density={density} >= 1 prunes nothing (as PEFT)", stacklevel=2)

    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        present = [(a.layers[layer], w) for a, w in zip(loaded, weights, strict=True) if layer in a.layers]
        if combination_type == "cat":
            A, B = _cat(layer, present, new_rank)
        elif combination_type in _SVD:
            A, B = _svd(layer, present, combination_type, new_rank, loaded[0].cfg.fan_in_fan_out, svd_clamp,
                        svd_full_matrices, svd_driver, density, majority_sign_method, generator)
        else:
            A, B = _factorwise(layer, present, combination_type, new_rank, density, majority_sign_method, generator)
        keys = _EMBEDDING_KEYS if present[0][0].embedding else _LINEAR_KEYS
        tensors[f"{PEFT_PREFIX}{layer}{keys[0]}"] = A
        tensors[f"{PEFT_PREFIX}{layer}{keys[1]}"] = B
    tensors.update(_base_weights(loaded))

    if output_dir is not None:
        io.write_adapter_dir(output_dir, config.to_peft_dict(), tensors)
    return config, tensors


# -- arguments and inputs ---------------------------------------------------------------------
def _check_arguments(adapters, weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method) -> str:
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, (list, tuple)):
        raise ConfigError(f"add_weighted_adapter: adapters must be a list of adapter directories or "
                          f"(LoraConfig, state_dict) pairs, got {type(adapters).__name__}")
    if not adapters:
        raise ConfigError("add_weighted_adapter: adapters is empty; give at least one adapter to combine")
    if not isinstance(weights, (list, tuple)) and not (isinstance(weights, torch.Tensor) and weights.dim() == 1):
        raise ConfigError(f"add_weighted_adapter: weights must be a list of numbers, got {type(weights).__name__}")
    if len(weights) != len(adapters):
        raise ConfigError(f"add_weighted_adapter: {len(weights)} weights for {len(adapters)} adapters; "
                          "give one weight per adapter")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, torch.Tensor)) or not math.isfinite(float(w)):
            raise ConfigError(f"add_weighted_adapter: weights[{i}] must be a finite number, got {w!r}")
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"add_weighted_adapter: unknown combination_type {combination_type!r}; "
                          f"valid: {', '.join(COMBINATION_TYPES)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"add_weighted_adapter: svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        raise ConfigError(f"add_weighted_adapter: svd_clamp is a quantile in [0, 1] or None, got {svd_clamp!r}")
    if majority_sign_method not in _SIGN_METHODS:
        raise ConfigError(f"add_weighted_adapter: majority_sign_method must be 'total' or 'frequency', "
                          f"got {majority_sign_method!r}")
    if combination_type in _NEED_DENSITY and len(adapters) > 1:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not density >= 0:
            raise ConfigError(f"add_weighted_adapter: combination_type={combination_type!r} needs density, the "
                              f"fraction of values kept (a number in [0, 1]), got {density!r}")
    return combination_type


def _read(adapter: Adapter, index: int) -> _Adapter:
    if isinstance(adapter, (str, os.PathLike)):
        source = os.fspath(adapter)
        cfg, state = io.read_adapter_dir(adapter)
    elif isinstance(adapter, tuple) and len(adapter) == 2 and isinstance(adapter[0], LoraConfig) \
            and isinstance(adapter[1], dict):
        source = f"adapters[{index}]"
        cfg, state = adapter
    else:
        raise ConfigError(f"add_weighted_adapter: adapters[{index}] must be a PEFT adapter directory or a "
                          f"(LoraConfig, state_dict) pair, got {type(adapter).__name__}")
    _check_config(cfg, source)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    base: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterFileError(f"{source}: key {key!r} does not start with {PEFT_PREFIX!r} (PEFT's prefix)")
        body = key[len(PEFT_PREFIX):]
        for is_emb, suffixes in ((False, _LINEAR_KEYS), (True, _EMBEDDING_KEYS)):
            hit = next((s for s in suffixes if body.endswith(s)), None)
            if hit is not None:
                layer = body[: -len(hit)]
                factors.setdefault(layer, {})["A" if hit == suffixes[0] else "B"] = value
                if embedding.setdefault(layer, is_emb) != is_emb:
                    raise AdapterFileError(f"{source}: layer {layer!r} has both lora_A/lora_B and "
                                           "lora_embedding_A/lora_embedding_B keys")
                break
        else:
            if "lora_" not in body and body.endswith(".weight"):
                base[key] = value  # a base (embedding) weight saved with the adapter
            else:
                raise UnsupportedFeatureError(
                    f"{source}: key {key!r} is not a LoRA factor (lora_A / lora_B / lora_embedding_A / "
                    "lora_embedding_B); add_weighted_adapter combines plain LoRA factors only")
    layers = {}
    for layer, fb in factors.items():
        if set(fb) != {"A", "B"}:
            missing = "B" if "A" in fb else "A"
            raise AdapterFileError(f"{source}: layer {layer!r} has no lora_{missing} tensor")
        A, B = fb["A"], fb["B"]
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterFileError(f"{source}: layer {layer!r}: LoRA factors must be floating point, "
                                   f"got {A.dtype} / {B.dtype}")
        fits = A.dim() == B.dim() and (A.dim() == 2 and A.shape[0] == B.shape[1] or A.dim() > 2
                                       and B.shape[1] > 0 and A.shape[0] % B.shape[1] == 0
                                       and all(k == 1 for k in B.shape[2:]))
        if not fits:
            raise AdapterFileError(f"{source}: layer {layer!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                   "do not form a LoRA pair")
        rk, ak = pattern_key(cfg.rank_pattern, layer), pattern_key(cfg.alpha_pattern, layer)
        r = cfg.rank_pattern[rk] if rk is not None else cfg.r
        alpha = cfg.alpha_pattern[ak] if ak is not None else cfg.lora_alpha
        if A.shape[0] != r:
            raise AdapterFileError(f"{source}: layer {layer!r} has rank {A.shape[0]} (lora_A {tuple(A.shape)}), "
                                   f"its config gives rank {r}")
        layers[layer] = _Factors(A, B, embedding[layer], cfg.scaling_for(r, alpha))
    if not layers:
        raise AdapterFileError(f"{source}: no LoRA factors (lora_A / lora_B keys) to combine")
    return _Adapter(source, cfg, layers, base)


def _check_config(cfg: LoraConfig, source: str) -> None:
    """Refuse what PEFT refuses, and what cannot be combined without the base model."""
    if cfg.target_parameters:
        raise UnsupportedFeatureError(f"{source}: target_parameters={cfg.target_parameters}; PEFT's "
                                      "add_weighted_adapter does not combine adapters of nn.Parameters either")
    for name in ("use_dora", "use_qalora", "alora_invocation_tokens", "use_bdlora"):
        value = getattr(cfg, name)
        if value not in (None, False):
            raise UnsupportedFeatureError(
                f"{source}: {name}={value!r}; only plain LoRA adapters can be combined (a variant's extra state, "
                "such as DoRA's magnitude vector, has no weighted sum; PEFT does not combine them correctly either)")
    if cfg.lora_bias:
        raise UnsupportedFeatureError(f"{source}: lora_bias=True; the lora_B biases cannot be combined "
                                      "(PEFT's add_weighted_adapter drops them)")
    if cfg.bias != "none":
        raise UnsupportedFeatureError(f"{source}: bias={cfg.bias!r}: base biases were trained with the adapter; "
                                      "add_weighted_adapter combines LoRA factors only (use adapters with bias='none')")
    if cfg.saved_module_names():
        raise UnsupportedFeatureError(
            f"{source}: saves modules in full (modules_to_save / task_type heads: {cfg.saved_module_names()}); "
            "PEFT gives the combined adapter fresh copies of the base model's modules, which needs the model")
    mode = str(cfg.init_lora_weights).lower()
    if mode.startswith(("pissa", "olora", "loftq", "corda", "eva")):
        raise UnsupportedFeatureError(
            f"{source}: init_lora_weights={cfg.init_lora_weights!r} rewrites the base weights; adapters trained "
            "against rewritten bases cannot be combined (convert them to plain LoRA first, docs/init.md)")


def _check_combinable(loaded: list[_Adapter]) -> None:
    """Every layer has one shape (in/out features, kernel, kind) in every adapter having it."""
    seen: dict[str, tuple[_Adapter, _Factors]] = {}
    for a in loaded:
        for layer, f in a.layers.items():
            if layer not in seen:
                seen[layer] = (a, f)
                continue
            first, g = seen[layer]
            if f.embedding != g.embedding or f.A.dim() != g.A.dim() or f.A.shape[1:] != g.A.shape[1:] \
                    or f.B.shape[0] != g.B.shape[0] or f.groups != g.groups:
                raise AdapterFileError(
                    f"layer {layer!r} has different shapes in {first.source} (lora_A {tuple(g.A.shape)}, lora_B "
                    f"{tuple(g.B.shape)}) and {a.source} (lora_A {tuple(f.A.shape)}, lora_B {tuple(f.B.shape)}); "
                    "adapters of different base models cannot be combined")
    names = {a.cfg.extra.get("base_model_name_or_path") for a in loaded} - {None}
    if len(names) > 1:
        warnings.warn(f"add_weighted_adapter: the adapters name different base models ({sorted(names)}); "
                      "their layer shapes agree, so they are combined", stacklevel=3)


def _targets(a: _Adapter) -> list[str] | str:
    tm = a.cfg.target_modules
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        return sorted(a.layers)  # PEFT expands "all-linear" to the layers it adapted
    return tm


def _union_targets(loaded: list[_Adapter]) -> list[str] | str:
    targets = [_targets(a) for a in loaded]
    regex = [a.source for a, t in zip(loaded, targets, strict=True) if isinstance(t, str)]
    if regex and len(regex) != len(loaded):
        lists = [a.source for a, t in zip(loaded, targets, strict=True) if not isinstance(t, str)]
        raise ConfigError(f"add_weighted_adapter: target_modules is a regex string in {regex} and a list in {lists}; "
                          "PEFT cannot combine adapters with a mix of list and string target_modules")
    if regex:
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


def _layers_in_order(loaded: list[_Adapter]) -> list[str]:
    out: dict[str, None] = {}
    for a in loaded:
        out.update(dict.fromkeys(a.layers))
    return list(out)


def _selected(layers: list[str], loaded: list[_Adapter], config: LoraConfig) -> list[str]:
    """The layers the new config targets. PEFT only adds the new adapter where its config targets
    a layer (the first adapter's exclude_modules / layers_to_transform apply to all); the others
    are left out, with a warning."""
    infos = [LayerInfo(name, "linear", 1, 1) for name in layers]
    chosen = resolve(infos, config, require_match=False)
    dropped = [name for name in layers if name not in chosen]
    if dropped:
        owners = sorted({a.source for a in loaded for name in dropped if name in a.layers})
        warnings.warn(f"add_weighted_adapter: layers {dropped} (from {owners}) are not targeted by the combined "
                      "config (it keeps the first adapter's exclude_modules / layers_to_transform / layers_pattern, "
                      "as PEFT's does); they are left out", stacklevel=3)
    if not chosen:
        raise ConfigError("add_weighted_adapter: the combined config targets none of the adapters' layers")
    return [name for name in layers if name in chosen]


def _base_weights(loaded: list[_Adapter]) -> dict[str, torch.Tensor]:
    """Base weights saved with the adapters (embedding layers), kept when the adapters agree."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for a in loaded:
        for key, value in a.base.items():
            if key in out and not (out[key][1].shape == value.shape and torch.equal(out[key][1], value)):
                raise AdapterFileError(f"{out[key][0]} and {a.source} save different base weights under {key!r} "
                                       "(different base models, or resized vocabularies); cannot combine them")
            out.setdefault(key, (a.source, value))
    return {k: v for k, (_, v) in out.items()}


# -- combining ----------------------------------------------------------------------------------
def _weights_like(weights: list[float], stacked: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(weights).to(stacked.device)
    return w.view(w.shape + (1,) * (stacked.dim() - 1))


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but the `int(density * numel)` largest-magnitude values zeroed."""
    if density >= 1:
        return t
    keep = torch.zeros_like(t).reshape(-1)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def _drop_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each value kept with probability `density`, the kept ones divided by it."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _elect_and_merge(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: each value's sign by majority (of the sum, or of the count), then the mean of the
    weighted values that have that sign."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    return (stacked * weights * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _combine(tensors: list[torch.Tensor], weights: list[float], how: str, density, method,
             generator) -> torch.Tensor:
    """`how` is the combination type without its `_svd` suffix."""
    if how in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [_drop_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    w = _weights_like(weights, stacked)
    if how in ("ties", "dare_ties"):
        return _elect_and_merge(stacked, w, method)
    return (stacked * w).sum(dim=0)


def _padded(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `size` (rank slots no adapter fills)."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _refuse_grouped(layer: str, present, combination_type: str) -> None:
    groups = present[0][0].groups
    if groups > 1:
        raise UnsupportedFeatureError(
            f"layer {layer!r} is a grouped conv (groups={groups}); combination_type={combination_type!r} breaks its "
            "grouped lora_B (PEFT cannot merge LoRA of grouped convs either); use 'linear' or another factorwise type")


def _cat(layer: str, present, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    _refuse_grouped(layer, present, "cat")
    A = torch.cat([f.A * w * f.scaling for f, w in present], dim=0)
    B = torch.cat([f.B for f, _ in present], dim=1)
    return _padded(A, 0, new_rank), _padded(B, 1, new_rank)


def _factorwise(layer, present, combination_type, new_rank, density, method, generator):
    ranks = [f.A.shape[0] for f, _ in present]
    if len(set(ranks)) != 1:
        raise ConfigError(f"combination_type={combination_type!r} needs one rank per layer, but layer {layer!r} has "
                          f"ranks {ranks} in the adapters that have it (rank_pattern); use 'cat' or an '*svd' type")
    weights_A, weights_B = [], []
    for f, w in present:
        ws = w * f.scaling
        root = math.sqrt(abs(ws))
        weights_A.append(root * (1 if ws >= 0 else -1))  # the sign on one side only
        weights_B.append(root)
    dtype = present[0][0].A.dtype
    A = _combine([f.A for f, _ in present], weights_A, combination_type, density, method, generator).to(dtype)
    B = _combine([f.B for f, _ in present], weights_B, combination_type, density, method, generator).to(dtype)
    groups = present[0][0].groups
    return _padded(A, 0, new_rank), _padded(B, 1, new_rank // groups)


def _delta(f: _Factors, fan_in_fan_out: bool) -> torch.Tensor:
    """`scaling * B @ A` in the layout PEFT's `get_delta_weight` gives it (weight layout: (in, out)
    for embeddings and fan_in_fan_out; conv weights (out, in, *kernel))."""
    A, B = f.A, f.B
    dtype = A.dtype if (f.embedding or A.dim() > 2) else B.dtype
    upcast = B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if upcast:  # as PEFT: CPU half-precision matmuls in fp32, the result cast back
        A, B = A.float(), B.float()
    if A.dim() == 4 and A.shape[2:4] == (1, 1):
        out = (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * f.scaling
    elif A.dim() > 2:
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[A.dim()]
        out = conv(A.transpose(0, 1), B).transpose(0, 1) * f.scaling
    else:
        product = B @ A
        out = (product.T if (f.embedding or fan_in_fan_out) else product) * f.scaling
    return out.to(dtype) if upcast else out


def _svd(layer, present, combination_type, new_rank, fan_in_fan_out, clamp, full_matrices, driver, density, method,
         generator):
    _refuse_grouped(layer, present, combination_type)
    first = present[0][0]
    transposed = first.embedding or (fan_in_fan_out and first.A.dim() == 2)
    deltas = [_delta(f, fan_in_fan_out) for f, _ in present]
    delta = _combine(deltas, [w for _, w in present], combination_type.removesuffix("_svd"), density, method,
                     generator)
    if delta.dim() > 2:
        delta = delta.flatten(start_dim=1)
    if transposed:
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(new_rank, S.shape[0])
    U = U[:, :k] @ torch.diag(S[:k])
    Vh = Vh[:k, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    # A rank above the delta's own rank bound: zero slots (PEFT would write mis-shaped factors).
    U, Vh = _padded(U, 1, new_rank), _padded(Vh, 0, new_rank)
    if first.A.dim() > 2:
        U = U.reshape(first.B.shape[0], new_rank, *first.B.shape[2:])
        Vh = Vh.reshape(new_rank, *first.A.shape[1:])
    return Vh, U
