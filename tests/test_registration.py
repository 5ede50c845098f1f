"""An attached backend registers its adapters in the model, under PEFT's in-model names: model
wrappers (DDP, FSDP2, an optimizer over `model.parameters()`) see them, state dicts hold them,
and everything that worked on the model before keeps working."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, base_state, peft_adapter, tiny_bert, tiny_llama, token_input
from torch import nn

import lora_fx


def _peft_lora_names(peft_model) -> set[str]:
    names = {n.removeprefix("base_model.model.") for n, _ in peft_model.named_parameters()}
    return {n for n in names if ".lora_" in n or ".modules_to_save." in n}


@pytest.mark.parametrize("variant", ["lora", "dora", "embedding", "modules_to_save"])
def test_model_holds_the_adapters_under_peft_names(tmp_path, variant):
    base = tiny_bert() if variant == "modules_to_save" else tiny_llama()
    cfg = {"lora": dict(target_modules=["q_proj", "v_proj"]),
           "dora": dict(target_modules=["q_proj", "down_proj"], use_dora=True),
           "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
           "modules_to_save": dict(target_modules=["query"], modules_to_save=["classifier"],
                                   task_type="SEQ_CLS")}[variant]
    peft_model, path = peft_adapter(base, tmp_path, r=2, **cfg)
    lora = lora_fx.backend(str(path), inner="aot_eager")
    params = lora.parameters(base)
    names = {n for n, p in base.named_parameters() if any(p is q for q in params)}
    assert names == _peft_lora_names(peft_model)
    assert sorted(lora.model_state_keys()) == sorted(names)
    state = base.state_dict()
    for name, value in peft_model.state_dict().items():  # same values as PEFT's model, by name
        short = name.removeprefix("base_model.model.")
        if short in names:
            assert torch.equal(state[short], value), short


def test_base_checkpoint_loads_strictly_and_detach_takes_the_adapters_out():
    model = tiny_llama()
    before = {n for n, _ in model.named_parameters()}
    checkpoint = copy.deepcopy(model.state_dict())
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
                           inner="aot_eager")
    lora.attach(model)
    a = lora.adapters.entries["model.layers.0.self_attn.q_proj"].tensors["lora_A.weight"].detach().clone()
    result = model.load_state_dict(checkpoint)  # strict: adapter keys a base checkpoint lacks are not missing
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default.weight"), a)
    lora.detach()
    assert {n for n, _ in model.named_parameters()} == before
    assert set(model.state_dict()) == set(checkpoint)


def test_an_optimizer_over_model_parameters_trains_the_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0", "2"]), inner="aot_eager")
    lora.attach(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora.parameters()}
    opt = torch.optim.SGD(trainable, lr=0.1)
    fast = torch.compile(model, backend=lora, fullgraph=True)
    fast(torch.randn(4, 8)).pow(2).sum().backward()
    opt.step()
    assert lora.adapters.entries["2"].tensors["lora_B.weight"].abs().sum() > 0


@pytest.mark.parametrize("when", ["before_attach", "after_attach"])
def test_blocks_compiled_one_by_one_keep_their_adapters(tmp_path, when):
    """`torch.compile(block)` put in the model names its weights `layers.0._orig_mod...`; the
    layers are still `layers.0...` (as FSDP2 recipes compile per block). Before, such blocks ran
    without their adapters, silently."""
    base = tiny_llama()
    peft_model, path = peft_adapter(base, tmp_path, r=2, target_modules=["q_proj", "gate_proj"])
    lora = lora_fx.backend(str(path), inner="aot_eager")

    def compile_blocks():
        for i, block in enumerate(base.model.layers):
            base.model.layers.register_module(str(i), torch.compile(block, backend=lora, fullgraph=True))

    if when == "before_attach":
        compile_blocks()
    lora.attach(base)
    if when == "after_attach":
        compile_blocks()
    assert "model.layers.0.self_attn.q_proj" in lora.adapters.entries
    x = token_input()
    with torch.no_grad():
        assert_close(base(x).logits, peft_model(x).logits, "blocks compiled one by one")
    assert lora.graphs_compiled == len(base.model.layers)


def test_a_copy_of_an_attached_model_takes_another_backend(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    peft_model, path = peft_adapter(model, tmp_path, r=2, target_modules=["0", "2"])
    lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["0"]), inner="aot_eager").attach(model)
    copied = copy.deepcopy(model)  # carries the first backend's adapters as parameters
    other = lora_fx.backend(str(path), inner="aot_eager")
    other.attach(copied)
    assert copied.get_parameter("0.lora_A.default.weight").shape == (2, 8)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert_close(torch.compile(copied, backend=other)(x), peft_model(x), "the copy, with the second adapter")
    assert set(base_state(copied)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_a_name_the_model_already_uses_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].lora_A = nn.Linear(2, 2)  # not lora_fx's
    with pytest.raises(lora_fx.LoraFxError, match=r"'0.lora_A'.*already an attribute of Linear"):
        lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"])).attach(model)
    assert not any(n.startswith("0.lora_A.default") for n, _ in model.named_parameters())


def _two_linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def test_detach_then_attach_again_keeps_the_compiled_model_working(tmp_path):
    model = _two_linear()
    peft_model, path = peft_adapter(model, tmp_path, r=2, target_modules=["0", "2"])
    lora = lora_fx.backend(str(path), inner="aot_eager")
    lora.attach(model)
    fast = torch.compile(model, backend=lora)
    x = torch.randn(4, 8)
    with torch.no_grad():
        first = fast(x)
        lora.detach()
        lora.attach(model)
        assert_close(fast(x), first, "after detach + attach")
    assert_close(first, peft_model(x), "adapted")


def test_an_attached_model_pickles():
    import io

    model = _two_linear()
    lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"])).attach(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copied = torch.load(buffer, weights_only=False)
    assert torch.equal(copied.get_parameter("0.lora_A.default.weight"), model.get_parameter("0.lora_A.default.weight"))


def test_loading_adapter_values_while_merged_is_refused():
    model = _two_linear()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False),
                           inner="aot_eager")
    lora.attach(model)
    original = model[0].weight.detach().clone()
    state = {k: v * 2 for k, v in model.state_dict().items() if "lora_" in k}
    lora.merge(keep_original=False)
    with pytest.raises(lora_fx.LoraFxError, match=r"'0.lora_A.default.weight' while the adapters are merged"):
        model.load_state_dict(state, strict=False)
    lora.unmerge()
    assert_close(model[0].weight, original, "unmerged weight", rel=1e-6)
    model.load_state_dict(state, strict=False)  # unmerged: allowed
    assert torch.equal(model.get_parameter("0.lora_A.default.weight"), state["0.lora_A.default.weight"])


def test_a_copy_with_modules_to_save_registers_each_copy_once(tmp_path):
    model = _two_linear()
    cfg = lora_fx.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"])
    lora_fx.backend(cfg, inner="aot_eager").attach(model)
    copied = copy.deepcopy(model)
    other = lora_fx.backend(cfg, inner="aot_eager")
    other.attach(copied)
    assert sorted(other.adapters.saved["2"]) == ["bias", "weight"]
    other.save_adapter(tmp_path / "a")
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "a" / "adapter_model.safetensors")) == [
        "base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight",
        "base_model.model.2.bias", "base_model.model.2.weight"]


def test_a_compiled_model_of_compiled_blocks_adapts_every_block(tmp_path):
    """Blocks compiled one by one, then the whole model: graph names carry `_orig_mod` for every
    block (before, only the block whose weight named the frame was adapted)."""
    base = tiny_llama()
    peft_model, path = peft_adapter(base, tmp_path, r=2, target_modules=["q_proj", "down_proj"])
    lora = lora_fx.backend(str(path), inner="aot_eager")
    lora.attach(base)
    for i, block in enumerate(base.model.layers):
        base.model.layers.register_module(str(i), torch.compile(block, backend="eager"))
    x = token_input()
    with torch.no_grad():
        assert_close(torch.compile(base, backend=lora)(x).logits, peft_model(x).logits, "compiled blocks, whole model")


def test_a_full_checkpoint_loaded_into_a_meta_built_model_is_kept(tmp_path):
    source = _two_linear()
    cfg = lora_fx.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    trained = lora_fx.backend(cfg, inner="aot_eager")
    trained.attach(source)
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = torch.compile(source, backend=trained)(x)
    with torch.device("meta"):
        model = _two_linear()
    lora = lora_fx.backend(cfg, inner="aot_eager")
    lora.attach(model)
    model.to_empty(device="cpu")
    assert model.load_state_dict(source.state_dict()).missing_keys == []
    with torch.no_grad():
        assert_close(torch.compile(model, backend=lora)(x), want, "adapters from the checkpoint, not re-initialised")
