"""BdLoRA: its block-diagonal product expanded, as an einsum, or as `lora_fx::block_diag_matmul`, in one linear.

    python -m bench --block-diag [--smoke]
    python -m bench.block_diag [--preset cpu|gpu|smoke] [--tokens N] [--din D] [--dout D] [--r R]
                               [--nblocks NB] [--reps N] [--compiler inductor] [--threads N] [--out FILE]

Each row is `silu(linear(x))` (a Llama MLP's epilogue, for the compiler to fuse) adapted by a lora_fx
backend (attached, `fullgraph=True`): no adapter (base, plain `torch.compile`), plain LoRA, and
BdLoRA with a block-diagonal A (a row-parallel layer) or B (a column-parallel layer), its product in
each form of `lora_fx.variants.bdlora.FORMS` (`LOWERING` forced per row): the factor expanded to its
dense block-diagonal matrix, PEFT's einsum, the custom op. Forward: eval, no grad;
step: forward + backward with the input and the adapters requiring grad (the base frozen).
Timed calls are interleaved across rows; medians after warm-up; ratios against the base row.
The op's own speed (eager, both factor shapes) is printed after the table with its effective
bandwidth: the bytes of input, weight and output over the time (what bounds a product this thin).
`lora_fx/variants/bdlora.py` gives each device the form whose rows win there (`BEST`;
docs/performance.md, "BdLoRA").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys

import torch

from .harness import (
    CountingBackend,
    Row,
    graph_breaks,
    lift_recompile_limits,
    measure_interleaved,
    publish,
    synchronize,
    timed,
)

PRESETS = {
    "cpu": dict(tokens=512, din=512, dout=1376, r=16, nblocks=2, reps=100, warmup=3, device="cpu",
                dtype="float32", compiler="inductor"),
    "gpu": dict(tokens=4096, din=4096, dout=11008, r=16, nblocks=2, reps=100, warmup=5, device="cuda",
                dtype="bfloat16", compiler="inductor"),
    "smoke": dict(tokens=32, din=32, dout=48, r=4, nblocks=2, reps=2, warmup=1, device="cpu", dtype="float32",
                  compiler="aot_eager"),
}


@dataclasses.dataclass
class Setup:
    tokens: int
    din: int
    dout: int
    r: int
    nblocks: int
    reps: int
    warmup: int
    device: str
    dtype: str
    compiler: str


@contextlib.contextmanager
def lowering(form: str):
    """`bdlora.LOWERING = form` while a row runs: graphs are built on a row's first calls."""
    from lora_fx.variants import bdlora

    before = bdlora.LOWERING
    bdlora.LOWERING = form
    try:
        yield
    finally:
        bdlora.LOWERING = before


def make_rows(s: Setup) -> list[Row]:
    import lora_fx

    dtype = getattr(torch, s.dtype)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(s.din, s.dout, bias=False), torch.nn.SiLU()).to(s.device, dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, s.tokens // 4, s.din, device=s.device, dtype=dtype)
    x_grad = x.clone().requires_grad_(True)

    def row(name, cfg, form="auto"):
        model = torch.nn.Sequential(torch.nn.Linear(s.din, s.dout, bias=False), torch.nn.SiLU()).to(s.device, dtype)
        model.load_state_dict(base.state_dict())
        counter = CountingBackend(s.compiler)
        if cfg is None:
            model.requires_grad_(False)
            fast, params = torch.compile(model, backend=counter, fullgraph=True), []
        else:
            lora = lora_fx.backend(cfg, inner=counter)
            params = lora.parameters(model)
            with torch.no_grad():  # a trained adapter: nonzero B, so nothing is skipped as zero
                for p in params:
                    p.copy_(torch.randn_like(p) * 0.02)
            fast = torch.compile(model, backend=lora, fullgraph=True)

        def forward():
            with lowering(form), torch.no_grad():
                return fast(x)

        def step():
            with lowering(form):
                fast(x_grad).float().square().mean().backward()
            x_grad.grad = None
            for p in params:
                p.grad = None
        return Row(name, "compiled", forward, step, counter)

    def bd(a_blocks: bool):
        pattern = dict(target_modules_bd_a=["0"]) if a_blocks else dict(target_modules_bd_b=["0"])
        return lora_fx.LoraConfig(r=s.r, lora_alpha=2 * s.r, target_modules=["0"],
                                  use_bdlora=lora_fx.BdLoraConfig(nblocks=s.nblocks, **pattern))

    plain = lora_fx.LoraConfig(r=s.r, lora_alpha=2 * s.r, target_modules=["0"])
    from lora_fx.variants.bdlora import FORMS

    return [row("base", None), row("LoRA (dense)", plain),
            *(row(f"BdLoRA {factor} {form}", bd(factor == "A"), form) for factor in "AB" for form in FORMS)]


def op_alone(s: Setup) -> list[str]:
    """The product by itself, eager: einsum vs the op, for the two factor shapes, with bandwidth."""
    import lora_fx.kernels.ops  # noqa: F401
    from lora_fx.kernels.block_diag import block_diag_matmul_reference

    dtype = torch.float32  # adapters are fp32, also on half-precision bases
    nb, lines = s.nblocks, []
    shapes = {"A (x·Aᵀ)": (s.din, s.r, s.din // nb),          # x (T, din), A (r, din/nb)
              "B (h·Bᵀ)": (s.r, s.dout, s.r // nb)}                       # h (T, r), B (dout, r/nb)
    for label, (width, rows, cols) in shapes.items():
        x = torch.randn(s.tokens, width, device=s.device, dtype=dtype)
        w = torch.randn(rows, cols, device=s.device, dtype=dtype)
        nbytes = (x.numel() + w.numel() + s.tokens * rows) * x.element_size()
        times = {"einsum": [], "op": []}
        fns = {"einsum": lambda x=x, w=w: block_diag_matmul_reference(x, w, nb),
               "op": lambda x=x, w=w: torch.ops.lora_fx.block_diag_matmul(x, w, nb)}
        for fn in fns.values():
            fn(), fn()
        for _ in range(max(3, s.reps)):
            for name, fn in fns.items():
                times[name].append(timed(fn, s.device))
        synchronize(s.device)
        cells = [f"{name} {statistics.median(t) * 1e3:.3f} ms ({nbytes / statistics.median(t) / 1e9:.1f} GB/s)"
                 for name, t in times.items()]
        lines.append(f"op alone, {label} {s.tokens}x{width} -> {s.tokens}x{rows}, {nb} blocks: " + "; ".join(cells))
    return lines


def report(rows: list[Row], s: Setup, extra: list[str], command: str) -> str:
    base = rows[0]
    fwd0, step0 = statistics.median(base.fwd_times), statistics.median(base.step_times)
    lines = [f"Command: `{command}`", "",
             f"device: {s.device}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
             f"tokens {s.tokens}, Linear({s.din}->{s.dout}) + SiLU, r={s.r}, nblocks={s.nblocks}, {s.dtype} base; "
             f"compiler {s.compiler}; medians of {s.reps} interleaved reps after {s.warmup} warm-up", "",
             "| form | fwd ms | fwd / base | step ms | step / base | graphs | graph breaks |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fwd, step = statistics.median(r.fwd_times), statistics.median(r.step_times)
        lines.append(f"| {r.name} | {fwd * 1e3:.3f} | {fwd / fwd0:.3f} | {step * 1e3:.3f} | {step / step0:.3f} | "
                     f"{r.graphs} | {r.breaks} |")
    return "\n".join(lines + [""] + extra) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.block_diag", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="cpu (default), gpu (default when CUDA is available), smoke")
    p.add_argument("--smoke", action="store_true", help="the smoke preset (tiny, aot_eager; the test suite)")
    for name in ("tokens", "din", "dout", "r", "nblocks", "reps"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--compiler", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    return p.parse_args(argv)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    preset = "smoke" if args.smoke else args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    s = Setup(**PRESETS[preset])
    for name in ("tokens", "din", "dout", "r", "nblocks", "reps", "compiler"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.threads:
        torch.set_num_threads(args.threads)
    lift_recompile_limits(64)  # every row compiles the same code objects for its own model
    rows = make_rows(s)
    before = graph_breaks()
    measure_interleaved(rows, s.warmup, s.reps, s.device)
    assert graph_breaks() == before, "a row broke its graph"
    table = report(rows, s, op_alone(s), "python -m bench.block_diag " + " ".join(argv))
    return publish(table, args.out)


if __name__ == "__main__":
    main()
