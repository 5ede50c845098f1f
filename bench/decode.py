"""Generation-shaped rows: one decode step (1 new token, KV cache of the prompt) and a prefill.

    python -m bench --decode [--smoke | --preset cpu|gpu] [--reps N] [--compiler C] [--threads N] [--out FILE]
    python -m bench.decode [same options] [--batches 1,8,32] [--layers N] [--cudagraphs]

The Llama of the harness's preset (`bench/harness.py`, `PRESETS`: the `gpu` preset is a 1B-shaped
Llama in bf16, picked when CUDA is available) in four variants, each its own copy, every one
compiled (`dynamic=False`: one static graph per shape):
- base: the plain model, `torch.compile`;
- PEFT: `get_peft_model` (LoRA r, all-linear), `torch.compile` (its default, no fullgraph);
- lora_fx unmerged: the model through `lora_fx.backend` (`fullgraph=True`), the adapter in the graph;
- lora_fx merged: the same backend after `lora_fx.merge`: the adapter folded into the weights.
The three adapted variants carry the same adapter (PEFT's, saved with a nonzero B and loaded by
lora_fx), so their logits can be compared: the report gives the largest |Δ logits| against PEFT's
at the last decode shape.

Cells (medians of interleaved reps after warm-up, ms per call, ratio to the base of the same cell):
- **prefill**: the prompt (preset batch × preset seq tokens) into an empty cache;
- **decode, batch B**: one new token per sequence (input 1 token × B) over a cache that holds the
  prompt's `seq` positions, for B in `--batches` (1, 8, 32).
The cache is transformers' `StaticCache` (`max_cache_len = seq + 1`, initialised before compiling,
filled with the same seeded values in every variant); every call is preceded (outside the timed
region) by resetting the cache's write position, so each timed decode step writes position `seq`
and attends over `seq + 1` keys, call after call, with no recompile. All calls keep only the last
position's logits (`logits_to_keep=1`), as generation does.

`--cudagraphs` turns on Inductor's CUDA graphs (`torch._inductor.config.triton.cudagraphs`, what
`mode="reduce-overhead"` sets) for every variant alike: a decode step of a small model on a GPU is
otherwise bounded by kernel launches rather than by HBM. Not yet run on a GPU when written.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from .harness import (
    CountingBackend,
    Shape,
    add_llama_arguments,
    environment,
    graph_breaks,
    lift_recompile_limits,
    llama,
    llama_setup,
    publish,
    synchronize,
)

BATCHES = (1, 8, 32)
VARIANTS = ("base", "PEFT", "lora_fx unmerged", "lora_fx merged")


class Variant:
    def __init__(self, name: str, model, fn: Callable, counter: CountingBackend):
        self.name, self.model, self.fn, self.counter = name, model, fn, counter
        self.graphs_after_warmup = 0
        self.breaks = 0


def make_variants(base_model, shape: Shape, compiler: str, adapter_dir: str) -> list[Variant]:
    """The four compiled variants over copies of `base_model`; the adapted ones carry the PEFT
    adapter saved to `adapter_dir` (nonzero B, so nothing is a no-op)."""
    import peft

    import lora_fx

    out = []
    model = copy.deepcopy(base_model).eval().requires_grad_(False)
    counter = CountingBackend(compiler)
    out.append(Variant("base", model, torch.compile(model, backend=counter, dynamic=False), counter))

    torch.manual_seed(123)
    cfg = peft.LoraConfig(r=shape.r, lora_alpha=2 * shape.r, target_modules="all-linear", lora_dropout=0.0,
                          init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base_model), cfg).eval()
    with torch.no_grad():  # a trained adapter's scale: B nonzero, the delta small against the base
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.02)
    peft_model.save_pretrained(adapter_dir)
    counter = CountingBackend(compiler)
    out.append(Variant("PEFT", peft_model, torch.compile(peft_model, backend=counter, dynamic=False), counter))

    for merged in (False, True):
        model = copy.deepcopy(base_model).eval()
        counter = CountingBackend(compiler)
        lora = lora_fx.backend(adapter_dir, inner=counter)
        lora.parameters(model)
        if merged:
            lora_fx.merge(lora)
        fn = torch.compile(model, backend=lora, fullgraph=True, dynamic=False)
        out.append(Variant(f"lora_fx {'merged' if merged else 'unmerged'}", model, fn, counter))
    return out


class Cells:
    """The inputs and caches of one cell (prefill or a decode batch), one cache per variant."""

    def __init__(self, label: str, batch: int, new_tokens: int, start: int, shape: Shape, config, n_variants: int):
        from transformers import StaticCache

        self.label, self.batch, self.new_tokens, self.start = label, batch, new_tokens, start
        dev, dtype = shape.device, shape.torch_dtype
        gen = torch.Generator().manual_seed(1000 + batch + new_tokens)
        self.ids = torch.randint(0, shape.vocab, (batch, new_tokens), generator=gen).to(dev)
        self.positions = torch.arange(start, start + new_tokens, device=dev)[None].expand(batch, -1)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.caches = []
        for _ in range(n_variants):
            cache = StaticCache(config=config, max_cache_len=shape.seq + 1)
            cache.early_initialization(batch, config.num_key_value_heads, head_dim, dtype, torch.device(dev))
            self.caches.append(cache)
        # The cache content: the same seeded values in every variant's cache (a prompt's keys and values).
        for layer_index in range(len(self.caches[0].layers)):
            for attr in ("keys", "values"):
                like = getattr(self.caches[0].layers[layer_index], attr)
                values = torch.randn(like.shape, generator=gen).to(dev, dtype)
                for cache in self.caches:
                    getattr(cache.layers[layer_index], attr).copy_(values)

    def reset(self, index: int) -> None:
        """Rewind variant `index`'s cache so that the next call writes at `start` (no other state changes)."""
        for layer in self.caches[index].layers:
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(self.start)
            elif length is not None:
                layer.cumulative_length = self.start

    def call(self, variant: Variant, index: int, cache_kw: str):
        with torch.no_grad():
            return variant.fn(input_ids=self.ids, position_ids=self.positions, use_cache=True, logits_to_keep=1,
                              **{cache_kw: self.caches[index]})


def timed_call(cell: Cells, variant: Variant, index: int, cache_kw: str, device: str) -> float:
    cell.reset(index)
    synchronize(device)
    start = time.perf_counter()
    cell.call(variant, index, cache_kw)
    synchronize(device)
    return time.perf_counter() - start


def run(shape: Shape, compiler: str, batches=BATCHES, cudagraphs: bool = False) -> tuple[list, list[Cells], dict]:
    """Build, warm up, time. Returns (variants, cells, times[(cell label, variant name)] -> seconds list)."""
    lift_recompile_limits(256)  # every variant compiles the same transformers code objects, per shape
    torch.manual_seed(0)
    base_model = llama(shape).eval()
    cache_kw = "cache" if "cache" in inspect.signature(type(base_model).forward).parameters else "past_key_values"
    with tempfile.TemporaryDirectory() as tmp:
        variants = make_variants(base_model, shape, compiler, os.path.join(tmp, "adapter"))
    cells = [Cells(f"prefill, batch {shape.batch} x {shape.seq} tokens", shape.batch, shape.seq, 0, shape,
                   base_model.config, len(variants))]
    cells += [Cells(f"decode, batch {b}: 1 token, cache {shape.seq}", b, 1, shape.seq, shape, base_model.config,
                    len(variants)) for b in batches]
    times = {(c.label, v.name): [] for c in cells for v in variants}
    graphs_ctx = _cudagraphs() if cudagraphs else contextlib.nullcontext()
    with graphs_ctx:
        for index, variant in enumerate(variants):
            before = graph_breaks()
            for cell in cells:
                for _ in range(1 + shape.warmup):
                    cell.reset(index)
                    cell.call(variant, index, cache_kw)
            synchronize(shape.device)
            variant.breaks = graph_breaks() - before
            variant.graphs_after_warmup = variant.counter.graphs
        for _ in range(shape.reps):
            for cell in cells:  # interleaved: every variant of a cell back to back, then the next cell
                for index, variant in enumerate(variants):
                    times[(cell.label, variant.name)].append(timed_call(cell, variant, index, cache_kw, shape.device))
        last = cells[-1]
        logits = []
        for index, variant in enumerate(variants):
            last.reset(index)
            logits.append(last.call(variant, index, cache_kw).logits.float().clone())
    peft_index = [v.name for v in variants].index("PEFT")
    diffs = {v.name: (logits[i] - logits[peft_index]).abs().max().item() for i, v in enumerate(variants)}
    diffs["scale"] = logits[peft_index].abs().max().item()
    return variants, cells, dict(times=times, diffs=diffs)


@contextlib.contextmanager
def _cudagraphs():
    import torch._inductor.config as inductor_config

    before = inductor_config.triton.cudagraphs
    inductor_config.triton.cudagraphs = True
    try:
        yield
    finally:
        inductor_config.triton.cudagraphs = before


def report(variants: list[Variant], cells: list[Cells], result: dict, shape: Shape, compiler: str, command: str,
           cudagraphs: bool) -> str:
    times = result["times"]
    names = [v.name for v in variants]
    lines = [f"Command: `{command}`", "", environment(shape), "",
             f"{shape.describe().split('; batch')[0]}; r={shape.r} all-linear; {shape.dtype}; compiler {compiler}"
             f"{' with CUDA graphs' if cudagraphs else ''}, dynamic=False; "
             f"StaticCache (max_cache_len {shape.seq + 1}); "
             f"logits_to_keep=1. Medians of {shape.reps} interleaved reps after {shape.warmup} warm-up; "
             "ms per call (x the base's ms in the same cell).", "",
             "| cell | " + " | ".join(f"{n} ms" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for cell in cells:
        base_ms = statistics.median(times[(cell.label, names[0])]) * 1e3
        row = [f"{base_ms:.3f}"]
        for name in names[1:]:
            ms = statistics.median(times[(cell.label, name)]) * 1e3
            row.append(f"{ms:.3f} ({ms / base_ms:.3f}x)")
        lines.append(f"| {cell.label} | " + " | ".join(row) + " |")
    lines += ["", "| variant | graphs | graph breaks | recompiles after warm-up | max abs Δ logits vs PEFT |",
              "|---|---:|---:|---:|---:|"]
    diffs = result["diffs"]
    for v in variants:
        diff = "0 (ref)" if v.name == "PEFT" else f"{diffs[v.name]:.3g}"
        lines.append(f"| {v.name} | {v.graphs_after_warmup} | {v.breaks} | {v.counter.graphs - v.graphs_after_warmup} "
                     f"| {diff} |")
    lines += ["", f"(Δ logits: the last decode cell, after timing; PEFT's logits reach {diffs['scale']:.3g}; "
              "the base's Δ is the adapter's effect.)"]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    add_llama_arguments(p)
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="decode batch sizes (comma-separated)")
    p.add_argument("--cudagraphs", action="store_true", help="Inductor's CUDA graphs for every variant (CUDA only)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    shape, compiler = llama_setup(args)
    batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    variants, cells, result = run(shape, compiler, batches, args.cudagraphs)
    table = report(variants, cells, result, shape, compiler, "python -m bench.decode " + " ".join(argv),
                   args.cudagraphs)
    return publish(table, args.out)


if __name__ == "__main__":
    main()
