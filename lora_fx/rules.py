"""Target rules with PEFT semantics: which layers get an adapter, and with which rank and alpha.

- `target_modules` list: a name matches if it equals an entry or ends with `"." + entry`;
  string: `re.fullmatch`; `"all-linear"`: every Linear / Conv1D except the output layer (the
  model's output embedding; else, with `task_type="SEQ_CLS"`, a top-level `score` / `classifier`).
- `exclude_modules` likewise (list: exact or suffix; string: full regex).
- `layers_to_transform` (+ `layers_pattern`) keep only the layers whose first numbered path
  segment (after the pattern) is listed. Only applies to list targets, as in PEFT.
- `rank_pattern` / `alpha_pattern`: the first key `k` with `re.match(rf"(.*\\.)?({k})$", name)`.
Only adaptable layers (see `layers.py`) are candidates; containers are never matched.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .config import ALL_LINEAR, LoraConfig
from .errors import TargetNotFoundError, UnsupportedFeatureError
from .layers import LayerInfo
from .patterns import layer_index_regex, pattern_key_regex, saved_module_regex

# The top-level classification heads PEFT leaves out of "all-linear" for task_type="SEQ_CLS".
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


@dataclass(frozen=True)
class Resolved:
    """A targeted layer with its resolved rank, alpha and scaling."""

    layer: LayerInfo
    r: int
    alpha: float
    scaling: float


def _name_in(entries, name: str) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


def _excluded(cfg: LoraConfig, name: str) -> bool:
    # A module saved in full (modules_to_save), or one inside it, gets no adapter (as PEFT).
    if any(re.match(saved_module_regex(m), name) for m in cfg.saved_module_names()):
        return True
    ex = cfg.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return _name_in(ex, name)


def _layer_index(cfg: LoraConfig, name: str) -> int | None:
    patterns = cfg.layers_pattern
    m = None
    for p in ([patterns] if isinstance(patterns, str) else patterns) if patterns else [None]:
        m = re.match(layer_index_regex(p), name)
        if m is not None:
            break
    return int(m.group("idx")) if m else None


def _targeted(cfg: LoraConfig, layer: LayerInfo, output_layers: set[str]) -> bool:
    name = layer.name
    if _excluded(cfg, name):
        return False
    tm = cfg.target_modules
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        return layer.kind.linear_family and name not in output_layers
    if isinstance(tm, str):
        return re.fullmatch(tm, name) is not None
    if not _name_in(tm, name):
        return False
    wanted = cfg.layers_to_transform
    if wanted is None or wanted == []:
        return True
    idx = _layer_index(cfg, name)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def pattern_key(keys, name: str) -> str | None:
    """The first pattern key that matches `name` the way PEFT's `get_pattern_key` does."""
    for key in keys:
        if re.match(pattern_key_regex(key), name):
            return key
    return None


def resolve(layers: list[LayerInfo], cfg: LoraConfig, output_layers: set[str] = frozenset(),
            *, require_match: bool = True) -> dict[str, Resolved]:
    """Apply `cfg`'s rules to `layers`; return `{layer name: Resolved}` in layer order.

    Raises:
        TargetNotFoundError: nothing matched (with the closest layer names), if `require_match`.
        UnsupportedFeatureError: a targeted layer lora_fx cannot adapt (`LayerInfo.unsupported`).

    Example:
        >>> from lora_fx.layers import LayerInfo
        >>> layers = [LayerInfo("model.layers.0.q_proj", "linear", 8, 8)]
        >>> cfg = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
        >>> resolve(layers, cfg)["model.layers.0.q_proj"].r
        2
    """
    if not output_layers and cfg.task_type == "SEQ_CLS":  # PEFT: only when there is no output embedding
        output_layers = {n for n in SEQ_CLS_HEAD_NAMES if any(layer.name == n for layer in layers)}
    out: dict[str, Resolved] = {}
    for layer in layers:
        if layer.name in out or not _targeted(cfg, layer, output_layers):
            continue
        if layer.unsupported is not None:
            raise UnsupportedFeatureError(f"target rules select layer {layer.name!r}, which lora_fx cannot adapt: "
                                          f"{layer.unsupported}. Exclude it (exclude_modules) or target other layers")
        out[layer.name] = resolve_layer(layer, cfg)
    if require_match and not out:
        raise TargetNotFoundError(_no_match_message(layers, cfg))
    return out


# PEFT's names for fused MoE expert weights (3-D parameters); on such models its "all-linear" also
# adapts them, through target_parameters.
FUSED_EXPERT_SUFFIXES = (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")


def refuse_fused_experts(cfg: LoraConfig, parameters: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """With `"all-linear"`, refuse a model with fused expert parameters: PEFT would adapt those as
    well (`target_parameters`), lora_fx cannot yet, and adapting only the linears would differ.

    Raises:
        UnsupportedFeatureError: naming the first such parameter.
    """
    tm = cfg.target_modules
    if not (isinstance(tm, str) and tm.lower() == ALL_LINEAR):
        return
    for name, shape in parameters:
        if len(shape) == 3 and name.endswith(FUSED_EXPERT_SUFFIXES):
            raise UnsupportedFeatureError(
                f"target_modules='all-linear' on a model with fused expert parameters ({name!r}, shape "
                f"{tuple(shape)}): PEFT's all-linear adapts those too (target_parameters), which lora_fx does not "
                "support yet; name the layers to adapt instead (e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj'])")


def resolve_layer(layer: LayerInfo, cfg: LoraConfig) -> Resolved:
    """`layer`'s rank, alpha and scaling under `cfg` (rank_pattern / alpha_pattern applied)."""
    rk = pattern_key(cfg.rank_pattern, layer.name)
    ak = pattern_key(cfg.alpha_pattern, layer.name)
    r = cfg.rank_pattern[rk] if rk is not None else cfg.r
    alpha = cfg.alpha_pattern[ak] if ak is not None else cfg.lora_alpha
    return Resolved(layer, r, alpha, cfg.scaling_for(r, alpha))


def _no_match_message(layers: list[LayerInfo], cfg: LoraConfig) -> str:
    names = [layer.name for layer in layers]
    tm = cfg.target_modules
    probes = [tm] if isinstance(tm, str) else list(tm)
    candidates = sorted(set(names) | {n.rsplit(".", 1)[-1] for n in names})
    close: list[str] = []
    for probe in probes:
        for c in difflib.get_close_matches(str(probe), candidates, n=5, cutoff=0.4):
            if c not in close:
                close.append(c)
    if not names:
        hint = "the model has no adaptable layer (Linear, Conv1D, Embedding, Conv1d/2d/3d)"
    else:
        hint = f"closest layer names: {close[:8] or names[:8]}"
    extra = ""
    if cfg.exclude_modules or cfg.layers_to_transform is not None:
        extra = (f" (after exclude_modules={cfg.exclude_modules!r}, "
                 f"layers_to_transform={cfg.layers_to_transform!r})")
    return f"target_modules={tm!r} matched no adaptable layer{extra}; {hint}"
