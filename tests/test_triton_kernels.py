"""Triton kernels against float64 PyTorch references (TRITON_INTERPRET=1 on CPU, or on a GPU).

Inputs are random (never zeros), values at inactive pixels are NaN (must never be read), outputs
are poisoned with NaN before each run (every required element must be written).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from deltacnn.activations import ActSpec  # noqa: E402
from deltacnn.backends import triton_kernels as tk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py: exact float32 references on a GPU
TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


@pytest.fixture(params=["direct", "lists"])
def tile_lists(request, monkeypatch):
    """The gathered-GEMM conv both ways: on these small maps it takes every tile itself (direct_tiles), and with
    DIRECT_TILE_ITEMS None it runs after a tile-list launch, as on a large map."""
    if request.param == "lists":
        monkeypatch.setattr(tk.conv, "DIRECT_TILE_ITEMS", None)
    return request.param


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def rand_mask(g, n, h, w, p=0.35):
    return (torch.rand(n, 1, h, w, generator=g) < p).to(DEV)


def rand_delta(g, n, c, h, w, dtype, p=0.35):
    """Random values (quantised to dtype) with NaN garbage where the mask is 0."""
    m = rand_mask(g, n, h, w, p)
    v = (torch.randn(n, c, h, w, generator=g) + 0.1).to(DEV).to(dtype)
    v = torch.where(m, v, torch.full((), float("nan"), dtype=dtype, device=DEV))
    return cl(v), m


def zf(v, m):
    """Values as float64 with inactive pixels zeroed (the semantics of a delta)."""
    return torch.where(m, v.double(), torch.zeros((), dtype=torch.float64, device=v.device))


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite value where a result was required"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- references (float64)
def ref_dilate(mask, kernel, stride, pad4, dilation):
    t, b, l, r = pad4
    m = F.pad(mask.double(), (l, r, t, b))
    k = torch.ones(1, 1, *kernel, dtype=torch.float64, device=mask.device)
    return F.conv2d(m, k, stride=stride, dilation=dilation) > 0


def ref_conv(x, xm, weight, stride, pad4, dilation, groups):
    t, b, l, r = pad4
    return F.conv2d(F.pad(zf(x, xm), (l, r, t, b)), weight.double(), None, stride, 0, dilation, groups)


def ref_act(fn, x, slope=0.1):
    if fn == "none":
        return x
    if fn == "gelu_tanh":
        return ActSpec("gelu", approximate="tanh")(x)
    return ActSpec(fn, slope=slope)(x)


def ref_nonlinear(y, cand, A, E, fn, tau, score, out_dtype, slope=0.1):
    A2 = A.double() + torch.where(cand, y, torch.zeros((), dtype=torch.float64, device=y.device))
    o = ref_act(fn, A2, slope) - E.double()
    s = o.abs().amax(1, keepdim=True) if score == "max" else o.norm(dim=1, keepdim=True)
    emit = cand & (s > tau)
    o_r = o.to(out_dtype).double()
    E2 = E.double() + torch.where(emit, o_r, torch.zeros((), dtype=torch.float64, device=y.device))
    return A2, E2, o, emit, s


def check_nonlinear(out, fm, A, E, ref, tol, tau, margin):
    A2, E2, o, emit, s = ref
    far = (s - tau).abs() > margin  # decisions near the threshold may flip with rounding
    assert torch.equal(fm & far, emit & far), "emit mask differs"
    both = fm & emit
    assert rel(A, A2) < tol
    if both.any():
        sel = both.expand_as(o)
        assert rel(out.double()[sel], o[sel]) < tol
        assert rel(E.double()[sel], E2[sel]) < tol


# ---------------------------------------------------------------- dilate_mask
@pytest.mark.parametrize("kernel,stride,pad,dil", [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),
    ((5, 3), (2, 1), (2, 0, 1, 2), (1, 2)), ((7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),
    ((2, 2), (2, 2), (0, 1, 0, 1), (2, 1))])
def test_dilate_mask(kernel, stride, pad, dil):
    g = torch.Generator().manual_seed(1)
    m = rand_mask(g, 2, 11, 13, 0.08)
    ref = ref_dilate(m, kernel, stride, pad, dil)
    out = tk.dilate_mask(m, kernel, stride, pad, dil)
    assert out.dtype == torch.bool and torch.equal(out, ref)


def test_active_tiles():
    """The listed tiles are exactly those holding an active pixel; split-K counters are zeroed for
    every listed tile and the zeroed workspace rows are exactly the active pixels."""
    g = torch.Generator().manual_seed(2)
    m = rand_mask(g, 2, 19, 21, 0.03)
    z = cl(torch.full((2, 5, 19, 21), float("nan"), device=DEV))
    ids, count, (n_tiles, n_tw, tpi), ctr, _ = tk.active_tiles(m, None, 8, 8, zero=z, n_ctr=3)
    k = int(count[0])
    got = sorted(ids[:k].tolist())
    mp = F.pad(m.float(), (0, 24 - 21, 0, 24 - 19))
    want = torch.nonzero(F.max_pool2d(mp, 8, 8).reshape(-1) > 0).squeeze(1).tolist()
    assert got == want and n_tiles == 2 * 9 and 0 < k < n_tiles
    assert (ctr.view(n_tiles, 3)[want] == 0).all()
    assert torch.equal(torch.isnan(z).logical_not(), m.expand_as(z)) and (z[m.expand_as(z)] == 0).all()


def test_active_tiles_pixel_list():
    """Pixel mode lists exactly the candidate pixels, each tile's pixels together, and zeroes the
    fixup counters of every work unit of th*tw list entries."""
    g = torch.Generator().manual_seed(3)
    m = rand_mask(g, 2, 19, 21, 0.06)
    m2 = rand_mask(g, 2, 19, 21, 0.02)
    ids, count, (n_tiles, _, _), ctr, _ = tk.active_tiles(m, m2, 8, 8, n_ctr=2, pixels=True)
    k = int(count[0])
    want = torch.nonzero((m | m2).reshape(-1)).squeeze(1).tolist()
    assert sorted(ids[:k].tolist()) == want and k == len(want) > 64
    units = -(-k // 64)
    assert (ctr.view(n_tiles, 2)[:units] == 0).all()
    tile_of = [(p // (19 * 21), (p % (19 * 21)) // 21 // 8, p % 21 // 8) for p in ids[:k].tolist()]
    runs = [t for i, t in enumerate(tile_of) if i == 0 or t != tile_of[i - 1]]
    assert len(runs) == len(set(runs)), "a tile's pixels must be contiguous in the list"


PIXEL_LIST_CASES = {  # cin, cout, kernel, stride, pad4, dilation, groups; split-K; act; tau
    "fixup+res+relu tau>0": ((24, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), 3, "relu", 0.3),
    "split emit tau 0": ((8, 40, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1), 1, "relu", 0.0),
    "two-pass tau>0": ((8, 40, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1), 2, "silu", 0.2),
    "packed stem, linear": ((3, 16, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1), 2, None, 0.0),
}


@pytest.mark.parametrize("name", list(PIXEL_LIST_CASES))
def test_sparse_conv2d_pixel_lists(name, monkeypatch):
    """Work units of listed candidate pixels (scattered over tiles, several images) give the
    reference's results, as whole tiles do (listed, or taken by the conv itself); a residual is read at its own
    mask."""
    case, split, fn, tau = PIXEL_LIST_CASES[name]
    dtype = torch.float16
    cout = case[1]
    results = []
    for pixels, direct in ((True, None), (False, None), (False, 512)):  # pixel list, tile list, no list
        monkeypatch.setattr(tk.conv, "PIXEL_LISTS", pixels)
        monkeypatch.setattr(tk.conv, "DIRECT_TILE_ITEMS", direct)
        g, x, xm, wt, om = _conv_inputs(41, case, dtype, h=23, w=19, p=0.04)
        n, _, ho, wo = om.shape
        res, rm = rand_delta(g, n, cout, ho, wo, dtype, 0.03)
        y = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6]) + zf(res, rm)
        cfg = tk.ConvConfig(th=8, tw=8, bn=16, bk=16, split_k=split)
        counter = torch.zeros(2, dtype=torch.int32, device=DEV)
        if fn is None:
            out = cl(torch.full(y.shape, float("nan"), dtype=torch.float32, device=DEV))
            o, fm = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out, residual=res,
                                     residual_mask=rm, config=cfg, counter=counter)
            assert torch.equal(fm, om | rm)
            sel = fm.expand_as(y)
            assert rel(o[sel], y[sel]) < 1e-6
            results.append(o[sel])
        else:
            A = cl(torch.randn(n, cout, ho, wo, generator=g).to(DEV))
            E = cl(ref_act(fn, A.double()).float() + 0.05 * torch.randn(n, cout, ho, wo, generator=g).to(DEV))
            ref = ref_nonlinear(y, om | rm, A, E, fn, tau, "max", dtype)
            out = cl(torch.full(y.shape, float("nan"), dtype=dtype, device=DEV))
            o, fm = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out, residual=res,
                                     residual_mask=rm, act=tk.Act(fn, A, E, tau), config=cfg, counter=counter)
            check_nonlinear(o, fm, A, E, ref, TOL[dtype] * 2, tau, 0.02)
            results.append((fm, A))
        assert counter.tolist() == [0, 0]
    for other in results[1:]:
        if fn is not None:
            assert torch.equal(results[0][0], other[0]) and rel(results[0][1], other[1]) < 1e-6
        else:
            assert rel(results[0], other) < 1e-6


DIRECT_CASES = {  # cin, cout, kernel, stride, pad4, dilation, groups; act; residual; config (bn < cout: two passes)
    "3x3 linear, dilated here": ((8, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), None, False, (8, 8, 16)),
    "1x1 linear, x's mask": ((16, 8, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1), None, False, (8, 8, 16)),
    "3x3 s2 + residual (union mask)": ((8, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1), None, True, (4, 8, 16)),
    "3x3 + silu tau>0 fused (emit mask)": ((8, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), "silu", True, (4, 8, 16)),
    "grouped 3x3 + relu, two passes": ((8, 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2), "relu", False, (8, 8, 8)),
    "packed K (6 channels), dilated rows": ((6, 16, (3, 3), (1, 1), (2, 2, 1, 1), (2, 1), 1), None, True, (8, 8, 16)),
}


@pytest.mark.parametrize("name", list(DIRECT_CASES))
def test_direct_tiles_write_every_mask_without_a_list_launch(name, monkeypatch):
    """On a small map the conv takes every tile itself: no tile-list launch, and the masks that launch wrote (the
    dilated candidate mask, the union with the residual's, the cleared emit mask) are written at every pixel,
    in the tiles without a candidate too (fresh buffers are poisoned here: True masks, NaN values), equal to the
    reference and to the tile-list path."""
    case, fn, with_res, (th, tw, bn) = DIRECT_CASES[name]
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        if t.dtype == torch.bool:
            t.fill_(True)
        elif t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    lists = []
    real_tiles = tk.conv.active_tiles
    monkeypatch.setattr(tk.conv, "active_tiles", lambda *a, **k: lists.append(1) or real_tiles(*a, **k))
    dtype, cout = torch.float16, case[1]
    g, x, xm, wt, _ = _conv_inputs(71, case, dtype, h=21, w=19, n=2, p=0.3)
    xm[:, :, 6:] = False  # whole tiles without a candidate
    x = torch.where(xm, x, torch.full((), float("nan"), dtype=dtype, device=DEV))
    om = ref_dilate(xm, case[2], case[3], case[4], case[5])
    n, _, ho, wo = om.shape
    res, rm = rand_delta(g, n, cout, ho, wo, dtype, 0.02) if with_res else (None, None)
    y = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6]) + (zf(res, rm) if with_res else 0)
    cand = om | rm if with_res else om
    A = cl(torch.randn(n, cout, ho, wo, generator=g).to(DEV))
    E0 = cl(ref_act(fn or "relu", A.double()).float() + 0.05 * torch.randn(n, cout, ho, wo, generator=g).to(DEV))
    cfg = tk.ConvConfig(th=th, tw=tw, bn=bn, bk=16)
    assert tk.conv.direct_tiles(n, (ho, wo), cfg, 1, False)
    got = []
    for direct in (264, None):
        monkeypatch.setattr(tk.conv, "DIRECT_TILE_ITEMS", direct)
        lists.clear()
        out = cl(torch.full(y.shape, float("nan"), dtype=dtype if fn else torch.float32, device=DEV))
        kw = dict(residual=res, residual_mask=rm, config=cfg, input_precision="ieee")
        if fn is None:
            o, fm = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out, **kw)
            assert torch.equal(fm, cand)
            sel = fm.expand_as(y)
            assert rel(o[sel], y[sel]) < 1e-6
            got.append(o[sel])
        else:
            a_t, e_t = A.clone(), E0.clone()
            ref = ref_nonlinear(y, cand, A, E0, fn, 0.3, "max", dtype)
            o, fm = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out,
                                     act=tk.Act(fn, a_t, e_t, 0.3), **kw)
            check_nonlinear(o, fm, a_t, e_t, ref, TOL[dtype] * 2, 0.3, 0.02)
            assert not (fm & ~cand).any(), "emit mask set off the candidates (not cleared)"
            got.append(fm)
        # one list launch (none) with direct tiles, except the two-pass case's update (sparse_nonlinear, no list)
        assert len(lists) == (0 if direct else 1), lists
    assert rel(got[0], got[1]) < 1e-6 if fn is None else torch.equal(got[0], got[1])


def test_direct_tiles_only_where_each_tile_is_its_programs_alone(monkeypatch):
    """Not above DIRECT_TILE_ITEMS work items, not with K splits (shared workspace) or the excluded kinds
    (channel-split emit, window rows, depthwise), never when the setting is None."""
    cfg = tk.ConvConfig(th=8, tw=8, bn=64, bk=64)
    assert tk.conv.DIRECT_TILE_ITEMS == 264
    assert tk.conv.direct_tiles(1, (72, 96), cfg, 1, False)  # 108 tiles
    assert tk.conv.direct_tiles(1, (72, 96), cfg, 2, False)  # 216 items
    assert not tk.conv.direct_tiles(1, (72, 96), cfg, 4, False)  # 432 items
    assert not tk.conv.direct_tiles(16, (36, 48), cfg, 1, False)  # 16 streams: 480 tiles
    assert not tk.conv.direct_tiles(1, (270, 480), cfg, 1, False)  # 2040 tiles
    assert not tk.conv.direct_tiles(1, (36, 48), tk.ConvConfig(split_k=2), 2, False)
    assert not tk.conv.direct_tiles(1, (36, 48), cfg, 1, True)
    monkeypatch.setattr(tk.conv, "DIRECT_TILE_ITEMS", None)
    assert not tk.conv.direct_tiles(1, (36, 48), cfg, 1, False)


# ---------------------------------------------------------------- sparse_conv2d
CONV_CASES = [
    # cin, cout, kernel, stride, pad4, dilation, groups
    (8, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (16, 8, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    (3, 16, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),
    (8, 8, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1),
    (8, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    (8, 8, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    (6, 10, (3, 3), (1, 2), (0, 2, 1, 0), (2, 1), 1),
    (8, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    (12, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 12),
    (16, 16, (5, 5), (2, 2), (2, 1, 2, 1), (1, 1), 16),
    (8, 16, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 2),
]


def _conv_inputs(seed, case, dtype, h=12, w=11, n=2, p=0.3):
    cin, cout, kernel, stride, pad, dil, groups = case
    g = torch.Generator().manual_seed(seed)
    x, xm = rand_delta(g, n, cin, h, w, dtype, p)
    wt = (torch.randn(cout, cin // groups, *kernel, generator=g) / (cin // groups * kernel[0] * kernel[1]) ** 0.5)
    wt = wt.to(DEV).to(dtype)
    om = ref_dilate(xm, kernel, stride, pad, dil)
    return g, x, xm, wt, om


def _conv_id(c):
    return f"{c[0]}-{c[1]}k{c[2][0]}{c[2][1]}s{c[3][0]}{c[3][1]}p{''.join(map(str, c[4]))}d{c[5][0]}{c[5][1]}g{c[6]}"


# every case in float32 (exact products, checked tightly) and in one low-precision dtype
CONV_PARAMS = [(c, torch.float32) for c in CONV_CASES] + \
    [(c, (torch.float16, torch.bfloat16)[i % 2]) for i, c in enumerate(CONV_CASES)]
BIG_TILES = tk.ConvConfig(th=16, tw=16, bn=16, bk=16)  # fewer interpreted programs; default config below too


@pytest.mark.parametrize("case,dtype", CONV_PARAMS, ids=[f"{_conv_id(c)}-{str(d)[6:]}" for c, d in CONV_PARAMS])
@pytest.mark.usefixtures("tile_lists")
def test_sparse_conv2d(case, dtype):
    cin, cout, kernel, stride, pad, dil, groups = case
    g, x, xm, wt, om = _conv_inputs(3, case, dtype)
    ref = ref_conv(x, xm, wt, stride, pad, dil, groups)
    default = kernel[0] <= 3 and (groups == 1 or groups == cin)
    cfg = None if default else BIG_TILES
    out = cl(torch.full(ref.shape, float("nan"), dtype=dtype, device=DEV))
    y, ym = tk.sparse_conv2d(x, xm, wt, om, stride, pad, dil, groups, out, input_precision="ieee", config=cfg)
    assert ym is om and y.dtype == dtype
    sel = om.expand_as(ref)
    assert rel(y[sel], ref[sel]) < TOL[dtype]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("case,dtype", [(CONV_CASES[2], torch.float16), (CONV_CASES[6], torch.float32),
                                        (CONV_CASES[7], torch.bfloat16), (CONV_CASES[1], torch.float16)],
                         ids=lambda v: _conv_id(v) if isinstance(v, tuple) else str(v)[6:])
@pytest.mark.usefixtures("tile_lists")
def test_sparse_conv2d_packed_k(case, dtype, pack):
    """K flattened over (tap, channel) (automatic below PACK_K_BELOW channels) or per (tap, channel block)."""
    cin, cout, kernel, stride, pad, dil, groups = case
    g, x, xm, wt, om = _conv_inputs(12, case, dtype)
    ref = ref_conv(x, xm, wt, stride, pad, dil, groups)
    cfg = tk.ConvConfig(th=8, tw=8, bn=16, bk=16, pack_k=pack, split_k=2 if pack else 1)
    out = cl(torch.full(ref.shape, float("nan"), dtype=torch.float32, device=DEV))
    y, ym = tk.sparse_conv2d(x, xm, wt, om, stride, pad, dil, groups, out, input_precision="ieee", config=cfg)
    sel = om.expand_as(ref)
    assert rel(y[sel], ref[sel]) < (1e-5 if dtype == torch.float32 else 1e-6)  # fp32 accumulation of exact products


def bordered_of(x, xm, border=4):
    """The Bordered copy sparsify would write for delta (x, xm), built with plain PyTorch."""
    from deltacnn.tensor import Bordered
    n, c, h, w = x.shape
    wb = -(-(w + 2 * border) // 16) * 16
    vals = torch.zeros(n, h + 2 * border, wb, tk.BORDERED_CP, dtype=x.dtype, device=x.device)
    vals[:, border:border + h, border:border + w, :c] = zf(x, xm).to(x.dtype).permute(0, 2, 3, 1)
    return Bordered(vals, border)


WINDOW_CASES = [  # few input channels, groups 1, no column dilation: the convs that read window rows
    (3, 16, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),  # the RGB stem: 8-pixel rows, one pixel of shift
    (3, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # 4-pixel rows: a 16-deep K step
    (4, 16, (5, 5), (2, 2), (2, 1, 2, 0), (2, 1), 1),  # row dilation, asymmetric padding, shift 0
    (2, 16, (3, 5), (1, 2), (0, 0, 4, 2), (1, 1), 1),  # padding up to the border
]
WINDOW_PARAMS = [(c, dt) for c in WINDOW_CASES for dt in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", WINDOW_PARAMS, ids=[f"{_conv_id(c)}-{str(d)[6:]}" for c, d in WINDOW_PARAMS])
def test_sparse_conv2d_window_rows(case, dtype):
    """Convs reading window rows of the bordered copy match the reference, and the per-tap gathers."""
    cin, cout, kernel, stride, pad, dil, groups = case
    g, x, xm, wt, om = _conv_inputs(31, case, dtype, h=13, w=21)
    ref = ref_conv(x, xm, wt, stride, pad, dil, groups)
    bd = bordered_of(x, xm)
    plan = tk.window_plan(tuple(x.shape), tuple(wt.shape), stride, pad, dil, groups, tuple(ref.shape[2:]), bd)
    assert plan is not None and plan.npx * plan.cp in (16, 32)
    cfg = tk.ConvConfig(th=8, tw=8, bn=16, bk=16)
    outs = []
    for b in (bd, None):
        out = cl(torch.full(ref.shape, float("nan"), dtype=torch.float32, device=DEV))
        y, ym = tk.sparse_conv2d(x, xm, wt, om, stride, pad, dil, groups, out, input_precision="ieee", config=cfg,
                                 bordered=b)
        sel = om.expand_as(ref)
        assert rel(y[sel], ref[sel]) < (1e-5 if dtype == torch.float32 else 1e-6)  # fp32 sums of exact products
        outs.append(y[sel])
    assert rel(outs[0], outs[1]) < 1e-6


@pytest.mark.parametrize("tile,warps,bn", [(None, None, None), ((8, 16), 8, 32)])
def test_sparse_conv2d_window_rows_default_config(tile, warps, bn, monkeypatch):
    """The shape heuristic's launch for window rows, and the tile, warps and channels benchmarks may set."""
    from deltacnn.backends.triton_kernels import conv
    monkeypatch.setattr(conv, "WINDOW_TILE", tile)
    monkeypatch.setattr(conv, "WINDOW_WARPS", warps)
    monkeypatch.setattr(conv, "WINDOW_BN", bn)
    case = WINDOW_CASES[0]
    g, x, xm, wt, om = _conv_inputs(33, case, torch.float16, h=13, w=21)
    ref = ref_conv(x, xm, wt, case[3], case[4], case[5], 1)
    y, ym = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], 1, out_dtype=torch.float32,
                             bordered=bordered_of(x, xm))
    sel = ym.expand_as(ref)
    assert torch.equal(ym, om) and rel(y[sel], ref[sel]) < 1e-6


def test_default_config_caps_registers_on_small_maps():
    """Small maps (few work items) get the register cap that fits a third program per SM; large maps
    and the packed-K stem do not."""
    small = tk.default_config(1, 256, 256, 1, (3, 3), (68, 120), torch.float16, True, True)
    big = tk.default_config(1, 64, 64, 1, (3, 3), (270, 480), torch.float16, True, True)
    stem = tk.default_config(1, 3, 64, 1, (7, 7), (540, 960), torch.float16, True, True)
    from deltacnn.backends.triton_kernels import conv
    assert small.maxnreg == conv.SMALL_MAP_MAXNREG == 168 and big.maxnreg is None and stem.maxnreg is None


def test_window_plan_declines():
    """Convs the window rows cannot serve gather per tap instead."""
    x, xm = rand_delta(torch.Generator().manual_seed(1), 1, 3, 16, 16, torch.float16)
    bd = bordered_of(x, xm)
    shape = tuple(x.shape)
    assert tk.window_plan(shape, (8, 3, 7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1, (8, 8), bd) is not None
    assert tk.window_plan(shape, (8, 3, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (16, 16), bd) is None  # K step < 16
    assert tk.window_plan(shape, (8, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 2), 1, (16, 14), bd) is None  # col dilation
    assert tk.window_plan(shape, (8, 3, 11, 11), (1, 1), (5, 5, 5, 5), (1, 1), 1, (16, 16), bd) is None  # > border
    assert tk.window_plan((1, 3, 15, 16), (8, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (15, 16), bd) is None  # not its copy
    assert tk.window_plan((1, 3, 16, 40), (8, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (16, 40), bd) is None
    from deltacnn.tensor import Bordered
    strided = Bordered(torch.zeros(1, 24, 32, 8, dtype=x.dtype, device=x.device)[..., :4], 4)
    assert tk.window_plan(shape, (8, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (16, 16), strided) is None


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[8]], ids=_conv_id)
def test_sparse_conv2d_persistent_counter(case):
    """A counter reused across calls (as each layer does every frame) is left zeroed by every call."""
    counter = torch.zeros(2, dtype=torch.int32, device=DEV)
    for seed in (21, 22, 23):  # different masks, so a stale count would show
        g, x, xm, wt, om = _conv_inputs(seed, case, torch.float32, p=0.1 * (seed - 20))
        ref = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
        out = cl(torch.full(ref.shape, float("nan"), dtype=torch.float32, device=DEV))
        y, ym = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out, input_precision="ieee",
                                 counter=counter)
        sel = ym.expand_as(ref)
        assert torch.equal(ym, om) and rel(y[sel], ref[sel]) < 1e-5
        assert counter.tolist() == [0, 0]
    with pytest.raises(ValueError, match="counter"):
        tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], counter=counter.long())


def _one_pixel(xm: torch.Tensor) -> torch.Tensor:
    m = torch.zeros_like(xm)
    m[-1, 0, 3, 4] = True
    return m


@pytest.mark.parametrize("programs_per_sm", [None, 1])
@pytest.mark.parametrize("case,split,fn", [(CONV_CASES[0], 2, "relu"), (CONV_CASES[0], 1, None),
                                           (CONV_CASES[8], 1, "relu")], ids=["fixup-relu", "plain", "depthwise"])
@pytest.mark.usefixtures("tile_lists")
def test_counter_reset_by_the_programs_with_work(case, split, fn, programs_per_sm):
    """Only the programs with a work item arrive at the counter (their last resets it): at zero work none,
    with fewer items than programs some, with more items than programs (1 per SM) all; results and the
    zeroed counter hold in every order of such calls."""
    counter = torch.zeros(2, dtype=torch.int32, device=DEV)
    cfg = tk.ConvConfig(th=8, tw=8, bn=16, bk=16, split_k=split, programs_per_sm=programs_per_sm)
    for seed, kind in enumerate(("empty", "pixel", "dense", "empty", "sparse", "pixel", "dense")):
        g, x, xm, wt, _ = _conv_inputs(60 + seed, case, torch.float32, h=19, w=21,
                                       p={"dense": 0.9, "sparse": 0.05}.get(kind, 1.0))
        if kind in ("empty", "pixel"):  # x is finite everywhere (p 1): keep one pixel or none
            xm = torch.zeros_like(xm) if kind == "empty" else _one_pixel(xm)
            x = torch.where(xm, x, torch.full((), float("nan"), device=DEV))
        om = ref_dilate(xm, case[2], case[3], case[4], case[5])
        y = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
        kw = dict(input_precision="ieee", config=cfg, counter=counter)
        if fn is None:
            out = cl(torch.full(y.shape, float("nan"), device=DEV))
            o, fm = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out, **kw)
            assert torch.equal(fm, om)
            if om.any():
                sel = om.expand_as(y)
                assert rel(o[sel], y[sel]) < 1e-6
        else:
            n, c, ho, wo = y.shape
            A = cl(torch.randn(n, c, ho, wo, generator=g).to(DEV))
            E = cl(ref_act(fn, A.double()).float() + 0.05 * torch.randn(n, c, ho, wo, generator=g).to(DEV))
            ref = ref_nonlinear(y, om, A, E, fn, 0.0, "max", torch.float32)
            out = cl(torch.full(y.shape, float("nan"), device=DEV))
            o, fm = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out,
                                     act=tk.Act(fn, A, E, 0.0), **kw)
            check_nonlinear(o, fm, A, E, ref, 1e-5, 0.0, 0.0)
        assert counter.tolist() == [0, 0], kind


def test_resident_programs():
    """One wave of the persistent conv grid: programs per SM from registers, warps and shared memory."""
    from deltacnn.backends.triton_kernels._common import SMLimits, resident_programs
    h = SMLimits()  # the defaults: an H100 / H200 SM
    assert resident_programs(255, 4, 0, h) == 2  # the uncapped conv kernel (230-255 registers)
    assert resident_programs(232, 4, 0, h) == 2
    assert resident_programs(168, 4, 0, h) == 3  # SMALL_MAP_MAXNREG
    assert resident_programs(255, 8, 0, h) == 1
    assert resident_programs(32, 4, 0, h) == 16  # threads: 2048 / 128
    assert resident_programs(32, 1, 0, h) == 32  # the program limit
    assert resident_programs(128, 4, 100 * 1024, h) == 2  # shared memory: 228 KiB / (100 + 1) KiB
    assert resident_programs(255, 4, 200 * 1024, h) == 1


def test_conv_grid_is_one_wave_after_the_first_launch(monkeypatch):
    """The first launch of a signature runs FIRST_LAUNCH_PROGRAMS_PER_SM per SM and records how many of its
    programs fit an SM; later launches ask for that many (an explicit programs_per_sm wins)."""
    grids = []
    real = tk.conv._conv_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid[0])
            return real[grid]
    monkeypatch.setattr(tk.conv, "_conv_gemm_kernel", Spy())
    monkeypatch.setattr(tk.conv, "_RESIDENT", {})
    monkeypatch.setattr(tk.conv, "kernel_residency", lambda kernel, dev: 1)
    monkeypatch.setattr(tk.conv, "num_sms", lambda dev: 3)
    case = CONV_CASES[0]
    g, x, xm, wt, om = _conv_inputs(70, case, torch.float32, h=40, w=40, p=0.5)
    ref = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
    sel = om.expand_as(ref)
    for cfg in (None, None, tk.ConvConfig(programs_per_sm=2)):
        y, _ = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], input_precision="ieee",
                                config=cfg)
        assert rel(y[sel], ref[sel]) < 1e-6
    assert grids == [3 * tk.conv.FIRST_LAUNCH_PROGRAMS_PER_SM, 3, 6]
    assert len(tk.conv._RESIDENT) == 1


def test_sparse_conv2d_float32_out_of_half_inputs():
    case = CONV_CASES[0]
    g, x, xm, wt, om = _conv_inputs(8, case, torch.float16)
    ref = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
    y, _ = tk.sparse_conv2d(x, xm, wt, om, case[3], case[4], out_dtype=torch.float32)
    sel = om.expand_as(ref)
    assert y.dtype == torch.float32 and rel(y[sel], ref[sel]) < 1e-5  # fp16 products are exact in fp32


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse_mask", "load_mask"])
@pytest.mark.parametrize("case", [CONV_CASES[2], CONV_CASES[6], CONV_CASES[8], CONV_CASES[1], CONV_CASES[10]],
                         ids=_conv_id)
@pytest.mark.usefixtures("tile_lists")
def test_sparse_conv2d_fused_mask_dilation(case, reuse, monkeypatch):
    """out_mask=None: the output mask is computed in the tile-list launch (for the 1x1 cases it is x's
    mask at each pixel's tap, which the K loop then reuses or loads again: same results, NaN garbage
    never read)."""
    monkeypatch.setattr(tk.conv, "REUSE_OUT_MASK", reuse)
    g, x, xm, wt, om = _conv_inputs(9, case, torch.float16)
    ref = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
    y, ym = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out_dtype=torch.float32,
                             config=tk.ConvConfig(th=8, tw=16, bn=16, bk=16))
    assert torch.equal(ym, om)
    sel = om.expand_as(ref)
    assert rel(y[sel], ref[sel]) < 1e-5


def test_sparse_conv2d_tf32_and_partial_mask():
    case = CONV_CASES[0]
    g, x, xm, wt, om = _conv_inputs(4, case, torch.float32)
    om = om & rand_mask(g, 2, 12, 11, 0.6)  # a caller-chosen subset of pixels is fine too
    ref = ref_conv(x, xm, wt, (1, 1), case[4], (1, 1), 1)
    y, _ = tk.sparse_conv2d(x, xm, wt, om, (1, 1), case[4], input_precision="tf32", out_dtype=torch.float32)
    sel = om.expand_as(ref)
    assert rel(y[sel], ref[sel]) < 3e-3


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_conv2d_split_k_residual(split_k, dtype):
    case = (16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    g, x, xm, wt, om = _conv_inputs(5, case, dtype)
    res, rm = rand_delta(g, 2, 16, 12, 11, torch.float32, 0.2)
    ref = ref_conv(x, xm, wt, (1, 1), case[4], (1, 1), 1) + zf(res, rm)
    cfg = tk.ConvConfig(th=16, tw=8, bn=16, bk=16, split_k=split_k, programs_per_sm=3)
    out = cl(torch.full(ref.shape, float("nan"), dtype=dtype, device=DEV))
    y, ym = tk.sparse_conv2d(x, xm, wt, om, (1, 1), case[4], out=out, residual=res, residual_mask=rm,
                             input_precision="ieee", config=cfg)
    assert torch.equal(ym, om | rm)
    sel = ym.expand_as(ref)
    assert rel(y[sel], ref[sel]) < (1e-5 if dtype == torch.float32 else TOL[dtype])


ACTS = ["relu", "relu6", "leaky_relu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "gelu", "gelu_tanh",
        "none"]


FUSED = [("fixup", "hardsigmoid"), ("gemm", "relu"), ("gemm", "silu"), ("gemm", "gelu"), ("gemm", "none"), ("dw", "relu6"), ("dw", "hardswish"),
         ("twopass", "leaky_relu"), ("twopass", "tanh")]


@pytest.mark.parametrize("loads_first", [True, False], ids=["loads_first", "loads_in_order"])
@pytest.mark.parametrize("variant,fn", FUSED)
@pytest.mark.usefixtures("tile_lists")
def test_sparse_conv2d_fused_act(variant, fn, loads_first, monkeypatch):
    monkeypatch.setattr(tk.conv, "EPILOGUE_LOADS_FIRST", loads_first)  # epilogue memory order (same result)
    dtype = torch.float16 if variant != "twopass" else torch.bfloat16
    case = {"gemm": (8, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
            "dw": (16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16),
            "twopass": (8, 24, (3, 3), (2, 2), (1, 0, 1, 0), (1, 1), 1),
            "fixup": (24, 16, (3, 3), (1, 1), (0, 1, 1, 0), (1, 1), 1)}[variant]
    cout = case[1]
    g, x, xm, wt, om = _conv_inputs(6, case, dtype)
    ho, wo = om.shape[2:]
    res, rm = rand_delta(g, 2, cout, ho, wo, dtype, 0.15)
    A = cl(torch.randn(2, cout, ho, wo, generator=g).to(DEV))
    E = cl(ref_act(fn, A.double(), 0.2).float() + 0.05 * torch.randn(2, cout, ho, wo, generator=g).to(DEV))
    score = "l2" if fn in ("silu", "tanh") else "max"
    tau = 0.3
    y = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6]) + zf(res, rm)
    ref = ref_nonlinear(y, om | rm, A, E, fn, tau, score, dtype, 0.2)
    cfg = tk.ConvConfig(th=16, tw=16, bn=16, bk=16, split_k={"twopass": 2, "fixup": 3}.get(variant, 1))
    act = tk.Act(fn, A, E, tau, score, slope=0.2)
    out = cl(torch.full(y.shape, float("nan"), dtype=dtype, device=DEV))
    o, fm = tk.sparse_conv2d(x, xm, wt, om, case[3], case[4], case[5], case[6], out, residual=res, residual_mask=rm,
                             act=act, config=cfg)
    check_nonlinear(o, fm, A, E, ref, TOL[dtype] * 2, tau, 0.02)


SLICE_CASES = {  # conv case, act (fused / two-pass / none), config
    "3x3-act-res": ((16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), "silu", None),
    "1x1-none": ((16, 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1), None, None),
    "packed-k": ((3, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1), "relu", None),
    "split-k-res": ((16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), None,
                    tk.ConvConfig(th=16, tw=8, bn=16, bk=16, split_k=2, programs_per_sm=3)),
    "fixup-res": ((16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), "relu",
                  tk.ConvConfig(th=16, tw=8, bn=16, bk=16, split_k=2, programs_per_sm=3)),
    "twopass-res": ((16, 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), "silu",
                    tk.ConvConfig(th=16, tw=16, bn=16, bk=16)),
    "depthwise-res": ((16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16), "relu", None),
}


@pytest.mark.parametrize("name", list(SLICE_CASES))
@pytest.mark.usefixtures("tile_lists")
def test_sparse_conv2d_reads_channel_slices_in_place(name):
    """x and the residual as channel slices of wider channels_last maps (C2f's halves, TritonBackend.channel_slice)
    give exactly what their channels_last copies give: output, emit mask and states; the depthwise kernel
    copies them first. A tensor that is neither raises."""
    case, fn, cfg = SLICE_CASES[name]
    cin, cout = case[0], case[1]
    dtype = torch.float16
    g, x, xm, wt, om = _conv_inputs(8, case, dtype)
    ho, wo = om.shape[2:]
    wide = cl(torch.randn(2, 2 * cin + 3, *x.shape[2:], generator=g).to(DEV).to(dtype))
    wide[:, cin + 3:] = x  # x at channels [cin + 3, 2 cin + 3): an odd offset and stride
    xv = wide[:, cin + 3:]
    res, rm = rand_delta(g, 2, cout, ho, wo, dtype, 0.2)
    with_res = name.endswith("-res")
    rwide = cl(torch.randn(2, cout + 8, ho, wo, generator=g).to(DEV).to(dtype))
    rwide[:, 8:] = res
    rv = rwide[:, 8:]
    assert not tk._common.is_cl(xv) and not tk._common.is_cl(rv)
    outs = []
    for xi, ri in ((x, res), (xv, rv)):
        act = None
        if fn is not None:
            A = cl(torch.randn(2, cout, ho, wo, generator=torch.Generator().manual_seed(1)).to(DEV))
            act = tk.Act(fn, A, A.clone() * 0.5, 0.05)
        kw = dict(residual=ri, residual_mask=rm) if with_res else {}
        out = cl(torch.full((2, cout, ho, wo), float("nan"), dtype=dtype if fn else torch.float32, device=DEV))
        y, fm = tk.sparse_conv2d(xi, xm, wt, om, case[3], case[4], case[5], case[6], out, act=act, config=cfg,
                                 input_precision="ieee", **kw)
        outs.append((torch.where(fm, y, 0), fm, act))
    (y1, m1, a1), (y2, m2, a2) = outs
    assert torch.equal(m1, m2) and m1.any() and torch.equal(y1, y2)
    if a1 is not None:
        assert torch.equal(a1.acc, a2.acc) and torch.equal(a1.emitted, a2.emitted)
    with pytest.raises(ValueError, match="channels_last memory, or a channel slice"):
        tk.sparse_conv2d(x.contiguous(), xm, wt, om, case[3], case[4], case[5], case[6])


def test_latency_bound_config_is_for_64_channels():
    """The measured rule (H200, YOLOv8n): a small map's 3x3 conv + update takes the latency-bound config at Cout 64,
    not at 32 or 80-256."""
    from deltacnn.backends.triton_kernels import conv
    for cout in (32, 64, 80, 128, 256):
        cfg = tk.default_config(1, 64, cout, 1, (3, 3), (36, 48), torch.float16, True)
        assert (conv.latency_bound_tile(1, cout, 1, (36, 48), cfg.split_k) is not None) == (cout == 64)
        assert ((cfg.th, cfg.tw, cfg.maxnreg) == (4, 8, None)) == (cout == 64), (cout, cfg)


@pytest.mark.parametrize("cout,tile", [(64, (4, 8, 4)), (80, (4, 8, 8)), (256, (4, 4, 8))])
@pytest.mark.usefixtures("tile_lists")
def test_latency_bound_config_fuses_the_update_and_matches_the_reference(cout, tile, monkeypatch):
    """A small map's conv + SiLU at tau > 0 (YOLOv8n's 36x48-72x96 maps): default_config keeps all Cout of a pixel
    in one program (the update fused, no sparse_nonlinear launch) with the pixels per item sized against spills,
    no register cap; that config's output, states and emitted pixels equal the reference. A large map does not
    take it, nor does the heuristic when LATENCY_BOUND_ITEMS is None. (Every Cout allowed here: the tiles of
    80-256 channels are checked too, though the shipped range leaves them out.)"""
    monkeypatch.setattr(tk.conv, "LATENCY_BOUND_COUT", (1, 256))
    cfg = tk.default_config(1, 64, cout, 1, (3, 3), (36, 48), torch.float16, True)
    assert (cfg.th, cfg.tw, cfg.num_warps) == tile and cfg.bn >= cout and cfg.maxnreg is None
    big = tk.default_config(1, 64, cout, 1, (3, 3), (270, 480), torch.float16, True)
    from deltacnn.backends.triton_kernels import conv
    old, conv.LATENCY_BOUND_ITEMS = conv.LATENCY_BOUND_ITEMS, None
    try:
        assert tk.default_config(1, 64, cout, 1, (3, 3), (36, 48), torch.float16, True) != cfg
        assert tk.default_config(1, 64, cout, 1, (3, 3), (270, 480), torch.float16, True) == big
    finally:
        conv.LATENCY_BOUND_ITEMS = old
    dtype, case = torch.float16, (16, cout, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    g, x, xm, wt, om = _conv_inputs(9, case, dtype, h=9, w=10, n=1)
    A = cl(torch.randn(1, cout, 9, 10, generator=g).to(DEV))
    E = cl(ref_act("silu", A.double(), 0.0).float() + 0.05 * torch.randn(1, cout, 9, 10, generator=g).to(DEV))
    tau = 0.3
    y = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
    ref = ref_nonlinear(y, om, A, E, "silu", tau, "l2", dtype, 0.0)
    run_cfg = tk.ConvConfig(th=cfg.th, tw=cfg.tw, bn=cfg.bn, bk=16, num_warps=cfg.num_warps, maxnreg=None)
    out = cl(torch.full(y.shape, float("nan"), dtype=dtype, device=DEV))
    o, fm = tk.sparse_conv2d(x, xm, wt, om, case[3], case[4], case[5], case[6], out,
                             act=tk.Act("silu", A, E, tau, "l2"), config=run_cfg)
    check_nonlinear(o, fm, A, E, ref, TOL[dtype] * 2, tau, 0.02)


@pytest.mark.parametrize("variant", ["gemm", "fixup", "grouped", "dw"])
def test_sparse_conv2d_split_channel_emit_tau0(variant):
    """tau 0 with Cout split over programs: each program emits its channels and ORs the pixel flag.

    Some pixels get no change in any channel (ReLU stays at 0: not emitted), others none in the
    first channel block only (emitted, with zeros there); the emit mask must equal the reference's
    exactly and every emitted value must be written.
    """
    dtype = torch.float16
    case = {"gemm": (8, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
            "fixup": (24, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
            "grouped": (8, 40, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 2),
            "dw": (40, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 40)}[variant]
    cout = case[1]
    g, x, xm, wt, om = _conv_inputs(11, case, dtype)
    n, _, ho, wo = om.shape
    A = torch.randn(n, cout, ho, wo, generator=g).to(DEV)
    pix = torch.rand(n, 1, ho, wo, generator=g).to(DEV)
    A = torch.where(pix < 0.3, torch.full((), -1e3, device=DEV), A)  # stays negative: no change anywhere
    first = (pix >= 0.3) & (pix < 0.6) & (torch.arange(cout, device=DEV) < 16).reshape(1, cout, 1, 1)
    A = torch.where(first, torch.full((), -1e3, device=DEV), A)  # no change in the first channel block
    E = ref_act("relu", A.double()).float()
    E = torch.where(A < -100, E, E + 0.05 * torch.randn(E.shape, generator=g).to(DEV))
    A, E = cl(A), cl(E)
    y = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
    ref = ref_nonlinear(y, om, A, E, "relu", 0.0, "max", dtype)
    split = 2 if variant == "fixup" else 1
    cfg = tk.ConvConfig(th=8, tw=8, bn=16, bk=16, split_k=split)
    out = cl(torch.full(y.shape, float("nan"), dtype=dtype, device=DEV))
    o, fm = tk.sparse_conv2d(x, xm, wt, om, case[3], case[4], case[5], case[6], out,
                             act=tk.Act("relu", A, E, 0.0), config=cfg)
    A2, E2, o_ref, emit, _ = ref
    assert emit.any() and (om & ~emit).any(), "the case must have both emitted and silent candidates"
    assert torch.equal(fm, emit)
    sel = emit.expand_as(o_ref)
    assert rel(out.double()[sel], o_ref[sel]) < TOL[dtype] * 2
    assert rel(A, A2) < 1e-6 and rel(E, E2) < 1e-4  # E holds o rounded to fp16 (summation order may flip an ulp)


# ---------------------------------------------------------------- pointwise kernels
@pytest.mark.parametrize("fn", ACTS)
def test_activations(fn):
    g = torch.Generator().manual_seed(17)
    d, dm = rand_delta(g, 1, 4, 5, 6, torch.float32, 0.6)
    A = cl(3 * torch.randn(1, 4, 5, 6, generator=g).to(DEV))
    E = cl(ref_act(fn, A.double(), 0.2).float() + 0.1 * torch.randn(1, 4, 5, 6, generator=g).to(DEV))
    ref = ref_nonlinear(zf(d, dm), dm, A, E, fn, 0.05, "max", torch.float32, 0.2)
    o, fm = tk.sparse_nonlinear(d, dm, A, E, fn, 0.05, "max", slope=0.2)
    check_nonlinear(o, fm, A, E, ref, 1e-5, 0.05, 1e-4)



@pytest.mark.parametrize("c,dtype", [(5, torch.float32), (16, torch.float16), (16, torch.bfloat16),
                                     (16, torch.float32), (260, torch.float16)], ids=str)
def test_sparse_nonlinear(c, dtype):
    g = torch.Generator().manual_seed(7 + c)
    d, dm = rand_delta(g, 2, c, 7, 9, dtype, 0.4)
    A = cl(torch.randn(2, c, 7, 9, generator=g).to(DEV))
    E = cl(torch.relu(A) + 0.1 * torch.randn(2, c, 7, 9, generator=g).to(DEV))
    for fn, score in (("relu", "max"), ("gelu", "l2"), ("leaky_relu", "max")):
        tau = 0.2 if score == "max" else 0.2 * c ** 0.5
        ref = ref_nonlinear(zf(d, dm), dm, A, E, fn, tau, score, dtype, 0.1)
        out = cl(torch.full(d.shape, float("nan"), dtype=dtype, device=DEV))
        o, fm = tk.sparse_nonlinear(d, dm, A, E, fn, tau, score, out=out, slope=0.1)
        check_nonlinear(o, fm, A, E, ref, 1e-5 if dtype == torch.float32 else TOL[dtype], tau, 1e-3)


# ---------------------------------------------------------------- keyframe seeding (dense pass)
SEED_SPECS = [ActSpec("identity"), ActSpec("relu"), ActSpec("relu6"), ActSpec("leaky_relu", slope=0.2), ActSpec("silu"),
              ActSpec("sigmoid"), ActSpec("hardswish"), ActSpec("hardsigmoid"), ActSpec("tanh"), ActSpec("gelu"),
              ActSpec("gelu", approximate="tanh"), ActSpec("hardtanh", min_val=-0.5, max_val=2.0),
              ActSpec("elu", alpha=0.7)]
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # relative, at 1.0
# the kernel's float32 exp/erf differ from PyTorch's in the last bits: an ulp or two of the model dtype
# (absolute near 0, where GELU's 1 + erf(x) cancels)
SEED_TOL = {dt: dict(rtol=2 * u, atol=4 * u if dt == torch.float32 else u) for dt, u in ULP.items()}
# the Triton 3.6 interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even)
BF16_TRUNCATES = os.environ.get("TRITON_INTERPRET") == "1"


def ref_seed(y, residual, spec, bias=None):
    """What a conv keyframe stores without the fused pass (PyTorch's y.add_(bias) after cuDNN, then
    DeltaConv2d: y.add_(residual), then DeltaLayer._seed_act): (output in y.dtype, A, E)."""
    v = y.clone()
    if bias is not None:
        v.add_(bias.view(1, -1, 1, 1))
    if residual is not None:
        v.add_(residual)
    a = v.to(torch.float32, copy=True)
    out = spec.apply_(v) if spec.commutes_with_rounding else spec(a).to(y.dtype)
    return out, a, out.float()


@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("with_res", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [5, 300])
def test_seed_act_state(c, dtype, with_res, with_bias):
    """One pass writes y = f(y + bias + r), A and E exactly as the PyTorch keyframe path does: bit for
    bit for the activations that commute with rounding, within an ulp or two of the model dtype for
    the rest; a stateless dense frame (no A, E) writes the same y."""
    g = torch.Generator().manual_seed(c + 100 * with_res + 1000 * with_bias)
    # c = 5: one partly masked channel block; c = 300: two, the second partly masked (few pixels: the
    # interpreter is slow)
    shape = (2, c, 3, 11) if c < 100 else (1, c, 2, 3)
    y = cl((2 * torch.randn(shape, generator=g) + 0.1).to(DEV).to(dtype))
    r = cl(torch.randn(shape, generator=g).to(DEV).to(dtype)) if with_res else None
    bias = torch.randn(c, generator=g).to(DEV).to(dtype) if with_bias else None
    faithful = dtype != torch.bfloat16 or not BF16_TRUNCATES
    for spec in SEED_SPECS:
        out_ref, a_ref, e_ref = ref_seed(y, r, spec, bias)
        A = cl(torch.full(shape, float("nan"), device=DEV))
        E = cl(torch.full(shape, float("nan"), device=DEV))
        out = y.clone()
        assert tk.seed_act_state_(out, r, A, E, tk.Act.from_spec(spec, A, E, 0.0), bias) is out
        assert torch.equal(E, out.float()), spec  # E is exactly what was sent
        stateless = y.clone()
        tk.seed_act_state_(stateless, r, None, None, tk.Act.from_spec(spec, A, E, 0.0), bias)
        assert torch.equal(stateless, out), spec
        if not faithful:  # each truncated add is off by up to an ulp of its (|value| < 8) result
            torch.testing.assert_close(A, a_ref, rtol=2 * ULP[dtype], atol=8 * ULP[dtype])
            torch.testing.assert_close(out, out_ref, rtol=4 * ULP[dtype], atol=8 * ULP[dtype])
            continue
        assert torch.equal(A, a_ref), spec
        if spec.commutes_with_rounding:
            assert torch.equal(out, out_ref) and torch.equal(E, e_ref), spec
        else:
            torch.testing.assert_close(out, out_ref, **SEED_TOL[dtype], msg=lambda m: f"{spec.describe()}: {m}")
            torch.testing.assert_close(E, e_ref, **SEED_TOL[dtype], msg=lambda m: f"{spec.describe()}: {m}")


def test_seed_act_state_checks_layouts():
    A = cl(torch.zeros(1, 4, 2, 3, device=DEV))
    y = torch.ones(1, 4, 2, 3, device=DEV)  # NCHW
    with pytest.raises(ValueError, match="channels_last"):
        tk.seed_act_state_(y, None, A, A.clone(), "relu")
    with pytest.raises(ValueError, match="float32"):
        tk.seed_act_state_(cl(y), None, A.half(), A, "relu")
    with pytest.raises(ValueError, match="residual"):
        tk.seed_act_state_(cl(y), cl(torch.ones(1, 4, 2, 2, device=DEV)), A, A.clone(), "relu")
    with pytest.raises(ValueError, match="both"):
        tk.seed_act_state_(cl(y), None, A, None, "relu")
    with pytest.raises(ValueError, match="bias"):
        tk.seed_act_state_(cl(y), None, A, A.clone(), "relu", torch.ones(3, device=DEV))


def test_sparse_add_reads_channel_slices_in_place():
    """C2f's shortcut add of a channel half: a and b as channel slices of wider maps equal their copies."""
    g = torch.Generator().manual_seed(19)
    a, am = rand_delta(g, 2, 24, 6, 5, torch.float16)
    b, bm = rand_delta(g, 2, 24, 6, 5, torch.float16)
    wa = cl(torch.randn(2, 48, 6, 5, generator=g).to(DEV).half())
    wb = cl(torch.randn(2, 29, 6, 5, generator=g).to(DEV).half())
    wa[:, 24:], wb[:, 5:] = a, b
    s1, m1 = tk.sparse_add(a, am, b, bm)
    s2, m2 = tk.sparse_add(wa[:, 24:], am, wb[:, 5:], bm)
    assert torch.equal(m1, m2) and torch.equal(torch.where(m1, s1, 0), torch.where(m2, s2, 0))
    with pytest.raises(ValueError, match="channel slice"):
        tk.sparse_add(a.contiguous(), am, b, bm)


@pytest.mark.parametrize("c", [3, 40, 260])
def test_sparse_add_and_accumulate(c):
    g = torch.Generator().manual_seed(11)
    a, am = rand_delta(g, 2, c, 6, 5, torch.float16)
    b, bm = rand_delta(g, 2, c, 6, 5, torch.float32)
    out = cl(torch.full(a.shape, float("nan"), dtype=torch.float32, device=DEV))
    s, sm = tk.sparse_add(a, am, b, bm, out=out)
    u = am | bm
    assert torch.equal(sm, u)
    ref = zf(a, am) + zf(b, bm)
    assert rel(s[u.expand_as(s)], ref[u.expand_as(s)]) < 1e-6
    O = cl(torch.randn(2, c, 6, 5, generator=g).to(DEV))
    O_ref = O.double() + zf(a, am)
    tk.accumulate_(O, a, am)
    assert rel(O, O_ref) < 1e-7


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("score", ["max", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparsify(k, score, dtype):
    g = torch.Generator().manual_seed(13 + k)
    c = 3 if k != 2 else 70
    x = torch.randn(2, c, 9, 10, generator=g).to(DEV)
    # frames arrive NCHW (read in place) or channels_last; a half frame is read as float32 too
    x = cl(x) if score == "max" else x
    if k == 3 and score == "l2":
        x = x.half().float()
        x_in = x.half()
    else:
        x_in = x
    ref = cl((x + 0.3 * torch.randn(2, c, 9, 10, generator=g).to(DEV) * (torch.rand(2, 1, 9, 10, generator=g).to(DEV) < 0.2)))
    ref0 = ref.clone()
    tau = 0.5
    dd = x.double() - ref0.double()
    s = dd.abs().amax(1, keepdim=True) if score == "max" else dd.norm(dim=1, keepdim=True)
    m = s > tau
    if k > 1:
        m = ref_dilate(m, (k, k), (1, 1), (k // 2, k // 2, k // 2, k // 2), (1, 1))[..., :9, :10]
    d, dm = tk.sparsify(x_in, ref, tau, k, score, out_dtype=dtype)
    assert torch.equal(dm, m)
    sel = m.expand_as(dd)
    assert rel(d[sel], dd[sel]) < TOL[dtype]
    ref_new = torch.where(m, ref0.double() + d.double(), ref0.double())
    assert rel(ref, ref_new) < 1e-7


@pytest.mark.parametrize("factors,c,dtype", [((2, 2), 24, torch.float16), ((1, 3), 70, torch.float32),
                                             ((3, 2), 5, torch.float16)])
def test_upsample_nearest(factors, c, dtype):
    """Nearest upsampling of a delta by integer factors, against F.interpolate on the zero-filled delta and its
    mask (what the generic path, dense_linear, runs); the NaN at unsent pixels never reaches a sent one."""
    g = torch.Generator().manual_seed(31 + c)
    v, m = rand_delta(g, 2, c, 5, 7, dtype, p=0.3)
    out, om = tk.upsample_nearest(v, m, factors)
    want_m = F.interpolate(m.float(), scale_factor=factors, mode="nearest") > 0
    want = F.interpolate(zf(v, m), scale_factor=factors, mode="nearest")
    assert torch.equal(om, want_m) and om.any() and not om.all() and tk._common.is_cl(out)
    sel = want_m.expand_as(out)
    assert torch.equal(out[sel].double(), want[sel])
    with pytest.raises(ValueError, match="integers >= 1"):
        tk.upsample_nearest(v, m, (0, 2))


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("score,bordered", [("max", False), ("l2", False), ("max", True)])
def test_sparsify_opened_by_small_blob_gate(k, score, bordered, monkeypatch):
    """open_k: the sent mask is the changed mask opened by a k x k square, as deltacnn.gating.opening (max pools)
    computes it, on a frame with isolated changed pixels (held back), blobs of several sizes (kept, or eroded at
    their edges) and blobs at the image borders; values, reference update and bordered copy as sparsify's."""
    from deltacnn.backends.triton_kernels import pointwise
    from deltacnn.gating import opening
    monkeypatch.setattr(pointwise, "ERODE_PIXELS", 64)  # several erosion programs on a small frame
    g = torch.Generator().manual_seed(29 + k)
    n, c, h, w, tau = 2, 3, 19, 27, 0.2
    ref = torch.rand(n, c, h, w, generator=g)
    x = ref + 0.5 * torch.randn(n, c, h, w, generator=g) * (torch.rand(n, 1, h, w, generator=g) < 0.1)
    # (stream, y, x, height, width); the thin ones on the image edge are kept only because the window's
    # out-of-image pixels do not erode them
    for (i, y0, x0, sy, sx) in [(0, 3, 4, 6, 6), (0, 0, 0, 4, 4), (1, 10, 21, 6, 6), (1, 15, 2, 3, 3),
                                (0, 12, 12, 2, 2), (1, 0, 9, 5, 5), (0, 0, 14, k // 2 + 1, 7), (1, 8, 0, 7, k // 2 + 1)]:
        x[i, :, y0:y0 + sy, x0:x0 + sx] += 0.7
    x, ref = x.to(DEV), cl(ref.to(DEV))
    ref0 = ref.clone()
    dd = x.double() - ref0.double()
    s = dd.abs().amax(1, keepdim=True) if score == "max" else dd.norm(dim=1, keepdim=True)
    strong = s > tau
    want = opening(strong.float(), k) > 0
    assert 0 < int(want.sum()) < int(strong.sum())  # something sent, something held back
    buf = tk.bordered_like(n, c, h, w, torch.float16, DEV) if bordered else None
    d, dm = tk.sparsify(x, ref, tau, 1, score, out_dtype=torch.float16, bordered=buf, open_k=k)
    assert torch.equal(dm, want)
    sel = want.expand_as(dd)
    assert rel(d[sel], dd[sel]) < TOL[torch.float16]
    assert rel(ref, torch.where(want, ref0.double() + d.double(), ref0.double())) < 1e-7
    if bordered:
        bvals, _, border = buf
        zb = torch.zeros_like(bvals)
        zb[:, border:border + h, border:border + w, :c] = torch.where(dm, d, torch.zeros((), dtype=d.dtype, device=DEV)).permute(0, 2, 3, 1)
        assert torch.equal(bvals, zb)
    with pytest.raises(ValueError, match="open_k must be odd"):
        tk.sparsify(x, ref, tau, 3, score, open_k=k)


@pytest.mark.parametrize("window", [((3, 3), (2, 2), (1, 1, 1, 1)), ((2, 2), (2, 2), (0, 0, 0, 0)),
                                    ((3, 2), (1, 2), (1, 1, 0, 1))])
def test_maxpool_update(window):
    """Max pooling of the accumulated input at candidate pixels, against float64 PyTorch."""
    kernel, stride, pad = window
    g = torch.Generator().manual_seed(17)
    n, c, h, w, tau = 2, 24, 11, 13, 0.05
    A = cl(torch.randn(n, c, h, w, generator=g).to(DEV))
    xm = rand_mask(g, n, h, w, 0.15)
    t, b, l, r = pad
    pooled = F.max_pool2d(F.pad(A.double(), (l, r, t, b), value=float("-inf")), kernel, stride)
    ho, wo = pooled.shape[2:]
    cand = ref_dilate(xm, kernel, stride, pad, (1, 1))[..., :ho, :wo]
    moved = (torch.rand(n, 1, ho, wo, generator=g) < 0.5).to(DEV)  # elsewhere E is up to date: no emit
    E = cl((pooled + 0.1 * torch.randn(n, c, ho, wo, generator=g).to(DEV).double() * moved).float())
    E0 = E.clone()
    o_want = pooled - E0.double()
    s = o_want.abs().amax(1, keepdim=True)
    emit = cand & (s > tau)
    out, fm = tk.maxpool_update(A, tk.dilate_mask(xm, kernel, stride, pad, (1, 1), (ho, wo)), E, kernel, stride,
                                pad, (1, 1), tau)
    assert torch.equal(fm, emit) and emit.any() and (cand & ~emit).any()
    sel = emit.expand_as(o_want)
    assert rel(out.double()[sel], o_want[sel]) < 1e-7
    E_want = torch.where(emit, pooled, E0.double())
    assert rel(E.double(), E_want) < 1e-7


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparsify_bordered_copy(k, dtype, monkeypatch):
    """Over frames whose changes move, the bordered copy always equals the zero-filled delta inside
    a zero border: blocks sent earlier but not now are cleared, untouched ones stay zero."""
    from deltacnn.backends.triton_kernels import pointwise
    monkeypatch.setattr(pointwise, "SPARSIFY_MAX_PIXELS", 16)  # many program blocks on a small frame
    g = torch.Generator().manual_seed(5 + k)
    n, c, h, w = 2, 3, 9, 13
    ref = cl(torch.randn(n, c, h, w, generator=g).to(DEV))
    bvals, flags, border = tk.bordered_like(n, c, h, w, dtype, DEV)
    x = ref.clone()
    for t in range(4):
        moved = torch.zeros(n, 1, h, w, dtype=torch.bool)
        moved[:, :, 2 * t:2 * t + 3, (3 * t) % w:(3 * t) % w + 4] = True  # a patch that moves each frame
        x = x + (torch.randn(n, c, h, w, generator=g) * moved).to(DEV)
        d, dm = tk.sparsify(x, ref, 0.05, k, "max", out_dtype=dtype, bordered=(bvals, flags, border))
        want = torch.zeros_like(bvals)
        want[:, border:border + h, border:border + w, :c] = torch.where(dm, d, torch.zeros((), dtype=dtype, device=DEV)).permute(0, 2, 3, 1)
        assert dm.any() and torch.equal(bvals, want), f"frame {t}"


def test_launch_opts_off_without_hopper_gpu(monkeypatch):
    """Programmatic dependent launch only on CUDA devices of compute capability >= 9, never in the
    interpreter; kernels then skip griddepcontrol (the interpreter cannot run it)."""
    from deltacnn.backends.triton_kernels import _common
    assert _common.launch_opts(torch.device("cpu")) == {"GDC": 0}
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "_CAPS", {0: True, 1: False})
    assert _common.PDL == "auto"  # the default (session 21: -5% a YOLOv8n delta frame at batch 1 on an H200)
    assert _common.launch_opts(torch.device("cuda", 0)) == {"GDC": 2, "launch_pdl": True}
    assert _common.launch_opts(torch.device("cuda", 1)) == {"GDC": 0}
    assert _common.launch_opts(torch.device("cuda", 0), long_running=True) == {"GDC": 1, "launch_pdl": True}
    monkeypatch.setattr(_common, "PDL", "early")
    assert _common.launch_opts(torch.device("cuda", 0), long_running=True) == {"GDC": 2, "launch_pdl": True}
    monkeypatch.setattr(_common, "PDL", "short")
    assert _common.launch_opts(torch.device("cuda", 0), long_running=True) == {"GDC": 0}
    assert _common.launch_opts(torch.device("cuda", 0)) == {"GDC": 2, "launch_pdl": True}
    monkeypatch.setattr(_common, "PDL", "exit")
    assert _common.launch_opts(torch.device("cuda", 0)) == {"GDC": 1, "launch_pdl": True}
    monkeypatch.setattr(_common, "PDL", "off")
    assert _common.launch_opts(torch.device("cuda", 0)) == {"GDC": 0}


@pytest.mark.parametrize("chans", [(5,), (3, 40), (16, 8, 260), (8, 8, 16, 4), (4, 6, 8, 3, 5, 7)])
def test_sparse_cat(chans):
    g = torch.Generator().manual_seed(17 + len(chans))
    dts = [torch.float16, torch.float32]
    ds = [rand_delta(g, 2, c, 5, 7, dts[i % 2] if len(chans) > 1 else torch.float16, p=0.3)
          for i, c in enumerate(chans)]
    out, m = tk.sparse_cat([v for v, _ in ds], [mk for _, mk in ds])
    u = ds[0][1]
    for _, mk in ds[1:]:
        u = u | mk
    assert torch.equal(m, u)
    assert out.dtype == (torch.float32 if len(chans) > 1 else torch.float16) and tk._common.is_cl(out)
    ref = torch.cat([zf(v, mk) for v, mk in ds], 1)
    sel = u.expand_as(out)
    assert torch.equal(out[sel].double(), ref[sel])  # a copy: exact, zeros where an input was not updated


def test_sparse_cat_rejects_bad_inputs():
    v = cl(torch.ones(1, 4, 3, 3, device=DEV))
    m = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="one mask per input"):
        tk.sparse_cat([v, v], [m])
    with pytest.raises(ValueError, match="shape"):
        tk.sparse_cat([v, cl(torch.ones(1, 4, 3, 2, device=DEV))], [m, m])
    with pytest.raises(ValueError, match="channels_last"):
        tk.sparse_cat([torch.ones(1, 4, 3, 3, device=DEV)], [m])
