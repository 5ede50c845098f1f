"""Adapters of a model sharded across processes (FSDP2's DTensor parameters).

An attached model's adapters are parameters of the model (`registration.py`), so DDP reduces
their gradients and FSDP2 shards them with their block like any parameter. What changes for
lora_fx is reading and writing their values as a whole: a PEFT file holds full tensors.

- Reading (`full_value`) gathers a sharded tensor: a collective, so every process of the group
  must save together, in the same order (`AdapterSet` iterates its layers in a fixed order).
- Writing (`copy_value`) gives each process its own shard of the full value it read; no
  communication (each process reads the file itself).
- Files are written by the process of rank 0 only (`writes_files`), after the gathering every
  process took part in; the others write nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import LoraFxError

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None


def is_sharded(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _fsdp_module_class() -> type | tuple:
    """FSDP2's module class (`isinstance` with `()` is False: torch built without it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return ()
    return FSDPModule


def is_fsdp_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards some module of `model` (its parameters are then FSDP2's to swap)."""
    fsdp_module = _fsdp_module_class()
    return any(isinstance(m, fsdp_module) for m in model.modules())


def full_value(t: torch.Tensor) -> torch.Tensor:
    """`t` whole (gathered if sharded; every process of its mesh must call this too), detached."""
    return t.full_tensor().detach() if is_sharded(t) else t.detach()


def copy_value(t: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full `value` into `t` (into its local shard, if sharded), in place, without grad."""
    with torch.no_grad():
        if is_sharded(t):
            local = distribute_tensor(value.to(dtype=t.dtype, device=t.device), t.device_mesh, t.placements,
                                      src_data_rank=None)  # each process cuts its own shard: no communication
            t.to_local().copy_(local.to_local())
        else:
            t.copy_(value)


def writes_files() -> bool:
    """Whether this process writes adapter files: the only one, or rank 0 of the default group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


_ORDER = ("call lora.parameters(model) (or lora.attach(model)) first, then wrap the model (DistributedDataParallel, "
          "fully_shard), then torch.compile it with the backend")


def check_attachable(model: torch.nn.Module) -> None:
    """Refuse a model already wrapped for data parallelism (the wrapper itself, a compiled wrapper
    of it, or a model with sharded modules): the wrapper took its list of parameters when it was
    built, so adapters registered now would train unsynchronised."""
    from torch.nn.parallel import DistributedDataParallel

    fsdp_module = _fsdp_module_class()
    for name, module in model.named_modules():
        if isinstance(module, DistributedDataParallel):
            raise LoraFxError("attach the model before DistributedDataParallel wraps it: DDP only reduces the "
                              f"gradients of the parameters the model had when it was wrapped; {_ORDER}")
        if isinstance(module, fsdp_module):
            raise LoraFxError(f"attach the model before fully_shard: module {name or '<root>'!r} is already sharded, "
                              f"and FSDP2 manages only the parameters it found then; {_ORDER}")


def check_synchronised(adapter_ids: set[int] | None) -> None:
    """At compile time: refuse adapters that a multi-process training step would leave unsynchronised.

    Args:
        adapter_ids: the ids of the attached model's adapter tensors, or None without an
            attached model.
    """
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is not None and adapter_ids is not None:
        reduced = {id(p) for p in ddp._module_parameters}
        if not adapter_ids <= reduced:
            raise LoraFxError("the adapters were attached after DistributedDataParallel wrapped the model, so DDP does "
                              f"not reduce their gradients; {_ORDER}")
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if adapter_ids is None and torch.is_grad_enabled() and (ddp is not None or multi):
        raise LoraFxError("this backend is not attached to the model, so its adapters are not parameters of the model "
                          "and no data-parallel wrapper synchronises them across processes; " + _ORDER)


class EagerCallGuard:
    """A forward pre-hook of an adapted layer: refuses to run outside a compiled graph inside
    DDP's forward, unless the adapters are `merged` into the weights.

    Compiling a DDP model, Dynamo breaks the graph in DDP's own forward and then skips frames of
    torch's own code: a model whose forward is torch's (`nn.Sequential`) then runs eagerly, where
    lora_fx adds nothing, and would train without its adapters. Inside a traced forward the hook
    is traced away (`is_compiling()`); called from a frame Dynamo skips, it runs eagerly (its code
    is marked so: Dynamo must not compile it as a frame of its own, where it could not tell).
    """

    def __init__(self, layer: str):
        self.layer = layer
        self.merged = False

    def __call__(self, module, args):
        if torch.compiler.is_compiling() or self.merged:
            return
        from torch.nn.parallel import DistributedDataParallel

        if DistributedDataParallel._get_active_ddp_module() is not None:
            raise LoraFxError(
                f"layer {self.layer!r} ran outside a compiled graph inside DistributedDataParallel's forward, where "
                "its adapter does not apply (Dynamo skips the forward of torch's own modules, such as nn.Sequential, "
                "after DDP's graph break). Compile the model inside DDP: "
                "DistributedDataParallel(torch.compile(model, backend=lora))")


def guard_eager_calls(model: torch.nn.Module, layers: list[str]) -> list[tuple[EagerCallGuard, object]]:
    """In a process group, install an `EagerCallGuard` on each adapted layer; return (guard, hook
    handle) pairs (none outside a process group: DDP needs one, and a pre-hook changes how Dynamo
    splits a layer's call at a graph break in another pre-hook of it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return []
    from torch._dynamo.eval_frame import skip_code

    skip_code(EagerCallGuard.__call__.__code__)
    out = []
    for name in layers:
        guard = EagerCallGuard(name)
        out.append((guard, model.get_submodule(name).register_forward_pre_hook(guard)))
    return out
