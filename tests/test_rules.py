"""Target rules: lora_fx picks the same layers, ranks and scalings as PEFT for the same config."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

import lora_fx
from lora_fx.layers import layers_of_module, output_layer_names
from lora_fx.rules import resolve

CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=r".*\.(q|k)_proj")),
    ("llama", dict(target_modules=["self_attn.q_proj", "down_proj"], layers_to_transform=[0, 2])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers")),
    ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*layers\.1\..*")),
    ("llama", dict(target_modules="all-linear", r=8, rank_pattern={"q_proj": 2, r"layers\.3\.mlp\..*": 3},
                   alpha_pattern={"^model.layers.0.self_attn.v_proj": 5, "down_proj": 7})),
    ("llama", dict(target_modules="all-linear", rank_pattern={"proj": 2})),  # `proj` != `q_proj`
    ("llama", dict(target_modules=["q_proj", "embed_tokens"], use_rslora=True, lora_alpha=9)),
    ("gpt2", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn", "wte", "wpe"], rank_pattern={"^transformer.wte": 2})),
    ("bert", dict(target_modules="all-linear")),
    ("bert", dict(target_modules=["query", "dense"], layers_to_transform=[1], layers_pattern="layer")),
]
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def _peft_targets(model, kwargs):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), PeftLoraConfig(**kwargs))
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "r") and isinstance(module.r, dict) and "default" in module.r:
            out[name] = (module.r["default"], pytest.approx(module.scaling["default"]))
    return out


@pytest.mark.parametrize("model_name,kwargs", CASES)
def test_resolution_matches_peft(model_name, kwargs):
    model = FACTORIES[model_name]()
    expected = _peft_targets(model, kwargs)
    cfg = lora_fx.LoraConfig(**kwargs)
    got = resolve(layers_of_module(model), cfg, output_layer_names(model))
    assert {n: (res.r, res.scaling) for n, res in got.items()} == expected


@pytest.mark.parametrize("model_name,kwargs", [c for c in CASES if c[0] == "llama"][:8])
def test_graph_inventory_resolves_like_the_module(model_name, kwargs):
    """The rules see the same layers whether found in an exported graph or in the nn.Module."""
    from lora_fx.passes.find_targets import find_targets, output_layer_names_of_graph, site_layers

    model = FACTORIES[model_name]()
    ep = torch.export.export(model, (torch.randint(0, 128, (1, 4)),))
    nodes = find_targets(ep.graph_module, dict(ep.graph_signature.inputs_to_parameters))
    cfg = lora_fx.LoraConfig(**kwargs)
    from_graph = resolve(site_layers(nodes), cfg, output_layer_names_of_graph(nodes))
    from_module = resolve(layers_of_module(model), cfg, output_layer_names(model))
    assert {n: (r.r, r.scaling) for n, r in from_graph.items()} == \
        {n: (r.r, r.scaling) for n, r in from_module.items()}
