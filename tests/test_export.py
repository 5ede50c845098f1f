"""Exported programs after transform: decompositions, .module(), re-export, saving."""

from __future__ import annotations

import pytest
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


def _round_trips(ep, x):
    """The forms a user may hold a program in: as is, decomposed, as a module, saved and loaded."""
    import io

    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return {"program": ep, "decomposed": ep.run_decompositions(), "module": ep.module(),
            "saved_and_loaded": torch.export.load(buf)}


def test_merged_program_is_refused_by_transform_in_every_form(tmp_path):
    base, _, path = peft_reference("llama", tmp_path)
    x = token_input()
    merged = lora_fx.merge(lora_fx.transform(torch.export.export(base, (x,)), path))
    for form, prog in _round_trips(merged, x).items():
        with pytest.raises(lora_fx.LoraFxError, match=r"merged into its weights \(layers 'lm_head'|unmerge") as info:
            lora_fx.transform(prog, path)
        assert "lora_fx.unmerge" in str(info.value), form


def test_unmerged_program_can_be_merged_and_unmerged_again(tmp_path):
    base, peft_model, path = peft_reference("llama", tmp_path)
    x = token_input()
    ep = lora_fx.transform(torch.export.export(base, (x,)), path)
    again = lora_fx.unmerge(lora_fx.merge(ep))
    assert_close(again.module()(x).logits, peft_model(x).logits, "unmerged")
    assert_close(lora_fx.merge(again).module()(x).logits, peft_model(x).logits, "merged twice")


def test_transformed_program_is_refused_by_transform_in_every_form(tmp_path):
    # Llama: GPT-2's own exported program fails run_decompositions() (a view of a transposed
    # attention output; torch 2.13, transformers 5.23), with or without lora_fx.
    base, _, path = peft_reference("llama", tmp_path)
    x = token_input()
    base_ep = torch.export.export(base, (x,))
    ep = lora_fx.transform(base_ep, path)
    for form, prog in _round_trips(ep, x).items():
        with pytest.raises(lora_fx.LoraFxError, match=r"already transformed by lora_fx \(adapters on layers "
                                                      r"'model.layers.0.mlp.down_proj'"):
            lora_fx.transform(prog, lora_fx.LoraConfig(r=2, target_modules=["q_proj"]))
        assert form
    gm = lora_fx.transform(base_ep.module(), path)
    with pytest.raises(lora_fx.LoraFxError, match="already transformed"):
        lora_fx.transform(gm, path)


@pytest.mark.parametrize("form", ["program", "module"])
def test_a_new_adapter_can_be_stacked_on_a_merged_program_when_asked(tmp_path, form):
    base, _, path = peft_reference("llama", tmp_path)
    x = token_input()
    merged = lora_fx.merge(lora_fx.transform(torch.export.export(base, (x,)), path))
    second = lora_fx.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    prog = merged if form == "program" else merged.module()
    stacked = lora_fx.transform(prog, second, stack_on_merged=True)
    run = stacked.module() if form == "program" else stacked
    # reference: a fresh program over the merged weights, with the same second adapter
    ref = lora_fx.transform(torch.export.export(merged.module(), (x,)), second, stack_on_merged=True)
    lora_fx.load_adapter(ref, _saved(stacked, tmp_path / "second"))
    assert_close(run(x).logits, ref.module()(x).logits, "stacked on merged")
    assert not torch.equal(run(x).logits, merged.module()(x).logits)


def _saved(obj, path):
    lora_fx.save_adapter(obj, path)
    return path
