"""Half-precision bases: fp32 adapters, PEFT's arithmetic (add in fp32, round once), bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import peft_adapter
from torch import nn

import lora_fx


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 12)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.fc(torch.relu(h))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("route", ["backend", "program"])
def test_half_base_is_bit_equal_to_peft(tmp_path, dtype, route):
    torch.manual_seed(0)
    base = Mixed().eval().to(dtype)
    peft_model, path = peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["emb", "conv", "fc"])
    assert peft_model.base_model.model.fc.lora_A["default"].weight.dtype == torch.float32  # autocast_adapter_dtype
    ids = torch.randint(0, 20, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = peft_model(ids)
        if route == "backend":
            lora = lora_fx.backend(path, inner="aot_eager")
            lora.parameters(base)
            out = torch.compile(base, backend=lora, fullgraph=True)(ids)
        else:
            out = lora_fx.transform(torch.export.export(base, (ids,)), path).module()(ids)
    assert out.dtype == dtype
    differ = (out != ref).sum().item()
    assert differ == 0, f"{differ} of {out.numel()} outputs differ from PEFT's (max {(out - ref).abs().max()})"
