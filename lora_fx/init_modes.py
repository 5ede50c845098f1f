"""Initialisation modes (`LoraConfig.init_lora_weights`), one class per mode, as PEFT defines them.

A mode fills the LoRA factors of a new adapter in two steps:

- `init_factors`: what needs no base weight. The plain modes (True, "gaussian", False) are
  complete after it. The base-derived modes draw here what PEFT's layer creation draws (nn.Linear's
  default init of A, B and B's bias), so that the random stream seen by later draws
  (`pissa_niter_K`'s random projections, the next layer) is PEFT's for the same seed.
- `from_base` (modes with `rewrites_base`): compute A and B from the base weight and return the
  base weight rewritten so that the layer's function is unchanged at step 0:
  `W_res + s·B·A = W` for PiSSA / OLoRA; for LoftQ the base becomes the quantized residual and
  `Q + B·A ≈ W` (PEFT's factors carry no scaling, so this holds for `lora_alpha == r`).

The caller (`AdapterSet`) writes the returned weight through the route's `BaseWeights`, so the
attached model's parameter, the program's state or the GraphModule's attribute gets it.

Numbers follow PEFT's `pissa_init` / `olora_init` / `loftq_init` (fp32 math, factors rounded to
the base weight's dtype as PEFT's cast of new adapters to the base layer's dtype does). All math
is in the layer's row layout (one row per output channel, `kind.rows`), which is PEFT's for
`nn.Linear` and for GPT-2's Conv1D under PiSSA; see docs/init.md for where PEFT differs.

Example:
    >>> mode_for("pissa_niter_4").name, mode_for("pissa_niter_4").rewrites_base
    ('pissa_niter_4', True)
    >>> mode_for(True).name
    'True'
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

import torch

from .errors import ConfigError, UnsupportedFeatureError

# A mode reads a `rules.Resolved` (the layer, r, scaling) and a `LayerInfo`; neither is imported:
# `config` imports this module to validate `init_lora_weights`, and those modules import `config`.
Resolved = Any
LayerInfo = Any

# PEFT's LoftQConfig fields and their defaults.
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}
# bitsandbytes' 4-bit block size, as PEFT's LoftQ quantizes (Params4bit's default, no nested statistics).
LOFTQ_BLOCKSIZE = 64

# Modes PEFT has that lora_fx does not implement: they are refused by name, never run as another.
_PEFT_ONLY = {"eva": "EVA", "corda": "CorDA", "orthogonal": "orthogonal", "mica": "MiCA", "lora_ga": "LoRA-GA"}


class InitMode:
    """Base class of the modes; see the module docstring."""

    name: str = ""
    rewrites_base: bool = False  # from_base computes the factors and rewrites the base weight

    @classmethod
    def parse(cls, value: Any) -> InitMode | None:
        """This mode for a config value, or None when the value names another mode."""
        raise NotImplementedError

    def check_config(self, cfg) -> None:
        """Raise `ConfigError` for config fields that do not go with this mode (PEFT's
        `loftq_config` is LoftQ's alone)."""
        if cfg.loftq_config:
            raise ConfigError(f"LoraConfig.loftq_config={cfg.loftq_config!r} is only used with "
                              f"init_lora_weights='loftq' (got init_lora_weights={cfg.init_lora_weights!r}); "
                              "remove it (PEFT drops it with a warning)")

    def layer_problem(self, res: Resolved, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why this mode cannot initialise `res.layer`'s adapter (`shapes`: the variant's tensor
        shapes by PEFT key), or None."""
        return None

    def init_factors(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, res: Resolved,
                     generator: torch.Generator | None = None) -> None:
        """Fill A, B (and lora_B's bias) without the base weight, in place."""
        raise NotImplementedError

    def from_base(self, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, res: Resolved, cfg,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Set A and B from the base `weight` (whole, stored layout); return the rewritten weight
        (same shape, dtype and device)."""
        raise NotImplementedError(f"init mode {self.name!r} does not read the base weight")

    def conversion_problem(self) -> str | None:
        """Why an adapter trained from this initialisation cannot be saved as a plain LoRA relative
        to its initial values (`save_adapter(..., initial_adapter=...)`), or None."""
        return None

    def __repr__(self) -> str:
        return f"InitMode({self.name})"


# -- plain modes -----------------------------------------------------------------------------------
class _PlainMode(InitMode):
    """Modes that need no base weight. Embeddings (lookup kinds): A zero, B ~ N(0, 1), as PEFT's
    `reset_lora_parameters` does for every mode but False."""

    def init_factors(self, a, b, bias, res, generator=None):
        with torch.no_grad():
            if res.layer.kind.lookup:
                self.init_lookup(a, b, generator)
                return
            self.init_matrix(a, b, bias, res, generator)

    def init_lookup(self, a, b, generator) -> None:
        a.zero_()
        b.normal_(generator=generator)

    def init_matrix(self, a, b, bias, res, generator) -> None:
        raise NotImplementedError


class KaimingInit(_PlainMode):
    """`True` (the default): A Kaiming-uniform as nn.Linear's weight, B zero: a no-op at step 0."""

    name = "True"

    @classmethod
    def parse(cls, value):
        return cls() if value is True else None

    def init_matrix(self, a, b, bias, res, generator):
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        _zero(b, bias)


class GaussianInit(_PlainMode):
    """`"gaussian"`: A ~ N(0, 1/r), B zero."""

    name = "gaussian"

    @classmethod
    def parse(cls, value):
        return cls() if isinstance(value, str) and value.lower() == "gaussian" else None

    def init_matrix(self, a, b, bias, res, generator):
        a.normal_(0.0, 1.0 / res.r, generator=generator)
        _zero(b, bias)


class RandomInit(_PlainMode):
    """`False`: both factors random (nn.Linear's default init): not a no-op, for tests."""

    name = "False"

    @classmethod
    def parse(cls, value):
        return cls() if value is False else None

    def init_lookup(self, a, b, generator):
        a.normal_(generator=generator)
        b.normal_(generator=generator)

    def init_matrix(self, a, b, bias, res, generator):
        _linear_default(a, b, bias, generator)

    def conversion_problem(self):
        return ("init_lora_weights=False starts from random factors on an unchanged base, so B·A − B₀·A₀ is not "
                "what the adapter adds to the base; save it without initial_adapter")


def _zero(b: torch.Tensor, bias: torch.Tensor | None) -> None:
    b.zero_()
    if bias is not None:
        bias.zero_()


def kaiming_like_linear(t: torch.Tensor, generator=None) -> None:
    # nn.Linear / nn.ConvNd's default weight init (Kaiming-uniform, a=sqrt(5)): U(±1/sqrt(fan_in)).
    fan_in = t[0].numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    t.uniform_(-bound, bound, generator=generator)


def _linear_default(a, b, bias, generator) -> None:
    """The draws of PEFT's `nn.Linear(in, r)` and `nn.Linear(r, out, bias=lora_bias)`, in its order."""
    with torch.no_grad():
        kaiming_like_linear(a, generator)
        kaiming_like_linear(b, generator)
        if bias is not None:
            bound = 1.0 / math.sqrt(b[0].numel())
            bias.uniform_(-bound, bound, generator=generator)


# -- modes derived from the base weight ------------------------------------------------------------
class _BaseDerivedMode(InitMode):
    """Modes that compute the factors from the base weight and rewrite it (PEFT: Linear layers only)."""

    rewrites_base = True

    def check_config(self, cfg):
        if cfg.alora_invocation_tokens:
            raise ConfigError(f"LoraConfig.init_lora_weights={cfg.init_lora_weights!r} rewrites the base weight so "
                              "that base + adapter computes the original layer; an aLoRA adapter "
                              "(alora_invocation_tokens) is not applied before its invocation tokens, where the "
                              "model would then run on the rewritten weight alone")
        self.check_mode_config(cfg)

    def check_mode_config(self, cfg) -> None:
        """This mode's own fields (`check_config` of the base class: no `loftq_config`)."""
        InitMode.check_config(self, cfg)

    def init_factors(self, a, b, bias, res, generator=None):
        # What PEFT's layer creation draws before its init replaces A and B. lora_B's bias stays
        # zero (PEFT leaves nn.Linear's random bias there, which changes the output at step 0).
        _linear_default(a, b, bias, generator)
        if bias is not None:
            with torch.no_grad():
                bias.zero_()

    def layer_problem(self, res, shapes):
        layer = res.layer
        kind = layer.kind
        why = None
        if kind.module_boundary:
            why = self.quantized_problem(layer)
        elif kind.targets_parameter or kind.lookup or not kind.linear_family:
            why = (f"it is a {layer.class_name or kind.name} layer; PEFT defines {self.name} for linear layers "
                   "(nn.Linear, transformers' Conv1D) only")
        elif layer.weight_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            why = f"its weight is {layer.weight_dtype}; {self.name} needs a float32, float16 or bfloat16 weight"
        else:
            a_key, b_key = kind.factor_keys()
            want = kind.factor_shapes(layer, res.r)
            got = (tuple(shapes.get(a_key, ())), tuple(shapes.get(b_key, ())))
            if got != tuple(tuple(s) for s in want):
                why = (f"this variant's factors have shapes {got}; {self.name} computes full LoRA factors of "
                       f"shapes {tuple(tuple(s) for s in want)}")
            elif res.r > min(layer.in_features, layer.out_features):
                why = (f"r={res.r} exceeds the weight's rank bound min(in, out) = "
                       f"{min(layer.in_features, layer.out_features)}; {self.name} takes r leading components "
                       "of the weight")
        return why

    def quantized_problem(self, layer: LayerInfo) -> str:
        return (f"its base ({layer.class_name}) is quantized; {self.name} needs the unquantized weight (load the "
                "model unquantized, initialise, then quantize the rewritten weights)")

    def conversion_problem(self):
        return None

    def from_base(self, a, b, weight, res, cfg, generator=None):
        kind = res.layer.kind
        w = kind.rows(weight.detach()).to(torch.float32)
        with torch.no_grad():
            factor_a, factor_b, residual = self.decompose(w, res, cfg, generator)
            # PEFT casts a new adapter to the base layer's dtype (then back to fp32 for a half base).
            a.copy_(factor_a.to(weight.dtype).view(a.shape))
            b.copy_(factor_b.to(weight.dtype).view(b.shape))
        return kind.from_rows(residual, weight.shape).to(weight.dtype).contiguous()

    def decompose(self, w: torch.Tensor, res: Resolved, cfg, generator) -> tuple[torch.Tensor, ...]:
        """(A, B, rewritten rows) from the fp32 rows of the weight."""
        raise NotImplementedError


class PissaInit(_BaseDerivedMode):
    """`"pissa"` / `"pissa_niter_K"`: the r principal singular components of W, split evenly
    between the factors and divided by the scaling (`B = U·√(S/s)`, `A = √(S/s)·Vᵀ`); the base
    keeps the rest, `W − s·B·A`. With `_niter_K`, torch's randomized SVD (K subspace iterations)."""

    _PATTERN = re.compile(r"pissa(?:_niter_(\d+))?")

    def __init__(self, niter: int | None = None):
        self.niter = niter
        self.name = "pissa" if niter is None else f"pissa_niter_{niter}"

    @classmethod
    def parse(cls, value):
        if not isinstance(value, str) or not value.startswith("pissa"):
            return None
        match = cls._PATTERN.fullmatch(value)
        if match is None:
            raise ConfigError(f"LoraConfig.init_lora_weights={value!r}: PiSSA is 'pissa' or 'pissa_niter_K' with K a "
                              "non-negative number of subspace iterations (e.g. 'pissa_niter_16')")
        return cls(None if match.group(1) is None else int(match.group(1)))

    def decompose(self, w, res, cfg, generator):
        r, s = res.r, res.scaling
        if self.niter is None:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            with _seeded(generator, w.device):
                u, sv, v = torch.svd_lowrank(w, r, niter=self.niter)
            vh = v.t()
        root = torch.sqrt(sv / s)
        factor_b = u * root
        factor_a = root[:, None] * vh
        return factor_a, factor_b, w - (s * factor_b) @ factor_a


class OloraInit(_BaseDerivedMode):
    """`"olora"`: the QR decomposition of W; `B = Q[:, :r]`, `A = R[:r]`, base `W − s·B·A`."""

    name = "olora"

    @classmethod
    def parse(cls, value):
        return cls() if isinstance(value, str) and value.lower() == "olora" else None

    def quantized_problem(self, layer):
        return (f"its base ({layer.class_name}) is quantized; PEFT dequantizes, decomposes and re-quantizes such "
                "a weight, which lora_fx does not do yet: load the model unquantized, initialise with olora, then "
                "quantize the rewritten weights")

    def decompose(self, w, res, cfg, generator):
        q, r_mat = torch.linalg.qr(w)
        factor_b, factor_a = q[:, :res.r], r_mat[:res.r]
        return factor_a, factor_b, w - (res.scaling * factor_b) @ factor_a


class LoftqInit(_BaseDerivedMode):
    """`"loftq"`: LoftQ (PEFT's `loftq_init`). `loftq_iter` times: quantize the weight minus the
    current low-rank part with bitsandbytes (nf4 in blocks of 64 for 4 bits, row-wise int8 for 8),
    then take the best rank-r approximation of what the quantization lost. The base becomes the
    quantized weight (its dequantized values, in the weight's dtype: quantizing it again with the
    same settings reproduces it), `B·A` the low-rank part, unscaled as PEFT's."""

    name = "loftq"

    @classmethod
    def parse(cls, value):
        return cls() if value == "loftq" else None

    def check_mode_config(self, cfg):
        conf = cfg.loftq_config
        if not conf:
            raise ConfigError("LoraConfig.init_lora_weights='loftq' needs loftq_config (PEFT's LoftQConfig: "
                              "{'loftq_bits': 4, 'loftq_iter': 1})")
        unknown = sorted(set(conf) - set(LOFTQ_DEFAULTS))
        if unknown:
            raise ConfigError(f"LoraConfig.loftq_config: unknown keys {unknown} (known: {sorted(LOFTQ_DEFAULTS)})")
        bits, iters = loftq_settings(conf)
        if bits not in (4, 8):
            raise ConfigError(f"LoraConfig.loftq_config['loftq_bits'] must be 4 (nf4) or 8 (int8), got {bits!r}")
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ConfigError(f"LoraConfig.loftq_config['loftq_iter'] must be a positive integer, got {iters!r}")

    def quantized_problem(self, layer):
        return (f"its base ({layer.class_name}) is already quantized; LoftQ quantizes the weight itself (as PEFT: "
                "pass the unquantized model, save the rewritten weights, and load those quantized). To load a "
                "trained LoftQ adapter onto the quantized model, save its config with init_lora_weights=True, as "
                "PEFT's LoftQ example does")

    def conversion_problem(self):
        return ("LoftQ's base is the quantized residual, not the original weight, so B·A − B₀·A₀ on the original "
                "weight is not the trained model; keep the adapter with its quantized base")

    def from_base(self, a, b, weight, res, cfg, generator=None):
        bits, iters = loftq_settings(cfg.loftq_config)
        kind = res.layer.kind
        with torch.no_grad():
            w = weight.detach().to(torch.float32)
            target = w
            for step in range(iters):
                quantized = quantize_dequantize(target, bits)
                left, right = _best_low_rank(kind.rows(w - quantized), res.r)
                if step + 1 < iters:
                    target = w - kind.from_rows(left @ right, w.shape)
            a.copy_(right.to(weight.dtype).view(a.shape))
            b.copy_(left.to(weight.dtype).view(b.shape))
        return quantized.to(weight.dtype).contiguous()


def loftq_settings(conf: dict) -> tuple[Any, Any]:
    """`(bits, iterations)` of a loftq_config dict, PEFT's LoftQConfig defaults filling what is missing."""
    merged = {**LOFTQ_DEFAULTS, **conf}
    return merged["loftq_bits"], merged["loftq_iter"]


def quantize_dequantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` (fp32, stored layout) quantized as PEFT's LoftQ quantizes, then dequantized (fp32).

    4 bits: nf4 over the flattened tensor in blocks of 64, no nested statistics (bitsandbytes'
    `Params4bit` layout; the flat view also avoids bitsandbytes' CPU dequantization of 2-D tensors,
    which is wrong when the last dimension is not a multiple of the block size). 8 bits: row-wise
    absmax int8 of the fp16 weight (bitsandbytes' `Int8Params`).
    """
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:  # pragma: no cover - bitsandbytes is a test dependency
        raise UnsupportedFeatureError("init_lora_weights='loftq' quantizes with bitsandbytes, which is not "
                                      "installed") from None
    if bits == 4:
        packed, state = bnb_f.quantize_4bit(w.contiguous().reshape(-1), blocksize=LOFTQ_BLOCKSIZE,
                                            compress_statistics=False, quant_type="nf4")
        return bnb_f.dequantize_4bit(packed, state).reshape(w.shape).to(torch.float32)
    codes, stats, _ = bnb_f.int8_vectorwise_quant(w.contiguous().to(torch.float16))
    return bnb_f.int8_vectorwise_dequant(codes, stats).to(torch.float32)


def _best_low_rank(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(L, R)` with `L @ R` the best rank-r approximation of `m`, the singular values split evenly."""
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    root = torch.sqrt(sv[:r])
    return u[:, :r] * root, root[:, None] * vh[:r]


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """torch's global generator, or with `generator` given, a fork of it seeded from `generator`
    (`torch.svd_lowrank` draws from the global one only)."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# -- the registry ---------------------------------------------------------------------------------
_MODES: list[type[InitMode]] = []


def register(mode: type[InitMode]) -> type[InitMode]:
    """Add a mode class; `mode_for` asks each registered class to `parse` a config value."""
    if mode in _MODES:
        raise ValueError(f"init mode {mode.__name__} is registered twice")
    _MODES.append(mode)
    return mode


def mode_for(value: Any) -> InitMode:
    """The mode `init_lora_weights=value` selects.

    Raises:
        UnsupportedFeatureError: a mode PEFT has that lora_fx does not implement.
        ConfigError: a value PEFT does not accept either.

    Example:
        >>> mode_for("olora")
        InitMode(olora)
    """
    for mode in _MODES:
        found = mode.parse(value)
        if found is not None:
            return found
    if isinstance(value, str) and value in _PEFT_ONLY:
        raise UnsupportedFeatureError(f"LoraConfig.init_lora_weights={value!r}: {_PEFT_ONLY[value]} initialisation "
                                      f"is not supported by lora_fx yet; supported: {supported()}")
    raise ConfigError(f"LoraConfig.init_lora_weights must be one of {supported()}, got {value!r}")


def supported() -> str:
    return "True, False, 'gaussian', 'pissa', 'pissa_niter_K', 'olora', 'loftq'"


for _mode in (KaimingInit, GaussianInit, RandomInit, PissaInit, OloraInit, LoftqInit):
    register(_mode)
