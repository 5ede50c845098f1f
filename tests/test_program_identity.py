"""A transformed program's adapter is read from the program itself (its marks and signature), so
save_adapter / load_adapter / merge / unmerge work on every copy export makes of it:
`run_decompositions()`, `.module()`, and `torch.export.save` + `load`."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_fx
from lora_fx.errors import AdapterFileError, LoraFxError
from lora_fx.marks import CONFIG, OUTPUT, marked_layers


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, idx):
        return self.out(torch.relu(self.fc(self.emb(idx))))


IDX = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
CFG = dict(r=2, lora_alpha=4, target_modules=["emb", "fc", "out"], init_lora_weights=False)


def _round_trip(ep, how: str):
    if how == "run_decompositions":
        return ep.run_decompositions()
    if how == "module":
        return ep.module()
    if how == "save_load":
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        return torch.export.load(buf)
    return ep


def _call(obj, x):
    return (obj.module() if isinstance(obj, torch.export.ExportedProgram) else obj)(x)


def _transformed(**overrides):
    ep = torch.export.export(Tiny(), (IDX,))
    return lora_fx.transform(ep, lora_fx.LoraConfig(**{**CFG, **overrides}))


ROUTES = ["run_decompositions", "module", "save_load"]


@pytest.mark.parametrize("how", ROUTES)
def test_copies_carry_the_adapter_in_their_graph(how):
    copy_ = _round_trip(_transformed(), how)
    graph = copy_.graph
    assert marked_layers(graph, OUTPUT) == ["emb", "fc", "out"]
    assert sum(1 for n in graph.nodes if (n.meta.get("custom") or {}).get(CONFIG)) == 3


@pytest.mark.parametrize("how", ROUTES)
def test_save_adapter_from_a_copy_writes_the_same_adapter(how, tmp_path):
    ep2 = _transformed()
    lora_fx.save_adapter(ep2, tmp_path / "orig")
    lora_fx.save_adapter(_round_trip(ep2, how), tmp_path / "copy")
    want, got = load_file(tmp_path / "orig" / "adapter_model.safetensors"), \
        load_file(tmp_path / "copy" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert (tmp_path / "copy" / "adapter_config.json").read_text() == \
        (tmp_path / "orig" / "adapter_config.json").read_text()


@pytest.mark.parametrize("how", ROUTES)
def test_load_adapter_into_a_copy_changes_its_outputs_and_its_record(how, tmp_path):
    other = _transformed(lora_alpha=16)  # another adapter: other values, another alpha
    lora_fx.save_adapter(other, tmp_path / "other")
    copy_ = _round_trip(_transformed(), how)
    lora_fx.load_adapter(copy_, tmp_path / "other")
    torch.testing.assert_close(_call(copy_, IDX), other.module()(IDX), rtol=0, atol=1e-6)
    # What it now holds is what it saves (alpha 16), read back from its updated record.
    lora_fx.save_adapter(copy_, tmp_path / "again")
    assert lora_fx.LoraConfig.from_pretrained(tmp_path / "again").lora_alpha == 16


@pytest.mark.parametrize("how", ROUTES)
def test_merge_and_unmerge_a_copy(how):
    copy_ = _round_trip(_transformed(), how)
    before = _call(copy_, IDX)
    merged = lora_fx.merge(copy_)
    assert marked_layers(merged.graph, OUTPUT) == []
    torch.testing.assert_close(_call(merged, IDX), before, rtol=0, atol=1e-5)
    again = lora_fx.unmerge(merged)
    assert torch.equal(_call(again, IDX), before)  # bit-exact


@pytest.mark.parametrize("how", ROUTES)
def test_a_copy_of_a_merged_program_is_refused_with_the_reason(how, tmp_path):
    merged_copy = _round_trip(lora_fx.merge(_transformed()), how)
    with pytest.raises(LoraFxError, match="copy of a merged program"):
        lora_fx.save_adapter(merged_copy, tmp_path / "x")
    with pytest.raises(LoraFxError, match="merged"):
        lora_fx.unmerge(merged_copy)


def test_a_trained_copy_still_refuses_another_dropout(tmp_path):
    ep = torch.export.export(Tiny(), (IDX,))
    trained = lora_fx.transform(ep, lora_fx.LoraConfig(**{**CFG, "lora_dropout": 0.1}), train=True)
    other = lora_fx.transform(ep, lora_fx.LoraConfig(**{**CFG, "lora_dropout": 0.3}))
    lora_fx.save_adapter(other, tmp_path / "other")
    with pytest.raises(AdapterFileError, match="dropout"):
        lora_fx.load_adapter(trained.run_decompositions(), tmp_path / "other")


def test_a_scaling_changed_outside_lora_fx_is_an_error_not_a_wrong_file(tmp_path):
    ep2 = _transformed()
    with torch.no_grad():
        ep2.state_dict["fc.lora_scaling"].fill_(5.0)
    with pytest.raises(LoraFxError, match="'fc'.*scaling 5.0"):
        lora_fx.save_adapter(ep2.run_decompositions(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
