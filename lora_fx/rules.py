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

import dataclasses
import difflib
import re
from dataclasses import dataclass

from .config import ALL_LINEAR, LoraConfig
from .errors import ConfigError, TargetNotFoundError, UnsupportedFeatureError
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
    if layer.kind.targets_parameter:  # PEFT's target_parameters: exact name or "." suffix, nothing else
        return _name_in(cfg.target_parameters or (), name)
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
            what = "target_parameters select parameter" if layer.kind.targets_parameter else "target rules select layer"
            raise UnsupportedFeatureError(f"{what} {layer.name!r}, which lora_fx cannot adapt: "
                                          f"{layer.unsupported}. Exclude it (exclude_modules) or target other layers")
        out[layer.name] = resolve_layer(layer, cfg)
    _refuse_module_and_parameter(out)
    if require_match:
        params = [layer.name for layer in layers if layer.kind.targets_parameter]
        for entry in cfg.target_parameters or ():
            if not any(_name_in([entry], name) for name in params):
                raise TargetNotFoundError(_no_parameter_message(entry, params))
        if not out:
            raise TargetNotFoundError(_no_match_message(layers, cfg))
    return out


def _refuse_module_and_parameter(resolved: dict[str, Resolved]) -> None:
    """A module adapted by target_modules cannot also have a parameter adapted (PEFT refuses it:
    the parameter's wrapper would wrap the module's)."""
    modules = {name for name, res in resolved.items() if not res.layer.kind.targets_parameter}
    for name, res in resolved.items():
        if res.layer.kind.targets_parameter and res.layer.module_path in modules:
            raise ConfigError(f"target_parameters selects {name!r}, and target_modules selects its module "
                              f"{res.layer.module_path!r}: adapt one or the other (PEFT refuses both as well)")


def _no_parameter_message(entry: str, params: list[str]) -> str:
    candidates = sorted(set(params) | {".".join(p.split(".")[-2:]) for p in params} | {
        p.rsplit(".", 1)[-1] for p in params})
    close = difflib.get_close_matches(entry, candidates, n=6, cutoff=0.4)
    return (f"target_parameters entry {entry!r} matches no parameter (a name matches if it equals the entry or ends "
            f"with '.{entry}'); closest parameter names: {close or sorted(params)[:6]}")


def effective_config(cfg: LoraConfig, layers: list[LayerInfo], output_layers: set[str] = frozenset(),
                     model_type: str | None = None) -> LoraConfig:
    """`cfg` as PEFT rewrites it for a model with fused MoE experts: `"all-linear"` there also
    adapts the experts and the router (`target_parameters`), with the fused gate/up projection at
    twice the rank and alpha. PEFT decides by the transformers model type; without one (a graph),
    by the layout that table describes: 3-D `gate_up_proj` and `down_proj` parameters.

    Example:
        >>> from lora_fx.layers import LayerInfo
        >>> experts = [LayerInfo("m.experts.gate_up_proj", "parameter", 8, 16, num_experts=4,
        ...                      parameter_shape=(4, 16, 8)),
        ...            LayerInfo("m.experts.down_proj", "parameter", 8, 8, num_experts=4, parameter_shape=(4, 8, 8)),
        ...            LayerInfo("m.q_proj", "linear", 8, 8)]
        >>> cfg = effective_config(LoraConfig(r=2, target_modules="all-linear"), experts)
        >>> cfg.target_modules, cfg.target_parameters, list(cfg.rank_pattern.values())
        (['q_proj'], ['down_proj', 'gate.weight', 'gate_up_proj'], [4])
    """
    tm = cfg.target_modules
    if not (isinstance(tm, str) and tm.lower() == ALL_LINEAR) or not _has_fused_experts(layers, model_type):
        return cfg
    leaves = {layer.name.rsplit(".", 1)[-1] for layer in layers
              if layer.kind.linear_family and layer.unsupported is None and layer.name not in output_layers
              and not _excluded(cfg, layer.name)}
    fused = r".*\.gate_up_proj"  # PEFT's key
    return dataclasses.replace(
        cfg, target_modules=sorted(leaves - set(MOE_V4_NAMES)),
        target_parameters=sorted(set(cfg.target_parameters or ()) | set(MOE_TARGET_PARAMETERS)),
        rank_pattern={**cfg.rank_pattern, fused: cfg.r * 2},
        alpha_pattern={**cfg.alpha_pattern, fused: cfg.lora_alpha * 2})


# PEFT's table for transformers v5 MoE models (the families transformers converts as Mixtral or
# Qwen2-MoE): the v4 linear names that became fused parameters, and those parameters. "all-linear"
# targets the parameters instead of the names; gate_up_proj fuses two v4 linears (rank and alpha x2).
MOE_V4_NAMES = ("gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
MOE_TARGET_PARAMETERS = ("gate.weight", "gate_up_proj", "down_proj")
_MOE_FAMILIES = ("mixtral", "qwen2_moe")


def _has_fused_experts(layers: list[LayerInfo], model_type: str | None) -> bool:
    if model_type is not None:
        try:
            from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as families
        except ImportError:  # pragma: no cover - older transformers: no fused experts either
            return False
        return families.get(model_type, model_type) in _MOE_FAMILIES
    by_module: dict[str, set[str]] = {}
    for layer in layers:
        if layer.kind.targets_parameter and len(layer.parameter_shape) == 3:
            by_module.setdefault(layer.module_path, set()).add(layer.name.rsplit(".", 1)[-1])
    return any({"gate_up_proj", "down_proj"} <= leaves for leaves in by_module.values())


def resolve_layer(layer: LayerInfo, cfg: LoraConfig) -> Resolved:
    """`layer`'s rank, alpha and scaling under `cfg` (rank_pattern / alpha_pattern applied)."""
    rk = pattern_key(cfg.rank_pattern, layer.name)
    ak = pattern_key(cfg.alpha_pattern, layer.name)
    r = cfg.rank_pattern[rk] if rk is not None else cfg.r
    alpha = cfg.alpha_pattern[ak] if ak is not None else cfg.lora_alpha
    return Resolved(layer, r, alpha, cfg.scaling_for(r, alpha))


def _no_match_message(layers: list[LayerInfo], cfg: LoraConfig) -> str:
    names = [layer.name for layer in layers if not layer.kind.targets_parameter]
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
