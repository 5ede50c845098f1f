"""Compiler behaviour: one graph, zero graph breaks, zero recompiles when adapter values change."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, assert_close, peft_reference, tiny_llama, token_input
from torch._dynamo.utils import counters

import lora_fx


def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


def test_llama_one_graph_and_no_recompile_on_adapter_swap(tmp_path):
    base, peft_a, path_a = peft_reference("llama", tmp_path)
    # A second adapter of the same shapes, different values.
    with torch.no_grad():
        for n, p in peft_a.named_parameters():
            if "lora_" in n:
                p.mul_(-0.5)
    path_b = tmp_path / "b"
    peft_a.save_pretrained(path_b)
    x = token_input()
    ref_b = peft_a(x).logits

    _fresh_dynamo()
    lora = lora_fx.backend(path_a, inner="aot_eager")
    lora.parameters(base)
    fast = torch.compile(base, backend=lora, fullgraph=True)
    out_a = fast(x).logits
    lora.load_adapter(path_b)
    out_b = fast(x).logits
    assert_close(out_b, ref_b, "after load_adapter")
    assert (out_a - out_b).abs().max() > 1e-3, "swapping adapters changed nothing"
    assert lora.graphs_compiled == 1
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert sum(counters["recompiles"].values()) == 0 if "recompiles" in counters else True


def test_scale_change_and_disable_do_not_recompile():
    _fresh_dynamo()
    model = tiny_llama()
    x = token_input()
    with torch.no_grad():
        base_out = model(x).logits
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                           inner="aot_eager")
    lora.parameters(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    with torch.no_grad():
        adapted = fast(x).logits
        lora.set_scale(0.0)
        disabled = fast(x).logits
    assert (adapted - base_out).abs().max() > 1e-3
    assert_close(disabled, base_out, "scale 0 == base model")
    assert lora.graphs_compiled == 1
    assert counters["stats"]["unique_graphs"] == 1


def test_training_loss_falls_and_only_adapters_train():
    _fresh_dynamo()
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = lora_fx.backend(lora_fx.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), inner="aot_eager")
    params = lora.parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    ids = (torch.arange(16) % 5 + 1).repeat(2, 1)
    losses = []
    for _ in range(8):
        loss = fast(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    adapters = {id(p) for p in params}
    for n, p in model.named_parameters():
        if id(p) in adapters:  # registered in the model
            continue
        assert torch.equal(p, before[n]), f"base weight {n} changed"
        assert not p.requires_grad
    # all-linear leaves out the LM head, as PEFT does
    assert "lm_head" not in lora.adapters.entries
    assert len(lora.adapters.entries) == 4 * 7
    assert lora.graphs_compiled == 1


def test_dropout_follows_train_eval_mode():
    _fresh_dynamo()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    cfg = lora_fx.LoraConfig(r=4, target_modules=["0"], lora_dropout=0.5, init_lora_weights=False)
    lora = lora_fx.backend(cfg, inner="aot_eager")
    lora.parameters(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    x = torch.randn(8, 64)
    model.eval()
    e1, e2 = fast(x), fast(x)
    assert torch.equal(e1, e2), "eval mode must be deterministic"
    model.train()
    t1, t2 = fast(x), fast(x)
    assert not torch.equal(t1, t2), "training mode must apply dropout"
    model.eval()
    assert torch.equal(fast(x), e1)
    assert lora.graphs_compiled == 2  # one per mode, ever


def test_unattached_backend_creates_adapters_at_compile_time(tmp_path):
    base, peft_model, path = peft_reference("gpt2", tmp_path)
    x = token_input()
    ref = peft_model(x).logits
    lora = lora_fx.backend(path, inner="aot_eager")
    out = torch.compile(copy.deepcopy(base), backend=lora, fullgraph=True)(x).logits
    assert_close(out, ref, "unattached backend")
    assert set(lora.adapters.entries) == {f"transformer.h.{i}.{m}" for i in range(2)
                                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} \
        | {"transformer.wte"}


def test_inductor_end_to_end(tmp_path):
    base, peft_model, path = peft_reference("convnet", tmp_path)
    x = MODELS["convnet"][1]()
    ref = peft_model(x)
    lora = lora_fx.backend(path)  # default inner: inductor
    lora.parameters(base)
    out = torch.compile(base, backend=lora, fullgraph=True)(x)
    assert_close(out, ref, "inductor convnet", rel=1e-4)


@pytest.mark.parametrize("inner_backend", ["aot_eager", "inductor"])
def test_patch_embedding_conv_adapter_compiles(inner_backend):
    # ViT's patch embedding: kernel = stride = 8. Handed the adapter tensors as real example
    # inputs, AOTAutograd gave them source-less symbolic sizes and Dynamo failed building guards.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, kernel_size=8, stride=8))
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False),
                           inner=inner_backend)
    lora.parameters(model)
    x = torch.randn(2, 3, 32, 32)
    out = torch.compile(model, backend=lora, fullgraph=True)(x)
    entry = lora.adapters.entries["0"]
    a, b = entry.tensors["lora_A.weight"], entry.tensors["lora_B.weight"]
    expected = model(x) + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, stride=8), b) * 2.0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_compiled_training_graphs_are_served_by_inductors_caches(tmp_path, monkeypatch):
    """A second compile of the same model (another process, or after a reset) must be served by the
    FX graph cache and the AOTAutograd cache, as the plain model's is. The AOTAutograd cache
    bypassed lora_fx graphs while nodes lora_fx added lacked Dynamo's `example_value`."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.down(self.up(x).relu()).view(-1)  # methods called on adapted outputs

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    model = Net()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["up", "down"]), inner="inductor")
    lora.attach(model)
    x = torch.randn(4, 16)
    seen = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        torch.compile(model, backend=lora, fullgraph=True)(x).sum().backward()
        seen.append(dict(counters["aot_autograd"]))
    assert seen[0].get("autograd_cache_bypass", 0) == 0 and seen[0].get("autograd_cache_saved") == 1, seen[0]
    assert seen[1].get("autograd_cache_hit") == 1, seen[1]
