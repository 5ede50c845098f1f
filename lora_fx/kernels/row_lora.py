"""Per-row LoRA for mixed-adapter batches: every token picks its own adapter from a bank.

Tokens `t = 0..T-1` each carry a slot `index[t]` in `[-1, S)` (`-1`: no adapter). The banks stack
`S` adapters: `a` is (S, r, in), `b` is (S, out, r), `scale` (S,) fp32. Two ops (the idea of vLLM's
`lora_shrink` / `lora_expand`; this is lora_fx's own code):

    lora_shrink(x, a, scale, index)[t] = scale[i] · (x[t] · a[i]ᵀ)      i = index[t]; zeros where i = -1
    lora_expand(y, h, b, index)[t]     = y[t] + h[t] · b[i]ᵀ            y[t] where i = -1

Dtypes: shrink casts `x` to `a`'s dtype first (fp32 adapters on a bf16 base) and returns `a`'s dtype,
accumulating in fp32; expand requires `h` in `b`'s dtype, computes the product in it and the sum in
`torch.promote_types(y.dtype, b.dtype)`, rounded to `y`'s dtype once (what PEFT's
`result + lora_B(h) * scaling` does). `y` is never modified.

Backward, with `gp = dy` in `b`'s dtype (the product's gradient):

    shrink: dx = shrink(dh, aᵀ per slot, scale, index)      da[s] = scale[s] · Σ_{t: i=s} dh[t]ᵀ x[t]
    expand: dy = dy (identity)   dh = shrink(gp, bᵀ per slot, 1, index)   db[s] = Σ_{t: i=s} gp[t]ᵀ h[t]

so one more op, `lora_row_weight_grad(grad, x, index, num_slots)` (the per-slot sums `Σ grad[t]ᵀ x[t]`,
rows of other slots and of -1 left out), gives both bank gradients; `scale` and `index` get none. It
is bilinear, so its own backward is two shrinks (double backward works).

Each op has three implementations:
- a pure-torch reference: gather the bank by `index` and `bmm` (one einsum-shaped product per row;
  no data-dependent shapes, so it traces). Also the fallback for fp64 on CUDA.
- the CPU kernel: rows sorted by slot once (`argsort`), then one GEMM per slot over its contiguous
  segment, scattered back (`index_copy_`): the gather form materialises a (T, r, in) copy of the
  bank and runs T matrix-vector products (eager, 1024 tokens, 1024 -> 1024, r=16, 4 adapters: the
  base linear plus the gather form 7.5x the base alone, plus the ops 1.3x; docs/performance.md,
  "Mixed-adapter row ops"). It raises a ValueError for slots outside [-1, S).
- a Triton kernel (CUDA; on the CPU under `TRITON_INTERPRET=1` for tests): the same segments, found on
  the device without a sync (`sort` + `searchsorted` over the slots), and a grid of
  (slot, token tile of the slot's segment, output tile); tiles past their segment's end do nothing.
  One kernel serves shrink and expand (with the `y` add and its rounding), another the weight
  gradient (fp32 partials over token splits, summed afterwards: deterministic, no atomics). Slots
  outside [-1, S) on CUDA are treated as -1 (no device-side check: that would need a sync).
"""

from __future__ import annotations

import torch

from .block_diag import _precision, _tile
from .dora import _launch, interpreting, triton_available

try:  # triton is optional on CPU-only machines: the reference math is then the only path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CI installs triton
    triton = None

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half precision (and fp32), fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- shape checks ------------------------------------------------------------------------------
# One list of (ok, message) per op, so that eager calls raise ValueError and fake impls raise
# through torch._check (RuntimeError) with the same text.

def _shrink_problems(x, a, scale, index) -> list[tuple[object, object]]:
    def shapes():
        return (f"x {tuple(x.shape)}, a {tuple(a.shape)}, scale {tuple(scale.shape)}, "
                f"index {tuple(index.shape)} {index.dtype}")
    return [
        (x.dim() == 2 and a.dim() == 3 and scale.dim() == 1 and index.dim() == 1,
         lambda: f"lora_fx::lora_shrink: expected x (T, in), a (S, r, in), scale (S,), index (T,); got {shapes()}"),
        (lambda: x.shape[1] == a.shape[2],
         lambda: f"lora_fx::lora_shrink: x's width {x.shape[1]} is not the bank's in={a.shape[2]} ({shapes()})"),
        (lambda: scale.shape[0] == a.shape[0],
         lambda: f"lora_fx::lora_shrink: scale has {scale.shape[0]} slots, the bank S={a.shape[0]} ({shapes()})"),
        (lambda: index.shape[0] == x.shape[0],
         lambda: f"lora_fx::lora_shrink: index has {index.shape[0]} rows, x T={x.shape[0]} ({shapes()})"),
        (index.dtype == torch.int64, lambda: f"lora_fx::lora_shrink: index must be int64 ({shapes()})"),
        (x.dtype.is_floating_point and a.dtype.is_floating_point and scale.dtype.is_floating_point,
         lambda: f"lora_fx::lora_shrink: x {x.dtype}, a {a.dtype}, scale {scale.dtype} must be floating point"),
    ]


def _expand_problems(y, h, b, index) -> list[tuple[object, object]]:
    def shapes():
        return f"y {tuple(y.shape)}, h {tuple(h.shape)}, b {tuple(b.shape)}, index {tuple(index.shape)} {index.dtype}"
    return [
        (y.dim() == 2 and h.dim() == 2 and b.dim() == 3 and index.dim() == 1,
         lambda: f"lora_fx::lora_expand: expected y (T, out), h (T, r), b (S, out, r), index (T,); got {shapes()}"),
        (lambda: y.shape[1] == b.shape[1],
         lambda: f"lora_fx::lora_expand: y's width {y.shape[1]} is not the bank's out={b.shape[1]} ({shapes()})"),
        (lambda: h.shape[1] == b.shape[2],
         lambda: f"lora_fx::lora_expand: h's width {h.shape[1]} is not the bank's r={b.shape[2]} ({shapes()})"),
        (lambda: h.shape[0] == y.shape[0] and index.shape[0] == y.shape[0],
         lambda: f"lora_fx::lora_expand: y, h and index disagree on T ({shapes()})"),
        (index.dtype == torch.int64, lambda: f"lora_fx::lora_expand: index must be int64 ({shapes()})"),
        (h.dtype == b.dtype, lambda: f"lora_fx::lora_expand: h {h.dtype} and b {b.dtype} differ ({shapes()})"),
        (y.dtype.is_floating_point, lambda: f"lora_fx::lora_expand: y {y.dtype} must be floating point"),
    ]


def _weight_grad_problems(grad, x, index, num_slots) -> list[tuple[object, object]]:
    def shapes():
        return f"grad {tuple(grad.shape)}, x {tuple(x.shape)}, index {tuple(index.shape)} {index.dtype}"
    return [
        (grad.dim() == 2 and x.dim() == 2 and index.dim() == 1 and num_slots > 0,
         lambda: f"lora_fx::lora_row_weight_grad: expected grad (T, n), x (T, m), index (T,), num_slots > 0; "
                 f"got {shapes()}, num_slots={num_slots}"),
        (lambda: grad.shape[0] == x.shape[0] and index.shape[0] == x.shape[0],
         lambda: f"lora_fx::lora_row_weight_grad: grad, x and index disagree on T ({shapes()})"),
        (index.dtype == torch.int64, lambda: f"lora_fx::lora_row_weight_grad: index must be int64 ({shapes()})"),
        (grad.dtype == x.dtype, lambda: f"lora_fx::lora_row_weight_grad: grad {grad.dtype} and x {x.dtype} differ"),
    ]


def _value(cond):
    return cond() if callable(cond) else cond


def _raise_on(problems) -> None:
    """Eager: the first failed check as a ValueError (later checks may index shapes the first rules out)."""
    for cond, message in problems:
        if not _value(cond):
            raise ValueError(message())


def _check_fake(problems) -> None:
    for cond, message in problems:
        torch._check(_value(cond), message)


# -- references (gather + bmm) -------------------------------------------------------------------

def _valid_slots(index: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, idx): rows with an adapter, and the slots with the others clamped to 0 (safe to gather)."""
    valid = (index >= 0) & (index < slots)
    return valid, torch.where(valid, index, 0)


def lora_shrink_reference(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _raise_on(_shrink_problems(x, a, scale, index))
    acc = _acc_dtype(a.dtype)
    valid, idx = _valid_slots(index, a.shape[0])
    xc = x.to(a.dtype).to(acc)
    h = torch.bmm(xc.unsqueeze(1), a.to(acc)[idx].transpose(1, 2)).squeeze(1)      # (T, r)
    h = h * scale.to(acc)[idx].unsqueeze(1)
    return torch.where(valid.unsqueeze(1), h, 0).to(a.dtype)


def lora_expand_reference(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _raise_on(_expand_problems(y, h, b, index))
    wide = torch.promote_types(y.dtype, b.dtype)
    valid, idx = _valid_slots(index, b.shape[0])
    prod = torch.bmm(h.unsqueeze(1), b[idx].transpose(1, 2)).squeeze(1)            # (T, out), b's dtype
    return torch.where(valid.unsqueeze(1), (y.to(wide) + prod.to(wide)).to(y.dtype), y)


def lora_row_weight_grad_reference(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                                   num_slots: int) -> torch.Tensor:
    _raise_on(_weight_grad_problems(grad, x, index, num_slots))
    acc = _acc_dtype(x.dtype)
    (tokens, n), m = grad.shape, x.shape[1]
    # One dense GEMM: the narrower operand spread over the slots ((T, S·width), zeros off each row's
    # slot) times the other; S times the FLOPs of one adapter's gradient, no gather of the bank.
    onehot = (index.unsqueeze(1) == torch.arange(num_slots, device=index.device)).to(acc)  # (T, S); -1: none
    if n <= m:
        spread = (onehot.unsqueeze(2) * grad.to(acc).unsqueeze(1)).reshape(tokens, num_slots * n)
        return (spread.t() @ x.to(acc)).reshape(num_slots, n, m).to(x.dtype)
    spread = (onehot.unsqueeze(2) * x.to(acc).unsqueeze(1)).reshape(tokens, num_slots * m)
    return (grad.to(acc).t() @ spread).reshape(n, num_slots, m).transpose(0, 1).contiguous().to(x.dtype)


# -- CPU kernels (sorted segments, one GEMM per slot) -------------------------------------------

def _cpu_segments(index: torch.Tensor, slots: int, op: str) -> tuple[torch.Tensor, list[int]]:
    """(rows with an adapter, sorted by slot; rows per slot). Raises ValueError for slots outside [-1, S)."""
    if index.numel():
        lo, hi = torch.aminmax(index)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= slots:
            raise ValueError(f"lora_fx::{op}: index values must lie in [-1, {slots}) for a bank of {slots} "
                             f"adapters; got values in [{lo}, {hi}]")
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index + 1, minlength=slots + 1).tolist()
    return order[counts[0]:], counts[1:]


def _segments(counts: list[int]):
    pos = 0
    for slot, n in enumerate(counts):
        if n:
            yield slot, slice(pos, pos + n)
        pos += n


def lora_shrink_cpu(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _raise_on(_shrink_problems(x, a, scale, index))
    rows, counts = _cpu_segments(index, a.shape[0], "lora_shrink")
    out = torch.zeros((x.shape[0], a.shape[1]), dtype=a.dtype, device=x.device)
    if rows.numel() == 0:
        return out
    acc = _acc_dtype(a.dtype)
    xs = x.index_select(0, rows).to(a.dtype).to(acc)
    hs = torch.empty((rows.numel(), a.shape[1]), dtype=acc, device=x.device)
    scales = scale.tolist()
    for slot, seg in _segments(counts):  # beta=0: hs's uninitialised values are ignored
        torch.addmm(hs[seg], xs[seg], a[slot].t().to(acc), beta=0, alpha=scales[slot], out=hs[seg])
    return out.index_copy_(0, rows, hs.to(a.dtype))


def lora_expand_cpu(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _raise_on(_expand_problems(y, h, b, index))
    rows, counts = _cpu_segments(index, b.shape[0], "lora_expand")
    out = y.clone(memory_format=torch.contiguous_format)
    if rows.numel() == 0:
        return out
    wide = torch.promote_types(y.dtype, b.dtype)
    hs = h.index_select(0, rows)
    ys = y.index_select(0, rows).to(wide)
    fused = wide == b.dtype and wide in (torch.float32, torch.float64)  # y + h·bᵀ in one GEMM, no rounding between
    for slot, seg in _segments(counts):
        if fused:
            ys[seg].addmm_(hs[seg], b[slot].t())
        else:  # the product rounds to b's dtype first, as PEFT's lora_B(h) does
            ys[seg] += torch.mm(hs[seg], b[slot].t()).to(wide)
    return out.index_copy_(0, rows, ys.to(y.dtype))


def lora_row_weight_grad_cpu(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor, num_slots: int) -> torch.Tensor:
    _raise_on(_weight_grad_problems(grad, x, index, num_slots))
    rows, counts = _cpu_segments(index, num_slots, "lora_row_weight_grad")
    out = torch.zeros((num_slots, grad.shape[1], x.shape[1]), dtype=x.dtype, device=x.device)
    if rows.numel() == 0:
        return out
    acc = _acc_dtype(x.dtype)
    gs = grad.index_select(0, rows).to(acc)
    xs = x.index_select(0, rows).to(acc)
    for slot, seg in _segments(counts):
        out[slot] = torch.mm(gs[seg].t(), xs[seg]).to(x.dtype)
    return out


# -- triton kernels --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _row_mm_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, out_ptr, order_ptr, bounds_ptr, n, k,
                       sx_t, sx_k, sw_s, sw_n, sw_k, sy_t, sy_n,
                       HAS_SCALE: tl.constexpr, ADD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out[t] = scale[s] · x[t]·w[s]ᵀ (+ y[t] when ADD) for the rows t of slot s, sorted by slot.
        # Program (slot, tile, n-tile): slot 0 holds the rows without an adapter (zeros, or y copied),
        # slot s + 1 adapter s; its rows are order[bounds[slot]:bounds[slot + 1]].
        slot = tl.program_id(0)
        start = tl.load(bounds_ptr + slot)
        end = tl.load(bounds_ptr + slot + 1)
        lo = start + tl.program_id(1) * BLOCK_T
        if lo < end:
            offs_t = lo + tl.arange(0, BLOCK_T)
            t_mask = offs_t < end
            rows = tl.load(order_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
            offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n
            mask = t_mask[:, None] & n_mask[None, :]
            out = out_ptr + rows[:, None] * n + offs_n[None, :]
            y_tile = y_ptr + rows[:, None] * sy_t + offs_n[None, :] * sy_n
            if slot == 0:
                if ADD:
                    tl.store(out, tl.load(y_tile, mask=mask, other=0.0).to(out_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(out, tl.zeros((BLOCK_T, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=mask)
            else:
                s = (slot - 1).to(tl.int64)
                x_rows = x_ptr + rows[:, None] * sx_t
                w_cols = w_ptr + s * sw_s + offs_n[None, :].to(tl.int64) * sw_n
                acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, k, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_mask = offs_k < k
                    xt = tl.load(x_rows + offs_k[None, :] * sx_k, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
                    xt = xt.to(w_ptr.dtype.element_ty)  # x cast to the bank's dtype first
                    wt = tl.load(w_cols + offs_k[:, None] * sw_k, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                    if UPCAST:
                        xt, wt = xt.to(tl.float32), wt.to(tl.float32)
                    if IEEE:
                        acc += tl.dot(xt, wt, input_precision="ieee")
                    else:
                        acc += tl.dot(xt, wt)
                if HAS_SCALE:
                    acc = acc * tl.load(scale_ptr + s).to(tl.float32)
                if ADD:
                    # the product rounds to the bank's dtype (PEFT's lora_B(h)); the sum in fp32 rounds once
                    prod = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
                    total = tl.load(y_tile, mask=mask, other=0.0).to(tl.float32) + prod
                    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_wgrad_kernel(g_ptr, x_ptr, part_ptr, order_ptr, bounds_ptr, n, m, slots, k_tiles, tokens_per_split,
                          sg_t, sg_n, sx_t, sx_m, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # part[split, s] = Σ grad[t]ᵀ x[t] over the split's share of slot s's rows (fp32).
        tile = tl.program_id(0)
        s = tl.program_id(1)
        split = tl.program_id(2)
        offs_n = (tile // k_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = (tile % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = offs_n < n
        k_mask = offs_k < m
        lo = tl.load(bounds_ptr + s + 1) + split * tokens_per_split
        hi = tl.minimum(tl.load(bounds_ptr + s + 2), lo + tokens_per_split)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t0 in range(lo, hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < hi
            rows = tl.load(order_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
            # gradᵀ tile (BLOCK_N, BLOCK_T) loaded transposed; x tile (BLOCK_T, BLOCK_K)
            gt = tl.load(g_ptr + rows[None, :] * sg_t + offs_n[:, None] * sg_n,
                         mask=n_mask[:, None] & t_mask[None, :], other=0.0)
            xt = tl.load(x_ptr + rows[:, None] * sx_t + offs_k[None, :] * sx_m,
                         mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                gt, xt = gt.to(tl.float32), xt.to(tl.float32)
            if IEEE:
                acc += tl.dot(gt, xt, input_precision="ieee")
            else:
                acc += tl.dot(gt, xt)
        part = part_ptr + ((split * slots + s) * n + offs_n).to(tl.int64)[:, None] * m + offs_k[None, :]
        tl.store(part, acc, mask=n_mask[:, None] & k_mask[None, :])


def device_segments(index: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, bounds) without a host sync: `order` the rows sorted by slot (slots outside [0, S) as -1,
    first), `bounds` (S + 2,) with slot `j - 1`'s rows at `order[bounds[j]:bounds[j + 1]]`."""
    idx = torch.where((index >= 0) & (index < slots), index, -1)
    ordered, order = torch.sort(idx, stable=True)
    marks = torch.arange(-1, slots + 1, device=index.device, dtype=torch.int64)
    return order, torch.searchsorted(ordered, marks)


def _row_mm_triton(x, w, scale, y, index, out_dtype):
    """out[t] = scale[i]·x[t]·w[i]ᵀ (+ y[t]) for w (S, N, K) of any strides; scale None: 1; y None: no add."""
    tokens, k = x.shape
    slots, n = w.shape[0], w.shape[1]
    out = torch.empty((tokens, n), dtype=out_dtype, device=x.device)
    if tokens == 0:
        return out
    order, bounds = device_segments(index, slots)
    block_t, block_n, block_k = _tile(tokens), _tile(n), _tile(k)
    grid = (slots + 1, triton.cdiv(tokens, block_t), triton.cdiv(n, block_n))
    y_arg = y if y is not None else out
    _launch(_row_mm_kernel)[grid](x, w, scale if scale is not None else out, y_arg, out, order, bounds, n, k,
                                  x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
                                  y_arg.stride(0), y_arg.stride(1), HAS_SCALE=scale is not None, ADD=y is not None,
                                  **_precision(w.dtype), BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _raise_on(_shrink_problems(x, a, scale, index))
    return _row_mm_triton(x, a, scale.contiguous(), None, index, a.dtype)


def lora_expand_triton(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _raise_on(_expand_problems(y, h, b, index))
    return _row_mm_triton(h, b, None, y, index, y.dtype)


def lora_row_weight_grad_triton(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                                num_slots: int) -> torch.Tensor:
    _raise_on(_weight_grad_problems(grad, x, index, num_slots))
    tokens, n = grad.shape
    m = x.shape[1]
    if tokens == 0:
        return torch.zeros((num_slots, n, m), dtype=x.dtype, device=x.device)
    order, bounds = device_segments(index, num_slots)
    block_t, block_n, block_k = 64, _tile(n), _tile(m)
    n_tiles, k_tiles = triton.cdiv(n, block_n), triton.cdiv(m, block_k)
    t_tiles = triton.cdiv(tokens, block_t)
    # Enough programs to fill the device (~128 per bank), each summing a contiguous share of its slot's rows;
    # a slot may hold every row, so the splits are sized by T.
    splits = min(t_tiles, max(1, 128 // (n_tiles * k_tiles * num_slots)))
    tokens_per_split = triton.cdiv(t_tiles, splits) * block_t
    splits = triton.cdiv(tokens, tokens_per_split)
    part = torch.empty((splits, num_slots, n, m), dtype=torch.float32, device=x.device)
    grid = (n_tiles * k_tiles, num_slots, splits)
    _launch(_row_wgrad_kernel)[grid](grad, x, part, order, bounds, n, m, num_slots, k_tiles, tokens_per_split,
                                     grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), **_precision(x.dtype),
                                     BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k)
    return part.sum(0).to(x.dtype)


# -- registration (called once by kernels/ops.py with its `_define`) --------------------------

def register(define):
    """Define `lora_fx::lora_shrink`, `lora_fx::lora_expand` and `lora_fx::lora_row_weight_grad` with
    `define(name, triton_impl, cpu_impl)` (ops.py's device-aware definer), their fake impls (which
    check shapes and dtypes) and the autograd of shrink and expand. Returns the three ops."""

    def _triton_ok(*tensors) -> bool:
        # CUDA tensors of the kernels' dtypes; anything else (fp64, or CPU tensors that Inductor traces
        # this function for on a machine with CUDA) takes the reference, which traces.
        return all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors)

    def _shrink(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not _triton_ok(x, a):  # the kernels accumulate in fp32: fp64 takes the reference
            return lora_shrink_reference(x, a, scale, index).contiguous()
        return lora_shrink_triton(x, a, scale, index)

    def _shrink_cpu(x: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return lora_shrink_cpu(x, a, scale, index)

    shrink = define("lora_shrink", _shrink, _shrink_cpu)

    @shrink.register_fake
    def _(x, a, scale, index):
        _check_fake(_shrink_problems(x, a, scale, index))
        return x.new_empty((x.shape[0], a.shape[1]), dtype=a.dtype)

    def _expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not _triton_ok(y, b):
            return lora_expand_reference(y, h, b, index).contiguous()
        return lora_expand_triton(y, h, b, index)

    def _expand_cpu(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return lora_expand_cpu(y, h, b, index)

    expand = define("lora_expand", _expand, _expand_cpu)

    @expand.register_fake
    def _(y, h, b, index):
        _check_fake(_expand_problems(y, h, b, index))
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    def _wgrad(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor, num_slots: int) -> torch.Tensor:
        if not _triton_ok(grad, x):
            return lora_row_weight_grad_reference(grad, x, index, num_slots).contiguous()
        return lora_row_weight_grad_triton(grad, x, index, num_slots)

    def _wgrad_cpu(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor, num_slots: int) -> torch.Tensor:
        return lora_row_weight_grad_cpu(grad, x, index, num_slots)

    weight_grad = define("lora_row_weight_grad", _wgrad, _wgrad_cpu)

    @weight_grad.register_fake
    def _(grad, x, index, num_slots):
        _check_fake(_weight_grad_problems(grad, x, index, num_slots))
        return x.new_empty((num_slots, grad.shape[1], x.shape[1]))

    def _shrink_setup(ctx, inputs, output):
        x, a, scale, index = inputs
        ctx.save_for_backward(x, a, scale, index)

    def _shrink_backward(ctx, dh):
        x, a, scale, index = ctx.saved_tensors
        dh = dh.to(a.dtype)
        d_x = d_a = None
        if ctx.needs_input_grad[0]:  # x[t]'s gradient: scale[i]·dh[t]·a[i] (a shrink over the transposed bank)
            d_x = torch.ops.lora_fx.lora_shrink(dh, a.transpose(1, 2), scale, index).to(x.dtype)
        if ctx.needs_input_grad[1]:
            d_a = torch.ops.lora_fx.lora_row_weight_grad(dh, x.to(a.dtype), index, a.shape[0])
            d_a = (d_a * scale.view(-1, 1, 1)).to(a.dtype)
        return d_x, d_a, None, None

    shrink.register_autograd(_shrink_backward, setup_context=_shrink_setup)

    def _expand_setup(ctx, inputs, output):
        y, h, b, index = inputs
        ctx.save_for_backward(h, b, index)

    def _expand_backward(ctx, grad):
        h, b, index = ctx.saved_tensors
        gp = grad.to(b.dtype)  # the gradient of the product h[t]·b[i]ᵀ, in its dtype
        d_h = d_b = None
        if ctx.needs_input_grad[1]:
            ones = torch.ones(b.shape[0], dtype=torch.float32, device=b.device)
            d_h = torch.ops.lora_fx.lora_shrink(gp, b.transpose(1, 2), ones, index).to(h.dtype)
        if ctx.needs_input_grad[2]:
            d_b = torch.ops.lora_fx.lora_row_weight_grad(gp, h, index, b.shape[0])
        return grad, d_h, d_b, None

    expand.register_autograd(_expand_backward, setup_context=_expand_setup)

    # The weight gradient is bilinear in (grad, x), so double backward costs two more shrinks:
    # d grad[t] = x[t]·dW[i]ᵀ, d x[t] = grad[t]·dW[i].
    def _wgrad_setup(ctx, inputs, output):
        grad, x, index, num_slots = inputs
        ctx.save_for_backward(grad, x, index)

    def _wgrad_backward(ctx, d_w):
        grad, x, index = ctx.saved_tensors
        ones = torch.ones(d_w.shape[0], dtype=torch.float32, device=d_w.device)
        d_grad = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad = torch.ops.lora_fx.lora_shrink(x, d_w, ones, index).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            d_x = torch.ops.lora_fx.lora_shrink(grad, d_w.transpose(1, 2), ones, index).to(x.dtype)
        return d_grad, d_x, None, None

    weight_grad.register_autograd(_wgrad_backward, setup_context=_wgrad_setup)
    return shrink, expand, weight_grad


__all__ = ["TRITON_DTYPES", "device_segments", "interpreting", "lora_expand_cpu", "lora_expand_reference",
           "lora_expand_triton", "lora_row_weight_grad_cpu", "lora_row_weight_grad_reference",
           "lora_row_weight_grad_triton", "lora_shrink_cpu", "lora_shrink_reference", "lora_shrink_triton",
           "register", "triton_available"]
