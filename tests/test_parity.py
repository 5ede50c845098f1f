"""Numerics vs PEFT: same adapter (a PEFT-saved directory), forward and adapter gradients, through
the backend (fullgraph), transform(ExportedProgram) and transform(GraphModule)."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, assert_close, check_grads, peft_adapter_grads, peft_reference

import lora_fx


def _weights(like):
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(7))


def _peft_run(peft_model, x, extract):
    out = extract(peft_model(x))
    w = _weights(out)
    (out * w).sum().backward()
    return out, w, peft_adapter_grads(peft_model)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_backend_matches_peft(model_name, tmp_path, inner):
    base, peft_model, path = peft_reference(model_name, tmp_path)
    _, make_input, _, extract = MODELS[model_name]
    x = make_input()
    ref, w, ref_grads = _peft_run(peft_model, x, extract)

    lora = lora_fx.backend(path, inner=inner)
    params = lora.parameters(base)
    assert len(params) == len(ref_grads)
    out = extract(torch.compile(base, backend=lora, fullgraph=True)(x))
    assert_close(out, ref, f"{model_name} backend forward")
    (out * w).sum().backward()
    check_grads(lora.named_parameters(), ref_grads, f"{model_name} backend")


@pytest.mark.parametrize("model_name", list(MODELS))
def test_exported_program_matches_peft(model_name, tmp_path):
    base, peft_model, path = peft_reference(model_name, tmp_path)
    _, make_input, _, extract = MODELS[model_name]
    x = make_input()
    ref, w, ref_grads = _peft_run(peft_model, x, extract)

    ep = lora_fx.transform(torch.export.export(base, (x,)), path)
    assert isinstance(ep, torch.export.ExportedProgram)
    module = ep.module()
    out = extract(module(x))
    assert_close(out, ref, f"{model_name} transform(ep) forward")
    (out * w).sum().backward()
    named = {n: module.get_parameter(n) for n in ref_grads}
    check_grads(named.items(), ref_grads, f"{model_name} transform(ep)")
    frozen = [n for n, p in module.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == [], f"base weights must be frozen, trainable: {frozen[:3]}"


@pytest.mark.parametrize("model_name", list(MODELS))
def test_graph_module_matches_peft(model_name, tmp_path):
    base, peft_model, path = peft_reference(model_name, tmp_path)
    _, make_input, _, extract = MODELS[model_name]
    x = make_input()
    ref, w, ref_grads = _peft_run(peft_model, x, extract)

    gm = lora_fx.transform(torch.export.export(base, (x,)).module(), path)
    assert isinstance(gm, torch.fx.GraphModule)
    out = extract(gm(x))
    assert_close(out, ref, f"{model_name} transform(gm) forward")
    (out * w).sum().backward()
    check_grads(lora_fx.program_adapters.adapters_of(gm).named_parameters(), ref_grads, f"{model_name} transform(gm)")


def test_symbolic_trace_graph_module_matches_peft(tmp_path):
    base, peft_model, path = peft_reference("convnet", tmp_path)
    _, make_input, _, _ = MODELS["convnet"]
    x = make_input()
    ref = peft_model(x)
    gm = lora_fx.transform(torch.fx.symbolic_trace(base), path)
    assert_close(gm(x), ref, "symbolic_trace convnet")


def test_dilated_conv_matches_plain_torch_reference():
    # PEFT builds lora_A without the base dilation, so it cannot run a dilated 3x3 conv; compare
    # with the LoRA formula written out in plain torch instead.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, dilation=2, padding=1)).eval()
    x = torch.randn(2, 3, 9, 9)
    cfg = lora_fx.LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False)
    lora = lora_fx.backend(cfg, inner="aot_eager")
    lora.parameters(model)
    out = torch.compile(model, backend=lora, fullgraph=True)(x)
    a = lora.adapters.entries["0"].tensors["lora_A.weight"]
    b = lora.adapters.entries["0"].tensors["lora_B.weight"]
    conv = model[0]
    expected = conv(x) + 3.0 * torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x, a, None, 1, 1, 2), b)
    assert_close(out, expected, "dilated conv")
