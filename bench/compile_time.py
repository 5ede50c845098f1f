"""Compile time of a training step, cold and warm, lora_fx against the plain model.

Each measurement is a fresh process that builds a small Llama (hidden 256, 2 layers) and times its
first forward + backward under `torch.compile` (Inductor), compiles included, imports and model
construction excluded. *Cold*: a new, empty Inductor cache directory. *Warm*: a second process on
the cache directory the cold one filled (the FX graph cache and the AOTAutograd cache should then
serve every graph). Variants: the plain model (full fine-tuning), lora_fx LoRA and DoRA (r=16,
all-linear). Rounds are interleaved; the table gives medians and ratios to the plain model, and the
number of C++ kernels the cold process compiled (shared objects in the cache directory: Inductor's
CPU cold compile is mostly gcc over those, deduplicated by source).

    python -m bench --compile-time 3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("plain", "lora", "dora")


def child(variant: str, hidden: int, layers: int) -> float:
    """In this (fresh) process: the seconds of the first compiled forward + backward."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), vocab_size=2048, use_cache=False)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 2048, (2, 64))
    start = time.perf_counter()
    if variant == "plain":
        fast = torch.compile(model, fullgraph=True)
    else:
        lora = lora_fx.backend(lora_fx.LoraConfig(r=16, target_modules="all-linear", use_dora=variant == "dora"))
        lora.attach(model)
        fast = torch.compile(model, backend=lora, fullgraph=True)
    fast(ids, labels=ids).loss.backward()
    return time.perf_counter() - start


def _run_child(variant: str, cache_dir: str, hidden: int, layers: int) -> tuple[float, dict]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    code = ("import json, sys; from bench.compile_time import child; from torch._dynamo.utils import counters; "
            f"s = child({variant!r}, {hidden}, {layers}); "
            "print(json.dumps({'s': s, 'aot': dict(counters['aot_autograd']), 'fx': {k: v for k, v in "
            "counters['inductor'].items() if 'cache' in k}}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["s"], {**result["aot"], **result["fx"]}


def compile_time(rounds: int, hidden: int = 256, layers: int = 2, variants=VARIANTS) -> str:
    cold: dict[str, list[float]] = {v: [] for v in variants}
    warm: dict[str, list[float]] = {v: [] for v in variants}
    caches: dict[str, dict] = {}
    kernels: dict[str, int] = {}
    for _ in range(rounds):
        for v in variants:
            with tempfile.TemporaryDirectory(prefix="lora_fx-bench-cache-") as cache_dir:
                s, _ = _run_child(v, cache_dir, hidden, layers)
                cold[v].append(s)
                kernels[v] = sum(name.endswith(".so") for _, _, names in os.walk(cache_dir) for name in names)
                s, counters = _run_child(v, cache_dir, hidden, layers)
                warm[v].append(s)
                caches[v] = counters
    lines = [f"Compile time of the first training step (fwd+bwd, Inductor), fresh processes, Llama hidden {hidden}, "
             f"{layers} layers, r=16 all-linear; {rounds} interleaved rounds, medians",
             "| variant | cold s | cold / plain | C++ kernels compiled cold | warm s | warm / plain | "
             "warm-process cache counters |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for v in variants:
        c, w = statistics.median(cold[v]), statistics.median(warm[v])
        cp, wp = statistics.median(cold["plain"]), statistics.median(warm["plain"])
        counters = ", ".join(f"{k} {n}" for k, n in sorted(caches[v].items()) if k not in ("total", "ok"))
        lines.append(f"| {v} | {c:.1f} | {c / cp:.2f} | {kernels[v]} | {w:.1f} | {w / wp:.2f} | {counters} |")
    lines.append("")
    lines.append("Per round (cold / warm s): " + "; ".join(
        f"{v} " + ", ".join(f"{c:.1f}/{w:.1f}" for c, w in zip(cold[v], warm[v], strict=True)) for v in variants))
    table = "\n".join(lines)
    print(table)
    return table
