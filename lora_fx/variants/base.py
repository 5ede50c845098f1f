"""The variant protocol: the graph form of PEFT's `LoraVariant`.

A variant says which tensors an adapted layer needs (`tensors`), how to initialise them
(`init`), and which nodes compute the layer's new output (`emit`). The core pass owns
everything else: finding sites, making adapter tensors graph inputs, replacing uses.

Designed for the variants to come:
- DoRA needs the base output and a magnitude vector: `emit` receives `site.base_out` and any
  tensor `tensors` declared (e.g. `lora_magnitude_vector`).
- QALoRA pools the input: `emit` receives `site.x` and builds whatever it needs from it.
- aLoRA needs a mask from `input_ids`: `SiteCall.graph_inputs` gives the user inputs.
- BdLoRA declares block-diagonal shapes in `tensors` and emits an einsum or a custom op.
- Raw-parameter targets: `SiteCall.kind == "parameter"` with `site.weight` the parameter node.
`merged_weight` returns the merged weight or None when a variant cannot merge (aLoRA, QALoRA);
the merge pass (separate issue) turns None into an error naming the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

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
        graph_inputs: user-input placeholders, for variants that read e.g. input_ids.
    """

    layer: LayerInfo
    x: fx.Node
    base_out: fx.Node
    training: bool
    graph_inputs: list[fx.Node] = field(default_factory=list)


class Variant:
    """Base class; subclasses override the methods below."""

    name: str = ""

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

    def merged_weight(self, weight: torch.Tensor, tensors: dict[str, torch.Tensor], scaling: float,
                      layer: LayerInfo) -> torch.Tensor | None:
        """`W'` such that the base layer with `W'` equals the adapted layer; None: cannot merge."""
        return None

