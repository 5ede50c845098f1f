"""transformers' `Conv1D` (GPT-2's family): `y = x W + b`, W stored (in, out).

Read as `addmm(bias, x2d, W)` / `mm(x2d, W)` on the untransposed weight (the layer's input is
the 2-D view its forward makes).
"""

from __future__ import annotations

import torch

from .base import LayerKind, OutputColumnsLayout, ParsedCall, arg, untransposed

aten = torch.ops.aten

_ADDMM_OPS = {torch.addmm, aten.addmm.default}


class HFConv1DKind(OutputColumnsLayout, LayerKind):
    name = "hf_conv1d"
    module_classes = ("transformers.pytorch_utils.Conv1D",)
    linear_family = True
    rows_flattened = True

    def parse(self, node):
        t = node.target
        if t in _ADDMM_OPS:
            mat2 = arg(node, 2, "mat2")
            return ParsedCall(self, 1, mat2, arg(node, 0, "input")) if untransposed(mat2) is None else None
        if t is aten.mm.default:
            mat2 = arg(node, 1, "mat2")
            return ParsedCall(self, 0, mat2) if untransposed(mat2) is None else None
        return None

    def dims_of_weight(self, weight, extras):
        return dict(in_features=weight.shape[0], out_features=weight.shape[1])

    def describe_module(self, module):
        return dict(in_features=module.weight.shape[0], out_features=module.weight.shape[1])

    def apply_base(self, b, layer, x, weight):
        return b.call(aten.mm.default, x, weight)
