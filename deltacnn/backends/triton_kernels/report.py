"""The per-stream report of a compiled frame (deltacnn.compile) in one or two launches.

After every delta pass the runner checks each stream's values (largest |value| of its frame against
the value at its keyframe, NaN and infinity) and writes the report the host reads without waiting
(change, flag, held-back change). In PyTorch that is ~20 small launches per frame (amax, amin, isfinite,
comparisons, ORs, copies; ~45 us inside a graph); here it is one reduction over the frame (partial
maxima per chunk of each stream) and one program per stream for the rest. A keyframe records each
stream's value there (the scale the delta frames compare with) the same way (`pass_report_`), and a
stateless dense pass writes its report in one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import gdc_start, launch_opts, npow2

CHUNK = 16384  # frame elements per program of the reduction
BLOCK = 2048


@triton.jit
def _absmax_partial_kernel(x_ptr, part_ptr, L, n_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                           GDC: tl.constexpr):
    gdc_start(GDC)
    n = tl.program_id(0)
    c = tl.program_id(1)
    base = x_ptr + n.to(tl.int64) * L
    m = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = c * CHUNK + i + tl.arange(0, BLOCK)
        v = tl.abs(tl.load(base + offs, mask=offs < L, other=0.0).to(tl.float32))
        m = tl.maximum(m, tl.where(v == v, v, float("inf")))  # NaN counts as infinite
    tl.store(part_ptr + n * n_chunks + c, tl.max(m, axis=0))


@triton.jit
def _report_kernel(part_ptr, n_chunks, scale_ptr, bad_ptr, keep_ptr, change_ptr, held_ptr, report_ptr, N, ratio,
                   NC: tl.constexpr, HAS_RATIO: tl.constexpr, HAS_HELD: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    n = tl.program_id(0)
    j = tl.arange(0, NC)
    a = tl.max(tl.load(part_ptr + n * n_chunks + j, mask=j < n_chunks, other=0.0), axis=0)
    flag = a == float("inf")
    if HAS_RATIO:
        scale = tl.load(scale_ptr + n)
        flag = flag | (a > ratio * scale) | (scale > ratio * a)
    keep = tl.load(keep_ptr + n) != 0
    bad = (tl.load(bad_ptr + n) != 0) | (flag & keep)
    tl.store(bad_ptr + n, bad.to(tl.int8))
    tl.store(report_ptr + n, tl.load(change_ptr + n).to(tl.float32))
    tl.store(report_ptr + N + n, bad.to(tl.float32))
    if HAS_HELD:
        tl.store(report_ptr + 2 * N + n, tl.load(held_ptr + n).to(tl.float32))


def report_fits(x: Tensor) -> bool:
    """Whether delta_report_ reads `x` as it is: a dense float batch (contiguous or channels_last), so that
    every stream is one contiguous block."""
    return x.is_floating_point() and x.shape[0] > 0 and \
        (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)))


def delta_report_(x: Tensor, scale: Tensor, bad: Tensor, keep: Tensor, change: Tensor, held: Tensor | None,
                  report: Tensor, ratio: float | None) -> None:
    """In place, per stream n of the frame batch x (N, ...): a = max |x[n]| (infinite where x[n] holds NaN
    or infinity); bad[n] |= keep[n] & (a infinite | a > ratio * scale[n] | scale[n] > ratio * a) (ratio
    None: the first test only); report[0] = change, report[1] = bad, report[2] = held where given.
    `bad` and `keep` are bool (N,), `scale`, `change`, `held` float (N,), `report` float32 (3, N)
    contiguous. No host synchronisation."""
    n = x.shape[0]
    if not report_fits(x):
        raise ValueError("delta_report_ needs each stream's frame as one contiguous block (report_fits)")
    if report.dtype != torch.float32 or tuple(report.shape) != (3, n) or not report.is_contiguous():
        raise ValueError(f"report must be a contiguous float32 (3, {n}) tensor")
    for t, name in ((bad, "bad"), (keep, "keep")):
        if t.dtype != torch.bool or tuple(t.shape) != (n,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous bool ({n},) tensor")
    length = x.numel() // n
    n_chunks = triton.cdiv(length, CHUNK)
    part = torch.empty(n, n_chunks, dtype=torch.float32, device=x.device)
    opts = launch_opts(x.device)
    _absmax_partial_kernel[(n, n_chunks)](x, part, length, n_chunks, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4, **opts)
    _report_kernel[(n,)](part, n_chunks, scale.float().contiguous(), bad.view(torch.int8), keep.view(torch.int8),
                         change.contiguous(), held.contiguous() if held is not None else change, report, n,
                         float(ratio) if ratio is not None else 0.0, NC=npow2(n_chunks),
                         HAS_RATIO=ratio is not None, HAS_HELD=held is not None, num_warps=4, **opts)


@triton.jit
def _pass_report_kernel(part_ptr, n_chunks, scale_ptr, bad_ptr, change_ptr, report_ptr, row_ptr, N,
                        NC: tl.constexpr, SEED: tl.constexpr, HAS_REPORT: tl.constexpr, HAS_CHANGE: tl.constexpr,
                        ROWS: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    n = tl.program_id(0)
    r = n
    if ROWS:
        r = tl.load(row_ptr).to(tl.int32) + n
    if SEED:
        j = tl.arange(0, NC)
        a = tl.max(tl.load(part_ptr + n * n_chunks + j, mask=j < n_chunks, other=0.0), axis=0)
        bad = a == float("inf")
        tl.store(scale_ptr + r, a)
        tl.store(bad_ptr + r, bad.to(tl.int8))
    else:
        bad = tl.load(bad_ptr + r) != 0
    if HAS_REPORT:
        change = 0.0
        if HAS_CHANGE:
            change = tl.load(change_ptr + n).to(tl.float32)
        tl.store(report_ptr + r, change)
        tl.store(report_ptr + N + r, bad.to(tl.float32))
        tl.store(report_ptr + 2 * N + r, 0.0)


def pass_report_(x: Tensor, scale: Tensor, bad: Tensor, report: Tensor | None, change: Tensor | None,
                 seed: bool, rows: Tensor | None = None) -> None:
    """In place, after a keyframe or dense pass over the frames x (n, ...) of streams rows[0] .. rows[0] + n - 1
    (rows: a (1,) integer tensor on the device; None: streams 0 .. n - 1). seed (a keyframe): scale[r] = max
    |x[n]| (infinite where x[n] holds NaN or infinity), bad[r] = whether it is infinite. report (3, N)
    where given: report[0][r] = change[n] (0 where change is None), report[1][r] = bad[r], report[2][r] = 0.
    `bad` is bool (N,), `scale` float32 (N,), both contiguous. No host synchronisation."""
    n = x.shape[0]
    big_n = bad.shape[0]
    if seed and not report_fits(x):
        raise ValueError("pass_report_ needs each stream's frame as one contiguous block (report_fits)")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (big_n,) or not scale.is_contiguous():
        raise ValueError(f"scale must be a contiguous float32 ({big_n},) tensor")
    if bad.dtype != torch.bool or bad.dim() != 1 or not bad.is_contiguous():
        raise ValueError("bad must be a contiguous bool (N,) tensor")
    if report is not None and (report.dtype != torch.float32 or tuple(report.shape) != (3, big_n)
                               or not report.is_contiguous()):
        raise ValueError(f"report must be a contiguous float32 (3, {big_n}) tensor")
    if rows is None and n != big_n:
        raise ValueError(f"{n} frames for {big_n} streams: name their first row (rows)")
    opts = launch_opts(x.device)
    part, n_chunks = scale, 1
    if seed:
        length = x.numel() // n
        n_chunks = triton.cdiv(length, CHUNK)
        part = torch.empty(n, n_chunks, dtype=torch.float32, device=x.device)
        _absmax_partial_kernel[(n, n_chunks)](x, part, length, n_chunks, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4,
                                              **opts)
    _pass_report_kernel[(n,)](part, n_chunks, scale, bad.view(torch.int8),
                              change.contiguous() if change is not None else scale,
                              report if report is not None else scale, rows if rows is not None else scale, big_n,
                              NC=npow2(n_chunks), SEED=seed, HAS_REPORT=report is not None,
                              HAS_CHANGE=change is not None, ROWS=rows is not None, num_warps=1, **opts)
