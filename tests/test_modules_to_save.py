"""modules_to_save (and the heads task_type adds): trainable copies of whole modules, in graph form.
Parity with PEFT for sequence classification (forward, grads, save/load both ways), merging keeps
the copies, tied weights are untied for the saved module only, as PEFT's deep copy does."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, check_grads, forward_backward, peft_adapter, peft_adapter_grads, save_via

import lora_fx


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=64, max_position_embeddings=16,
                                                    num_labels=3, hidden_dropout_prob=0,
                                                    attention_probs_dropout_prob=0)).eval()


def _vit_cls():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=48, image_size=8, patch_size=4, num_labels=3,
                                               hidden_dropout_prob=0, attention_probs_dropout_prob=0)).eval()


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                        tie_word_embeddings=True, use_cache=False)).eval()


def _ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


# name -> (model, input, PEFT config, output); the saved modules' keys PEFT writes
CASES = {
    "bert_seq_cls": (_bert_cls, _ids, dict(task_type="SEQ_CLS", target_modules=["query", "value"]),
                     lambda o: o.logits),
    "bert_pooler_and_lora_on_head": (_bert_cls, _ids, dict(task_type="SEQ_CLS", modules_to_save=["pooler"],
                                                           target_modules=["query", "dense", "classifier"]),
                                     lambda o: o.logits),
    "vit_image_cls": (_vit_cls, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                      # PEFT's image-classification recipe (its SEQ_CLS wrapper takes input_ids)
                      dict(modules_to_save=["classifier"], target_modules=["q_proj", "v_proj"]), lambda o: o.logits),
    "tied_embed_and_head": (_tied_llama, _ids, dict(target_modules=["q_proj"],
                                                    modules_to_save=["embed_tokens", "lm_head"]),
                            lambda o: o.logits),
}


def _peft(name, tmp_path):
    factory, make_input, cfg, extract = CASES[name]
    base = factory()
    peft_model, path = peft_adapter(base, tmp_path, r=4, lora_alpha=8, **cfg)
    x = make_input()
    ref = forward_backward(peft_model, x, extract)
    return base, peft_model, path, x, ref, peft_adapter_grads(peft_model), extract


def test_peft_writes_what_these_cases_are_about(tmp_path):
    from safetensors.torch import load_file

    keys = {name: sorted(k for k in load_file(_peft(name, tmp_path / name)[2] / "adapter_model.safetensors")
                         if "lora_" not in k) for name in CASES}
    assert keys["bert_seq_cls"] == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert "base_model.model.bert.pooler.dense.weight" in keys["bert_pooler_and_lora_on_head"]
    assert keys["tied_embed_and_head"] == ["base_model.model.lm_head.weight",
                                           "base_model.model.model.embed_tokens.weight"]


@pytest.mark.parametrize("route", ["backend", "backend_unattached", "program", "graph_module"])
@pytest.mark.parametrize("name", list(CASES))
def test_modules_to_save_match_peft(tmp_path, name, route):
    base, peft_model, path, x, ref, ref_grads, extract = _peft(name, tmp_path)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    if route.startswith("backend"):
        lora = lora_fx.backend(path, inner="aot_eager")
        if route == "backend":
            lora.parameters(base)
        out = forward_backward(torch.compile(base, backend=lora, fullgraph=True), x, extract)
        adapters = lora.adapters
    else:
        ep = torch.export.export(base, (x,))
        prog = lora_fx.transform(ep if route == "program" else ep.module(), path)
        module = prog.module() if route == "program" else prog
        out = forward_backward(module, x, extract)
        adapters = lora_fx.program_adapters.adapters_of(prog)
    assert_close(out, ref, f"{name} via {route}")
    check_grads(adapters.named_parameters(), ref_grads, f"{name} via {route}")
    assert adapters.saved, "no module was saved"
    for module in adapters.saved:  # the originals are not read: untrained, unchanged
        for key, p in base.get_submodule(module).named_parameters():
            if f"{module}.{key}" not in original:  # the copy, registered beside it (attached)
                assert key.startswith("modules_to_save.default."), key
                continue
            assert p.grad is None, f"{module}.{key} got a gradient"
            assert torch.equal(p, original[f"{module}.{key}"]), f"{module}.{key} changed"


@pytest.mark.parametrize("route", ["backend", "program"])
@pytest.mark.parametrize("name", ["bert_seq_cls", "tied_embed_and_head"])
def test_modules_to_save_round_trip_with_peft(tmp_path, name, route):
    from peft import PeftModel
    from safetensors.torch import load_file

    base, _, path, x, _, _, extract = _peft(name, tmp_path)
    save_via(route, base, path, x, tmp_path / "out")
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    theirs = load_file(path / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        a = extract(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()(x))
        b = extract(PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(x))
    assert torch.equal(a, b)


@pytest.mark.parametrize("route", ["backend", "program", "graph_module"])
def test_merge_keeps_the_saved_modules(tmp_path, route):
    base, peft_model, path, x, _, _, extract = _peft("bert_seq_cls", tmp_path)
    with torch.no_grad():
        ref = extract(peft_model.merge_and_unload()(x))
        if route == "backend":
            lora = lora_fx.backend(path, inner="aot_eager")
            lora.parameters(base)
            fast = torch.compile(base, backend=lora, fullgraph=True)
            unmerged = extract(fast(x))
            lora.merge()
            assert_close(extract(fast(x)), ref, "merged backend")
            lora.unmerge()
            assert torch.equal(extract(fast(x)), unmerged)
        elif route == "program":
            ep = lora_fx.transform(torch.export.export(base, (x,)), path)
            merged = lora_fx.merge(ep)
            assert_close(extract(merged.module()(x)), ref, "merged program")
            assert_close(extract(lora_fx.unmerge(merged).module()(x)), extract(ep.module()(x)), "unmerged")
        else:
            gm = lora_fx.transform(torch.export.export(base, (x,)).module(), path)
            merged = lora_fx.merge(gm)
            assert_close(extract(merged(x)), ref, "merged GraphModule")
            assert_close(extract(lora_fx.unmerge(merged)(x)), extract(gm(x)), "unmerged GraphModule")


def test_a_module_with_persistent_buffers_is_refused_naming_it():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    cfg = lora_fx.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"])
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"modules_to_save: module '1' .*running_mean"):
        lora_fx.backend(cfg).parameters(net)
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"module '1' reads the persistent buffer"):
        lora_fx.transform(torch.export.export(net.eval(), (torch.randn(3, 4),)), cfg)


def test_missing_saved_module_key_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    base, _, path, x, _, _, _ = _peft("bert_seq_cls", tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors["base_model.model.classifier.bias"]
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(lora_fx.AdapterFileError, match=r"missing adapter key 'base_model.model.classifier.bias'"):
        lora_fx.transform(torch.export.export(base, (x,)), path)
