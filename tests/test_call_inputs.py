"""The per-call input channel: a variant reads the model's inputs by name and derives values from
them in the graph, in every route, with nothing recompiled when the values change.

The variant here is defined in this file and registered for the test only (a variant is one file
plus one registration): LoRA whose delta applies only at tokens that are not padding (id 0), the
shape of aLoRA's token mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import variants
from lora_fx.errors import LoraFxError
from lora_fx.marks import ADAPTER, get_mark
from lora_fx.variants.lora import LoraVariant

aten = torch.ops.aten


class TokenGatedLora(LoraVariant):
    name = "token_gated_test"
    fallback = False

    def claims(self, cfg):
        return bool(cfg.extra.get("token_gated_test"))

    def emit(self, b, site, res, cfg, params, scale):
        ids = site.call_values.user_input("input_ids", needed_by=f"{site.layer.name} (token-gated LoRA)")

        def mask_of(mb):  # [B, T, 1]: 1 where the token is not padding
            keep = mb.call(aten.ne.Scalar, ids, 0)
            return mb.call(aten.unsqueeze.default, mb.call(aten._to_copy.default, keep, dtype=torch.float32), -1)

        mask = site.call_values.derived("not_padding", mask_of)
        delta = self.adapter_product(b, site.layer, site.x, params, scale)
        return b.call(aten.add.Tensor, site.base_out, b.call(aten.mul.Tensor, delta, mask))


@pytest.fixture(autouse=True)
def gated_variant():
    variants.register(TokenGatedLora())
    yield
    variants.unregister("token_gated_test")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, input_ids):
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids))))


CFG = lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False,
                         extra={"token_gated_test": True})


def reference(model, adapters, ids):
    """The same computation in plain torch: each layer's delta times the not-padding mask."""
    mask = (ids != 0).float().unsqueeze(-1)

    def layer(name, x):
        e = adapters.entries[name]
        a, b = e.tensors["lora_A.weight"], e.tensors["lora_B.weight"]
        return getattr(model, name)(x) + (x @ a.T * e.scaling) @ b.T * mask

    return layer("fc2", torch.relu(layer("fc1", model.emb(ids))))


IDS = [torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8]]), torch.tensor([[0, 0, 0, 9], [1, 0, 2, 0]])]


def test_backend_reads_the_call_input_and_never_recompiles():
    model = Net()
    lora = lora_fx.backend(CFG, inner="aot_eager")
    lora.parameters(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    for ids in IDS:  # other token values, other masks: same graph
        torch.testing.assert_close(fast(ids), reference(model, lora.adapters, ids), rtol=0, atol=1e-6)
    assert lora.graphs_compiled == 1


@pytest.mark.parametrize("route", ["program", "module", "graph_module"])
def test_programs_read_the_call_input(route):
    model = Net()
    ep = torch.export.export(model, (IDS[0],))
    if route == "program":
        out = lora_fx.transform(ep, CFG)
        run = out.module()
    elif route == "module":
        out = run = lora_fx.transform(ep.module(), CFG)
    else:
        out = run = lora_fx.transform(torch.fx.symbolic_trace(model), CFG)
    adapters = lora_fx.program_adapters.adapters_of(out)
    for ids in IDS:
        torch.testing.assert_close(run(ids), reference(model, adapters, ids), rtol=0, atol=1e-6)
    # One mask for the graph, shared by both layers; it belongs to the adapters (merging removes it).
    ne = [n for n in out.graph.nodes if n.target is aten.ne.Scalar]
    assert len(ne) == 1 and get_mark(ne[0], ADAPTER) == "fc1"
    assert len([n for n in out.graph.nodes if n.target is aten.mul.Tensor and get_mark(n, ADAPTER)]) == 2 + 2


def test_a_missing_input_is_named():
    class NoIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc1(x)

    ep = torch.export.export(NoIds(), (torch.randn(2, 8),))
    with pytest.raises(LoraFxError, match=r"fc1 \(token-gated LoRA\) needs the model input 'input_ids'.*\['x'\]"):
        lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["fc1"], extra={"token_gated_test": True}))
