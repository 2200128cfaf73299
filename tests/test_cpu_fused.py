"""The fused CPU kernels (backends/cpu_kernels.cpp) against the pure-PyTorch reference backend."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.activations import ActSpec
from deltacnn.backends import get_backend
from deltacnn.backends.base import PointwiseState
from deltacnn.backends import cpu_fused
from deltacnn.backends.cpu_fused import FusedCpuBackend
from deltacnn.backends.cpu_kernels import load, load_error
from deltacnn.backends.reference import ReferenceBackend
from deltacnn.geometry import Window
from deltacnn.tensor import DeltaTensor
from conftest import assert_cpu_equals_reference_and_dense, check_dense_conv_with_state, cl_state, random_delta

if load() is None:
    pytest.skip(f"CPU kernels do not build here: {load_error()}", allow_module_level=True)

REF = ReferenceBackend()
FUSED = get_backend(torch.device("cpu"))


_delta, _state = random_delta, cl_state


def _same_delta(a: DeltaTensor, b: DeltaTensor) -> None:
    assert torch.equal(a.mask, b.mask) and torch.equal(a.active(), b.active())
    m = a.mask.expand_as(a.values)
    torch.testing.assert_close(b.values[m], a.values[m], rtol=1e-6, atol=1e-6)


WINDOWS = [Window.make(1), Window.make(3, 1, 1), Window.make(3, 2, 1), Window.make(7, 2, 3),
           Window.make(3, 1, 2, 2), Window.make((1, 3), 1, (0, 1)), Window.make(2, 2, 0),
           Window((3, 3), (2, 1), (0, 2, 1, 0), (1, 1)), Window.make(5, 3, 1)]


def test_default_cpu_backend_is_fused() -> None:
    assert isinstance(FUSED, FusedCpuBackend)
    assert type(get_backend(torch.device("cpu"), "reference")) is ReferenceBackend


@pytest.mark.parametrize("win", WINDOWS, ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.6, 1.0])
def test_candidates_and_taps_equal_reference(win: Window, rate: float) -> None:
    gen = torch.Generator().manual_seed(7)
    d = _delta(2, 5, 11, 13, rate, gen)
    out_hw = win.out_size(11, 13)
    extra = torch.rand(2, 1, *out_hw, generator=gen) < 0.1
    for ex in (None, extra):
        i_ref, m_ref = REF._candidates(d, win, out_hw, ex)
        i_f, m_f = FUSED._candidates(d, win, out_hw, ex)
        assert torch.equal(m_ref, m_f) and torch.equal(i_ref, i_f)
    idx = torch.arange(out_hw[0] * out_hw[1] * 2)  # every output pixel, active or not
    assert torch.equal(REF._taps(d, idx, win, out_hw), FUSED._taps(d, idx, win, out_hw))


ACTS = [ActSpec("relu"), ActSpec("relu6"), ActSpec("hardtanh", min_val=-0.5, max_val=0.7),
        ActSpec("leaky_relu", slope=0.2), ActSpec("identity"),
        ActSpec("silu"), ActSpec("sigmoid")]  # f by ATen between the C++ accumulate and emit stages


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.describe())
@pytest.mark.parametrize("tau,score", [(0.0, "max"), (0.3, "max"), (0.5, "l2")])
@pytest.mark.parametrize("with_residual", [False, True])
def test_act_update_equals_reference(act: ActSpec, tau: float, score: str, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    n, c, h, w = 2, 6, 5, 7
    residual = _delta(n, c, h, w, 0.3, gen) if with_residual else None
    cand = torch.rand(n, 1, h, w, generator=gen) < 0.5
    if residual is not None:
        cand |= residual.mask
    idx = torch.nonzero(cand.reshape(-1)).squeeze(1)
    # half the candidates get no change: with no pending change either, they are truncated at any tau
    y = torch.randn(idx.numel(), c, generator=gen) * (torch.rand(idx.numel(), 1, generator=gen) < 0.5)
    results = []
    for be in (REF, FUSED):
        g = torch.Generator().manual_seed(5)
        acc = _state(torch.randn(n, c, h, w, generator=g))
        pending = 0.2 * torch.randn(n, c, h, w, generator=g) * (torch.rand(n, 1, h, w, generator=g) < 0.5)
        em = _state(act(acc) + pending)  # untransmitted change at some pixels
        out = be._act_rows(idx, y.clone(), residual, PointwiseState(act, acc, em, tau, score), torch.float32)
        results.append((out, acc, em))
    (o1, a1, e1), (o2, a2, e2) = results
    assert 0 < int(o1.mask.sum()) < idx.numel()
    _same_delta(o1, o2)
    torch.testing.assert_close(a2, a1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e2, e1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("tau,score", [(0.0, "max"), (0.8, "max"), (1.0, "l2")])
def test_sparsify_equals_reference(layout: str, tau: float, score: str) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 9, 14, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    ref0 = _state(x + 0.5 * torch.randn(2, 3, 9, 14, generator=gen) * (torch.rand(2, 1, 9, 14, generator=gen) < 0.4))
    outs = []
    for be in (REF, FUSED):
        ref = ref0.clone(memory_format=torch.channels_last)
        outs.append((be.sparsify(x, ref, tau, score, 1, torch.float32), ref))
    (d1, r1), (d2, r2) = outs
    assert 0 < int(d1.mask.sum()) < d1.mask.numel()
    _same_delta(d1, d2)
    torch.testing.assert_close(r2, r1, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("tau,score", [(0.0, "max"), (0.6, "max"), (0.9, "l2")])
def test_changed_fraction_equals_reference(layout: str, tau: float, score: str) -> None:
    """The keyframe's input change in one C++ score pass equals the PyTorch form, per stream."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 3, 11, 17, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else \
        torch.randn(3, 3, 11, 34, generator=gen)[..., ::2] if layout == "strided" else x
    moved = torch.rand(3, 1, 11, 17, generator=gen) < torch.tensor([0.1, 0.4, 0.8]).view(3, 1, 1, 1)
    ref = _state(x + 0.5 * torch.randn(3, 3, 11, 17, generator=gen) * moved)
    want = REF.changed_fraction(x, ref, tau, score)
    got = FUSED.changed_fraction(x, ref, tau, score)
    assert want.shape == (3,) and 0 < float(want.min()) and float(want.max()) < 1 and len(set(want.tolist())) == 3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("win", [Window.make(3, 2, 1), Window.make(2, 2, 0), Window.make(3, 1, 1, 2),
                                 Window.make(3, 2, 1, ceil_mode=True)], ids=str)
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_maxpool_equals_reference(win: Window, tau: float) -> None:
    gen = torch.Generator().manual_seed(13)
    n, c, h, w = 2, 4, 10, 13
    d = _delta(n, c, h, w, 0.15, gen)
    ho, wo = win.out_size(h, w)
    outs = []
    for be in (REF, FUSED):
        g = torch.Generator().manual_seed(17)
        acc = _state(torch.randn(n, c, h, w, generator=g))
        em = _state(torch.randn(n, c, ho, wo, generator=g) * 0.1 + 1.0)
        outs.append((be.maxpool(d, acc, em, win, tau, "max"), acc, em))
    (o1, a1, e1), (o2, a2, e2) = outs
    assert int(o1.mask.sum()) > 0
    _same_delta(o1, o2)
    torch.testing.assert_close(a2, a1, rtol=0, atol=0)
    torch.testing.assert_close(e2, e1, rtol=0, atol=0)


@pytest.mark.parametrize("act", [ActSpec("silu"), ActSpec("sigmoid"), ActSpec("relu")], ids=lambda a: a.describe())
@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_pointwise_equals_reference(act: ActSpec, tau: float) -> None:
    gen = torch.Generator().manual_seed(19)
    n, c, h, w = 2, 5, 6, 9
    d = _delta(n, c, h, w, 0.4, gen)
    outs = []
    for be in (REF, FUSED):
        g = torch.Generator().manual_seed(23)
        acc = _state(torch.randn(n, c, h, w, generator=g))
        em = _state(act(acc) + 0.2 * torch.randn(n, c, h, w, generator=g))
        outs.append((be.pointwise(d, PointwiseState(act, acc, em, tau, "max")), acc, em))
    (o1, a1, e1), (o2, a2, e2) = outs
    assert int(o1.mask.sum()) > 0
    _same_delta(o1, o2)
    torch.testing.assert_close(a2, a1, rtol=0, atol=0)
    torch.testing.assert_close(e2, e1, rtol=0, atol=0)


@pytest.mark.parametrize("rates", [(0.0, 0.3), (0.2, 0.5), (1.0, 0.1)])
def test_add_cat_slice_equal_reference(rates: tuple[float, float]) -> None:
    gen = torch.Generator().manual_seed(29)
    a, b = _delta(2, 6, 7, 5, rates[0], gen), _delta(2, 6, 7, 5, rates[1], gen)
    c3 = _delta(2, 3, 7, 5, 0.3, gen)
    _same_delta(REF.add(a, b), FUSED.add(a, b))
    _same_delta(REF.cat([a, c3, b]), FUSED.cat([a, c3, b]))
    for start, stop in ((0, 3), (2, 6), (0, 6)):
        _same_delta(REF.channel_slice(b, start, stop), FUSED.channel_slice(b, start, stop))
    with pytest.raises(ValueError, match="equal shapes"):
        FUSED.add(a, c3)


@pytest.mark.parametrize("factors", [(2, 2), (1, 3), (3, 2)])
@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_upsample_nearest_equals_dense_linear(factors: tuple[int, int], rate: float) -> None:
    """upsample_nearest on the updated rows against the reference's op on the zero-filled delta (the
    linear_maps spec the converter builds for nn.Upsample / F.interpolate with an integer scale)."""
    from deltacnn import linear_maps
    spec = linear_maps.interpolate(scale_factor=tuple(float(f) for f in factors), mode="nearest")
    assert spec.nearest == factors
    assert linear_maps.interpolate(scale_factor=1.5).nearest is None
    assert linear_maps.interpolate(size=(8, 8)).nearest is None
    assert linear_maps.interpolate(scale_factor=2, mode="bilinear").nearest is None
    d = _delta(2, 5, 4, 3, rate, torch.Generator().manual_seed(31))
    assert REF.upsample_nearest(d, factors) is None  # the reference runs dense_linear
    _same_delta(REF.dense_linear(d, spec.fn, spec.mask_fn), FUSED.upsample_nearest(d, factors))


@pytest.mark.parametrize("act", [ActSpec("relu"), ActSpec("silu")], ids=lambda a: a.describe())
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("win", [Window.make(3, 1, 1), Window.make(3, 2, 1), Window((3, 3), (1, 1), (0, 2, 1, 1), (1, 1))],
                         ids=str)
def test_dense_conv_block_equals_reference(act: ActSpec, with_residual: bool, win: Window,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """conv_block's dense case (every candidate computed by one dense conv) on the C++ update path."""
    from deltacnn.backends import reference
    from deltacnn.backends.base import ConvParams
    monkeypatch.setattr(reference, "DENSE_SWITCH", 0.0)
    monkeypatch.setattr(cpu_fused, "GEMM_DENSE_SWITCH", 0.0)  # the dense conv even where the implicit GEMM runs
    gen = torch.Generator().manual_seed(31)
    n, cin, cout, h, w = 1, 4, 6, 9, 11
    d = _delta(n, cin, h, w, 0.3, gen)
    p = ConvParams(torch.randn(cout, cin, 3, 3, generator=gen), win, 1)
    ho, wo = win.out_size(h, w)
    residual = _delta(n, cout, ho, wo, 0.2, gen) if with_residual else None
    outs = []
    for be in (REF, FUSED):
        g = torch.Generator().manual_seed(37)
        acc = _state(torch.randn(n, cout, ho, wo, generator=g))
        em = _state(act(acc) + 0.1 * torch.randn(n, cout, ho, wo, generator=g))
        outs.append((be.conv_block(d, p, residual, PointwiseState(act, acc, em, 0.05, "max")), acc, em))
    (o1, a1, e1), (o2, a2, e2) = outs
    assert int(o1.mask.sum()) > 0
    _same_delta(o1, o2)
    torch.testing.assert_close(a2, a1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e2, e1, rtol=1e-6, atol=1e-6)


class _Net(nn.Module):
    """Stride, residual, max pooling, downsampling and two activation kinds (one not fused in C++)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, 2, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c1 = nn.Conv2d(8, 8, 3, 1, 1)
        self.c2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.down = nn.Conv2d(8, 16, 1, 2)
        self.c3 = nn.Conv2d(8, 16, 3, 2, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.c2(torch.relu(self.c1(x))) + x)
        x = nn.functional.leaky_relu(self.c3(x) + self.down(x), 0.1)
        return self.head(nn.functional.silu(x))


@pytest.mark.usefixtures("cpu_isa")
def test_model_on_fused_backend_equals_reference_and_dense() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    frames = torch.randn(1, 3, 40, 56).repeat(6, 1, 1, 1)
    for t in range(1, 6):  # a moving patch of fresh noise: a few percent of pixels per frame
        frames[t:, :, 4 + 3 * t:14 + 3 * t, 10 + 4 * t:22 + 4 * t] = torch.randn(3, 10, 12)
    outs = {}
    for be in ("cpu", "reference"):
        dm = deltacnn.convert(net, frames[:1], threshold=0.0, backend=be)
        assert dm.rt.backend_for(frames).name == be
        with torch.no_grad():
            outs[be] = [dm(frames[t:t + 1]) for t in range(6)]
    with torch.no_grad():
        for t in range(6):
            dense = net(frames[t:t + 1])
            torch.testing.assert_close(outs["cpu"][t], outs["reference"][t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs["cpu"][t], dense, rtol=1e-4, atol=1e-4)


def test_cpu_backend_rejects_cuda_device() -> None:
    with pytest.raises(ValueError, match="cpu backend needs CPU tensors"):
        get_backend(torch.device("cuda"), "cpu")


def _gemm_conv_case(win: Window, cin: int, cout: int, n: int, h: int, w: int, density: float, seed: int):
    """A random delta and conv weights for the implicit-GEMM tests (skipped where the CPU lacks AVX2/FMA:
    the fused backend then uses gather + matmul)."""
    from deltacnn.backends.base import ConvParams
    if not FUSED._gemm:
        pytest.skip("no AVX2/FMA here: the fused backend uses gather + matmul")
    gen = torch.Generator().manual_seed(seed)
    d = _delta(n, cin, h, w, density, gen)
    return d, ConvParams(torch.randn(cout, cin, *win.kernel, generator=gen), win, 1)


def test_cpu_isa_switch_and_env() -> None:
    """set_cpu_isa switches the micro-kernels (and rejects names it does not know); DELTACNN_CPU_ISA=avx2, read
    once at load, makes a fresh process run the AVX2 kernels whatever the CPU has."""
    import os
    import subprocess
    import sys
    k = load()
    with pytest.raises(RuntimeError):
        k.set_cpu_isa("sse2")
    old = k.set_cpu_isa("avx2")
    try:
        assert k.cpu_isa() == "avx2"
        assert k.set_cpu_isa("auto") == "avx2" and k.cpu_isa() in ("avx2", "avx512")
    finally:
        k.set_cpu_isa(old)
    code = "from deltacnn.backends.cpu_kernels import load; print(load().cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DELTACNN_CPU_ISA": "avx2"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "avx2"


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("win", WINDOWS, ids=str)
@pytest.mark.parametrize("cin,cout", [(3, 16), (5, 20), (17, 33), (24, 32), (9, 70), (12, 56)])
def test_implicit_gemm_conv_rows_equal_reference(win: Window, cin: int, cout: int) -> None:
    """conv_rows (taps read in place, empty taps skipped, panels of 16 output channels) against the
    reference's tap gather + matmul; and against dense PyTorch on the zero-filled delta."""
    n, h, w = 2, 11, 13
    d, p = _gemm_conv_case(win, cin, cout, n, h, w, 0.3, seed=41)
    out_hw = win.out_size(h, w)
    idx, _ = FUSED._candidates(d, win, out_hw)
    if idx.numel() % 6 == 0:  # keep a partial block of the 6-pixel micro-kernel
        idx = idx[:-1]
    assert idx.numel() > 6
    y = FUSED._conv_rows_chunked(d, p, idx, out_hw)
    torch.testing.assert_close(y, REF._conv_rows(d, p, idx, out_hw), rtol=1e-5, atol=1e-5)
    t, b, l, r = win.padding
    dense = nn.functional.conv2d(nn.functional.pad(d.zero_filled(), (l, r, t, b)), p.weight, None, win.stride, 0,
                                 win.dilation)
    dense_rows = dense.permute(0, 2, 3, 1).reshape(-1, cout).index_select(0, idx)
    torch.testing.assert_close(y, dense_rows, rtol=1e-5, atol=1e-5)
    all_idx = torch.arange(n * out_hw[0] * out_hw[1])  # pixels whose every tap is empty give exact zeros
    torch.testing.assert_close(FUSED._conv_rows(d, p, all_idx, out_hw), REF._conv_rows(d, p, all_idx, out_hw),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("win", [Window.make(1), Window.make(3, 1, 1), Window.make(3, 2, 1), Window.make(2, 2, 0)],
                         ids=str)
@pytest.mark.parametrize("cin,cout", [(3, 16), (17, 33)])
def test_plain_conv_delta_equals_reference(win: Window, cin: int, cout: int) -> None:
    """A plain conv (no activation) on the fused backend, its rows written into the output delta by
    conv_rows_delta, against the reference's conv2d (rows scattered by index_copy) and dense PyTorch:
    same mask, active pixels, values there and counted work; an empty input gives an empty delta."""
    n, h, w = 2, 11, 13
    d, p = _gemm_conv_case(win, cin, cout, n, h, w, 0.15, seed=43)
    outs = []
    for be in (REF, FUSED):
        be.work = [0, 0]
        outs.append((be.conv_block(d, p, None, None), list(be.work)))
    (o1, w1), (o2, w2) = outs
    assert 0 < int(o1.mask.sum()) < o1.mask.numel() and o2.ext is not None
    _same_delta(o1, o2)
    assert w1 == w2
    t, b, l, r = win.padding
    dense = nn.functional.conv2d(nn.functional.pad(d.zero_filled(), (l, r, t, b)), p.weight, None, win.stride, 0,
                                 win.dilation)
    m = o2.mask.expand_as(dense)
    torch.testing.assert_close(o2.values[m], dense[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o2.ext[-1], torch.zeros(cout))  # the zero row gathers read
    empty = _delta(n, cin, h, w, 0.0, torch.Generator().manual_seed(44))  # no pixel set
    assert int(FUSED.conv_block(empty, p, None, None).mask.sum()) == 0


EPILOGUE_ACTS = [ActSpec("relu"), ActSpec("silu"), ActSpec("sigmoid"), ActSpec("leaky_relu", slope=0.2),
                 ActSpec("hardtanh", min_val=-0.5, max_val=0.7), ActSpec("identity")]


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("act", EPILOGUE_ACTS, ids=lambda a: a.describe())
@pytest.mark.parametrize("tau,score", [(0.0, "max"), (0.05, "max"), (0.1, "l2")])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("k", [3, 1])
def test_conv_act_epilogue_equals_reference(act: ActSpec, tau: float, score: str, with_residual: bool, k: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """conv_block's gathered case in one C++ pass (implicit GEMM + update in its epilogue; SiLU and
    sigmoid by a vectorised exp) against the reference's gather, matmul and ATen update. A 1x1 conv
    without a residual takes its input's updated pixels as the candidates (no dilation pass)."""
    from deltacnn.backends import reference
    from deltacnn.backends.base import ConvParams
    if not FUSED._gemm:
        pytest.skip("no AVX2/FMA here")
    monkeypatch.setattr(reference, "DENSE_SWITCH", 1.0)  # every candidate on the gathered path
    gen = torch.Generator().manual_seed(43)
    n, cin, cout, h, w = 2, 7, 21, 9, 11
    win = Window.make(k, 1, k // 2)
    d = _delta(n, cin, h, w, 0.2, gen)
    p = ConvParams(torch.randn(cout, cin, k, k, generator=gen) * 0.3, win, 1)
    residual = _delta(n, cout, h, w, 0.2, gen) if with_residual else None
    outs = []
    for be in (REF, FUSED):
        g = torch.Generator().manual_seed(47)
        acc = _state(3 * torch.randn(n, cout, h, w, generator=g))  # SiLU/sigmoid over their whole range
        em = _state(act(acc) + 0.1 * torch.randn(n, cout, h, w, generator=g) * (torch.rand(n, 1, h, w, generator=g) < 0.5))
        outs.append((be.conv_block(d, p, residual, PointwiseState(act, acc, em, tau, score)), acc, em))
    (o1, a1, e1), (o2, a2, e2) = outs
    assert 0 < int(o1.mask.sum()) < o1.mask.numel()
    _same_delta(o1, o2)
    torch.testing.assert_close(a2, a1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e2, e1, rtol=1e-5, atol=1e-5)
    # the same update on dense PyTorch: E = f(A) where emitted, A = A0 + conv(zero-filled d) (+ residual)
    g = torch.Generator().manual_seed(47)
    acc0 = 3 * torch.randn(n, cout, h, w, generator=g)
    conv = nn.functional.conv2d(d.zero_filled(), p.weight, None, 1, k // 2)
    if residual is not None:
        conv = conv + residual.zero_filled()
    cand = (nn.functional.max_pool2d(d.mask.float(), k, 1, k // 2) > 0) | \
        (residual.mask if residual is not None else False)
    torch.testing.assert_close(a2, torch.where(cand, acc0 + conv, acc0), rtol=1e-5, atol=1e-5)
    m = o2.mask.expand_as(e2)
    torch.testing.assert_close(e2[m], act(a2)[m], rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("win", [Window.make(3, 1, 1), Window.make(3, 2, 1), Window.make(5, 1, 2, 2),
                                 Window((3, 3), (1, 1), (0, 2, 1, 1), (1, 1))], ids=str)
@pytest.mark.parametrize("act", [None, ActSpec("relu"), ActSpec("silu")], ids=lambda a: a.describe() if a else "none")
def test_depthwise_rows_equal_reference(win: Window, act: ActSpec | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Depthwise convs read in place (depthwise_rows), alone and with the update, against the reference's
    gather + weighted tap sum and dense PyTorch."""
    from deltacnn.backends import reference
    from deltacnn.backends.base import ConvParams
    if not FUSED._gemm:
        pytest.skip("no AVX2/FMA here")
    monkeypatch.setattr(reference, "DENSE_SWITCH", 1.0)
    gen = torch.Generator().manual_seed(53)
    n, c, h, w = 2, 19, 10, 12
    d = _delta(n, c, h, w, 0.2, gen)
    p = ConvParams(torch.randn(c, 1, *win.kernel, generator=gen), win, c)
    out_hw = win.out_size(h, w)
    idx, _ = FUSED._candidates(d, win, out_hw)
    y = FUSED._conv_rows(d, p, idx, out_hw)
    torch.testing.assert_close(y, REF._conv_rows(d, p, idx, out_hw), rtol=1e-5, atol=1e-5)
    t, b, l, r = win.padding
    dense = nn.functional.conv2d(nn.functional.pad(d.zero_filled(), (l, r, t, b)), p.weight, None, win.stride, 0,
                                 win.dilation, c)
    torch.testing.assert_close(y, dense.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, idx), rtol=1e-5, atol=1e-5)
    if act is None:
        return
    residual = _delta(n, c, *out_hw, 0.2, gen)
    outs = []
    for be in (REF, FUSED):
        g = torch.Generator().manual_seed(59)
        acc = _state(torch.randn(n, c, *out_hw, generator=g))
        em = _state(act(acc))
        outs.append((be.conv_block(d, p, residual, PointwiseState(act, acc, em, 0.05, "max")), acc, em))
    (o1, a1, e1), (o2, a2, e2) = outs
    assert int(o1.mask.sum()) > 0
    _same_delta(o1, o2)
    torch.testing.assert_close(a2, a1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e2, e1, rtol=1e-5, atol=1e-5)


DENSE_WINDOWS = [Window.make(1), Window.make(3, 1, 1), Window.make(3, 2, 1), Window.make(5, 1, 2, 2),
                 Window((3, 3), (2, 1), (0, 2, 1, 0), (1, 1)), Window.make((1, 3), 1, (0, 1)), Window.make(2, 2, 0)]


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("win", DENSE_WINDOWS, ids=str)
@pytest.mark.parametrize("cin,cout,layout", [(3, 16, "nchw"), (5, 20, "channels_last"), (40, 33, "channels_last"),
                                             (17, 7, "slice"), (24, 70, "channels_last"),
                                             (8, 56, "channels_last")])
def test_dense_conv_equals_pytorch(win: Window, cin: int, cout: int, layout: str) -> None:
    """Keyframes' conv_dense (every pixel; window rows read as runs or taps in place, border pixels
    zero-padded) against F.conv2d + bias + residual + f, with the state A and E it writes."""
    from deltacnn.backends.base import ConvParams
    if not FUSED._gemm:
        pytest.skip("no AVX2/FMA here")
    gen = torch.Generator().manual_seed(61)
    n, h, w = 2, 11, 14
    x = torch.randn(n, cin + (3 if layout == "slice" else 0), h, w, generator=gen)
    if layout != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a channel slice of a channels_last map: channels contiguous, pixels strided
        x = x[:, 2:2 + cin]
    p = ConvParams(torch.randn(cout, cin, *win.kernel, generator=gen) * 0.3, win, 1)
    bias = torch.randn(cout, generator=gen)
    t, b, l, r = win.padding
    ref = nn.functional.conv2d(nn.functional.pad(x, (l, r, t, b)), p.weight, bias, win.stride, 0, win.dilation)
    residual = torch.randn(ref.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    check_dense_conv_with_state(FUSED, x, p, bias, ref, residual, [None, *EPILOGUE_ACTS])


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("win", [Window.make(1), Window.make(3, 1, 1), Window.make(3, 2, 1)], ids=str)
@pytest.mark.parametrize("cin,cout", [(3, 16), (16, 8), (32, 24), (16, 32), (48, 70), (64, 256)])
@pytest.mark.parametrize("w", [61, 130, 24])
def test_dense_conv_epilogue_chunks_equal_pytorch(win: Window, cin: int, cout: int, w: int) -> None:
    """conv_dense on rows wide enough for several epilogue chunks a row (EPILOGUE_FLOATS outputs: 12 pixels at
    Cout 256, 54 at 70, 126 at 32): whole chunks, a last chunk of a few pixels ending in a part block (61 and 130
    columns), a row of one chunk (24), the last panel's masked channels (Cout 8, 24, 70), against F.conv2d + bias +
    SiLU with the state A and E, and without an activation."""
    from deltacnn.backends.base import ConvParams
    if not FUSED._gemm:
        pytest.skip("no AVX2/FMA here")
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(1, cin, 7, w, generator=gen).contiguous(memory_format=torch.channels_last)
    fan_in = cin * win.kernel[0] * win.kernel[1]  # outputs of order 1 at any depth: the tolerances hold
    p = ConvParams(torch.randn(cout, cin, *win.kernel, generator=gen) * fan_in ** -0.5, win, 1)
    bias = torch.randn(cout, generator=gen)
    t, b, l, r = win.padding
    v = nn.functional.conv2d(nn.functional.pad(x, (l, r, t, b)), p.weight, bias, win.stride, 0, win.dilation)
    bufs = {}

    def state(shape):
        bufs["acc"] = torch.full(shape, float("nan")).contiguous(memory_format=torch.channels_last)
        bufs["em"] = torch.full(shape, float("nan")).contiguous(memory_format=torch.channels_last)
        return bufs["acc"], bufs["em"]
    act = ActSpec("silu")
    out = FUSED.dense_conv(x, p, bias, None, act, state)
    torch.testing.assert_close(out, act(v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bufs["acc"], v, rtol=1e-5, atol=1e-5)
    assert torch.equal(bufs["em"], out)
    plain = FUSED.dense_conv(x, p, bias, None, None, None)  # no activation, no state: v straight into out
    torch.testing.assert_close(plain, v, rtol=1e-5, atol=1e-5)


def test_dense_conv_declines_what_it_does_not_fuse() -> None:
    from deltacnn.backends.base import ConvParams
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    grouped = ConvParams(torch.randn(4, 2, 3, 3), Window.make(3, 1, 1), 2)
    assert FUSED.dense_conv(x, grouped, None, None, ActSpec("relu"), None) is None
    plain = ConvParams(torch.randn(4, 4, 3, 3), Window.make(3, 1, 1), 1)
    assert FUSED.dense_conv(x, plain, None, None, ActSpec("gelu"), None) is None  # f not in the epilogue
    assert FUSED.dense_conv(x.double(), ConvParams(plain.weight.double(), plain.window, 1), None, None, None,
                            None) is None
    assert REF.dense_conv(x, plain, None, None, None, None) is None


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("mode", ["keyframe", "dense_frame", "streams"])
def test_keyframes_on_dense_conv_equal_reference(mode: str) -> None:
    """The fused backend's keyframes (conv_dense with the state writes), stateless dense frames and
    keyframes of some streams of a batch, then delta frames on the seeded state, against the reference
    backend and dense PyTorch."""
    torch.manual_seed(1)
    net = _Net().eval()
    frames = torch.randn(2, 3, 40, 56).repeat(5, 1, 1, 1)
    for t in range(1, 5):  # a moving patch of fresh noise
        frames[2 * t:, :, 4 + 3 * t:14 + 3 * t, 10 + 4 * t:22 + 4 * t] = torch.randn(3, 10, 12)
    outs = {}
    for be in ("cpu", "reference"):
        dm = deltacnn.convert(net, frames[:2], threshold=0.0, backend=be)
        res = []
        with torch.no_grad():
            for t in range(5):
                x = frames[2 * t:2 * t + 2]
                if mode == "dense_frame" and t == 2:
                    res.append(dm.dense_frame(x))
                    continue
                if mode == "streams" and t == 2:
                    dm._since[1] = 0  # stream 1 is due for a keyframe: it runs a pass of its own
                res.append(dm(x))
        outs[be] = res
    assert_cpu_equals_reference_and_dense(outs, net, frames, steps=5, batch=2)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("layout,score", [("nchw", "max"), ("channels_last", "max"), ("nchw", "l2")])
@pytest.mark.parametrize("flush", [None, [False, True]], ids=["gate", "flush1"])
def test_sparsify_blobs_equals_gate_then_sparsify(k: int, layout: str, score: str, flush: list[bool] | None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The input layer with the small-blob gate in one C++ pass against the generic path (deltacnn.gating's
    opening by max pooling, then sparsify) on the reference backend: same sent pixels and values, same
    reference update, same held-back fraction per stream; with a refresh flush of stream 1, that stream
    sends every pixel that passes the threshold (held back: none) in both."""
    from deltacnn.gating import Refresh
    from deltacnn.layers.io import Sparsify
    from deltacnn.runtime import Runtime
    from deltacnn.thresholds import Thresholds
    gen = torch.Generator().manual_seed(67)
    n, c, h, w = 2, 3, 23, 31
    ref0 = torch.rand(n, c, h, w, generator=gen)
    x = ref0.clone()
    # isolated changed pixels (held back), blobs of several sizes (sent or partly eroded), blobs at borders
    x += 0.5 * torch.randn(n, c, h, w, generator=gen) * (torch.rand(n, 1, h, w, generator=gen) < 0.08)
    for (i, y0, x0, s) in [(0, 3, 4, 5), (0, 0, 0, 4), (1, 10, 25, 6), (1, 18, 2, 3), (0, 15, 12, 2)]:
        x[i, :, y0:y0 + s, x0:x0 + s] += 0.7
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    results = []
    for be in ("reference", "cpu"):
        th = Thresholds(input=0.2)
        th.score = score
        rt = Runtime(th, backend_name=be, refresh_held=0.5, refresh=Refresh.parse("flush" if flush else None))
        layer = Sparsify(min_blob=k)
        layer.set_runtime(rt)
        layer._seed_state("ref", ref0)
        rt.keyframe = False
        rt.flush = flush
        backend, calls = rt.backend_on(x.device), []
        blobs = backend.sparsify_blobs
        monkeypatch.setattr(backend, "sparsify_blobs",
                            lambda *a, **kw: calls.append((a[6], blobs(*a, **kw))) or calls[-1][1])
        d = layer(x)
        # the flush went to the backend; the fused pass ran on the cpu backend (the reference has none)
        assert [c[0] for c in calls] == [flush] and (calls[0][1] is not None) == (be == "cpu")
        results.append((d, layer._state("ref").clone(), rt.input_held.clone()))
    (d1, r1, h1), (d2, r2, h2) = results
    assert 0 < int(d1.mask.sum()) < d1.mask.numel() and bool((h1[0] > 0).all())
    assert bool((h1[1] > 0).all()) if flush is None else float(h1[1]) == 0.0
    _same_delta(d1, d2)
    torch.testing.assert_close(r2, r1, rtol=0, atol=0)
    torch.testing.assert_close(h2, h1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("min_blob", [1, 3])
@pytest.mark.parametrize("score", ["max", "l2"])
def test_input_layer_reuses_its_output_memory_and_equals_the_reference(min_blob: int, score: str) -> None:
    """The cpu input layer (sparsify, sparsify_blobs) writes each frame's delta into the last frame's memory once
    nothing holds it (cpu_kernels.OutputBuffer): the same deltas and references as the reference backend over a
    few frames of an RGB clip (rows of unsent pixels left from the last frame never show), the memory reused
    when the last delta was dropped and not while it is alive."""
    from deltacnn.layers.io import Sparsify
    from deltacnn.runtime import Runtime
    from deltacnn.thresholds import Thresholds
    gen = torch.Generator().manual_seed(73)
    n, c, h, w = 1, 3, 40, 56
    clip = [torch.rand(n, c, h, w, generator=gen)]
    for _ in range(5):  # a few changed blobs and isolated pixels a frame
        x = clip[-1].clone()
        x += 0.4 * torch.randn(n, c, h, w, generator=gen) * (torch.rand(n, 1, h, w, generator=gen) < 0.05)
        y0, x0 = (int(v) for v in torch.randint(0, 30, (2,), generator=gen))
        x[:, :, y0:y0 + 6, x0:x0 + 8] += 0.5
        clip.append(x)
    layers = {}
    for be in ("reference", "cpu"):
        th = Thresholds(input=0.15)
        th.score = score
        layer = layers[be] = Sparsify(min_blob=min_blob)
        layer.set_runtime(Runtime(th, backend_name=be))
        layer._seed_state("ref", clip[0])
        layer.rt.keyframe = False
    ptrs, held = [], None
    for t, x in enumerate(clip[1:]):
        d_ref, d_cpu = layers["reference"](x), layers["cpu"](x)
        _same_delta(d_ref, d_cpu)
        torch.testing.assert_close(layers["cpu"]._state("ref"), layers["reference"]._state("ref"), rtol=0, atol=0)
        ptrs.append(d_cpu.values.data_ptr())
        if t == 2:
            held = d_cpu  # alive during the next frame: that frame must not write into it
            kept = d_cpu.values.clone()
        elif t == 3:
            assert ptrs[3] != ptrs[2]
            # bit for bit: unsent pixels hold whatever the memory held, which may read as NaN
            assert torch.equal(held.values.view(torch.int32), kept.view(torch.int32))
        d_ref = d_cpu = None  # (not alive while the next frame runs)
    assert ptrs[1] == ptrs[0] and ptrs[2] == ptrs[1]  # dropped deltas: their memory again


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_frame_range_equals_aminmax(layout: str) -> None:
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(4, 3, 9, 14, generator=gen) * 5
    x[1, 2, 3, 4] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    x[3, 1, 8, 13] = -float("inf")
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    lo, hi = FUSED.frame_range(x)
    rlo, rhi = REF.frame_range(x)
    assert [str(v) for v in lo] == [str(v) for v in rlo] and [str(v) for v in hi] == [str(v) for v in rhi]
    assert lo[0] == float(x[0].min()) and hi[0] == float(x[0].max()) and hi[2] == float("inf")
    assert lo[1] != lo[1] and hi[1] != hi[1]  # NaN


def test_frame_range_over_chunks_of_a_large_frame() -> None:
    """A frame of 360,900 floats an image (as a chunked or vectorised pass would split it): the least and largest
    values far apart, a NaN only near one image's end."""
    gen = torch.Generator().manual_seed(72)
    x = torch.rand(2, 3, 300, 401, generator=gen)
    x[0, 0, 5, 7], x[0, 2, 299, 400] = -3.0, 7.0
    x[1, 2, 299, 399] = float("nan")
    lo, hi = FUSED.frame_range(x)
    assert (lo[0], hi[0]) == (-3.0, 7.0)
    assert lo[1] != lo[1] and hi[1] != hi[1]
    y = x[:1].contiguous(memory_format=torch.channels_last)
    assert FUSED.frame_range(y) == ([-3.0], [7.0])
