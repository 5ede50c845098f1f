"""Activated LoRA (aLoRA, `alora_invocation_tokens=[...]`): the adapter applies from the invocation on.

Per row of the batch, the adapter's delta is added only at the tokens from the start of the
**last** occurrence of the invocation token sequence in `input_ids` onward; a row without it runs
the base model (PEFT's semantics). Everything before the invocation is the base model's, so the
base model's KV cache of a shared prefix can be reused.

PEFT finds the offsets in Python (`.item()` loops over matches) and applies the adapter by boolean
indexing: neither compiles without graph breaks. Here the offsets are graph values, computed once
per graph from `input_ids` (`call_inputs.CallValues.derived`):

    windows = pad(input_ids, L-1, value=-1).unfold(1, L, 1)       # [B, T, L]: the L tokens at t
    match[b, t] = all_j windows[b, t, j] == tokens[j]
    last[b]     = max_t where(match, t, -1)                        # -1: never invoked
    mask[b, t]  = last[b] >= 0 and t >= last[b]

and the delta is multiplied by the mask: no data-dependent shapes, nothing recompiles when the
invocation moves. Masked-out tokens get `base + 0`: exactly the base model's values.

Generating with a KV cache, a decode step sees only its new tokens, not the invocation. When the
graph has `position_ids` (transformers' `generate` passes them) or `cache_position`, a row whose
positions include 0 starts a sequence (the mask above, from its own tokens); any other row
continues one, and all its tokens follow whether the sequence's invocation was seen, a per-row
bool the route carries from call to call (`CallValues.carried`) — PEFT's behaviour, where the
offsets found in the prompt hold for every generated token. Exported programs carry no state, so
aLoRA there takes whole sequences only (a program with such position inputs is refused).

Only linear layers (Linear, GPT-2 Conv1D, bitsandbytes Linear), as PEFT: the mask is per token,
which needs the layer's input rows to be the model's tokens. Merging is refused: no weight can
express a token-dependent adapter.
"""

from __future__ import annotations

import torch

from ..config import LoraConfig
from ..errors import ConfigError
from ..rules import Resolved
from . import register
from .base import SiteCall
from .lora import LoraVariant, add_to_base, params_dtype

aten = torch.ops.aten
CARRIED_KEY = "alora_invoked"
NEXT_POSITION_KEY = "alora_next_position"
_END = 2**63 - 1  # a slice to the end
# Model inputs that tell a sequence's first call from a continuation (first positions are 0).
POSITION_INPUTS = ("position_ids", "cache_position")


class ALoraVariant(LoraVariant):
    name = "alora"
    fallback = False

    def claims(self, cfg: LoraConfig) -> bool:
        return bool(cfg.alora_invocation_tokens)

    def check(self, res: Resolved, cfg: LoraConfig) -> None:
        super().check(res, cfg)
        kind = res.layer.kind
        if not kind.linear_family or kind.targets_parameter:
            raise ConfigError(f"{res.layer.name}: aLoRA adapts linear layers only (as PEFT), not a {kind.name}: its "
                              "mask is per token, and this layer's input rows are not the model's tokens; exclude it "
                              "from target_modules")

    def baked(self, cfg: LoraConfig) -> str:
        return f"alora_invocation_tokens={list(cfg.alora_invocation_tokens)}"

    def merge_blocker(self, res: Resolved, cfg: LoraConfig) -> str | None:
        return ("aLoRA is token-dependent (the adapter applies only from the invocation tokens on, per row), which "
                "no merged weight can express")

    def emit(self, b, site: SiteCall, res: Resolved, cfg: LoraConfig, params, scale):
        layer = site.layer
        tokens = list(cfg.alora_invocation_tokens)
        values = site.call_values
        mask = values.derived(f"alora_mask:{tokens}", lambda mb: invocation_mask(mb, values, tokens, layer.name))
        out_dtype = b.dtype_of(site.base_out, layer.weight_dtype)
        adapter_dtype = params_dtype(params)
        x = layer.kind.adapter_input(b, site.x, adapter_dtype, layer.weight_dtype,
                                     cfg.lora_dropout if site.training else 0.0)
        # PEFT scales after B when the adapter has a bias or runs in a wider dtype; else the rank-r
        # intermediate is scaled (less work; equal up to rounding, as plain LoRA does).
        scale_early = "lora_B.bias" not in params and adapter_dtype == out_dtype
        delta = self.adapter_product(b, layer, x, params, scale if scale_early else None)
        if not scale_early:
            delta = b.call(aten.mul.Tensor, delta, scale)
        shape = b.shape_of(delta)
        if shape is not None and len(shape) == 3:  # [batch, tokens, features]
            delta = b.call(aten.mul.Tensor, delta, b.cast(b.call(aten.unsqueeze.default, mask, -1), adapter_dtype,
                                                          torch.bool))
        else:  # rows flattened to [batch·tokens, features], or a graph without shapes: flatten, then back
            flat = b.call(aten.reshape.default, delta, [-1, layer.out_features])
            keep = b.cast(b.call(aten.reshape.default, mask, [-1, 1]), adapter_dtype, torch.bool)
            delta = b.call(aten.view_as.default, b.call(aten.mul.Tensor, flat, keep), delta)
        return add_to_base(b, site.base_out, delta, out_dtype, adapter_dtype)


def invocation_mask(b, values, tokens: list[int], layer: str):
    """`[batch, tokens]` bool: where the adapter applies (see the module docstring)."""
    needed_by = f"{layer}: aLoRA (alora_invocation_tokens)"
    ids = values.user_input("input_ids", needed_by=needed_by)
    batch = b.call(aten.sym_size.int, ids, 0)
    match = None  # match[b, t]: the invocation starts at t
    for j, token in enumerate(tokens):
        eq = b.call(aten.eq.Scalar, ids, token)
        if j:  # eq at t + j, False past the end (slice + cat: a pad would pin an exported program's dynamic sizes)
            tail = b.call(aten.new_zeros.default, eq, [batch, j], dtype=torch.bool)
            eq = b.call(aten.cat.default, [b.call(aten.slice.Tensor, eq, 1, j, _END), tail], 1)
        match = eq if match is None else b.call(aten.logical_and.default, match, eq)
    # 0..T-1 without naming a device (graphs without fake values have none to read)
    row = b.call(aten.select.int, ids, 0, 0)
    positions = b.call(aten.sub.Tensor, b.call(aten.cumsum.default, b.call(aten.ones_like.default, row), 0), 1)
    last = b.call(aten.amax.default, b.call(aten.where.ScalarOther, match, positions, -1), [1])  # [B]; -1: none
    found = b.call(aten.ge.Scalar, last, 0)
    after = b.call(aten.ge.Tensor, positions, b.call(aten.unsqueeze.default, last, 1))       # [B, T]
    mask = b.call(aten.logical_and.default, after, b.call(aten.unsqueeze.default, found, 1))
    position_input = next((values.user_inputs[k] for k in POSITION_INPUTS if k in values.user_inputs), None)
    if position_input is None:  # every call is a whole sequence
        return mask
    return _with_carried_state(b, values, ids, position_input, mask, found, needed_by)


def _with_carried_state(b, values, ids, position_input, mask, found, needed_by):
    """`mask` widened by what earlier calls saw, for rows that continue the sequence of the
    previous call: those whose first position is the one that call's last position announced (a
    row at position 0 starts afresh; one at another position, e.g. after a prefix cache the base
    model made, has only its own tokens to go by). Carried: per row, whether the sequence was
    invoked and the position its next token will have."""
    positions = position_input
    if len(b.shape_of(positions) or [None, None]) == 1:  # cache_position: [T], the same for every row
        positions = b.call(aten.unsqueeze.default, positions, 0)
    first = b.call(aten.select.int, positions, 1, 0)                                  # [B] or [1]
    upcoming = b.call(aten.add.Tensor, b.call(aten.select.int, positions, 1, -1), 1)
    starts = b.call(aten.any.dim, b.call(aten.eq.Scalar, positions, 0), 1)
    invoked = values.carried(CARRIED_KEY, batch_of=ids, needed_by=needed_by)
    expected = values.carried(NEXT_POSITION_KEY, batch_of=ids, dtype=torch.int64, needed_by=needed_by)
    continues = b.call(aten.logical_and.default, b.call(aten.logical_not.default, starts),
                       b.call(aten.eq.Tensor, first, expected))
    was_invoked = b.call(aten.logical_and.default, continues, invoked)
    values.carry_forward(CARRIED_KEY, b.call(aten.logical_or.default, was_invoked, found))
    values.carry_forward(NEXT_POSITION_KEY, b.call(aten.add.Tensor, b.call(aten.zeros_like.default, expected),
                                                   upcoming))
    return b.call(aten.logical_or.default, mask, b.call(aten.unsqueeze.default, was_invoked, 1))


register(ALoraVariant())
