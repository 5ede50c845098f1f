"""Exported programs after transform: decompositions, .module(), re-export, saving."""

from __future__ import annotations

import torch
from conftest import assert_close, peft_reference, token_input

import lora_fx


def test_transformed_program_survives_decompositions_and_reexport(tmp_path):
    base, peft_model, path = peft_reference("llama", tmp_path)
    x = token_input()
    ref = peft_model(x).logits
    ep = lora_fx.transform(torch.export.export(base, (x,)), path)
    dec = ep.run_decompositions()
    assert_close(dec.module()(x).logits, ref, "after run_decompositions")
    again = torch.export.export(ep.module(), (x,))
    assert_close(again.module()(x).logits, ref, "re-exported")
    n_lora = sum(1 for s in ep.graph_signature.input_specs if "lora_" in (s.target or ""))
    assert n_lora == 4 * 7 * 3  # A, B, scaling for each of 7 linears in 4 layers


def test_original_program_is_untouched(tmp_path):
    base, _, path = peft_reference("gpt2", tmp_path)
    x = token_input()
    ep = torch.export.export(base, (x,))
    code = ep.graph_module.code
    before = ep.module()(x).logits
    lora_fx.transform(ep, path)
    assert ep.graph_module.code == code
    assert torch.equal(ep.module()(x).logits, before)
    assert all(p.requires_grad for p in base.parameters())


def test_save_from_program_is_readable_by_peft(tmp_path):
    from peft import PeftModel

    base, peft_model, path = peft_reference("gpt2", tmp_path)
    x = token_input()
    ep = lora_fx.transform(torch.export.export(base, (x,)), path)
    out_dir = tmp_path / "resaved"
    lora_fx.save_adapter(ep, out_dir)
    reloaded = PeftModel.from_pretrained(base, out_dir).eval()
    assert_close(reloaded(x).logits, peft_model(x).logits, "PEFT reading lora_fx's save")
