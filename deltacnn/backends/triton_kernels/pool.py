"""Max pooling on deltas: re-evaluate max over the accumulated input only at candidate output pixels.

Candidates are output pixels whose window touches an updated input (dilate_mask); A has already
received the deltas (accumulate_). One program owns BP output pixels and all channels (the
truncation score is a reduction over channels); programs whose pixels are all non-candidates
only clear their part of the emit mask. No host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (SCORE_CODES, check_state, emit_truncated, gdc_start, launch_opts, mask_u8, need_cl, new_cl,
                      npow2)


@triton.jit
def _maxpool_kernel(a_ptr, cm_ptr, e_ptr, out_ptr, fm_ptr, P, H, W, Ho, Wo, tau, C: tl.constexpr,
                    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PT: tl.constexpr,
                    PL: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, SCORE: tl.constexpr,
                    BP: tl.constexpr, BC: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    prow = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    pvalid = prow < P
    cm = (tl.load(cm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
    if tl.max(cm.to(tl.int32), axis=0) > 0:
        n = prow // (Ho * Wo)
        r = prow - n * (Ho * Wo)
        oy = r // Wo
        ox = r - oy * Wo
        cols = tl.arange(0, BC)
        cvalid = cols < C
        best = tl.full([BP, BC], float("-inf"), tl.float32)
        for ky in tl.static_range(KH):
            for kx in tl.static_range(KW):
                iy = oy * SH - PT + ky * DH
                ix = ox * SW - PL + kx * DW
                ok = cm & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                src = (n * H + iy) * W + ix
                v = tl.load(a_ptr + src[:, None] * C + cols[None, :], mask=ok[:, None] & cvalid[None, :],
                            other=float("-inf"))
                best = tl.maximum(best, v)
        m2 = cm[:, None] & cvalid[None, :]
        offs = prow[:, None] * C + cols[None, :]
        e = tl.load(e_ptr + offs, mask=m2, other=0.0)
        emit_truncated(best - e, e, cm, m2, cvalid, offs, prow, pvalid, out_ptr, e_ptr, fm_ptr, tau, SCORE, False)
    else:
        tl.store(fm_ptr + prow, tl.zeros([BP], dtype=tl.uint8), mask=pvalid)


def maxpool_update(acc: Tensor, cand: Tensor, emitted: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int, int, int], dilation: tuple[int, int], tau: float = 0.0,
                   score: str = "max", *, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """o = maxpool(A) - E at candidate pixels `cand` (N, 1, Ho, Wo); emit where score_c(o) > tau; E += o there.

    acc: float32 (N, C, H, W) channels_last, already holding this frame's deltas; emitted: float32
    (N, C, Ho, Wo). Returns (o, emit mask), o in out_dtype (default float32); E records o as rounded.
    """
    need_cl(acc, "acc")
    n, c, h, w = acc.shape
    ho, wo = cand.shape[2:]
    check_state(emitted, (n, c, ho, wo), "emitted")
    cm = mask_u8(cand, (n, 1, ho, wo), "cand")
    if score not in ("max", "l2"):
        raise ValueError(f"truncation score must be 'max' or 'l2', got {score!r}")
    out = new_cl(n, c, ho, wo, out_dtype or torch.float32, acc.device)
    fm = torch.empty(n, 1, ho, wo, dtype=torch.bool, device=acc.device)
    bc = npow2(c)
    bp = max(4, min(64, 4096 // bc))
    P = n * ho * wo
    _maxpool_kernel[(triton.cdiv(P, bp),)](acc, cm, emitted, out, fm.view(torch.uint8), P, h, w, ho, wo, float(tau),
                                          C=c, KH=kernel[0], KW=kernel[1], SH=stride[0], SW=stride[1], PT=padding[0],
                                          PL=padding[2], DH=dilation[0], DW=dilation[1],
                                          SCORE=SCORE_CODES[score], BP=bp, BC=bc, **launch_opts(acc.device))
    return out, fm
