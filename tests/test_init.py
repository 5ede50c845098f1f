"""Initialisation modes as PEFT defines them."""

from __future__ import annotations

import torch
from conftest import assert_close

import lora_fx


def _make(init, r=16, model=None):
    model = model or torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Embedding(300, 64))
    lora = lora_fx.backend(lora_fx.LoraConfig(r=r, target_modules=["0", "1"], init_lora_weights=init),
                           inner="aot_eager")
    lora.parameters(model)
    return model, lora


def test_default_init_is_a_no_op_with_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    model, lora = _make(True)
    lin = lora.adapters.entries["0"].tensors
    emb = lora.adapters.entries["1"].tensors
    assert torch.count_nonzero(lin["lora_B.weight"]) == 0
    bound = 1 / 256 ** 0.5  # kaiming_uniform(a=sqrt(5)) bound for fan_in 256
    assert lin["lora_A.weight"].abs().max() <= bound and lin["lora_A.weight"].abs().max() > 0.9 * bound
    assert torch.count_nonzero(emb["lora_embedding_A"]) == 0  # embeddings: A zero, B normal
    assert 0.9 < emb["lora_embedding_B"].std() < 1.1
    x = torch.randn(3, 256)
    assert_close(torch.compile(model[0], backend=lora, fullgraph=True)(x), model[0](x), "init=True is a no-op")


def test_gaussian_init():
    torch.manual_seed(0)
    _, lora = _make("gaussian", r=16)
    a = lora.adapters.entries["0"].tensors["lora_A.weight"]
    assert abs(a.std().item() - 1 / 16) < 0.005
    assert torch.count_nonzero(lora.adapters.entries["0"].tensors["lora_B.weight"]) == 0


def test_false_init_is_not_a_no_op():
    torch.manual_seed(0)
    _, lora = _make(False)
    assert torch.count_nonzero(lora.adapters.entries["0"].tensors["lora_B.weight"]) > 0
    assert torch.count_nonzero(lora.adapters.entries["1"].tensors["lora_embedding_A"]) > 0


def test_half_precision_base_gets_fp32_adapters_and_keeps_its_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16)
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, lora_alpha=4, target_modules=["0"], init_lora_weights=False),
                           inner="aot_eager")
    lora.parameters(model)
    assert lora.adapters.entries["0"].tensors["lora_A.weight"].dtype == torch.float32
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    out = torch.compile(model, backend=lora, fullgraph=True)(x)
    assert out.dtype == torch.bfloat16
    t = lora.adapters.entries["0"].tensors
    ref = (model[0](x).float() + 1.0 * (x.float() @ t["lora_A.weight"].T @ t["lora_B.weight"].T)).to(torch.bfloat16)
    assert_close(out, ref, "bf16 base", rel=1e-2)
