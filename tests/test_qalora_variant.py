"""QALoRA (`use_qalora=True`): LoRA on the input mean-pooled over groups of G features, times in/G.

PEFT runs QALoRA on GPTQ layers only (gptqmodel is not installed here, and PEFT's other layers
ignore `use_qalora`), so two references are used: the formula in plain torch (forward hooks on an
eager copy of the model), and PEFT's own QALoRA code (`QALoraLinearVariant`: its init and forward)
grafted onto PEFT's LoRA layers, which dispatch to a layer's variant exactly as PEFT's GPTQ layer
does. Both routes (backend, `transform(ep)`), fp32 and bf16 bases, bitsandbytes 4-bit bases, graph
shape, init, save / load in PEFT's layout, merging, and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    assert_close,
    check_grads,
    forward_backward,
    peft_adapter_grads,
    raised_while_compiling,
    tamper_adapter_file,
    tiny_gpt2,
    tiny_llama,
    token_input,
)
from torch import nn
from torch._dynamo.utils import counters
from torch.testing import FileCheck

import lora_fx
from lora_fx.marks import ADAPTER, has_mark


class Mixed(nn.Module):
    """A Linear, a transformers Conv1D (weight stored (in, out)) and a bias-free Linear."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.fc = nn.Linear(32, 24)
        self.proj = Conv1D(16, 24)  # nf=16 outputs, nx=24 inputs
        self.head = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(nn.functional.gelu(self.fc(x)))))


def mixed(dtype=torch.float32):
    torch.manual_seed(0)
    return Mixed().eval().to(dtype)


def mixed_input(dtype=torch.float32, seed=1):
    return torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


MIXED = dict(r=4, lora_alpha=6, target_modules=["fc", "proj", "head"], use_qalora=True, qalora_group_size=4)
MIXED_SCALING = 1.5  # not a power of two: where the scaling is applied shows in fp32
MIXED_LAYERS = {"fc": 32, "proj": 24, "head": 16}  # in_features; pooled: 8, 6, 4


# -- references ----------------------------------------------------------------------------------

def qalora_delta(x, a, b, scaling, group):
    """The formula in plain torch, in the adapters' dtype: s · (n · groupwise mean of x) Aᵀ Bᵀ."""
    n = x.shape[-1] // group
    pooled = x.to(a.dtype).reshape(*x.shape[:-1], n, group).mean(-1) * n
    return pooled @ a.t() @ b.t() * scaling


def with_formula(model, factors, scaling, group):
    """`model` with each named layer's output + the formula's delta, added in the wider dtype and
    rounded once to the output's dtype (PEFT's arithmetic for a variant's output)."""
    for name, (a, b) in factors.items():
        def hook(module, args, out, a=a, b=b):
            return (out + qalora_delta(args[0], a, b, scaling, group)).to(out.dtype)

        model.get_submodule(name).register_forward_hook(hook)
    return model


def formula_leaves(named):
    """{layer: (A, B)} as fresh leaf tensors (the formula's own gradients), from lora_fx's values."""
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in named})
    return {n: tuple(named[f"{n}.lora_{f}.weight"].detach().clone().requires_grad_() for f in "AB") for n in layers}


def formula_grads(factors):
    return {f"{n}.lora_{f}.weight": t.grad for n, pair in factors.items() for f, t in zip("AB", pair, strict=True)}


def peft_qalora(base, tmp_path, **cfg):
    """(PEFT model running PEFT's QALoRA code, its saved directory). PEFT builds QALoRA only for GPTQ
    layers; on its other layers `use_qalora` is recorded and ignored. Its variant (`init` replaces A
    with an (r, in/G) factor; `forward` pools) is grafted onto every LoRA layer; PEFT's Linear and
    bitsandbytes layers then call it as its GPTQ layer does. Factors random, nonzero."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.variants import QALoraLinearVariant

    torch.manual_seed(123)
    config = PeftLoraConfig(init_lora_weights=False, use_qalora=True, **cfg)
    peft_model = get_peft_model(base, config)
    grafted = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            QALoraLinearVariant.init(module, "default", config)
            module.lora_variant["default"] = QALoraLinearVariant()
            grafted += 1
    assert grafted
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    path = tmp_path / "peft_qalora"
    peft_model.save_pretrained(path)
    return peft_model, path


def fresh_counters():
    torch._dynamo.reset()
    counters.clear()


def assert_one_graph_no_break_no_recompile(lora):
    assert lora.graphs_compiled == 1
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert sum(counters["recompiles"].values()) == 0


# -- PEFT's own numbers --------------------------------------------------------------------------

def test_peft_runs_qalora_only_on_gptq_layers():
    # Why PEFT itself is not the reference: gptqmodel is absent, and on a plain Linear PEFT's
    # `use_qalora=True` builds plain LoRA (A of shape (r, in), no variant).
    import importlib.util

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    assert importlib.util.find_spec("gptqmodel") is None
    layer = get_peft_model(nn.Sequential(nn.Linear(32, 8)), PeftLoraConfig(
        r=2, target_modules=["0"], use_qalora=True, qalora_group_size=4)).base_model.model[0]
    assert tuple(layer.lora_A["default"].weight.shape) == (2, 32) and not layer.lora_variant


CASES = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear", qalora_group_size=16,
                               rank_pattern={r"layers\.0\..*_proj": 2})),   # in 64 and 96: pooled 4 and 6
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"],
                             qalora_group_size=8)),  # Conv1D; in 32 and 128
}


@pytest.mark.parametrize("route", ["backend", "program"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_peft_qalora_code(name, route, tmp_path):
    factory, cfg = CASES[name]
    base = factory()
    peft_model, path = peft_qalora(copy.deepcopy(base), tmp_path, **cfg)
    x = token_input()
    expected = forward_backward(peft_model, x, lambda o: o.logits)
    peft_grads = peft_adapter_grads(peft_model)
    some_a = next(k for k in peft_grads if k.endswith("lora_A.weight"))
    assert peft_grads[some_a].shape[1] in (64 // 16, 96 // 16, 32 // 8, 128 // 8)  # PEFT's pooled A

    if route == "backend":
        fresh_counters()
        lora = lora_fx.backend(path, inner="aot_eager")
        lora.parameters(base)
        params = dict(lora.named_parameters())
        fast = torch.compile(base, backend=lora, fullgraph=True)
        out = forward_backward(fast, x, lambda o: o.logits)
        fast(torch.randint(0, 128, x.shape, generator=torch.Generator().manual_seed(5)))  # same shape, new values
        assert_one_graph_no_break_no_recompile(lora)
    else:
        module = lora_fx.transform(torch.export.export(base, (x,)), path).module()
        out = forward_backward(module, x, lambda o: o.logits)
        params = {k: module.get_parameter(k) for k in peft_grads}
    assert_close(out, expected, f"{name} {route}: logits")
    check_grads(params, peft_grads, f"{name} {route}")


# -- the formula in plain torch: fp32 and bf16 bases, grads of A, B and the input ------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("route", ["backend", "program"])
def test_matches_the_formula(route, dtype):
    base = mixed(dtype)
    cfg = lora_fx.LoraConfig(init_lora_weights=False, **MIXED)
    x = mixed_input(dtype).requires_grad_()
    if route == "backend":
        fresh_counters()
        lora = lora_fx.backend(cfg, inner="aot_eager")
        model = copy.deepcopy(base)
        lora.parameters(model)
        params = dict(lora.named_parameters())
        fast = torch.compile(model, backend=lora, fullgraph=True)
        out = forward_backward(fast, x)
        fast(mixed_input(dtype, seed=2).requires_grad_())  # same shape, new values
        assert_one_graph_no_break_no_recompile(lora)
    else:
        module = lora_fx.transform(torch.export.export(base, (x,)), cfg).module()
        params = {f"{n}.lora_{f}.weight": module.get_parameter(f"{n}.lora_{f}.weight")
                  for n in MIXED_LAYERS for f in "AB"}
        out = forward_backward(module, x)
    assert {k: tuple(v.shape) for k, v in params.items() if "lora_A" in k} == {
        f"{n}.lora_A.weight": (4, i // 4) for n, i in MIXED_LAYERS.items()}
    assert all(p.dtype == torch.float32 for p in params.values())  # fp32 adapters on a bf16 base too
    assert out.dtype == dtype

    factors = formula_leaves(params)
    x_ref = x.detach().clone().requires_grad_()
    expected = forward_backward(with_formula(copy.deepcopy(base), factors, MIXED_SCALING, 4), x_ref)
    # bf16: within two bf16 ulps of the largest value (eager and compiled code may round apart)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert_close(out, expected, f"{route} {dtype}: output", tol)
    check_grads(params, formula_grads(factors), f"{route} {dtype}", tol)
    assert_close(x.grad, x_ref.grad, f"{route} {dtype}: grad of the input", tol)


def test_bf16_base_forward_is_bit_equal_to_peft_arithmetic():
    # Scaled after B, added to the bf16 base output in fp32, rounded once: PEFT's order exactly.
    base = mixed(torch.bfloat16)
    x = mixed_input(torch.bfloat16)
    cfg = lora_fx.LoraConfig(init_lora_weights=False, **{**MIXED, "target_modules": ["fc", "head"]})
    module = lora_fx.transform(torch.export.export(base, (x,)), cfg).module()
    factors = {n: tuple(module.get_parameter(f"{n}.lora_{f}.weight").detach() for f in "AB") for n in ("fc", "head")}
    with torch.no_grad():
        got, want = module(x), with_formula(copy.deepcopy(base), factors, MIXED_SCALING, 4)(x)
    assert torch.equal(got, want), f"{(got != want).sum()} of {got.numel()} outputs differ"


def test_dynamic_shapes_decompositions_save_load_and_graph_modules(tmp_path):
    # The pooling is a view of the last dimension: any leading shape, symbolic ones included.
    base = mixed()
    cfg = lora_fx.LoraConfig(init_lora_weights=False, **MIXED)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    ep2 = lora_fx.transform(torch.export.export(base, (mixed_input(),), dynamic_shapes=(dims,)), cfg)
    torch.export.save(ep2.run_decompositions(), tmp_path / "p.pt2")
    loaded = torch.export.load(tmp_path / "p.pt2")
    factors = {n: tuple(ep2.state_dict[f"{n}.lora_{f}.weight"] for f in "AB") for n in MIXED_LAYERS}
    reference = with_formula(copy.deepcopy(base), factors, MIXED_SCALING, 4)
    x = torch.randn(6, 2, 32)  # another batch and sequence length
    lora_fx.save_adapter(loaded, tmp_path / "saved")  # the adapters read back from the loaded program
    gm = lora_fx.transform(torch.fx.symbolic_trace(copy.deepcopy(base)), tmp_path / "saved")  # no fake values
    with torch.no_grad():
        want = reference(x)
        for what, got in (("dynamic program", ep2.module()(x)), ("decomposed, saved, loaded", loaded.module()(x)),
                          ("symbolic_trace GraphModule", gm(x)),
                          ("merged GraphModule", lora_fx.merge(gm)(x))):
            assert_close(got, want, what)


# -- bitsandbytes bases through the backend ------------------------------------------------------

class Quantized(nn.Module):
    """Two bitsandbytes linears: 4-bit (nf4, then fp4) in `dtype`'s compute dtype, or 8-bit (sizes
    in whole 64-blocks for the CPU kernels)."""

    def __init__(self, quant):
        import bitsandbytes as bnb

        super().__init__()
        torch.manual_seed(0)
        if quant == "8bit":
            self.up = bnb.nn.Linear8bitLt(64, 128, bias=True, has_fp16_weights=False, threshold=0.0).to("cpu")
            self.down = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False, threshold=0.0).to("cpu")
            self.is_loaded_in_8bit = True  # PEFT wraps such layers with its bitsandbytes LoRA layers
            return
        dtype = QUANT_DTYPE[quant]
        self.up = bnb.nn.Linear4bit(64, 128, bias=True, compute_dtype=dtype, quant_type="nf4").to("cpu")
        self.down = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=dtype, quant_type="fp4").to("cpu")
        for layer in (self.up, self.down):
            layer.support_avx512bf16_for_cpu = False  # no one-way CPU repacking (see test_qlora.load)
        # a bias in the compute dtype, as `from_pretrained(..., dtype=)` gives (bitsandbytes would
        # otherwise cast it in its forward, a `.data` write Dynamo refuses)
        self.up.bias = nn.Parameter(self.up.bias.detach().to(dtype))
        self.is_loaded_in_4bit = True

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


QUANT_DTYPE = {"4bit-fp32": torch.float32, "4bit-bf16": torch.bfloat16, "8bit": torch.float32}


@pytest.mark.parametrize("quant", sorted(QUANT_DTYPE))
def test_quantized_base_through_the_backend(quant, tmp_path):
    pytest.importorskip("bitsandbytes")
    dtype = QUANT_DTYPE[quant]
    cfg = dict(r=4, lora_alpha=8, target_modules=["up", "down"], qalora_group_size=16)
    peft_model, path = peft_qalora(Quantized(quant), tmp_path, **cfg)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    x_peft = x.detach().clone().requires_grad_()
    from_peft = forward_backward(peft_model.train(), x_peft)

    fresh_counters()
    model = Quantized(quant).train()
    if quant == "8bit":
        # bitsandbytes' 8-bit layer stores a tensor on its weight at its first call (`CB`, None
        # before): a compiled first call recompiles once at the second, plain LoRA alike. Warm it up.
        with torch.no_grad():
            model(x)
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(model)
    kind = "linear8bit" if quant == "8bit" else "linear4bit"
    assert {str(e.resolved.layer.kind) for e in lora.adapters.entries.values()} == {kind}
    params = dict(lora.named_parameters())
    fast = torch.compile(model, backend=lora, fullgraph=True)
    out = forward_backward(fast, x)
    fast(torch.randn(2, 3, 64).to(dtype).requires_grad_())  # same shape, new values
    assert_one_graph_no_break_no_recompile(lora)
    assert out.dtype == dtype

    factors = formula_leaves(params)
    x_ref = x.detach().clone().requires_grad_()
    expected = forward_backward(with_formula(Quantized(quant).train(), factors, 2.0, 16), x_ref)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # two bf16 ulps of the largest value
    assert_close(out, expected, f"{quant}: output (formula)", tol)
    check_grads(params, formula_grads(factors), f"{quant} (formula)", tol)
    assert_close(x.grad, x_ref.grad, f"{quant}: grad of the input (formula)", tol)
    # PEFT's arithmetic for a variant on its bitsandbytes layers: the fp32 delta added to the base
    # output in fp32, the sum rounded once (not its plain-LoRA rounding of the delta first)
    assert torch.equal(out, from_peft), f"{(out != from_peft).sum()} of {out.numel()} outputs differ from PEFT's"
    check_grads(params, peft_adapter_grads(peft_model), f"{quant} (PEFT's code)", tol)


def test_merging_into_a_4bit_base_is_refused_with_the_reason():
    pytest.importorskip("bitsandbytes")
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["up"], use_qalora=True, qalora_group_size=16),
                           inner="aot_eager")
    model = Quantized("4bit-fp32")
    lora.parameters(model)
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'up'.*quantized \(bitsandbytes 4-bit\).*unquantized"):
        lora_fx.merge(lora)


# -- graph shape ---------------------------------------------------------------------------------

def _ops(graph, adapter_only=False):
    from collections import Counter

    return Counter(str(n.target) for n in graph.nodes
                   if n.op == "call_function" and (not adapter_only or has_mark(n, ADAPTER)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_shape_of_the_pooled_form(dtype):
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)).to(dtype)
    x = torch.randn(3, 5, 32).to(dtype)
    ep = torch.export.export(model, (x,))
    cfg = lora_fx.LoraConfig(r=2, target_modules=["0", "2"], use_qalora=True, qalora_group_size=4)
    ep2 = lora_fx.transform(ep, cfg)
    per_site = {"aten.unflatten.int": 1, "aten.mean.dim": 1, "aten.mul.Tensor": 2, "aten.linear.default": 2,
                "aten.add.Tensor": 1}
    if dtype == torch.bfloat16:
        per_site["aten._to_copy.default"] = 2  # the input to fp32, the sum back to bf16
    assert _ops(ep2.graph, adapter_only=True) == {op: 2 * n for op, n in per_site.items()}
    assert _ops(ep2.graph) - _ops(ep2.graph, adapter_only=True) == _ops(ep.graph)  # the base is untouched
    if dtype == torch.float32:  # groups of 4 over 32 features -> 8 pooled, times 8; s on the rank-r h
        FileCheck().check("linear = torch.ops.aten.linear.default(input_1, p_0_weight, p_0_bias)") \
            .check("unflatten_int = torch.ops.aten.unflatten.int(input_1, -1, [8, 4])") \
            .check("mean_dim = torch.ops.aten.mean.dim(unflatten_int, [-1])") \
            .check("mul_tensor = torch.ops.aten.mul.Tensor(mean_dim, 8)") \
            .check("linear_default = torch.ops.aten.linear.default(mul_tensor, p_0_lora_a_weight)") \
            .check("mul_tensor_1 = torch.ops.aten.mul.Tensor(linear_default, b_0_lora_scaling)") \
            .check("linear_default_1 = torch.ops.aten.linear.default(mul_tensor_1, p_0_lora_b_weight, None)") \
            .check("add_tensor = torch.ops.aten.add.Tensor(linear, linear_default_1)") \
            .check("relu = torch.ops.aten.relu.default(add_tensor)").run(ep2.graph_module.code)
    else:  # mixed precision: s after B, the sum in fp32, rounded once
        FileCheck().check("_to_copy_default = torch.ops.aten._to_copy.default(input_1, dtype = torch.float32)") \
            .check("unflatten.int(_to_copy_default, -1, [8, 4])").check("mean.dim").check("mul.Tensor") \
            .check("linear.default").check("linear.default") \
            .check("mul_tensor_1 = torch.ops.aten.mul.Tensor(linear_default_1, b_0_lora_scaling)") \
            .check("add_tensor = torch.ops.aten.add.Tensor(linear, mul_tensor_1)") \
            .check("torch.ops.aten._to_copy.default(add_tensor, dtype = torch.bfloat16)") \
            .run(ep2.graph_module.code)


def test_dropout_comes_before_the_pooling():
    model = nn.Sequential(nn.Linear(32, 8))
    ep = torch.export.export(model, (torch.randn(2, 32),))
    cfg = lora_fx.LoraConfig(r=2, target_modules=["0"], use_qalora=True, qalora_group_size=8, lora_dropout=0.1)
    code = lora_fx.transform(ep, cfg, train=True).graph_module.code
    FileCheck().check("dropout_default = torch.ops.aten.dropout.default(input_1, 0.1, True)") \
        .check("unflatten.int(dropout_default, -1, [4, 8])").run(code)


def test_backend_graph_carries_the_pooled_form():
    seen = []

    def capture(gm, example_inputs):
        seen.append(_ops(gm.graph, adapter_only=True))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, use_qalora=True, qalora_group_size=8, **{
        "target_modules": ["fc", "proj"]}), inner=capture)
    with torch.no_grad():
        torch.compile(mixed(), backend=lora, fullgraph=True)(mixed_input())  # unattached: read from the graph
    assert len(seen) == 1
    assert seen[0]["aten.unflatten.int"] == 2 and seen[0]["aten.mean.dim"] == 2
    assert {tuple(e.tensors["lora_A.weight"].shape) for e in lora.adapters.entries.values()} == {(2, 4), (2, 3)}


# -- init ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_as_peft(init):
    # PEFT replaces A by a fresh nn.Linear(in/G, r) whatever init_lora_weights says: Kaiming-uniform
    # with fan-in in/G, bound 1/sqrt(in/G). B is zero (a no-op adapter) unless init_lora_weights=False.
    model = nn.Sequential(nn.Linear(256, 64))
    x = torch.randn(4, 256)
    cfg = lora_fx.LoraConfig(r=8, target_modules=["0"], use_qalora=True, qalora_group_size=16, init_lora_weights=init)
    ep2 = lora_fx.transform(torch.export.export(model, (x,)), cfg)
    a, b = (ep2.state_dict[f"0.lora_{f}.weight"] for f in "AB")
    assert a.shape == (8, 16) and b.shape == (64, 8)
    bound = 1 / 16 ** 0.5  # 0.25; a fan-in of 256 would give 0.0625, a Gaussian N(0, 1/r) exceeds it
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    with torch.no_grad():
        adapted, plain = ep2.module()(x), model(x)
    if init is False:
        assert b.abs().max() <= 1 / 8 ** 0.5 and b.abs().max() > 0  # nn.Linear(r, out)'s init
        assert (adapted - plain).abs().max() > 1e-3
    else:
        assert torch.equal(b, torch.zeros_like(b))
        assert torch.equal(adapted, plain)


# -- save / load in PEFT's layout ----------------------------------------------------------------

def test_save_and_load_both_directions(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.variants import QALoraLinearVariant
    from safetensors.torch import load_file

    base = mixed()
    x = mixed_input()
    lora = lora_fx.backend(lora_fx.LoraConfig(init_lora_weights=False, **MIXED), inner="aot_eager")
    model = copy.deepcopy(base)
    lora.parameters(model)
    with torch.no_grad():
        want = torch.compile(model, backend=lora, fullgraph=True)(x)
    lora.save_adapter(tmp_path / "ours")

    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        **{f"base_model.model.{n}.lora_A.weight": (4, i // 4) for n, i in MIXED_LAYERS.items()},
        **{f"base_model.model.{n}.lora_B.weight": (o, 4) for n, o in (("fc", 24), ("proj", 16), ("head", 8))}}
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_qalora"] is True and config["qalora_group_size"] == 4

    # lora_fx reads it back exactly, in both routes
    again = lora_fx.backend(tmp_path / "ours", inner="aot_eager")
    again.parameters(copy.deepcopy(base))
    assert all(torch.equal(saved[f"base_model.model.{k}"], v) for k, v in again.named_parameters())
    ep2 = lora_fx.transform(torch.export.export(base, (x,)), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(ep2.module()(x), want)
    lora_fx.save_adapter(ep2, tmp_path / "via_program")
    resaved = load_file(tmp_path / "via_program" / "adapter_model.safetensors")
    assert resaved.keys() == saved.keys() and all(torch.equal(resaved[k], saved[k]) for k in saved)

    # PEFT's loader takes the file into PEFT's layers (its QALoRA code grafted on, as above)
    peft_config = PeftLoraConfig.from_pretrained(tmp_path / "ours")
    assert peft_config.use_qalora and peft_config.qalora_group_size == 4
    peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            QALoraLinearVariant.init(module, "default", peft_config)
            module.lora_variant["default"] = QALoraLinearVariant()
    result = set_peft_model_state_dict(peft_model, saved)
    assert not result.unexpected_keys
    with torch.no_grad():
        assert_close(want, peft_model(x), "PEFT running lora_fx's file")


def test_wrong_shaped_lora_a_in_a_file_is_refused_naming_key_and_shapes(tmp_path):
    base = mixed()
    lora = lora_fx.backend(lora_fx.LoraConfig(**MIXED), inner="aot_eager")
    lora.parameters(copy.deepcopy(base))
    lora.save_adapter(tmp_path / "a")

    def unpooled(tensors):  # as plain LoRA would have it: (r, in)
        tensors["base_model.model.fc.lora_A.weight"] = torch.zeros(4, 32)

    tamper_adapter_file(tmp_path / "a", unpooled)
    with pytest.raises(lora_fx.AdapterFileError, match=r"'base_model.model.fc.lora_A.weight' has shape \(4, 32\), "
                                                         r"the model needs \(4, 8\)"):
        lora_fx.transform(torch.export.export(base, (mixed_input(),)), tmp_path / "a")


# -- merging -------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["program", "backend"])
def test_merge_folds_the_expanded_pooled_factor_and_unmerge_is_exact(route):
    base = mixed()
    x = mixed_input()
    cfg = lora_fx.LoraConfig(init_lora_weights=False, **MIXED)
    with torch.no_grad():
        plain = base(x)
    if route == "program":
        ep = lora_fx.transform(torch.export.export(base, (x,)), cfg)
        merged = lora_fx.merge(ep)
        assert not any(has_mark(n, ADAPTER) for n in merged.graph.nodes)
        with torch.no_grad():
            want, got = ep.module()(x), merged.module()(x)
        again = lora_fx.unmerge(merged)
        assert all(torch.equal(again.state_dict[k], v) for k, v in ep.state_dict.items())
        # the subtract mode: W' - s·B·A_full, within rounding
        approx = lora_fx.unmerge(lora_fx.merge(ep, keep_original=False))
        for key, value in ep.state_dict.items():
            torch.testing.assert_close(approx.state_dict[key], value, rtol=0, atol=1e-6, msg=key)
    else:
        model = copy.deepcopy(base)
        originals = {k: v.clone() for k, v in model.state_dict().items()}
        lora = lora_fx.backend(cfg, inner="aot_eager")
        lora.parameters(model)
        fast = torch.compile(model, backend=lora, fullgraph=True)
        with torch.no_grad():
            want = fast(x)
            lora_fx.merge(lora)
            got = fast(x)
            # the merged weight, by hand: each pooled column of A repeated over its group, times n/G
            a, b = lora.adapters.entries["fc"].tensors["lora_A.weight"], lora.adapters.entries["fc"].tensors[
                "lora_B.weight"]
            by_hand = originals["fc.weight"] + MIXED_SCALING * b @ (a.repeat_interleave(4, dim=1) * (8 / 4))
            torch.testing.assert_close(model.fc.weight, by_hand, rtol=0, atol=1e-6)
            lora_fx.unmerge(lora)
            assert torch.equal(fast(x), want)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in originals.items())
    assert (want - plain).abs().max() > 1e-2  # the adapters change the output
    assert_close(got, want, f"{route}: merged vs unmerged")


# -- refusals ------------------------------------------------------------------------------------

def test_in_features_not_divisible_by_the_group_size_is_refused():
    base = mixed()
    cfg = lora_fx.LoraConfig(r=2, target_modules=["fc", "proj"], use_qalora=True, qalora_group_size=16)
    match = r"proj: use_qalora needs in_features \(24\) to be divisible by qalora_group_size \(16\)"
    with pytest.raises(lora_fx.ConfigError, match=match):
        lora_fx.transform(torch.export.export(base, (mixed_input(),)), cfg)
    with pytest.raises(lora_fx.ConfigError, match=match):
        lora_fx.backend(cfg, inner="aot_eager").parameters(copy.deepcopy(base))
    with raised_while_compiling(lora_fx.ConfigError, match):  # unattached: found while compiling
        torch.compile(base, backend=lora_fx.backend(cfg, inner="aot_eager"))(mixed_input())


class Others(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.conv = nn.Conv1d(32, 32, 1)
        self.router = nn.Parameter(torch.randn(8, 32))
        self.fc = nn.Linear(32, 8)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.fc(h) + h @ self.router.t()


@pytest.mark.parametrize("target,what", [
    (dict(target_modules=["emb"]), r"emb: QALoRA adapts linear layers only.*not this embedding layer \(.*Embedding\)"),
    (dict(target_modules=["conv"]), r"conv: QALoRA adapts linear layers only.*not this conv layer \(.*Conv1d\)"),
    (dict(target_modules=[], target_parameters=["router"]), r"router: QALoRA adapts linear layers only.*not this "
                                                             r"parameter target"),
])
def test_other_kinds_are_refused_by_name(target, what):
    ids = torch.randint(0, 16, (2, 5))
    ep = torch.export.export(Others(), (ids,))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=what):
        lora_fx.transform(ep, lora_fx.LoraConfig(r=2, use_qalora=True, qalora_group_size=4, **target))


def test_lora_bias_is_refused():
    # PEFT's QALoRA forward reads lora_B's weight only; its bias would train nothing.
    ep = torch.export.export(mixed(), (mixed_input(),))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"fc: lora_bias=True with use_qalora"):
        lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["fc"], use_qalora=True, qalora_group_size=4,
                                                 lora_bias=True))


def test_docs_example_runs():
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "qalora.md"
    example = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)[0]
    assert "use_qalora=True" in example and "fullgraph=True" in example and "lora_fx.merge" in example
    exec(compile(example, "docs/qalora.md", "exec"), {})


@pytest.mark.parametrize("mode,extra", [("pissa", {}), ("olora", {}), ("loftq", {"loftq_config": {"loftq_bits": 4}})])
def test_init_modes_computing_full_factors_from_the_base_are_refused(mode, extra):
    # They compute (r, in) factors from the base weight's SVD / QR and rewrite the base; QALoRA's A
    # is (r, in/G). PEFT's QALoRA would overwrite such an A with a fresh one, leaving the base rewritten.
    ep = torch.export.export(mixed(), (mixed_input(),))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=rf"'fc'.*{mode}.*\(2, 8\).*\(2, 32\)"):
        lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["fc"], use_qalora=True, qalora_group_size=4,
                                                 init_lora_weights=mode, **extra))
