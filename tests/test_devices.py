"""Adapters follow the model's device: a model built on the meta device (then `to_empty` and real
weights) gets real, initialised adapters holding any values loaded meanwhile; errors name the layer
where that cannot happen."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, peft_adapter, raised_while_compiling
from torch import nn

import lora_fx


def _net():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _on_meta():
    with torch.device("meta"):
        return _net().eval()


def _real_weights(model, source):
    """`to_empty` + the weights of `source` (what loading a checkpoint into a meta model does)."""
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    return model


def test_meta_model_gets_real_initialised_adapters_that_the_optimizer_holds():
    torch.manual_seed(0)
    source = _net().eval()
    model = _on_meta()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0", "2"]), inner="aot_eager")
    params = lora.parameters(model)
    assert all(p.device.type == "meta" for p in params)
    opt = torch.optim.SGD(params, lr=0.1)
    _real_weights(model, source)
    x = torch.randn(4, 8)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    out = fast(x)
    assert all(p.device.type == "cpu" for p in params)
    assert_close(out, source(x), "fresh adapter (B = 0) is a no-op")
    a = lora.adapters.entries["0"].tensors["lora_A.weight"]
    assert a.abs().sum() > 0, "lora_A was initialised, not left empty"
    out.pow(2).sum().backward()
    opt.step()  # the optimizer built on meta holds the very tensors that train
    assert lora.adapters.entries["0"].tensors["lora_B.weight"].abs().sum() > 0


@pytest.mark.parametrize("when", ["at_construction", "load_adapter_on_meta"])
def test_adapter_loaded_while_on_meta_is_applied_when_weights_arrive(tmp_path, when):
    torch.manual_seed(0)
    source = _net().eval()
    peft_model, path = peft_adapter(source, tmp_path, r=2, lora_alpha=4, target_modules=["0", "2"])
    model = _on_meta()
    if when == "at_construction":
        lora = lora_fx.backend(path, inner="aot_eager")
        lora.parameters(model)
    else:
        lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0", "2"]), inner="aot_eager")
        lora.parameters(model)
        lora.load_adapter(path)
    _real_weights(model, source)
    x = torch.randn(4, 8)
    assert_close(torch.compile(model, backend=lora, fullgraph=True)(x), peft_model(x), "loaded on meta")
    lora.save_adapter(tmp_path / "resaved")  # values, not meta placeholders


def test_dora_magnitude_is_initialised_from_the_real_weights(tmp_path):
    torch.manual_seed(0)
    source = _net().eval()
    model = _on_meta()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"], use_dora=True), inner="aot_eager")
    lora.parameters(model)
    _real_weights(model, source)
    x = torch.randn(4, 8)
    assert_close(torch.compile(model, backend=lora, fullgraph=True)(x), source(x), "fresh DoRA is a no-op")
    magnitude = lora.adapters.entries["0"].tensors["lora_magnitude_vector"]
    torch.testing.assert_close(magnitude, source[0].weight.norm(dim=1))


def test_running_or_saving_a_model_still_on_meta_is_refused_naming_the_layer(tmp_path):
    model = _on_meta()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["2"]), inner="aot_eager")
    lora.parameters(model)
    with pytest.raises(lora_fx.LoraFxError, match=r"layer '2': its adapter is on the meta device"):
        lora.save_adapter(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_moved_to_meta_after_attach_is_refused_naming_the_layer():
    model = _net()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["2"]), inner="aot_eager")
    lora.parameters(model)
    model.to("meta")
    with raised_while_compiling(lora_fx.LoraFxError, r"layer '2': the base weight is on the meta device"):
        torch.compile(model, backend=lora)(torch.randn(2, 8, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_adapters_follow_model_to_cuda(tmp_path):
    torch.manual_seed(0)
    model = _net().eval()
    peft_model, path = peft_adapter(model, tmp_path, r=2, target_modules=["0", "2"])
    lora = lora_fx.backend(path, inner="aot_eager")
    params = lora.parameters(model)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    x = torch.randn(4, 8)
    fast(x)
    model.to("cuda")
    out = fast(x.cuda())
    assert all(p.device.type == "cuda" for p in params)
    assert_close(out.cpu(), copy.deepcopy(peft_model).cpu()(x), "after model.to('cuda')")
