"""DoRA on grouped convs (groups > 1): the norm PEFT computes there (its reshape of the flattened
B times A across channel groups, not the effective weight's norm), matched against PEFT for Conv1d
and Conv2d with groups=2 and depthwise (groups == channels, with and without a channel
multiplier), with and without bias: forward and gradients (A, B, magnitude, input) through the
backend (both lowerings) and transform(ep), in eval and in training with dropout; the magnitude's
init; PEFT-saved directories (load and save back); the graph's form; merging refused as PEFT
refuses it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, base_state, conv_net, peft_adapter, peft_adapter_grads, save_via
from torch import nn

import lora_fx
from lora_fx.marks import ADAPTER, get_mark
from lora_fx.variants import dora as dora_variant

aten = torch.ops.aten


class GroupedConvs(nn.Module):
    """Every conv grouped: Conv1d groups=2 (bias), depthwise Conv1d (no bias), depthwise Conv2d
    with channel multiplier 2 (bias), strided Conv2d groups=2 (no bias)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.c2 = nn.Conv1d(6, 6, 3, padding=1, groups=6, bias=False)
        self.c3 = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.c4 = nn.Conv2d(12, 8, 3, stride=2, padding=1, groups=2, bias=False)

    def forward(self, x):  # x: (B, 4, 16)
        h = torch.relu(self.c1(x))
        h = self.c2(h)
        h = torch.tanh(self.c3(h.view(h.shape[0], 6, 4, 4)))
        return self.c4(h)


# ranks divisible by each layer's groups, with r/groups of 1 and 2
CFG = dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "c3", "c4"], rank_pattern={"c1": 4, "c2": 6, "c3": 12})
GROUPS = {"c1": 2, "c2": 6, "c3": 6, "c4": 2}


def _base():
    torch.manual_seed(0)
    return GroupedConvs().eval()


def _input():
    return torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))


def _peft_dora(tmp_path, dropout=0.0, seed=9):
    """(base, saved PEFT DoRA dir, input, PEFT's output, output weights, PEFT's adapter grads, PEFT's
    input grad). With `dropout`, PEFT runs in training mode after `torch.manual_seed(seed)`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = _base()
    torch.manual_seed(123)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(use_dora=True, init_lora_weights=False,
                                                                    lora_dropout=dropout, **CFG))
    with torch.no_grad():  # B nonzero; magnitudes moved off their init so that g != 1
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
            elif "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    path = tmp_path / "grouped_dora"
    peft_model.save_pretrained(path)
    peft_model.train(dropout > 0)
    x = _input().requires_grad_()
    torch.manual_seed(seed)
    out = peft_model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * w).sum().backward()
    return base, path, out.detach(), w, peft_adapter_grads(peft_model), x.grad


def _check(named, ref_grads, route):
    named = dict(named)
    assert set(named) == set(ref_grads), sorted(set(named) ^ set(ref_grads))[:5]
    assert sum(k.endswith("lora_magnitude_vector") for k in named) == len(GROUPS)
    for key, p in named.items():
        assert p.grad is not None, f"{route}: no grad for {key}"
        assert_close(p.grad, ref_grads[key], f"{route}: grad of {key}")


@pytest.fixture(params=["aten", "ops"])
def lowering(request, monkeypatch):
    """aten: the CPU lowering (reference math as aten ops); ops: the lora_fx:: custom ops."""
    monkeypatch.setattr(dora_variant, "USE_OPS", "never" if request.param == "aten" else "always")
    return request.param


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_backend_matches_peft_on_grouped_convs(tmp_path, lowering, dropout):
    base, path, ref, w, ref_grads, ref_x_grad = _peft_dora(tmp_path, dropout)
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    lora = lora_fx.backend(path, inner=record)
    lora.parameters(base)
    base.train(dropout > 0)
    x = _input().requires_grad_()
    torch.manual_seed(9)  # the same dropout mask as PEFT's (one dropout per layer, in the same order)
    out = torch.compile(base, backend=lora, fullgraph=True)(x)
    route = f"backend ({lowering}, dropout={dropout})"
    assert_close(out, ref, f"{route} forward")
    (out * w).sum().backward()
    _check(lora.named_parameters(), ref_grads, route)
    assert_close(x.grad, ref_x_grad, f"{route}: input grad")
    # Grouped sites assemble their norm from PEFT's tensor, never from dora_norm's [out, r] pieces;
    # the per-channel composition is the op (without dropout) or aten math.
    assert "lora_fx.dora_norm.default" not in targets
    assert targets.count("lora_fx.dora_compose.default") == (len(GROUPS) if lowering == "ops" and not dropout else 0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_exported_program_matches_peft_on_grouped_convs(tmp_path, dropout):
    base, path, ref, w, ref_grads, ref_x_grad = _peft_dora(tmp_path, dropout)
    ep = lora_fx.transform(torch.export.export(base, (_input(),)), path, train=True)
    module = ep.module()
    x = _input().requires_grad_()
    torch.manual_seed(9)
    out = module(x)
    route = f"transform(ep) (dropout={dropout})"
    assert_close(out, ref, f"{route} forward")
    (out * w).sum().backward()
    _check({k: module.get_parameter(k) for k in ref_grads}.items(), ref_grads, route)
    assert_close(x.grad, ref_x_grad, f"{route}: input grad")


def _effective_norm(weight, a, b, scaling, groups):
    """The per-channel norm of the layer's effective weight: the grouped W placed block-diagonally in
    a dense (out, in, *k) weight, plus s·B·A with B expanded to its dense (out, r) form."""
    out, in_per_group = weight.shape[:2]
    r = a.shape[0]
    dense_w = torch.zeros(out, in_per_group * groups, *weight.shape[2:])
    dense_b = torch.zeros(out, r)
    for o in range(out):
        g = o // (out // groups)
        dense_w[o, g * in_per_group:(g + 1) * in_per_group] = weight[o]
        dense_b[o, g * (r // groups):(g + 1) * (r // groups)] = b[o].reshape(-1)
    full = dense_w.reshape(out, -1) + scaling * dense_b @ a.reshape(r, -1)
    return full.norm(dim=1)


def _plain_lora(entry):
    """A forward hook adding `s·B(A(x))` (PEFT's conv LoRA: A with the base's geometry, B a grouped
    1x1 conv) to a conv's output."""
    a, b = entry.tensors["lora_A.weight"].detach(), entry.tensors["lora_B.weight"].detach()
    conv_fn = nn.functional.conv1d if a.dim() == 3 else nn.functional.conv2d

    def hook(conv, inputs, out):
        h = conv_fn(inputs[0], a, None, conv.stride, conv.padding, conv.dilation)
        return out + entry.scaling * conv_fn(h, b, groups=conv.groups)
    return hook


def test_peft_norm_is_not_the_effective_weights_and_the_magnitude_init_is_peft(tmp_path):
    """A fresh adapter with random A, B: its magnitude is PEFT's init from the same factors (PEFT's
    own DoRA layer recomputes it), so g = 1 and the output is the plain LoRA output; and PEFT's norm
    here is measurably not the effective weight's (so the parity tests above tell the two apart)."""
    from peft import PeftModel

    base = _base()
    x = _input()
    cfg = lora_fx.LoraConfig(use_dora=True, init_lora_weights=False, **CFG)
    ep = lora_fx.transform(torch.export.export(base, (x,)), cfg)
    entries = lora_fx.program_adapters.adapters_of(ep).entries
    lora_fx.save_adapter(ep, tmp_path / "fresh")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fresh")
    for name, groups in GROUPS.items():
        layer = getattr(peft_model.base_model.model, name)
        t = {k: v.detach() for k, v in entries[name].tensors.items()}
        dora_layer = layer.lora_magnitude_vector["default"]
        dora_layer.update_layer(base_layer=layer.get_base_layer(), lora_A=layer.lora_A["default"].weight,
                                lora_B=layer.lora_B["default"].weight, scaling=layer.scaling["default"])
        torch.testing.assert_close(t["lora_magnitude_vector"], dora_layer.weight.detach(), msg=name)
        effective = _effective_norm(getattr(base, name).weight.detach(), t["lora_A.weight"], t["lora_B.weight"],
                                    entries[name].scaling, groups)
        gap = (effective - t["lora_magnitude_vector"].reshape(-1)).abs().max() / effective.abs().max()
        assert gap > 1e-2, f"{name}: PEFT's norm equals the effective weight's here ({gap:.1e})"
    # g = 1: each layer computes base(x) + s·B(A(x)) (PEFT, with its loaded magnitude, agrees)
    with torch.no_grad():
        want = peft_model(x)
        got = ep.module()(x)
        plain = copy.deepcopy(base)
        for name in GROUPS:
            getattr(plain, name).register_forward_hook(_plain_lora(entries[name]))
        assert_close(got, plain(x), "fresh grouped DoRA (g = 1) vs plain LoRA")
    assert_close(got, want, "fresh grouped DoRA vs PEFT")


def test_fresh_default_adapter_is_a_no_op():
    base = _base()
    x = _input()
    with torch.no_grad():
        want = base(x)
    lora = lora_fx.backend(lora_fx.LoraConfig(use_dora=True, **CFG), inner="aot_eager")
    lora.parameters(base)
    with torch.no_grad():
        got = torch.compile(base, backend=lora, fullgraph=True)(x)
    assert_close(got, want, "fresh grouped DoRA (B = 0, m = ‖W‖)")
    m = dict(lora.named_parameters())["c3.lora_magnitude_vector"]
    torch.testing.assert_close(m.detach().reshape(-1), base.c3.weight.detach().flatten(1).norm(dim=1))


@pytest.mark.parametrize("route", ["backend", "program"])
def test_peft_saved_directory_loads_and_saves_back(tmp_path, route):
    """conftest's ConvNet mixes a grouped Conv2d with groups=1 Conv1d / Conv3d: each site takes its
    own norm path; the tensors saved back are PEFT's, bit for bit."""
    from safetensors.torch import load_file

    base = conv_net()
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
    peft_model, path = peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["c1", "c2", "c3"],
                                    use_dora=True)
    assert peft_model.base_model.model.c2.get_base_layer().groups == 2
    with torch.no_grad():
        ref = peft_model.eval()(x)
        if route == "backend":
            model = copy.deepcopy(base)
            lora = lora_fx.backend(path, inner="aot_eager")
            lora.parameters(model)
            got = torch.compile(model, backend=lora, fullgraph=True)(x)
        else:
            got = lora_fx.transform(torch.export.export(base, (x,)), path).module()(x)
    assert_close(got, ref, f"{route}: PEFT-saved grouped DoRA adapter")
    saved = load_file(save_via(route, base, path, x, tmp_path / "again") / "adapter_model.safetensors")
    original = load_file(path / "adapter_model.safetensors")
    assert set(saved) == set(original)
    assert any("c2.lora_magnitude_vector" in k for k in saved)
    for key, value in original.items():
        assert torch.equal(saved[key], value), key


def _layer_nodes(graph, name):
    return [n for n in graph.nodes if get_mark(n, ADAPTER) == name]


def _shape(node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


@pytest.mark.parametrize("train", [False, True])
def test_graph_form_of_a_grouped_site(train):
    """c4 (Conv2d 12 -> 8, 3x3, groups=2, r=2): the norm is ‖rows(W) + s·reshape(B.view(-1, r) @
    A.view(r, -1))‖ over [out, in/G·k]; no dense [out, in·k] tensor and no [r, r] Gram is built;
    the adapter is a dense A conv and a grouped B conv; with dropout in training the base runs
    once more, grouped, on the dropped input (PEFT's form)."""
    base = _base()
    x = _input()
    ep = lora_fx.transform(torch.export.export(base, (x,)),
                           lora_fx.LoraConfig(use_dora=True, lora_dropout=0.3 if train else 0.0, **CFG), train=train)
    nodes = _layer_nodes(ep.graph, "c4")
    out, r, groups, k = 8, 2, 2, 9
    in_k = 12 * k
    mms = [n for n in nodes if n.target is aten.mm.default]
    assert len(mms) == 1, [str(n.target) for n in nodes]
    mm = mms[0]
    assert _shape(mm) == (out // groups, in_k)
    b_flat, a_flat = mm.args
    assert _shape(b_flat) == (out // groups, r) and _shape(a_flat) == (r, in_k)
    assert [a.target for a in (b_flat.args[0], a_flat.args[0])] == [aten.detach.default] * 2
    (norm,) = [n for n in nodes if n.target is aten.linalg_vector_norm.default]
    assert norm.args[2] == [1] and norm.kwargs["dtype"] == torch.float32 and _shape(norm) == (out,)
    total = norm.args[0]
    assert total.target is aten.add.Tensor and _shape(total) == (out, in_k // groups)
    w_rows, scaled = total.args
    assert _shape(w_rows) == (out, in_k // groups) and scaled.target is aten.mul.Tensor
    seen, stack = set(), [scaled.args[0]]
    while stack and mm not in seen:  # the scaled tensor is the mm, reshaped to the weight's rows
        n = stack.pop()
        seen.add(n)
        stack.extend(a for a in n.args if isinstance(a, torch.fx.Node))
    assert mm in seen and _shape(scaled.args[0]) == (out, in_k // groups)
    shapes = {_shape(n) for n in nodes}
    assert (out, in_k) not in shapes and (r, r) not in shapes
    convs = [n for n in nodes if n.target is aten.convolution.default]
    # A (dense, rank r), B (1x1, grouped) and, in training with dropout, the base on the dropped input
    assert sorted(n.args[8] for n in convs) == ([1, groups, groups] if train else [1, groups])
    assert sum(n.target is aten.dropout.default for n in nodes) == int(train)
    conv_ops = (aten.conv1d.default, aten.conv2d.default, aten.convolution.default)
    base_convs = [n for n in ep.graph.nodes if n.target in conv_ops and get_mark(n, ADAPTER) is None]
    assert len(base_convs) == len(GROUPS)  # the base output is reused, not recomputed


def test_merging_is_refused_as_peft_refuses_it(tmp_path):
    """No grouped weight holds B·A (lora_A reads every input channel), and PEFT raises on merging
    any adapter of a conv with groups > 1; lora_fx refuses on both routes, naming the layer."""
    base, path, *_ = _peft_dora(tmp_path)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        peft_model.merge_adapter()

    x = _input()
    ep = lora_fx.transform(torch.export.export(base, (x,)), path)
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'c1'.*groups=2"):
        lora_fx.merge(ep)
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'c1'.*groups=2"):
        lora_fx.merge(ep, keep_original=False)
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(base)
    before = {k: v.clone() for k, v in base_state(base).items()}
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'c1'.*groups=2"):
        lora.merge()
    assert not lora.merged
    assert all(torch.equal(v, before[k]) for k, v in base_state(base).items())
