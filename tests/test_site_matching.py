"""Which calls are sites: subclasses of the adaptable layers (export records classes as strings),
the decomposed linear of `run_decompositions()`, and layers lora_fx cannot adapt (quantized),
which are refused by name rather than skipped. Numbers vs PEFT through every route."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    check_grads,
    forward_backward,
    peft_adapter,
    peft_adapter_grads,
    peft_reference,
    raised_while_compiling,
    tiny_llama,
    token_input,
)
from torch import nn

import lora_fx
from lora_fx.marks import ADAPTER, get_mark


class ScaledEmbedding(nn.Embedding):
    """Gemma's `GemmaTextScaledWordEmbedding` pattern: the lookup times an `embed_scale` buffer
    (PEFT multiplies its delta by `embed_scale` too)."""

    def __init__(self, num, dim, embed_scale):
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class TransposedLinear(nn.Linear):
    """Falcon's `FalconLinear`: `x @ W.T + b` written out."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class MyConv(nn.Conv1d):
    pass


def _subclass_model():
    class LocalLinear(nn.Linear):  # `<locals>` in its name: export's class string cannot be imported
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = ScaledEmbedding(16, 8, 3.0)
            self.conv = MyConv(8, 8, 3, padding=1)
            self.a = TransposedLinear(8, 8)
            self.b = LocalLinear(8, 4)

        def forward(self, ids):
            h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
            return self.b(torch.relu(self.a(h)))

    torch.manual_seed(0)
    return Net().eval()


TARGETS = ["emb", "conv", "a", "b"]


@pytest.mark.parametrize("route", ["program", "graph_module", "backend"])
def test_subclasses_of_adaptable_layers_are_sites(tmp_path, route):
    base = _subclass_model()
    peft_model, path = peft_adapter(base, tmp_path, r=2, lora_alpha=4, target_modules=TARGETS)
    x = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = forward_backward(peft_model, x)
    ref_grads = peft_adapter_grads(peft_model)
    if route == "backend":
        lora = lora_fx.backend(path, inner="aot_eager")
        lora.parameters(base)
        out = forward_backward(torch.compile(base, backend=lora, fullgraph=True), x)
        named = dict(lora.named_parameters())
    else:
        ep = torch.export.export(base, (x,))
        prog = lora_fx.transform(ep if route == "program" else ep.module(), path)
        assert sorted({get_mark(n, ADAPTER) for n in prog.graph.nodes} - {None}) == sorted(TARGETS)
        module = prog.module() if route == "program" else prog
        out = forward_backward(module, x)
        named = {n: p for n, p in module.named_parameters() if "lora_" in n}
        named = {k.replace("lora_fx_adapters.", "").replace("__", "."): v for k, v in named.items()} \
            if route == "graph_module" else named
    assert_close(out, ref, f"{route} forward")
    if route != "graph_module":
        check_grads(named, ref_grads, route)


def _bart(name):
    from transformers import BartConfig, BartModel, M2M100Config, M2M100Model

    torch.manual_seed(0)
    common = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=64, max_position_embeddings=32, dropout=0.0,
                  use_cache=False)
    if name == "bart":
        return BartModel(BartConfig(scale_embedding=True, **common)).eval()
    return M2M100Model(M2M100Config(**common)).eval()


@pytest.mark.parametrize("name", ["bart", "m2m100"])
@pytest.mark.parametrize("route", ["program", "backend"])
def test_embedding_scaled_by_a_float_embed_scale_matches_peft(tmp_path, name, route):
    # BART's family multiplies the lookup by a float `embed_scale` (sqrt(32): not a power of two);
    # PEFT multiplies its delta by it as well, so adapting at the lookup is the same.
    base = _bart(name)
    peft_model, path = peft_adapter(base, tmp_path, r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = {"decoder_input_ids": torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        ref = peft_model(x, **kw).last_hidden_state
        if route == "backend":
            lora = lora_fx.backend(path, inner="aot_eager")
            lora.parameters(base)
            out = torch.compile(base, backend=lora, fullgraph=True)(x, **kw).last_hidden_state
        else:
            out = lora_fx.transform(torch.export.export(base, (x,), kw), path).module()(x, **kw).last_hidden_state
    assert_close(out, ref, f"{name} {route}")


def test_a_local_class_that_is_not_a_layer_is_not_a_site():
    class Gate(nn.Module):  # reads a parameter named `weight` with F.linear, but is no nn.Linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.t())  # a different weight node than its own

    net = nn.Sequential(Gate(), nn.Linear(4, 4))
    ep = lora_fx.transform(torch.export.export(net, (torch.randn(2, 4),)), lora_fx.LoraConfig(r=2, target_modules=".*"))
    assert sorted({get_mark(n, ADAPTER) for n in ep.graph.nodes} - {None}) == ["1"]


class HalfLinear(nn.Linear):
    """PEFT adds its adapter to this module's output (after `* 0.5`); at the op it would be halved."""

    def forward(self, x):
        return super().forward(x) * 0.5


class PaddedConv(nn.Conv1d):
    """Pads its input itself (Perceiver's `Conv2dSamePadding` pattern)."""

    def forward(self, x):
        return super().forward(torch.nn.functional.pad(x, (1, 1)))


@pytest.mark.parametrize("layer,x,match", [
    (HalfLinear(4, 4), torch.randn(2, 4), r"'0'.*HalfLinear computes mul on the linear op's output"),
    (PaddedConv(4, 4, 3), torch.randn(2, 4, 5), r"'0'.*PaddedConv transforms its input \(constant_pad_nd|pad\)"),
])
@pytest.mark.parametrize("route", ["program", "symbolic_trace", "backend_attached", "backend_unattached"])
def test_subclass_whose_forward_does_more_than_the_op_is_refused(layer, x, match, route):
    net = nn.Sequential(layer, nn.ReLU())
    cfg = lora_fx.LoraConfig(r=2, target_modules=["0"])
    if route in ("program", "symbolic_trace"):  # symbolic_trace graphs carry no values: checked all the same
        graph = torch.export.export(net, (x,)) if route == "program" else torch.fx.symbolic_trace(net)
        with pytest.raises(lora_fx.UnsupportedFeatureError, match=match):
            lora_fx.transform(graph, cfg)
        return
    lora = lora_fx.backend(cfg, inner="aot_eager")
    if route == "backend_attached":
        lora.parameters(net)
    with raised_while_compiling(lora_fx.UnsupportedFeatureError, match):
        torch.compile(net, backend=lora, fullgraph=True)(x)


def _linear_calls(graph):
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.linear.default)
        and get_mark(n, ADAPTER) is None]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("route", ["program", "graph_module"])
def test_decomposed_program_matches_peft(tmp_path, dora, route):
    base, peft_model, path = peft_reference("llama", tmp_path, use_dora=dora)
    x = token_input()
    ref = forward_backward(peft_model, x, lambda o: o.logits)
    ref_grads = peft_adapter_grads(peft_model)
    dec = torch.export.export(base, (x,)).run_decompositions()
    assert not any(n.target is torch.ops.aten.linear.default for n in dec.graph.nodes), "not decomposed"
    prog = lora_fx.transform(dec if route == "program" else dec.module(), path)
    # every decomposed linear of the 4 layers (7 each) is adapted; lm_head is not (all-linear)
    assert len({get_mark(n, ADAPTER) for n in prog.graph.nodes} - {None}) == 28
    module = prog.module() if route == "program" else prog
    out = forward_backward(module, x, lambda o: o.logits)
    assert_close(out, ref, f"decomposed {route} forward")
    if route == "program":
        check_grads({n: p for n, p in module.named_parameters() if "lora_" in n}, ref_grads, "decomposed program")


def test_decomposed_program_merges_and_unmerges_bit_exactly(tmp_path):
    base, peft_model, path = peft_reference("llama", tmp_path)
    x = token_input()
    dec = torch.export.export(base, (x,)).run_decompositions()
    ep = lora_fx.transform(dec, path)
    merged = lora_fx.merge(ep)
    assert [str(n.target) for n in _linear_calls(merged.graph)] == [str(n.target) for n in _linear_calls(dec.graph)]
    assert len(list(merged.graph.nodes)) == len(list(dec.graph.nodes))
    assert_close(merged.module()(x).logits, peft_model(x).logits, "merged decomposed", rel=1e-4)
    again = lora_fx.unmerge(merged)
    for key, value in ep.state_dict.items():
        assert torch.equal(again.state_dict[key], value), key


def test_decomposed_tied_weight_is_still_refused_by_merge(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    ids = torch.randint(0, 10, (2, 3))
    dec = torch.export.export(Tied(), (ids,)).run_decompositions()
    ep = lora_fx.transform(dec, lora_fx.LoraConfig(r=2, target_modules=["head"], init_lora_weights=False))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'head': its weight is shared with 'emb'"):
        lora_fx.merge(ep)


# -- layers lora_fx cannot adapt ----------------------------------------------------------------

class Int8Linear(nn.Linear):
    """A quantized linear lora_fx does not know: an int8 weight and a per-row scale, dequantized
    in its forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        del self.weight
        self.register_parameter("weight", nn.Parameter((linear.weight.detach() / scale).round().to(torch.int8),
                                                       requires_grad=False))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.float() * self.scale)


def _with_unknown_quantized_layers():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.q_proj = Int8Linear(layer.self_attn.q_proj)
    return model


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], "all-linear"])
@pytest.mark.parametrize("attached", [True, False], ids=["attached", "unattached"])
def test_quantized_layers_of_an_unknown_class_are_refused_by_name(targets, attached):
    model = _with_unknown_quantized_layers()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=targets), inner="aot_eager")
    expected = r"layer 'model.layers.0.self_attn.q_proj'.*Int8Linear.*bitsandbytes' Linear4bit and Linear8bitLt"
    if attached:
        expected = r"layer 'model.layers.0.self_attn.q_proj'.*Int8Linear holds a torch.int8 weight.*Linear8bitLt"
        with pytest.raises(lora_fx.UnsupportedFeatureError, match=expected):
            lora.parameters(model)
        assert len(lora.adapters) == 0
    else:
        with raised_while_compiling(lora_fx.UnsupportedFeatureError, expected):
            torch.compile(model, backend=lora)(token_input())


def test_unquantized_layers_of_a_quantized_model_still_adapt():
    model = _with_unknown_quantized_layers()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False),
                           inner="aot_eager")
    lora.parameters(model)
    x = token_input()
    base = model(x).logits
    out = torch.compile(model, backend=lora, fullgraph=True)(x).logits
    entry = lora.adapters.entries["lm_head"]
    hidden = model.model(x).last_hidden_state
    delta = hidden @ entry.tensors["lora_A.weight"].t() @ entry.tensors["lora_B.weight"].t() * entry.resolved.scaling
    assert_close(out, base + delta, "lm_head adapter on a model with quantized layers")


def test_a_class_this_process_has_not_imported_is_refused_not_guessed(tmp_path):
    # Export records `pkg.Router` as a string; in a process that never imported `pkg` lora_fx cannot
    # tell a Linear subclass from a module that merely calls F.linear on its own weight.
    import subprocess
    import sys

    pkg = tmp_path / "routerpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "class Router(torch.nn.Module):  # not a Linear: PEFT never adapts it\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.weight = torch.nn.Parameter(torch.randn(4, 8))\n"
        "    def forward(self, x):\n"
        "        return torch.nn.functional.linear(x, self.weight)\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.router = Router(); self.fc = torch.nn.Linear(8, 8)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x).sum(-1, keepdim=True) * self.router(x)\n")
    save = ("import sys, torch, lora_fx; sys.path.insert(0, sys.argv[1]); from routerpkg import M\n"
            "ep = torch.export.export(M(), (torch.randn(2, 8),)); torch.export.save(ep, sys.argv[2])\n"
            "cfg = lora_fx.LoraConfig(r=2, target_modules='all-linear')\n"
            "print(sorted(lora_fx.program_adapters.adapters_of(lora_fx.transform(ep, cfg)).entries))\n")
    load = ("import sys, torch, lora_fx; ep = torch.export.load(sys.argv[2])\n"
            "cfg = lora_fx.LoraConfig(r=2, target_modules='all-linear')\n"
            "try:\n    lora_fx.transform(ep, cfg); print('accepted')\n"
            "except lora_fx.UnsupportedFeatureError as e:\n    print('refused:', e)\n")
    program = str(tmp_path / "m.pt2")
    run = [sys.executable, "-c"]
    out = subprocess.run([*run, save, str(tmp_path), program], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['fc']"
    out = subprocess.run([*run, load, str(tmp_path), program], capture_output=True, text=True, check=True).stdout
    assert "refused: target rules select layer 'router'" in out and "import routerpkg" in out, out


def test_decomposed_linear_on_a_transposed_input_keeps_its_bias_for_merging(tmp_path):
    # A Linear on a non-contiguous 3-D input decomposes to bmm(x, Wᵀ) and a separate add of the
    # bias; the site must still know its bias, or a lora_bias merge is refused as "no bias".
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(x.transpose(1, 2))

    torch.manual_seed(0)
    base = Net().eval()
    peft_model, path = peft_adapter(base, tmp_path, r=2, lora_alpha=4, target_modules=["fc"], lora_bias=True)
    x = torch.randn(2, 6, 4)
    with torch.no_grad():
        ref = peft_model.merge_and_unload()(x)
    dec = torch.export.export(base, (x,)).run_decompositions()
    assert any(n.target is torch.ops.aten.bmm.default for n in dec.graph.nodes)
    merged = lora_fx.merge(lora_fx.transform(dec, path))
    with torch.no_grad():
        assert_close(merged.module()(x), ref, "merged decomposed bmm + bias")


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.cond(x.sum() > 0, lambda v: self.inner(v), lambda v: v * 2.0, (x,)))


@pytest.mark.parametrize("route", ["checkpoint_attached", "checkpoint_unattached", "cond_program"])
def test_a_layer_inside_a_higher_order_op_is_refused_not_skipped(route):
    # Activation checkpointing and torch.cond put the layer's call in a subgraph; until the passes
    # recurse into subgraphs (the site-model issue), targeting it must be an error, not base output.
    cfg = lora_fx.LoraConfig(r=2, target_modules=["inner"])
    match = r"'inner'.*inside the subgraph of a higher-order op"
    x = torch.randn(4, 8)
    if route == "cond_program":
        with pytest.raises(lora_fx.UnsupportedFeatureError, match=match):
            lora_fx.transform(torch.export.export(Branching(), (x,)), cfg)
        lora_fx.transform(torch.export.export(Branching(), (x,)), lora_fx.LoraConfig(r=2, target_modules=["out"]))
        return
    model = Checkpointed()
    lora = lora_fx.backend(cfg, inner="aot_eager")
    if route == "checkpoint_attached":
        lora.parameters(model)
    with raised_while_compiling(lora_fx.UnsupportedFeatureError, match):
        torch.compile(model, backend=lora, fullgraph=True)(x)
