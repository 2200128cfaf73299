"""CenterFace's layers on the cpu backend (MobileNetV2 backbone, transposed-conv neck): the dense pass of depthwise
convs (depthwise_dense) against F.conv2d, dense-frame output buffers reused only when free, ReLU layers on deltas
in one pass, batch norms folded into transposed convs, and whole MobileNetV2-style networks against the reference
backend and dense PyTorch at tau 0, on both micro-kernel ISAs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.activations import ActSpec
from deltacnn.backends import get_backend
from deltacnn.backends.base import ConvParams, PointwiseState
from deltacnn.backends.reference import ReferenceBackend
from deltacnn.backends.cpu_kernels import load, load_error
from deltacnn.geometry import Window
from conftest import check_dense_conv_with_state

if load() is None:
    pytest.skip(f"CPU kernels do not build here: {load_error()}", allow_module_level=True)

FUSED = get_backend(torch.device("cpu"))
REF = ReferenceBackend()
ACTS = [None, ActSpec("relu"), ActSpec("relu6"), ActSpec("leaky_relu", slope=0.2),
        ActSpec("hardtanh", min_val=-0.5, max_val=0.7), ActSpec("silu"), ActSpec("sigmoid"), ActSpec("identity")]
WINDOWS = [Window.make(3, 1, 1), Window.make(3, 2, 1), Window.make(3, 2, 0), Window.make(5, 1, 2, 2),
           Window.make(5, 2, 2), Window((3, 3), (2, 1), (0, 2, 1, 0), (1, 1)), Window.make(1)]


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("win", WINDOWS, ids=str)
@pytest.mark.parametrize("c,layout", [(8, "channels_last"), (16, "channels_last"), (19, "channels_last"),
                                      (40, "slice"), (96, "channels_last"), (70, "nchw")])
def test_depthwise_dense_equals_pytorch(win: Window, c: int, layout: str) -> None:
    """A dense depthwise conv with bias, residual and f in one pass (interior pixels in blocks, border pixels
    and channel tails one at a time) against F.conv2d + bias + residual + f, with the state A and E."""
    gen = torch.Generator().manual_seed(101)
    n, h, w = 2, 13, 21  # a row longer than two 8-pixel blocks plus borders
    x = torch.randn(n, c + (5 if layout == "slice" else 0), h, w, generator=gen)
    if layout != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a channel slice of a channels_last map: channels contiguous, pixels strided
        x = x[:, 3:3 + c]
    p = ConvParams(torch.randn(c, 1, *win.kernel, generator=gen) * 0.5, win, c)
    bias = torch.randn(c, generator=gen)
    t, b, l, r = win.padding
    ref = nn.functional.conv2d(nn.functional.pad(x, (l, r, t, b)), p.weight, bias, win.stride, 0, win.dilation, c)
    residual = torch.randn(ref.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    check_dense_conv_with_state(FUSED, x, p, bias, ref, residual, ACTS)


def test_depthwise_dense_declines_grouped_and_unfused() -> None:
    """Grouped convs that are not depthwise, and f outside the epilogue, keep the generic path."""
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    assert FUSED.dense_conv(x, ConvParams(torch.randn(8, 2, 3, 3), Window.make(3, 1, 1), 4), None, None, None,
                            None) is None
    dw = ConvParams(torch.randn(8, 1, 3, 3), Window.make(3, 1, 1), 8)
    assert FUSED.dense_conv(x, dw, None, None, ActSpec("gelu"), None) is None
    assert FUSED.dense_conv(x, dw, None, None, ActSpec("relu"), None) is not None


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU, depthwise 3x3 + BN + ReLU, 1x1 project + BN (+ skip)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.skip = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.skip else y


class _Net(nn.Module):
    """A CenterFace-like stem and backbone: stride-2 stem, a depthwise conv of the stem's width, inverted
    residual blocks (depthwise widths 48, 72, 120: multiples of 8 and of 16 and neither), a transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU(), nn.Conv2d(16, 8, 1))
        self.blocks = nn.Sequential(_InvertedResidual(8, 12, 2, 6), _InvertedResidual(12, 12, 1, 6),
                                    _InvertedResidual(12, 20, 2, 6), _InvertedResidual(20, 20, 1, 6))
        self.up = nn.ConvTranspose2d(20, 8, 2, 2)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(self.blocks(self.stem(x)))))


def _net() -> _Net:
    torch.manual_seed(7)
    net = _Net()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("mode", ["keyframes", "dense_frame"])
def test_mobilenet_frames_equal_reference_and_dense(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyframes (every third frame) or a stateless dense frame between delta frames at tau 0: the cpu backend
    (whose dense depthwise convs are depthwise_dense: counted) equals the reference backend and dense PyTorch."""
    net = _net()
    g = torch.Generator().manual_seed(11)
    frames = torch.rand(1, 3, 48, 80, generator=g).repeat(7, 1, 1, 1)
    for k in range(1, 7):  # a moving patch of fresh noise
        frames[k:, :, 5 + 3 * k:17 + 3 * k, 7 + 5 * k:23 + 5 * k] = torch.rand(3, 12, 16, generator=g)
    calls = [0]
    real = FUSED._k.depthwise_dense

    def counted(*a):
        calls[0] += 1
        return real(*a)
    outs = {}
    for be in ("cpu", "reference"):
        dm = deltacnn.convert(net, frames[:1], threshold=0.0, backend=be,
                              keyframe_interval=3 if mode == "keyframes" else None)
        if be == "cpu":
            monkeypatch.setattr(dm.rt.backend_on(torch.device("cpu"))._k, "depthwise_dense", counted, raising=False)
        with torch.no_grad():
            outs[be] = [dm.dense_frame(frames[t:t + 1]) if mode == "dense_frame" and t == 3 else dm(frames[t:t + 1])
                        for t in range(7)]
    assert calls[0] >= 5 * (3 if mode == "keyframes" else 2)  # five depthwise convs a dense pass
    with torch.no_grad():
        for t in range(7):
            dense = net(frames[t:t + 1])
            torch.testing.assert_close(outs["cpu"][t], outs["reference"][t], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(outs["cpu"][t], dense, rtol=1e-4, atol=1e-4)


def test_dense_frame_outputs_reuse_free_buffers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conv's dense output without state (stateless frames, convs without f) reuses a pooled buffer of its shape
    when nothing holds it (_dense_out), never while a caller holds that output or a view of it (held outputs stay
    as they were); through a model, dense frames after the first take all their outputs from the pool and equal
    dense PyTorch."""
    from deltacnn.backends import cpu_fused
    monkeypatch.setattr(cpu_fused, "DENSE_OUT_KEEP", 0)
    gen = torch.Generator().manual_seed(5)
    for p in (ConvParams(torch.randn(8, 1, 3, 3, generator=gen), Window.make(3, 1, 1), 8),
              ConvParams(torch.randn(4, 8, 3, 3, generator=gen), Window.make(3, 1, 1), 1)):
        xs = [torch.randn(1, 8, 9, 11, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(4)]
        want = [FUSED.dense_conv(x, p, None, None, None, None).clone() for x in xs]
        first = FUSED.dense_conv(xs[0], p, None, None, None, None)
        second = FUSED.dense_conv(xs[1], p, None, None, None, None)  # first held: a new buffer
        view = second[:, 1:]
        third = FUSED.dense_conv(xs[2], p, None, None, None, None)  # second held through a view only
        assert len({first.data_ptr(), second.data_ptr(), third.data_ptr()}) == 3
        for got, w in zip((first, second, third), want):
            assert torch.equal(got, w)
        pool = FUSED._pool[tuple(third.shape)]
        held = {third.data_ptr()}
        del first, second, view, got  # (got: the loop above left it on third)
        size = len(pool)
        fourth = FUSED.dense_conv(xs[3], p, None, None, None, None)
        assert fourth.data_ptr() not in held and len(pool) == size  # a free pooled buffer, not third's
        assert torch.equal(fourth, want[3]) and torch.equal(third, want[2])
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 4, 1)).eval()
    xs = [torch.rand(1, 3, 16, 20) for _ in range(4)]
    dm = deltacnn.convert(net, xs[0], threshold=0.0, backend="cpu")
    pool = dm.rt.backend_on(torch.device("cpu"))._pool
    sizes = []
    with torch.no_grad():
        dm(xs[0])
        for x in xs[1:]:
            torch.testing.assert_close(dm.dense_frame(x), net(x), rtol=1e-5, atol=1e-5)
            sizes.append({k: len(v) for k, v in pool.items()})
    assert sizes[0] == sizes[1] == sizes[2] and sizes[0][(1, 8, 16, 20)] >= 1


@pytest.mark.parametrize("act", [ActSpec("relu"), ActSpec("relu6"), ActSpec("leaky_relu", slope=0.1),
                                 ActSpec("hardtanh", min_val=-0.5, max_val=0.7)], ids=lambda a: a.describe())
@pytest.mark.parametrize("score", ["max", "l2"])
def test_piecewise_activation_layer_equals_reference(act: ActSpec, score: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An activation layer of a piecewise-linear f on a delta (act_update reading the delta's rows by pixel, one
    call: counted): the same emitted delta, A and E as the reference's gathers and scatter."""
    from conftest import cl_state, random_delta
    calls = [0]
    real = FUSED._k.act_update

    def counted(*a):
        calls[0] += 1
        return real(*a)
    monkeypatch.setattr(FUSED._k, "act_update", counted)
    gen = torch.Generator().manual_seed(29)
    d = random_delta(2, 24, 9, 13, 0.3, gen)
    outs = []
    for be in (REF, FUSED):
        g = torch.Generator().manual_seed(31)
        acc = cl_state(torch.randn(2, 24, 9, 13, generator=g))
        st = PointwiseState(act, acc, cl_state(act(acc)), 0.05, score)
        outs.append((be.pointwise(d, st), st))
    (o1, s1), (o2, s2) = outs
    assert calls[0] == 1
    assert int(o1.mask.sum()) > 0 and torch.equal(o1.mask, o2.mask) and torch.equal(o1.active(), o2.active())
    m = o1.mask.expand_as(o1.values)
    assert torch.equal(o2.values[m], o1.values[m])
    assert torch.equal(s2.acc, s1.acc) and torch.equal(s2.emitted, s1.emitted)


@pytest.mark.parametrize("be", ["cpu", "reference"])
@pytest.mark.parametrize("groups", [1, 2])
def test_batch_norm_folds_into_transposed_conv(be: str, groups: int) -> None:
    """ConvTranspose2d + BatchNorm2d + ReLU (CenterFace's neck): the batch norm is folded into the transposed conv
    (no DeltaScale left; a grouped one keeps it) and the delta model equals dense PyTorch at tau 0 over delta
    frames."""
    from deltacnn.layers.linear import DeltaScale
    torch.manual_seed(13)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, 2, groups=groups), bn,
                        nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    frames = torch.rand(1, 3, 24, 32).repeat(4, 1, 1, 1)
    for k in range(1, 4):
        frames[k:, :, 2 + 3 * k:10 + 3 * k, 4 + 4 * k:12 + 4 * k] = torch.rand(3, 8, 8)
    dm = deltacnn.convert(net, frames[:1], threshold=0.0, backend=be)
    assert any(isinstance(m, DeltaScale) for m in dm.modules()) == (groups > 1)
    with torch.no_grad():
        for t in range(4):
            torch.testing.assert_close(dm(frames[t:t + 1]), net(frames[t:t + 1]), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("c", [8, 16, 19, 40, 96])
@pytest.mark.parametrize("act", [ActSpec("relu"), ActSpec("relu6"), ActSpec("leaky_relu", slope=0.1),
                                 ActSpec("hardtanh", min_val=-0.5, max_val=0.7)], ids=lambda a: a.describe())
@pytest.mark.parametrize("score", ["max", "l2"])
def test_depthwise_update_fused_equals_unfused_and_reference(c: int, act: ActSpec, score: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A delta depthwise conv's update run on each vector of channels as it is summed (depthwise_update_body)
    against depthwise_row then update_row (the same A, emitted pixels, rows and E) and against the reference backend, with
    a residual, at stride 1 and 2."""
    from conftest import cl_state, random_delta
    from deltacnn.backends import reference
    monkeypatch.setattr(reference, "DENSE_SWITCH", 1.0)
    for win in (Window.make(3, 1, 1), Window.make(3, 2, 1)):
        gen = torch.Generator().manual_seed(37 + c)
        n, h, w = 2, 11, 13
        d = random_delta(n, c, h, w, 0.3, gen)
        p = ConvParams(torch.randn(c, 1, 3, 3, generator=gen), win, c)
        ho, wo = win.out_size(h, w)
        residual = random_delta(n, c, ho, wo, 0.2, gen)
        outs = []
        for be, fused in ((REF, True), (FUSED, False), (FUSED, True)):
            old = FUSED._k.set_dw_fused_update(fused)
            try:
                g = torch.Generator().manual_seed(41)
                acc = cl_state(2 * torch.randn(n, c, ho, wo, generator=g))
                st = PointwiseState(act, acc, cl_state(act(acc)), 0.05, score)
                outs.append((be.conv_block(d, p, residual, st), st))
            finally:
                FUSED._k.set_dw_fused_update(old)
        (o0, s0), (o1, s1), (o2, s2) = outs
        assert int(o1.mask.sum()) > 0 and torch.equal(o1.mask, o2.mask) and torch.equal(o0.mask, o2.mask)
        m = o1.mask.expand_as(o1.values)
        # equal but for leaky_relu's a * slope - E, which one path's compiler contracts into an FMA (1 ulp)
        torch.testing.assert_close(o2.values[m], o1.values[m], rtol=1e-6, atol=1e-6)
        assert torch.equal(s2.acc, s1.acc)
        torch.testing.assert_close(s2.emitted, s1.emitted, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s2.acc, s0.acc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s2.emitted, s0.emitted, rtol=1e-5, atol=1e-5)
