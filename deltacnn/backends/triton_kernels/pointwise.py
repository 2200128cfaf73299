"""Memory-bound delta kernels: nonlinear update, add, sparsify (input layer), accumulate (output layer),
and the keyframe seeding of a nonlinear update's state.

Each program owns BP consecutive pixels (rows of the (N*H*W, C) channels_last matrix); it reads the
pixels' masks first and touches values only when one of them is active, so the cost follows the
update rate plus one byte per pixel of mask traffic. One launch per op, no host synchronisation.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (SCORE_CODES, Act, apply_act, check_state, finish_tile, gdc_start, launch_opts, mask_u8,
                      need_cl, new_cl, npow2, pixel_stride)


def _blocks(c: int) -> tuple[int, int, int]:
    """(pixels per program, channel block, number of channel blocks) for C channels."""
    bc = min(npow2(c), 256)
    bp = max(8, min(64, 4096 // bc))
    return bp, bc, triton.cdiv(c, bc)


@triton.jit
def _nonlinear_kernel(d_ptr, dm_ptr, a_ptr, e_ptr, out_ptr, fm_ptr, P, C: tl.constexpr,
                      slope, min_val, max_val, alpha, tau,
                      FN: tl.constexpr, SCORE: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, NCB: tl.constexpr,
                      GDC: tl.constexpr):
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pvalid = prow < P
    dm = (tl.load(dm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
    if tl.max(dm.to(tl.int32), axis=0) > 0:
        if NCB == 1:
            cols = tl.arange(0, BC)
            cvalid = cols < C
            d = tl.load(d_ptr + prow[:, None] * C + cols[None, :], mask=dm[:, None] & cvalid[None, :], other=0.0)
            finish_tile(d.to(tl.float32), prow, pvalid, dm, dm, cols, cvalid, C, C, out_ptr, out_ptr, dm_ptr, a_ptr,
                        e_ptr, fm_ptr, slope, min_val, max_val, alpha, tau, False, True, FN, SCORE, False, False, True)
        else:
            s = tl.zeros([BP], dtype=tl.float32)
            for c0 in range(0, C, BC):
                cols = c0 + tl.arange(0, BC)
                m2 = dm[:, None] & (cols < C)[None, :]
                offs = prow[:, None] * C + cols[None, :]
                a = tl.load(a_ptr + offs, mask=m2, other=0.0) + tl.load(d_ptr + offs, mask=m2, other=0.0).to(tl.float32)
                tl.store(a_ptr + offs, a, mask=m2)
                o = apply_act(a, FN, slope, min_val, max_val, alpha) - tl.load(e_ptr + offs, mask=m2, other=0.0)
                o = tl.where(m2, o, 0.0)
                if SCORE == 0:
                    s = tl.maximum(s, tl.max(tl.abs(o), axis=1))
                else:
                    s += tl.sum(o * o, axis=1)
            if SCORE == 1:
                s = tl.sqrt(s)
            emit = dm & (s > tau)
            for c0 in range(0, C, BC):
                cols = c0 + tl.arange(0, BC)
                m3 = emit[:, None] & (cols < C)[None, :]
                offs = prow[:, None] * C + cols[None, :]
                a = tl.load(a_ptr + offs, mask=m3, other=0.0)
                e = tl.load(e_ptr + offs, mask=m3, other=0.0)
                o_r = (apply_act(a, FN, slope, min_val, max_val, alpha) - e).to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + offs, o_r, mask=m3)
                tl.store(e_ptr + offs, e + o_r.to(tl.float32), mask=m3)
            tl.store(fm_ptr + prow, emit.to(tl.uint8), mask=pvalid)
    else:
        tl.store(fm_ptr + prow, tl.zeros([BP], dtype=tl.uint8), mask=pvalid)


def sparse_nonlinear(d: Tensor, d_mask: Tensor, acc: Tensor, emitted: Tensor, fn: str | Act, tau: float = 0.0,
                     score: str = "max", *, out: Tensor | None = None, out_dtype: torch.dtype | None = None,
                     slope: float = 0.01) -> tuple[Tensor, Tensor]:
    """Nonlinear delta update at d_mask pixels: A += d; o = f(A) - E; emit where score_c(o) > tau; E += o.

    `fn` is an activation name (parameters via `slope`) or an Act (whose fn/params/tau/score win; its
    acc/emitted are ignored in favour of the arguments). Returns (o, emit mask); o has out.dtype, else
    out_dtype, else d.dtype, and E records o as rounded to that dtype.
    """
    act = fn if isinstance(fn, Act) else Act(fn, acc, emitted, tau, score, slope)
    need_cl(d, "d")
    n, c, h, w = d.shape
    dm = mask_u8(d_mask, (n, 1, h, w), "d_mask")
    check_state(acc, d.shape, "acc")
    check_state(emitted, d.shape, "emitted")
    if out is None:
        out = new_cl(n, c, h, w, out_dtype or d.dtype, d.device)
    fm = torch.empty(n, 1, h, w, dtype=torch.bool, device=d.device)
    bp, bc, ncb = _blocks(c)
    P = n * h * w
    _nonlinear_kernel[(triton.cdiv(P, bp),)](d, dm, acc, emitted, out, fm.view(torch.uint8), P, c,
                                            act.slope, act.min_val, act.max_val, act.alpha, float(act.tau),
                                            FN=act.code(), SCORE=act.score_code(), BP=bp, BC=bc, NCB=ncb,
                                            **launch_opts(d.device))
    return out, fm


_SEED_ELEMS = 1024  # elements per program of the dense epilogue (8 per thread with 4 warps)


@triton.jit
def _dense_act_kernel(y_ptr, b_ptr, r_ptr, a_ptr, e_ptr, P, C, slope, min_val, max_val, alpha,
                      FN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, STATE: tl.constexpr,
                      BP: tl.constexpr, BC: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cv = cols < C
    m = (prow < P)[:, None] & cv[None, :]
    offs = prow[:, None] * C + cols[None, :]
    v = tl.load(y_ptr + offs, mask=m, other=0.0)
    # each add in float32, rounded once to the model dtype, as PyTorch's y.add_(bias) after cuDNN and
    # y.add_(residual) round them
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cv, other=0.0).to(tl.float32)
        v = (v.to(tl.float32) + b[None, :]).to(y_ptr.dtype.element_ty)
    if HAS_RES:
        v = (v.to(tl.float32) + tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)).to(y_ptr.dtype.element_ty)
    a = v.to(tl.float32)
    out = apply_act(a, FN, slope, min_val, max_val, alpha).to(y_ptr.dtype.element_ty)
    if STATE:
        tl.store(a_ptr + offs, a, mask=m)
        tl.store(e_ptr + offs, out.to(tl.float32), mask=m)
    tl.store(y_ptr + offs, out, mask=m)


def seed_act_state_(y: Tensor, residual: Tensor | None, acc: Tensor | None, emitted: Tensor | None,
                    act: str | Act, bias: Tensor | None = None) -> Tensor:
    """Dense epilogue of a conv in one memory pass instead of up to five: v = y + bias + residual (each
    add rounded to y.dtype); y = f(v) (float32 math, rounded to y.dtype); on keyframes also A = v, E = y.

    PyTorch adds a conv's bias in a separate pass after cuDNN: leave it out of the conv and pass it
    here ((C,) of any float dtype). y (overwritten) and residual are channels_last; acc (A) and
    emitted (E) are float32 channels_last buffers of y's shape, overwritten entirely, or both None
    (a stateless dense frame). `act` is an activation name or an Act (its fn and parameters are used,
    its acc/emitted/tau/score ignored). One launch, no host sync. Returns y.
    """
    act = act if isinstance(act, Act) else Act(act, acc, emitted)
    need_cl(y, "y")
    n, c, h, w = y.shape
    if (acc is None) != (emitted is None):
        raise ValueError("acc and emitted must both be given (keyframe) or both be None (stateless frame)")
    if acc is not None:
        check_state(acc, y.shape, "acc")
        check_state(emitted, y.shape, "emitted")
    if residual is not None:
        need_cl(residual, "residual")
        if residual.shape != y.shape:
            raise ValueError(f"residual must have y's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
    if bias is not None and (bias.shape != (c,) or not bias.is_contiguous() or bias.device != y.device):
        raise ValueError(f"bias must be a contiguous ({c},) tensor on {y.device}, got {tuple(bias.shape)} "
                         f"on {bias.device}")
    if y.numel():
        bc = min(npow2(c), 256)
        bp = max(1, _SEED_ELEMS // bc)
        _dense_act_kernel[(triton.cdiv(n * h * w, bp), triton.cdiv(c, bc))](
            y, bias if bias is not None else y, residual if residual is not None else y,
            acc if acc is not None else y, emitted if emitted is not None else y, n * h * w, c,
            act.slope, act.min_val, act.max_val, act.alpha, FN=act.code(), HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, STATE=acc is not None, BP=bp, BC=bc, num_warps=4, **launch_opts(y.device))
    return y


@triton.jit
def _add_kernel(a_ptr, am_ptr, b_ptr, bm_ptr, out_ptr, fm_ptr, P, C: tl.constexpr, SA, SB,
                HAS_B: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pvalid = prow < P
    am = (tl.load(am_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
    if HAS_B:
        bm = (tl.load(bm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
        u = am | bm
    else:
        u = am
    if tl.max(u.to(tl.int32), axis=0) > 0:
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            cv = (cols < C)[None, :]
            v = tl.load(a_ptr + prow[:, None] * SA + cols[None, :], mask=am[:, None] & cv, other=0.0).to(tl.float32)
            if HAS_B:
                v += tl.load(b_ptr + prow[:, None] * SB + cols[None, :], mask=bm[:, None] & cv,
                             other=0.0).to(tl.float32)
            tl.store(out_ptr + prow[:, None] * C + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=u[:, None] & cv)
    tl.store(fm_ptr + prow, u.to(tl.uint8), mask=pvalid)


def sparse_add(a: Tensor, a_mask: Tensor, b: Tensor | None, b_mask: Tensor | None, *, out: Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Sum of two deltas: values a*[a_mask] + b*[b_mask] (float32 arithmetic) at a_mask | b_mask.

    `b=None` copies/casts a. Output dtype: out.dtype, else out_dtype, else promote(a, b). a and b are
    channels_last or channel slices of channels_last maps (read in place: C2f's shortcut adds).
    """
    sa = pixel_stride(a, "a")
    n, c, h, w = a.shape
    am = mask_u8(a_mask, (n, 1, h, w), "a_mask")
    sb = sa
    if b is not None:
        sb = pixel_stride(b, "b")
        if b.shape != a.shape:
            raise ValueError(f"delta add needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        bm = mask_u8(b_mask, (n, 1, h, w), "b_mask")
    dt = out_dtype or (torch.promote_types(a.dtype, b.dtype) if b is not None else a.dtype)
    if out is None:
        out = new_cl(n, c, h, w, dt, a.device)
    else:
        need_cl(out, "out")
    fm = torch.empty(n, 1, h, w, dtype=torch.bool, device=a.device)
    bp, bc, _ = _blocks(c)
    P = n * h * w
    _add_kernel[(triton.cdiv(P, bp),)](a, am, b if b is not None else a, bm if b is not None else am, out,
                                      fm.view(torch.uint8), P, c, sa, sb, HAS_B=b is not None, BP=bp, BC=bc,
                                      **launch_opts(a.device))
    return out, fm


@triton.jit
def _cat_part(x_ptr, xm_ptr, out_ptr, prow, pvalid, u, CT: tl.constexpr, OFF: tl.constexpr, C: tl.constexpr,
              BC: tl.constexpr):
    """Channels [OFF, OFF + C) of the concatenation: this input's delta where its mask is set, 0 elsewhere in
    the union (stores only at union pixels: values at other pixels are undefined)."""
    xm = (tl.load(xm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cv = (cols < C)[None, :]
        v = tl.load(x_ptr + prow[:, None] * C + cols[None, :], mask=xm[:, None] & cv, other=0.0)
        tl.store(out_ptr + prow[:, None] * CT + OFF + cols[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=u[:, None] & cv)


@triton.jit
def _cat_kernel(x0, m0, x1, m1, x2, m2, x3, m3, out_ptr, fm_ptr, P, CT: tl.constexpr,
                C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                O0: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, O3: tl.constexpr,
                B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
                NUM: tl.constexpr, UNION_IN: tl.constexpr, BP: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pvalid = prow < P
    if UNION_IN:  # more than 4 inputs: the union was computed before, this launch writes some of them
        u = (tl.load(fm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
    else:
        u = (tl.load(m0 + prow, mask=pvalid, other=0) != 0) & pvalid
        if NUM > 1:
            u = u | ((tl.load(m1 + prow, mask=pvalid, other=0) != 0) & pvalid)
        if NUM > 2:
            u = u | ((tl.load(m2 + prow, mask=pvalid, other=0) != 0) & pvalid)
        if NUM > 3:
            u = u | ((tl.load(m3 + prow, mask=pvalid, other=0) != 0) & pvalid)
    if tl.max(u.to(tl.int32), axis=0) > 0:
        _cat_part(x0, m0, out_ptr, prow, pvalid, u, CT, O0, C0, B0)
        if NUM > 1:
            _cat_part(x1, m1, out_ptr, prow, pvalid, u, CT, O1, C1, B1)
        if NUM > 2:
            _cat_part(x2, m2, out_ptr, prow, pvalid, u, CT, O2, C2, B2)
        if NUM > 3:
            _cat_part(x3, m3, out_ptr, prow, pvalid, u, CT, O3, C3, B3)
    if not UNION_IN:
        tl.store(fm_ptr + prow, u.to(tl.uint8), mask=pvalid)


CAT_INPUTS = 4  # inputs per launch of _cat_kernel


def sparse_cat(values: list[Tensor], masks: list[Tensor], *,
               out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Channel concatenation of deltas in one launch (up to CAT_INPUTS inputs; more take one launch per
    CAT_INPUTS after a union of the masks): out = cat(values_i zero-filled outside masks_i), mask = OR of the masks.

    Replaces the PyTorch form (a where per input, an OR per extra mask, the cat: ~3 launches per input).
    Values are written at the union's pixels only (elsewhere undefined). Output dtype: out_dtype, else the
    promotion of the inputs' dtypes.
    """
    if not values or len(values) != len(masks):
        raise ValueError(f"sparse_cat needs one mask per input, got {len(values)} values and {len(masks)} masks")
    n, _, h, w = values[0].shape
    for i, v in enumerate(values):
        need_cl(v, f"values[{i}]")
        if v.dim() != 4 or (v.shape[0], v.shape[2], v.shape[3]) != (n, h, w):
            raise ValueError(f"sparse_cat: values[{i}] has shape {tuple(v.shape)}, "
                             f"expected (N, C, {h}, {w}) with N={n}")
    ms = [mask_u8(m, (n, 1, h, w), f"masks[{i}]") for i, m in enumerate(masks)]
    chans = [int(v.shape[1]) for v in values]
    ct = sum(chans)
    dt = out_dtype or functools.reduce(torch.promote_types, [v.dtype for v in values])
    out = new_cl(n, ct, h, w, dt, values[0].device)
    fm = torch.empty(n, 1, h, w, dtype=torch.bool, device=values[0].device)
    union_in = len(values) > CAT_INPUTS
    if union_in:
        u = masks[0]
        for m in masks[1:]:
            u = u | m
        fm.copy_(u)
    P = n * h * w
    bp = max(8, min(64, 4096 // min(npow2(max(chans)), 256)))
    off = 0
    for g0 in range(0, len(values), CAT_INPUTS):
        part = list(range(g0, min(g0 + CAT_INPUTS, len(values))))
        args, cs, offs, bcs = [], [], [], []
        for j in range(CAT_INPUTS):
            i = part[j] if j < len(part) else part[0]  # unused slots repeat the first input (never read)
            args += [values[i], ms[i]]
            cs.append(chans[i] if j < len(part) else 1)
            bcs.append(min(npow2(cs[-1]), 256))
            offs.append(off)
            if j < len(part):
                off += chans[i]
        _cat_kernel[(triton.cdiv(P, bp),)](*args, out, fm.view(torch.uint8), P, ct, *cs, *offs, *bcs,
                                           NUM=len(part), UNION_IN=union_in, BP=bp,
                                           **launch_opts(values[0].device))
    return out, fm


@triton.jit
def _accum_kernel(s_ptr, d_ptr, dm_ptr, P, C: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pvalid = prow < P
    dm = (tl.load(dm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
    if tl.max(dm.to(tl.int32), axis=0) > 0:
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            m2 = dm[:, None] & (cols < C)[None, :]
            offs = prow[:, None] * C + cols[None, :]
            v = tl.load(s_ptr + offs, mask=m2, other=0.0) + tl.load(d_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            tl.store(s_ptr + offs, v, mask=m2)


def accumulate_(out_state: Tensor, d: Tensor, d_mask: Tensor) -> Tensor:
    """O += d (in float32) where d_mask; O is float32 channels_last. Returns O."""
    need_cl(d, "d")
    n, c, h, w = d.shape
    check_state(out_state, d.shape, "out_state")
    dm = mask_u8(d_mask, (n, 1, h, w), "d_mask")
    bp, bc, _ = _blocks(c)
    P = n * h * w
    _accum_kernel[(triton.cdiv(P, bp),)](out_state, d, dm, P, c, BP=bp, BC=bc, **launch_opts(d.device))
    return out_state


@triton.jit
def _upsample_kernel(x_ptr, xm_ptr, out_ptr, om_ptr, P, H, W, C: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr,
                     BP: tl.constexpr, BC: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)  # output pixels (n, y, x), H, W the input's
    pvalid = prow < P
    wo = W * SX
    img = prow // (H * SY * wo)
    rem = prow - img * (H * SY * wo)
    src = (img * H + (rem // wo) // SY) * W + (rem % wo) // SX
    m = (tl.load(xm_ptr + src, mask=pvalid, other=0) != 0) & pvalid
    if tl.max(m.to(tl.int32), axis=0) > 0:
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            m2 = m[:, None] & (cols < C)[None, :]
            v = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=m2, other=0.0)
            tl.store(out_ptr + prow[:, None] * C + cols[None, :], v, mask=m2)
    tl.store(om_ptr + prow, m.to(tl.uint8), mask=pvalid)


def upsample_nearest(x: Tensor, x_mask: Tensor, factors: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Nearest upsampling of a delta by integer factors (sy, sx): output pixel (y, x) is input pixel
    (y // sy, x // sx), values (channels_last, at the mask's pixels) and mask alike; one launch."""
    need_cl(x, "x")
    n, c, h, w = x.shape
    sy, sx = (int(f) for f in factors)
    if sy < 1 or sx < 1:
        raise ValueError(f"upsampling factors must be integers >= 1, got {factors}")
    xm = mask_u8(x_mask, (n, 1, h, w), "x_mask")
    out = new_cl(n, c, h * sy, w * sx, x.dtype, x.device)
    om = torch.empty(n, 1, h * sy, w * sx, dtype=torch.bool, device=x.device)
    bp, bc, _ = _blocks(c)
    P = n * h * sy * w * sx
    _upsample_kernel[(triton.cdiv(P, bp),)](x, xm, out, om.view(torch.uint8), P, h, w, c, SY=sy, SX=sx, BP=bp, BC=bc,
                                           **launch_opts(x.device))
    return out, om


@triton.jit
def _frame_offsets(prow, cols, HW, sN, sP, sC):
    """Offsets of (pixel, channel) in a frame whose pixels are evenly spaced within an image
    (channels_last: sP = C, sC = 1; NCHW: sP = 1, sC = H*W), so frames are read without a copy."""
    img = prow // HW
    return (img * sN + (prow - img * HW) * sP)[:, None] + cols[None, :].to(tl.int64) * sC


@triton.jit
def _bordered_offsets(pid, P, H, W, Hb, Wb, BORDER: tl.constexpr, CP: tl.constexpr, BP: tl.constexpr,
                      BC: tl.constexpr):
    """Offsets (and store mask) of a sparsify block's pixels x channels in the bordered copy, all in
    int32 (sparsify checks that the copy's indices fit): int64 divisions are slow, and [BP, BC] int64
    offsets next to the kernel's own would exceed the registers of a 1024-pixel block."""
    q = pid * BP + tl.arange(0, BP)
    img = q // (H * W)
    yx = q - img * (H * W)
    yy = yx // W
    cols = tl.arange(0, BC)
    boffs = (((img * Hb + yy + BORDER) * Wb + (yx - yy * W) + BORDER) * CP)[:, None] + cols[None, :]
    return boffs, (q < P)[:, None] & (cols < CP)[None, :]


@triton.jit
def _score_kernel(x_ptr, r_ptr, m_ptr, P, C: tl.constexpr, HW, sN, sP, sC, tau, SCORE: tl.constexpr,
                  BP: tl.constexpr, BC: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pvalid = prow < P
    s = tl.zeros([BP], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        m2 = pvalid[:, None] & (cols < C)[None, :]
        offs = prow[:, None] * C + cols[None, :]
        xoffs = _frame_offsets(prow, cols, HW, sN, sP, sC)
        dd = tl.load(x_ptr + xoffs, mask=m2, other=0.0).to(tl.float32) - tl.load(r_ptr + offs, mask=m2, other=0.0)
        if SCORE == 0:
            s = tl.maximum(s, tl.max(tl.abs(dd), axis=1))
        else:
            s += tl.sum(dd * dd, axis=1)
    if SCORE == 1:
        s = tl.sqrt(s)
    tl.store(m_ptr + prow, (s > tau).to(tl.uint8), mask=pvalid)


@triton.jit
def _erode_kernel(m_ptr, out_ptr, P, H, W, K: tl.constexpr, BP: tl.constexpr, GDC: tl.constexpr):
    """out = m eroded by a K x K square ('same', K // 2): set where every in-image pixel of the window is
    (out-of-image pixels do not clear it, as a max pool of -m padded with -inf); uint8 (N, 1, H, W) masks."""
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pvalid = prow < P
    hw = H * W
    img = prow // hw
    y = (prow % hw) // W
    x = prow % W
    keep = pvalid & (tl.load(m_ptr + prow, mask=pvalid, other=0) != 0)
    for ky in tl.static_range(K):
        iy = y - K // 2 + ky
        for kx in tl.static_range(K):
            ix = x - K // 2 + kx
            v = keep & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            keep = keep & ((tl.load(m_ptr + (img * H + iy) * W + ix, mask=v, other=1) != 0) | ~v)
    tl.store(out_ptr + prow, keep.to(tl.uint8), mask=pvalid)


@triton.jit
def _sparsify_kernel(x_ptr, r_ptr, m0_ptr, out_ptr, fm_ptr, bd_ptr, dirty_ptr, P, C: tl.constexpr, H, W, sN, sP, sC,
                     tau, Hb, Wb, K: tl.constexpr, SCORE: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
                     BORDERED: tl.constexpr, BORDER: tl.constexpr, CP: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    pid = tl.program_id(0)
    prow = pid.to(tl.int64) * BP + tl.arange(0, BP)
    pvalid = prow < P
    if K == 1:  # score and send in one pass over the pixel block
        s = tl.zeros([BP], dtype=tl.float32)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            m2 = pvalid[:, None] & (cols < C)[None, :]
            offs = prow[:, None] * C + cols[None, :]
            xoffs = _frame_offsets(prow, cols, H * W, sN, sP, sC)
            dd = tl.load(x_ptr + xoffs, mask=m2, other=0.0).to(tl.float32) - tl.load(r_ptr + offs, mask=m2, other=0.0)
            if SCORE == 0:
                s = tl.maximum(s, tl.max(tl.abs(dd), axis=1))
            else:
                s += tl.sum(dd * dd, axis=1)
        if SCORE == 1:
            s = tl.sqrt(s)
        m = pvalid & (s > tau)
    else:  # dilate the precomputed score mask by a K x K window ('same' padding K // 2)
        hw = H * W
        img = prow // hw
        y = (prow % hw) // W
        x = prow % W
        acc = tl.zeros([BP], dtype=tl.int32)
        for ky in tl.static_range(K):
            iy = y - K // 2 + ky
            for kx in tl.static_range(K):
                ix = x - K // 2 + kx
                v = pvalid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                acc = acc | (tl.load(m0_ptr + (img * H + iy) * W + ix, mask=v, other=0) != 0).to(tl.int32)
        m = pvalid & (acc != 0)
    any_m = tl.max(m.to(tl.int32), axis=0) > 0
    if BORDERED:
        # the bordered copy (one channel block: C <= BC): this block's pixels are rewritten when any is
        # sent now or was sent when the block was last written (its dirty flag), so that every pixel
        # outside the mask reads 0 without a pass over the whole frame
        rewrite = any_m | (tl.load(dirty_ptr + pid) != 0)
        tl.store(dirty_ptr + pid, any_m.to(tl.uint8))
    if any_m:
        if BORDERED:
            boffs, bmask = _bordered_offsets(pid, P, H, W, Hb, Wb, BORDER, CP, BP, BC)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            m2 = m[:, None] & (cols < C)[None, :]
            offs = prow[:, None] * C + cols[None, :]
            r = tl.load(r_ptr + offs, mask=m2, other=0.0)
            xoffs = _frame_offsets(prow, cols, H * W, sN, sP, sC)
            sent = (tl.load(x_ptr + xoffs, mask=m2, other=0.0).to(tl.float32) - r).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + offs, sent, mask=m2)
            tl.store(r_ptr + offs, r + sent.to(tl.float32), mask=m2)
            if BORDERED:
                tl.store(bd_ptr + boffs, tl.where(m2, sent, 0.0).to(bd_ptr.dtype.element_ty), mask=bmask)
    elif BORDERED:
        if rewrite:
            boffs, bmask = _bordered_offsets(pid, P, H, W, Hb, Wb, BORDER, CP, BP, BC)
            tl.store(bd_ptr + boffs, tl.zeros([BP, BC], dtype=bd_ptr.dtype.element_ty), mask=bmask)
    tl.store(fm_ptr + prow, m.to(tl.uint8), mask=pvalid)


# Pixels per program of the small-blob gate's erosion (uint8 masks)
ERODE_PIXELS = 1024
# Pixels per program of the input layer. The generic 64 made a 1080p RGB frame 32K programs of
# 256 elements each; a switch only so that benchmarks can compare (same results).
SPARSIFY_MAX_PIXELS = 1024
# Warps of a sparsify program of >= 4096 elements. At 4 warps its [1024 x 4] offset and value tiles
# need 254 registers per thread and 8 bytes of spills, and 556 bytes with the bordered copy; 8 warps:
# 180 and 203 registers, no spills (ptxas -v for sm_90a, RGB frames, 1024 pixels per program).
SPARSIFY_WARPS = 8


# Border (pixels) of the bordered copy the input layer writes for few-channel frames: enough for
# convs up to 9 x 9 with 'same' padding (the R50 stem: 7 x 7, padding 3).
BORDER = 4
# Channels per pixel of the bordered copy: an RGB pixel padded to 8 bytes (fp16), so that a window
# row of 2 pixels starts on a 16-byte boundary.
BORDERED_CP = 4


def bordered_fits(n: int, c: int, h: int, w: int) -> bool:
    """Whether sparsify can keep a bordered copy of (n, c, h, w) frames (few channels, int32 indices)."""
    return c <= BORDERED_CP and n * (h + 2 * BORDER) * triton.cdiv(w + 2 * BORDER, 16) * 16 * BORDERED_CP < 2 ** 31


def bordered_like(n: int, c: int, h: int, w: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, int]:
    """A zeroed bordered copy for sparsify (see deltacnn.tensor.Bordered) and its zeroed per-program
    dirty flags; returns (values, flags, border)."""
    if not bordered_fits(n, c, h, w):
        raise ValueError(f"no bordered copy of {(n, c, h, w)} frames: at most {BORDERED_CP} channels and "
                         "2^31 elements")
    wb = triton.cdiv(w + 2 * BORDER, 16) * 16
    vals = torch.zeros(n, h + 2 * BORDER, wb, BORDERED_CP, dtype=dtype, device=device)
    flags = torch.zeros(triton.cdiv(n * h * w, _sparsify_pixels(c)), dtype=torch.uint8, device=device)
    return vals, flags, BORDER


def _sparsify_pixels(c: int) -> int:
    bp, bc, _ = _blocks(c)
    return max(bp, min(SPARSIFY_MAX_PIXELS, 4096 // bc))  # frames have few channels: many pixels per program


def sparsify(x: Tensor, ref: Tensor, tau: float, dilation_k: int = 1, score: str = "max", *,
             out_dtype: torch.dtype | None = None,
             bordered: tuple[Tensor, Tensor, int] | None = None, open_k: int = 1) -> tuple[Tensor, Tensor]:
    """Input layer: d = x - ref; mask = score_c(d) > tau, dilated by a k x k window ('same', k // 2);
    where mask: delta = d rounded to out_dtype (default x.dtype) and ref += delta (ref float32, in place).
    Returns (delta, mask). x is channels_last or NCHW-contiguous (read in place, any float dtype);
    one launch (two with dilation).

    `open_k` (odd, > 1; not with dilation): the mask is instead opened by an open_k x open_k square (the
    small-blob gate, deltacnn.gating.opening: erosion, then dilation): three launches.

    `bordered`: (values, flags, border) from `bordered_like` (kept between frames, never shared):
    also leaves the zero-filled delta in values (deltacnn.tensor.Bordered), rewriting only the
    program blocks that are sent now or were last time (the flags)."""
    n, c, h, w = x.shape
    sN, sC, sH, sW = x.stride()
    if sH != w * sW and h > 1:  # pixels not evenly spaced within an image: copy once
        x = x.contiguous(memory_format=torch.channels_last)
        sN, sC, sH, sW = x.stride()
    check_state(ref, x.shape, "ref")
    if score not in ("max", "l2"):
        raise ValueError(f"truncation score must be 'max' or 'l2', got {score!r}")
    sc = SCORE_CODES[score]
    odt = out_dtype or x.dtype
    out = new_cl(n, c, h, w, odt, x.device)
    fm = torch.empty(n, 1, h, w, dtype=torch.bool, device=x.device)
    P = n * h * w
    _, bc, _ = _blocks(c)
    bp = _sparsify_pixels(c)
    grid = (triton.cdiv(P, bp),)
    if bordered is not None:
        bvals, flags, border = bordered
        wb = triton.cdiv(w + 2 * border, 16) * 16
        if (bvals.shape != (n, h + 2 * border, wb, BORDERED_CP) or bvals.dtype != odt or bvals.device != x.device
                or not bvals.is_contiguous() or flags.shape != (grid[0],) or flags.dtype != torch.uint8):
            raise ValueError(f"bordered copy must come from bordered_like({n}, {c}, {h}, {w}, {odt}, ...)")
        if c > bc or P + bp >= 2 ** 31 or bvals.numel() >= 2 ** 31:
            raise ValueError(f"a bordered copy needs all {c} channels in one block and < 2^31 elements")
    else:
        bvals, flags, border, wb = out, fm, 0, 0
    k = int(dilation_k)
    if open_k > 1 and (k > 1 or open_k % 2 == 0):
        raise ValueError(f"open_k must be odd and used without dilation, got open_k={open_k}, dilation_k={k}")
    if open_k > 1 or k > 1:
        m0 = torch.empty(n, 1, h, w, dtype=torch.uint8, device=x.device)
        _score_kernel[grid](x, ref, m0, P, c, h * w, sN, sW, sC, float(tau), SCORE=sc, BP=bp, BC=bc,
                            **launch_opts(x.device))
        if open_k > 1:  # erode here; the send pass dilates by the same square
            eroded = torch.empty_like(m0)
            _erode_kernel[(triton.cdiv(P, ERODE_PIXELS),)](m0, eroded, P, h, w, K=open_k, BP=ERODE_PIXELS,
                                                           **launch_opts(x.device))
            m0, k = eroded, open_k
    else:
        m0 = fm.view(torch.uint8)
    _sparsify_kernel[grid](x, ref, m0, out, fm.view(torch.uint8), bvals, flags.view(torch.uint8), P, c, h, w,
                           sN, sW, sC, float(tau), h + 2 * border, wb, K=max(k, 1), SCORE=sc, BP=bp, BC=bc,
                           BORDERED=bordered is not None, BORDER=border, CP=BORDERED_CP,
                           num_warps=SPARSIFY_WARPS if bp * bc >= 4096 else 4, **launch_opts(x.device))
    return out, fm
