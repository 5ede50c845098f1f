"""Bad input: each error names its culprit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import peft_reference, tamper_adapter_file, tiny_llama, token_input

import lora_fx


def test_no_match_lists_closest_names():
    model = tiny_llama()
    lora = lora_fx.backend(lora_fx.LoraConfig(target_modules=["q_prj"]), inner="aot_eager")
    with pytest.raises(lora_fx.TargetNotFoundError, match=r"q_prj.*closest.*q_proj"):
        lora.parameters(model)


def test_no_match_in_exported_program():
    ep = torch.export.export(tiny_llama(), (token_input(),))
    with pytest.raises(lora_fx.TargetNotFoundError, match=r"nonexistent.*closest layer names"):
        lora_fx.transform(ep, lora_fx.LoraConfig(target_modules=["nonexistent"]))


@pytest.mark.parametrize("field,value,match", [
    ("r", 0, "r must be a positive integer"),
    ("lora_dropout", 1.5, "lora_dropout"),
    ("bias", "some", "bias must be"),
    ("init_lora_weights", "eva", "init_lora_weights='eva': EVA initialisation is not supported"),
    ("rank_pattern", {"q_proj": -1}, r"rank_pattern\['q_proj'\]"),
])
def test_bad_config_field(field, value, match):
    with pytest.raises(lora_fx.LoraFxError, match=match):
        lora_fx.LoraConfig(target_modules=["q_proj"], **{field: value})


@pytest.mark.parametrize("field,value", [
    ("trainable_token_indices", [1, 2]),
])
def test_not_yet_supported_features_are_refused(field, value):
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=field):
        lora_fx.LoraConfig(target_modules=["q_proj"], **{field: value})


def test_unsupported_feature_in_adapter_file(tmp_path):
    _, _, path = peft_reference("gpt2", tmp_path)
    cfg_file = path / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["layer_replication"] = [[0, 1]]
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"adapter_config.json.*layer_replication"):
        lora_fx.backend(path)


def test_ensure_weight_tying_in_adapter_file_is_refused(tmp_path):
    # PEFT's ensure_weight_tying=True adapts a tied lm_head with the embedding's factors: ignoring it
    # would change the logits silently.
    _, _, path = peft_reference("gpt2", tmp_path)
    cfg_file = path / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    assert data["ensure_weight_tying"] is False  # PEFT writes the key; False is the default and is fine
    lora_fx.backend(path)
    data["ensure_weight_tying"] = True
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"ensure_weight_tying=True"):
        lora_fx.backend(path)


def test_unknown_key_with_a_value_is_refused(tmp_path):
    _, _, path = peft_reference("gpt2", tmp_path)
    cfg_file = path / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["future_feature"] = {"on": True}
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(lora_fx.UnsupportedFeatureError, match="future_feature"):
        lora_fx.backend(path)



def test_missing_key(tmp_path):
    base, _, path = peft_reference("gpt2", tmp_path)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tamper_adapter_file(path, lambda t: t.pop(key))
    with pytest.raises(lora_fx.AdapterFileError, match=f"missing adapter key '{key}'"):
        lora_fx.backend(path).parameters(base)


def test_extra_key(tmp_path):
    base, _, path = peft_reference("gpt2", tmp_path)
    key = "base_model.model.transformer.h.0.attn.extra.lora_A.weight"
    tamper_adapter_file(path, lambda t: t.__setitem__(key, torch.zeros(1)))
    with pytest.raises(lora_fx.AdapterFileError, match=f"unexpected key '{key}'"):
        lora_fx.transform(torch.export.export(base, (token_input(),)), path)


def test_shape_mismatch(tmp_path):
    base, _, path = peft_reference("gpt2", tmp_path)
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"
    tamper_adapter_file(path, lambda t: t.__setitem__(key, torch.zeros(4, 31)))
    with pytest.raises(lora_fx.AdapterFileError, match=rf"'{key}' has shape \(4, 31\), the model needs \(4, 32\)"):
        lora_fx.backend(path).parameters(base)


def test_truncated_file(tmp_path):
    _, _, path = peft_reference("gpt2", tmp_path)
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(lora_fx.AdapterFileError, match="adapter_model.safetensors.*truncated or corrupt"):
        lora_fx.backend(path)


def test_pickle_only_directory_is_refused(tmp_path):
    _, _, path = peft_reference("gpt2", tmp_path)
    os.rename(path / "adapter_model.safetensors", path / "adapter_model.bin")
    with pytest.raises(lora_fx.AdapterFileError, match="never unpickles"):
        lora_fx.backend(path)


def test_missing_directory(tmp_path):
    with pytest.raises(lora_fx.AdapterFileError, match="does_not_exist"):
        lora_fx.backend(tmp_path / "does_not_exist")


def test_conv_rank_not_divisible_by_groups():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(lora_fx.ConfigError, match=r"^0: rank 6 is not divisible by the conv's groups=4"):
        lora_fx.backend(lora_fx.LoraConfig(r=6, target_modules=["0"])).parameters(model)


def test_interrupted_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    base, _, path = peft_reference("gpt2", tmp_path)
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(base)
    out = tmp_path / "out"
    lora.save_adapter(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import lora_fx.io as lio

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lio.json, "dump", boom)
    with torch.no_grad():
        lora.adapters.parameters()[0].add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        lora.save_adapter(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    with pytest.raises(KeyboardInterrupt):
        lora.save_adapter(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_backend_attached_twice_to_different_models():
    lora = lora_fx.backend(lora_fx.LoraConfig(target_modules=["0"]))
    lora.parameters(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(lora_fx.LoraFxError, match="already attached"):
        lora.parameters(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_transform_rejects_other_objects():
    with pytest.raises(lora_fx.LoraFxError, match="Sequential"):
        lora_fx.transform(torch.nn.Sequential(), lora_fx.LoraConfig(target_modules=["0"]))


def test_saving_with_trained_biases_is_refused_not_silently_incomplete(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"], bias="lora_only"))
    params = lora.parameters(model)
    assert any(p is model[0].bias for p in params) and not model[0].weight.requires_grad
    with pytest.raises(lora_fx.UnsupportedFeatureError, match="bias='lora_only'"):
        lora.save_adapter(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields,where", [
    (dict(target_modules=r"model\.(q_proj"), "target_modules"),
    (dict(target_modules=["q_proj"], exclude_modules="*proj"), "exclude_modules"),
    (dict(target_modules=["q_proj"], rank_pattern={"q_proj[": 4}), r"rank_pattern\['q_proj\['\]"),
    (dict(target_modules=["q_proj"], alpha_pattern={"(": 4}), r"alpha_pattern\['\('\]"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers)"), "layers_pattern"),
])
def test_bad_regex_is_refused_when_the_config_is_built(fields, where):
    with pytest.raises(lora_fx.ConfigError, match=rf"LoraConfig\.{where}: .* is not a valid regular expression"):
        lora_fx.LoraConfig(**fields)


def test_bad_regex_in_adapter_file_names_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"],
                                                              "rank_pattern": {"q[": 2}}))
    with pytest.raises(lora_fx.ConfigError, match=r"adapter_config.json: LoraConfig.rank_pattern\['q\['\]"):
        lora_fx.LoraConfig.from_pretrained(tmp_path)


def test_a_second_backend_on_the_same_model_is_refused_until_the_first_detaches():
    import gc

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)  # the user's own flags come back on detach
    first = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"]), inner="aot_eager")
    first.parameters(model)
    second = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["1"]), inner="aot_eager")
    with pytest.raises(lora_fx.LoraFxError, match="already attached to another lora_fx backend.*detach"):
        second.parameters(model)
    first.merge()
    with pytest.raises(lora_fx.LoraFxError, match="detach while the adapters are merged"):
        first.detach()
    first.unmerge()
    first.detach()
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]
    second.parameters(model)  # now free
    assert not model[0].weight.requires_grad
    del second
    gc.collect()
    third = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"]), inner="aot_eager")
    third.parameters(model)  # a backend that is gone does not block the model


def test_trainable_token_indices_is_refused_with_the_alternative(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = tiny_llama()
    get_peft_model(model, PeftLoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5])
                   ).save_pretrained(tmp_path / "tok")
    with pytest.raises(lora_fx.UnsupportedFeatureError, match=r"trainable_token_indices=\[3, 5\].*some embedding rows"
                                                              r".*modules_to_save=\['embed_tokens'\]"):
        lora_fx.backend(tmp_path / "tok")


@pytest.mark.parametrize("fields,match", [
    (dict(use_dora=True, use_bdlora={"nblocks": 2}), "use_dora and use_bdlora are set together"),
    (dict(use_bdlora={"nblocks": 0}), "nblocks must be a positive integer"),
    (dict(use_bdlora={"nblock": 2}), r"use_bdlora: unknown keys \['nblock'\]"),
    (dict(use_bdlora={"target_modules_bd_a": ["q"], "target_modules_bd_b": ["q"]}), "in both"),
    (dict(alora_invocation_tokens=[]), "alora_invocation_tokens must be a non-empty list"),
    (dict(qalora_group_size=0), "qalora_group_size must be a positive integer"),
])
def test_bad_variant_fields_name_the_field(fields, match):
    with pytest.raises(lora_fx.ConfigError, match=match):
        lora_fx.LoraConfig(target_modules=["q_proj"], **fields)
