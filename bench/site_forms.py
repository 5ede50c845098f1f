"""One adapted linear, four ways to write its adapter, compiled and timed side by side.

    python -m bench.site_forms [--tokens 512] [--din 512] [--dout 1376] [--r 16] [--reps 200]

The forms (each followed by SiLU, as in a Llama MLP, so Inductor has an epilogue to fuse):
- `scale_after`:  y + (x·Aᵀ·Bᵀ)·s          (lora_fx before the first push; PEFT's order)
- `scale_early`:  y + (x·Aᵀ·s)·Bᵀ          (lora_fx's training form)
- `addmm`:        addmm(y, x·Aᵀ·s, Bᵀ)     (lora_fx's inference form)
- `cat_weights`:  [y | h] = x·[W; A]ᵀ, then addmm(y, h·s, Bᵀ)   (x read once; rejected)
Forward ratios and forward+backward ratios (x, A, B requiring grad, W frozen) against the
base linear, with the FLOP floor. Used for docs/performance.md, "Levers tried".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def forms(din: int, dout: int):
    def base(x, w, a, b, s):
        return F.silu(F.linear(x, w))

    def scale_after(x, w, a, b, s):
        return F.silu(F.linear(x, w) + F.linear(F.linear(x, a), b) * s)

    def scale_early(x, w, a, b, s):
        return F.silu(F.linear(x, w) + F.linear(F.linear(x, a) * s, b))

    def addmm(x, w, a, b, s):
        x2 = x.reshape(-1, din)
        return F.silu(torch.addmm(x2 @ w.t(), (x2 @ a.t()) * s, b.t()).view(*x.shape[:-1], dout))

    def cat_weights(x, w, a, b, s):
        x2 = x.reshape(-1, din)
        yh = x2 @ torch.cat([w, a]).t()
        return F.silu(torch.addmm(yh[:, :dout], yh[:, dout:] * s, b.t()).view(*x.shape[:-1], dout))

    return dict(base=base, scale_after=scale_after, scale_early=scale_early, addmm=addmm, cat_weights=cat_weights)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.site_forms")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--din", type=int, default=512)
    p.add_argument("--dout", type=int, default=1376)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(4, args.tokens // 4, args.din)
    w = torch.randn(args.dout, args.din) / args.din ** 0.5
    a = (torch.randn(args.r, args.din) / args.din ** 0.5).requires_grad_()
    b = (torch.randn(args.dout, args.r) / args.r ** 0.5).requires_grad_()
    s = torch.tensor(2.0)
    fns = {name: torch.compile(fn) for name, fn in forms(args.din, args.dout).items()}
    with torch.no_grad():
        ref = fns["scale_after"](x, w, a, b, s)
        for name, fn in fns.items():
            if name != "base":
                torch.testing.assert_close(fn(x, w, a, b, s), ref, rtol=1e-4, atol=1e-4)

    def fwd(fn):
        with torch.no_grad():
            fn(x, w, a, b, s)

    def step(fn):
        fn(x.detach().requires_grad_(), w, a, b, s).sum().backward()

    results = {}
    for label, run in (("forward", fwd), ("forward+backward", step)):
        for fn in fns.values():
            run(fn), run(fn)
        times = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                run(fn)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        results[label] = {name: med[name] / med["base"] for name in fns}
    floor = 1 + args.r * (args.din + args.dout) / (args.din * args.dout)
    print(f"tokens {args.tokens}, Linear({args.din}->{args.dout}) + SiLU, r={args.r}, {torch.get_num_threads()} "
          f"threads, medians of {args.reps} interleaved reps; FLOP floor {floor:.3f}x base")
    print("| form | forward / base | forward+backward / base |\n|---|---:|---:|")
    for name in fns:
        print(f"| {name} | {results['forward'][name]:.3f} | {results['forward+backward'][name]:.3f} |")
    return results


if __name__ == "__main__":
    main()
