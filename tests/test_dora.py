"""DoRA: parity with PEFT's DoRA for every site type (forward; grads of A, B and magnitude), through
the backend (fullgraph, both lowerings) and transform(ep); the factored norm; merging."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, base_state, peft_adapter_grads, tiny_gpt2, tiny_llama, token_input
from torch import nn

import lora_fx
from lora_fx.variants import dora as dora_variant


class ConvNoGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(2, 4, (1, 2, 2), stride=(1, 1, 2), bias=False)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h2 = self.c2(h.view(h.shape[0], 6, 4, 4))
        return self.c3(h2.reshape(h2.shape[0], 2, 4, 2, 2)).flatten(1) + h2.mean()


class EmbedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8, padding_idx=0)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 4, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


def _conv():
    torch.manual_seed(0)
    return ConvNoGroups().eval()


def _embed():
    torch.manual_seed(0)
    return EmbedLinear().eval()


# name -> (factory, input, PEFT config kwargs, output extractor); every site type
CASES = {
    "llama_linear": (tiny_llama, token_input,
                     dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={r"layers\.0\..*_proj": 4}),
                     lambda o: o.logits),
    "gpt2_conv1d_embedding": (tiny_gpt2, token_input,
                              dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj", "wte"],
                                   use_rslora=True),
                              lambda o: o.logits),
    "conv123": (_conv, lambda: torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1)),
                dict(r=4, lora_alpha=8, target_modules=["c1", "c2", "c3"]), lambda o: o),
    "embedding_linear": (_embed, lambda: torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(2)),
                         dict(r=4, lora_alpha=4, target_modules=["emb", "fc", "head"]), lambda o: o),
}


def _peft_dora(name, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    factory, make_input, kwargs, extract = CASES[name]
    base = factory()
    torch.manual_seed(123)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(use_dora=True, init_lora_weights=False,
                                                                    **kwargs)).eval()
    with torch.no_grad():  # B nonzero; magnitudes moved off their init so that g != 1
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
            elif "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    path = tmp_path / f"{name}_dora"
    peft_model.save_pretrained(path)
    x = make_input()
    out = extract(peft_model(x))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * w).sum().backward()
    return base, path, x, out.detach(), w, peft_adapter_grads(peft_model)


def _check(named, ref_grads, route):
    named = dict(named)
    assert set(named) == set(ref_grads), sorted(set(named) ^ set(ref_grads))[:5]
    assert any(k.endswith("lora_magnitude_vector") for k in named)
    for key, p in named.items():
        assert p.grad is not None, f"{route}: no grad for {key}"
        assert_close(p.grad, ref_grads[key], f"{route}: grad of {key}")


@pytest.fixture(params=["aten", "ops"])
def lowering(request, monkeypatch):
    """aten: the CPU lowering (reference math as aten ops); ops: the lora_fx:: custom ops."""
    monkeypatch.setattr(dora_variant, "USE_OPS", "never" if request.param == "aten" else "always")
    return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_backend_matches_peft_dora(name, tmp_path, lowering):
    base, path, x, ref, w, ref_grads = _peft_dora(name, tmp_path)
    extract = CASES[name][3]
    seen = []

    def count(gm, example_inputs):
        seen.append(sum(str(n.target).startswith("lora_fx.") for n in gm.graph.nodes))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    lora = lora_fx.backend(path, inner=count)
    lora.parameters(base)
    out = extract(torch.compile(base, backend=lora, fullgraph=True)(x))
    assert_close(out, ref, f"{name} backend ({lowering}) forward")
    (out * w).sum().backward()
    _check(lora.named_parameters(), ref_grads, f"{name} backend ({lowering})")
    assert len(seen) == 1
    assert (seen[0] > 0) == (lowering == "ops")


@pytest.mark.parametrize("name", list(CASES))
def test_exported_program_matches_peft_dora(name, tmp_path):
    base, path, x, ref, w, ref_grads = _peft_dora(name, tmp_path)
    extract = CASES[name][3]
    ep = lora_fx.transform(torch.export.export(base, (x,)), path, train=True)
    module = ep.module()
    out = extract(module(x))
    assert_close(out, ref, f"{name} transform(ep) forward")
    (out * w).sum().backward()
    _check({k: module.get_parameter(k) for k in ref_grads}.items(), ref_grads, f"{name} transform(ep)")


def test_fresh_dora_adapter_is_a_no_op_and_saves_as_peft(tmp_path):
    import peft
    from safetensors.torch import load_file

    model = tiny_llama()
    ids = token_input()
    with torch.no_grad():
        want = model(ids).logits
    cfg = lora_fx.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True)
    lora = lora_fx.backend(cfg, inner="aot_eager")
    lora.parameters(model)
    with torch.no_grad():
        got = torch.compile(model, backend=lora, fullgraph=True)(ids).logits
    assert_close(got, want, "fresh DoRA (B = 0, m = ‖W‖)")
    lora.save_adapter(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    torch.testing.assert_close(saved[key], model.model.layers[0].self_attn.q_proj.weight.norm(dim=1))
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert reloaded.peft_config["default"].use_dora


def test_factored_norm_equals_dense_norm_and_never_builds_out_by_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40))
    ep = torch.export.export(model, (torch.randn(3, 48),))
    cfg = lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    ep2 = lora_fx.transform(ep, cfg)
    entry = lora_fx.program_adapters.adapters_of(ep2).entries["0"]
    a, b = entry.tensors["lora_A.weight"].detach(), entry.tensors["lora_B.weight"].detach()
    dense = (model[0].weight + 2.0 * b @ a).norm(dim=1)
    # the magnitude was initialised from the dense norm; the graph's factored norm must agree
    torch.testing.assert_close(entry.tensors["lora_magnitude_vector"].detach(), dense)
    from lora_fx.marks import ADAPTER, has_mark

    views = {torch.ops.aten.detach.default, torch.ops.aten.t.default, torch.ops.aten.reshape.default,
             torch.ops.aten.view.default}
    adapter_nodes = [n for n in ep2.graph.nodes
                     if has_mark(n, ADAPTER) and isinstance(n.meta.get("val"), torch.Tensor)]
    allocating = [tuple(n.meta["val"].shape) for n in adapter_nodes if n.target not in views]
    assert (40, 48) not in allocating and (48, 40) not in allocating, "the norm path built an [out, in] tensor"
    assert (40, 4) in allocating and (4, 4) in allocating  # W·Aᵀ and A·Aᵀ
    # the only [out, in]-shaped adapter nodes are aliases of the weight itself
    assert all(n.target in views for n in adapter_nodes if tuple(n.meta["val"].shape) == (40, 48))
    # g = m / ‖W + sBA‖ = 1 at init: the output is the plain LoRA output
    x = torch.randn(3, 48)
    with torch.no_grad():
        want = model(x) + 2.0 * (x @ a.t() @ b.t())
        torch.testing.assert_close(ep2.module()(x), want, rtol=1e-5, atol=1e-5)


def test_dora_on_grouped_convs_runs_and_refuses_merging():
    # Grouped convs run PEFT's DoRA (parity in tests/test_dora_grouped_conv.py); like PEFT, they do not merge.
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    ep = torch.export.export(net, (torch.randn(1, 4, 5, 5),))
    ep_dora = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'0'.*groups=2"):
        lora_fx.merge(ep_dora)


@pytest.mark.parametrize("name", ["llama_linear", "gpt2_conv1d_embedding", "conv123", "embedding_linear"])
def test_dora_merge_and_exact_unmerge(name, tmp_path):
    base, path, x, ref, _, _ = _peft_dora(name, tmp_path)
    extract = CASES[name][3]
    if name == "gpt2_conv1d_embedding":  # wte is tied to lm_head: merging it is refused; merge the rest
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        torch.manual_seed(5)
        pm = get_peft_model(copy.deepcopy(base), PeftLoraConfig(use_dora=True, init_lora_weights=False, r=4,
                                                                target_modules=["c_attn", "c_fc", "c_proj"]))
        pm.save_pretrained(tmp_path / "notied")
        path = tmp_path / "notied"
        with torch.no_grad():
            ref = extract(pm.eval()(x))
    ep = lora_fx.transform(torch.export.export(base, (x,)), path)
    merged = lora_fx.merge(ep)
    with torch.no_grad():
        got = extract(merged.module()(x))
    assert_close(got, ref, f"{name} merged DoRA")
    again = lora_fx.unmerge(merged)
    assert all(torch.equal(again.state_dict[k], v) for k, v in ep.state_dict.items())
    # subtract mode: the norm factor of the merge is kept (as PEFT does), W = W'/g - s·B·A
    approx = lora_fx.unmerge(lora_fx.merge(ep, keep_original=False))
    for key, value in ep.state_dict.items():
        torch.testing.assert_close(approx.state_dict[key], value, rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        assert_close(extract(approx.module()(x)), ref, f"{name} DoRA after subtract-mode unmerge", rel=1e-4)


@pytest.mark.parametrize("route", ["backend", "graph_module"])
def test_dora_subtract_mode_merge_unmerges(route, tmp_path):
    base, path, x, ref, _, _ = _peft_dora("llama_linear", tmp_path)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    if route == "backend":
        lora = lora_fx.backend(path, inner="aot_eager")
        lora.parameters(base)
        fast = torch.compile(base, backend=lora, fullgraph=True)
        lora_fx.merge(lora, keep_original=False)
        with torch.no_grad():
            assert_close(fast(x).logits, ref, "merged in place")
        lora_fx.unmerge(lora)
        for key, value in base_state(base).items():
            torch.testing.assert_close(value, before[key], rtol=1e-5, atol=1e-6, msg=key)
        with torch.no_grad():
            assert_close(fast(x).logits, ref, "unmerged", rel=1e-4)
    else:
        gm = lora_fx.transform(torch.export.export(base, (x,)).module(), path)
        again = lora_fx.unmerge(lora_fx.merge(gm, keep_original=False))
        with torch.no_grad():
            assert_close(again(x).logits, ref, "graph module after subtract-mode unmerge", rel=1e-4)
