"""differentiate_base_ops: give gradient-less base ops the gradient of their input.

What it rewrites: calls of library ops that have no autograd formula (bitsandbytes' 4-bit matmul)
become calls of their registered twins (`LayerKind.gradient_twins`: `lora_fx::gemm_4bit`), same
arguments, same forward kernel, plus the input's gradient.

Why: Dynamo traces the base model before lora_fx adds adapters. At that moment no activation
requires grad (the base is frozen), and bitsandbytes then takes its inference shortcut, the bare
op. Once adapters are added, activations do require grad, and gradients must flow back through
every quantized matmul to the adapters before it; through the bare op AOTAutograd gets none (the
adapters upstream train on a wrong gradient, or the backward fails). PEFT's eager model never
meets this: there the activation requires grad when the layer runs.

Invariants: only run on graphs that may need gradients; forward values are unchanged (the twin
calls the same kernel); an op a kind lists in `gradientless_ops` (no twin possible, e.g. CPU-repacked
4-bit weights) whose input depends on an adapter is refused by layer name, rather than left to
give the adapters before it a silently wrong gradient. Calls inside higher-order-op bodies are
not touched: there bitsandbytes' own autograd.Function already gives the gradient.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import UnsupportedFeatureError
from ..layer_kinds import all_kinds
from ..marks import INPUT, has_mark
from .find_targets import module_stack_entry


def differentiate_base_ops(gm: fx.GraphModule) -> int:
    """Rewrite `gm` in place; return the number of calls given a gradient."""
    twins, refusals = {}, {}
    for kind in all_kinds():
        twins.update(kind.gradient_twins)
        refusals.update(kind.gradientless_ops)
    if not twins and not refusals:
        return 0
    after_adapter: set[fx.Node] = set()  # nodes computed from an adapter tensor (one forward pass)
    done = 0
    for node in gm.graph.nodes:
        if has_mark(node, INPUT) or any(a in after_adapter for a in node.all_input_nodes):
            after_adapter.add(node)
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target.name()  # "ns::op" for the default overload, "ns::op.out" for another
        if name in refusals and node.args and node.args[0] in after_adapter:
            entry = module_stack_entry(node)
            layer = entry[0] if entry is not None else node.name
            raise UnsupportedFeatureError(f"layer {layer!r}: {refusals[name]}")
        twin = twins.get(name)
        if twin is not None:
            node.target = twin()
            done += 1
    if done:
        gm.recompile()
    return done
