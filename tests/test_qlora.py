"""QLoRA: adapters on bitsandbytes 4-bit (nf4, fp4) and 8-bit linears, loaded the way users load
them (`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`). Build the quantized
model -> adapt through the backend -> assert the graph's form -> assert numbers against PEFT's
bitsandbytes LoRA layers on an identical copy (forward, the gradients of A and B, and the loss of
every step of a short training run)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, check_grads, forward_backward, peft_adapter_grads, raised_while_compiling

import lora_fx
from lora_fx.layer_kinds.base import target_name
from lora_fx.marks import ADAPTER, BASE, has_mark

pytest.importorskip("bitsandbytes")

LINEARS = 7  # q, k, v, o, gate, up, down per decoder layer
LAYERS = 2


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved to disk: quantized models come from `from_pretrained`. Sizes are multiples
    of 64 (bitsandbytes' CPU kernels want whole blocks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         use_cache=False))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


QUANT = {
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    # bf16 compute on a bf16 model: the base output is bf16 and the fp32 adapter's output is rounded
    # to it before the add (PEFT's order).
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                     bnb_4bit_use_double_quant=True),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True, llm_int8_threshold=0.0),
}
MODEL_DTYPE = {"nf4-bf16": torch.bfloat16, "fp4-bf16": torch.bfloat16}


def load(path, quant: str):
    """The quantized model. bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on the first
    no-grad eval call, a mutation Dynamo cannot trace (the base model fails to compile too); it is
    turned off so that the test takes the same path on every CPU."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT[quant]),
                                             dtype=MODEL_DTYPE.get(quant, torch.float32))
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def ids(batch=2, seq=8):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def peft_on(model, tmp_path, **cfg):
    """PEFT's LoRA over `model` with random nonzero factors, and its saved directory."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(123)
    peft_model = get_peft_model(model, PeftLoraConfig(init_lora_weights=False, **cfg))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model, tmp_path / "adapter"


def spy_backend(spec, graphs):
    def spy(gm, example_inputs):
        graphs.append(copy.deepcopy(gm))
        return gm

    return lora_fx.backend(spec, inner=spy)


def adapted_outputs(gm) -> int:
    """Module outputs that got an adapter (BASE-marked nodes)."""
    return sum(1 for n in gm.graph.nodes if has_mark(n, BASE))


CFG = dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={r"layers\.0\..*_proj": 2})


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_qlora_backend_matches_peft(llama_dir, quant, tmp_path):
    peft_model, path = peft_on(load(llama_dir, quant), tmp_path, **CFG)
    peft_model.train()
    x = ids()
    expected = forward_backward(peft_model, x, lambda o: o.logits)

    graphs = []
    lora = spy_backend(path, graphs)
    model = load(llama_dir, quant).train()
    lora.parameters(model)
    kind = "linear8bit" if quant == "int8" else "linear4bit"
    assert {str(e.resolved.layer.kind) for e in lora.adapters.entries.values()} == {kind}
    assert len(lora.adapters.entries) == LINEARS * LAYERS  # all-linear: every quantized linear, not lm_head
    params = dict(lora.named_parameters())
    out = forward_backward(torch.compile(model, backend=lora, fullgraph=True), x, lambda o: o.logits)

    assert len(graphs) == 1
    gm = graphs[0]
    assert adapted_outputs(gm) == LINEARS * LAYERS
    # The adapter is built outside the quantized op: two rank-r linears per layer; the base
    # layers' own ops are untouched and no adapter node reads a quantized tensor.
    adapter_linears = [n for n in gm.graph.nodes if has_mark(n, ADAPTER) and target_name(n) == "linear"]
    assert len(adapter_linears) == 2 * LINEARS * LAYERS
    assert_close(out, expected, "logits")
    # A bf16 model's backward rounds differently once compiled (AOTAutograd's decompositions): the
    # same spread as on an unquantized bf16 Llama against PEFT (measured ~1.5% of the largest grad).
    check_grads(params, peft_adapter_grads(peft_model), quant, rel=3e-2 if MODEL_DTYPE.get(quant) else 1e-5)


def test_qlora_training_losses_follow_peft_step_by_step(llama_dir, tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model, path = peft_on(load(llama_dir, "nf4-fp32"), tmp_path, **cfg)
    model = load(llama_dir, "nf4-fp32")
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(model)
    compiled = torch.compile(model, backend=lora, fullgraph=True)

    def train(forward, params, steps=6):
        optimizer = torch.optim.AdamW(params, lr=2e-2)
        losses = []
        x = ids()  # one batch, learnt by heart
        for _ in range(steps):
            loss = forward(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    peft_model.train()
    model.train()
    ours = train(compiled, list(lora.parameters()))
    theirs = train(peft_model, [p for p in peft_model.parameters() if p.requires_grad])
    assert lora.graphs_compiled == 1
    assert ours[-1] < ours[0] - 0.05, ours  # it learns
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: lora_fx {a} vs PEFT {b}"


def test_qlora_load_and_scale_recompile_nothing(llama_dir, tmp_path):
    _, path = peft_on(load(llama_dir, "nf4-fp32"), tmp_path, **CFG)
    base = load(llama_dir, "nf4-fp32").eval()
    x = ids()
    with torch.no_grad():
        plain = base(x).logits
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(base)
    compiled = torch.compile(base, backend=lora, fullgraph=True)
    with torch.no_grad():
        adapted = compiled(x).logits
        lora.set_scale(0.0)
        off = compiled(x).logits
    assert lora.graphs_compiled == 1
    assert not torch.allclose(adapted, plain)
    assert_close(off, plain, "scale 0")


def test_qlora_unattached_backend_finds_the_quantized_layers(llama_dir, tmp_path):
    # No lora.parameters(model): the layers are read from the Dynamo graph alone.
    peft_model, path = peft_on(load(llama_dir, "fp4-fp32"), tmp_path, **CFG)
    x = ids()
    with torch.no_grad():
        expected = peft_model(x).logits
    lora = lora_fx.backend(path, inner="aot_eager")
    with torch.no_grad():
        out = torch.compile(load(llama_dir, "fp4-fp32"), backend=lora, fullgraph=True)(x).logits
    assert len(lora.adapters.entries) == LINEARS * LAYERS
    assert {e.resolved.layer.in_features for e in lora.adapters.entries.values()} == {64, 128}
    assert_close(out, expected, "logits")


def test_qlora_saves_peft_keys(llama_dir, tmp_path):
    _, path = peft_on(load(llama_dir, "nf4-fp32"), tmp_path, **CFG)
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(load(llama_dir, "nf4-fp32"))
    lora.save_adapter(tmp_path / "again")
    from safetensors.torch import load_file
    ours, theirs = load_file(tmp_path / "again" / "adapter_model.safetensors"), load_file(
        path / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_qlora_inference_on_cpu_repacked_weights_matches_peft(llama_dir, tmp_path):
    # On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights on the first eager no-grad eval call
    # and then runs another op (gemv_4bit); the adapter sits at the module's boundary either way.
    # (On other CPUs nothing is repacked and this is the plain path again.)
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    def load_packing():
        return LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=BitsAndBytesConfig(
            **QUANT["nf4-fp32"])).eval()

    peft_model, path = peft_on(load_packing(), tmp_path, **CFG)
    x = ids()
    model = load_packing()
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(model)
    with torch.no_grad():
        expected = peft_model.eval()(x).logits
        model(x)  # eager: repacks where the CPU supports it
        out = torch.compile(model, backend=lora, fullgraph=True)(x).logits
    assert_close(out, expected, "logits")
    if getattr(model.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False):
        # Training through repacked weights: the packed op has no gradient; refused by name.
        with raised_while_compiling(lora_fx.UnsupportedFeatureError,
                                    r"layer 'model.layers.0.self_attn.o_proj': bitsandbytes repacked"):
            torch.compile(model.train(), backend=lora, fullgraph=True)(x)


class Chain(torch.nn.Module):
    """4-bit layers back to back (one's output is the next one's input, no op between), and one
    of them called twice in a loop: each call's adapter must read the adapted input."""

    def __init__(self):
        import bitsandbytes as bnb

        super().__init__()
        torch.manual_seed(0)
        self.a = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
        self.b = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="fp4").to("cpu")
        for layer in (self.a, self.b):
            layer.support_avx512bf16_for_cpu = False
        self.is_loaded_in_4bit = True  # how PEFT knows to wrap bitsandbytes layers with its own

    def forward(self, x):
        for _ in range(2):
            x = self.a(x)
        return self.b(x)


def test_quantized_layers_back_to_back_and_in_a_loop_match_peft(tmp_path):
    peft_model, path = peft_on(Chain(), tmp_path, r=4, lora_alpha=8, target_modules=["a", "b"])
    peft_model.train()
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    expected = forward_backward(peft_model, x)
    model = Chain()
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(model)
    params = dict(lora.named_parameters())
    out = forward_backward(torch.compile(model.train(), backend=lora, fullgraph=True), x)
    assert_close(out, expected, "output")
    check_grads(params, peft_adapter_grads(peft_model), "chain")


# -- what lora_fx refuses, by name ---------------------------------------------------------------

def test_merging_into_a_quantized_base_is_refused_with_the_reason(llama_dir, tmp_path):
    _, path = peft_on(load(llama_dir, "nf4-fp32"), tmp_path, **CFG)
    lora = lora_fx.backend(path, inner="aot_eager")
    model = load(llama_dir, "nf4-fp32")
    lora.parameters(model)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.raises(lora_fx.UnsupportedFeatureError,
                       match=r"'model.layers.0.self_attn.q_proj'.*quantized \(bitsandbytes 4-bit\).*unquantized"):
        lora_fx.merge(lora)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_unsupported_4bit_quant_type_is_refused_by_name(llama_dir):
    model = load(llama_dir, "nf4-fp32")
    model.model.layers[1].mlp.up_proj.weight.quant_state.quant_type = "int4"  # not a type bitsandbytes makes
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules="all-linear"), inner="aot_eager")
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"'model.layers.1.mlp.up_proj'.*'int4'.*nf4 and fp4"):
        lora.parameters(model)


def test_dora_on_a_quantized_base_is_refused_by_name(llama_dir):
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), inner="aot_eager")
    with pytest.raises(lora_fx.ConfigError, match=r"model.layers.0.self_attn.q_proj: DoRA on a quantized base"):
        lora.parameters(load(llama_dir, "nf4-fp32"))


def test_a_graph_break_at_a_quantized_layer_keeps_its_adapter(llama_dir, tmp_path):
    # A graph break right before the layer's forward (a pre-hook printing, logging...): the layer
    # runs in a graph of its own frame; it must still get its adapter, under its own name.
    peft_model, path = peft_on(load(llama_dir, "nf4-fp32"), tmp_path, r=4, lora_alpha=8,
                               target_modules=["q_proj", "down_proj"])
    x = ids()
    with torch.no_grad():
        expected = peft_model(x).logits
    model = load(llama_dir, "nf4-fp32").eval()
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(model)
    with torch.no_grad():
        out = torch.compile(model, backend=lora)(x).logits
    assert_close(out, expected, "logits")


def test_a_quantized_layer_split_by_a_graph_break_is_refused_not_skipped(llama_dir):
    # A graph break inside the layer's forward: Dynamo runs that forward as frames of its own, whose
    # graphs read the layer's weight with no call of the layer around it. Adapting nothing there
    # would silently drop the adapter.
    import bitsandbytes as bnb

    class Chatty(bnb.nn.Linear4bit):
        def forward(self, x):
            torch._dynamo.graph_break()
            return super().forward(x)

    model = load(llama_dir, "nf4-fp32").eval()
    model.model.layers[0].self_attn.q_proj.__class__ = Chatty
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["q_proj"]), inner="aot_eager")
    lora.parameters(model)
    with raised_while_compiling(lora_fx.UnsupportedFeatureError,
                                r"'model.layers.0.self_attn.q_proj' has an adapter.*does not run whole"):
        with torch.no_grad():
            torch.compile(model, backend=lora)(ids())


def test_a_checkpointed_quantized_layer_is_refused_not_skipped(llama_dir):
    # transformers' gradient checkpointing (what PEFT's prepare_model_for_kbit_training turns on)
    # runs each decoder layer inside a higher-order op's subgraph.
    model = load(llama_dir, "nf4-fp32").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["q_proj"]), inner="aot_eager")
    lora.parameters(model)
    with raised_while_compiling(lora_fx.UnsupportedFeatureError,
                                r"'model.layers.0.self_attn.q_proj'.*inside the subgraph of a higher-order op"):
        torch.compile(model, backend=lora)(ids())


def test_int8_inference_kernels_are_refused_where_gradients_would_flow_through_them(llama_dir):
    # bitsandbytes' CPU eval path (its CUDA path, training included) quantizes the input and runs an
    # int8 matmul, which Dynamo inlines without a gradient.
    model = load(llama_dir, "int8").eval()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules="all-linear"), inner="aot_eager")
    lora.parameters(model)
    with raised_while_compiling(lora_fx.UnsupportedFeatureError,
                                r"layer 'model.layers.0.self_attn.o_proj': bitsandbytes' 8-bit inference kernels"):
        torch.compile(model, backend=lora, fullgraph=True)(ids())
    with torch.no_grad():  # inference: nothing flows back through them
        out = torch.compile(model, backend=lora, fullgraph=True)(ids()).logits
    assert torch.isfinite(out).all()


def test_quantization_statistics_are_not_parameter_targets(llama_dir):
    model = load(llama_dir, "nf4-fp32")
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=[], target_parameters=["quant_state.absmax"]),
                           inner="aot_eager")
    with raised_while_compiling(lora_fx.TargetNotFoundError, r"'quant_state.absmax' matches no parameter"):
        with torch.no_grad():
            torch.compile(model, backend=lora)(ids())


@pytest.mark.parametrize("quant", ["nf4-fp32", "int8"])
def test_named_adapters_on_a_quantized_base_mixed_rows_equal_each_row_alone(quant, llama_dir, tmp_path):
    """Two named adapters on a 4-bit / 8-bit base, one per row of a batch: the logits of each row
    and each adapter's gradients equal those of its row run with that adapter alone (itself PEFT's,
    checked for adapter "a")."""
    peft_model, dir_a = peft_on(load(llama_dir, quant), tmp_path / "a", **CFG)
    _, dir_b = peft_on(load(llama_dir, quant), tmp_path / "b", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = load(llama_dir, quant).train()  # 8-bit layers train only on bitsandbytes' CPU training path
    lora = lora_fx.backend({"a": dir_a, "b": dir_b}, inner="aot_eager").attach(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    x = ids()
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}  # every adapter's, in-model names

    def run(selection, batch):
        lora.set_adapter(selection)
        for p in params.values():
            p.grad = None
        out = fast(batch).logits
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    mixed, mixed_grads = run(["a", "b"], x)
    for row, name in enumerate("ab"):
        alone, grads = run(name, x[row:row + 1])
        assert_close(mixed[row], alone[0], f"{quant} row {row}")
        assert grads and all(f".{name}." in n for n in grads)  # the other adapter is frozen
        for n, g in grads.items():  # the mixed loss is the mean over both rows: half of a row's own
            assert_close(mixed_grads[n] * 2, g, f"{quant}: grad of {n}", rel=1e-4)
    expected = forward_backward(peft_model.train(), x[:1], lambda o: o.logits.float())
    lora.set_adapter("a")
    assert_close(fast(x[:1]).logits.detach().float(), expected, f"{quant} vs PEFT")
