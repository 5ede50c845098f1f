"""Mixed-adapter batches: one adapted linear whose rows each use their own adapter of a bank.

    python -m bench --row-lora [--smoke | --preset cpu|gpu] [--reps N] [--compiler C] [--threads N] [--out FILE]
    python -m bench.row_lora [same options] [--din D] [--dout D] [--r R] [--slots S]

One `y = x Wᵀ` (frozen, no bias) plus a per-row adapter: a bank of `--slots` adapters (4), each
sequence of the batch on slot `b % slots`; adapters fp32 (PEFT's default, also on a bf16 base),
`scale = 2`. Shapes (batch x tokens): a prefill-shaped 8 x 128 and decode-shaped 8 x 1 and 32 x 1.
Forms of the adapter (`FORMS`, `row_lora_delta`):
- `gather`: the banks gathered per row (`a[index]`, `b[index]`: (T, r, in) and (T, out, r) copies),
  then two `bmm`s; rows without an adapter (`index = -1`) get scale 0 (clamped slot, masked scale);
- `op`: `lora_fx::lora_shrink` then `lora_fx::lora_expand` (a GEMM per slot on the CPU, the Triton
  kernels on CUDA);
- `single adapter`: the floor: every row on one adapter, plain `x·Aᵀ` then `h·Bᵀ` (what a batch with
  one adapter costs; not a mixed batch).
Each in eager mode and compiled (`torch.compile(fullgraph=True, dynamic=False)`, Inductor by default).
Forward: no grad; step: forward + backward with the input and the adapter banks requiring grad (the
base frozen), loss `out.float().square().mean()`. Timed calls are interleaved across every row
and shape; medians after warm-up; ratios against the base linear of the same shape and mode.
`BEST` records the form measured fastest per device (docs/performance.md, "Mixed-adapter row ops").
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch

from .harness import CountingBackend, Row, graph_breaks, lift_recompile_limits, measure_interleaved, publish

FORMS = ("gather", "op")

# The form measured fastest, per device (docs/performance.md, "Mixed-adapter row ops (issue 11)").
# CPU (compiled, 1 thread): the op wins the training step at 1024 tokens by 3x (1.20x vs 3.66x the base:
# the gather form's backward scatter-adds a (T, r, in) gradient) and ties the forward (1.32x vs 1.31x);
# the gather form is faster for decode-shaped calls (8 or 32 tokens: +0.0-0.2 ms vs +0.5-0.6 ms over a
# 0.9-1.1 ms base linear; Inductor fuses it, the op is an opaque call), so "op" bounds the worst case.
BEST = {
    "cpu": "op",
    "cuda": "op",  # unmeasured (no GPU was lent): the Triton kernels, by design; `--preset gpu` measures it
}

PRESETS = {
    "cpu": dict(shapes=((8, 128), (8, 1), (32, 1)), din=1024, dout=1024, r=16, slots=4, reps=20, warmup=2,
                device="cpu", dtype="float32", compiler="inductor"),
    "gpu": dict(shapes=((8, 512), (8, 1), (32, 1)), din=4096, dout=4096, r=16, slots=4, reps=50, warmup=3,
                device="cuda", dtype="bfloat16", compiler="inductor"),
    "smoke": dict(shapes=((2, 8), (4, 1)), din=32, dout=24, r=4, slots=4, reps=2, warmup=1, device="cpu",
                  dtype="float32", compiler="aot_eager"),
}


def row_lora_delta(x2d: torch.Tensor, a_bank: torch.Tensor, b_bank: torch.Tensor, scale_bank: torch.Tensor,
                   index: torch.Tensor, y2d: torch.Tensor, form: str) -> torch.Tensor:
    """`y2d` plus each row's adapter: `y[t] + scale[i]·(x[t]·a[i]ᵀ)·b[i]ᵀ`, `i = index[t]`, nothing where
    `i = -1`. `x2d` (T, in), `a_bank` (S, r, in), `b_bank` (S, out, r), `scale_bank` (S,), `index` (T,)
    int64, `y2d` (T, out). The sum is in `promote_types(y.dtype, b.dtype)`, rounded to `y`'s dtype once;
    `x` is cast to the adapters' dtype first. `form`: "gather" (banks gathered per row, then `bmm`;
    plain aten ops, no slot for -1 needed: the slot is clamped and the scale masked to 0) or "op"
    (`lora_fx::lora_shrink` + `lora_fx::lora_expand`)."""
    if form == "op":
        import lora_fx.kernels.ops  # noqa: F401  (registers the ops)

        h = torch.ops.lora_fx.lora_shrink(x2d, a_bank, scale_bank, index)
        return torch.ops.lora_fx.lora_expand(y2d, h, b_bank, index)
    if form != "gather":
        raise ValueError(f"row_lora_delta: form must be one of {FORMS}, got {form!r}")
    valid = index >= 0
    idx = index.clamp_min(0)
    s = torch.where(valid, scale_bank[idx], 0).to(a_bank.dtype)
    h = torch.bmm(x2d.to(a_bank.dtype).unsqueeze(1), a_bank[idx].transpose(1, 2)).squeeze(1) * s.unsqueeze(1)
    prod = torch.bmm(h.unsqueeze(1), b_bank[idx].transpose(1, 2)).squeeze(1)
    wide = torch.promote_types(y2d.dtype, b_bank.dtype)
    return (y2d.to(wide) + prod.to(wide)).to(y2d.dtype)


@dataclasses.dataclass
class Setup:
    shapes: tuple
    din: int
    dout: int
    r: int
    slots: int
    reps: int
    warmup: int
    device: str
    dtype: str
    compiler: str


ROW_NAMES = ("base", "gather", "op", "single adapter")


def make_rows(s: Setup) -> list[Row]:
    dtype = getattr(torch, s.dtype)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(s.device)

    weight = rand(s.dout, s.din, std=s.din ** -0.5).to(dtype)
    a_bank = rand(s.slots, s.r, s.din, std=s.din ** -0.5).requires_grad_()
    b_bank = rand(s.slots, s.dout, s.r, std=0.02).requires_grad_()  # a trained adapter: nonzero B
    a_one = a_bank.detach()[0].clone().requires_grad_()
    b_one = b_bank.detach()[0].clone().requires_grad_()
    scale = torch.full((s.slots,), 2.0, device=s.device)
    rows = []
    for batch, seq in s.shapes:
        tokens = batch * seq
        x = rand(tokens, s.din).to(dtype)
        x_grad = x.clone().requires_grad_()
        index = (torch.arange(batch) % s.slots).repeat_interleave(seq).to(s.device)

        fns = {
            "base": lambda x, index: x @ weight.t(),
            "gather": lambda x, index: row_lora_delta(x, a_bank, b_bank, scale, index, x @ weight.t(), "gather"),
            "op": lambda x, index: row_lora_delta(x, a_bank, b_bank, scale, index, x @ weight.t(), "op"),
            "single adapter": lambda x, index: (x @ weight.t()).float().add(
                ((x.float() @ a_one.t()) * 2.0) @ b_one.t()).to(x.dtype),
        }
        params = {"base": [], "gather": [a_bank, b_bank], "op": [a_bank, b_bank], "single adapter": [a_one, b_one]}
        for mode in ("eager", "compiled"):
            for name in ROW_NAMES:
                counter = None
                fn = fns[name]
                if mode == "compiled":
                    counter = CountingBackend(s.compiler)
                    fn = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)

                def forward(fn=fn, index=index, x=x):
                    with torch.no_grad():
                        return fn(x, index)

                def step(fn=fn, index=index, x_grad=x_grad, params=params[name]):
                    fn(x_grad, index).float().square().mean().backward()
                    x_grad.grad = None
                    for p in params:
                        p.grad = None

                rows.append(Row(f"{batch}x{seq}|{name}", mode, forward, step, counter))
    return rows


def report(rows: list[Row], s: Setup, command: str) -> str:
    cells = {(r.name, r.mode): r for r in rows}
    lines = [f"Command: `{command}`", "",
             f"device: {s.device}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
             f"Linear({s.din}->{s.dout}, bias=False) {s.dtype} base, {s.slots} fp32 adapters r={s.r} "
             f"(sequence b on slot b % {s.slots}); compiler {s.compiler} (fullgraph, dynamic=False); "
             f"medians of {s.reps} interleaved reps after {s.warmup} warm-up", "",
             "| batch x tokens | form | eager fwd / base | eager step / base | compiled fwd / base | "
             "compiled step / base | graphs | graph breaks |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for batch, seq in s.shapes:
        key = f"{batch}x{seq}"
        base = {m: (statistics.median(cells[(f"{key}|base", m)].fwd_times),
                    statistics.median(cells[(f"{key}|base", m)].step_times)) for m in ("eager", "compiled")}
        for name in ROW_NAMES:
            row = [key, name]
            for mode in ("eager", "compiled"):
                r = cells[(f"{key}|{name}", mode)]
                fwd, step = statistics.median(r.fwd_times), statistics.median(r.step_times)
                if name == "base":
                    row += [f"{fwd * 1e3:.3f} ms", f"{step * 1e3:.3f} ms"]
                else:
                    row += [f"{fwd / base[mode][0]:.3f}", f"{step / base[mode][1]:.3f}"]
            compiled = cells[(f"{key}|{name}", "compiled")]
            row += [str(compiled.graphs), str(compiled.breaks)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.row_lora", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="cpu (default), gpu (default when CUDA is available), smoke")
    p.add_argument("--smoke", action="store_true", help="the smoke preset (tiny, aot_eager; the test suite)")
    for name in ("din", "dout", "r", "slots", "reps"):
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
    for name in ("din", "dout", "r", "slots", "reps", "compiler"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.threads:
        torch.set_num_threads(args.threads)
    lift_recompile_limits(64)  # every row compiles its own lambda; shapes are static per row
    rows = make_rows(s)
    before = graph_breaks()
    measure_interleaved(rows, s.warmup, s.reps, s.device)
    assert graph_breaks() == before, "a row broke its graph"
    return publish(report(rows, s, "python -m bench.row_lora " + " ".join(argv)), args.out)


if __name__ == "__main__":
    main()
