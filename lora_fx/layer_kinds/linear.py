"""`torch.nn.Linear`: `y = x Wᵀ + b`, W stored (out, in).

Read as `F.linear` / `aten.linear`, and as the decomposed forms `run_decompositions()` and
hand-written models produce: `addmm` / `mm` / `matmul` on a transposed weight, `bmm` on a
transposed weight broadcast over batch dims.
"""

from __future__ import annotations

import operator

import torch

from .base import LayerKind, ParsedCall, arg, broadcast_weight, untransposed

aten = torch.ops.aten

_LINEAR_OPS = {torch._C._nn.linear, aten.linear.default}
_ADDMM_OPS = {torch.addmm, aten.addmm.default}
_MATMUL_OPS = {aten.matmul.default, torch.matmul, operator.matmul}


class LinearKind(LayerKind):
    name = "linear"
    module_classes = ("torch.nn.modules.linear.Linear",)
    linear_family = True

    def parse(self, node):
        t = node.target
        if t in _LINEAR_OPS:
            return ParsedCall(self, 0, arg(node, 1, "weight"), arg(node, 2, "bias"))
        if t in _ADDMM_OPS:
            w = untransposed(arg(node, 2, "mat2"))
            return ParsedCall(self, 1, w, arg(node, 0, "input")) if w is not None else None
        if t is aten.mm.default:
            w = untransposed(arg(node, 1, "mat2"))
            return ParsedCall(self, 0, w) if w is not None else None
        if t is aten.bmm.default:
            w = broadcast_weight(node.args[1])
            return ParsedCall(self, 0, w) if w is not None else None
        if t in _MATMUL_OPS:
            w = untransposed(node.args[1] if len(node.args) > 1 else node.kwargs.get("other"))
            return ParsedCall(self, 0, w) if w is not None else None
        return None

    def dims_of_weight(self, weight, extras):
        return dict(in_features=weight.shape[1], out_features=weight.shape[0])

    def describe_module(self, module):
        return dict(in_features=module.weight.shape[1], out_features=module.weight.shape[0])

    def apply_base(self, b, layer, x, weight):
        return b.call(aten.linear.default, x, weight)
