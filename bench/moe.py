"""An MoE model (Qwen3-MoE from a transformers config) with LoRA on its expert stacks
(`target_parameters`), lora_fx beside PEFT and the base, forward and training step.

    python -m bench.moe [--hidden 256] [--experts 16] [--moe-inter 128] [--layers 2]
                        [--batch 4] [--seq 128] [--r 16] [--reps 10] [--compiler inductor]

Rows (interleaved reps, medians; ratios against the compiled base with the same experts code):
- experts run as grouped matmuls (transformers' default `grouped_mm`): base, PEFT eager, PEFT
  compiled with `--peft-compiled` (default `torch.compile`: its parametrization breaks the graph
  and recompiles on every call, so it is off by default), lora_fx backend — the factored form:
  the adapter is two more grouped matmuls of rank r, no E×out×in delta;
- experts run as batched matmuls over gathered weights (`batched_mm`: `W[expert_ids]`): base and
  lora_fx, which cannot factor an indexed read and builds `W + s·B·A` once per call (the
  weight form, what PEFT computes for every implementation).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from .harness import CountingBackend, Row, lm_training_row, measure_interleaved


def qwen3_moe(args, experts_implementation: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                         moe_intermediate_size=args.moe_inter, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], use_cache=False)
    cfg._experts_implementation = experts_implementation
    return Qwen3MoeForCausalLM(cfg).train()


def make_rows(args) -> list[Row]:
    import lora_fx

    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    target = dict(r=args.r, lora_alpha=2 * args.r, target_modules=[],
                  target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    rows = []

    def row(name, model, call, trainable):
        return lm_training_row(name, model, call, trainable, ids)

    for impl in ("grouped_mm", "batched_mm"):
        base = qwen3_moe(args, impl)
        for p in base.parameters():
            p.requires_grad_(False)
        base.model.embed_tokens.weight.requires_grad_(True)  # a frozen-base step still runs backward
        counter = CountingBackend(args.compiler)
        r = row(f"[{impl}] base (compiled)", base, torch.compile(base, backend=counter), [])
        r.counter = counter
        rows.append(r)
        if impl == "grouped_mm":
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**target))
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            rows.append(row(f"[{impl}] PEFT eager", peft_model, peft_model, trainable))
            if args.peft_compiled:  # off by default: its parametrization recompiles on every call
                counter = CountingBackend(args.compiler)
                r = row(f"[{impl}] PEFT compiled", peft_model, torch.compile(peft_model, backend=counter),
                        trainable)
                r.counter = counter
                rows.append(r)
        model = copy.deepcopy(base)
        lora = lora_fx.backend(lora_fx.LoraConfig(**target, init_lora_weights=False), inner=args.compiler)
        trainable = lora.parameters(model)
        form = "factored" if impl == "grouped_mm" else "weight form: W + s·B·A per call"
        r = row(f"[{impl}] lora_fx backend ({form})", model, torch.compile(model, backend=lora, fullgraph=True),
                trainable)
        r.counter = lora  # counts the graphs it compiles
        rows.append(r)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.moe")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-inter", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compiler", default="inductor")
    p.add_argument("--peft-compiled", action="store_true", help="add PEFT under torch.compile (slow: recompiles)")
    args = p.parse_args(argv)
    # Every row compiles the same model classes: Dynamo's per-function recompile limit is shared.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    rows = make_rows(args)
    measure_interleaved(rows, args.warmup, args.reps, "cpu")
    print(f"Qwen3-MoE h{args.hidden} E{args.experts} moe_inter{args.moe_inter} L{args.layers}, "
          f"batch {args.batch} x seq {args.seq}, r{args.r} on gate_up_proj + down_proj, {args.compiler}, "
          f"torch {torch.__version__}, {args.reps} interleaved reps (medians)")
    print(f"{'row':64s} {'fwd ms':>8s} {'x base':>7s} {'step ms':>8s} {'x base':>7s} {'breaks':>6s}")
    base = {}
    for row in rows:
        fwd, step = statistics.median(row.fwd_times), statistics.median(row.step_times)
        impl = row.name.split("]")[0]
        base.setdefault(impl, (fwd, step))
        print(f"{row.name:64s} {fwd * 1e3:8.2f} {fwd / base[impl][0]:7.3f} {step * 1e3:8.2f} "
              f"{step / base[impl][1]:7.3f} {row.breaks if row.breaks is not None else '':>6}")



if __name__ == "__main__":
    main()
