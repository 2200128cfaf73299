"""Mask kernels: receptive-field dilation and the compacted list of active output tiles."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import gdc_start, launch_opts, mask_u8, npow2


@triton.jit
def _dilate_kernel(m_ptr, o_ptr, H, W, Ho, Wo, n_bw,
                   KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                   DH: tl.constexpr, DW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                   BH: tl.constexpr, BW: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    pid = tl.program_id(0)
    n = tl.program_id(1)
    by = pid // n_bw
    bx = pid % n_bw
    oy = by * BH + tl.arange(0, BH)
    ox = bx * BW + tl.arange(0, BW)
    ovalid = (oy < Ho)[:, None] & (ox < Wo)[None, :]
    base = m_ptr + n.to(tl.int64) * H * W
    acc = tl.zeros([BH, BW], dtype=tl.int32)
    for ky in tl.static_range(KH):
        iy = oy * SH - PT + ky * DH
        vy = (iy >= 0) & (iy < H)
        for kx in tl.static_range(KW):
            ix = ox * SW - PL + kx * DW
            vx = (ix >= 0) & (ix < W)
            v = vy[:, None] & vx[None, :] & ovalid
            m = tl.load(base + iy[:, None] * W + ix[None, :], mask=v, other=0)
            acc = acc | (m != 0).to(tl.int32)
    tl.store(o_ptr + n.to(tl.int64) * Ho * Wo + oy[:, None] * Wo + ox[None, :], acc.to(tl.uint8), mask=ovalid)


def out_size(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    """PyTorch's floor-mode output size for (top, bottom, left, right) padding."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    t, b, l, r = padding
    return (h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + l + r - dw * (kw - 1) - 1) // sw + 1


def dilate_mask(mask: Tensor, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
                padding: tuple[int, int, int, int] = (0, 0, 0, 0), dilation: tuple[int, int] = (1, 1),
                out_hw: tuple[int, int] | None = None, out: Tensor | None = None) -> Tensor:
    """Output pixels (N, 1, Ho, Wo) bool whose receptive field touches an active input pixel.

    `padding` is (top, bottom, left, right); out-of-bounds taps are inactive. One launch, no sync.
    """
    n, _, h, w = mask.shape
    kh, kw = kernel
    if out_hw is None:
        out_hw = out_size(h, w, kernel, stride, padding, dilation)
    ho, wo = out_hw
    m = mask_u8(mask, (n, 1, h, w), "mask")
    if out is None:
        out = torch.empty(n, 1, ho, wo, dtype=torch.bool, device=mask.device)
    BH, BW = 8, min(64, npow2(wo))
    n_bw = triton.cdiv(wo, BW)
    grid = (triton.cdiv(ho, BH) * n_bw, n)
    _dilate_kernel[grid](m, out.view(torch.uint8), h, w, ho, wo, n_bw, KH=kh, KW=kw, SH=stride[0], SW=stride[1],
                         DH=dilation[0], DW=dilation[1], PT=padding[0], PL=padding[2], BH=BH, BW=BW,
                         **launch_opts(mask.device))
    return out


@triton.jit
def _tiles_kernel(m1_ptr, m2_ptr, fm_ptr, z_ptr, list_ptr, count_ptr, ctr_ptr, xm_ptr, om_ptr,
                  H, W, Ho, Wo, n_tw, tiles_per_img, ZC: tl.constexpr,
                  HAS_M2: tl.constexpr, FM_MODE: tl.constexpr, ZERO: tl.constexpr, NCTR: tl.constexpr,
                  NCTR_P2: tl.constexpr,
                  DIL: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  DH: tl.constexpr, DW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                  TH: tl.constexpr, TW: tl.constexpr, BZC: tl.constexpr, PIX: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    t = tl.program_id(0)
    n = t // tiles_per_img
    r = t % tiles_per_img
    ty = r // n_tw
    tx = r % n_tw
    p = tl.arange(0, TH * TW)
    oy = ty * TH + p // TW
    ox = tx * TW + p % TW
    valid = (oy < Ho) & (ox < Wo)
    prow = (n * Ho + oy).to(tl.int64) * Wo + ox
    if DIL:  # out mask = receptive-field dilation of the input mask, computed here and written out
        acc = tl.zeros([TH * TW], dtype=tl.int32)
        for ky in tl.static_range(KH):
            iy = oy * SH - PT + ky * DH
            for kx in tl.static_range(KW):
                ix = ox * SW - PL + kx * DW
                v = valid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                acc = acc | (tl.load(xm_ptr + (n * H + iy).to(tl.int64) * W + ix, mask=v, other=0) != 0).to(tl.int32)
        m = acc != 0
        tl.store(om_ptr + prow, m.to(tl.uint8), mask=valid)
    else:
        m = tl.load(m1_ptr + prow, mask=valid, other=0) != 0
    if HAS_M2:
        m = m | (tl.load(m2_ptr + prow, mask=valid, other=0) != 0)
    if FM_MODE == 1:  # write the union mask
        tl.store(fm_ptr + prow, m.to(tl.uint8), mask=valid)
    if FM_MODE == 2:  # clear the final mask (a later kernel sets emitted pixels)
        tl.store(fm_ptr + prow, tl.zeros([TH * TW], dtype=tl.uint8), mask=valid)
    mi = (m & valid).to(tl.int32)
    k = tl.sum(mi, axis=0)
    if k > 0:
        if PIX:  # compact the tile's candidate pixels (int32 pixel rows) into the list
            slot = tl.atomic_add(count_ptr, k)
            pos = slot + tl.cumsum(mi, axis=0) - 1
            tl.store(list_ptr + pos, prow.to(tl.int32), mask=mi != 0)
        else:
            slot = tl.atomic_add(count_ptr, 1)
            tl.store(list_ptr + slot, t)
        if ZERO:  # zero the candidate rows of an fp32 split-K accumulation target
            for c0 in range(0, ZC, BZC):
                c = c0 + tl.arange(0, BZC)
                tl.store(z_ptr + prow[:, None] * ZC + c[None, :], tl.zeros([TH * TW, BZC], dtype=tl.float32),
                         mask=(m & valid)[:, None] & (c < ZC)[None, :])
        if NCTR > 0:  # arrival counters of the split-K fixup, one per (work unit, channel block)
            j = tl.arange(0, NCTR_P2)
            if PIX:  # work unit = TH*TW consecutive list entries: this tile zeroes the unit starting in
                # its slots [slot, slot + k) (k <= TH*TW, so at most one starts there)
                u = (slot + TH * TW - 1) // (TH * TW)
                tl.store(ctr_ptr + u.to(tl.int64) * NCTR + j, tl.zeros([NCTR_P2], dtype=tl.int32),
                         mask=(j < NCTR) & (u * (TH * TW) < slot + k))
            else:
                tl.store(ctr_ptr + t.to(tl.int64) * NCTR + j, tl.zeros([NCTR_P2], dtype=tl.int32), mask=j < NCTR)


def active_tiles(m1: Tensor | None, m2: Tensor | None = None, th: int = 8, tw: int = 8, *,
                 final_mask: Tensor | None = None, fm_mode: int = 0, zero: Tensor | None = None, n_ctr: int = 0,
                 dilate_from: tuple | None = None, count: Tensor | None = None, pixels: bool = False
                 ) -> tuple[Tensor, Tensor, tuple[int, int, int], Tensor | None, Tensor]:
    """Compact list of th x tw output tiles holding any pixel of m1 | m2, with a device-side count.

    `pixels`: list the pixels of m1 | m2 instead (int32 rows n*Ho*Wo + y*Wo + x, grouped by tile,
    the count is then a pixel count), so that a conv's work units are th*tw candidate pixels wherever
    they lie rather than whole tiles; the n_ctr counters are then per unit of th*tw list entries.

    Returns (tile_ids int32 of capacity n_tiles, count int32[2] (the tile count, then the arrival
    counter the conv kernels use to reset it), (n_tiles, n_tw, tiles_per_img),
    counters, m1). fm_mode 1 writes m1 | m2 into `final_mask`, 2 clears it. `zero` (fp32
    channels_last) gets zeros at every pixel of m1 | m2 in active tiles. n_ctr > 0 allocates n_ctr
    int32 counters per tile, zeroed for active tiles. `dilate_from=(x_mask, kernel, stride, pad4,
    dilation, out_hw)` computes m1 as the receptive-field dilation of x_mask in the same launch.
    List order is not deterministic; the set is. `count`: an int32 buffer whose first element is 0,
    to use instead of a freshly zeroed one (the conv kernels reset theirs after use).
    """
    if dilate_from is not None:
        xmask, kernel, stride, pad4, dil, (ho, wo) = dilate_from
        n, _, h, w = xmask.shape
        xmu = mask_u8(xmask, (n, 1, h, w), "x_mask")
        m1 = torch.empty(n, 1, ho, wo, dtype=torch.bool, device=xmask.device)
    else:
        n, _, ho, wo = m1.shape
        h = w = 0
        kernel, stride, pad4, dil = (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)
    n_th, n_tw = triton.cdiv(ho, th), triton.cdiv(wo, tw)
    tiles_per_img = n_th * n_tw
    n_tiles = n * tiles_per_img
    dev = m1.device
    if pixels and n * ho * wo >= 2 ** 31:
        raise ValueError(f"pixel lists need fewer than 2**31 output pixels, got {n * ho * wo}")
    ids = torch.empty(n * ho * wo if pixels else n_tiles, dtype=torch.int32, device=dev)
    if count is None:
        count = torch.zeros(2, dtype=torch.int32, device=dev)
    u1 = m1.view(torch.uint8) if dilate_from is not None else mask_u8(m1, (n, 1, ho, wo), "out_mask")
    u2 = mask_u8(m2, (n, 1, ho, wo), "residual_mask") if m2 is not None else u1
    fm = final_mask.view(torch.uint8) if final_mask is not None else u1
    zc = zero.shape[1] if zero is not None else 1
    z = zero if zero is not None else ids
    ctr = torch.empty(n_tiles * n_ctr, dtype=torch.int32, device=dev) if n_ctr else None
    _tiles_kernel[(n_tiles,)](u1, u2, fm, z, ids, count, ctr if ctr is not None else ids,
                              xmu if dilate_from is not None else u1, u1, h, w, ho, wo, n_tw, tiles_per_img, zc,
                              HAS_M2=m2 is not None, FM_MODE=fm_mode, ZERO=zero is not None, NCTR=n_ctr, NCTR_P2=npow2(n_ctr),
                              DIL=dilate_from is not None, KH=kernel[0], KW=kernel[1], SH=stride[0], SW=stride[1],
                              DH=dil[0], DW=dil[1], PT=pad4[0], PL=pad4[2], TH=th, TW=tw,
                              BZC=min(64, npow2(zc)), PIX=pixels, num_warps=2, **launch_opts(dev))
    return ids, count, (n_tiles, n_tw, tiles_per_img), ctr, m1
