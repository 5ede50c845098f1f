"""QLoRA and MoE expert targets on CUDA: the paths the CPU suite cannot take (bitsandbytes' CUDA
4-bit kernels, aten._grouped_mm on CUDA, Inductor's GPU code). Skipped without CUDA; written for
the sessions that are lent a GPU (`python -m pytest tests/gpu -q`). Not yet run on a GPU when
written (2026-11-30): a failure here may be the test's own."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check_against_peft(peft_model, adapter_dir, model, x, what: str) -> None:
    """`model` through the backend (Inductor, fullgraph) loading `adapter_dir` matches `peft_model`:
    logits and the gradients of every A and B, at bf16 tolerances (Inductor's fusions round
    differently from PEFT's eager ops)."""
    from conftest import check_grads, forward_backward, peft_adapter_grads

    import lora_fx

    expected = forward_backward(peft_model, x, lambda o: o.logits.float())
    lora = lora_fx.backend(adapter_dir, inner="inductor")
    lora.parameters(model)
    params = dict(lora.named_parameters())
    out = forward_backward(torch.compile(model, backend=lora, fullgraph=True), x, lambda o: o.logits.float())
    assert lora.graphs_compiled == 1
    err = (out - expected).abs().max().item()
    assert err <= 2e-2 * expected.abs().max().item(), f"{what}: logits err {err}"
    check_grads(params, peft_adapter_grads(peft_model), what, rel=5e-2)


@pytest.mark.parametrize("quant", ["nf4-bf16", "fp4-bf16"])
def test_qlora_backend_matches_peft_on_cuda(quant, tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_qlora import CFG, QUANT, ids, peft_on
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, use_cache=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")

    def load():
        return LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, device_map="cuda",
                                                quantization_config=BitsAndBytesConfig(**QUANT[quant])).train()

    peft_model, path = peft_on(load(), tmp_path, **CFG)
    check_against_peft(peft_model, path, load(), ids().cuda(), quant)


def test_moe_experts_factored_form_matches_peft_on_cuda(tmp_path):
    from conftest import peft_adapter
    from test_parameter_targets import CONFIGS, ids, tiny_qwen3_moe

    base = tiny_qwen3_moe().to("cuda", torch.bfloat16)
    peft_model, path = peft_adapter(base, tmp_path, **CONFIGS["experts"])
    check_against_peft(peft_model, path, copy.deepcopy(base), ids().cuda(), "moe cuda")
