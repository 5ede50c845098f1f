"""Block-diagonal LoRA (BdLoRA): parity with PEFT's BdLoRA (forward, gradients, files both ways, init,
merging) through the backend (fullgraph, both lowerings of the block-diagonal product) and
transform(ep); the graph each site gets; the refusals; GPT-2 Conv1D against the dense equivalent.
The tensor-parallel demonstration is tests/test_bdlora_tp.py."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
from conftest import (
    assert_close,
    base_state,
    check_grads,
    forward_backward,
    peft_adapter,
    peft_adapter_grads,
    tamper_adapter_file,
    tiny_gpt2,
    tiny_llama,
    token_input,
)
from torch import nn
from torch._dynamo.utils import counters
from torch.testing import FileCheck

import lora_fx
from lora_fx.kernels.block_diag import block_diag_dense
from lora_fx.marks import ADAPTER, has_mark
from lora_fx.variants import bdlora

aten = torch.ops.aten
BLOCK_OP = "lora_fx.block_diag_matmul.default"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Column-parallel layers get a block-diagonal B, row-parallel ones a block-diagonal A (PEFT's advice).
BD = dict(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj",
                                                                          "up_proj"], nblocks=2)
LLAMA = dict(r=8, lora_alpha=16, target_modules=PROJ, rank_pattern={r"layers\.0\..*_proj": 4})
SITES = 4 * len(PROJ)  # tiny_llama has 4 layers


def _peft_bd(**bd):
    from peft import BdLoraConfig as PeftBdLoraConfig

    return PeftBdLoraConfig(**{**BD, **bd})


def _peft_llama(tmp_path, name="bd", base=None, bd=None, **kwargs):
    """(base, PEFT BdLoRA model with random nonzero factors, its saved dir)."""
    base = base if base is not None else tiny_llama()
    peft_model, path = peft_adapter(base, tmp_path, name, use_bdlora=_peft_bd(**(bd or {})), **{**LLAMA, **kwargs})
    return base, peft_model, path


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.fixture(params=bdlora.FORMS)
def lowering(request, monkeypatch):
    """The block-diagonal product's form: expand (the dense block-diagonal matrix, then a linear; the
    default on CPU), einsum (PEFT's), op (`lora_fx::block_diag_matmul`, its CPU kernel here)."""
    monkeypatch.setattr(bdlora, "LOWERING", request.param)
    return request.param


def _products(ops: Counter) -> dict[str, int]:
    """How many block-diagonal products a graph computes in each form (an expanded factor is one
    `diag_embed` of its blocks)."""
    return {"expand": ops["aten.diag_embed.default"], "einsum": ops["aten.einsum.default"], "op": ops[BLOCK_OP]}


# -- parity with PEFT --------------------------------------------------------------------------

def test_backend_matches_peft_and_swaps_adapters_without_recompiling(tmp_path, lowering):
    base, peft_model, path = _peft_llama(tmp_path)
    x = token_input()
    ref = forward_backward(peft_model, x, lambda o: o.logits)
    ref_grads = peft_adapter_grads(peft_model)
    assert any(g.shape == (8, 48) for k, g in ref_grads.items() if "down_proj.lora_A" in k)  # compact (r, in/2)
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    counters.clear()
    lora = lora_fx.backend(path, inner=inner)
    lora.parameters(base)
    fast = torch.compile(base, backend=lora, fullgraph=True)
    out = forward_backward(fast, x, lambda o: o.logits)
    assert_close(out, ref, f"backend ({lowering}) forward")
    check_grads(lora.named_parameters(), ref_grads, f"backend ({lowering})")
    # one block-diagonal product per site, in the form the lowering says
    assert len(graphs) == 1
    assert _products(graphs[0]) == {form: SITES * (form == lowering) for form in bdlora.FORMS}

    # another adapter of the same shapes: new values, same graph
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(-0.5)
    peft_model.save_pretrained(tmp_path / "other")
    lora.load_adapter(tmp_path / "other")
    assert_close(fast(x).logits, peft_model(x).logits, f"backend ({lowering}) after load_adapter")  # grad mode
    assert lora.graphs_compiled == 1 and len(graphs) == 1
    assert _graph_breaks() == 0
    assert sum(counters["recompiles"].values()) == 0


def test_exported_program_matches_peft(tmp_path, lowering):
    base, peft_model, path = _peft_llama(tmp_path)
    x = token_input()
    ref = forward_backward(peft_model, x, lambda o: o.logits)
    ref_grads = peft_adapter_grads(peft_model)
    ep = lora_fx.transform(torch.export.export(base, (x,)), path, train=True)
    assert _products(Counter(str(n.target) for n in ep.graph.nodes)) == {
        form: SITES * (form == lowering) for form in bdlora.FORMS}
    module = ep.module()
    out = forward_backward(module, x, lambda o: o.logits)
    assert_close(out, ref, "transform(ep) forward")
    check_grads({k: module.get_parameter(k) for k in ref_grads}.items(), ref_grads, "transform(ep)")
    # a decomposed copy still carries (and saves) the same adapter
    decomposed = ep.run_decompositions()
    with torch.no_grad():
        assert_close(decomposed.module()(x).logits, ref, "run_decompositions()")
    lora_fx.save_adapter(decomposed, tmp_path / "again")
    with torch.no_grad():
        from peft import PeftModel

        assert_close(PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")(x).logits, ref, "PEFT reload")


def test_bf16_base_fp32_adapters_match_peft(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    _, peft_model, path = _peft_llama(tmp_path, base=base)
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if "lora_" in n)
    x = token_input()
    with torch.no_grad():
        ref = peft_model(x).logits
        lora = lora_fx.backend(path, inner="aot_eager")
        lora.parameters(base)
        out = torch.compile(base, backend=lora, fullgraph=True)(x).logits
    assert out.dtype == torch.bfloat16
    assert lora.adapters.entries["model.layers.1.mlp.down_proj"].tensors["lora_A.weight"].dtype == torch.float32
    # PEFT's arithmetic (fp32 adapter, added in fp32, rounded once); logits after 4 bf16 layers
    assert_close(out, ref, "bf16 base", rel=1e-2)


# -- files -------------------------------------------------------------------------------------

def test_lora_fx_save_loads_into_peft_with_peft_keys_and_shapes(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = lora_fx.LoraConfig(**LLAMA, use_bdlora=lora_fx.BdLoraConfig(**BD))
    model = tiny_llama()
    lora = lora_fx.backend(cfg, inner="aot_eager")
    lora.parameters(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in lora.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = token_input()
    with torch.no_grad():
        ours = torch.compile(model, backend=lora, fullgraph=True)(x).logits
    lora.save_adapter(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    _, _, peft_path = _peft_llama(tmp_path)
    peft_saved = load_file(peft_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in peft_saved.items()}
    assert saved["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (64, 4)   # (out, r/2)
    assert saved["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (8, 32)   # (r, in/2)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_bdlora"]
    assert written == {**BD, "match_strict": True}
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert peft_model.peft_config["default"].use_bdlora.nblocks == 2
    with torch.no_grad():
        assert_close(peft_model(x).logits, ours, "PEFT loading lora_fx's BdLoRA file")
        # and the program route reads it back the same
        ep = lora_fx.transform(torch.export.export(tiny_llama(), (x,)), tmp_path / "ours")
        assert_close(ep.module()(x).logits, ours, "transform(ep) loading lora_fx's file")


def test_loading_an_adapter_of_another_block_count_names_the_key(tmp_path):
    base, _, path2 = _peft_llama(tmp_path, "nb2")
    _, _, path4 = _peft_llama(tmp_path, "nb4", base=base, bd=dict(nblocks=4))
    lora = lora_fx.backend(path2, inner="aot_eager")
    lora.parameters(base)
    # layer 0 has r=4 (rank_pattern): its q_proj B is (64, 4/4) in the file, (64, 4/2) in the model
    with pytest.raises(lora_fx.AdapterFileError, match=r"layers\.0\.self_attn\.q_proj\.lora_B\.weight' has shape "
                                                        r"\(64, 1\), the model needs \(64, 2\)"):
        lora.load_adapter(path4)
    tamper_adapter_file(path2, lambda t: t.update({
        "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight": torch.zeros(96, 8)}))  # dense B
    with pytest.raises(lora_fx.AdapterFileError, match=r"layers\.2\.mlp\.up_proj\.lora_B\.weight' has shape \(96, 8\), "
                                                        r"the model needs \(96, 4\)"):
        lora_fx.transform(torch.export.export(base, (token_input(),)), path2)


# -- initialisation ----------------------------------------------------------------------------

@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_matches_peft(init):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    kwargs = dict(r=8, target_modules=["q_proj", "o_proj"], init_lora_weights=init)
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(use_bdlora=_peft_bd(), **kwargs))
    peft_t = {k.removeprefix("base_model.model.").replace(".default", ""): p.detach()
              for k, p in peft_model.named_parameters() if "lora_" in k}
    model = tiny_llama()
    lora = lora_fx.backend(lora_fx.LoraConfig(use_bdlora=lora_fx.BdLoraConfig(**BD), **kwargs), inner="aot_eager")
    torch.manual_seed(0)
    lora.parameters(model)
    ours = {k: p.detach() for k, p in lora.named_parameters()}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in peft_t.items()}
    for key in ours:
        mine, theirs = ours[key], peft_t[key]
        if "o_proj.lora_A" in key:  # block-diagonal A: kaiming_uniform_ defaults, fan_in = in / nblocks
            bound = math.sqrt(6 / (64 / 2))
            for t in (mine, theirs):
                assert 0.8 * bound < t.abs().max() <= bound, key
        elif "q_proj.lora_B" in key or (init is not False and "lora_B" in key):  # zero
            assert torch.count_nonzero(mine) == torch.count_nonzero(theirs) == 0, key
        else:  # dense factors: the same distribution as PEFT's
            assert torch.count_nonzero(mine) == mine.numel() and torch.count_nonzero(theirs) == theirs.numel(), key
            assert abs(mine.std().item() / theirs.std().item() - 1) < 0.25, key
    if init is not False:  # B zero everywhere: the fresh adapter is a no-op
        x = token_input()
        with torch.no_grad():
            assert_close(torch.compile(model, backend=lora, fullgraph=True)(x).logits, tiny_llama()(x).logits,
                         f"init={init!r} is a no-op")


# -- the graph -----------------------------------------------------------------------------------

class MLP(nn.Module):
    """A column-parallel `up` (block-diagonal B) then a row-parallel `down` (block-diagonal A)."""

    def __init__(self, d=16, h=24, o=8):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, o)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _mlp_cfg(**kw):
    return lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False,
                              use_bdlora=lora_fx.BdLoraConfig(target_modules_bd_a=["down"], target_modules_bd_b=["up"],
                                                              nblocks=2), **kw)


def _added(before, after):
    ops = Counter(str(n.target) for n in after.nodes if n.op == "call_function" and has_mark(n, ADAPTER))
    rest = Counter(str(n.target) for n in after.nodes if n.op == "call_function" and not has_mark(n, ADAPTER))
    assert rest == Counter(str(n.target) for n in before.nodes if n.op == "call_function"), "base nodes changed"
    return ops


def test_training_graph_per_site(lowering):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(3, 5, 16)
    ep = torch.export.export(model, (x,))
    ep2 = lora_fx.transform(ep, _mlp_cfg(), train=True)
    code = ep2.graph_module.code
    per_form = {  # the nodes of one block-diagonal product, beside the 2 linears, 2 muls, 2 adds of LoRA
        "expand": {"aten.reshape.default": 2, "aten.permute.default": 2, "aten.diag_embed.default": 1,
                   "aten.linear.default": 1},
        "einsum": {"aten.unflatten.int": 1, "aten.reshape.default": 1, "aten.einsum.default": 1,
                   "aten.flatten.using_ints": 1},
        "op": {BLOCK_OP: 1}}[lowering]
    want = Counter({"aten.linear.default": 2, "aten.mul.Tensor": 2, "aten.add.Tensor": 2})
    for op, count in per_form.items():
        want[op] += 2 * count  # two sites
    assert _added(ep.graph, ep2.graph) == want
    check = FileCheck().check("linear = torch.ops.aten.linear.default(x, p_up_weight, p_up_bias)") \
        .check("linear_default = torch.ops.aten.linear.default(x, p_up_lora_a_weight)") \
        .check("mul_tensor = torch.ops.aten.mul.Tensor(linear_default, b_up_lora_scaling)")
    # up (B block-diagonal): h = x·Aᵀ·s, then B's blocks on h's r/2-wide halves
    if lowering == "expand":
        check = check.check("reshape_default = torch.ops.aten.reshape.default(p_up_lora_b_weight, [2, 12, 2])") \
            .check("permute_default = torch.ops.aten.permute.default(reshape_default, [1, 2, 0])") \
            .check("diag_embed_default = torch.ops.aten.diag_embed.default(permute_default)") \
            .check("permute_default_1 = torch.ops.aten.permute.default(diag_embed_default, [2, 0, 3, 1])") \
            .check("reshape_default_1 = torch.ops.aten.reshape.default(permute_default_1, [24, 4])") \
            .check("linear_default_1 = torch.ops.aten.linear.default(mul_tensor, reshape_default_1)") \
            .check("add_tensor = torch.ops.aten.add.Tensor(linear, linear_default_1)")
        up_b = "linear_default_1"
    elif lowering == "einsum":
        check = check.check("unflatten_int = torch.ops.aten.unflatten.int(mul_tensor, -1, [2, 2])") \
            .check("reshape_default = torch.ops.aten.reshape.default(p_up_lora_b_weight, [2, 12, 2])") \
            .check("einsum_default = torch.ops.aten.einsum.default('...im,inm->...in', "
                   "[unflatten_int, reshape_default])") \
            .check("flatten_using_ints = torch.ops.aten.flatten.using_ints(einsum_default, -2, -1)") \
            .check("add_tensor = torch.ops.aten.add.Tensor(linear, flatten_using_ints)")
        up_b = "flatten_using_ints"
    else:
        check = check.check("block_diag_matmul_default = torch.ops.lora_fx.block_diag_matmul.default(mul_tensor, "
                            "p_up_lora_b_weight, 2)") \
            .check("add_tensor = torch.ops.aten.add.Tensor(linear, block_diag_matmul_default)")
        up_b = "block_diag_matmul_default"
    # down (A block-diagonal): A's blocks on the relu's 12-wide halves, then ·s, then the dense B
    check.check("relu = torch.ops.aten.relu.default(add_tensor)") \
        .check("linear_1 = torch.ops.aten.linear.default(relu, p_down_weight, p_down_bias)") \
        .check({"expand": "diag_embed_default_1 = torch.ops.aten.diag_embed.default",
                "einsum": "unflatten_int_1 = torch.ops.aten.unflatten.int(relu, -1, [2, 12])",
                "op": "block_diag_matmul_default_1 = torch.ops.lora_fx.block_diag_matmul.default(relu, "
                      "p_down_lora_a_weight, 2)"}[lowering]) \
        .check("mul_tensor_1 = torch.ops.aten.mul.Tensor(") \
        .check("torch.ops.aten.linear.default(mul_tensor_1, p_down_lora_b_weight, None)") \
        .check("add_tensor_1 = torch.ops.aten.add.Tensor(linear_1, ").run(code)
    assert f"add_tensor = torch.ops.aten.add.Tensor(linear, {up_b})" in code
    # the same numbers as the dense formula with the block-diagonal factor expanded
    t = {k: v.detach() for k, v in ep2.state_dict.items()}
    with torch.no_grad():
        h = model.up(x) + 2.0 * (x @ t["up.lora_A.weight"].T) @ block_diag_dense(t["up.lora_B.weight"], 2).T
        want = model.down(torch.relu(h)) + 2.0 * (torch.relu(h) @ block_diag_dense(t["down.lora_A.weight"], 2).T) \
            @ t["down.lora_B.weight"].T
        assert_close(ep2.module()(x), want, f"{lowering} graph vs the dense formula")


def test_unattached_backend_builds_the_adapters_from_the_graph(lowering):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(3, 5, 16)
    lora = lora_fx.backend(_mlp_cfg(), inner="aot_eager")  # not attached: adapters made at compile time
    fast = torch.compile(model, backend=lora, fullgraph=True)
    fast(x)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():  # the block-diagonal B starts at zero: give every factor values
        for _, p in lora.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = fast(x)
    assert lora.graphs_compiled == 1
    t = {k: v.detach() for k, v in lora.named_parameters()}
    assert t["down.lora_A.weight"].shape == (4, 12) and t["up.lora_B.weight"].shape == (24, 2)
    with torch.no_grad():
        h = model.up(x) + 2.0 * (x @ t["up.lora_A.weight"].T) @ block_diag_dense(t["up.lora_B.weight"], 2).T
        want = model.down(torch.relu(h)) + 2.0 * (torch.relu(h) @ block_diag_dense(t["down.lora_A.weight"], 2).T) \
            @ t["down.lora_B.weight"].T
    assert_close(out, want, f"unattached backend ({lowering})")
    assert (out - model(x)).abs().max() > 1e-3


def test_inference_graph_accumulates_a_block_diagonal_a_into_the_base_output():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(3, 5, 16)
    ep = torch.export.export(model, (x,))
    ep2 = lora_fx.transform(ep, _mlp_cfg())  # train=False: `down` (dense B) takes the addmm form
    # the default form on CPU: each block-diagonal factor expanded (reshape, permute, diag_embed, permute,
    # reshape) and applied by a linear; then down's h·s accumulates into its base output
    assert _added(ep.graph, ep2.graph) == Counter({
        "aten.linear.default": 3, "aten.mul.Tensor": 2, "aten.reshape.default": 7, "aten.permute.default": 4,
        "aten.diag_embed.default": 2, "aten.add.Tensor": 1, "aten.t.default": 1, "aten.addmm.default": 1})
    FileCheck().check("linear_1 = torch.ops.aten.linear.default(relu, p_down_weight, p_down_bias)") \
        .check("reshape_default_3 = torch.ops.aten.reshape.default(permute_default_3, [4, 24])") \
        .check("linear_default_2 = torch.ops.aten.linear.default(relu, reshape_default_3)") \
        .check("reshape_default_4 = torch.ops.aten.reshape.default(linear_default_2, [-1, 4])") \
        .check("mul_tensor_1 = torch.ops.aten.mul.Tensor(reshape_default_4, b_down_lora_scaling)") \
        .check("reshape_default_5 = torch.ops.aten.reshape.default(linear_1, [-1, 8])") \
        .check("addmm_default = torch.ops.aten.addmm.default(reshape_default_5, mul_tensor_1, t_default)") \
        .check("reshape_default_6 = torch.ops.aten.reshape.default(addmm_default, [3, 5, 8])") \
        .check("return (reshape_default_6,)").run(ep2.graph_module.code)
    train = lora_fx.transform(ep, _mlp_cfg(), train=True)
    lora_fx.program_adapters.adapters_of(train).load_peft_state_dict(
        lora_fx.program_adapters.adapters_of(ep2).peft_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ep2.module()(x), train.module()(x), rtol=1e-5, atol=1e-6)
        assert (ep2.module()(x) - model(x)).abs().max() > 1e-3


# -- per-layer choices and refusals --------------------------------------------------------------

def test_match_strict_false_gives_plain_lora_and_lora_bias_goes_with_a_dense_b(tmp_path):
    # q/v match no pattern: plain LoRA; o/down: block-diagonal A, a dense B that carries the bias
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_bias=True,
                  use_rslora=True, alpha_pattern={r"layers\.1\.mlp\.down_proj": 4})
    bd = dict(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=[], match_strict=False)
    base = tiny_llama()
    peft_model, path = peft_adapter(base, tmp_path, use_bdlora=_peft_bd(**bd), **kwargs)
    x = token_input()
    ref = forward_backward(peft_model, x, lambda o: o.logits)
    ref_grads = peft_adapter_grads(peft_model)
    assert ref_grads["model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (8, 64)       # plain
    assert ref_grads["model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (8, 32)       # block-diagonal
    ep = lora_fx.transform(torch.export.export(base, (x,)), path, train=True)
    module = ep.module()
    out = forward_backward(module, x, lambda o: o.logits)
    assert_close(out, ref, "match_strict=False + lora_bias forward")
    check_grads({k: module.get_parameter(k) for k in ref_grads}.items(), ref_grads, "match_strict=False + lora_bias")


def _peft_refuses(match: str, **kwargs):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with pytest.raises(ValueError, match=match):
        get_peft_model(tiny_llama(), PeftLoraConfig(**kwargs))


@pytest.mark.parametrize("case", ["both", "neither", "divisible", "embedding", "bias_b"])
def test_refusals_name_the_layer(case):
    target = ["q_proj", "v_proj", "o_proj"]
    cases = {
        # "proj" and "q_proj" are different patterns that both match q_proj
        "both": (dict(target_modules=target, bd=dict(target_modules_bd_a=["proj"], target_modules_bd_b=["q_proj"])),
                 lora_fx.ConfigError, r"layers\.0\.self_attn\.q_proj: its name matches both target_modules_bd_a "
                                      r"\['proj'\] and target_modules_bd_b \['q_proj'\]", "matches both"),
        "neither": (dict(target_modules=target, bd=dict(target_modules_bd_a=["o_proj"],
                                                        target_modules_bd_b=["q_proj"])),
                    lora_fx.ConfigError, r"layers\.0\.self_attn\.v_proj: its name matches neither .*match_strict",
                    "matches neither"),
        "divisible": (dict(target_modules=["o_proj"], bd=dict(target_modules_bd_a=["o_proj"], nblocks=3)),
                      lora_fx.ConfigError, r"layers\.0\.self_attn\.o_proj: a block-diagonal A with nblocks=3 needs "
                                           r"in_features and r divisible by 3; in_features=64 and r=8 are not",
                      "not divisible"),
        "embedding": (dict(target_modules=["embed_tokens", "q_proj"], bd=dict(target_modules_bd_b=["q_proj"],
                                                                              match_strict=False)),
                      lora_fx.UnsupportedFeatureError, r"model\.embed_tokens: block-diagonal LoRA \(use_bdlora\) "
                                                       r"adapts Linear and transformers Conv1D layers, not embedding "
                                                       r"layers \(class torch\.nn\.modules\.sparse\.Embedding\)",
                      "unsupported variant"),
        "bias_b": (dict(target_modules=["q_proj"], lora_bias=True, bd=dict(target_modules_bd_b=["q_proj"])),
                   lora_fx.UnsupportedFeatureError, r"layers\.0\.self_attn\.q_proj: lora_bias=True with a "
                                                    r"block-diagonal B", None),
    }
    kwargs, error, match, peft_match = cases[case]
    bd = {"target_modules_bd_a": None, "target_modules_bd_b": None, "nblocks": 2, **kwargs.pop("bd")}
    cfg = lora_fx.LoraConfig(r=8, use_bdlora=lora_fx.BdLoraConfig(**bd), **kwargs)
    lora = lora_fx.backend(cfg, inner="aot_eager")
    with pytest.raises(error, match=match):
        lora.parameters(tiny_llama())
    with pytest.raises(error, match=match):  # the program route checks the same
        lora_fx.transform(torch.export.export(tiny_llama(), (token_input(),)), cfg)
    if peft_match is not None:  # PEFT refuses these too
        from peft import BdLoraConfig as PeftBdLoraConfig

        _peft_refuses(peft_match, r=8, use_bdlora=PeftBdLoraConfig(**bd), **kwargs)


# -- merging ---------------------------------------------------------------------------------------

def test_merge_on_a_bf16_base_is_peft_bit_for_bit(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    base, peft_model, path = _peft_llama(tmp_path, base=base)
    x = token_input()
    merged = lora_fx.merge(lora_fx.transform(torch.export.export(base, (x,)), path))
    peft_merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert merged.state_dict[key].dtype == torch.bfloat16
        assert torch.equal(merged.state_dict[key], peft_merged[key]), key


def test_merge_matches_peft_and_unmerges_exactly(tmp_path):
    base, peft_model, path = _peft_llama(tmp_path)
    x = token_input()
    with torch.no_grad():
        ref = peft_model(x).logits
    ep = lora_fx.transform(torch.export.export(base, (x,)), path)
    merged = lora_fx.merge(ep)
    peft_merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(merged.state_dict[key], peft_merged[key], rtol=1e-6, atol=1e-6, msg=key)
    with torch.no_grad():
        assert_close(merged.module()(x).logits, ref, "merged program")
    again = lora_fx.unmerge(merged)
    assert all(torch.equal(again.state_dict[k], v) for k, v in ep.state_dict.items())
    approx = lora_fx.unmerge(lora_fx.merge(ep, keep_original=False))
    for key, value in ep.state_dict.items():
        torch.testing.assert_close(approx.state_dict[key], value, rtol=1e-5, atol=1e-6, msg=key)

    lora = lora_fx.backend(path, inner="aot_eager")  # the backend merges in place, unmerges bit for bit
    lora.parameters(base)
    before = {k: v.clone() for k, v in base_state(base).items()}
    fast = torch.compile(base, backend=lora, fullgraph=True)
    lora_fx.merge(lora)
    with torch.no_grad():
        assert_close(fast(x).logits, ref, "backend merged")
        assert not torch.equal(base.model.layers[1].mlp.down_proj.weight, before["model.layers.1.mlp.down_proj.weight"])
    lora_fx.unmerge(lora)
    assert all(torch.equal(v, before[k]) for k, v in base_state(base).items())
    with torch.no_grad():
        assert_close(fast(x).logits, ref, "backend unmerged")


# -- GPT-2 Conv1D: against the dense equivalent (PEFT cannot build BdLoRA on Conv1D) -------------------

def _gpt2_dense_equivalent(tensors: dict[str, torch.Tensor], nblocks: int) -> dict[str, torch.Tensor]:
    """BdLoRA tensors (lora_fx names) with every block-diagonal factor expanded: a plain LoRA adapter."""
    out = {}
    for key, t in tensors.items():
        if key.endswith("lora_A.weight") and ".mlp.c_proj" in key:
            t = block_diag_dense(t, nblocks)
        elif key.endswith("lora_B.weight") and ".mlp.c_proj" not in key:
            t = block_diag_dense(t, nblocks)
        out[key] = t
    return out


def test_gpt2_conv1d_equals_plain_lora_with_the_blocks_expanded(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "mlp.c_proj"])
    cfg = lora_fx.LoraConfig(**targets, use_bdlora=lora_fx.BdLoraConfig(
        target_modules_bd_a=["mlp.c_proj"], target_modules_bd_b=["c_attn", "c_fc"], nblocks=2))
    model = tiny_gpt2()
    lora = lora_fx.backend(cfg, inner="aot_eager")
    lora.parameters(model)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, p in lora.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    params = dict(lora.named_parameters())
    assert params["transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 2)
    assert params["transformer.h.0.mlp.c_proj.lora_A.weight"].shape == (4, 64)
    x = token_input()
    out = forward_backward(torch.compile(model, backend=lora, fullgraph=True), x, lambda o: o.logits)

    dense = _gpt2_dense_equivalent({k: p.detach() for k, p in params.items()}, 2)
    peft_model = get_peft_model(tiny_gpt2(), PeftLoraConfig(**targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            key = name.removeprefix("base_model.model.").replace(".default", "")
            if key in dense:
                p.copy_(dense[key])
    ref = forward_backward(peft_model, x, lambda o: o.logits)
    assert_close(out, ref, "GPT-2 BdLoRA vs plain LoRA with the blocks expanded")
    for key, p in params.items():  # a compact factor's gradient is the dense one's diagonal blocks
        ref_grad = peft_adapter_grads(peft_model)[key]
        if p.shape != ref_grad.shape:
            rows = ref_grad.shape[0] // 2
            cols = p.shape[1]
            ref_grad = torch.cat([ref_grad[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] for i in range(2)])
        assert_close(p.grad, ref_grad, f"grad of {key}")
    ep = lora_fx.transform(torch.export.export(tiny_gpt2(), (x,)), cfg)  # merge: Conv1D's (in, out) layout
    lora_fx.program_adapters.adapters_of(ep).load_peft_state_dict(lora.adapters.peft_state_dict())
    merged = lora_fx.merge(ep)
    with torch.no_grad():
        assert_close(merged.module()(x).logits, ref, "merged Conv1D BdLoRA")


# -- the benchmark ----------------------------------------------------------------------------------

def test_block_diag_bench_smoke():
    from bench.harness import main

    table = main(["--block-diag", "--smoke"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| form") and "---" not in line}
    assert list(rows) == ["base", "LoRA (dense)"] + [f"BdLoRA {f} {form}" for f in "AB" for form in bdlora.FORMS]
    for name, cells in rows.items():
        assert all(float(c.strip()) > 0 for c in cells[:4]), (name, cells)


def test_docs_example_runs():
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bdlora.md"
    example = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)[0]
    assert "use_bdlora=lora_fx.BdLoraConfig" in example and "fullgraph=True" in example
    exec(compile(example, "docs/bdlora.md", "exec"), {})
