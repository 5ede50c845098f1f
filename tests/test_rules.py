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
    ("bert", dict(target_modules=["query", "dense"], modules_to_save=["pooler"])),  # no LoRA inside a saved module
    ("bert", dict(target_modules="all-linear", modules_to_save=["attention.output"])),
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


# -- "all-linear": which output layer is left out, per route ----------------------------------------

def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=64,
                                                    max_position_embeddings=16, num_labels=3)).eval()


def _vit_cls():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=48, image_size=8, patch_size=4,
                                               num_labels=3)).eval()


def _gemma2_softcapped():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                                          final_logit_softcapping=30.0, use_cache=False)).eval()


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).eval()


def _ids(vocab=64):
    return torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0))


def _bert_two_labels():  # the classifier is shaped like token_type_embeddings (2 x hidden): still adapted
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=64,
                                                    max_position_embeddings=16, num_labels=2)).eval()


def _bart_lm():  # a scaled (float embed_scale) shared embedding tied to the LM head
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=64,
                                                   max_position_embeddings=32, scale_embedding=True,
                                                   use_cache=False)).eval()


ALL_LINEAR_MODELS = {
    "bert_seq_cls": (_bert_cls, _ids, {}),
    "bert_seq_cls_task": (_bert_cls, _ids, {"task_type": "SEQ_CLS"}),
    "vit_image_cls": (_vit_cls, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), {}),
    "cnn": (_cnn, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), {}),
    "llama_untied_head": (tiny_llama, lambda: _ids(128), {}),
    "gpt2_tied_head": (tiny_gpt2, lambda: _ids(128), {}),
    "gemma2_softcapped_head": (_gemma2_softcapped, _ids, {}),
    "bert_two_labels": (_bert_two_labels, _ids, {}),
    "bart_tied_scaled_lm": (_bart_lm, _ids, {}),
}


@pytest.mark.parametrize("route", ["module", "program", "backend_unattached"])
@pytest.mark.parametrize("name", list(ALL_LINEAR_MODELS))
def test_all_linear_leaves_out_what_peft_leaves_out(name, route):
    from lora_fx.marks import ADAPTER, marked_layers

    factory, make_input, extra = ALL_LINEAR_MODELS[name]
    model = factory()
    kwargs = dict(target_modules="all-linear", **extra)
    expected = set(_peft_targets(model, kwargs))
    cfg = lora_fx.LoraConfig(**kwargs)
    x = make_input()
    if route == "module":
        got = set(resolve(layers_of_module(model), cfg, output_layer_names(model)))
    elif route == "program":
        got = set(marked_layers(lora_fx.transform(torch.export.export(model, (x,)), cfg).graph, ADAPTER))
    else:
        lora = lora_fx.backend(cfg, inner="aot_eager")
        torch.compile(model, backend=lora, fullgraph=True)(x)
        got = set(lora.adapters.entries)
    assert got == expected, f"only lora_fx: {sorted(got - expected)}, only PEFT: {sorted(expected - got)}"


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2, vocab_size=64, use_cache=False)).eval()


@pytest.mark.parametrize("route", ["module", "program", "backend_unattached"])
def test_all_linear_on_fused_experts_adapts_what_peft_adapts(route, tmp_path):
    # PEFT's all-linear on an MoE model of transformers 5 also adapts the fused 3-D expert weights
    # and the router (target_parameters), the fused gate/up projection at twice the rank and alpha.
    import json

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import load_file

    model = _mixtral()
    get_peft_model(copy.deepcopy(model), PeftLoraConfig(r=2, target_modules="all-linear")).save_pretrained(
        tmp_path / "peft")
    cfg = lora_fx.LoraConfig(r=2, target_modules="all-linear")
    x = _ids()
    if route == "module":
        lora = lora_fx.backend(cfg, inner="aot_eager")
        lora.parameters(model)
        lora.save_adapter(tmp_path / "ours")
    elif route == "program":
        lora_fx.save_adapter(lora_fx.transform(torch.export.export(model, (x,)), cfg), tmp_path / "ours")
    else:
        lora = lora_fx.backend(cfg, inner="aot_eager")
        torch.compile(model, backend=lora, fullgraph=True)(x)
        lora.save_adapter(tmp_path / "ours")
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours")]
    assert {k: tuple(v.shape) for k, v in files[1].items()} == {k: tuple(v.shape) for k, v in files[0].items()}
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")]
    for key in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern"):
        ours, peft = (sorted(c[key]) if isinstance(c[key], list) else c[key] for c in configs)
        assert ours == peft, key
