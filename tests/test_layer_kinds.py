"""Layer kinds are registered objects: a new kind is one class plus one `register` call, and then
find_targets, the rules, both variants and merging handle it without an edit.

The kind here is defined in this file: a projection that stores its weight (in, out) and is
called as `x @ W` (a 3-D matmul, which neither Linear nor Conv1D reads)."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import layer_kinds
from lora_fx.layer_kinds.base import LayerKind, OutputColumnsLayout, ParsedCall, untransposed

aten = torch.ops.aten


class InOutProj(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)

    def forward(self, x):
        return x @ self.weight


class InOutKind(OutputColumnsLayout, LayerKind):
    name = "in_out_test"
    module_classes = (f"{InOutProj.__module__}.{InOutProj.__qualname__}",)
    linear_family = True

    def parse(self, node):
        if node.target in (aten.matmul.default, torch.matmul, operator.matmul) and untransposed(node.args[1]) is None:
            return ParsedCall(self, 0, node.args[1])
        return None

    def dims_of_weight(self, weight, extras):
        return dict(in_features=weight.shape[0], out_features=weight.shape[1])

    def describe_module(self, module):
        return self.dims_of_weight(module.weight, {})

    def apply_base(self, b, layer, x, weight):
        return b.call(aten.matmul.default, x, weight)


@pytest.fixture(autouse=True)
def in_out_kind():
    layer_kinds.register(InOutKind())
    yield
    layer_kinds.unregister("in_out_test")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = InOutProj(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def _reference(model, adapters, x, dora=False):
    e = adapters.entries["proj"]
    a, b, s = e.tensors["lora_A.weight"], e.tensors["lora_B.weight"], e.scaling
    w = model.proj.weight
    if dora:  # PEFT's DoRA on the effective weight W + s·(B A)ᵀ, per output column
        full = w + s * (b @ a).t()
        g = e.tensors["lora_magnitude_vector"] / full.norm(dim=0).detach()
        h = (x @ full) * g
    else:
        h = x @ w + (x @ a.t() * s) @ b.t()
    return model.head(torch.relu(h))


@pytest.mark.parametrize("dora", [False, True])
def test_a_registered_kind_is_adapted_on_every_route_and_merges(dora):
    model = Net()
    ep = torch.export.export(model, (X,))
    # "all-linear" counts the new kind as a linear layer.
    every = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(lora_fx.program_adapters.adapters_of(every).entries) == ["head", "proj"]
    cfg = lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], use_dora=dora, init_lora_weights=False)
    ep2 = lora_fx.transform(ep, cfg)
    adapters = lora_fx.program_adapters.adapters_of(ep2)
    assert str(adapters.entries["proj"].resolved.layer.kind) == "in_out_test"
    with torch.no_grad():
        for t in adapters.entries["proj"].tensors.values():
            if t.dim() == 1:  # DoRA's magnitude, moved off its init so that g != 1
                t.mul_(torch.linspace(0.7, 1.3, t.numel()))
        torch.testing.assert_close(ep2.module()(X), _reference(model, adapters, X, dora), rtol=1e-5, atol=1e-5)
        merged = lora_fx.merge(ep2)
        torch.testing.assert_close(merged.module()(X), ep2.module()(X), rtol=1e-5, atol=1e-5)
        assert torch.equal(lora_fx.unmerge(merged).module()(X), ep2.module()(X))

    lora = lora_fx.backend(cfg, inner="aot_eager")
    lora.parameters(model)
    for key, t in lora.adapters.entries["proj"].tensors.items():
        t.data.copy_(adapters.entries["proj"].tensors[key])
    with torch.no_grad():
        out = torch.compile(model, backend=lora, fullgraph=True)(X)
    torch.testing.assert_close(out, _reference(model, lora.adapters, X, dora), rtol=1e-5, atol=1e-5)
