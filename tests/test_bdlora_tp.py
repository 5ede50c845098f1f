"""BdLoRA under tensor parallelism, two processes (gloo, CPU): the adapter shards with the base weight.

A column-parallel `up` (each rank holds a slice of its output rows) adapted with a block-diagonal B,
then a row-parallel `down` (each rank holds a slice of its input columns) adapted with a
block-diagonal A, `nblocks` = the number of ranks. Rank k keeps block k of each block-diagonal
factor and the matching slice of each dense one (`shard` below): locally that is a plain LoRA of
rank r/nblocks on its shard of the base, which each rank runs through a lora_fx backend. The only
collective is the row-parallel layer's usual all-reduce of its partial output; the adapter's share
rides in it. The test compares the sum, and each rank's adapter gradients, with the unsharded
model adapted by lora_fx's BdLoRA in this process. docs/bdlora.md explains the layout.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close
from torch import nn

import lora_fx
from lora_fx.adapters import PEFT_PREFIX
from lora_fx.io import write_adapter_dir

WORLD = 2
D, H, OUT, R, ALPHA = 16, 32, 12, 8, 16


class MLP(nn.Module):
    def __init__(self, d: int, h: int, o: int):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, o)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


def _bdlora_config() -> lora_fx.LoraConfig:
    return lora_fx.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["up", "down"],
                              use_bdlora=lora_fx.BdLoraConfig(target_modules_bd_a=["down"], target_modules_bd_b=["up"],
                                                              nblocks=WORLD))


def _problem():
    """The unsharded model, a trained-looking BdLoRA adapter (compact shapes), the input, and the
    weights of the loss `(y * w).sum()`; the same in every process."""
    torch.manual_seed(0)
    model = MLP(D, H, OUT)
    gen = torch.Generator().manual_seed(1)
    adapter = {"up.lora_A.weight": torch.randn(R, D, generator=gen) * 0.3,              # dense A
               "up.lora_B.weight": torch.randn(H, R // WORLD, generator=gen) * 0.3,     # block-diagonal B
               "down.lora_A.weight": torch.randn(R, H // WORLD, generator=gen) * 0.3,   # block-diagonal A
               "down.lora_B.weight": torch.randn(OUT, R, generator=gen) * 0.3}            # dense B
    x = torch.randn(3, 5, D, generator=gen)
    weights = torch.randn(3, 5, OUT, generator=gen)
    return model, adapter, x, weights


def shard(model: MLP, adapter: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s part of the base and of the adapter.

    up (column-parallel): output rows h·k … h·(k+1) of W and b; of the adapter, B's block k (its rows
    of the compact B) and the rows of A that block reads (r/world rows).
    down (row-parallel): input columns h·k … h·(k+1) of W, the bias on rank 0 only; of the adapter,
    A's block k (its rows of the compact A) and the columns of B that read that block's output.
    """
    h, r = H // world, R // world
    rows, ranks = slice(rank * h, (rank + 1) * h), slice(rank * r, (rank + 1) * r)
    return {"up.weight": model.up.weight[rows], "up.bias": model.up.bias[rows],
            "down.weight": model.down.weight[:, rows],
            "down.bias": model.down.bias if rank == 0 else torch.zeros_like(model.down.bias),
            "up.lora_A.weight": adapter["up.lora_A.weight"][ranks],
            "up.lora_B.weight": adapter["up.lora_B.weight"][rows],
            "down.lora_A.weight": adapter["down.lora_A.weight"][ranks],
            "down.lora_B.weight": adapter["down.lora_B.weight"][:, ranks]}


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    from torch._dynamo.utils import counters

    model, adapter, x, weights = _problem()
    part = shard(model, adapter, rank, world)
    local = MLP(D, H // world, OUT)
    local.load_state_dict({k: v for k, v in part.items() if "lora_" not in k})
    # The rank's adapter: plain LoRA of rank r/world, the same scaling (alpha/world over r/world).
    local_cfg = lora_fx.LoraConfig(r=R // world, lora_alpha=ALPHA / world, target_modules=["up", "down"])
    write_adapter_dir(os.path.join(tmp, f"shard{rank}"), local_cfg.to_peft_dict(),
                      {PEFT_PREFIX + k: v for k, v in part.items() if "lora_" in k})
    lora = lora_fx.backend(os.path.join(tmp, f"shard{rank}"), inner="aot_eager")
    lora.parameters(local)
    fast = torch.compile(local, backend=lora, fullgraph=True)
    partial = fast(x)                                  # this rank's share of down's output
    total = partial.detach().clone()
    dist.all_reduce(total)                             # the row-parallel layer's own all-reduce
    # forward: the sum over ranks; backward: dy to the local share (Megatron's reduce-from-region)
    y = partial + (total - partial.detach())
    (y * weights).sum().backward()
    torch.save(dict(y=y.detach(), grads={k: p.grad.clone() for k, p in lora.named_parameters()},
                    shapes={k: tuple(p.shape) for k, p in lora.named_parameters()},
                    graphs=lora.graphs_compiled, breaks=sum(counters["graph_break"].values())),
               os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _unsharded(tmp_path):
    """y and the adapter's gradients of the whole model, BdLoRA through a lora_fx backend."""
    model, adapter, x, weights = _problem()
    write_adapter_dir(tmp_path / "full", _bdlora_config().to_peft_dict(),
                      {PEFT_PREFIX + k: v for k, v in adapter.items()})
    lora = lora_fx.backend(tmp_path / "full", inner="aot_eager")
    lora.parameters(model)
    y = torch.compile(model, backend=lora, fullgraph=True)(x)
    (y * weights).sum().backward()
    return y.detach(), {k: p.grad for k, p in lora.named_parameters()}


def test_sharded_bdlora_needs_only_the_row_parallel_all_reduce(tmp_path):
    mp.start_processes(_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    y, grads = _unsharded(tmp_path)
    h, r = H // WORLD, R // WORLD
    for k, out in enumerate(ranks):
        assert_close(out["y"], y, f"rank {k}: the all-reduced output vs the unsharded BdLoRA model")
        # each rank's adapter is a slice of the whole: its gradient is the same slice of the whole's
        rows, ranks_ = slice(k * h, (k + 1) * h), slice(k * r, (k + 1) * r)
        want = {"up.lora_A.weight": grads["up.lora_A.weight"][ranks_],
                "up.lora_B.weight": grads["up.lora_B.weight"][rows],
                "down.lora_A.weight": grads["down.lora_A.weight"][ranks_],
                "down.lora_B.weight": grads["down.lora_B.weight"][:, ranks_]}
        assert out["shapes"] == {"up.lora_A.weight": (r, D), "up.lora_B.weight": (h, r),
                                 "down.lora_A.weight": (r, h), "down.lora_B.weight": (OUT, r)}
        for name, g in want.items():
            assert_close(out["grads"][name], g, f"rank {k}: gradient of {name}")
        # each rank's graph is its shard alone (the only collective is the explicit all-reduce of
        # the row-parallel output, which the base needs anyway): one graph, no break
        assert out["graphs"] == 1 and out["breaks"] == 0
    # a shard is not the whole: the ranks' shares differ, and neither alone is the output
    assert (ranks[0]["grads"]["up.lora_B.weight"] - ranks[1]["grads"]["up.lora_B.weight"]).abs().max() > 1e-4

