"""Triton kernels on a real GPU at realistic shapes (skipped without CUDA)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_triton_kernels import (TOL, check_nonlinear, cl, ref_act, ref_conv, ref_dilate, ref_nonlinear,  # noqa: E402
                                 rel, zf)

from deltacnn.backends import triton_kernels as tk  # noqa: E402
from deltacnn.tensor import Bordered  # noqa: E402


def blob_and_noise(n, h, w, p_noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, 1, h, w, generator=g) < p_noise
    for i in range(n):
        y, x = torch.randint(0, h - 12, (2,), generator=g).tolist()
        m[i, :, y:y + 12, x:x + 17] = True
    return m.cuda()


def delta(n, c, h, w, dtype, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, c, h, w, generator=g).cuda().to(dtype)
    return cl(torch.where(m, v, torch.full((), float("nan"), dtype=dtype, device="cuda")))


CASES = [(64, 64, 3, 1, 1), (256, 256, 3, 1, 1), (64, 256, 1, 1, 1), (128, 128, 3, 2, 1), (96, 96, 3, 1, 96),
         (64, 64, 3, 1, 2), (32, 64, 5, 2, 1), (3, 64, 7, 2, 1), (1024, 256, 1, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_realistic(case, dtype):
    cin, cout, k, s, groups = case
    n, h, w = 2, 68, 120
    xm = blob_and_noise(n, h, w, seed=cin)
    x = delta(n, cin, h, w, dtype, xm, seed=k)
    wt = (torch.randn(cout, cin // groups, k, k) / (cin // groups * k * k) ** 0.5).cuda().to(dtype)
    pad = (k // 2,) * 4
    om = tk.dilate_mask(xm, (k, k), (s, s), pad, (1, 1))
    assert torch.equal(om, ref_dilate(xm, (k, k), (s, s), pad, (1, 1)))
    ref = ref_conv(x, xm, wt, (s, s), pad, (1, 1), groups)
    out = cl(torch.full(ref.shape, float("nan"), dtype=dtype, device="cuda"))
    y, _ = tk.sparse_conv2d(x, xm, wt, om, (s, s), pad, (1, 1), groups, out, input_precision="ieee")
    sel = om.expand_as(ref)
    assert rel(y[sel], ref[sel]) < TOL[dtype]
    if dtype == torch.float32:
        y, _ = tk.sparse_conv2d(x, xm, wt, om, (s, s), pad, (1, 1), groups, input_precision="tf32")
        assert rel(y[sel], ref[sel]) < 3e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_stem_window_rows_from_sparsify(dtype):
    """The R50 stem at 270x480 (batch 2), fed by sparsify's bordered copy over three frames whose
    changed blob moves: window rows (aligned vector loads on the GPU) match F.conv2d and the per-tap
    gathers, with the fused ReLU update."""
    n, h, w = 2, 270, 480
    g = torch.Generator().manual_seed(3)
    frame = cl(torch.randn(n, 3, h, w, generator=g).cuda())
    ref_img = frame.clone()
    bordered = tk.bordered_like(n, 3, h, w, dtype, "cuda")
    wt = (torch.randn(64, 3, 7, 7, generator=g) / 147 ** 0.5).cuda().to(dtype)
    pad, ho, wo = (3, 3, 3, 3), 135, 240
    for t in range(3):
        m = blob_and_noise(n, h, w, seed=10 + t)
        frame = frame + torch.randn(n, 3, h, w, generator=g).cuda() * m
        x, xm = tk.sparsify(frame, ref_img, 0.0, 1, "max", out_dtype=dtype, bordered=bordered)
        bd = Bordered(bordered[0], bordered[2])
        assert tk.window_plan(tuple(x.shape), tuple(wt.shape), (2, 2), pad, (1, 1), 1, (ho, wo), bd) is not None
        ref = ref_conv(x, xm, wt, (2, 2), pad, (1, 1), 1)
        ys = []
        for b in (bd, None):
            om = tk.dilate_mask(xm, (7, 7), (2, 2), pad, (1, 1))
            y, _ = tk.sparse_conv2d(x, xm, wt, om, (2, 2), pad, (1, 1), 1, out_dtype=torch.float32,
                                    input_precision="ieee", bordered=b)
            sel = om.expand_as(ref)
            assert rel(y[sel], ref[sel]) < (1e-5 if dtype == torch.float32 else 1e-6), (t, b is None)
            ys.append(y[sel])
        assert rel(ys[0], ys[1]) < 1e-6
        A0 = cl(torch.randn(n, 64, ho, wo, generator=g).cuda())
        outs = []
        for b in (bd, None):
            A, E = A0.clone(), torch.relu(A0)
            o, fm = tk.sparse_conv2d(x, xm, wt, None, (2, 2), pad, (1, 1), 1, input_precision="ieee", bordered=b,
                                     act=tk.Act("relu", A, E))
            outs.append((A, E, fm))
        assert torch.equal(outs[0][2], outs[1][2])
        assert rel(outs[0][0], outs[1][0]) < 1e-6 and rel(outs[0][1], outs[1][1]) < 1e-6


@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("cout,fn", [(128, "relu"), (256, "silu"), (512, "gelu")])
def test_fused_residual_act(cout, fn, split_k):
    n, h, w, cin = 1, 68, 120, 128
    xm = blob_and_noise(n, h, w, seed=3)
    x = delta(n, cin, h, w, torch.float16, xm, seed=4)
    wt = (torch.randn(cout, cin, 3, 3) / (cin * 9) ** 0.5).cuda().half()
    om = tk.dilate_mask(xm, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    rm = blob_and_noise(n, h, w, seed=5)
    res = delta(n, cout, h, w, torch.float16, rm, seed=6)
    A = cl(torch.randn(n, cout, h, w, device="cuda"))
    E = cl(ref_act(fn, A.double()).float() + 0.01 * torch.randn(n, cout, h, w, device="cuda"))
    tau = 0.05
    y = ref_conv(x, xm, wt, (1, 1), (1, 1, 1, 1), (1, 1), 1) + zf(res, rm)
    ref = ref_nonlinear(y, om | rm, A, E, fn, tau, "max", torch.float16)
    cfg = tk.ConvConfig(split_k=split_k) if split_k > 1 else None
    o, fm = tk.sparse_conv2d(x, xm, wt, om, (1, 1), (1, 1, 1, 1), residual=res, residual_mask=rm,
                             act=tk.Act(fn, A, E, tau, "max"), config=cfg)
    check_nonlinear(o, fm, A, E, ref, 3e-3, tau, 0.01)


def test_cuda_graph_capture_and_replay():
    n, h, w, c = 1, 68, 120, 64
    xm = torch.zeros(n, 1, h, w, dtype=torch.bool, device="cuda")
    x = cl(torch.randn(n, c, h, w, device="cuda").half())
    wt = (torch.randn(c, c, 3, 3, device="cuda") / 24).half()
    prep = tk.prepare_weight(wt, 1, torch.float16)
    A = cl(torch.zeros(n, c, h, w, device="cuda"))
    E = cl(torch.zeros(n, c, h, w, device="cuda"))
    out = cl(torch.empty(n, c, h, w, device="cuda", dtype=torch.float16))
    S = cl(torch.zeros(n, c, h, w, device="cuda"))

    def frame():
        om = tk.dilate_mask(xm, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
        o, fm = tk.sparse_conv2d(x, xm, wt, om, (1, 1), (1, 1, 1, 1), out=out, prepared=prep,
                                 act=tk.Act("relu", A, E, 0.0))
        tk.accumulate_(S, o, fm)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        frame()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        frame()
    A.zero_(), E.zero_(), S.zero_()
    dense = torch.zeros(n, c, h, w, dtype=torch.float64, device="cuda")
    for t in range(5):  # the blob moves; inputs change in place; tau = 0 tracks relu(sum of convs) exactly
        xm.zero_()
        xm[..., 10 + 5 * t:30 + 5 * t, 20 + 7 * t:45 + 7 * t] = True
        x.copy_(cl(torch.randn(n, c, h, w, device="cuda").half()))
        g.replay()
        dense += ref_conv(x, xm, wt, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    torch.cuda.synchronize()
    assert rel(A, dense) < 1e-5
    assert rel(S, torch.relu(dense)) < 2e-3


@pytest.mark.parametrize("c,k,groups", [(256, 3, 1), (64, 1, 1), (96, 3, 96)], ids=["fixup", "1x1", "depthwise"])
def test_one_wave_grid_and_counter_reset_in_a_graph(c, k, groups):
    """After a launch signature's first launch the conv grid is the programs that fit an SM (recorded from
    the compiled kernel); replays of a captured frame that reuse one counter at zero, one-pixel and blob
    masks (fewer and more work items than programs) stay exact and leave the counter zeroed."""
    n, h, w = 1, 68, 120
    pad = (k // 2,) * 4
    xm = torch.zeros(n, 1, h, w, dtype=torch.bool, device="cuda")
    x = cl(torch.randn(n, c, h, w, device="cuda").half())
    wt = (torch.randn(c, c // groups, k, k, device="cuda") / (c // groups * k * k) ** 0.5).half()
    prep = tk.prepare_weight(wt, groups, torch.float16)
    A = cl(torch.zeros(n, c, h, w, device="cuda"))
    E = cl(torch.zeros(n, c, h, w, device="cuda"))
    out = cl(torch.empty(n, c, h, w, device="cuda", dtype=torch.float16))
    counter = torch.zeros(2, dtype=torch.int32, device="cuda")
    tk.conv._RESIDENT.clear()

    def frame():
        tk.sparse_conv2d(x, xm, wt, None, (1, 1), pad, (1, 1), groups, out=out, prepared=prep,
                         act=tk.Act("relu", A, E, 0.0), counter=counter)
    xm[..., 5:9, 7:30] = True
    frame()  # the first launch records the residency
    torch.cuda.synchronize()
    assert tk.conv._RESIDENT and all(1 <= v <= 32 for v in tk.conv._RESIDENT.values()), tk.conv._RESIDENT
    print("programs per SM:", sorted(tk.conv._RESIDENT.values()))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        frame()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        frame()
    A.zero_(), E.zero_()
    dense = torch.zeros(n, c, h, w, dtype=torch.float64, device="cuda")
    for t, kind in enumerate(("empty", "pixel", "blob", "empty", "blob", "pixel", "dense")):
        xm.zero_()
        if kind == "pixel":
            xm[..., 30, 3 + t] = True
        elif kind == "blob":
            xm[..., 10 + 5 * t:30 + 5 * t, 20 + 7 * t:45 + 7 * t] = True
        elif kind == "dense":
            xm.fill_(True)
        x.copy_(cl(torch.randn(n, c, h, w, device="cuda").half()))
        g.replay()
        dense += ref_conv(x, xm, wt, (1, 1), pad, (1, 1), groups)
        torch.cuda.synchronize()
        assert counter.tolist() == [0, 0], kind
        assert rel(A, dense) < 1e-5, kind
    assert rel(E, torch.relu(dense)) < 2e-3


def test_pointwise_gpu():
    n, h, w = 2, 135, 240
    m = blob_and_noise(n, h, w, seed=9)
    for c, dtype in ((512, torch.float16), (64, torch.bfloat16)):
        d = delta(n, c, h, w, dtype, m, seed=c)
        A = cl(torch.randn(n, c, h, w, device="cuda"))
        E = cl(torch.relu(A) + 0.01)
        ref = ref_nonlinear(zf(d, m), m, A, E, "relu", 0.1, "l2", dtype)
        o, fm = tk.sparse_nonlinear(d, m, A, E, "relu", 0.1, "l2")
        check_nonlinear(o, fm, A, E, ref, TOL[dtype], 0.1, 1e-3)
        S = cl(torch.randn(n, c, h, w, device="cuda"))
        S_ref = S.double() + zf(d, m)
        tk.accumulate_(S, d, m)
        assert rel(S, S_ref) < 1e-7
        s2, m2 = tk.sparse_add(d, m, d, m)
        assert torch.equal(m2, m) and rel(s2[m.expand_as(s2)], 2 * zf(d, m)[m.expand_as(s2)]) < TOL[dtype]
    x = cl(torch.randn(1, 3, 1080, 1920, device="cuda"))
    ref = x.clone()
    ref[..., 100:200, 300:500] += 1.0
    ref0 = ref.clone()
    d, dm = tk.sparsify(x, ref, 0.5, 3, out_dtype=torch.float16)
    mm = torch.zeros_like(dm)
    mm[..., 99:201, 299:501] = True
    assert torch.equal(dm, mm)
    assert rel(d[mm.expand_as(d)], (x - ref0)[mm.expand_as(d)]) < 1e-3
    assert torch.allclose(ref[mm.expand_as(ref)], ref0[mm.expand_as(ref)] + d[mm.expand_as(d)].float())


@pytest.mark.parametrize("tau", [0.0, 0.02])
@pytest.mark.parametrize("case", [(256, 256, 3, 1), (64, 256, 1, 1), (128, 128, 3, 2), (1024, 256, 1, 1)], ids=str)
def test_conv_pixel_lists_realistic(case, tau, monkeypatch):
    """Work units of listed candidate pixels against whole tiles and the float64 reference, on
    scattered masks at realistic shapes (split-K fixup on the 68x120 maps, residual, fused ReLU)."""
    from deltacnn.backends.triton_kernels import conv
    cin, cout, k, s = case
    n, h, w = 2, 68, 120
    xm = blob_and_noise(n, h, w, p_noise=0.02, seed=cin + k)
    x = delta(n, cin, h, w, torch.float16, xm, seed=k)
    wt = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).cuda().half()
    pad = (k // 2,) * 4
    om = ref_dilate(xm, (k, k), (s, s), pad, (1, 1))
    ho, wo = om.shape[2:]
    rm = blob_and_noise(n, ho, wo, p_noise=0.01, seed=7)
    res = delta(n, cout, ho, wo, torch.float16, rm, seed=8)
    y = ref_conv(x, xm, wt, (s, s), pad, (1, 1), 1) + zf(res, rm)
    g = torch.Generator().manual_seed(5)
    A0 = torch.randn(n, cout, ho, wo, generator=g).cuda()
    E0 = ref_act("relu", A0.double()).float() + 0.05 * torch.randn(n, cout, ho, wo, generator=g).cuda()
    ref = ref_nonlinear(y, om | rm, A0, E0, "relu", tau, "max", torch.float16)
    masks = []
    for pixels in (False, True):
        monkeypatch.setattr(conv, "PIXEL_LISTS", pixels)
        A, E = cl(A0.clone()), cl(E0.clone())
        out = cl(torch.full(y.shape, float("nan"), dtype=torch.float16, device="cuda"))
        counter = torch.zeros(2, dtype=torch.int32, device="cuda")
        o, fm = tk.sparse_conv2d(x, xm, wt, None, (s, s), pad, (1, 1), 1, out, residual=res, residual_mask=rm,
                                 act=tk.Act("relu", A, E, tau), counter=counter)
        check_nonlinear(o, fm, A, E, ref, TOL[torch.float16] * 2, tau, 0.02)
        assert counter.tolist() == [0, 0]
        masks.append(fm)
    far = (ref[4] - tau).abs() > 0.02
    assert torch.equal(masks[0] & far, masks[1] & far)
