"""Adapter state over time: reloading adapters with other alphas / patterns / dropout, scaling,
and the values a loaded file may hold. The loaded adapter's config is the one source of truth."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_close, tamper_adapter_file

import lora_fx


def _base():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()


def _peft_dir(base, tmp_path, name, seed, **cfg):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = dict(r=4, target_modules=["0", "2"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**{**kwargs, **cfg})).eval()
    peft_model.save_pretrained(tmp_path / name)
    return peft_model, tmp_path / name


@pytest.fixture
def two_adapters(tmp_path):
    """Same shapes, different alpha and alpha_pattern: scalings differ per layer and per adapter."""
    base = _base()
    p12, d12 = _peft_dir(base, tmp_path, "a12", 1, lora_alpha=12)
    p48, d48 = _peft_dir(base, tmp_path, "a48", 2, lora_alpha=48, alpha_pattern={"2": 3}, use_rslora=True)
    return base, (p12, d12), (p48, d48)


def test_backend_reload_follows_the_new_adapters_alpha(two_adapters, tmp_path, inner):
    base, (p12, d12), (p48, d48) = two_adapters
    x = torch.randn(3, 8)
    lora = lora_fx.backend(d12, inner=inner)
    lora.parameters(base)
    fast = torch.compile(base, backend=lora, fullgraph=True)
    assert_close(fast(x), p12(x), "first adapter")
    lora.load_adapter(d48)
    assert_close(fast(x), p48(x), "after load_adapter")
    lora.set_scale(0.0)
    assert_close(fast(x), base(x), "scale 0")
    lora.set_scale(1.0)  # back to the *loaded* adapter's scaling, not the first one's
    assert_close(fast(x), p48(x), "after set_scale(1.0)")
    lora.set_scale(0.5)
    lora.load_adapter(d12)  # a load sets the factor back to 1
    assert_close(fast(x), p12(x), "reloaded first adapter")
    assert lora.graphs_compiled == 1


def test_backend_save_after_reload_writes_the_loaded_config(two_adapters, tmp_path, inner):
    from peft import PeftModel

    base, (_, d12), (p48, d48) = two_adapters
    lora = lora_fx.backend(d12, inner=inner)
    lora.parameters(base)
    lora.load_adapter(d48)
    lora.save_adapter(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (saved["lora_alpha"], saved["alpha_pattern"], saved["use_rslora"]) == (48, {"2": 3}, True)
    x = torch.randn(3, 8)
    reread = PeftModel.from_pretrained(copy.deepcopy(_base()), tmp_path / "out").eval()
    assert_close(reread(x), p48(x), "PEFT reading the save")


@pytest.mark.parametrize("route", ["program", "graph_module"])
def test_program_reload_applies_the_new_alpha(two_adapters, tmp_path, route):
    base, (_, d12), (p48, d48) = two_adapters
    x = torch.randn(3, 8)
    ep = torch.export.export(base, (x,))
    prog = lora_fx.transform(ep if route == "program" else ep.module(), d12)
    lora_fx.load_adapter(prog, d48)
    run = prog.module() if route == "program" else prog
    assert_close(run(x), p48(x), f"{route} after load_adapter")
    lora_fx.save_adapter(prog, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"] == 48


def test_reload_with_other_dropout_rebuilds_training_graphs(tmp_path, inner):
    base = _base()
    _, d0 = _peft_dir(base, tmp_path, "d0", 1, lora_alpha=8)
    _, d5 = _peft_dir(base, tmp_path, "d5", 1, lora_alpha=8, lora_dropout=0.5)
    lora = lora_fx.backend(d0, inner=inner)
    lora.parameters(base)
    fast = torch.compile(base.train(), backend=lora, fullgraph=True)
    x = torch.randn(64, 8)
    torch.manual_seed(0)
    first = fast(x)
    assert torch.equal(fast(x), first), "no dropout: deterministic"
    lora.load_adapter(d5)
    assert not torch.equal(fast(x), fast(x)), "the loaded adapter's dropout is active in training"
    base.eval()
    assert torch.equal(fast(x), fast(x))


def test_train_program_refuses_an_adapter_with_other_dropout(tmp_path):
    base = _base()
    _, d0 = _peft_dir(base, tmp_path, "d0", 1, lora_alpha=8, lora_dropout=0.1)
    _, d5 = _peft_dir(base, tmp_path, "d5", 1, lora_alpha=8, lora_dropout=0.5)
    ep = lora_fx.transform(torch.export.export(base, (torch.randn(2, 8),)), d0, train=True)
    with pytest.raises(lora_fx.AdapterFileError, match=r"lora_dropout=0.5.*train=True.*lora_dropout=0.1"):
        lora_fx.load_adapter(ep, d5)


def test_reload_with_other_rank_pattern_is_refused_naming_the_layer(tmp_path, inner):
    base = _base()
    _, d = _peft_dir(base, tmp_path, "d", 1, lora_alpha=8)
    _, other = _peft_dir(base, tmp_path, "o", 1, lora_alpha=8, rank_pattern={"2": 2})
    lora = lora_fx.backend(d, inner=inner)
    lora.parameters(base)
    with pytest.raises(lora_fx.AdapterFileError, match=r"layer '2' has rank 2 .* rank 4"):
        lora.load_adapter(other)


def test_reload_of_a_dora_adapter_over_lora_is_refused(tmp_path, inner):
    base = _base()
    _, d = _peft_dir(base, tmp_path, "d", 1, lora_alpha=8)
    _, dora = _peft_dir(base, tmp_path, "dora", 1, lora_alpha=8, use_dora=True)
    lora = lora_fx.backend(d, inner=inner)
    lora.parameters(base)
    with pytest.raises(lora_fx.AdapterFileError, match=r"'dora' adapter cannot be loaded over 'lora'"):
        lora.load_adapter(dora)



KEY = "base_model.model.2.lora_B.weight"


@pytest.mark.parametrize("bad,match", [
    (lambda t: t.__setitem__(KEY, torch.ones(4, 4, dtype=torch.int64)), r"has dtype torch.int64"),
    (lambda t: t[KEY].__setitem__((0, 1), float("nan")), r"has 1 NaN/inf values"),
    (lambda t: t[KEY].__setitem__((2, 2), float("-inf")), r"has 1 NaN/inf values"),
])
@pytest.mark.parametrize("route", ["backend", "backend_reload", "program", "program_reload"])
def test_bad_values_in_adapter_file_are_refused_naming_the_key(tmp_path, bad, match, route):
    base = _base()
    _, good = _peft_dir(base, tmp_path, "good", 1, lora_alpha=8)
    _, path = _peft_dir(base, tmp_path, "bad", 2, lora_alpha=8)
    tamper_adapter_file(path, bad)
    pattern = rf"'{KEY}' {match}"
    x = torch.randn(2, 8)
    if route == "backend":
        with pytest.raises(lora_fx.AdapterFileError, match=pattern):
            lora_fx.backend(path).parameters(base)
    elif route == "backend_reload":
        lora = lora_fx.backend(good, inner="aot_eager")
        lora.parameters(base)
        before = [p.clone() for p in lora.parameters()]
        with pytest.raises(lora_fx.AdapterFileError, match=pattern):
            lora.load_adapter(path)
        assert all(torch.equal(a, b) for a, b in zip(before, lora.parameters(), strict=True)), "partly loaded"
    elif route == "program":
        with pytest.raises(lora_fx.AdapterFileError, match=pattern):
            lora_fx.transform(torch.export.export(base, (x,)), path)
    else:
        ep = lora_fx.transform(torch.export.export(base, (x,)), good)
        with pytest.raises(lora_fx.AdapterFileError, match=pattern):
            lora_fx.load_adapter(ep, path)


def test_loading_into_a_merged_program_is_refused(two_adapters):
    base, (_, d12), (_, d48) = two_adapters
    merged = lora_fx.merge(lora_fx.transform(torch.export.export(base, (torch.randn(2, 8),)), d12))
    with pytest.raises(lora_fx.LoraFxError, match="merged.*unmerge"):
        lora_fx.load_adapter(merged, d48)


def test_reload_with_other_modules_to_save_is_refused_and_keeps_the_model(tmp_path, inner):
    base = _base()
    _, plain = _peft_dir(base, tmp_path, "plain", 1, lora_alpha=8)
    _, saved = _peft_dir(base, tmp_path, "saved", 2, lora_alpha=8, modules_to_save=["2"], target_modules=["0"])
    lora = lora_fx.backend(plain, inner=inner)
    lora.parameters(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(lora_fx.AdapterFileError, match=r"modules_to_save=\['2'\], but .* made with \[\]"):
        lora.load_adapter(saved)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_a_weight_key_for_a_layer_that_is_no_embedding_is_unexpected(tmp_path):
    # PEFT writes `<layer>.weight` only for the input / output embeddings of a resized vocabulary;
    # for any other layer such a key must not overwrite the model's weight.
    base = _base()
    _, path = _peft_dir(base, tmp_path, "a", 1, lora_alpha=8)
    tamper_adapter_file(path, lambda t: t.__setitem__("base_model.model.2.weight", torch.zeros(4, 8)))
    before = base[2].weight.clone()
    with pytest.raises(lora_fx.AdapterFileError, match=r"unexpected key 'base_model.model.2.weight'"):
        lora_fx.backend(path).parameters(base)
    assert torch.equal(base[2].weight, before)


def test_loading_base_weights_into_a_meta_model_is_refused_and_changes_nothing(tmp_path):
    from conftest import tiny_llama

    model = tiny_llama()
    _, path = _peft_dir_of(model, tmp_path, target_modules=["embed_tokens", "q_proj"])
    with torch.device("meta"):
        meta = type(model)(model.config)
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, lora_alpha=2, target_modules=["embed_tokens", "q_proj"]),
                           inner="aot_eager")
    lora.parameters(meta)
    with pytest.raises(lora_fx.AdapterFileError, match=r"base_layer.weight' holds base weights .* meta device"):
        lora.load_adapter(path)
    assert lora.config.lora_alpha == 2
    assert all(not e.deferred for e in lora.adapters.entries.values()), "values of the refused load were kept"


def _peft_dir_of(model, tmp_path, **cfg):
    from conftest import peft_adapter

    return peft_adapter(model, tmp_path, r=4, lora_alpha=8, **cfg)
