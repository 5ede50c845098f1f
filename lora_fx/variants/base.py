"""The variant protocol: the graph form of PEFT's `LoraVariant`.

A variant says which tensors an adapted layer needs (`tensors`), how to initialise them
(`init`), and which nodes compute the layer's new output (`emit`). The core pass owns
everything else: finding sites, making adapter tensors graph inputs, replacing uses.

Designed for the variants to come:
- DoRA needs the base output and a magnitude vector: `emit` receives `site.base_out` and any
  tensor `tensors` declared (e.g. `lora_magnitude_vector`).
- QALoRA pools the input: `emit` receives `site.x` and builds whatever it needs from it.
- aLoRA needs a mask from `input_ids`: `SiteCall.call_values` (`call_inputs.py`) gives the
  model's inputs by name and builds values derived from them once per graph.
- BdLoRA declares block-diagonal shapes in `tensors` and emits an einsum or a custom op.
- Layer kinds: a variant asks `site.layer.kind` (`layer_kinds/base.py`) for the factors' keys
  and shapes, the nodes of A(x) and B(h), and the weight's layout; it never branches on the kind.
Merging: `merge_blocker` says why a layer cannot merge (None when it can; aLoRA, quantized bases
and grouped convs say why), `merged_weight` / `unmerged_weight` fold the adapter into the base
weight and back by arithmetic (the bit-exact unmerge keeps the original instead), and
`merged_bias` / `unmerged_bias` do the same for an adapter with a bias of its own (lora_bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..call_inputs import CallValues
from ..config import LoraConfig
from ..layers import LayerInfo
from ..rules import Resolved


@dataclass(frozen=True)
class TensorSpec:
    """One adapter tensor: its shape and the PEFT key suffix it is saved under."""

    shape: tuple[int, ...]
    trainable: bool = True


@dataclass
class SiteCall:
    """What `emit` gets to work with at one call site.

    Attributes:
        layer: the layer as found at this call (hyperparameters read from the graph).
        x: the node feeding the layer (indices for an embedding, the 2-D input for Conv1D).
        base_out: the node computing the base layer's output.
        training: whether dropout is active in this graph.
        call_values: the per-call input channel: the model's inputs by name and values derived
            from them (`call_inputs.CallValues`).
        needs_grad: whether gradients may flow through this graph. A variant may emit a faster
            inference-only form when False; both forms must compute the same values.
        weight, bias: the nodes the base call reads its weight and bias from (DoRA's norm and
            bias-free base output); `get_attr`s are added for `call_module` sites.
        base_exclusive: whether `emit` may write its result into `base_out` in place: the graph
            may mutate (a Dynamo graph, not an exported program), `base_out` is a fresh tensor (no
            view of another) and this emit is its only reader once the site is rewritten. False
            wherever several emits read the same base output (`inject_adapter_bank`).
    """

    layer: LayerInfo
    x: fx.Node
    base_out: fx.Node
    training: bool
    call_values: CallValues | None = None
    needs_grad: bool = True
    weight: fx.Node | None = None
    bias: fx.Node | None = None
    base_exclusive: bool = False


class Variant:
    """Base class; subclasses override the methods below."""

    name: str = ""
    fallback: bool = False  # True only for plain LoRA: asked last, claims every config
    needs_base_weight: bool = False  # True: `init_from_base` runs after `init` with the base weight

    # Several named adapters at one site (`passes/inject_adapter_bank.py`):
    zero_neutral: bool = False  # all-zero tensors and scaling leave the base output as it is

    def pads_with_zeros(self, res: Resolved, cfg: LoraConfig) -> bool:
        """Whether zero-padding this layer's tensors (a larger rank) leaves its output unchanged, so
        adapters of different ranks can be stacked into one."""
        return False

    def emit_rows(self, b, site: SiteCall, res: Resolved, cfg: LoraConfig, banks: dict[str, fx.Node],
                  scales: fx.Node, index: fx.Node) -> fx.Node | None:
        """A mixed batch's output from stacked adapters: `banks[key]` is (adapters, *shape), `scales`
        (adapters,), `index` one adapter per row of the batch (-1: none). None: no such form (every
        adapter then runs its own `emit` and each row takes its own)."""
        return None

    def baked(self, cfg: LoraConfig) -> str:
        """The config values this variant builds into graphs as constants (aLoRA's invocation
        tokens), as `field=value` text; an adapter loaded later must have the same ones."""
        return ""

    def init_from_base(self, tensors: dict[str, torch.Tensor], weight: torch.Tensor, res: Resolved,
                       cfg: LoraConfig) -> None:
        """Initialise tensors that depend on the base weight (DoRA's magnitude)."""

    def claims(self, cfg: LoraConfig) -> bool:
        raise NotImplementedError

    def check(self, res: Resolved, cfg: LoraConfig) -> None:
        """Raise a `LoraFxError` naming the layer if this variant cannot adapt it."""

    def tensors(self, res: Resolved, cfg: LoraConfig) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def init(self, tensors: dict[str, torch.Tensor], res: Resolved, cfg: LoraConfig,
             generator: torch.Generator | None = None) -> None:
        raise NotImplementedError

    def emit(self, b, site: SiteCall, res: Resolved, cfg: LoraConfig,
             params: dict[str, fx.Node], scale: fx.Node) -> fx.Node:
        raise NotImplementedError

    # -- merging (lora_fx.merge / unmerge) -------------------------------------------------------
    def merge_blocker(self, res: Resolved, cfg: LoraConfig) -> str | None:
        """Why this layer's adapter cannot be folded into its base weight, or None if it can.

        The merge pass turns a reason into an error naming the layer; variants whose output is
        not a fixed linear map of the input (aLoRA: token-dependent) say so
        here."""
        return f"the {self.name!r} variant has no merge rule"

    def merged_weight(self, weight: torch.Tensor, tensors: dict[str, torch.Tensor], scaling: float,
                      layer: LayerInfo) -> tuple[torch.Tensor, Any]:
        """`(W', undo)`: `W'` (weight's dtype and layout) such that the base layer with `W'` computes
        the adapted layer, computed in fp32; `undo` is what `unmerged_weight` needs besides the
        adapter (None for LoRA; a per-channel vector for DoRA). Default: `W + delta_weight`."""
        delta = self.delta_weight(weight, tensors, scaling, layer)
        return (weight.float() + delta).to(weight.dtype), None

    def unmerged_weight(self, merged: torch.Tensor, tensors: dict[str, torch.Tensor], scaling: float,
                        layer: LayerInfo, undo: Any) -> torch.Tensor:
        """The inverse of `merged_weight` by arithmetic (the subtract mode: not bit-exact)."""
        delta = self.delta_weight(merged, tensors, scaling, layer)
        return (merged.float() - delta).to(merged.dtype)

    def merged_bias(self, bias: torch.Tensor | None, tensors: dict[str, torch.Tensor], scaling: float,
                    layer: LayerInfo) -> torch.Tensor | None:
        """The base bias with the adapter's bias folded in (fp32 math, bias dtype), or None when the
        adapter has no bias of its own (the base bias stays as it is)."""
        return None

    def unmerged_bias(self, merged: torch.Tensor, tensors: dict[str, torch.Tensor], scaling: float,
                      layer: LayerInfo) -> torch.Tensor:
        """The inverse of `merged_bias` by arithmetic."""
        raise NotImplementedError

    def delta_weight(self, weight: torch.Tensor, tensors: dict[str, torch.Tensor], scaling: float,
                     layer: LayerInfo) -> torch.Tensor:
        """The adapter as an fp32 update in the base weight's layout."""
        raise NotImplementedError
