"""`torch.nn.Conv{1,2,3}d`: W stored (out, in / groups, *kernel).

PEFT's adapter: `lora_A` a conv (r, in, *kernel) with the base's stride / padding / dilation
(dilation: see docs/design.md decision 5), `lora_B` a 1x1 conv (out, r / groups, 1, ...)
grouped like the base. Transposed convs are not sites.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph_builder import node_value
from .base import LayerKind, ParsedCall, arg, as_tuple

aten = torch.ops.aten

_CONV_OPS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
             torch.nn.functional.conv1d: 1, torch.nn.functional.conv2d: 2, torch.nn.functional.conv3d: 3,
             aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
             aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}


class ConvKind(LayerKind):
    name = "conv"
    module_classes = ("torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.Conv2d",
                      "torch.nn.modules.conv.Conv3d")
    output_channel_dim = 1

    def parse(self, node):
        t = node.target
        if t in _CONV_OPS:
            n = _CONV_OPS[t]
            return ParsedCall(self, 0, arg(node, 1, "weight"), arg(node, 2, "bias"), {
                "stride": as_tuple(arg(node, 3, "stride", 1), n), "padding": as_tuple(arg(node, 4, "padding", 0), n),
                "dilation": as_tuple(arg(node, 5, "dilation", 1), n), "groups": int(arg(node, 6, "groups", 1))})
        if t is aten.convolution.default and not node.args[6]:
            w = node.args[1]
            n = len(node_value(w).shape) - 2 if isinstance(w, fx.Node) and node_value(w) is not None else 2
            return ParsedCall(self, 0, w, node.args[2], {
                "stride": as_tuple(node.args[3], n), "padding": as_tuple(node.args[4], n),
                "dilation": as_tuple(node.args[5], n), "groups": int(node.args[8])})
        return None

    def dims_of_weight(self, weight, extras):
        return dict(in_features=weight.shape[1] * extras["groups"], out_features=weight.shape[0],
                    kernel_size=tuple(weight.shape[2:]))

    def describe_module(self, module):
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return dict(in_features=module.in_channels, out_features=module.out_channels,
                    kernel_size=tuple(module.kernel_size), stride=tuple(module.stride), padding=padding,
                    dilation=tuple(module.dilation), groups=module.groups)

    def check(self, layer, r, cfg):
        if r % layer.groups != 0:
            return (f"rank {r} is not divisible by the conv's groups={layer.groups}; choose a rank that is "
                    "(rank_pattern can set it per layer) or exclude the layer")
        return None

    def factor_shapes(self, layer, r):
        ones = (1,) * layer.conv_dims
        return (r, layer.in_features, *layer.kernel_size), (layer.out_features, r // layer.groups, *ones)

    def apply_a(self, b, layer, x, a):
        return conv(b, x, a, None, layer.stride, layer.padding, layer.dilation, 1)

    def apply_b(self, b, layer, h, weight_b, bias):
        ones = [1] * layer.conv_dims
        return conv(b, h, weight_b, bias, ones, [0] * layer.conv_dims, ones, layer.groups)

    def apply_base(self, b, layer, x, weight):
        return conv(b, x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)

    def merge_blocker(self, layer):
        if layer.groups > 1:
            # lora_A is a dense conv over all input channels; a grouped base conv cannot hold the
            # cross-group terms of B·A, so no weight of the base's shape computes the sum.
            return f"the base conv has groups={layer.groups} and B·A connects every input channel group"
        return None

    def dora_norm_delta(self, call, layer, a, b, r):
        if layer.groups == 1:
            return None
        # PEFT's DoRA flattens lora_B (out, r/G, 1, …) to (out/G, r) and lora_A (r, in, *k) to
        # (r, in·k), and reads their product (out/G, in·k) in the grouped weight's shape: row o of
        # the result is the (o mod G)-th of the G slices of product row (o div G). That is not the
        # adapter's contribution to channel o (B·A has no grouped form: it reads every input channel),
        # but it is the norm PEFT's adapters are trained under, so it is the one computed here.
        # It has the grouped weight's size (1/G of a dense conv's), and no [out, in·k] tensor arises.
        product = call(aten.mm.default, call(aten.reshape.default, b, [-1, r]),
                       call(aten.reshape.default, a, [r, -1]))
        return call(aten.reshape.default, product, [layer.out_features, -1])

    def rows_node(self, b, layer, weight):
        return b.call(aten.reshape.default, weight, [layer.out_features, -1])

    def channel_of_output(self, b, vec, like):
        rank = len(b.shape_of(like))
        return b.call(aten.reshape.default, vec, [1, -1] + [1] * (rank - 2))

    def magnitude_shape(self, layer):
        return (1, layer.out_features) + (1,) * layer.conv_dims


def conv(b, x, w, bias, stride, padding, dilation, groups):
    """A (not transposed) convolution node, string padding (`"same"`) included."""
    n = len(stride)
    if isinstance(padding, str):
        op = {1: aten.conv1d.padding, 2: aten.conv2d.padding, 3: aten.conv3d.padding}[n]
        return b.call(op, x, w, bias, list(stride), padding, list(dilation), groups)
    return b.call(aten.convolution.default, x, w, bias, list(stride), list(padding), list(dilation),
                  False, [0] * n, groups)
