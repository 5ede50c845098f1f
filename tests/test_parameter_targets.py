"""Raw-parameter targets (`target_parameters`): MoE experts stored as 3-D tensors, 2-D weights read
by any op. Build model -> adapt (backend / transform) -> assert the graph's form -> assert numbers
(forward and the gradients of A and B) against PEFT's `ParamWrapper` on the same adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, check_grads, forward_backward, peft_adapter, peft_adapter_grads
from torch import nn

import lora_fx
from lora_fx.layer_kinds.base import target_name
from lora_fx.marks import ADAPTER, has_mark


def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], use_cache=False)).eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, use_cache=False)).eval()


MOE = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral}
CONFIGS = {
    "experts": dict(r=2, lora_alpha=4, target_modules=[],
                    target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    "all-linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "experts+attention": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                              target_parameters=["mlp.experts.down_proj", "experts.gate_up_proj"],
                              rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.1\..*gate_up_proj": 16}),
}


def ids(batch=2, seq=6):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(1))


def grouped_mm_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "grouped_mm" in target_name(n))


def full_delta_bmms(gm, model: nn.Module) -> int:
    """Adapter nodes computing a tensor of an expert stack's shape (the weight form's delta)."""
    stacks = {tuple(p.shape) for p in model.parameters() if p.dim() == 3}
    return sum(1 for n in gm.graph.nodes if has_mark(n, ADAPTER) and target_name(n) == "bmm"
               and n.meta.get("val") is not None and tuple(n.meta["val"].shape) in stacks)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("model", sorted(MOE))
def test_moe_backend_matches_peft(model, config, tmp_path):
    base = MOE[model]()
    peft_model, path = peft_adapter(base, tmp_path, **CONFIGS[config])
    x = ids()
    expected = forward_backward(peft_model, x, lambda o: o.logits)

    graphs = []

    def spy(gm, example_inputs):
        graphs.append(copy.deepcopy(gm))
        return gm

    lora = lora_fx.backend(path, inner=spy)
    model_ = copy.deepcopy(base)
    lora.parameters(model_)
    params = dict(lora.named_parameters())
    out = forward_backward(torch.compile(model_, backend=lora, fullgraph=True), x, lambda o: o.logits)

    assert len(graphs) == 1
    # The factored form: each adapted expert stack adds two grouped matmuls of rank r to the
    # base's two per layer, and no expert-stack-sized delta is built.
    n_params = sum(1 for e in lora.adapters.entries.values() if e.resolved.layer.num_experts > 1)
    assert n_params == 4  # gate_up_proj and down_proj in each of the two layers
    assert grouped_mm_calls(graphs[0]) == 2 * 2 + 2 * n_params
    assert full_delta_bmms(graphs[0], base) == 0
    assert_close(out, expected, "logits")
    check_grads(params, peft_adapter_grads(peft_model), f"{model}/{config}")


@pytest.mark.parametrize("model", sorted(MOE))
def test_moe_transform_matches_peft_and_merges(model, tmp_path):
    base = MOE[model]()
    peft_model, path = peft_adapter(base, tmp_path, **CONFIGS["all-linear"])
    x = ids()
    with torch.no_grad():
        expected = peft_model(x).logits
    ep = torch.export.export(base, (), {"input_ids": x})
    adapted = lora_fx.transform(ep, path)
    assert grouped_mm_calls(adapted.graph_module) == 2 * 2 + 2 * 4
    assert_close(adapted.module()(input_ids=x).logits, expected, "transform logits")

    merged = lora_fx.merge(adapted)
    assert grouped_mm_calls(merged.graph_module) == 2 * 2  # the base program's form again
    assert_close(merged.module()(input_ids=x).logits, expected, "merged logits", rel=1e-4)
    again = lora_fx.unmerge(merged)
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                "model.layers.0.mlp.gate.weight"):
        assert torch.equal(again.state_dict[key], adapted.state_dict[key]), key

    gm = lora_fx.transform(ep.module(), path)  # the GraphModule route
    assert grouped_mm_calls(gm) == 2 * 2 + 2 * 4
    assert_close(gm(input_ids=x).logits, expected, "GraphModule logits")

    out_dir = tmp_path / "again"
    lora_fx.save_adapter(adapted, out_dir)
    from safetensors.torch import load_file
    assert load_file(out_dir / "adapter_model.safetensors").keys() == \
        load_file(path / "adapter_model.safetensors").keys()


def test_moe_backend_merge_load_and_scale_recompile_nothing(tmp_path):
    base = tiny_qwen3_moe()
    _, path = peft_adapter(base, tmp_path, **CONFIGS["experts"])
    _, other = peft_adapter(base, tmp_path, "other", **{**CONFIGS["experts"], "lora_alpha": 8})
    x = ids()
    lora = lora_fx.backend(path, inner="aot_eager")
    model = copy.deepcopy(base)
    lora.parameters(model)
    compiled = torch.compile(model, backend=lora, fullgraph=True)
    with torch.no_grad():
        first = compiled(x).logits
        lora.load_adapter(other)
        second = compiled(x).logits
        lora.set_scale(0.0)
        plain = compiled(x).logits
        lora.set_scale(1.0)
    assert lora.graphs_compiled == 1
    assert not torch.allclose(first, second)
    assert_close(plain, base(x).logits, "scale 0")

    weight = model.model.layers[0].mlp.experts.gate_up_proj
    original = weight.detach().clone()
    lora_fx.merge(lora)
    with torch.no_grad():
        assert_close(model(x).logits, second, "eager merged model", rel=1e-4)
    lora_fx.unmerge(lora)
    assert torch.equal(weight, original)


class Stacked(nn.Module):
    """Experts read by an einsum (no grouped matmul): the weight form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5, 4) * 0.3)  # (E, out, in)
        self.router = nn.Parameter(torch.randn(3, 4) * 0.3)

    def forward(self, x):  # x: (B, 4)
        gates = torch.softmax(x @ self.router.t(), -1)           # (B, E)
        per_expert = torch.einsum("bi,eoi->beo", x, self.w)     # (B, E, out)
        return (gates.unsqueeze(-1) * per_expert).sum(1)


class StackedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Stacked()

    def forward(self, x):
        return self.experts(x)


@pytest.mark.parametrize("route", ["backend", "transform", "graph_module"])
def test_weight_form_for_other_reads_matches_peft(route, tmp_path):
    torch.manual_seed(0)
    base = StackedModel()
    peft_model, path = peft_adapter(base, tmp_path, r=2, lora_alpha=6, target_modules=[],
                                    target_parameters=["experts.w", "experts.router"])
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    expected = forward_backward(peft_model, x)
    if route == "backend":
        lora = lora_fx.backend(path, inner="aot_eager")
        model = copy.deepcopy(base)
        lora.parameters(model)
        params = dict(lora.named_parameters())
        out = forward_backward(torch.compile(model, backend=lora, fullgraph=True), x)
    elif route == "graph_module":
        adapted = lora_fx.transform(torch.export.export(base, (x,)).module(), path, train=True)
        assert full_delta_bmms(adapted, base) == 1
        with torch.no_grad():
            assert_close(adapted(x), expected)
        return
    else:
        adapted = lora_fx.transform(torch.export.export(base, (x,)), path, train=True)
        assert full_delta_bmms(adapted.graph_module, base) == 1  # W + s·B·A, once for the expert stack
        module = adapted.module()
        out = forward_backward(module, x)
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert_close(out, expected)
    check_grads(params, peft_adapter_grads(peft_model), route)


def test_parameter_targets_bad_input(tmp_path):
    base = tiny_qwen3_moe()
    x = ids()
    ep = torch.export.export(base, (), {"input_ids": x})
    with pytest.raises(lora_fx.TargetNotFoundError, match=r"'experts.gate_proj'.*closest.*gate_up_proj"):
        lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=[], target_parameters=["experts.gate_proj"]))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"input_layernorm.weight.*\(32,\).*no LoRA form"):
        lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=[],
                                                 target_parameters=["layers.0.input_layernorm.weight"]))
    with pytest.raises(lora_fx.ConfigError, match=r"gate_up_proj.*lora_dropout"):
        lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=[], lora_dropout=0.1,
                                                 target_parameters=["experts.gate_up_proj"]))
    with pytest.raises(lora_fx.ConfigError, match=r"q_proj.weight.*target_modules selects its module"):
        lora_fx.transform(ep, lora_fx.LoraConfig(r=2, target_modules=["q_proj"],
                                                 target_parameters=["self_attn.q_proj.weight"]))


@pytest.mark.parametrize("r,padded", [(2, True), (8, False)])
def test_bf16_experts_with_a_rank_grouped_mm_cannot_take_are_padded(r, padded, tmp_path):
    # bf16 experts run on aten._grouped_mm (CPU and CUDA), which wants 16-byte aligned strides:
    # rank-r operands need r a multiple of 8. Other ranks get zero ranks added (same product).
    base = tiny_qwen3_moe().to(torch.bfloat16)
    peft_model, path = peft_adapter(base, tmp_path, **{**CONFIGS["experts"], "r": r})
    x = ids()
    expected = forward_backward(peft_model, x, lambda o: o.logits.float())
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(copy.deepcopy(gm))
        return gm

    model = copy.deepcopy(base)
    lora = lora_fx.backend(path, inner=spy)
    lora.parameters(model)
    params = dict(lora.named_parameters())
    out = forward_backward(torch.compile(model, backend=lora, fullgraph=True), x, lambda o: o.logits.float())
    pads = sum(1 for n in graphs[0].graph.nodes if has_mark(n, ADAPTER) and target_name(n) == "constant_pad_nd")
    assert pads == (2 * 4 if padded else 0)  # A and B of each of the 4 expert stacks
    assert grouped_mm_calls(graphs[0]) == 2 * 2 + 2 * 4
    # bf16: PEFT builds W + s·B·A in bf16, lora_fx the factored form; the spread is the same at r=8.
    assert_close(out, expected, "logits", rel=2e-2)
    check_grads(params, peft_adapter_grads(peft_model), f"bf16 r={r}", rel=5e-2)


@pytest.mark.parametrize("r", [2, 8])
def test_bf16_experts_factored_form_runs_under_inductor(r, tmp_path):
    # Inductor lays out the copy of B as (E, out, r) in the order it reads B (rank-major, experts
    # innermost) unless pinned; aten._grouped_mm refuses those strides ("Invalid strides/sizes").
    base = tiny_qwen3_moe().to(torch.bfloat16)
    peft_model, path = peft_adapter(base, tmp_path, **{**CONFIGS["experts"], "r": r})
    x = ids()
    expected = forward_backward(peft_model, x, lambda o: o.logits.float())
    model = copy.deepcopy(base)
    lora = lora_fx.backend(path, inner="inductor")
    lora.parameters(model)
    params = dict(lora.named_parameters())
    out = forward_backward(torch.compile(model, backend=lora, fullgraph=True), x, lambda o: o.logits.float())
    assert lora.graphs_compiled == 1
    assert_close(out, expected, "logits", rel=2e-2)
    check_grads(params, peft_adapter_grads(peft_model), f"bf16 inductor r={r}", rel=5e-2)
