"""`LoraConfig`: PEFT's field names and meanings, read from and written to `adapter_config.json`.

Fields for variants lora_fx does not implement yet are accepted in the file format but raise
`UnsupportedFeatureError` when set to a non-default value: a config is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from . import init_modes
from .errors import AdapterFileError, ConfigError, UnsupportedFeatureError
from .patterns import compile_or_none, layer_index_regex, pattern_key_regex, saved_module_regex

ALL_LINEAR = "all-linear"

# Keys PEFT writes that do not change what the adapter computes.
_INERT_KEYS = {
    "peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "megatron_core",
}

# Keys whose non-default value selects a feature lora_fx does not implement yet: (default test, issue).
_NOT_YET = {
    "layer_replication": "layer_replication",
    "trainable_token_indices": ("trainable_token_indices (training only some embedding rows); to train the whole "
                                "embedding instead, use modules_to_save=['embed_tokens']"),
    "megatron_config": "Megatron parallel layers",
    "eva_config": "EVA initialisation",
    "corda_config": "CorDA initialisation",
    "lora_ga_config": "LoRA-GA initialisation",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "target_modules_to_tie": "target_modules_to_tie",
    "modules_to_tie": "modules_to_tie",
    # True gives a tied output layer (lm_head) the embedding's adapter too: it changes the numbers.
    "ensure_weight_tying": "ensure_weight_tying (adapting a tied lm_head with the embedding's adapter)",
}

# The modules PEFT's task models (PeftModelForSequenceClassification, ...) add to modules_to_save.
_TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                         "QUESTION_ANS": ("qa_outputs",)}


@dataclass
class BdLoraConfig:
    """Block-diagonal LoRA (PEFT's `BdLoraConfig`, the value of `LoraConfig.use_bdlora`).

    Args:
        target_modules_bd_a: Layers whose `lora_A` is block-diagonal (a pattern matches a layer when
            it is a substring of the layer's name, as PEFT matches). Use it for row-parallel layers
            (`o_proj`, `down_proj`).
        target_modules_bd_b: Layers whose `lora_B` is block-diagonal: column-parallel layers
            (`q_proj`, `k_proj`, `v_proj`, `up_proj`, `gate_proj`).
        nblocks: Number of diagonal blocks (the tensor-parallel degree the adapter is meant for).
        match_strict: Every adapted layer must match one of the two lists.

    Example:
        >>> BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2).nblocks
        2
    """

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self) -> None:
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple))
                                      or not all(isinstance(v, str) for v in value)):
                raise ConfigError(f"BdLoraConfig.{name} must be a list of module-name patterns, got {value!r}")
        if not isinstance(self.nblocks, int) or isinstance(self.nblocks, bool) or self.nblocks <= 0:
            raise ConfigError(f"BdLoraConfig.nblocks must be a positive integer, got {self.nblocks!r}")
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ConfigError(f"BdLoraConfig: {sorted(overlap)} are in both target_modules_bd_a and "
                              "target_modules_bd_b; a layer has one block-diagonal factor")

    @classmethod
    def coerce(cls, value: Any) -> BdLoraConfig | None:
        """`use_bdlora` as given (None, a `BdLoraConfig`, PEFT's object, or the dict a saved
        `adapter_config.json` holds) as a `BdLoraConfig`."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"LoraConfig.use_bdlora: unknown keys {unknown} (known: {sorted(known)})")
            return cls(**value)
        if all(hasattr(value, f.name) for f in dataclasses.fields(cls)):  # PEFT's BdLoraConfig
            return cls(**{f.name: getattr(value, f.name) for f in dataclasses.fields(cls)})
        raise ConfigError(f"LoraConfig.use_bdlora must be a BdLoraConfig or a dict of its fields, got {value!r}")


# Fields that select a variant; PEFT allows one at a time.
VARIANT_FIELDS = ("use_dora", "use_qalora", "alora_invocation_tokens", "use_bdlora")


def _is_default(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclass
class LoraConfig:
    """A LoRA adapter configuration with PEFT's field names and semantics.

    Args:
        r: Rank of the update `B @ A`.
        lora_alpha: Scaling numerator; the update is scaled by `lora_alpha / r`
            (or `lora_alpha / sqrt(r)` with `use_rslora`).
        target_modules: Module names to adapt. A list matches a name exactly or as a dotted
            suffix; a string is a full-match regex; `"all-linear"` means every Linear / GPT-2
            Conv1D except the output layer.
        exclude_modules: Names (list: exact or suffix) or regex (string) never adapted.
        lora_dropout: Dropout on the adapter input, applied in training mode only.
        fan_in_fan_out: PEFT's flag for weights stored as (in, out); GPT-2 Conv1D always is.
        bias: `"none"`, `"all"` or `"lora_only"`: which base biases train with the adapter.
        use_rslora: Scale by `lora_alpha / sqrt(r)`.
        init_lora_weights: `True` (A Kaiming-uniform, B zero), `"gaussian"` (A ~ N(0, 1/r)),
            `False` (both random: the adapter is not a no-op; for tests), or a mode derived from
            the base weight, which also rewrites it (docs/init.md): `"pissa"`, `"pissa_niter_K"`
            (randomized SVD, K iterations), `"olora"`, `"loftq"` (with `loftq_config`).
        layers_to_transform: Layer indices (int or list) to adapt.
        layers_pattern: Name(s) of the layer container (e.g. `"layers"`, `"h"`).
        rank_pattern: Regex key -> rank, resolved as PEFT does (`$` implied, dotted prefix).
        alpha_pattern: Regex key -> alpha, resolved the same way.
        lora_bias: Give `lora_B` a trainable bias.
        task_type: PEFT's task type (`"CAUSAL_LM"`, `"SEQ_CLS"`, …). With `"SEQ_CLS"`,
            `"all-linear"` leaves out a top-level `score` / `classifier` head, and, as PEFT's task
            models do, `"SEQ_CLS"` / `"TOKEN_CLS"` add `classifier` and `score` to
            `modules_to_save`, `"QUESTION_ANS"` adds `qa_outputs`.
        modules_to_save: Modules trained in full beside the adapter (a classifier head): each is
            replaced by a trainable copy, saved as `<module>.<param>`, and gets no LoRA. A name
            matches every module whose path ends with it (PEFT's rule).
        loftq_config: PEFT's `LoftQConfig` as a dict, `{"loftq_bits": 4 or 8, "loftq_iter": n}`
            (a `LoftQConfig` object is read as its fields); only with `init_lora_weights="loftq"`.

    Example:
        >>> cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        >>> cfg.scaling_for(8, 16)
        2.0
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    task_type: str | None = None
    # Raw parameters to adapt (fused MoE experts): a name matches if it equals an entry or ends
    # with "." + entry, as PEFT's target_parameters.
    target_parameters: list[str] | None = None
    # Variants (at most one per config, as PEFT).
    use_dora: bool = False
    use_qalora: bool = False
    qalora_group_size: int = 16
    alora_invocation_tokens: list[int] | None = None
    use_bdlora: BdLoraConfig | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    modules_to_save: list[str] | None = None
    loftq_config: dict[str, Any] = field(default_factory=dict)
    # PEFT keys that do not affect the computation, kept for a faithful round trip.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise `ConfigError` / `UnsupportedFeatureError` naming the field."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ConfigError(f"LoraConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        self._check_init_mode()
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if self.target_parameters is not None and (not isinstance(self.target_parameters, list) or not all(
                isinstance(t, str) and t for t in self.target_parameters)):
            raise ConfigError("LoraConfig.target_parameters must be a list of parameter names (e.g. "
                              f"['experts.gate_up_proj']), got {self.target_parameters!r}")
        if self.target_modules is None and self.target_parameters:
            self.target_modules = []
        if self.target_modules is None:
            raise ConfigError("LoraConfig.target_modules is required (a list of names, a regex, or 'all-linear'), "
                              "unless target_parameters names parameters to adapt")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, list) and not self.target_modules and not self.target_parameters:
            raise ConfigError("LoraConfig.target_modules is an empty list")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("LoraConfig.layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("LoraConfig.layers_pattern cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("LoraConfig.layers_pattern is only used together with layers_to_transform")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"LoraConfig.alpha_pattern[{key!r}] must be a number, got {value!r}")
        self._check_patterns()
        self._check_variant_fields()
        for name, feature in _NOT_YET.items():
            value = getattr(self, name, None) if name in _fields() else self.extra.get(name)
            if not _is_default(value):
                raise UnsupportedFeatureError(
                    f"LoraConfig.{name}={value!r}: {feature} is not supported by lora_fx yet"
                )

    def _check_init_mode(self) -> None:
        """`init_lora_weights` names a mode (`init_modes`), and `loftq_config` goes with it."""
        conf = self.loftq_config
        if conf is None:
            conf = self.loftq_config = {}
        if not isinstance(conf, dict):
            fields = {k: getattr(conf, k) for k in init_modes.LOFTQ_DEFAULTS if hasattr(conf, k)}
            if not fields:  # not PEFT's LoftQConfig either
                raise ConfigError(f"LoraConfig.loftq_config must be a dict of LoftQConfig fields "
                                  f"({sorted(init_modes.LOFTQ_DEFAULTS)}), got {conf!r}")
            conf = self.loftq_config = fields
        init_modes.mode_for(self.init_lora_weights).check_config(self)

    def _check_variant_fields(self) -> None:
        self.use_bdlora = BdLoraConfig.coerce(self.use_bdlora)
        group = self.qalora_group_size
        if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
            raise ConfigError(f"LoraConfig.qalora_group_size must be a positive integer, got {group!r}")
        tokens = self.alora_invocation_tokens
        if tokens is not None:
            if isinstance(tokens, tuple):
                tokens = self.alora_invocation_tokens = list(tokens)
            if not isinstance(tokens, list) or not tokens or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
                raise ConfigError("LoraConfig.alora_invocation_tokens must be a non-empty list of token ids, "
                                  f"got {tokens!r}")
        chosen = [name for name in VARIANT_FIELDS if not _is_default(getattr(self, name))]
        if len(chosen) > 1:
            raise ConfigError(f"LoraConfig: {' and '.join(chosen)} are set together; a config selects one variant "
                              "(PEFT has no combination of these either)")

    def saved_module_names(self) -> list[str]:
        """`modules_to_save` with the heads PEFT's task models add for `task_type`.

        Example:
            >>> LoraConfig(target_modules=["query"], task_type="SEQ_CLS").saved_module_names()
            ['classifier', 'score']
        """
        names = list(self.modules_to_save or [])
        for name in _TASK_MODULES_TO_SAVE.get(self.task_type or "", ()):
            if name not in names:
                names.append(name)
        return names

    def _check_patterns(self) -> None:
        """Every regex the rule engine will use compiles, in the form it will be used (rules.py)."""
        tm = self.target_modules
        if isinstance(tm, str) and tm.lower() != ALL_LINEAR:
            _check_regex("target_modules", tm, tm)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules, self.exclude_modules)
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else (self.layers_pattern or [])
        for p in patterns:
            _check_regex("layers_pattern", p, layer_index_regex(p))
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field_name):
                _check_regex(f"{field_name}[{key!r}]", key, pattern_key_regex(key))
        for name in self.modules_to_save or []:
            _check_regex("modules_to_save", name, saved_module_regex(name))

    # -- derived values ----------------------------------------------------------------------
    def scaling_for(self, r: int, alpha: float) -> float:
        """The factor applied to `B @ A x` for a layer of rank `r` and alpha `alpha`."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- PEFT adapter_config.json ------------------------------------------------------------
    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], *, source: str = "adapter_config.json",
                       recorded: bool = False) -> LoraConfig:
        """Build from the dict PEFT writes to `adapter_config.json`.

        Unknown keys are kept when their value is a default (None/False/empty); an unknown key
        with a real value is an error, since ignoring it could change what the adapter means.
        With `recorded`, the dict is one lora_fx wrote itself (`to_peft_dict` of a config it ran,
        kept in a program's marks): unknown keys are kept as they are, as `extra`.
        """
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise UnsupportedFeatureError(f"{source}: peft_type={peft_type!r}; lora_fx reads LORA adapters only")
        known = _fields() - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if data.get("loftq_config") and data.get("init_lora_weights") != "loftq":
            # PEFT's own LoftQ recipe saves `init_lora_weights=True` beside the loftq_config it
            # initialised with; PEFT drops the field when loading, and so do we.
            warnings.warn(f"{source}: loftq_config is ignored, init_lora_weights is "
                          f"{data.get('init_lora_weights')!r} (as PEFT does)", stacklevel=2)
            data = {k: v for k, v in data.items() if k != "loftq_config"}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif recorded or key in _INERT_KEYS or key in _NOT_YET or _is_default(value):
                extra[key] = value
            else:
                raise UnsupportedFeatureError(f"{source}: key {key!r}={value!r} is not understood by lora_fx")
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs[key] = {}
        try:
            return cls(**kwargs, extra=extra)
        except (ConfigError, UnsupportedFeatureError) as e:
            raise type(e)(f"{source}: {e}") from None

    def to_peft_dict(self) -> dict[str, Any]:
        """The dict PEFT's `LoraConfig.from_pretrained` reads."""
        out: dict[str, Any] = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
                               "revision": None, "inference_mode": True}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if isinstance(value, BdLoraConfig) else value
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LoraConfig:
        """Read `adapter_config.json` from an adapter directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "adapter_config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise AdapterFileError(f"no adapter_config.json at {path!r}")
        try:
            with open(file) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise AdapterFileError(f"{file}: not valid JSON ({e})") from None
        return cls.from_peft_dict(data, source=file)


def _check_regex(where: str, pattern: str, used_as: str) -> None:
    error = compile_or_none(used_as)
    if error is not None:
        raise ConfigError(f"LoraConfig.{where}: {pattern!r} is not a valid regular expression ({error})")


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(LoraConfig)}
