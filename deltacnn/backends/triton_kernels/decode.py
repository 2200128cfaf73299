"""YOLOv8's box decode of the head's dense maps O, with the delta frame's O += d folded in: one launch per level
instead of an accumulate per map and ~15 PyTorch launches (cat, softmax, expectation, box arithmetic, sigmoid,
cat) that decode_boxes runs on a GPU (~70 us a YOLOv8n delta frame on the H200).

Per anchor (a pixel of a level's maps): each box side's distance is the expectation of a softmax over `reg`
bins weighted by the DFL weights, measured from the cell centre; (cx, cy, w, h) in input pixels; class
probabilities by a sigmoid. float32 arithmetic, stored in the output's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import gdc_start, launch_opts, mask_u8, pixel_stride


@triton.jit
def _side(o_ptr, d_ptr, m, rows_o, rows_d, col0, bins, dfl, pvalid, HAS_D: tl.constexpr, REG: tl.constexpr):
    """One box side of BA anchors: O += d at the updated anchors (stored back), then the DFL expectation."""
    cols = col0 + bins
    o = tl.load(o_ptr + rows_o[:, None] + cols[None, :], mask=pvalid[:, None], other=0.0)
    if HAS_D:
        m2 = m[:, None] & (bins < REG)[None, :]
        o = o + tl.load(d_ptr + rows_d[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(o_ptr + rows_o[:, None] + cols[None, :], o, mask=m2)
    z = o - tl.max(o, axis=1)[:, None]
    e = tl.exp(z)
    return tl.sum(e * dfl[None, :], axis=1) / tl.sum(e, axis=1)


@triton.jit
def _decode_kernel(bo_ptr, co_ptr, bd_ptr, bm_ptr, cd_ptr, cm_ptr, out_ptr,
                   HW, W, sBN, sBP, sCN, sCP, sBDN, sBDP, sCDN, sCDP, A, a0, stride, dfl_ptr, NC: tl.constexpr,
                   HAS_D: tl.constexpr, REG: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BA + tl.arange(0, BA)  # anchors of this level, y * W + x
    pvalid = p < HW
    p64 = p.to(tl.int64)
    if HAS_D:
        bm = (tl.load(bm_ptr + n * HW + p64, mask=pvalid, other=0) != 0) & pvalid
        cm = (tl.load(cm_ptr + n * HW + p64, mask=pvalid, other=0) != 0) & pvalid
    else:
        bm = pvalid
        cm = pvalid
    bins = tl.arange(0, REG)
    dfl = tl.load(dfl_ptr + bins)
    rb, rbd = n * sBN + p64 * sBP, n * sBDN + p64 * sBDP
    d0 = _side(bo_ptr, bd_ptr, bm, rb, rbd, 0, bins, dfl, pvalid, HAS_D, REG)
    d1 = _side(bo_ptr, bd_ptr, bm, rb, rbd, REG, bins, dfl, pvalid, HAS_D, REG)
    d2 = _side(bo_ptr, bd_ptr, bm, rb, rbd, 2 * REG, bins, dfl, pvalid, HAS_D, REG)
    d3 = _side(bo_ptr, bd_ptr, bm, rb, rbd, 3 * REG, bins, dfl, pvalid, HAS_D, REG)
    ax = (p % W).to(tl.float32) + 0.5
    ay = (p // W).to(tl.float32) + 0.5
    x1, y1, x2, y2 = ax - d0, ay - d1, ax + d2, ay + d3
    obase = out_ptr + n * (4 + NC) * A + a0 + p64
    odt = out_ptr.dtype.element_ty
    tl.store(obase, ((x1 + x2) / 2 * stride).to(odt), mask=pvalid)
    tl.store(obase + A, ((y1 + y2) / 2 * stride).to(odt), mask=pvalid)
    tl.store(obase + 2 * A, ((x2 - x1) * stride).to(odt), mask=pvalid)
    tl.store(obase + 3 * A, ((y2 - y1) * stride).to(odt), mask=pvalid)
    rc, rcd = n * sCN + p64 * sCP, n * sCDN + p64 * sCDP
    for c0 in range(0, NC, BC):
        cols = c0 + tl.arange(0, BC)
        cv = (cols < NC)[None, :]
        o = tl.load(co_ptr + rc[:, None] + cols[None, :], mask=pvalid[:, None] & cv, other=0.0)
        if HAS_D:
            m2 = cm[:, None] & cv
            o = o + tl.load(cd_ptr + rcd[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(co_ptr + rc[:, None] + cols[None, :], o, mask=m2)
        prob = 1.0 / (1.0 + tl.exp(-o))
        tl.store(obase[:, None] + (4 + cols[None, :]).to(tl.int64) * A, prob.to(odt), mask=pvalid[:, None] & cv)


# anchors per program
DECODE_ANCHORS = 64


def yolo_decode_(boxes: list[Tensor], classes: list[Tensor], dfl: Tensor, nc: int, out: Tensor,
                 strides: tuple[int, ...], deltas: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None) -> Tensor:
    """Decode every anchor of the levels' maps into `out` (N, 4 + nc, A), levels in order, anchors y * W + x.

    boxes[l] (N, 4 reg, H, W) and classes[l] (N, >= nc, H, W): float32 channels_last or channel slices of such
    maps (the dense state O of the head's maps; a joined head map's two channel ranges). `deltas[l]`:
    (box delta, its mask, class delta, its mask) of this frame, added into boxes[l] and classes[l] at their
    updated pixels first (O += d, as accumulate does), in the same launch. One launch per level."""
    reg = dfl.numel()
    if reg & (reg - 1):
        raise ValueError(f"the DFL bins must be a power of two, got {reg}")
    n = out.shape[0]
    total = sum(int(b.shape[2] * b.shape[3]) for b in boxes)
    if tuple(out.shape) != (n, 4 + nc, total) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({n}, {4 + nc}, {total}) tensor, got {tuple(out.shape)}")
    w_dfl = dfl.reshape(-1).to(device=out.device, dtype=torch.float32).contiguous()
    a0 = 0
    for lvl, (bo, co) in enumerate(zip(boxes, classes)):
        _, cb, h, w = bo.shape
        if bo.dtype != torch.float32 or co.dtype != torch.float32 or cb != 4 * reg or co.shape[1] < nc \
                or tuple(co.shape[2:]) != (h, w) or bo.shape[0] != n or co.shape[0] != n:
            raise ValueError(f"level {lvl}: float32 box ({n}, {4 * reg}, H, W) and class ({n}, >= {nc}, H, W) maps "
                             f"needed, got {tuple(bo.shape)} {bo.dtype} and {tuple(co.shape)} {co.dtype}")
        sbp, scp = pixel_stride(bo, "boxes"), pixel_stride(co, "classes")
        if deltas is not None:
            bd, bmask, cd, cmask = deltas[lvl]
            bm, cm = mask_u8(bmask, (n, 1, h, w), "box mask"), mask_u8(cmask, (n, 1, h, w), "class mask")
            if tuple(bd.shape) != tuple(bo.shape) or tuple(cd.shape[:1] + cd.shape[2:]) != (n, h, w) \
                    or cd.shape[1] < nc:
                raise ValueError(f"level {lvl}: deltas must have their maps' shapes")
            sbdp, scdp = pixel_stride(bd, "box delta"), pixel_stride(cd, "class delta")
            dargs = (bd, bm, cd, cm)
            dstr = (bd.stride(0), sbdp, cd.stride(0), scdp)
        else:
            dargs, dstr = (bo, bo, co, co), (0, 0, 0, 0)
        grid = (triton.cdiv(h * w, DECODE_ANCHORS), n)
        _decode_kernel[grid](bo, co, *dargs, out, h * w, w, bo.stride(0), sbp, co.stride(0), scp, *dstr,
                             total, a0, float(strides[lvl]), w_dfl, nc, HAS_D=deltas is not None, REG=reg,
                             BA=DECODE_ANCHORS, BC=triton.next_power_of_2(min(nc, 128)), **launch_opts(out.device))
        a0 += h * w
    return out
