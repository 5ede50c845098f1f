"""Data parallelism over the backend: DDP and FSDP2, two processes (gloo, CPU) against one.

The recipe under test is examples/train_distributed.py's `wrap`: attach (the adapters become
parameters of the model), wrap (DDP / fully_shard per block + root), compile. Each scenario runs
in two spawned processes that write what they saw to files; the test compares it with the same
training in this process, without any wrapper, on the whole global batch.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close, raised_while_compiling

import lora_fx
from lora_fx.distributed import full_value

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
from train_distributed import build_model, global_batch, wrap  # noqa: E402

STEPS = 5
WORLD = 2


def _config(dora: bool = False) -> lora_fx.LoraConfig:
    return lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora)


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _train(run, lora, model, rank: int, world: int, steps: int = STEPS, opt=None, first_step: int = 0):
    """Train `steps` steps; return the global losses, the adapters' (whole) gradients of the last
    step, the optimizer, and the number of graphs the backend had compiled after each step."""
    opt = opt or torch.optim.AdamW(lora.parameters(), lr=1e-2)
    model.train()
    losses, graphs, grads = [], [], {}
    for step in range(first_step, first_step + steps):
        ids = global_batch(step).chunk(world)[rank]
        loss = run(ids, labels=ids).loss
        loss.backward()
        grads = {name: full_value(p.grad).clone() for name, p in lora.named_parameters()}
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
        graphs.append(lora.graphs_compiled)
    return losses, grads, opt, graphs


def _reference(dora: bool = False, dtype=torch.float32, steps: int = STEPS):
    """One process, no wrapper, the whole global batch."""
    model = build_model(dtype)
    lora = lora_fx.backend(_config(dora), inner="aot_eager")
    torch.manual_seed(1)
    lora.attach(model)
    run = torch.compile(model, backend=lora)
    losses, grads, _, _ = _train(run, lora, model, 0, 1, steps)
    return losses, grads, lora, run


def _spawn(worker, tmp_path, *args):
    mp.start_processes(worker, args=(WORLD, str(tmp_path), *args), nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _init(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)


def _only_adapters_train(model, lora, opt) -> dict:
    adapters = {id(p) for p in lora.parameters()}
    return {
        "base_grads": [n for n, p in model.named_parameters() if id(p) not in adapters and p.grad is not None],
        "base_trainable": [n for n, p in model.named_parameters() if id(p) not in adapters and p.requires_grad],
        "optimizer_state_is_adapters": {id(p) for p in opt.state} == adapters,
        "adapters": len(adapters),
    }


# -- workers (run in the spawned processes) ---------------------------------------------------------
def _ddp_worker(rank, world, tmp):
    _init(rank, world, tmp)
    model = build_model()
    lora = lora_fx.backend(_config(), inner="aot_eager")
    breaks = _graph_breaks()
    run = wrap(model, lora, "ddp")
    losses, grads, opt, graphs = _train(run, lora, model, rank, world)
    out = dict(losses=losses, grads=grads, graphs=graphs, breaks=_graph_breaks() - breaks,
               **_only_adapters_train(model, lora, opt))
    lora.save_adapter(os.path.join(tmp, "saved"))
    # The same model compiled without lora_fx: DDP's own graph breaks, for comparison.
    from torch.nn.parallel import DistributedDataParallel

    breaks = _graph_breaks()
    plain = torch.compile(DistributedDataParallel(build_model()), backend="aot_eager")
    ids = global_batch(0).chunk(world)[rank]
    plain(ids, labels=ids).loss.backward()
    out["plain_breaks"] = _graph_breaks() - breaks
    # A backend that is not attached: its adapters are not the model's, nothing would reduce them.
    unattached = lora_fx.backend(_config(), inner="aot_eager")
    try:
        torch.compile(build_model(), backend=unattached)(ids, labels=ids)
        out["unattached"] = "ran"
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        out["unattached"] = str(e)
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _fsdp2_worker(rank, world, tmp):
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    _init(rank, world, tmp)

    def fresh():
        model = build_model()
        lora = lora_fx.backend(_config(), inner="aot_eager")
        return model, lora, wrap(model, lora, "fsdp2")

    breaks = _graph_breaks()
    model, lora, run = fresh()
    # Stop after 3 steps (a distributed checkpoint of the adapters and the optimizer), go on to 5.
    first, _, opt, graphs = _train(run, lora, model, rank, world, steps=3)
    keys = set(lora.model_state_keys())
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp_save({"model": {k: v for k, v in model_sd.items() if k in keys}, "optim": optim_sd},
             checkpoint_id=os.path.join(tmp, "dcp"))
    rest, grads, _, more_graphs = _train(run, lora, model, rank, world, steps=2, opt=opt, first_step=3)
    params = dict(lora.named_parameters())
    out = dict(losses=first + rest, grads=grads, graphs=graphs + more_graphs, breaks=_graph_breaks() - breaks,
               sharded=all(type(p).__name__ == "DTensor" for p in params.values()),
               local_rows={n: tuple(p.to_local().shape) for n, p in params.items()},
               **_only_adapters_train(model, lora, opt))
    lora.save_adapter(os.path.join(tmp, "saved"))

    # Load an adapter trained elsewhere into the sharded model; evaluate the whole batch.
    lora.load_adapter(os.path.join(tmp, "reference"))
    model.eval()
    with torch.no_grad():
        out["loaded_logits"] = run(global_batch(99)).logits

    # Resume from the checkpoint in fresh modules: steps 4 and 5 again.
    model, lora, run = fresh()
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": {k: v for k, v in model_sd.items() if k in keys}, "optim": optim_sd}
    dcp_load(state, checkpoint_id=os.path.join(tmp, "dcp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    resumed, _, _, _ = _train(run, lora, model, rank, world, steps=2, opt=opt, first_step=3)
    out.update(rest=rest, resumed=resumed)
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _fsdp2_dora_bf16_worker(rank, world, tmp):
    """The whole model compiled over FSDP2 (its hooks break the graph), DoRA, bf16 base."""
    _init(rank, world, tmp)
    model = build_model(torch.bfloat16)
    lora = lora_fx.backend(_config(dora=True), inner="aot_eager")
    breaks = _graph_breaks()
    run = wrap(model, lora, "fsdp2", compile_blocks=False)
    losses, grads, opt, graphs = _train(run, lora, model, rank, world)
    out = dict(losses=losses, grads=grads, graphs=graphs, breaks=_graph_breaks() - breaks,
               dtypes={str(p.dtype) for p in lora.parameters()}, **_only_adapters_train(model, lora, opt))
    from torch.distributed.fsdp import fully_shard

    plain = build_model(torch.bfloat16)
    for block in plain.model.layers:
        fully_shard(block)
    fully_shard(plain)
    breaks = _graph_breaks()
    ids = global_batch(0).chunk(world)[rank]
    torch.compile(plain, backend="aot_eager")(ids, labels=ids).loss.backward()
    out["plain_breaks"] = _graph_breaks() - breaks
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


# -- tests ----------------------------------------------------------------------------------------------
def _check_training(ranks, ref_losses, ref_grads, rel=1e-5, grad_rel=1e-4):
    for r, out in enumerate(ranks):
        for step, (got, want) in enumerate(zip(out["losses"], ref_losses, strict=True)):
            assert abs(got - want) <= rel * abs(want), f"rank {r} step {step}: loss {got} vs one process {want}"
        assert sorted(out["grads"]) == sorted(ref_grads)
        for name, g in out["grads"].items():
            assert_close(g, ref_grads[name], f"rank {r}: gradient of {name}", rel=grad_rel)
        assert out["base_grads"] == [] and out["base_trainable"] == [], "a base weight trains"
        assert out["optimizer_state_is_adapters"], "the optimizer holds state for something else than the adapters"
        assert out["graphs"][1] == out["graphs"][-1], f"recompiled after step 2: {out['graphs']}"


def _resaved_by_one_process(tmp_path, model):
    """The adapter the processes saved, loaded and saved again by a single process."""
    lora = lora_fx.backend(str(tmp_path / "saved"), inner="aot_eager")
    lora.attach(model)
    lora.save_adapter(tmp_path / "resaved")
    return [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("saved", "resaved")]


def test_ddp_matches_one_process_and_reduces_the_adapters(tmp_path):
    ref_losses, ref_grads, _, _ = _reference()
    ranks = _spawn(_ddp_worker, tmp_path)
    _check_training(ranks, ref_losses, ref_grads)
    for name, g in ranks[0]["grads"].items():  # all-reduced: the very same values in every process
        assert torch.equal(g, ranks[1]["grads"][name]), f"{name}: gradients differ across ranks"
    assert ranks[0]["adapters"] == 2 * 7 * 2
    assert ranks[0]["breaks"] == ranks[0]["plain_breaks"], "lora_fx added graph breaks to the DDP model"
    assert "not attached" in ranks[0]["unattached"], ranks[0]["unattached"]
    saved, resaved = _resaved_by_one_process(tmp_path, build_model())
    assert saved == resaved, "the DDP save differs from a single process's save of the same values"


def test_fsdp2_shards_the_adapters_and_matches_one_process(tmp_path):
    ref_losses, ref_grads, ref_lora, ref_run = _reference()
    ref_lora.save_adapter(tmp_path / "reference")  # trained: B != 0, so loading it changes outputs
    ref_lora._model.eval()
    with torch.no_grad():
        ref_logits = ref_run(global_batch(99)).logits
    ranks = _spawn(_fsdp2_worker, tmp_path)
    _check_training(ranks, ref_losses, ref_grads)
    for r, out in enumerate(ranks):
        assert out["breaks"] == 0, f"rank {r}: {out['breaks']} graph breaks"
        assert out["sharded"], "the adapters are not DTensors"
        for name, rows in out["local_rows"].items():  # dim 0 split over the two processes
            assert rows[0] == -(-ref_grads[name].shape[0] // WORLD), (name, rows)
        assert_close(out["loaded_logits"], ref_logits, f"rank {r}: adapter loaded into the sharded model")
        assert out["resumed"] == out["rest"], f"rank {r}: resumed {out['resumed']} vs uninterrupted {out['rest']}"
    saved, resaved = _resaved_by_one_process(tmp_path, build_model())
    assert saved == resaved, "the FSDP2 save differs from a single process's save of the same values"


def test_fsdp2_whole_model_compile_dora_bf16(tmp_path):
    ref_losses, ref_grads, _, _ = _reference(dora=True, dtype=torch.bfloat16)
    ranks = _spawn(_fsdp2_dora_bf16_worker, tmp_path)
    # bf16: the two processes' slices round differently from one batch (attention, norms)
    _check_training(ranks, ref_losses, ref_grads, rel=2e-3, grad_rel=5e-2)
    for out in ranks:
        assert out["dtypes"] == {"torch.float32"}, "fp32 adapters on the bf16 base"
        assert out["breaks"] == out["plain_breaks"], "lora_fx added graph breaks to the FSDP2 model"
        assert any("lora_magnitude_vector" in n for n in out["grads"])


# -- in one process -------------------------------------------------------------------------------------
@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_attaching_after_the_wrapper_is_refused(one_process_group):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model = build_model()
    ddp = DistributedDataParallel(model)
    with pytest.raises(lora_fx.LoraFxError, match="before DistributedDataParallel wraps it"):
        lora_fx.backend(_config()).attach(ddp)
    lora = lora_fx.backend(_config(), inner="aot_eager")
    lora.attach(model)  # the inner model: DDP took its parameter list without the adapters
    ids = global_batch(0)
    with raised_while_compiling(lora_fx.LoraFxError, "attached after DistributedDataParallel"):
        torch.compile(ddp, backend=lora)(ids, labels=ids)
    sharded = build_model()
    fully_shard(sharded.model.layers[0])
    with pytest.raises(lora_fx.LoraFxError, match=r"before fully_shard: module 'model.layers.0'"):
        lora_fx.backend(_config()).attach(sharded)


def test_merging_sharded_adapters_is_refused(one_process_group):
    model = build_model()
    lora = lora_fx.backend(_config(), inner="aot_eager")
    wrap(model, lora, "fsdp2")
    with pytest.raises(lora_fx.UnsupportedFeatureError, match="sharded across processes.*DTensor"):
        lora.merge()


def test_ddp_graph_splitting_compiles_each_fragment(one_process_group, monkeypatch):
    """Dynamo splits a DDP model's graph at the buckets of the trainable parameters it reads (here
    the base biases, `bias="all"`); lora_fx adapts each fragment, which it names by the model."""
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 256)

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)])

    cfg = lora_fx.LoraConfig(r=2, target_modules=["0", "1", "2", "3"], bias="all", init_lora_weights=False)
    x = torch.randn(4, 32)
    results = []
    for use_ddp in (False, True):
        model = net()
        lora = lora_fx.backend(cfg, inner="aot_eager")
        torch.manual_seed(1)
        lora.attach(model)
        fast = torch.compile(model, backend=lora)  # nn.Sequential: compiled inside DDP (see below)
        out = (DistributedDataParallel(fast, bucket_cap_mb=0.0005) if use_ddp else fast)(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in lora.named_parameters()}, lora.graphs_compiled))
    (ref, ref_grads, _), (out, grads, graphs) = results
    assert graphs > 1, "the DDP graph was not split: the test does not test splitting"
    assert_close(out, ref, "split DDP graph")
    for name, g in grads.items():
        assert_close(g, ref_grads[name], f"gradient of {name}")


def test_a_model_dynamo_would_run_eagerly_inside_ddp_is_refused(one_process_group):
    """Compiling DDP(nn.Sequential), Dynamo breaks the graph in DDP's forward and then skips
    Sequential's forward (torch's own code): the layers would run eagerly, without adapters."""
    from torch.nn.parallel import DistributedDataParallel

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    lora = lora_fx.backend(lora_fx.LoraConfig(r=2, target_modules=["0", "2"]), inner="aot_eager")
    lora.attach(model)
    with pytest.raises(lora_fx.LoraFxError, match=r"layer '0' ran outside a compiled graph inside "
                                                  r"DistributedDataParallel.*DistributedDataParallel\(torch.compile"):
        torch.compile(DistributedDataParallel(model), backend=lora)(torch.randn(4, 8))
    out = DistributedDataParallel(torch.compile(model, backend=lora))(torch.randn(4, 8))  # the fix it names
    assert lora.graphs_compiled == 1 and out.requires_grad


def test_the_example_runs_with_the_documented_command(tmp_path):
    import re
    import subprocess

    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_distributed.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               example, "--engine", "fsdp2", "--steps", "3", "--dora", "--save", str(tmp_path / "adapter")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    printed = [float(v) for v in re.findall(r"^loss \d+ (\S+)$", run.stdout, re.M)]
    ref_losses, _, _, _ = _reference(dora=True, steps=3)  # DoRA's magnitudes and norms, sharded, in fp32
    assert len(printed) == 3, run.stdout
    for got, want in zip(printed, ref_losses, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (printed, ref_losses)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp2_on_a_meta_built_model_initialises_the_adapters_when_asked(one_process_group):
    from torch.distributed.fsdp import fully_shard

    source = build_model()
    ids = global_batch(0)
    with torch.no_grad():
        base_logits = source(ids).logits

    def sharded_on_meta():
        with torch.device("meta"):
            model = build_model()
        lora = lora_fx.backend(_config(), inner="aot_eager")
        lora.attach(model)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in source.state_dict():
                    p.to_local().copy_(source.state_dict()[name])  # one process: the shard is the whole
            for name, b in model.named_buffers():  # rotary frequencies: not in a checkpoint
                b.copy_(source.get_buffer(name))
        return model, lora

    model, lora = sharded_on_meta()
    with raised_while_compiling(lora_fx.LoraFxError, "call lora.parameters\\(\\) after to_empty"):
        torch.compile(model, backend=lora)(ids)
    model, lora = sharded_on_meta()
    params = lora.parameters()  # initialises: lora_A random, lora_B zero, in the shards
    assert all(type(p).__name__ == "DTensor" and torch.isfinite(full_value(p)).all() for p in params)
    assert any(full_value(p).abs().sum() > 0 for p in params)
    with torch.no_grad():
        assert_close(torch.compile(model, backend=lora)(ids).logits, base_logits, "fresh adapters are a no-op")
