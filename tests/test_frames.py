"""Dynamo compiles frames, not models: a function using the model, a submodule whose forward
resumes after a graph break (one frame for several layers), a compiled wrapper. Layer names in
those graphs are relative to the frame; the attached backend must still give every layer its
own adapter, or refuse — never run the base model silently."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, peft_adapter, raised_while_compiling, tiny_llama, token_input
from torch import nn

import lora_fx


def _break(module, inputs, output):
    torch._dynamo.graph_break()  # a print, a .item(), logging in user code
    return output


@pytest.mark.parametrize("where", ["model.norm", "model.layers.1", "model.layers.2.self_attn"])
def test_graph_break_inside_a_submodule_keeps_every_adapter(tmp_path, where):
    base = tiny_llama()
    peft_model, path = peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                    rank_pattern={"layers.1.self_attn.q_proj": 2})
    x = token_input()
    with torch.no_grad():
        ref = peft_model(x).logits
    model = copy.deepcopy(base)
    model.get_submodule(where).register_forward_hook(_break)
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(model)
    with torch.no_grad():
        out = torch.compile(model, backend=lora)(x).logits
    assert_close(out, ref, f"graph break at {where}")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        torch._dynamo.graph_break()  # the resumed frame's root is this block: shared by both blocks
        return torch.relu(y)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_frame_shared_by_several_layers_gives_each_its_own_adapter(tmp_path):
    torch.manual_seed(0)
    base = TwoBlocks().eval()
    peft_model, path = peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["proj"],
                                    rank_pattern={"blocks.1.proj": 2})
    x = torch.randn(3, 8)
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(base)
    fast = torch.compile(base, backend=lora)
    with torch.no_grad():
        for _ in range(2):
            assert_close(fast(x), peft_model(x), "blocks sharing a frame")


def test_a_compiled_function_using_the_model_and_a_compiled_wrapper(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    peft_model, path = peft_adapter(model, tmp_path, r=2, target_modules=["0", "2"])
    x = torch.randn(4, 8)
    lora = lora_fx.backend(path, inner="aot_eager")
    lora.parameters(model)

    def step(inputs):  # the model is a global of the compiled function
        return model(inputs)

    with torch.no_grad():
        assert_close(torch.compile(step, backend=lora)(x), peft_model(x), "compiled function")
    other = lora_fx.backend(path, inner="aot_eager")
    wrapped = torch.compile(copy.deepcopy(model), backend=other)
    other.parameters(wrapped)  # the compiled wrapper: adapters keep the model's own names
    assert sorted(name for name, _ in other.named_parameters()) == [
        "0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    with torch.no_grad():
        assert_close(wrapped(x), peft_model(x), "compiled wrapper")


def test_another_model_through_an_attached_backend_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0"]), inner="aot_eager")
    lora.parameters(model)
    other = copy.deepcopy(model)
    with raised_while_compiling(lora_fx.LoraFxError, r"not one of the attached model's"):
        torch.compile(other, backend=lora)(torch.randn(2, 8))


def test_unattached_backend_says_to_attach_when_frame_names_do_not_match(tmp_path):
    base = tiny_llama()
    _, path = peft_adapter(base, tmp_path, r=2, target_modules=["q_proj"])
    from safetensors.torch import load_file  # PEFT saved full names; a resumed frame names layers from `model`

    assert any(k.startswith("base_model.model.model.layers") for k in load_file(path / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    model.model.layers[0].register_forward_pre_hook(lambda mod, args: torch._dynamo.graph_break())
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["model.layers.1.self_attn.q_proj"]),
                           inner="aot_eager")
    with raised_while_compiling(lora_fx.TargetNotFoundError, r"not attached to the model.*lora.parameters\(model\)"):
        torch.compile(model, backend=lora)(token_input())


class WrappedForward(nn.Module):
    """A model whose `forward` is a `(*args, **kwargs)` wrapper (as transformers >= 5.24 decorates
    its models' forwards): Dynamo compiles the wrapper's frame, where the model is `args[0]`."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def _forward(self, x):
        return self.inner(x)

    def forward(*args, **kwargs):
        return WrappedForward._forward(*args, **kwargs)


def test_unattached_backend_names_layers_of_a_wrapped_forward_as_peft_does(tmp_path):
    torch.manual_seed(0)
    base = WrappedForward().eval()
    peft_model, path = peft_adapter(base, tmp_path, r=2, target_modules=["inner.0", "inner.2"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = peft_model(x)
    lora = lora_fx.backend(path, inner="aot_eager")  # not attached: names come from the graph alone
    with torch.no_grad():
        out = torch.compile(copy.deepcopy(base), backend=lora, fullgraph=True)(x)
    assert sorted(lora.adapters.entries) == ["inner.0", "inner.2"]
    assert_close(out, ref, "wrapped forward")


def test_unattached_backend_refuses_a_targeted_layer_the_directory_has_no_tensors_for(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    _, path = peft_adapter(base, tmp_path, r=2, target_modules=["0"])
    # A graph whose layer names carry a prefix the directory does not know ("outer.0" is matched by
    # the target "0", as PEFT matches suffixes, but its tensors are saved under "0").
    outer = nn.Module()
    outer.add_module("outer", copy.deepcopy(base))
    lora = lora_fx.backend(path, inner="aot_eager")
    with raised_while_compiling(lora_fx.LoraFxError, r"layer 'outer.0'.*no tensors under that name"):
        torch.compile(lambda x: outer.outer(x), backend=lora)(torch.randn(2, 8))


def test_a_layer_in_a_checkpointed_body_of_a_renamed_frame_is_refused_not_skipped():
    # transformers' gradient checkpointing: the decoder layers run inside activation-checkpoint
    # bodies, and the compiled frame is the inner model (names relative to it, translated by the
    # attached backend). The body's layers must be recognised under the model's names.
    model = tiny_llama().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = lora_fx.backend(lora_fx.LoraConfig(r=4, target_modules=["q_proj"]), inner="aot_eager")
    lora.parameters(model)
    with raised_while_compiling(lora_fx.UnsupportedFeatureError,
                                r"'model.layers.0.self_attn.q_proj'.*inside the subgraph of a higher-order op"):
        torch.compile(model, backend=lora)(token_input())
