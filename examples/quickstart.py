"""lora_fx quickstart: LoRA on a tiny Llama via the torch.compile backend, then the same adapter
on an exported program. No hub, no network: the model is built from a config.

    python examples/quickstart.py
"""

import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=64, use_cache=False))

# Toy task: predict the next token of a fixed repeating sequence.
seq = torch.arange(32) % 7 + 3
ids = seq.repeat(4, 1)

cfg = lora_fx.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                         rank_pattern={r"layers\.0\..*_proj": 4})
inner = os.environ.get("LORA_FX_INNER", "aot_eager")  # "inductor" compiles C++ kernels (slower to start)
lora = lora_fx.backend(cfg, inner=inner)
opt = torch.optim.AdamW(lora.parameters(model), lr=1e-2)  # adapters exist before the first call
fast = torch.compile(model, backend=lora, fullgraph=True)

model.train()
for step in range(30):
    loss = fast(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 5 == 0 or step == 29:
        print(f"step {step:2d}  loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    out_backend = fast(ids).logits

out_dir = os.path.join(tempfile.mkdtemp(), "adapter")
lora.save_adapter(out_dir)                       # PEFT format
print("saved", sorted(os.listdir(out_dir)))

ep = lora_fx.transform(torch.export.export(model, (ids,)), out_dir)
with torch.no_grad():
    out_export = ep.module()(ids).logits
err = (out_export - out_backend).abs().max().item()
print(f"exported program vs compiled backend: max abs diff {err:.2e}")
assert err <= 1e-4 * out_backend.abs().max().item(), "outputs differ"
print("ok")
