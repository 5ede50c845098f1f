"""Many adapters in one compiled model: one adapter for every row vs a mixed batch (a name per row).

    python -m bench --many-adapters [--smoke | --preset cpu|gpu] [--reps N] [--compiler C] [--threads N] [--out FILE]
    python -m bench.many_adapters [same options] [--batches 8,32] [--layers N]

The Llama of the harness's preset (`bench/harness.py`, `PRESETS`) with four PEFT LoRA adapters
(random nonzero A and B, `lora_alpha = 2 r`, saved to a temporary directory), heterogeneous as real
ones are (`adapter_configs`): a: r all-linear; b: r/2 all-linear; c: 2r all-linear; d: r on q_proj, v_proj
only (r = the preset's r, 16 for `cpu`). Variants, each compiled (`dynamic=False`) by `--compiler`
(Inductor; aot_eager with `--smoke`), forward only, eval mode, no grad:
- base: the plain model, `torch.compile`;
- lora_fx single / lora_fx mixed: ONE model through `lora_fx.backend({"a": .., "b": .., "c": .., "d": ..})`
  (`fullgraph=True`), timed with `set_adapter("a")` (every row on a) and with
  `set_adapter(["a", "b", "c", "d", "a", ...])` (the four names cycled over the batch's rows);
- lora_fx "a" alone: a backend that loads only adapter a (the single-adapter graph);
- PEFT single: `PeftModel.from_pretrained(.., adapter_name="a")` + `load_adapter` of b, c, d,
  `set_adapter("a")`, `torch.compile` (its default, no fullgraph);
- PEFT mixed: another such PeftModel called with `adapter_names=` (the same assignment as lora_fx
  mixed), compiled if that runs, else eager (the table says which; "compiled, in part": Dynamo ran
  some frames eagerly, e.g. PEFT's forward, which registers hooks, and compiled the frames it calls).
`set_adapter` is called before each timed lora_fx call, outside the timed region (its own cost is
given below the table). Cells: the preset's prefill shape (batch x seq tokens) and decode-shaped
calls of 1 token for each batch in `--batches` (8, 32), WITHOUT a KV cache (a 1-token forward, no
past: the GEMM shapes of a decode step, not its attention over a cache). Every call returns the full
logits. Medians of interleaved reps (every variant of a cell back to back) after warm-up, ms per call
and x the base's median in the same cell; `mixed / single` is the ratio of the two medians.

Per variant: the graphs its warm-up calls compiled, their graph breaks, the frames Dynamo gave up
on and ran eagerly (`counters["frames"]` total - ok; the reasons are printed), and the graphs
compiled after warm-up (during the switching rounds and the timed reps: should be 0).
Checks: max |Δ logits| of each lora_fx variant against eager PEFT with the same selection (single:
adapter a; mixed: the cycled names; and a second mixed list with base rows, `ALT_ROWS`), worst over
the cells; and recompiles: after warm-up, two rounds over every cell of `set_adapter("a")`,
`set_adapter("b")`, the mixed list and the second mixed list must add 0 to `lora.graphs_compiled`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
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
    timed,
)

BATCHES = (8, 32)
NAMES = ("a", "b", "c", "d")
ALT_ROWS = ("d", None, "b", "c", "a", None)  # the second mixed list (cycled): other order, base rows


def adapter_configs(r: int) -> dict[str, dict]:
    """PEFT LoraConfig kwargs of the four adapters: three ranks, two target sets."""
    ranks = {"a": r, "b": max(1, r // 2), "c": 2 * r, "d": r}
    targets = {"a": "all-linear", "b": "all-linear", "c": "all-linear", "d": ["q_proj", "v_proj"]}
    return {n: dict(r=ranks[n], lora_alpha=2 * ranks[n], target_modules=targets[n], lora_dropout=0.0,
                    init_lora_weights=False) for n in NAMES}


def save_adapters(base_model, r: int, root: str) -> dict[str, str]:
    """Save the four adapters (random nonzero A, B at a trained adapter's scale) under `root`."""
    import peft

    dirs = {}
    for seed, (name, cfg) in enumerate(adapter_configs(r).items()):
        torch.manual_seed(100 + seed)
        model = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(**cfg))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn_like(p) * 0.02)
        dirs[name] = os.path.join(root, name)
        model.save_pretrained(dirs[name])
    return dirs


def rows_for(batch: int, pattern=NAMES) -> list[str | None]:
    return list(itertools.islice(itertools.cycle(pattern), batch))


class Cell:
    def __init__(self, label: str, batch: int, tokens: int, shape: Shape):
        self.label, self.batch = label, batch
        gen = torch.Generator().manual_seed(1000 + batch + tokens)
        self.ids = torch.randint(0, shape.vocab, (batch, tokens), generator=gen).to(shape.device)
        self.mixed = rows_for(batch)
        self.alt = rows_for(batch, ALT_ROWS)


class Variant:
    """`prepare(cell)` runs before each call, outside the timed region; `call(cell)` is timed."""

    def __init__(self, name: str, call: Callable[[Cell], torch.Tensor],
                 prepare: Callable[[Cell], None] = lambda cell: None, counter: CountingBackend | None = None):
        self.name, self.call, self.prepare, self.counter = name, call, prepare, counter
        self.graphs: int | None = None        # graphs its own warm-up compiled
        self.graphs_after_warmup: int | None = None  # its counter after every variant's warm-up
        self.breaks = 0
        self.eager_frames = 0                 # frames Dynamo gave up on (run eagerly, nested frames traced anew)
        self.reasons: set[str] = set()        # ... and why (Dynamo's "unimplemented" messages, first line)
        self.note = ""                        # PEFT mixed: why it ran eager
        self.eager: Callable[[Cell], torch.Tensor] | None = None


def _peft_with_all(base_model, dirs: dict[str, str]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), dirs["a"], adapter_name="a").eval()
    for name in NAMES[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    model.set_adapter("a")
    return model


def _logits(out) -> torch.Tensor:
    return out.logits


def make_variants(base_model, shape: Shape, compiler: str, dirs: dict[str, str]) -> dict:
    import lora_fx

    def no_grad(fn):
        def call(cell):
            with torch.no_grad():
                return _logits(fn(cell))
        return call

    out: dict = {}
    model = copy.deepcopy(base_model).eval().requires_grad_(False)
    counter = CountingBackend(compiler)
    fast = torch.compile(model, backend=counter, dynamic=False)
    out["base"] = Variant("base", no_grad(lambda c: fast(c.ids)), counter=counter)

    model = copy.deepcopy(base_model).eval()
    counter = CountingBackend(compiler)
    lora = lora_fx.backend(dict(dirs), inner=counter).attach(model)
    fast_many = torch.compile(model, backend=lora, fullgraph=True, dynamic=False)
    out["lora_fx single"] = Variant("lora_fx single", no_grad(lambda c: fast_many(c.ids)),
                                    lambda c: lora.set_adapter("a"), counter)
    out["lora_fx mixed"] = Variant("lora_fx mixed", no_grad(lambda c: fast_many(c.ids)),
                                   lambda c: lora.set_adapter(c.mixed), counter)
    out["lora"] = lora

    model = copy.deepcopy(base_model).eval()
    counter = CountingBackend(compiler)
    lora_alone = lora_fx.backend({"a": dirs["a"]}, inner=counter).attach(model)
    fast_alone = torch.compile(model, backend=lora_alone, fullgraph=True, dynamic=False)
    out["lora_fx a alone"] = Variant("lora_fx a alone", no_grad(lambda c: fast_alone(c.ids)), counter=counter)

    peft_single = _peft_with_all(base_model, dirs)
    counter = CountingBackend(compiler)
    fast_peft = torch.compile(peft_single, backend=counter, dynamic=False)
    out["PEFT single"] = Variant("PEFT single", no_grad(lambda c: fast_peft(c.ids)), counter=counter)

    peft_mixed = _peft_with_all(base_model, dirs)
    counter = CountingBackend(compiler)
    fast_peft_mixed = torch.compile(peft_mixed, backend=counter, dynamic=False)
    mixed = Variant("PEFT mixed", no_grad(lambda c: fast_peft_mixed(c.ids, adapter_names=_peft_rows(c.mixed))),
                    counter=counter)
    mixed.eager = no_grad(lambda c: peft_mixed(c.ids, adapter_names=_peft_rows(c.mixed)))
    out["PEFT mixed"] = mixed
    out["peft"] = peft_mixed  # eager reference
    return out


def _peft_rows(rows) -> list[str]:
    return [n or "__base__" for n in rows]


ORDER = ("base", "lora_fx single", "lora_fx mixed", "lora_fx a alone", "PEFT single", "PEFT mixed")


def warm_up(variants: list[Variant], cells: list[Cell], warmup: int, device: str) -> None:
    """Every variant on every cell, `1 + warmup` calls; then one more call of every variant on
    every cell: Dynamo's caches for the transformers code objects are shared by all the models,
    and PEFT's compiled single-adapter model compiles again once after PEFT's mixed call has run
    (measured: +1 graph per shape). Graphs and graph breaks are counted per variant's own calls."""

    from torch._dynamo.utils import counters

    def failed_frames() -> int:
        return counters["frames"]["total"] - counters["frames"]["ok"]

    def call(variant: Variant, cell: Cell) -> None:
        breaks, graphs = graph_breaks(), variant.counter.graphs if variant.counter else 0
        failed, reasons = failed_frames(), dict(counters["unimplemented"])
        variant.prepare(cell)
        try:
            variant.call(cell)
        except Exception as exc:  # PEFT's mixed path under torch.compile: fall back to eager
            if variant.eager is None or variant.note:
                raise
            variant.note = f"eager: compiled call raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            variant.call, variant.counter, variant.graphs = variant.eager, None, None
            variant.call(cell)
        variant.breaks += graph_breaks() - breaks
        variant.eager_frames += failed_frames() - failed
        variant.reasons |= {k.splitlines()[0] for k, n in counters["unimplemented"].items() if n > reasons.get(k, 0)}
        if variant.counter is not None:
            variant.graphs = (variant.graphs or 0) + variant.counter.graphs - graphs

    for variant in variants:
        for cell in cells:
            for _ in range(1 + warmup):
                call(variant, cell)
    for cell in cells:
        for variant in variants:
            call(variant, cell)
    synchronize(device)
    for variant in variants:  # lora_fx single and mixed share one backend (and counter)
        variant.graphs_after_warmup = variant.counter.graphs if variant.counter else None


def switching_rounds(lora, fast_call: Callable[[Cell], torch.Tensor], cells: list[Cell], rounds: int = 2) -> list[int]:
    """`lora.graphs_compiled` after each round of switching "a", "b", the mixed list, the second mixed list."""
    counts = []
    for _ in range(rounds):
        for cell in cells:
            for selection in ("a", "b", cell.mixed, cell.alt):
                lora.set_adapter(selection)
                fast_call(cell)
        counts.append(lora.graphs_compiled)
    return counts


def run(shape: Shape, compiler: str, batches=BATCHES) -> dict:
    lift_recompile_limits(256)  # every variant compiles the same transformers code objects, per shape
    torch.manual_seed(0)
    base_model = llama(shape).eval()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_adapters(base_model, shape.r, tmp)
        built = make_variants(base_model, shape, compiler, dirs)
    variants = [built[name] for name in ORDER]
    by_name = {v.name: v for v in variants}
    lora, peft_eager = built["lora"], built["peft"]
    cells = [Cell(f"prefill, batch {shape.batch} x {shape.seq} tokens", shape.batch, shape.seq, shape)]
    cells += [Cell(f"decode-shaped, batch {b} x 1 token (no KV cache)", b, 1, shape) for b in batches]

    start = time.perf_counter()
    warm_up(variants, cells, shape.warmup, shape.device)
    warm_s = time.perf_counter() - start
    graphs_before_switching = lora.graphs_compiled
    switch_counts = switching_rounds(lora, by_name["lora_fx single"].call, cells)

    times = {(c.label, v.name): [] for c in cells for v in variants}
    for _ in range(shape.reps):
        for cell in cells:  # interleaved: every variant of a cell back to back, then the next cell
            for variant in variants:
                variant.prepare(cell)
                times[(cell.label, variant.name)].append(timed(lambda v=variant, c=cell: v.call(c), shape.device))
    graphs_after_timing = lora.graphs_compiled

    # set_adapter's own cost (outside the timed calls above): a per-row list of the largest batch
    big = max(cells, key=lambda c: c.batch)
    set_rows = statistics.median(timed(lambda: lora.set_adapter(big.mixed), "cpu") for _ in range(200))
    set_one = statistics.median(timed(lambda: lora.set_adapter("a"), "cpu") for _ in range(200))

    # correctness against eager PEFT (same selection), worst over the cells
    diffs = {"lora_fx single": 0.0, "lora_fx mixed": 0.0, "lora_fx mixed (2nd list)": 0.0, "lora_fx a alone": 0.0,
             "PEFT mixed (as timed)": 0.0, "base": 0.0}
    scale = 0.0
    fast_lora = by_name["lora_fx single"].call
    with torch.no_grad():
        for cell in cells:
            peft_eager.set_adapter("a")
            ref_single = _logits(peft_eager(cell.ids)).float()
            ref_mixed = _logits(peft_eager(cell.ids, adapter_names=_peft_rows(cell.mixed))).float()
            ref_alt = _logits(peft_eager(cell.ids, adapter_names=_peft_rows(cell.alt))).float()
            scale = max(scale, ref_mixed.abs().max().item())
            got = {}
            lora.set_adapter("a")
            got["lora_fx single"] = (fast_lora(cell).float(), ref_single)
            lora.set_adapter(cell.mixed)
            got["lora_fx mixed"] = (fast_lora(cell).float(), ref_mixed)
            lora.set_adapter(cell.alt)
            got["lora_fx mixed (2nd list)"] = (fast_lora(cell).float(), ref_alt)
            got["lora_fx a alone"] = (by_name["lora_fx a alone"].call(cell).float(), ref_single)
            got["PEFT mixed (as timed)"] = (by_name["PEFT mixed"].call(cell).float(), ref_mixed)
            got["base"] = (by_name["base"].call(cell).float(), ref_mixed)
            for name, (a, b) in got.items():
                diffs[name] = max(diffs[name], (a - b).abs().max().item())
    return dict(variants=variants, cells=cells, times=times, diffs=diffs, scale=scale, warm_s=warm_s,
                graphs_before_switching=graphs_before_switching, switch_counts=switch_counts,
                graphs_after_timing=graphs_after_timing, set_rows_us=set_rows * 1e6, set_one_us=set_one * 1e6,
                set_rows_batch=big.batch)


DIFF_LABELS = {
    "lora_fx single": 'lora_fx single vs PEFT set_adapter("a")',
    "lora_fx mixed": "lora_fx mixed vs PEFT adapter_names= (same rows)",
    "lora_fx mixed (2nd list)": "lora_fx 2nd mixed list (with base rows) vs PEFT adapter_names=",
    "lora_fx a alone": 'lora_fx "a" alone vs PEFT set_adapter("a")',
    "PEFT mixed (as timed)": "PEFT mixed as timed vs PEFT mixed eager",
    "base": "base vs PEFT mixed (the adapters' effect)",
}
GOAL = 1.15  # lora_fx mixed forward <= 1.15x lora_fx single forward (issue 11, CPU)


def report(result: dict, shape: Shape, compiler: str, command: str) -> str:
    times, variants, cells = result["times"], result["variants"], result["cells"]
    names = [v.name for v in variants]
    peft_mixed = next(v for v in variants if v.name == "PEFT mixed")
    peft_mode = "eager" if peft_mixed.note else "compiled, in part" if peft_mixed.eager_frames else "compiled"
    heads = [n if n != "PEFT mixed" else f"PEFT mixed ({peft_mode})" for n in names]
    cfgs = adapter_configs(shape.r)
    described = "; ".join(f"{n}: r={c['r']} " + (c["target_modules"] if isinstance(c["target_modules"], str)
                                                  else "+".join(c["target_modules"])) for n, c in cfgs.items())
    lines = [f"Command: `{command}`", "", environment(shape), "",
             f"{shape.describe().split('; batch')[0]}; {shape.dtype}; 4 adapters ({described}; lora_alpha = 2r); "
             f"compiler {compiler}, dynamic=False; forward only, eval, no grad, full logits. Medians of {shape.reps} "
             f"interleaved reps after {shape.warmup} warm-up; ms per call (x the base's ms in the same cell). "
             "Mixed rows: the names a, b, c, d cycled over the batch rows.", "",
             "| cell | " + " | ".join(f"{h} ms" for h in heads) + " | lora_fx mixed / single | PEFT mixed / single |",
             "|---|" + "---:|" * (len(names) + 2)]
    verdicts = []
    for cell in cells:
        med = {n: statistics.median(times[(cell.label, n)]) * 1e3 for n in names}
        base_ms = med["base"]
        row = [f"{base_ms:.3f}"] + [f"{med[n]:.3f} ({med[n] / base_ms:.3f}x)" for n in names[1:]]
        ours = med["lora_fx mixed"] / med["lora_fx single"]
        theirs = med["PEFT mixed"] / med["PEFT single"]
        verdicts.append((cell.label, ours))
        lines.append(f"| {cell.label} | " + " | ".join(row) + f" | {ours:.3f} | {theirs:.3f} |")
    met = all(r <= GOAL for _, r in verdicts)
    lines += ["", f"Goal (lora_fx mixed forward <= {GOAL}x lora_fx single): "
              + ("met" if met else "NOT met") + " (" + "; ".join(f"{label}: {r:.3f}x" for label, r in verdicts) + ")."]
    lines += ["", "| variant | graphs (its warm-up calls) | graph breaks (its warm-up calls) "
              "| frames Dynamo ran eagerly (its warm-up calls) | graphs compiled after warm-up |",
              "|---|---:|---:|---:|---:|"]
    for v in variants:
        graphs = "-" if v.graphs is None else str(v.graphs)
        later = "-" if v.counter is None else str(v.counter.graphs - v.graphs_after_warmup)
        name = v.name if v.name != "PEFT mixed" else f"PEFT mixed ({peft_mode})"
        lines.append(f"| {name} | {graphs} | {v.breaks} | {v.eager_frames} | {later} |")
    if peft_mixed.note:
        lines += ["", f"PEFT mixed ran {peft_mixed.note}"]
    for v in variants:
        if v.reasons:
            lines += ["", f"{v.name}: Dynamo fell back to eager for a frame: " + "; ".join(sorted(v.reasons)) + "."]
    counts = result["switch_counts"]
    lines += ["", f"Recompiles when switching (lora_fx, 4 adapters): lora.graphs_compiled = "
              f"{result['graphs_before_switching']} after warm-up; after each of 2 rounds of set_adapter(\"a\"), "
              f"(\"b\"), the mixed list and a second mixed list with base rows over every cell: "
              f"{', '.join(map(str, counts))} (+{counts[-1] - result['graphs_before_switching']}); after timing: "
              f"{result['graphs_after_timing']}.",
              f"set_adapter cost (not in the timed calls): a {result['set_rows_batch']}-name list "
              f"{result['set_rows_us']:.1f} us, one name {result['set_one_us']:.1f} us (medians of 200).",
              "", "| max abs Δ logits vs eager PEFT, same selection (worst cell) | value |", "|---|---:|"]
    for name, value in result["diffs"].items():
        lines.append(f"| {DIFF_LABELS[name]} | {value:.3g} |")
    lines += ["", f"(PEFT mixed logits reach {result['scale']:.3g}; warm-up of all variants took "
              f"{result['warm_s']:.0f} s.)"]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.many_adapters", description=__doc__.split("\n")[0])
    add_llama_arguments(p)
    p.add_argument("--batches", default=None,
                   help="decode-shaped batch sizes (comma-separated; default 8,32; \"\" for none)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    shape, compiler = llama_setup(args)
    batches = BATCHES if args.batches is None else tuple(int(b) for b in args.batches.split(",") if b.strip())
    result = run(shape, compiler, batches)
    table = report(result, shape, compiler, "python -m bench --many-adapters " + " ".join(argv))
    return publish(table, args.out)


if __name__ == "__main__":
    main()
