"""One adapted linear, several ways to write its adapter, compiled and timed side by side.

    python -m bench.site_forms [--tokens 512] [--din 512] [--dout 1376] [--r 16] [--reps 200] [--threads 1]
                               [--forms a,b,...] [--producer] [--autotune] [--no-step] [--clock wall|thread]
    python -m bench.site_forms --model [--reps 100] [--threads 1] [--clock wall|thread] [--profile]

Every form is followed by SiLU, as in a Llama MLP, so Inductor has an epilogue to fuse. `h` is `x·Aᵀ`:
- `scale_after`:  y + (x·Aᵀ·Bᵀ)·s          (lora_fx before the first push; PEFT's order)
- `scale_early`:  y + (h·s)·Bᵀ             (lora_fx's training form)
- `addmm`:        addmm(y, h·s, Bᵀ)        (lora_fx's inference form; ATen copies y into its result first)
- `cat_weights`:  [y | h] = x·[W; A]ᵀ, then addmm(y, h·s, Bᵀ)   (x read once; rejected)
(On the CPU, Inductor's post-grad `addmm` pattern rewrites a 2-D `y + mm(h, Bᵀ)` into `addmm(y, h, Bᵀ)`, so on
this 2-D site `scale_early` compiles to the `addmm` form; in a model the training form adds on 3-D views and
its add stays fused into the next pointwise kernel.)
Issue 14 goal 1, the output-sized pass (h·Bᵀ folded into, or accumulated onto, the base GEMM):
- `addmm_out`:    y.addmm_(h·s, Bᵀ) as a mutating custom op: Inductor re-inplaces it onto the base GEMM's
                  buffer, so ATen's copy goes (forward only: a mutating op has no autograd here)
- `addmm_lib`:    the same accumulation, the op defined through `torch.library.Library` (less call overhead)
- `op_after`:     one custom op `(x, W, h·s, B) -> y`: `y = x·Wᵀ; y.addmm_(h·s, Bᵀ)` (with autograd)
- `op_first`:     the same op, the other order: `y = (h·s)·Bᵀ; y.addmm_(x, Wᵀ)` (the base GEMM accumulates)
- `kcat`:         one GEMM `[x | h·s]·[W | B]ᵀ`, both concatenations per call (autograd's own backward)
- `kcat_stored`:  one GEMM `[x | h·s]·WBᵀ` on `WB = [W | B]` stored adjacently (W and B views of it); a
                  custom autograd.Function gives B its grad `dYᵀ·(h·s)` (W frozen) and `[x | h]` its grad
                  `dY·WB` (one GEMM for both)
- `kext_floor`:   `silu(XH·WBᵀ)` on a ready-made `[x | h]`: one GEMM of depth in+r, nothing else. Not a LoRA
                  (no adapter input path); the cost a fused form cannot beat.
`--producer` computes the layer input in the graph (`x = x_in·g`, as RMSNorm's weight does), so Inductor can
write it straight into the concatenation's buffer. `--autotune` adds the base, scale_early, addmm, op_first and kcat
forms compiled with `max_autotune`, the CPP GEMM template (`max_autotune_gemm_backends="CPP,ATEN"`) and
freezing (forward only), ratios against a base compiled the same way. Forward ratios (no grad) and
forward+backward ratios (x, A, B requiring grad, W frozen) against the base linear: medians of the per-round
ratios (every round runs every form once, interleaved, each round starting one form later), with their
spread (25th-75th percentile). `--clock thread` times the CPU time of the calling thread, which leaves out the
time other processes held the core (with `--threads 1` that is the whole computation). `--model` compares the
inference form's accumulation in the bench's Llama instead (`model_ab`). Used for docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# Inductor's CPP GEMM template only takes a constant second operand (`use_cpp_gemm_template`'s
# `require_constant_mat2`), so its forms are compiled with freezing, the base weight a frozen Parameter of
# a module (the adapter tensors stay call arguments, so they are not baked in). Freezing only applies to
# graphs compiled without grad: these forms are forward only. `freezing` is read outside the options'
# config patch (passed in `options=` it had no effect), so `--autotune` sets it globally; forms without
# module parameters have nothing to freeze.
AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


class WeightHolder(torch.nn.Module):
    def __init__(self, fn, w):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(w.clone(), requires_grad=False)

    def forward(self, x, t):
        return self.fn(x, {**t, "w": self.w})


@torch.library.custom_op("site_forms::addmm_acc_", mutates_args=("y",))
def addmm_acc_(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor) -> None:
    # In place: ATen's addmm skips its copy of the accumulator when the result is the accumulator.
    y.addmm_(h, bt)


# The same in-place accumulation defined through `torch.library.Library` with a plain Python kernel: the
# dispatcher calls it in ~4.5 us, `custom_op`'s wrapper in ~21 us (measured on this CPU, eager, tiny shapes).
_LIB = torch.library.Library("site_forms", "FRAGMENT")
_LIB.define("addmm_lib_(Tensor(a!) y, Tensor h, Tensor bt) -> ()")


def _addmm_lib_(y, h, bt):
    y.addmm_(h, bt)


_LIB.impl("addmm_lib_", _addmm_lib_, "CompositeExplicitAutograd")
torch.library.register_fake("site_forms::addmm_lib_", lambda y, h, bt: None, lib=_LIB)


def _lora_linear(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, b: torch.Tensor, delta_first: bool) -> torch.Tensor:
    if delta_first:
        y = torch.mm(h, b.t())
        return y.addmm_(x, w.t())
    y = torch.mm(x, w.t())
    return y.addmm_(h, b.t())


@torch.library.custom_op("site_forms::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, b: torch.Tensor, delta_first: bool) -> torch.Tensor:
    return _lora_linear(x, w, h, b, delta_first)


@lora_linear.register_fake
def _(x, w, h, b, delta_first):
    return x.new_empty(x.shape[0], w.shape[0])


def _lora_linear_setup(ctx, inputs, output):
    x, w, h, b, _ = inputs
    ctx.save_for_backward(x, w, h, b)


def _lora_linear_backward(ctx, dy):
    x, w, h, b = ctx.saved_tensors
    dx = dy @ w if ctx.needs_input_grad[0] else None
    return dx, None, dy @ b, dy.t() @ h, None


lora_linear.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup)


class StoredKCat(torch.autograd.Function):
    """`[x | h]·WBᵀ` with W frozen and B a view of WB: B gets `dYᵀ·h`, `[x | h]` gets `dY·WB`."""

    @staticmethod
    def forward(ctx, xh, wb, b):
        ctx.save_for_backward(xh, wb)
        ctx.din = wb.shape[1] - b.shape[1]
        return xh @ wb.t()

    @staticmethod
    def backward(ctx, dy):
        xh, wb = ctx.saved_tensors
        return dy @ wb, None, dy.t() @ xh[:, ctx.din:]


def forms(din: int, dout: int, producer: bool = False):
    """name -> fn(x, t) with t the dict of tensors built by `tensors`."""

    def inp(x, t):
        x = x * t["g"] if producer else x
        return x.reshape(-1, din)

    def out(y2, x):
        return F.silu(y2).view(*x.shape[:-1], dout)

    def h_of(x2, t):
        return (x2 @ t["a"].t()) * t["s"]

    def base(x, t):
        return out(inp(x, t) @ t["w"].t(), x)

    def scale_after(x, t):
        x2 = inp(x, t)
        return out(x2 @ t["w"].t() + (x2 @ t["a"].t()) @ t["b"].t() * t["s"], x)

    def scale_early(x, t):
        x2 = inp(x, t)
        return out(x2 @ t["w"].t() + h_of(x2, t) @ t["b"].t(), x)

    def addmm(x, t):
        x2 = inp(x, t)
        return out(torch.addmm(x2 @ t["w"].t(), h_of(x2, t), t["b"].t()), x)

    def cat_weights(x, t):
        x2 = inp(x, t)
        yh = x2 @ torch.cat([t["w"], t["a"]]).t()
        return out(torch.addmm(yh[:, :dout], yh[:, dout:] * t["s"], t["b"].t()), x)

    def addmm_out(x, t):
        x2 = inp(x, t)
        y = x2 @ t["w"].t()
        torch.ops.site_forms.addmm_acc_(y, h_of(x2, t), t["b"].t())
        return out(y, x)

    def addmm_lib(x, t):
        x2 = inp(x, t)
        y = x2 @ t["w"].t()
        torch.ops.site_forms.addmm_lib_(y, h_of(x2, t), t["b"].t())
        return out(y, x)

    def op_after(x, t):
        x2 = inp(x, t)
        return out(torch.ops.site_forms.lora_linear(x2, t["w"], h_of(x2, t), t["b"], False), x)

    def op_first(x, t):
        x2 = inp(x, t)
        return out(torch.ops.site_forms.lora_linear(x2, t["w"], h_of(x2, t), t["b"], True), x)

    def kcat(x, t):
        x2 = inp(x, t)
        xh = torch.cat([x2, h_of(x2, t)], 1)
        return out(xh @ torch.cat([t["w"], t["b"]], 1).t(), x)

    def kcat_stored(x, t):
        x2 = inp(x, t)
        xh = torch.cat([x2, h_of(x2, t)], 1)
        return out(StoredKCat.apply(xh, t["wb"], t["b_view"]), x)

    def kext_floor(x, t):
        return out(t["xh"] @ t["wb"].t(), x)

    return dict(base=base, scale_after=scale_after, scale_early=scale_early, addmm=addmm, cat_weights=cat_weights,
                addmm_out=addmm_out, addmm_lib=addmm_lib, op_after=op_after, op_first=op_first, kcat=kcat,
                kcat_stored=kcat_stored, kext_floor=kext_floor)


# Forms whose training step is not measured: a mutating custom op has no autograd, and the floor's
# ready-made [x | h] has no path to A.
FORWARD_ONLY = {"addmm_out", "addmm_lib", "kext_floor"}
AUTOTUNED = ("base", "scale_early", "addmm", "op_first", "kcat")


def tensors(tokens: int, din: int, dout: int, r: int):
    torch.manual_seed(0)
    x = torch.randn(4, tokens // 4, din)
    w = torch.randn(dout, din) / din ** 0.5
    a = (torch.randn(r, din) / din ** 0.5).requires_grad_()
    b = (torch.randn(dout, r) / r ** 0.5).requires_grad_()
    # [W | B] in one buffer: row stride din + r; W and B are strided views of it.
    wb = torch.cat([w, b.detach()], 1)
    b_view = wb[:, din:].detach().requires_grad_()
    xh = torch.cat([x.reshape(-1, din), torch.randn(tokens, r)], 1)
    t = dict(w=w, a=a, b=b, s=torch.tensor(2.0), g=torch.ones(din), wb=wb, b_view=b_view, xh=xh)
    return x, t


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def model_ab(reps: int, clock, profile: bool = False) -> dict[str, dict[str, float]]:
    """The inference form's accumulation in the bench's Llama (`--model`): forward (eval, no grad) of
    the compiled base, lora_fx with `lora_fx::addmm_` (in place), with the out-of-place `addmm`
    (`lora.INPLACE_ACCUMULATE` off while its graph is built) and with the training form everywhere
    (`inference_form=False`); same adapter values, interleaved rounds, medians of per-round ratios."""
    import contextlib
    import copy

    import lora_fx
    import lora_fx.variants.lora as lora_variant

    from .harness import PRESETS, Shape, llama

    @contextlib.contextmanager
    def inplace(flag):
        old, lora_variant.INPLACE_ACCUMULATE = lora_variant.INPLACE_ACCUMULATE, flag
        try:
            yield
        finally:
            lora_variant.INPLACE_ACCUMULATE = old

    shape = Shape(**PRESETS["cpu"])
    base_model = llama(shape).eval()
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(0))
    cfg = lora_fx.LoraConfig(r=shape.r, lora_alpha=2 * shape.r, target_modules="all-linear", lora_dropout=0.0,
                             init_lora_weights=False)
    rows = {"base (compiled)": (torch.compile(copy.deepcopy(base_model).requires_grad_(False)), True)}
    for label, flag, kwargs in (("lora_fx, in place (lora_fx::addmm_)", True, {}),
                                ("lora_fx, out-of-place addmm (before)", False, {}),
                                ("lora_fx, training form (inference_form=False)", True, {"inference_form": False})):
        model = copy.deepcopy(base_model)
        torch.manual_seed(1)  # the same adapter values in every row
        lora = lora_fx.backend(cfg, inner="inductor", **kwargs)
        lora.parameters(model)
        rows[label] = (torch.compile(model, backend=lora, fullgraph=True), flag)
    names = list(rows)
    times = {name: [] for name in names}
    with torch.no_grad():
        outs = {}
        for name, (fn, flag) in rows.items():
            with inplace(flag):  # the graph is built on the first call
                for _ in range(3):
                    outs[name] = fn(ids).logits
        for name in names[2:]:
            torch.testing.assert_close(outs[name], outs[names[1]], rtol=1e-4, atol=1e-4)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                start = clock()
                rows[name][0](ids)
                times[name].append(clock() - start)
    res = {}
    for name in names:
        ratios = [ti / tb for ti, tb in zip(times[name], times[names[0]], strict=True)]
        res[name] = dict(ms=statistics.median(times[name]) * 1e3, ratio=statistics.median(ratios),
                         q1=_pct(ratios, 0.25), q3=_pct(ratios, 0.75))
    if profile:  # where the accumulation's time goes: ATen ops of 5 forwards per lora_fx accumulation form
        for name in names[1:3]:
            with torch.no_grad(), torch.profiler.profile() as prof:
                for _ in range(5):
                    rows[name][0](ids)
            print(f"{name}: torch.profiler, 5 forwards")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    paired = [ti / tb for ti, tb in zip(times[names[1]], times[names[2]], strict=True)]
    print(f"{shape.describe()}; {torch.get_num_threads()} threads; forward (eval, no grad); medians of {reps} "
          "interleaved rounds; ratio = median over rounds of row / compiled base [25th-75th percentile]")
    print("| row | fwd ms | fwd / base |\n|---|---:|---:|")
    for name, c in res.items():
        print(f"| {name} | {c['ms']:.2f} | {c['ratio']:.3f} [{c['q1']:.3f}-{c['q3']:.3f}] |")
    print(f"in place / out-of-place addmm, per round: {statistics.median(paired):.3f} "
          f"[{_pct(paired, 0.25):.3f}-{_pct(paired, 0.75):.3f}]")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.site_forms")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--din", type=int, default=512)
    p.add_argument("--dout", type=int, default=1376)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--forms", default="base,scale_after,scale_early,addmm,cat_weights",
                   help="comma-separated forms (base is always timed); 'all' for every form")
    p.add_argument("--producer", action="store_true", help="compute the layer input in the graph (x_in·g)")
    p.add_argument("--autotune", action="store_true", help="add forms compiled with max_autotune + CPP GEMMs")
    p.add_argument("--no-step", action="store_true", help="forward only")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: CPU time of this thread (time.thread_time), which leaves out the time other "
                        "processes held the core; only the whole computation with --threads 1")
    p.add_argument("--model", action="store_true",
                   help="instead: the inference form's accumulation in the bench's Llama (in place vs addmm)")
    p.add_argument("--profile", action="store_true", help="with --model: torch.profiler tables of both forms")
    args = p.parse_args(argv)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.model:
        if args.threads:
            torch.set_num_threads(args.threads)
        return model_ab(args.reps, clock, args.profile)
    if args.threads:
        torch.set_num_threads(args.threads)
    din, dout, r = args.din, args.dout, args.r
    x, t = tensors(args.tokens, din, dout, r)
    all_forms = forms(din, dout, args.producer)
    names = list(all_forms) if args.forms == "all" else ["base"] + [n for n in args.forms.split(",") if n != "base"]
    fns = {name: torch.compile(all_forms[name]) for name in names}
    if args.autotune:
        torch._inductor.config.freezing = True
        for name in AUTOTUNED:
            fns[f"{name}@autotune"] = torch.compile(WeightHolder(all_forms[name], t["w"]), options=AUTOTUNE)
    with torch.no_grad():
        ref = all_forms["scale_early"](x, t)
        for name, fn in fns.items():
            if not name.startswith(("base", "kext_floor")):
                torch.testing.assert_close(fn(x, t), ref, rtol=1e-4, atol=1e-4)

    def fwd(fn):
        with torch.no_grad():
            fn(x, t)

    def step(fn):
        fn(x.detach().requires_grad_(), t).sum().backward()

    runs = [("forward", fwd, list(fns))]
    if not args.no_step:
        runs.append(("forward+backward", step, [n for n in fns if n not in FORWARD_ONLY and "@" not in n]))
    results = {}
    for label, run, timed in runs:
        for name in timed:
            run(fns[name]), run(fns[name])
        times = {name: [] for name in timed}
        for rep in range(args.reps):
            # Each round starts one form later, so no form always follows the same neighbour.
            for name in timed[rep % len(timed):] + timed[:rep % len(timed)]:
                start = clock()
                run(fns[name])
                times[name].append(clock() - start)
        res = {}
        for name in timed:
            ref_name = "base@autotune" if name.endswith("@autotune") else "base"
            ratios = [ti / tb for ti, tb in zip(times[name], times[ref_name], strict=True)]
            res[name] = dict(ms=statistics.median(times[name]) * 1e3, ratio=statistics.median(ratios),
                             q1=_pct(ratios, 0.25), q3=_pct(ratios, 0.75))
        results[label] = res
    adapter = r * (din + dout) / (din * dout)
    floors = {"forward": 1 + adapter, "forward+backward": 1 + 1.5 * adapter}
    print(f"tokens {args.tokens}, Linear({din}->{dout}) + SiLU, r={r}, {torch.get_num_threads()} threads, "
          f"producer={args.producer}, clock {args.clock}; medians of {args.reps} interleaved rounds; FLOP floors: "
          f"forward {floors['forward']:.3f}x base, forward+backward {floors['forward+backward']:.3f}x "
          "(W frozen: base fwd+bwd = 2 GEMMs, the adapters' backward = 2x their forward)")
    print("ratio = median over rounds of form / base of the same round [25th-75th percentile]; "
          "@autotune forms against base@autotune")
    print("| form | fwd ms | fwd / base | fwd / floor | fwd+bwd ms | fwd+bwd / base | fwd+bwd / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in fns:
        cells = []
        for label in ("forward", "forward+backward"):
            c = results.get(label, {}).get(name)
            if c is None:
                cells += ["-", "-", "-"]
            else:
                cells += [f"{c['ms']:.3f}", f"{c['ratio']:.3f} [{c['q1']:.3f}-{c['q3']:.3f}]",
                          f"{c['ratio'] / floors[label]:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


if __name__ == "__main__":
    main()
