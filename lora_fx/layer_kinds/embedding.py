"""`torch.nn.Embedding`: `y = W[idx]`, W stored (num_embeddings, dim).

PEFT's adapter: `lora_embedding_A` (r, num_embeddings) looked up like the base (transposed,
with the base's padding_idx), then `lora_embedding_B` (dim, r) as a linear; no dropout, and the
input (indices) is never cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LayerKind, OutputColumnsLayout, ParsedCall, arg

aten = torch.ops.aten


class EmbeddingKind(OutputColumnsLayout, LayerKind):  # output channels: the columns
    name = "embedding"
    module_classes = ("torch.nn.modules.sparse.Embedding",)
    lookup = True

    def parse(self, node):
        if node.target is F.embedding:
            return ParsedCall(self, 0, arg(node, 1, "weight"), extras={"padding_idx": arg(node, 2, "padding_idx")})
        if node.target is aten.embedding.default:
            pad = arg(node, 2, "padding_idx", -1)
            return ParsedCall(self, 1, arg(node, 0, "weight"), extras={"padding_idx": None if pad == -1 else pad})
        return None

    def dims_of_weight(self, weight, extras):
        return dict(in_features=weight.shape[0], out_features=weight.shape[1])

    def describe_module(self, module):
        return dict(in_features=module.weight.shape[0], out_features=module.weight.shape[1],
                    padding_idx=module.padding_idx)

    def check(self, layer, r, cfg):
        if cfg.lora_bias:
            return "lora_bias=True is not supported for Embedding layers (as in PEFT)"
        return None

    def adapter_input(self, b, x, adapter_dtype, weight_dtype, dropout):
        return x  # indices: never cast, no dropout (as PEFT)

    def factor_keys(self):
        return "lora_embedding_A", "lora_embedding_B"

    def apply_a(self, b, layer, x, a):
        pad = -1 if layer.padding_idx is None else layer.padding_idx
        return b.call(aten.embedding.default, b.call(aten.t.default, a), x, pad)

    def apply_base(self, b, layer, x, weight):
        pad = -1 if layer.padding_idx is None else layer.padding_idx
        return b.call(aten.embedding.default, weight, x, pad)
