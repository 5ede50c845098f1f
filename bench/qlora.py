"""QLoRA: a Llama loaded in 4-bit (bitsandbytes nf4) with LoRA on every linear, lora_fx beside PEFT
and the base, forward and training step.

    python -m bench.qlora [--hidden 512] [--layers 2] [--batch 4] [--seq 128] [--r 16] [--reps 10]
                          [--compute-dtype float32] [--device cpu] [--compiler inductor]

Rows (interleaved reps, medians; ratios against the compiled 4-bit base): base compiled, PEFT
eager, PEFT compiled (default `torch.compile`), lora_fx backend (`fullgraph=True`). The forward is
timed under `torch.no_grad()` in eval mode, the step (loss, backward, SGD) in train mode. On CPU
the 4-bit layers' AVX512-BF16 repacking is turned off (`support_avx512bf16_for_cpu = False`): it
would happen on the first no-grad call and cannot run under torch.compile (the base fails too).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from .harness import CountingBackend, Row, lm_training_row, measure_interleaved


def quantized_llama(path: str, args):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, device_map=args.device, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, args.compute_dtype)))
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def make_rows(args) -> list[Row]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx

    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                                 num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                 vocab_size=1024, use_cache=False)).save_pretrained(path)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    target = dict(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")

    def row(name, model, call, trainable):
        return lm_training_row(name, model, call, trainable, ids, switch_modes=True)

    rows = []
    base = quantized_llama(path, args)
    base.model.embed_tokens.weight.requires_grad_(True)  # a frozen-base step still runs backward
    counter = CountingBackend(args.compiler)
    r = row("base 4-bit (compiled)", base, torch.compile(base, backend=counter), [])
    r.counter = counter
    rows.append(r)

    peft_model = get_peft_model(quantized_llama(path, args), PeftLoraConfig(**target))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    rows.append(row("PEFT eager", peft_model, peft_model, trainable))
    counter = CountingBackend(args.compiler)
    r = row("PEFT compiled", peft_model, torch.compile(peft_model, backend=counter), trainable)
    r.counter = counter
    rows.append(r)

    model = quantized_llama(path, args)
    lora = lora_fx.backend(lora_fx.LoraConfig(**target, init_lora_weights=False), inner=args.compiler)
    trainable = lora.parameters(model)
    r = row("lora_fx backend", model, torch.compile(model, backend=lora, fullgraph=True), trainable)
    r.counter = lora  # counts the graphs it compiles
    rows.append(r)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.qlora")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compiler", default="inductor")
    args = p.parse_args(argv)
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    rows = make_rows(args)
    measure_interleaved(rows, args.warmup, args.reps, args.device)
    print(f"Llama h{args.hidden} L{args.layers} in bitsandbytes nf4 ({args.compute_dtype} compute), batch {args.batch} "
          f"x seq {args.seq}, r{args.r} all-linear, {args.compiler} on {args.device}, torch {torch.__version__}, "
          f"{args.reps} interleaved reps (medians)")
    print(f"{'row':28s} {'fwd ms':>8s} {'x base':>7s} {'step ms':>8s} {'x base':>7s} {'graphs':>6s} {'breaks':>6s}")
    fwd0 = step0 = None
    for row in rows:
        fwd, step = statistics.median(row.fwd_times), statistics.median(row.step_times)
        fwd0, step0 = fwd0 or fwd, step0 or step
        graphs = row.graphs if row.graphs is not None else ""
        print(f"{row.name:28s} {fwd * 1e3:8.2f} {fwd / fwd0:7.3f} {step * 1e3:8.2f} {step / step0:7.3f} "
              f"{graphs:>6} {row.breaks if row.breaks is not None else '':>6}")



if __name__ == "__main__":
    main()
