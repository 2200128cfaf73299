"""Sparse convolution on delta tensors: gathered implicit GEMM over compacted active output tiles.

Work decomposition (no host sync): `active_tiles` scans the TH x TW output tiles and compacts
their candidate pixels (PIXEL_LISTS; else the tiles holding one) into a list with a device-side
count; a persistent grid (sized from the worst case and the SM count) walks work items (unit of
TH*TW listed pixels or one tile, group, output-channel block, K split) of that list. Each item
gathers, per tap, the input rows of its pixels (zeros where the input mask is 0 or the tap is out
of bounds), multiplies them on tensor cores (tl.dot, float32 accumulation) and runs the fused
epilogue (residual, nonlinear delta update) on them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...tensor import Bordered
from ._common import (INTERPRET, Act, as_act, check_state, finish_tile, gdc_start, kernel_residency, launch_opts,
                      mask_u8, need_cl, new_cl, npow2, num_sms, pixel_stride)
from .masks import active_tiles, out_size
from .pointwise import sparse_nonlinear


@triton.jit
def _conv_gemm_kernel(x_ptr, xm_ptr, w_ptr, out_ptr, om_ptr, res_ptr, rm_ptr, a_ptr, e_ptr, fm_ptr,
                      ids_ptr, count_ptr, ws_ptr, ctr_ptr,
                      H, W, Ho, Wo, XS, RS, Cout, Cg, Og, n_tw, tiles_per_img, n_direct,
                      slope, min_val, max_val, alpha, tau,
                      KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                      DH: tl.constexpr, DW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                      TH: tl.constexpr, TW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      NB: tl.constexpr, G: tl.constexpr, SPLIT_K: tl.constexpr,
                      HAS_RES: tl.constexpr, HAS_ACT: tl.constexpr, FN: tl.constexpr, SCORE: tl.constexpr,
                      WRITE_FM: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr, IS_F32: tl.constexpr,
                      NKC: tl.constexpr, N_IT: tl.constexpr, IT_PER: tl.constexpr, UPCAST: tl.constexpr,
                      FIXUP: tl.constexpr, OR_FM: tl.constexpr, PACK_K: tl.constexpr, SELF_RESET: tl.constexpr,
                      LOADS_FIRST: tl.constexpr, XM_IS_OM: tl.constexpr, WINDOW: tl.constexpr,
                      BORD: tl.constexpr, SHIFT: tl.constexpr, CPX: tl.constexpr, PIX: tl.constexpr,
                      DIRECT: tl.constexpr, DIL: tl.constexpr, FM_MODE: tl.constexpr, GDC: tl.constexpr):
    gdc_start(GDC)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    PER_TILE: tl.constexpr = G * NB * SPLIT_K
    P: tl.constexpr = TH * TW
    if DIRECT:  # every output tile is a work unit (no list); see direct_tiles
        total = n_direct * PER_TILE
    elif PIX:  # the list holds candidate pixels: a work unit is P consecutive entries
        cnt = tl.load(count_ptr)
        total = ((cnt + P - 1) // P) * PER_TILE
    else:
        total = tl.load(count_ptr) * PER_TILE
    p = tl.arange(0, P)
    kk = tl.arange(0, BK)
    w = pid
    while w < total:
        ti = w // PER_TILE
        rem = w % PER_TILE
        g = rem // (NB * SPLIT_K)
        rem2 = rem % (NB * SPLIT_K)
        nb = rem2 // SPLIT_K
        ks = rem2 % SPLIT_K
        if PIX:
            q = ti * P + p
            pvalid = q < cnt
            pix = tl.load(ids_ptr + q, mask=pvalid, other=0)
            n = pix // (Ho * Wo)
            r = pix % (Ho * Wo)
            oy = r // Wo
            ox = r % Wo
            prow = pix.to(tl.int64)
            unit = ti
        else:
            if DIRECT:
                t = ti
            else:
                t = tl.load(ids_ptr + ti)
            n = t // tiles_per_img
            r = t % tiles_per_img
            oy = (r // n_tw) * TH + p // TW
            ox = (r % n_tw) * TW + p % TW
            pvalid = (oy < Ho) & (ox < Wo)
            prow = (n * Ho + oy).to(tl.int64) * Wo + ox
            unit = t
        if DIL:  # the candidate mask is the receptive-field dilation of x's mask (see direct_tiles)
            hit = tl.zeros([P], dtype=tl.int32)
            for dky in tl.static_range(KH):  # (not ky, kx: the K loop's tensors of those names would be loop-carried)
                dy = oy * SH - PT + dky * DH
                for dkx in tl.static_range(KW):
                    dx = ox * SW - PL + dkx * DW
                    dv = pvalid & (dy >= 0) & (dy < H) & (dx >= 0) & (dx < W)
                    drow = (n * H + dy).to(tl.int64) * W + dx
                    hit = hit | (tl.load(xm_ptr + drow, mask=dv, other=0) != 0).to(tl.int32)
            om = (hit != 0) & pvalid
            if rem == 0:  # the tile's first program writes it out
                tl.store(om_ptr + prow, om.to(tl.uint8), mask=pvalid)
        else:
            om = (tl.load(om_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
        rm = om
        if HAS_RES and (LOADS_FIRST or DIRECT):  # residual mask: fetched now, used after the main loop
            rm = (tl.load(rm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
        n_cand = 1
        if DIRECT:  # the masks a tile list launch would have written, then nothing more for an empty tile
            tcand = om | rm
            if FM_MODE == 1:
                if rem == 0:
                    tl.store(fm_ptr + prow, tcand.to(tl.uint8), mask=pvalid)
            n_cand = tl.sum(tcand.to(tl.int32), axis=0)
            if FM_MODE == 2:  # the emit mask of a tile with work is written by its epilogue
                tl.store(fm_ptr + prow, tl.zeros([P], dtype=tl.uint8), mask=pvalid & (n_cand == 0))
        if n_cand > 0:
            cols_g = nb * BN + tl.arange(0, BN)
            cvalid = cols_g < Og
            acc = tl.zeros([TH * TW, BN], dtype=tl.float32)
            it0 = ks * IT_PER
            for j in range(0, IT_PER):
                it = it0 + j
                live = it < N_IT
                if WINDOW:
                    # x is a bordered copy (H, W its padded size; see Bordered): step `it` is kernel row
                    # `it`, and each pixel's K slice is BK consecutive elements of that row (BK / CPX
                    # pixels from SHIFT left of its first tap), zero outside the mask and the image, so
                    # it is loaded as aligned vectors with neither a mask load nor bounds checks
                    iy = oy * SH - PT + it * DH + BORD
                    jx = ox * SW - PL - SHIFT + BORD
                    base = ((n * H + iy).to(tl.int64) * W + jx) * CPX
                    a = tl.load(x_ptr + base[:, None] + kk[None, :], mask=(pvalid & live)[:, None], other=0.0)
                    b = tl.load(w_ptr + (it * BK + kk)[:, None] * Og + cols_g[None, :], mask=live & cvalid[None, :],
                                other=0.0)
                elif PACK_K:
                    # few input channels (the RGB stem): K = (tap, channel) flattened, so a BK step
                    # covers several taps instead of padding 3 channels to BK; gathered per element
                    k = it * BK + kk
                    kv = (k < KH * KW * Cg) & live
                    tap = k // Cg
                    ky = tap // KW
                    kx = tap % KW
                    iy = oy[:, None] * SH - PT + (ky * DH)[None, :]
                    ix = ox[:, None] * SW - PL + (kx * DW)[None, :]
                    inb = pvalid[:, None] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W) & kv[None, :]
                    if PIX:  # one image index per pixel
                        irow = (n[:, None] * H + iy).to(tl.int64) * W + ix
                    else:
                        irow = (n * H + iy).to(tl.int64) * W + ix
                    xm = (tl.load(xm_ptr + irow, mask=inb, other=0) != 0) & inb
                    a = tl.load(x_ptr + irow * XS + (g * Cg + k % Cg)[None, :], mask=xm, other=0.0)
                    b = tl.load(w_ptr + (g * (KH * KW * Cg) + k)[:, None] * Og + cols_g[None, :],
                                mask=kv[:, None] & cvalid[None, :], other=0.0)
                else:
                    tap = it // NKC
                    kc = it % NKC
                    ky = tap // KW
                    kx = tap % KW
                    iy = oy * SH - PT + ky * DH
                    ix = ox * SW - PL + kx * DW
                    inb = pvalid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W) & live
                    irow = (n * H + iy).to(tl.int64) * W + ix
                    if XM_IS_OM:  # 1x1, no padding, om computed from x's mask: x's mask at this tap
                        xm = om & live
                    else:
                        xm = (tl.load(xm_ptr + irow, mask=inb, other=0) != 0) & inb
                    k = kc * BK + kk
                    kv = (k < Cg) & live
                    a = tl.load(x_ptr + irow[:, None] * XS + (g * Cg + k)[None, :], mask=xm[:, None] & kv[None, :],
                                other=0.0)
                    b = tl.load(w_ptr + ((g * (KH * KW) + tap) * Cg + k)[:, None] * Og + cols_g[None, :],
                                mask=kv[:, None] & cvalid[None, :], other=0.0)
                if IS_F32:
                    acc = tl.dot(a, b, acc, input_precision=PREC)
                elif UPCAST:  # the CPU interpreter's dot mishandles bf16: exact fp32 products instead
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            cols = g * Og + cols_g
            if ATOMIC:
                cand = om
                if HAS_RES:
                    if not LOADS_FIRST:
                        rm = (tl.load(rm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
                    rv = tl.load(res_ptr + prow[:, None] * RS + cols[None, :],
                                 mask=(rm & (ks == 0))[:, None] & cvalid[None, :], other=0.0)
                    acc = acc + rv.to(tl.float32)
                    cand = cand | rm
                tl.atomic_add(out_ptr + prow[:, None] * Cout + cols[None, :], acc,
                              mask=cand[:, None] & cvalid[None, :], sem="relaxed")
            elif FIXUP:
                # split-K partials meet in a float32 workspace; the last split to arrive at this
                # (tile, channel block) reads the sum back and runs the epilogue (residual, act, cast)
                cand = om
                if HAS_RES:
                    if not LOADS_FIRST:
                        rm = (tl.load(rm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
                    cand = cand | rm
                wmask = cand[:, None] & cvalid[None, :]
                woffs = prow[:, None] * Cout + cols[None, :]
                tl.atomic_add(ws_ptr + woffs, acc, mask=wmask, sem="relaxed")
                tl.debug_barrier()
                old = tl.atomic_add(ctr_ptr + unit.to(tl.int64) * (G * NB) + g * NB + nb, 1, sem="acq_rel")
                if old == SPLIT_K - 1:
                    tot = tl.load(ws_ptr + woffs, mask=wmask, other=0.0, cache_modifier=".cg")
                    finish_tile(tot, prow, pvalid, om, rm, cols, cvalid, Cout, RS, out_ptr, res_ptr, rm_ptr, a_ptr,
                                e_ptr, fm_ptr, slope, min_val, max_val, alpha, tau, HAS_RES, HAS_ACT, FN, SCORE, WRITE_FM,
                                OR_FM, LOADS_FIRST)
            else:
                finish_tile(acc, prow, pvalid, om, rm, cols, cvalid, Cout, RS, out_ptr, res_ptr, rm_ptr, a_ptr, e_ptr,
                            fm_ptr, slope, min_val, max_val, alpha, tau, HAS_RES, HAS_ACT, FN, SCORE, WRITE_FM, OR_FM,
                            LOADS_FIRST)
        w += nprog
    if SELF_RESET:
        _reset_counter(count_ptr, nprog, total)


@triton.jit
def _reset_counter(count_ptr, nprog, total):
    """[tile count, arrivals] of a persistent counter, zeroed by the last to arrive of the programs that
    had work, so the next call needs no zeroing launch. Every program reads the same count (an earlier
    launch wrote it), so the min(programs, work items) programs whose id is below the item count arrive,
    each after its read; the others never touch the counter, and at zero work none does. A program that
    starts after the reset reads 0 and has no work either."""
    if tl.program_id(0) < total:
        done = tl.atomic_add(count_ptr + 1, 1, sem="acq_rel")
        if done == tl.minimum(nprog, total) - 1:
            tl.store(count_ptr, 0)
            tl.store(count_ptr + 1, 0)


@triton.jit
def _conv_dw_kernel(x_ptr, xm_ptr, w_ptr, out_ptr, om_ptr, res_ptr, rm_ptr, a_ptr, e_ptr, fm_ptr,
                    ids_ptr, count_ptr,
                    H, W, Ho, Wo, C, n_tw, tiles_per_img,
                    slope, min_val, max_val, alpha, tau,
                    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                    DH: tl.constexpr, DW: tl.constexpr, PT: tl.constexpr, PL: tl.constexpr,
                    TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr, NCB: tl.constexpr,
                    HAS_RES: tl.constexpr, HAS_ACT: tl.constexpr, FN: tl.constexpr, SCORE: tl.constexpr,
                    WRITE_FM: tl.constexpr, OR_FM: tl.constexpr, SELF_RESET: tl.constexpr, LOADS_FIRST: tl.constexpr,
                    GDC: tl.constexpr):
    gdc_start(GDC)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total = tl.load(count_ptr) * NCB
    p = tl.arange(0, TH * TW)
    w = pid
    while w < total:
        t = tl.load(ids_ptr + w // NCB)
        cb = w % NCB
        n = t // tiles_per_img
        r = t % tiles_per_img
        oy = (r // n_tw) * TH + p // TW
        ox = (r % n_tw) * TW + p % TW
        pvalid = (oy < Ho) & (ox < Wo)
        prow = (n * Ho + oy).to(tl.int64) * Wo + ox
        om = (tl.load(om_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
        rm = om
        if HAS_RES and LOADS_FIRST:  # residual mask: fetched now, used after the taps
            rm = (tl.load(rm_ptr + prow, mask=pvalid, other=0) != 0) & pvalid
        cols = cb * BC + tl.arange(0, BC)
        cvalid = cols < C
        acc = tl.zeros([TH * TW, BC], dtype=tl.float32)
        for ky in tl.static_range(KH):
            iy = oy * SH - PT + ky * DH
            for kx in tl.static_range(KW):
                ix = ox * SW - PL + kx * DW
                inb = pvalid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                irow = (n * H + iy).to(tl.int64) * W + ix
                xm = (tl.load(xm_ptr + irow, mask=inb, other=0) != 0) & inb
                xv = tl.load(x_ptr + irow[:, None] * C + cols[None, :], mask=xm[:, None] & cvalid[None, :], other=0.0)
                wv = tl.load(w_ptr + (ky * KW + kx) * C + cols, mask=cvalid, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        finish_tile(acc, prow, pvalid, om, rm, cols, cvalid, C, C, out_ptr, res_ptr, rm_ptr, a_ptr, e_ptr, fm_ptr,
                    slope, min_val, max_val, alpha, tau, HAS_RES, HAS_ACT, FN, SCORE, WRITE_FM, OR_FM, LOADS_FIRST)
        w += nprog
    if SELF_RESET:
        _reset_counter(count_ptr, nprog, total)


# At tau <= 0, fuse the nonlinear update into the conv even when its output channels are split
# over programs (one launch and no float32 round trip instead of conv + sparse_nonlinear). A switch
# only so that benchmarks can measure both; the results are the same.
SPLIT_CHANNEL_EMIT = True
# Output tile (rows, cols) of convs on large maps (N*Ho*Wo >= 32768) and software pipeline depth;
# module settings so that benchmarks/gpu_variants.py can compare launch shapes in one process.
BIG_MAP_TILE = (8, 8)
NUM_STAGES = 3
# Below this many input channels per group a K step of (tap, channel block) would be mostly
# padding (3 of 16 for an RGB stem), so K is flattened over (tap, channel) instead.
PACK_K_BELOW = 16
# K step and warps of packed-K convs. Packed K gathers each (tap, channel) element on its own, so
# the [pixels x BK] index tensors are large: at 4 warps and BK 64 the R50 stem needs 255 registers
# and spills 240 bytes per thread (ptxas -v for sm_90a); BK 32: 255 registers, no spill (8 warps:
# 140, but slower at batch 8). H100, ms per frame (BK 64 / BK 32 at 4 warps): b1 5% 1.02-1.03 /
# 1.02, b1 25% 2.26-2.28 / 2.25, b8 5% 4.98-5.00 / 4.93 (benchmarks/gpu_variants.py, run 13).
PACK_K_BK = 32
PACK_K_WARPS = 4
# Epilogue memory order (see finish_tile): the residual mask fetched before the main loop, and E
# loaded with A rather than behind the A store; a switch so that benchmarks can compare (same results).
EPILOGUE_LOADS_FIRST = True
# 1x1 convs take x's mask from the candidate mask instead of loading it in the K loop (see
# sparse_conv2d); a switch so that benchmarks can compare (same results).
REUSE_OUT_MASK = True
# Output tile, warps and output channels per program of convs that read window rows of a bordered
# copy (the RGB stem); None: the shape heuristic's. Settings so that benchmarks can compare.
WINDOW_TILE: tuple[int, int] | None = None
WINDOW_WARPS: int | None = None
WINDOW_BN: int | None = None
# Register cap per thread of the gathered-GEMM conv kernel on small maps (< 32768 output pixels; None:
# no cap). Uncapped, the kernel takes 230-255 registers, so 2 programs of 4 warps per SM; at 168, 3
# fit, at the cost of some spills (ptxas -v for sm_90a: 168 bytes for a 3x3 64->64 + ReLU, 64 for a
# 1x1 with residual). Small maps have few work items, each bound by the latency of its gathers, and
# the third program hides some of it; on large maps the spills cost more. H100, R50 1080p fp16, the
# cap on every conv (benchmarks/gpu_variants.py run 29): the convs on small maps -85 us per b1 25%
# frame, those on large maps +33 us; b8 5% 4.26 -> 4.41 ms.
SMALL_MAP_MAXNREG: int | None = 168
# Persistent programs per SM (ConvConfig.programs_per_sm's default). None: as many as the SM holds at
# once (one wave), from the compiled kernel's registers, warps and shared memory (`kernel_residency`,
# recorded at a launch signature's first launch, which runs FIRST_LAUNCH_PROGRAMS_PER_SM). Most conv
# variants use 230-245 registers per thread at 4 warps, so 2 programs of 128 threads fit an SM (168
# under the small-map cap: 3). Sessions 1-12 asked for 4: two waves, and an empty conv cost 3.0 us; one
# wave and no arrivals at zero work (_reset_counter): 1.25-1.6 us (H200, R50 1080p static, eager profile).
PROGRAMS_PER_SM: int | None = None
FIRST_LAUNCH_PROGRAMS_PER_SM = 4
# launch signature (kernel, device, dtypes, constexprs, launch options) -> programs resident per SM
_RESIDENT: dict = {}
# Work units of the gathered-GEMM conv: TH*TW candidate pixels taken in list order (the tile-list
# launch compacts each tile's candidate pixels) instead of whole TH x TW tiles. Scattered or
# truncated updates fill tiles poorly: on the R50 crowd clip at tau 0.02 the candidates are 6.2% of
# the multiply-adds but the tiles holding them 20.3% (17-22% occupancy on the 68x120 maps). A
# setting so that benchmarks can compare; the results are the same.
PIXEL_LISTS = True
# Output channels per program of a conv whose nonlinear update is fused with split channels
# (tau <= 0); None: all channels in one program where the heuristic would do that anyway. The
# epilogue holds four [pixels x BN] float32 tiles (sum, residual, A, E): at BN 256 they spill.
# H100, R50 1080p fp16, tau 0, ms per frame (None / 128 / 64): b1 5% 1.13 / 1.22 / 1.06,
# b1 25% 2.46 / 2.54 / 2.28, b8 5% 5.47 / 5.27 / 4.93 (benchmarks/gpu_variants.py).
SPLIT_EMIT_BN: int | None = 64
# Work items (of a dense frame) up to which a conv + nonlinear update on a small map counts as latency-bound
# (see latency_bound_tile): about two programs on each of an H100's or H200's 132 SMs, so even a dense frame
# runs in one wave of the persistent grid. None: off (the heuristic of sessions 5-14).
LATENCY_BOUND_ITEMS: int | None = 256
# Output channels (lo, hi) for which it pays. H200, YOLOv8n vtest b1 delta frames, per-layer tiles + conv +
# update us against the heuristic before (session 16): Cout 64 wins (12 3x3 64->64: 150 vs 184; each 1x1 ->64
# 2-3 us less), Cout 80-256 loses (3 3x3 80->80: 57.8 vs 50.5, 3 1x1 384->256: 38.6 vs 33.1, 4 3x3 128->128:
# 56.4 vs 53.1: one 8-warp program per SM), Cout 16-32 is even (32->32 3x3: 61.8 vs 59.7).
LATENCY_BOUND_COUT = (33, 64)
# Work items of a dense frame (tiles x groups x channel blocks) up to which a conv launches no tile list (see
# direct_tiles): two programs on each of an H100's or H200's 132 SMs, one wave of the persistent grid. None: always
# a list launch (sessions 1-18). H200, YOLOv8n on vtest.avi, ms a delta frame (session 19, same process each):
# b1 1.03-1.05 (512) / 1.04 (264) against 1.19 (None): 45 of 55 list launches gone, kernel time 1.00 -> 0.88 ms;
# 16 streams 3.09-3.15 (512: the larger maps' tiles take more than a wave unpacked) / 2.95 (264) / 2.93-2.94 (None).
DIRECT_TILE_ITEMS: int | None = 264
# float32 accumulator elements per thread that latency_bound_tile sizes an item's pixels for (32: 1.34 against
# 1.23 ms a delta frame, the same run)
FUSED_ACC_PER_THREAD = 16


@dataclass(frozen=True)
class ConvConfig:
    """Launch shape of the sparse conv: output tile th x tw pixels, bn output channels, bk input channels
    per K step, split_k K splits (fp32 atomics), persistent programs per SM (None: one wave)."""

    th: int = 8
    tw: int = 8
    bn: int = 64
    bk: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    # None: the programs that fit an SM at once (see PROGRAMS_PER_SM)
    programs_per_sm: int | None = None
    # flatten K over (tap, channel) instead of (tap, channel block); None: when Cin/groups < PACK_K_BELOW
    pack_k: bool | None = None
    # register cap per thread (a launch option of the GEMM kernel); None: the compiler's choice
    maxnreg: int | None = None


def prepare_weight(weight: Tensor, groups: int, dtype: torch.dtype | None = None) -> Tensor:
    """GEMM form of a conv weight (Cout, Cin/G, kh, kw): (G, kh, kw, Cin/G, Cout/G) contiguous;
    depthwise (Cin/G == Cout/G == 1) gives (kh*kw, C). Cache it per weight tensor."""
    cout, cg, kh, kw = weight.shape
    og = cout // groups
    w = weight if dtype is None else weight.to(dtype)
    if cg == 1 and og == 1:
        return w.reshape(cout, kh * kw).t().contiguous()
    return w.reshape(groups, og, cg, kh, kw).permute(0, 3, 4, 2, 1).contiguous()


def _launch(kernel, work: int, cfg: ConvConfig, dev: torch.device, args: tuple, kw: dict):
    """Launch a persistent conv kernel over min(work, SMs x programs per SM) programs: cfg's count, else
    as many as fit an SM at once for this launch signature (known after its first launch)."""
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel), dev.index,
           tuple(a.dtype for a in args if isinstance(a, Tensor)), tuple(sorted(kw.items())))
    pps = cfg.programs_per_sm or _RESIDENT.get(key) or FIRST_LAUNCH_PROGRAMS_PER_SM
    compiled = kernel[(max(1, min(work, num_sms(dev) * pps)),)](*args, **kw)
    if cfg.programs_per_sm is None and key not in _RESIDENT:
        r = kernel_residency(compiled, dev)
        if r is not None:
            _RESIDENT[key] = r


@dataclass(frozen=True)
class WindowPlan:
    """How a conv reads window rows of a bordered copy: `npx` pixels per kernel row (a power of two,
    npx * cp elements = one K step), starting `shift` pixels left of the first tap so that rows of a
    stride-2 conv start on 16-byte boundaries (the extra pixels get zero weights)."""

    npx: int
    shift: int
    cp: int


def window_plan(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: tuple[int, int],
                padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
                out_hw: tuple[int, int], bordered: Bordered) -> WindowPlan | None:
    """The window-row plan of this conv on `bordered`, or None where the conv must gather per tap
    (groups, column dilation, more channels than the copy holds, a window wider than 64 elements
    or narrower than a 16-deep K step, taps beyond the border, or a copy of another shape or layout)."""
    n, cin, h, w = x_shape
    cout, cg, kh, kw = w_shape
    bn_, hb, wb, cp = bordered.values.shape
    border = bordered.border
    if groups != 1 or dilation[1] != 1 or cin > cp or bn_ != n or hb != h + 2 * border \
            or wb != triton.cdiv(w + 2 * border, 16) * 16 or not bordered.values.is_contiguous():
        return None
    sh, sw = stride
    pt, _, pl, _ = padding
    shift = (border - pl) % 2 if sw % 2 == 0 else 0
    npx = npow2(kw + shift)
    ho, wo = out_hw
    if not 16 <= npx * cp <= 64 or pt > border or pl + shift > border:
        return None
    if (ho - 1) * sh - pt + (kh - 1) * dilation[0] + border >= hb or (wo - 1) * sw - pl - shift + npx + border > wb:
        return None
    return WindowPlan(npx, shift, cp)


def prepare_window_weight(weight: Tensor, plan: WindowPlan, dtype: torch.dtype | None = None) -> Tensor:
    """GEMM form of a conv weight for window rows: (kh * npx * cp, Cout), zero for the shift pixels,
    the pixels past the kernel's width and the padding channels. Cache it per weight tensor."""
    cout, cin, kh, kw = weight.shape
    w = torch.zeros(kh, plan.npx, plan.cp, cout, dtype=dtype or weight.dtype, device=weight.device)
    w[:, plan.shift:plan.shift + kw, :cin, :] = weight.permute(2, 3, 1, 0).to(w.dtype)
    return w.reshape(kh * plan.npx * plan.cp, cout)


def default_config(n: int, cin: int, cout: int, groups: int, kernel: tuple[int, int], out_hw: tuple[int, int],
                   dtype: torch.dtype, fused_act: bool, split_emit: bool = False) -> ConvConfig:
    """Shape-only heuristic (never data-dependent, so it is capture-safe). `split_emit`: the fused
    nonlinear update may split output channels over programs (tau <= 0)."""
    cg, og = cin // groups, cout // groups
    kh, kw = kernel
    if cg == 1 and og == 1:  # depthwise
        bc = max(16, npow2(cout)) if fused_act and cout <= 256 else min(64, max(16, npow2(cout)))
        return ConvConfig(bn=bc, bk=16, num_warps=4 if bc <= 64 else 8)
    bk_max = 32 if dtype == torch.float32 else 64
    # packed K (few channels): a step spans several taps
    packed = cg < PACK_K_BELOW
    bk = min(bk_max, max(16, npow2(kh * kw * cg if packed else cg)))
    if packed:
        bk = min(bk, PACK_K_BK)
    big = n * out_hw[0] * out_hw[1] >= 32768
    # at tau <= 0 the fused epilogue may split Cout (SPLIT_EMIT_BN channels per program); otherwise it
    # needs all Cout of a pixel in one program, and on small maps that leaves too few programs (H100,
    # 3x3 256->256+relu @68x120, 1%: fused 29.3 us vs conv + sparse_nonlinear 21.0 us)
    # small maps with a long K loop: too few (tile, channel block) items to fill 132 SMs at low
    # density, so split K (measured on H100: 3x3 256->256 @68x120, 1%: 29.9 -> 20.0 us with 4 splits)
    split = 1
    if n * out_hw[0] * out_hw[1] < 32768:
        k_len = kh * kw * cg
        split = 4 if k_len >= 2048 else 2 if k_len >= 1024 else 1
    maxnreg = None if big else SMALL_MAP_MAXNREG
    fused_tile = latency_bound_tile(n, cout, groups, out_hw, split) if fused_act and not packed and not big else None
    if fused_tile is not None:
        th, tw, warps = fused_tile
        # no register cap: its third program per SM has no items to take here (ptxas, sm_90a: the 4x8-pixel
        # 64-channel conv + SiLU in 168 registers without spills)
        return ConvConfig(th=th, tw=tw, bn=max(16, npow2(cout)), bk=bk, num_warps=warps, split_k=split,
                          num_stages=NUM_STAGES, programs_per_sm=PROGRAMS_PER_SM, maxnreg=None)
    if fused_act and split_emit and SPLIT_EMIT_BN is not None:
        bn = min(SPLIT_EMIT_BN, max(16, npow2(og)))
    elif fused_act and groups == 1 and cout <= 256 and (big or cout <= 64):
        bn = max(16, npow2(cout))
    else:
        bn = min(128 if big else 64, max(16, npow2(og)))
    th, tw = BIG_MAP_TILE if big and bn * BIG_MAP_TILE[0] * BIG_MAP_TILE[1] <= 128 * 128 else (8, 8)
    warps = PACK_K_WARPS if packed else 8 if bn * th * tw >= 128 * 128 else 4
    return ConvConfig(th=th, tw=tw, bn=bn, bk=bk, num_warps=warps, split_k=split, num_stages=NUM_STAGES,
                      programs_per_sm=PROGRAMS_PER_SM, maxnreg=maxnreg)


def direct_tiles(n: int, out_hw: tuple[int, int], cfg: ConvConfig, per_tile: int, excluded: bool) -> bool:
    """Whether the conv runs without a tile-list launch: its programs take every output tile of the map as a work
    unit, compute the tile's candidate mask themselves (the receptive-field dilation of the input mask, or the given
    one), write the masks the list launch would have written, and stop at once where the tile has no candidate.

    On a small map all of a dense frame's DIRECT_TILE_ITEMS work items are taken by one wave of the persistent
    grid, so an empty tile costs one mask round trip inside a launch that runs anyway, against a whole launch
    (and the gap before the next) for the list; beyond a wave the list's packing of scattered candidates into
    full units wins. Only where each tile's outputs and masks are written
    by its own programs alone: one K split (no shared split-K workspace), no channel-split emit (OR_FM), no window
    rows, not depthwise (`excluded`)."""
    if DIRECT_TILE_ITEMS is None or excluded or cfg.split_k != 1:
        return False
    return n * triton.cdiv(out_hw[0], cfg.th) * triton.cdiv(out_hw[1], cfg.tw) * per_tile <= DIRECT_TILE_ITEMS


def latency_bound_tile(n: int, cout: int, groups: int, out_hw: tuple[int, int], split: int) -> tuple[int, int, int] | None:
    """(th, tw, warps) of a conv + nonlinear update whose program holds all Cout channels of its pixels, on a map so
    small that a dense frame's work items fit in LATENCY_BOUND_ITEMS, for Cout in LATENCY_BOUND_COUT; else None.

    Such a layer is bound by one work item's chain of dependent gathers, not by weight reuse or SM count, so what
    counts is that the item runs without spills and in one launch (the update fused: no float32 round trip, no
    sparse_nonlinear). The pixels per item are chosen for FUSED_ACC_PER_THREAD float32 accumulator elements per
    thread (64 channels: 32 pixels at 4 warps; 128: 32 at 8; 256: 16 at 8): the epilogue holds four tiles of
    that size (sum, A, E, output) and spills beyond it (ptxas, sm_90a, 3x3 64->64 + SiLU at tau > 0: 64 pixels at
    4 warps 176 bytes of spills under the small-map cap, 40 uncapped; 32 pixels: none)."""
    lo, hi = LATENCY_BOUND_COUT
    if LATENCY_BOUND_ITEMS is None or groups != 1 or not lo <= cout <= hi or cout > 256:
        return None
    bn = max(16, npow2(cout))
    warps = 4 if bn <= 64 else 8
    p = min(64, max(16, FUSED_ACC_PER_THREAD * 32 * warps // bn))
    th, tw = {64: (8, 8), 32: (4, 8), 16: (4, 4)}[p]
    ho, wo = out_hw
    # the most items a frame can have: every pixel a candidate (pixel lists), or every tile (tile lists)
    items = (triton.cdiv(n * ho * wo, p) if PIXEL_LISTS else n * triton.cdiv(ho, th) * triton.cdiv(wo, tw)) * split
    return (th, tw, warps) if items <= LATENCY_BOUND_ITEMS else None


def sparse_conv2d(x: Tensor, x_mask: Tensor, weight: Tensor, out_mask: Tensor | None,
                  stride: tuple[int, int] = (1, 1), padding: tuple[int, int, int, int] = (0, 0, 0, 0),
                  dilation: tuple[int, int] = (1, 1), groups: int = 1, out: Tensor | None = None, *,
                  residual: Tensor | None = None, residual_mask: Tensor | None = None, act: Act | dict | None = None,
                  out_dtype: torch.dtype | None = None, input_precision: str = "tf32",
                  prepared: Tensor | None = None, config: ConvConfig | None = None,
                  out_hw: tuple[int, int] | None = None, counter: Tensor | None = None,
                  bordered: Bordered | None = None, window_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sparse conv of a delta (no bias) at the candidate pixels out_mask | residual_mask.

    x: (N, Cin, H, W) channels_last fp16/bf16/fp32 (or a channel slice of a channels_last map, read in place;
    so may `residual` be), zero where x_mask (N, 1, H, W) bool is 0 (never read).
    weight: (Cout, Cin/groups, kh, kw) (or pass `prepared=prepare_weight(weight, groups, x.dtype)`).
    out_mask: (N, 1, Ho, Wo) bool, or None to compute it (the receptive-field dilation of x_mask, as
    dilate_mask does) inside the tile-list launch; `out_hw` then overrides the floor-mode output size.
    padding is (top, bottom, left, right). y = conv + residual (where residual_mask). Without `act`:
    returns (y at candidates, out_mask | residual_mask) (the mask is `out_mask` itself when there is no
    residual). With `act` (see Act): A += y, emits o = f(A) - E where the per-pixel score exceeds tau,
    returns (o, emit mask). Output dtype: `out.dtype`, else `out_dtype`, else x.dtype. fp32 inputs use
    `input_precision` ("tf32" or exact "ieee"). No host synchronisation: CUDA-graph capturable.
    `counter`: a persistent int32[2] zero buffer the call uses for its tile count and leaves zeroed
    again (saves a zeroing launch per call; cache one per layer and device, never share it between
    calls that may run concurrently). Default: a fresh one per call.
    `bordered`: a zero-filled bordered copy of x (see deltacnn.tensor.Bordered, written by sparsify);
    where `window_plan` allows, the conv reads whole window rows of it instead of gathering x per tap
    (`window_weight`: prepare_window_weight's result for that plan, else made here).
    """
    xs = pixel_stride(x, "x")
    n, cin, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    if cin != cg * groups or cout % groups:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {cin} input channels in {groups} groups")
    og = cout // groups
    if out_mask is not None:
        ho, wo = out_mask.shape[2:]
    else:
        ho, wo = out_hw or out_size(h, w, (kh, kw), stride, padding, dilation)
    xm = mask_u8(x_mask, (n, 1, h, w), "x_mask")
    if out_mask is not None:
        mask_u8(out_mask, (n, 1, ho, wo), "out_mask")
    act = as_act(act)
    dev = x.device
    if input_precision not in ("tf32", "ieee", "tf32x3"):
        raise ValueError("input_precision must be 'tf32', 'tf32x3' or 'ieee'")
    if counter is not None and (counter.dtype != torch.int32 or counter.numel() < 2 or counter.device != dev):
        raise ValueError(f"counter must be an int32 tensor of >= 2 elements on {dev}")
    odt = out.dtype if out is not None else (out_dtype or x.dtype)
    if out is None:
        out = new_cl(n, cout, ho, wo, odt, dev)
    else:
        need_cl(out, "out")
        if tuple(out.shape) != (n, cout, ho, wo):
            raise ValueError(f"out must have shape {(n, cout, ho, wo)}")
    rs = cout
    if residual is not None:
        rs = pixel_stride(residual, "residual")
        if tuple(residual.shape) != (n, cout, ho, wo) or residual_mask is None:
            raise ValueError(f"residual must have shape {(n, cout, ho, wo)} and come with residual_mask")
        rmu = mask_u8(residual_mask, (n, 1, ho, wo), "residual_mask")
    if act is not None:
        check_state(act.acc, (n, cout, ho, wo), "act.acc")
        check_state(act.emitted, (n, cout, ho, wo), "act.emitted")
    depthwise = cg == 1 and og == 1
    if depthwise and (xs != cin or rs != cout):  # the depthwise kernel reads whole channels_last maps
        x = x.contiguous(memory_format=torch.channels_last)
        residual = residual.contiguous(memory_format=torch.channels_last) if residual is not None else None
        xs, rs = cin, cout
    if prepared is None:
        prepared = prepare_weight(weight, groups, x.dtype)
    if prepared.dtype != x.dtype:
        raise ValueError(f"weight dtype {prepared.dtype} must equal x dtype {x.dtype}")
    cfg = config or default_config(n, cin, cout, groups, (kh, kw), (ho, wo), x.dtype, act is not None,
                                   act is not None and SPLIT_CHANNEL_EMIT and act.tau <= 0)
    plan = None if bordered is None or depthwise else window_plan(
        (n, cin, h, w), (cout, cg, kh, kw), stride, padding, dilation, groups, (ho, wo), bordered)
    if plan is not None and config is None:
        th, tw = WINDOW_TILE or (cfg.th, cfg.tw)
        # a channel split keeps the update fused only at tau <= 0 (see or_fm below)
        split_ok = act is None or (SPLIT_CHANNEL_EMIT and act.tau <= 0)
        cfg = replace(cfg, th=th, tw=tw, num_warps=WINDOW_WARPS or cfg.num_warps,
                      bn=WINDOW_BN if WINDOW_BN and split_ok else cfg.bn)
    split_k = 1 if depthwise else cfg.split_k
    bn = cfg.bn if (act is not None or depthwise) else min(cfg.bn, max(16, npow2(og)))
    # the nonlinear update runs in the conv's epilogue when one program holds all Cout of its pixels,
    # or at tau <= 0 in any channel split (the emit test is then per channel: see emit_truncated)
    whole = bn >= cout and (depthwise or groups == 1)
    or_fm = act is not None and not whole and SPLIT_CHANNEL_EMIT and act.tau <= 0
    fusable = act is not None and (whole or or_fm)
    if act is not None and not fusable:
        # two passes: the conv into a float32 buffer, then the epilogue as a pointwise kernel
        tmp = new_cl(n, cout, ho, wo, torch.float32, dev)
        y, ym = sparse_conv2d(x, x_mask, weight, out_mask, stride, padding, dilation, groups, tmp,
                              residual=residual, residual_mask=residual_mask, input_precision=input_precision,
                              prepared=prepared, config=cfg, out_hw=(ho, wo), counter=counter, bordered=bordered,
                              window_weight=window_weight)
        return sparse_nonlinear(y, ym, act.acc, act.emitted, act, out=out)
    atomic = split_k > 1 and act is None and odt == torch.float32  # partials go straight into `out`
    fixup = split_k > 1 and not atomic
    has_res = residual is not None
    if act is not None:
        fm = torch.empty(n, 1, ho, wo, dtype=torch.bool, device=dev)
        fm_mode = 2
    elif has_res:
        fm = torch.empty(n, 1, ho, wo, dtype=torch.bool, device=dev)
        fm_mode = 1
    else:
        fm, fm_mode = None, 0
    nb = 1 if depthwise else triton.cdiv(og, bn)
    ws = new_cl(n, cout, ho, wo, torch.float32, dev) if fixup else None
    direct = direct_tiles(n, (ho, wo), cfg, groups * nb * split_k, depthwise or or_fm or plan is not None)
    pixels = PIXEL_LISTS and not depthwise and not direct
    if direct:  # no list launch: the conv's programs take every tile and write its masks themselves
        n_tw = triton.cdiv(wo, cfg.tw)
        tpi = triton.cdiv(ho, cfg.th) * n_tw
        n_tiles, ctr = n * tpi, None
        om_t = out_mask if out_mask is not None else torch.empty(n, 1, ho, wo, dtype=torch.bool, device=dev)
        ids = count = om_t.view(torch.uint8)  # not read
    else:
        ids, count, (n_tiles, n_tw, tpi), ctr, om_t = active_tiles(
            out_mask, residual_mask if has_res else None, cfg.th, cfg.tw, final_mask=fm, fm_mode=fm_mode,
            zero=out if atomic else ws, n_ctr=groups * nb if fixup else 0,
            dilate_from=None if out_mask is not None else (x_mask, (kh, kw), stride, padding, dilation, (ho, wo)),
            count=counter, pixels=pixels)
    try:
        if fm is None:
            fm = om_t
        om = om_t.view(torch.uint8)
        res = residual if has_res else out
        rm = rmu if has_res else om
        a_t = act.acc if act is not None else out
        e_t = act.emitted if act is not None else out
        fn = act.code() if act is not None else 0
        sc = act.score_code() if act is not None else 0
        ap = (act.slope, act.min_val, act.max_val, act.alpha, float(act.tau)) if act is not None else (0.0, 0.0, 0.0, 0.0, 0.0)
        if depthwise:
            ncb = triton.cdiv(cout, cfg.bn)
            _launch(_conv_dw_kernel, n_tiles * ncb, cfg, dev,
                    (x, xm, prepared, out, om, res, rm, a_t, e_t, fm.view(torch.uint8), ids, count,
                     h, w, ho, wo, cout, n_tw, tpi, *ap),
                    dict(KH=kh, KW=kw, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
                         PT=padding[0], PL=padding[2], TH=cfg.th, TW=cfg.tw, BC=cfg.bn, NCB=ncb,
                         HAS_RES=has_res, HAS_ACT=act is not None, FN=fn, SCORE=sc, WRITE_FM=False,
                         OR_FM=or_fm, SELF_RESET=counter is not None, LOADS_FIRST=EPILOGUE_LOADS_FIRST,
                         num_warps=cfg.num_warps, **launch_opts(dev, long_running=True)))
            return out, fm
        work = n_tiles * groups * nb * split_k
        pack = cfg.pack_k if cfg.pack_k is not None else cg < PACK_K_BELOW
        bk = cfg.bk
        nkc = triton.cdiv(cg, bk)
        n_it = triton.cdiv(kh * kw * cg, bk) if pack else kh * kw * nkc
        x_in, w_in, hx, wx, border = x, prepared, h, w, 0
        if plan is not None:  # one kernel row per K step, read from the bordered copy
            pack, bk, n_it = False, plan.npx * plan.cp, kh
            x_in, border = bordered.values, bordered.border
            hx, wx = x_in.shape[1:3]
            w_in = window_weight if window_weight is not None else prepare_window_weight(weight, plan, x.dtype)
            if x_in.dtype != x.dtype or w_in.dtype != x.dtype or tuple(w_in.shape) != (kh * bk, cout):
                raise ValueError("bordered copy and window weight must match x's dtype and the window plan")
        it_per = triton.cdiv(n_it, split_k)
        # a 1x1 conv without padding whose candidate mask the tile-list launch computed from x's mask:
        # each output pixel's one tap is an input pixel, and the candidate mask is x's mask there, so
        # the K loop need not load it again (one dependent load less)
        xm_is_om = REUSE_OUT_MASK and out_mask is None and (kh, kw) == (1, 1) and tuple(padding) == (0, 0, 0, 0) \
            and not pack and plan is None
        _launch(_conv_gemm_kernel, work, cfg, dev,
                (x_in, xm, w_in, out, om, res, rm, a_t, e_t, fm.view(torch.uint8), ids, count,
                 ws if fixup else out, ctr if fixup else ids, hx, wx, ho, wo, xs, rs, cout, cg, og, n_tw, tpi,
                 n_tiles if direct else 0, *ap),
                dict(KH=kh, KW=kw, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
                     PT=padding[0], PL=padding[2], TH=cfg.th, TW=cfg.tw, BN=bn, BK=bk, NB=nb, G=groups,
                     SPLIT_K=split_k, HAS_RES=has_res, HAS_ACT=act is not None, FN=fn, SCORE=sc,
                     WRITE_FM=False, ATOMIC=atomic, PREC=input_precision,
                     IS_F32=x.dtype == torch.float32, NKC=nkc, N_IT=n_it, IT_PER=it_per,
                     UPCAST=INTERPRET and x.dtype == torch.bfloat16, FIXUP=fixup, OR_FM=or_fm, PACK_K=pack,
                     SELF_RESET=counter is not None and not direct, LOADS_FIRST=EPILOGUE_LOADS_FIRST,
                     XM_IS_OM=xm_is_om, WINDOW=plan is not None, BORD=border,
                     SHIFT=plan.shift if plan is not None else 0, CPX=plan.cp if plan is not None else 1,
                     PIX=pixels, DIRECT=direct, DIL=direct and out_mask is None, FM_MODE=fm_mode if direct else 0,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not INTERPRET else {}),
                     **launch_opts(dev, long_running=True)))
        return out, fm
    except BaseException:
        if counter is not None:  # the tile count was written but never consumed: leave it zeroed
            counter.zero_()
        raise
