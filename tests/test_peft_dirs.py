"""PEFT directories as people save them: base embedding weights saved with the adapter
(`save_embedding_layers="auto"`), tied embeddings, and what lora_fx writes back."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, peft_adapter, save_via, tiny_gpt2, tiny_llama, token_input

import lora_fx


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=128,
                                        use_cache=False)).eval()


# name -> (base model factory, PEFT config, the base-weight keys PEFT writes)
CASES = {
    "llama_embed_tokens": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                           ["base_model.model.model.embed_tokens.base_layer.weight"]),
    "llama_lm_head": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["lm_head", "v_proj"]),
                      ["base_model.model.lm_head.base_layer.weight"]),
    "gemma_tied_scaled_embedding": (_gemma, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]),
                                    ["base_model.model.model.embed_tokens.base_layer.weight"]),
    "gpt2_tied_wte": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]), []),
}


def _saved_keys(path):
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _with_trained_embeddings(path, keys):
    """The adapter's base embedding weights differ from the model's (trained / resized rows)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    for key in keys:
        tensors[key] = tensors[key] + 0.5 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, path / "adapter_model.safetensors")


@pytest.mark.parametrize("route", ["backend", "backend_unattached", "program", "graph_module"])
@pytest.mark.parametrize("name", list(CASES))
def test_peft_directory_with_base_embedding_weights_matches_peft(tmp_path, name, route):
    from peft import PeftModel

    factory, cfg, base_keys = CASES[name]
    base = factory()
    _, path = peft_adapter(base, tmp_path, **cfg)
    assert sorted(k for k in _saved_keys(path) if "lora_" not in k) == base_keys
    _with_trained_embeddings(path, base_keys)
    x = token_input()
    with torch.no_grad():
        ref = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(x).logits
        if route.startswith("backend"):
            lora = lora_fx.backend(path, inner="aot_eager")
            if route == "backend":
                lora.parameters(base)
            out = torch.compile(base, backend=lora, fullgraph=True)(x).logits
        else:
            ep = torch.export.export(base, (x,))
            before = ep.module()(x).logits
            prog = lora_fx.transform(ep if route == "program" else ep.module(), path)
            out = (prog.module() if route == "program" else prog)(x).logits
            assert torch.equal(ep.module()(x).logits, before), "the caller's program changed"
    assert_close(out, ref, f"{name} via {route}")


@pytest.mark.parametrize("route", ["backend", "program"])
@pytest.mark.parametrize("name", list(CASES))
def test_saving_writes_the_keys_peft_writes(tmp_path, name, route):
    from peft import PeftModel

    factory, cfg, base_keys = CASES[name]
    base = factory()
    _, path = peft_adapter(base, tmp_path, **cfg)
    _with_trained_embeddings(path, base_keys)
    x = token_input()
    save_via(route, base, path, x, tmp_path / "out")
    ours, theirs = _saved_keys(tmp_path / "out"), _saved_keys(path)
    assert sorted(ours) == sorted(theirs)
    for key in base_keys:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():  # and PEFT reads it back to the same model
        a = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()(x).logits
        b = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(x).logits
    assert torch.equal(a, b)


def test_resized_vocabulary_weights_load_and_a_size_mismatch_names_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    _, path = peft_adapter(base, tmp_path, r=4, target_modules=["q_proj"])
    tensors = load_file(path / "adapter_model.safetensors")
    # PEFT writes `<layer>.weight` (no base_layer) for untargeted embeddings of a resized vocabulary
    key = "base_model.model.model.embed_tokens.weight"
    tensors[key] = torch.randn(128, 64)
    save_file(tensors, path / "adapter_model.safetensors")
    ep = lora_fx.transform(torch.export.export(base, (token_input(),)), path)
    assert torch.equal(ep.state_dict["model.embed_tokens.weight"], tensors[key])
    unattached = copy.deepcopy(base)
    torch.compile(unattached, backend=lora_fx.backend(path, inner="aot_eager"))(token_input())
    assert torch.equal(unattached.model.embed_tokens.weight, tensors[key]), "the unattached backend loads it too"
    tensors[key] = torch.randn(130, 64)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(lora_fx.AdapterFileError, match=r"'base_model.model.model.embed_tokens.weight' has shape "
                                                       r"\(130, 64\), the model's 'model.embed_tokens' weight has "
                                                       r"\(128, 64\).*resize"):
        lora_fx.backend(path).parameters(base)
    assert not torch.equal(base.model.embed_tokens.weight[:2], tensors[key][:2]), "partly loaded"
