"""The lora_fx benchmark: base vs PEFT vs lora_fx, eager and compiled, side by side in one process.

    python -m bench                 # the CPU table (hidden 512, 4 layers, batch 4 x 128, r=16)
    python -m bench --preset gpu    # a 1B-shaped Llama in bf16 on CUDA
    python -m bench --smoke         # tiny shapes, aot_eager; what the test suite runs
    python -m bench --decode        # decode-step (KV cache) and prefill rows (bench/decode.py)

Every row gets its own copy of one randomly initialised Llama (built from a config, no hub).
Timed calls are interleaved across rows (rep 1 of every row, then rep 2, ...) so that drifts in
machine speed hit every row alike; each cell is the median after warm-up. Ratios compare rows of
the same mode (eager with eager base, compiled with compiled base) and are printed beside the
FLOP floors that bound them:
- forward floor: (base FLOPs + adapter FLOPs) / base FLOPs, adapters at 2·r·(in+out) per token;
- training-step floor: (frozen-base FLOPs + 3 × adapter forward FLOPs) / frozen-base FLOPs, where
  the frozen base is the model's forward + backward to its input with every weight frozen (the
  adapters' backward costs twice their forward: grads of both factors and of their input).
Base FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the eager model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

PRESETS = {
    # name: model shape, tokens, rank, timing reps, device, dtype
    "cpu": dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=2048, batch=4, seq=128,
                r=16, reps=15, warmup=2, device="cpu", dtype="float32"),
    "gpu": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, batch=4, seq=512,
                r=16, reps=30, warmup=3, device="cuda", dtype="bfloat16"),
    "smoke": dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128, batch=2, seq=16,
                  r=4, reps=3, warmup=1, device="cpu", dtype="float32"),
}
# transform() wall time is measured on 7B-shaped Llamas on the meta device (no weights in memory).
SCALING_SHAPE = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
SCALING_LAYERS = {"full": (8, 16, 32), "smoke": (1, 2)}


@dataclasses.dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    r: int
    reps: int
    warmup: int
    device: str
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return (f"Llama hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
                f"{self.heads} heads ({self.kv_heads} kv), vocab {self.vocab}; batch {self.batch} x seq {self.seq}; "
                f"r={self.r} all-linear; {self.dtype}")


def llama(shape: Shape, layers: int | None = None, device: str | torch.device | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab, use_cache=False,
                      max_position_embeddings=max(2048, shape.seq))
    with torch.device(device or shape.device):
        return LlamaForCausalLM(cfg).to(shape.torch_dtype)


# -- measuring ---------------------------------------------------------------------------------

class CountingBackend:
    """Wraps a Dynamo backend and counts the graphs it is asked to compile."""

    def __init__(self, inner: str | Callable):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(inner) if isinstance(inner, str) else inner
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def lift_recompile_limits(at_least: int) -> None:
    """Raise Dynamo's recompile limits (each name this torch has) to at least `at_least`: a table's
    rows compile the same code objects, each for its own model, shape or lambda, and a row over the
    limit would silently run uncompiled."""
    config = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, knob):
            setattr(config, knob, max(getattr(config, knob), at_least))


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def lm_training_row(name: str, model, call, trainable, ids, *, switch_modes: bool = False) -> Row:
    """A compiled-mode row of a causal LM: forward under no_grad; step = loss on the logits,
    backward, SGD over `trainable` (or, for a frozen base, just clearing the grads backward
    made). `switch_modes`: the forward runs in eval mode and the step in train mode."""
    opt = torch.optim.SGD(trainable, lr=1e-4) if trainable else None

    def forward():
        if switch_modes:
            model.eval()
        with torch.no_grad():
            return call(ids)

    def step():
        if switch_modes:
            model.train()
        loss = call(ids).logits.float().pow(2).mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
    return Row(name, "compiled", forward, step)


def measure_interleaved(rows: list[Row], warmup: int, reps: int, device: str) -> None:
    """Warm every row up (counting its graph breaks and compiled graphs), then time forward and
    step of all rows in turn, `reps` times: each row's medians come from the same stretch of time."""
    for row in rows:
        before = graph_breaks()
        for _ in range(1 + warmup):
            row.forward()
            row.step()
        synchronize(device)
        row.breaks = graph_breaks() - before
        counter = row.counter
        row.graphs = getattr(counter, "graphs", getattr(counter, "graphs_compiled", None)) if counter else None
    for _ in range(reps):
        for row in rows:
            row.fwd_times.append(timed(row.forward, device))
            row.step_times.append(timed(row.step, device))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def publish(table: str, out: str | None) -> str:
    """Print a bench table and, with `out`, also write it to that file; return it."""
    print(table)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(table)
    return table


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak extra memory one call allocates through PyTorch's allocator.

    CUDA: `max_memory_allocated` over the pre-call allocation. CPU: the running sum of the
    profiler's allocator events (`profile_memory=True`), i.e. the CPU caching-free allocator's
    view, independent of how glibc keeps freed pages (an RSS delta is ~0 after warm-up).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


# -- the rows ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    name: str
    mode: str                       # "eager" | "compiled": ratios compare within a mode
    forward: Callable[[], object]
    step: Callable[[], object] | None  # None: an inference-only row
    counter: CountingBackend | None = None
    fwd_times: list[float] = dataclasses.field(default_factory=list)
    step_times: list[float] = dataclasses.field(default_factory=list)
    first_call_s: float = 0.0
    graphs: int | None = None
    breaks: int | None = None
    recompiles: int | None = None
    fwd_peak: int = 0
    step_peak: int = 0

    def calls(self) -> list[Callable[[], object]]:
        return [self.forward] + ([self.step] if self.step is not None else [])


def make_rows(base_model, shape: Shape, compiler: str, which: set[str], ablations: bool = False,
              dora: bool = False) -> list[Row]:
    import peft

    import lora_fx

    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(shape.device)
    rows: list[Row] = []

    def forward_of(model, fn):
        def forward():
            model.eval()
            with torch.no_grad():
                return fn(ids).logits
        return forward

    def step_of(model, fn, opt):
        def step():
            model.train()
            loss = fn(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def frozen_step_of(model, fn):
        embed = model.get_input_embeddings()

        def step():
            model.train()
            x = embed(ids).detach().requires_grad_()
            fn(inputs_embeds=x, labels=ids).loss.backward()
        return step

    if "base" in which:
        for mode in ("eager", "compiled"):
            model = copy.deepcopy(base_model).requires_grad_(False)
            counter = CountingBackend(compiler) if mode == "compiled" else None
            fn = torch.compile(model, backend=counter) if counter else model
            rows.append(Row(f"base ({'compiled' if counter else 'eager'}); step = frozen-base fwd+bwd to input",
                            mode, forward_of(model, fn), frozen_step_of(model, fn), counter))

    peft_cfg = dict(r=shape.r, lora_alpha=2 * shape.r, target_modules="all-linear", lora_dropout=0.0)

    def peft_row(label, cfg, mode):
        model = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(**cfg))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        counter = CountingBackend(compiler) if mode == "compiled" else None
        fn = torch.compile(model, backend=counter) if counter else model
        return Row(f"{label} ({mode})", mode, forward_of(model, fn), step_of(model, fn, opt), counter)

    def lora_fx_row(label, cfg, inner=compiler, merged=False, **backend_kwargs):
        model = copy.deepcopy(base_model)
        counter = CountingBackend(inner)
        lora = lora_fx.backend(lora_fx.LoraConfig(**cfg), inner=counter, **backend_kwargs)
        opt = torch.optim.AdamW(lora.parameters(model), lr=1e-4)
        if merged:  # the adapters folded into the weights: inference only, nothing left to train
            lora_fx.merge(lora)
        fn = torch.compile(model, backend=lora, fullgraph=True)
        mode = "eager" if inner == "eager" else "compiled"
        step = None if merged else step_of(model, fn, opt)
        return Row(label, mode, forward_of(model, fn), step, counter)

    if "peft" in which:
        rows += [peft_row("PEFT", peft_cfg, mode) for mode in ("eager", "compiled")]
    if "lora_fx" in which:
        rows.append(lora_fx_row("lora_fx backend (inner=eager: FX graph run op by op)", peft_cfg, inner="eager"))
        rows.append(lora_fx_row(f"lora_fx backend (inner={compiler})", peft_cfg))
        rows.append(lora_fx_row(f"lora_fx merged (inner={compiler})", peft_cfg, merged=True))
        if dora:  # DoRA beside LoRA, same shapes: PEFT eager / compiled, lora_fx compiled
            dora_cfg = dict(peft_cfg, use_dora=True)
            rows += [peft_row("PEFT DoRA", dora_cfg, mode) for mode in ("eager", "compiled")]
            rows.append(lora_fx_row(f"lora_fx DoRA backend (inner={compiler})", dora_cfg))
        if ablations:  # lora_fx's own levers switched off, in the same run
            rows.append(lora_fx_row(f"lora_fx backend (inner={compiler}, inference_form=False)", peft_cfg,
                                    inference_form=False))
    return rows


def flop_floors(base_model, shape: Shape) -> Floors:
    """FLOP floors for r=shape.r all-linear LoRA (and DoRA)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(base_model).requires_grad_(False)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=shape.device)
    with FlopCounterMode(display=False) as fwd_counter, torch.no_grad():
        model(ids)
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    with FlopCounterMode(display=False) as step_counter:
        model(inputs_embeds=x, labels=ids).loss.backward()
    tokens = shape.batch * shape.seq
    adapter = norm = 0
    lm_head = base_model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not lm_head:
            adapter += 2 * tokens * shape.r * (module.in_features + module.out_features)
            norm += 2 * shape.r * module.in_features * module.out_features  # DoRA: W·Aᵀ once per call
    fwd, step = fwd_counter.get_total_flops(), step_counter.get_total_flops()
    return Floors((fwd + adapter) / fwd, (step + 3 * adapter) / step, adapter / 1e9,
                  (fwd + adapter + norm) / fwd, (step + 3 * adapter + norm) / step)


@dataclasses.dataclass
class Floors:
    forward: float
    step: float
    adapter_gflops: float
    dora_forward: float   # + the factored norm's W·Aᵀ (no backward: the norm is detached)
    dora_step: float


def measure(rows: list[Row], shape: Shape) -> None:
    dev = shape.device
    for row in rows:
        breaks_before = graph_breaks()
        start = time.perf_counter()
        for call in row.calls():
            call()
        synchronize(dev)
        row.first_call_s = time.perf_counter() - start
        for _ in range(shape.warmup):
            for call in row.calls():
                call()
        if row.counter is not None:
            row.graphs = row.counter.graphs
            row.breaks = graph_breaks() - breaks_before
    for _ in range(shape.reps):
        for row in rows:  # interleaved: every row sees the same machine
            row.fwd_times.append(timed(row.forward, dev))
            if row.step is not None:
                row.step_times.append(timed(row.step, dev))
    for row in rows:
        if row.counter is not None:
            row.recompiles = row.counter.graphs - row.graphs  # graphs compiled after warm-up
        row.fwd_peak = peak_bytes(row.forward, dev)
        row.step_peak = peak_bytes(row.step, dev) if row.step is not None else 0


# -- transform() scaling -----------------------------------------------------------------------

def transform_scaling(layer_counts, r: int) -> list[tuple[int, float, float, int]]:
    """(layers, export s, transform s, sites) for 7B-shaped Llamas on the meta device."""
    import lora_fx

    shape = Shape(**SCALING_SHAPE, layers=1, batch=1, seq=16, r=r, reps=1, warmup=0, device="meta", dtype="float32")
    out = []
    for n in layer_counts:
        model = llama(shape, layers=n, device="meta").eval()
        ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
        start = time.perf_counter()
        ep = torch.export.export(model, (ids,))
        exported = time.perf_counter()
        ep2 = lora_fx.transform(ep, lora_fx.LoraConfig(r=r, target_modules="all-linear"))
        done = time.perf_counter()
        sites = sum(1 for k in ep2.state_dict if k.endswith("lora_A.weight"))
        out.append((n, exported - start, done - exported, sites))
    return out


def scaling_only(layer_counts, r: int, rounds: int) -> str:
    """The transform() scaling table alone, each size measured `rounds` times (interleaved; medians)."""
    runs = transform_scaling(list(layer_counts) * rounds, r)
    lines = [f"transform() on 7B-shaped Llamas (meta device), r={r} all-linear, {rounds} interleaved rounds, "
             f"medians; torch {torch.__version__}",
             "| layers | sites | lora_fx.transform s | ms / site |", "|---:|---:|---:|---:|"]
    for n in layer_counts:
        times = [t for layers, _, t, _ in runs if layers == n]
        sites = next(s for layers, _, _, s in runs if layers == n)
        t = statistics.median(times)
        lines.append(f"| {n} | {sites} | {t:.3f} | {t / sites * 1e3:.2f} |")
    table = "\n".join(lines)
    print(table)
    return table


# -- report ------------------------------------------------------------------------------------

def _ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def environment(shape: Shape) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import peft
    import transformers

    if shape.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return (f"device: {device}; torch {torch.__version__}, triton {triton_version}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}; python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}")


def report(rows: list[Row], shape: Shape, floors: Floors, scaling, command: str) -> str:
    adapter_gflops = floors.adapter_gflops
    base = {r.mode: r for r in rows if r.name.startswith("base")}
    lines = [f"`{command}`", "", environment(shape), "", shape.describe(), "",
             f"FLOP floors: forward {floors.forward:.3f}x base; training step {floors.step:.3f}x the frozen-base "
             f"step (adapters: {adapter_gflops:.3g} GFLOP per forward; DoRA rows: {floors.dora_forward:.3f}x / "
             f"{floors.dora_step:.3f}x with the norm's W·Aᵀ). Medians of {shape.reps} interleaved "
             f"reps after {shape.warmup} warm-up. Peak memory: "
             + ("CUDA max_memory_allocated over the pre-call allocation." if shape.device.startswith("cuda")
                else "CPU allocator events (torch.profiler profile_memory), peak over the call's start."),
             "",
             "| row | fwd ms | fwd / base (floor) | step ms | step / frozen base (floor) | fwd peak MB "
             "| step peak MB | graphs | graph breaks | recompiles | first fwd+step s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ref = base.get(row.mode)
        merged = row.step is None
        is_dora = "DoRA" in row.name
        fwd_floor = floors.dora_forward if is_dora else floors.forward
        step_floor = floors.dora_step if is_dora else floors.step
        fwd = _ms(row.fwd_times)
        step = f"{_ms(row.step_times):.2f}" if not merged else "-"
        if ref is not None and ref is not row:
            # a merged model's floor is the base itself
            fwd_ratio = f"{fwd / _ms(ref.fwd_times):.3f} ({1.0 if merged else fwd_floor:.3f})"
            step_ratio = f"{_ms(row.step_times) / _ms(ref.step_times):.3f} ({step_floor:.3f})" if not merged else "-"
        else:
            fwd_ratio = step_ratio = "1 (ref)" if ref is row else "-"
        opt = [str(v) if v is not None else "-" for v in (row.graphs, row.breaks, row.recompiles)]
        step_peak = _mb(row.step_peak) if not merged else "-"
        lines.append(f"| {row.name} | {fwd:.2f} | {fwd_ratio} | {step} | {step_ratio} | {_mb(row.fwd_peak)} "
                     f"| {step_peak} | {' | '.join(opt)} | {row.first_call_s:.1f} |")
    if scaling:
        lines += ["", "`transform()` on a 7B-shaped Llama (hidden 4096, intermediate 11008, vocab 32000) exported "
                  "on the meta device, r=16 all-linear:", "",
                  "| layers | sites | torch.export s | lora_fx.transform s | transform ms / layer |",
                  "|---:|---:|---:|---:|---:|"]
        for n, export_s, transform_s, sites in scaling:
            lines.append(f"| {n} | {sites} | {export_s:.2f} | {transform_s:.3f} | {transform_s / n * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def add_llama_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the tables that run the preset's Llama (bench/decode.py, bench/many_adapters.py);
    `llama_setup` reads them."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the harness's shape presets: cpu (default), gpu (default when CUDA is available), smoke")
    p.add_argument("--smoke", action="store_true", help="the smoke preset (tiny, aot_eager; the test suite)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (compile time)")
    p.add_argument("--compiler", default=None, help="Dynamo backend (default inductor; aot_eager with --smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="also write the table to this file")


def llama_setup(args) -> tuple[Shape, str]:
    """(shape, compiler) from `add_llama_arguments`' options; sets the thread count."""
    preset = "smoke" if args.smoke else args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    shape = Shape(**PRESETS[preset])
    if args.reps:
        shape.reps = args.reps
    if args.layers:
        shape.layers = args.layers
    if args.threads:
        torch.set_num_threads(args.threads)
    return shape, args.compiler or ("aot_eager" if args.smoke else "inductor")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="shape preset (default: cpu, or gpu "
                   "when CUDA is available)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, aot_eager, few reps (the test suite)")
    p.add_argument("--compiler", default=None, help="Dynamo backend of the compiled rows (default inductor; "
                   "aot_eager with --smoke)")
    p.add_argument("--rows", default="base,peft,lora_fx", help="comma-separated subset of base,peft,lora_fx")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--ablations", action="store_true", help="add lora_fx rows with its optimisations off")
    p.add_argument("--dora", action="store_true", help="add DoRA rows (PEFT eager/compiled, lora_fx compiled)")
    p.add_argument("--no-scaling", action="store_true", help="skip the transform() scaling table")
    p.add_argument("--scaling-only", type=int, default=0, metavar="ROUNDS",
                   help="only the transform() scaling table: ROUNDS interleaved rounds, medians")
    p.add_argument("--compile-time", type=int, default=0, metavar="ROUNDS",
                   help="only the cold / warm compile-time table (fresh processes): ROUNDS interleaved rounds")
    p.add_argument("--block-diag", action="store_true", help="only BdLoRA's table: its block-diagonal product "
                   "expanded, as an einsum, or as lora_fx::block_diag_matmul, in one adapted linear "
                   "(bench/block_diag.py, which takes more options)")
    p.add_argument("--decode", action="store_true", help="only the generation table: one decode step (1 new token x "
                   "batch 1/8/32, StaticCache of the preset's seq) and a prefill, base vs PEFT vs lora_fx unmerged / "
                   "merged, all compiled (bench/decode.py, which takes more options)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    preset = "smoke" if args.smoke else args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    shape = Shape(**PRESETS[preset])
    if args.reps:
        shape.reps = args.reps
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_time:
        from .compile_time import compile_time

        return compile_time(args.compile_time, **({"hidden": 64, "layers": 1, "variants": ("plain", "lora")}
                                                  if args.smoke else {}))
    if args.block_diag:
        from .block_diag import main as block_diag_main

        return block_diag_main(["--smoke"] * args.smoke + (["--preset", args.preset] if args.preset else [])
                               + (["--reps", str(args.reps)] if args.reps else [])
                               + (["--compiler", args.compiler] if args.compiler else [])
                               + (["--threads", str(args.threads)] if args.threads else [])
                               + (["--out", args.out] if args.out else []))
    if args.decode:
        from .decode import main as decode_main

        return decode_main(["--smoke"] * args.smoke + (["--preset", args.preset] if args.preset else [])
                           + (["--reps", str(args.reps)] if args.reps else [])
                           + (["--compiler", args.compiler] if args.compiler else [])
                           + (["--threads", str(args.threads)] if args.threads else [])
                           + (["--out", args.out] if args.out else []))
    if args.scaling_only:
        return scaling_only(SCALING_LAYERS["smoke" if args.smoke else "full"], shape.r, args.scaling_only)
    compiler = args.compiler or ("aot_eager" if args.smoke else "inductor")
    which = {w.strip() for w in args.rows.split(",") if w.strip()}
    unknown = which - {"base", "peft", "lora_fx"}
    if unknown or "base" not in which:
        raise SystemExit(f"--rows must include base and only name base, peft, lora_fx (got {args.rows!r})")

    # Every row compiles the same transformers code objects for its own model copy: lift Dynamo's
    # per-code-object recompile limit so late rows are not silently left uncompiled.
    lift_recompile_limits(256)
    torch.manual_seed(0)
    base_model = llama(shape)
    rows = make_rows(base_model, shape, compiler, which, args.ablations, args.dora)
    floors = flop_floors(base_model, shape)
    measure(rows, shape)
    scaling = [] if args.no_scaling else transform_scaling(SCALING_LAYERS["smoke" if args.smoke else "full"], shape.r)
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    table = report(rows, shape, floors, scaling, command.strip())
    return publish(table, args.out)

