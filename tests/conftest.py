"""Shared fixtures: tiny models, PEFT-saved reference adapters, and comparison helpers."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class ConvNet(nn.Module):
    """Conv1d, grouped+strided Conv2d, and Conv3d, in one forward."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
        self.c3 = nn.Conv3d(2, 4, (1, 2, 2), stride=(1, 1, 2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, 4, 16)
        h = torch.relu(self.c1(x))                      # (B, 6, 16)
        h2 = self.c2(h.view(h.shape[0], 6, 4, 4))       # (B, 8, 2, 2)
        h3 = self.c3(h2.reshape(h2.shape[0], 2, 4, 2, 2))  # (B, 4, 4, 1, 1)
        return self.head(h2.mean((2, 3))) + h3.sum()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        use_cache=False)).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=32,
                                      use_cache=False, attn_pdrop=0, embd_pdrop=0, resid_pdrop=0)).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=128, max_position_embeddings=32, hidden_dropout_prob=0,
                                attention_probs_dropout_prob=0), add_pooling_layer=True).eval()


def conv_net():
    torch.manual_seed(0)
    return ConvNet().eval()


def token_input(batch=2, seq=8):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (batch, seq), generator=g)


# name -> (factory, input factory, PEFT LoraConfig kwargs, output extractor)
MODELS = {
    "llama": (tiny_llama, token_input,
              dict(r=8, lora_alpha=16, target_modules="all-linear",
                   rank_pattern={r"layers\.0\..*_proj": 4}, alpha_pattern={"^model.layers.3.mlp.down_proj": 8}),
              lambda o: o.logits),
    "gpt2": (tiny_gpt2, token_input,
             dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj", "wte"], use_rslora=True),
             lambda o: o.logits),
    "bert": (tiny_bert, token_input,
             dict(r=4, lora_alpha=12, target_modules=["query", "value", "dense", "word_embeddings"],
                  lora_bias=False, layers_to_transform=[1], layers_pattern="layer"),
             lambda o: o.last_hidden_state),
    "convnet": (conv_net, lambda: torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1)),
                dict(r=4, lora_alpha=8, target_modules=["c1", "c2", "c3"], lora_bias=True),
                lambda o: o),
}


def peft_adapter(base, tmp_path, name="adapter", **cfg):
    """(PEFT model over a copy of `base`, its saved directory): random nonzero A, B (and lora_B
    biases, embedding factors); DoRA magnitudes moved off their init so that g != 1."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(123)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**{"init_lora_weights": False, **cfg})).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
            elif "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
            elif "modules_to_save" in n:  # a trained copy differs from the original module
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / name
    peft_model.save_pretrained(path)
    return peft_model, path


def peft_reference(name: str, tmp_path, **overrides):
    """(base model, PEFT model, adapter dir) for one of `MODELS`, with a random PEFT adapter saved."""
    factory, _, kwargs, _ = MODELS[name]
    base = factory()
    peft_model, path = peft_adapter(base, tmp_path, f"{name}_adapter", **{**kwargs, **overrides})
    return base, peft_model, path


def save_via(route: str, base, adapter_dir, x, out_dir):
    """Load `adapter_dir` over a copy of `base` through `route` ("backend" or "program") and save
    it again to `out_dir`."""
    import lora_fx

    if route == "backend":
        lora = lora_fx.backend(adapter_dir, inner="aot_eager")
        lora.parameters(copy.deepcopy(base))
        lora.save_adapter(out_dir)
    else:
        lora_fx.save_adapter(lora_fx.transform(torch.export.export(base, (x,)), adapter_dir), out_dir)
    return out_dir


def forward_backward(model, x, extract=lambda o: o):
    """The output, after `(out * w).sum()` was back-propagated with fixed random weights `w` (every
    output element contributes differently to the gradients)."""
    out = extract(model(x))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out * w).sum().backward()
    return out.detach()


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the adapters an attached backend registered in it."""
    from lora_fx.layers import AdapterHolder

    holders = [name + "." for name, m in model.named_modules() if isinstance(m, AdapterHolder)]
    return {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(holders))}


def assert_close(actual, expected, what="output", rel=1e-5):
    err = (actual.detach().float() - expected.detach().float()).abs().max().item()
    scale = expected.detach().float().abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"{what}: max abs err {err:.3e} > {rel} * max|ref| ({scale:.3e})"


def tamper_adapter_file(path, fn):
    """Apply `fn` to the tensors of `path`'s adapter_model.safetensors and write them back."""
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


def check_grads(named_params, ref_grads, route, rel=1e-5):
    """Every reference grad has a lora_fx tensor of that name with a matching gradient."""
    named = dict(named_params)
    assert set(named) == set(ref_grads), f"{route}: adapter tensors differ from PEFT's: " \
        f"{sorted(set(named) ^ set(ref_grads))[:5]}"
    for name, p in named.items():
        assert p.grad is not None, f"{route}: no gradient for {name}"
        assert_close(p.grad, ref_grads[name], f"{route}: grad of {name}", rel)


def peft_adapter_grads(peft_model) -> dict[str, torch.Tensor]:
    """PEFT grads keyed by lora_fx's names (`layer.key`)."""
    out = {}
    for n, p in peft_model.named_parameters():
        if p.grad is None or ("lora_" not in n and "modules_to_save" not in n):
            continue
        n = n.removeprefix("base_model.model.").replace(".default", "")
        n = n.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")  # PEFT's saved key
        out[n] = p.grad
    return out


@contextlib.contextmanager
def raised_while_compiling(exc_type: type, match: str):
    """A lora_fx error raised while Dynamo compiles reaches the caller wrapped in Dynamo's
    `BackendCompilerFailed`; the error itself is its `.inner_exception`. Check that one."""
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        yield info
    inner = info.value.inner_exception
    assert isinstance(inner, exc_type), f"{type(inner).__name__}: {inner}"
    assert re.search(match, str(inner)), f"{match!r} not in {inner}"


@pytest.fixture
def inner():
    return "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty Dynamo caches: many tests compile the same model classes, and
    Dynamo's per-code-object recompile limit (8) would otherwise be shared across tests."""
    torch._dynamo.reset()
    yield
