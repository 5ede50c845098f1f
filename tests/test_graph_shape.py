"""Structure: exactly which nodes injection adds per site, and that nothing else changes."""

from __future__ import annotations

from collections import Counter

import torch
from conftest import ConvNet, tiny_gpt2
from torch.testing import FileCheck

import lora_fx
from lora_fx.marks import ADAPTER, get_mark, has_mark

aten = torch.ops.aten


def _ops(graph, skip_adapter=False):
    return Counter(str(n.target) for n in graph.nodes
                   if n.op == "call_function" and not (skip_adapter and has_mark(n, ADAPTER)))


def _added(before, after):
    diff = _ops(after) - _ops(before)
    assert not (_ops(before) - _ops(after)), "injection removed base nodes"
    return diff


def test_linear_site_training_form_adds_four_nodes_and_three_inputs():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    ep = torch.export.export(model, (x,))
    ep2 = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["0", "2"]), train=True)
    added = _added(ep.graph, ep2.graph)
    assert added == Counter({"aten.linear.default": 4, "aten.mul.Tensor": 2, "aten.add.Tensor": 2})
    assert _ops(ep2.graph, skip_adapter=True) == _ops(ep.graph)
    n_in = len([n for n in ep.graph.nodes if n.op == "placeholder"])
    assert len([n for n in ep2.graph.nodes if n.op == "placeholder"]) == n_in + 6  # A, B, scaling per site
    # The scaling multiplies the rank-r intermediate, before B.
    FileCheck().check("linear = torch.ops.aten.linear.default(input_1, p_0_weight, p_0_bias)") \
        .check("linear_default = torch.ops.aten.linear.default(input_1, p_0_lora_a_weight)") \
        .check("mul_tensor = torch.ops.aten.mul.Tensor(linear_default, b_0_lora_scaling)") \
        .check("linear_default_1 = torch.ops.aten.linear.default(mul_tensor, p_0_lora_b_weight, None)") \
        .check("add_tensor = torch.ops.aten.add.Tensor(linear, linear_default_1)") \
        .check("relu = torch.ops.aten.relu.default(add_tensor)").run(ep2.graph_module.code)


def test_linear_site_inference_form_accumulates_into_the_base_output():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 5, 8)
    ep = torch.export.export(model, (x,))
    cfg = lora_fx.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    ep2 = lora_fx.transform(ep, cfg)  # train=False: the inference form
    # per site: x -> 2-D, x·Aᵀ, ·s, base -> 2-D, addmm(base, h, Bᵀ), back to the base's shape
    assert _added(ep.graph, ep2.graph) == Counter({
        "aten.reshape.default": 6, "aten.t.default": 4, "aten.mm.default": 2, "aten.mul.Tensor": 2,
        "aten.addmm.default": 2})
    assert _ops(ep2.graph, skip_adapter=True) == _ops(ep.graph)
    FileCheck().check("linear = torch.ops.aten.linear.default(input_1, p_0_weight, p_0_bias)") \
        .check("mm_default = torch.ops.aten.mm.default(reshape_default, t_default)") \
        .check("mul_tensor = torch.ops.aten.mul.Tensor(mm_default, b_0_lora_scaling)") \
        .check("reshape_default_1 = torch.ops.aten.reshape.default(linear, [-1, 8])") \
        .check("addmm_default = torch.ops.aten.addmm.default(reshape_default_1, mul_tensor, t_default_1)") \
        .check("reshape_default_2 = torch.ops.aten.reshape.default(addmm_default, [3, 5, 8])") \
        .check("relu = torch.ops.aten.relu.default(reshape_default_2)").run(ep2.graph_module.code)
    train_form = lora_fx.transform(ep, cfg, train=True)
    lora_fx.program_adapters.adapters_of(train_form).load_peft_state_dict(
        lora_fx.program_adapters.adapters_of(ep2).peft_state_dict())  # same values
    with torch.no_grad():
        want = train_form.module()(x)
        got = ep2.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want - ep.module()(x)).abs().max() > 1e-3  # the adapter is not a no-op here


def test_backend_uses_the_inference_form_only_without_grad():
    seen = []

    def capture(gm, example_inputs):
        seen.append(Counter(str(n.target) for n in gm.graph.nodes if has_mark(n, ADAPTER)))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), inner=capture)
    lora.parameters(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    x = torch.randn(4, 8)
    with torch.no_grad():
        inference = fast(x)
    training = fast(x)
    # Without grad, on the CPU: the adapter accumulates in place into the base output (lora_fx::addmm_,
    # no out-of-place addmm, no add); exported programs keep the functional addmm (test above).
    assert seen[0]["lora_fx.addmm_.default"] == 1 and "aten.add.Tensor" not in seen[0]
    assert "aten.addmm.default" not in seen[0]
    assert seen[1]["aten.add.Tensor"] == 1 and "aten.addmm.default" not in seen[1]
    assert "lora_fx.addmm_.default" not in seen[1]
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-6)


class _TwoReaders(torch.nn.Module):
    """The adapted linear's output read twice and through a view, and returned: the in-place
    accumulation must be what every reader sees."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 12)
        self.down = torch.nn.Linear(12, 4)

    def forward(self, x):
        y = self.up(x)
        return self.down(torch.relu(y)) + y.view(*y.shape[:-1], 3, 4).sum(-2), y


def test_inplace_inference_form_under_inductor_matches_the_training_form():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = _TwoReaders()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False),
                           inner="inductor")
    lora.parameters(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        inference, codes = run_and_get_code(fast, x)
    training = fast(x)
    for got, want in zip(inference, training, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    # Inductor re-inplaced the op onto the base GEMM's buffer: no out-of-place addmm for an adapter
    # (the base linears with bias are addmm(bias, x, Wᵀ): 2 of them, as in the base model).
    code = "\n".join(codes)
    assert code.count("torch.ops.lora_fx.addmm_.default(buf") == 2
    assert code.count("extern_kernels.addmm(") == 2


def test_conv_and_embedding_and_conv1d_sites():
    net = ConvNet().eval()
    x = torch.randn(2, 4, 16)
    ep = torch.export.export(net, (x,))
    ep2 = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["c1", "c2", "c3"], lora_bias=True))
    assert _added(ep.graph, ep2.graph) == Counter(
        {"aten.convolution.default": 6, "aten.mul.Tensor": 3, "aten.add.Tensor": 3})

    gpt = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 8))
    ep = torch.export.export(gpt, (ids,))
    ep2 = lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["c_attn", "wte"]))
    # wte: t, embedding, mul, linear, add; two c_attn (Conv1D addmm) in the inference form:
    # reshape x, t(A), mm, mul, reshape base, t(B), addmm, reshape back
    assert _added(ep.graph, ep2.graph) == Counter({
        "aten.t.default": 1 + 4, "aten.embedding.default": 1, "aten.linear.default": 1, "aten.mul.Tensor": 3,
        "aten.add.Tensor": 1, "aten.reshape.default": 6, "aten.mm.default": 2, "aten.addmm.default": 2})
    assert _ops(ep2.graph, skip_adapter=True) == _ops(ep.graph)


def test_tied_lm_head_is_not_adapted_with_its_embedding():
    gpt = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 8))
    ep2 = lora_fx.transform(torch.export.export(gpt, (ids,)), lora_fx.LoraConfig(r=2, target_modules=["wte"]))
    adapted = {get_mark(n, ADAPTER) for n in ep2.graph.nodes if has_mark(n, ADAPTER)}
    assert adapted == {"transformer.wte"}


def test_backend_graph_has_adapter_nodes_per_site(inner):
    seen = []

    def capture(gm, example_inputs):
        seen.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"]), inner=capture)
    lora.parameters(model)
    torch.compile(model, backend=lora, fullgraph=True)(torch.randn(2, 8))
    (gm,) = seen
    adapter_nodes = [n for n in gm.graph.nodes if has_mark(n, ADAPTER)]
    assert Counter(str(n.target) for n in adapter_nodes) == Counter(
        {"aten.linear.default": 2, "aten.mul.Tensor": 1, "aten.add.Tensor": 1})
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"][-3:] == [
        "lora_0_lora_a_weight", "lora_0_lora_b_weight", "lora_0_lora_scaling"]
