"""merge / unmerge: the merged graph is the base graph, outputs match, unmerge is bit-exact."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ConvNet, base_state, tiny_bert, tiny_gpt2, tiny_llama, token_input
from torch import nn

import lora_fx
from lora_fx.marks import ADAPTER, has_mark


def _ops(program):
    return [(n.op, str(n.target)) for n in program.graph.nodes]


def _placeholders(program):
    return [n.name for n in program.graph.nodes if n.op == "placeholder"]


class ConvNoGroups(nn.Module):
    """Conv1d, strided + dilated Conv2d with 'same'-free padding, Conv3d: all groups=1."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv3d(2, 4, (1, 2, 2), stride=(1, 1, 2))

    def forward(self, x):  # (B, 4, 16)
        h = torch.relu(self.c1(x))
        h2 = self.c2(h.view(h.shape[0], 6, 4, 4))
        return self.c3(h2.reshape(h2.shape[0], 2, 4, 2, 2)).flatten(1)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8, padding_idx=0)
        self.out = nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.emb(ids))


# name -> (model factory, input, config): every layer type, with rank/alpha patterns
CASES = {
    "llama": (tiny_llama, lambda: (token_input(),),
              dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={r"layers\.0\..*_proj": 4},
                   alpha_pattern={"^model.layers.3.mlp.down_proj": 8})),
    "gpt2_conv1d": (tiny_gpt2, lambda: (token_input(),),
                    dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], use_rslora=True)),
    "bert_embedding": (tiny_bert, lambda: (token_input(),),
                       dict(r=4, target_modules=["word_embeddings", "query", "value"],
                            rank_pattern={"word_embeddings": 2})),
    "embedding": (Embed, lambda: (torch.randint(0, 32, (3, 5)),), dict(r=4, target_modules=["emb", "out"])),
    "conv": (ConvNoGroups, lambda: (torch.randn(2, 4, 16),),
             dict(r=4, target_modules=["c1", "c2", "c3"], rank_pattern={"c3": 2}, alpha_pattern={"c1": 3})),
}


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _build(name, dtype=torch.float32):
    factory, make_inputs, kwargs = CASES[name]
    torch.manual_seed(0)
    model = factory().eval().to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in make_inputs())
    ep = torch.export.export(model, inputs)
    cfg = lora_fx.LoraConfig(init_lora_weights=False, **kwargs)  # random A and B: not a no-op
    return model, inputs, ep, lora_fx.transform(ep, cfg)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exported_program_merge_and_unmerge(name, dtype):
    model, inputs, ep, ep_lora = _build(name, dtype)
    merged = lora_fx.merge(ep_lora)

    # Structure: node for node the base program, same inputs, no adapter nodes.
    assert _ops(merged) == _ops(ep)
    assert _placeholders(merged) == _placeholders(ep)
    assert set(merged.state_dict) == set(ep.state_dict)
    assert not any(has_mark(n, ADAPTER) for n in merged.graph.nodes)

    with torch.no_grad():
        want = _output(ep_lora.module()(*inputs)).float()
        got = _output(merged.module()(*inputs)).float()
        base = _output(ep.module()(*inputs)).float()
    scale = want.abs().max()
    assert (want - base).abs().max() > 1e-2 * scale  # the adapters change the output
    # fp32: merging only reassociates the sum; bf16: the merged weight itself is rounded to bf16.
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (got - want).abs().max() <= tol * scale

    # Unmerge: the adapter program again, with the original weights bit for bit.
    again = lora_fx.unmerge(merged)
    assert _ops(again) == _ops(ep_lora)
    assert set(again.state_dict) == set(ep_lora.state_dict)
    for key, value in ep_lora.state_dict.items():
        assert torch.equal(again.state_dict[key], value), key
        assert again.state_dict[key].dtype == value.dtype
    with torch.no_grad():
        assert torch.equal(_output(again.module()(*inputs)), _output(ep_lora.module()(*inputs)))


def test_merged_weights_computed_in_fp32_and_cast_back():
    model, inputs, ep, ep_lora = _build("llama", torch.bfloat16)
    merged = lora_fx.merge(ep_lora)
    entry = lora_fx.program_adapters.adapters_of(ep_lora).entries["model.layers.1.self_attn.q_proj"]
    key = "model.layers.1.self_attn.q_proj.weight"
    w = ep.state_dict[key]
    a, b = entry.tensors["lora_A.weight"].detach(), entry.tensors["lora_B.weight"].detach()
    expected = (w.float() + float(entry.scaling) * (b.float() @ a.float())).to(torch.bfloat16)
    assert merged.state_dict[key].dtype == torch.bfloat16
    assert torch.equal(merged.state_dict[key], expected)


def test_subtract_mode_unmerges_approximately_and_keeps_no_originals():
    _, inputs, _, ep_lora = _build("llama")
    merged = lora_fx.merge(ep_lora, keep_original=False)
    assert merged.lora_fx_merged.originals is None
    again = lora_fx.unmerge(merged)
    key = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(again.state_dict[key], ep_lora.state_dict[key], rtol=0, atol=1e-6)


def test_merge_leaves_the_adapter_program_untouched():
    _, inputs, _, ep_lora = _build("conv")
    before = {k: v.clone() for k, v in ep_lora.state_dict.items()}
    ops_before = _ops(ep_lora)
    lora_fx.unmerge(lora_fx.merge(ep_lora))
    assert _ops(ep_lora) == ops_before
    assert all(torch.equal(ep_lora.state_dict[k], v) for k, v in before.items())


@pytest.mark.parametrize("how", ["ep.module()", "symbolic_trace"])
def test_graph_module_merge_and_unmerge(how):
    torch.manual_seed(0)
    model = ConvNoGroups().eval()
    x = torch.randn(2, 4, 16)
    if how == "symbolic_trace":
        gm = torch.fx.symbolic_trace(model)
    else:
        gm = torch.export.export(model, (x,)).module()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = lora_fx.LoraConfig(r=4, target_modules=["c1", "c2", "c3"], init_lora_weights=False)
    gm_lora = lora_fx.transform(gm, cfg)
    merged = lora_fx.merge(gm_lora)
    assert _ops(merged) == _ops(gm)
    assert not hasattr(merged, "lora_fx_adapters")
    with torch.no_grad():
        want, got = gm_lora(x), merged(x)
    assert (want - model(x)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    again = lora_fx.unmerge(merged)
    assert _ops(again) == _ops(gm_lora)
    with torch.no_grad():
        assert torch.equal(again(x), gm_lora(x))
    # The caller's model (whose modules a symbolic_trace GraphModule shares) is unchanged.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_backend_merge_switches_graphs_without_recompiling():
    seen = []

    def capture(gm, example_inputs):
        seen.append(sum(has_mark(n, ADAPTER) for n in gm.graph.nodes))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    torch.manual_seed(0)
    model = tiny_llama()
    ids = token_input()
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                             rank_pattern={"q_proj": 2})
    lora = lora_fx.backend(cfg, inner=capture)
    lora.parameters(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    with torch.no_grad():
        unmerged = fast(ids).logits
        assert lora_fx.merge(lora) is lora and lora.merged
        merged = fast(ids).logits
        for _ in range(2):  # switching back and forth compiles nothing more
            lora_fx.unmerge(lora)
            assert torch.equal(fast(ids).logits, unmerged)
            lora_fx.merge(lora)
            assert torch.equal(fast(ids).logits, merged)
    assert lora.graphs_compiled == 2
    assert seen[0] > 0 and seen[1] == 0  # the merged graph has no adapter nodes
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * unmerged.abs().max().item())
    lora_fx.unmerge(lora)
    for key, value in originals.items():
        assert torch.equal(model.state_dict()[key], value), key
    # Eager calls of the model see the merged weights too (they are the model's own parameters).
    lora.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged, rtol=1e-5, atol=1e-5)
    lora.unmerge()


def test_backend_subtract_mode_writes_in_place():
    model = tiny_llama()
    w = model.model.layers[0].mlp.down_proj.weight
    ptr, before = w.data_ptr(), w.detach().clone()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False),
                           inner="aot_eager")
    lora.parameters(model)
    lora.merge(keep_original=False)
    assert w.data_ptr() == ptr and not torch.equal(w, before)
    lora.unmerge()
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=1e-6)


# -- refusals ----------------------------------------------------------------------------------

def test_grouped_conv_cannot_merge_and_says_why():
    ep = torch.export.export(ConvNet().eval(), (torch.randn(2, 4, 16),))
    ep_lora = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["c1", "c2"]))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'c2'.*groups=2"):
        lora_fx.merge(ep_lora)


def test_tied_weight_cannot_merge_and_names_the_other_layer():
    gpt = tiny_gpt2()
    ids = token_input()
    ep_lora = lora_fx.transform(torch.export.export(gpt, (ids,)), lora_fx.LoraConfig(r=2, target_modules=["wte"]))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'transformer.wte'.*shared with.*lm_head"):
        lora_fx.merge(ep_lora)
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["wte"]), inner="aot_eager")
    lora.parameters(gpt)
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'transformer.wte'.*shared with 'lm_head'"):
        lora.merge()
    assert not lora.merged


class BiasNet(nn.Module):
    """Linear and Conv1d with biases (lora_bias folds into them), and a Linear without one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.nobias = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.nobias(torch.relu(self.fc(torch.relu(self.conv(x)).mean(-1))))


@pytest.mark.parametrize("route", ["program", "graph_module", "backend"])
@pytest.mark.parametrize("keep_original", [True, False], ids=["exact", "subtract"])
def test_lora_bias_merges_into_the_base_bias_as_peft_does(tmp_path, route, keep_original):
    from conftest import assert_close, peft_adapter

    torch.manual_seed(0)
    base = BiasNet().eval()
    peft_model, path = peft_adapter(base, tmp_path, r=2, lora_alpha=6, target_modules=["conv", "fc"], lora_bias=True)
    x = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = peft_model(x)
        peft_merged = peft_model.merge_and_unload()
    if route == "backend":
        lora = lora_fx.backend(path, inner="aot_eager")
        lora.parameters(base)
        before = {k: v.detach().clone() for k, v in base.state_dict().items()}
        fast = torch.compile(base, backend=lora, fullgraph=True)
        lora.merge(keep_original=keep_original)
        for name in ("conv.bias", "fc.bias"):
            torch.testing.assert_close(base.state_dict()[name], peft_merged.state_dict()[name], rtol=0, atol=1e-7)
        with torch.no_grad():
            assert_close(fast(x), ref, "backend merged")
        lora.unmerge()
        after = base.state_dict()
    else:
        ep = torch.export.export(base, (x,))
        prog = lora_fx.transform(ep if route == "program" else ep.module(), path)
        merged = lora_fx.merge(prog, keep_original=keep_original)
        run = merged.module() if route == "program" else merged
        if route == "program":
            assert _ops(merged) == _ops(ep)
            for name in ("conv.bias", "fc.bias"):
                torch.testing.assert_close(merged.state_dict[name], peft_merged.state_dict()[name], rtol=0, atol=1e-7)
        with torch.no_grad():
            assert_close(run(x), ref, f"{route} merged")
        again = lora_fx.unmerge(merged)
        before = ep.state_dict
        after = again.state_dict if route == "program" else {k: again.get_parameter(k) for k in before}
    for key, value in before.items():
        if keep_original:
            assert torch.equal(after[key], value), f"{key} not restored bit-exactly"
        else:
            torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("route", ["program", "backend"])
def test_lora_bias_on_a_layer_without_bias_refuses_to_merge_and_changes_nothing(route):
    torch.manual_seed(0)
    base = BiasNet().eval()
    x = torch.randn(2, 4, 7)
    cfg = lora_fx.LoraConfig(r=2, target_modules=["fc", "nobias"], lora_bias=True, init_lora_weights=False)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    match = r"'nobias'.*lora_bias=True and the base layer has no bias"
    if route == "backend":
        lora = lora_fx.backend(cfg, inner="aot_eager")
        lora.parameters(base)
        with pytest.raises(lora_fx.UnsupportedFeatureError, match=match):
            lora.merge()
        assert not lora.merged
    else:
        with pytest.raises(lora_fx.UnsupportedFeatureError, match=match):
            lora_fx.merge(lora_fx.transform(torch.export.export(base, (x,)), cfg))
    assert all(torch.equal(v, before[k]) for k, v in base_state(base).items())


def test_safe_merge_names_the_layer_and_changes_nothing():
    model, inputs, ep, ep_lora = _build("llama")
    entry = lora_fx.program_adapters.adapters_of(ep_lora).entries["model.layers.2.self_attn.v_proj"]
    with torch.no_grad():
        entry.tensors["lora_B.weight"][0, 0] = float("inf")
    with pytest.raises(lora_fx.LoraFxError, match=r"safe_merge.*'model.layers.2.self_attn.v_proj'"):
        lora_fx.merge(ep_lora, safe_merge=True)

    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False),
                           inner="aot_eager")
    lora.parameters(model)
    before = {k: v.clone() for k, v in base_state(model).items()}
    with torch.no_grad():
        lora.adapters.entries["model.layers.3.self_attn.v_proj"].tensors["lora_A.weight"][1, 2] = float("nan")
    with pytest.raises(lora_fx.LoraFxError, match=r"'model.layers.3.self_attn.v_proj'.*NaN/inf"):
        lora.merge(safe_merge=True)
    assert not lora.merged
    assert all(torch.equal(base_state(model)[k], v) for k, v in before.items())


def test_misuse_is_refused_clearly():
    _, _, ep, ep_lora = _build("embedding")
    merged = lora_fx.merge(ep_lora)
    with pytest.raises(lora_fx.LoraFxError, match="already merged"):
        lora_fx.merge(merged)
    with pytest.raises(lora_fx.LoraFxError, match="not made by lora_fx.merge"):
        lora_fx.unmerge(ep_lora)
    with pytest.raises(lora_fx.LoraFxError, match="transformed ExportedProgram"):
        lora_fx.merge(torch.nn.Linear(2, 2))
    with pytest.raises(lora_fx.LoraFxError, match="carries no lora_fx adapters"):
        lora_fx.merge(ep)

    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["out"]), inner="aot_eager")
    with pytest.raises(lora_fx.LoraFxError, match="attach it first"):
        lora.merge()
    lora.parameters(Embed())
    with pytest.raises(lora_fx.LoraFxError, match="not merged"):
        lora.unmerge()
    lora.merge()
    with pytest.raises(lora_fx.LoraFxError, match="unmerge"):
        lora.set_scale(0.5)
    lora.unmerge()
    lora.set_scale(0.5)


def test_save_adapter_from_a_merged_program(tmp_path):
    _, _, _, ep_lora = _build("embedding")
    merged = lora_fx.merge(ep_lora)
    lora_fx.save_adapter(merged, tmp_path / "a")
    lora_fx.save_adapter(ep_lora, tmp_path / "b")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert copy.copy(merged.lora_fx_merged.names) == {"emb": ("emb.weight", None), "out": ("out.weight", None)}


def test_save_from_a_merged_program_writes_the_original_base_embedding(tmp_path):
    from safetensors.torch import load_file

    model = tiny_llama()
    ep = torch.export.export(model, (token_input(),))
    cfg = lora_fx.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False)
    merged = lora_fx.merge(lora_fx.transform(ep, cfg))
    lora_fx.save_adapter(merged, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.model.embed_tokens.base_layer.weight"], model.model.embed_tokens.weight)


def test_a_merged_program_keeps_the_adapter_it_merged(tmp_path):
    # The merge record holds its own copy: loading another adapter into the unmerged program later
    # changes neither what the merged one saves nor how it unmerges (subtract mode).
    _, inputs, _, ep_lora = _build("llama")
    merged = lora_fx.merge(ep_lora, keep_original=False)
    lora_fx.save_adapter(merged, tmp_path / "merged_before")
    other = lora_fx.transform(torch.export.export(tiny_llama().eval(), inputs),
                              lora_fx.LoraConfig(init_lora_weights=False, **{**CASES["llama"][2], "lora_alpha": 99}))
    lora_fx.save_adapter(other, tmp_path / "other")
    lora_fx.load_adapter(ep_lora, tmp_path / "other")
    lora_fx.save_adapter(merged, tmp_path / "merged_after")
    assert (tmp_path / "merged_before" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "merged_after" / "adapter_model.safetensors").read_bytes()
    again = lora_fx.unmerge(merged)
    key = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(again.state_dict[key], tiny_llama().state_dict()[key], rtol=0, atol=1e-6)


def test_backend_save_while_merged_writes_the_original_embedding(tmp_path):
    from safetensors.torch import load_file

    model = tiny_llama()
    original = model.model.embed_tokens.weight.detach().clone()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False),
                           inner="aot_eager")
    lora.parameters(model)
    for keep_original in (True, False):
        lora.merge(keep_original=keep_original)
        lora.save_adapter(tmp_path / "out")
        saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
        torch.testing.assert_close(saved["base_model.model.model.embed_tokens.base_layer.weight"], original,
                                   rtol=0, atol=1e-6)
        lora.unmerge()
