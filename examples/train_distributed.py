"""Data-parallel LoRA training with lora_fx: DDP or FSDP2, launched by torchrun.

    torchrun --nproc-per-node 2 examples/train_distributed.py --engine fsdp2 --steps 5

Each process runs this file: it builds the same tiny Llama from a config (no hub), attaches the
adapters (LoRA on every linear layer; `--dora` for DoRA), wraps the model, compiles it with the
lora_fx backend, and trains on its slice of the global batch. Rank 0 prints `loss <step> <value>`.
The global batch does not depend on the number of processes, so `--nproc-per-node 1` prints the
same losses (fp32: equal to ~1e-6 relative; the order of the gradient sum differs).

The order is what matters: attach (the adapters become parameters of the model), then wrap
(DDP / fully_shard see them), then compile. CPU runs use gloo, CUDA runs NCCL (`--device cuda`).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx

VOCAB = 128


def build_model(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, use_cache=False)
    return LlamaForCausalLM(config).to(dtype)


def global_batch(step: int, batch: int = 8, seq: int = 16) -> torch.Tensor:
    """The token ids of a step: the same in every process, whatever the number of processes."""
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1000 + step))


def wrap(model: torch.nn.Module, lora: lora_fx.LoraBackend, engine: str, compile_blocks: bool = True):
    """Attach, wrap for `engine`, compile; return what to call. The model must not be wrapped yet."""
    torch.manual_seed(1)  # the same fresh adapters in every process (DDP also broadcasts rank 0's)
    lora.attach(model)  # adapters become parameters of the model: DDP and fully_shard see them
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return torch.compile(DistributedDataParallel(model), backend=lora)
    from torch.distributed.fsdp import fully_shard

    blocks = model.model.layers
    for i, block in enumerate(blocks):
        if compile_blocks:  # per block: FSDP2's hooks stay outside the compiled graphs (no graph breaks)
            block = torch.compile(block, backend=lora, fullgraph=True)
            blocks.register_module(str(i), block)
        fully_shard(block)
    fully_shard(model)
    return model if compile_blocks else torch.compile(model, backend=lora)


def train(engine: str, steps: int, *, dora: bool = False, device: str = "cpu", lr: float = 1e-2,
          save: str | None = None) -> list[float]:
    """Train in a process group that is already initialised; return the global loss of each step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model().to(device)
    cfg = lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora)
    lora = lora_fx.backend(cfg, inner=os.environ.get("LORA_FX_INNER", "aot_eager"))
    run = wrap(model, lora, engine)
    # After wrapping: FSDP2 replaces the parameters by sharded ones, which lora.parameters() returns.
    opt = torch.optim.AdamW(lora.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        ids = global_batch(step).chunk(world)[rank].to(device)
        loss = run(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        dist.all_reduce(loss)  # equal slices: the mean of the slices' means is the global mean
        losses.append(loss.item() / world)
    if save is not None:
        lora.save_adapter(save)  # every process takes part in gathering; rank 0 writes
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp2"], default="fsdp2")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--save", help="write the trained adapter (a PEFT directory) here")
    args = parser.parse_args()
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        losses = train(args.engine, args.steps, dora=args.dora, device=device, save=args.save)
        if dist.get_rank() == 0:
            for step, value in enumerate(losses):
                print(f"loss {step} {value:.6f}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
