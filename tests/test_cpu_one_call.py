"""conv_block's one C++ call on the cpu backend (DeltaConvPlan.run: candidates, conv, epilogue, output
delta) against the pure-PyTorch reference backend and dense PyTorch, for every kind of conv it covers:
groups 1 with f in the epilogue, linear with and without a residual (MobileNetV2's projections), and
depthwise with f; each case checks that the one call ran (the multi-call path is made to fail)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deltacnn.activations import ActSpec
from deltacnn.backends import get_backend
from deltacnn.backends import reference
from deltacnn.backends.base import ConvParams, PointwiseState
from deltacnn.backends.cpu_fused import FusedCpuBackend
from deltacnn.backends.cpu_kernels import load, load_error
from deltacnn.backends.reference import ReferenceBackend
from deltacnn.geometry import Window
from deltacnn.tensor import DeltaTensor
from conftest import cl_state, random_delta

pytestmark = pytest.mark.usefixtures("cpu_isa")  # the one call's block epilogues on both ISAs

if load() is None:
    pytest.skip(f"CPU kernels do not build here: {load_error()}", allow_module_level=True)

REF = ReferenceBackend()


def _fused() -> FusedCpuBackend:
    be = get_backend(torch.device("cpu"))
    if not isinstance(be, FusedCpuBackend) or not be._gemm:
        pytest.skip("no AVX2/FMA here: the one call does not run")
    return be


_delta, _state = random_delta, cl_state


def _no_calls(be: FusedCpuBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the multi-call path fail on `be`: the case must take the one call."""
    def fail(*a, **k):
        raise AssertionError("conv_block took the multi-call path")
    monkeypatch.setattr(be, "_conv_block_calls", fail)


def _dense_conv(d: DeltaTensor, p: ConvParams) -> torch.Tensor:
    t, b, l, r = p.window.padding
    return nn.functional.conv2d(nn.functional.pad(d.zero_filled(), (l, r, t, b)), p.weight, None, p.window.stride,
                                0, p.window.dilation, p.groups)


def _candidates(d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None, out_hw) -> torch.Tensor:
    """Dense PyTorch's candidate mask: an output pixel whose window holds an update (or the residual's)."""
    ones = torch.ones(1, 1, *p.window.kernel)
    t, b, l, r = p.window.padding
    m = nn.functional.conv2d(nn.functional.pad(d.mask.float(), (l, r, t, b)), ones, None, p.window.stride, 0,
                             p.window.dilation) > 0
    return m | residual.mask if residual is not None else m


WINDOWS = [Window.make(1), Window.make(3, 1, 1), Window.make(3, 2, 1), Window((3, 3), (2, 1), (0, 2, 1, 0), (1, 1))]


@pytest.mark.parametrize("win", WINDOWS, ids=str)
@pytest.mark.parametrize("act", [None, ActSpec("relu6"), ActSpec("silu")], ids=lambda a: a.describe() if a else "linear")
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("cin,cout", [(7, 24), (16, 21)])
def test_gemm_one_call_equals_reference_and_dense(win: Window, act: ActSpec | None, with_residual: bool, cin: int,
                                                  cout: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups-1 convs: output delta, A and E equal to the reference's conv_block, the values equal to dense
    PyTorch on the zero-filled delta (+ the residual), and the same counted work. Cout 24 and 21 end in a
    panel of at most 8 channels (gemm_panel8)."""
    be = _fused()
    gen = torch.Generator().manual_seed(71)
    n, h, w = 2, 11, 13
    d = _delta(n, cin, h, w, 0.15, gen)
    p = ConvParams(torch.randn(cout, cin, *win.kernel, generator=gen) * 0.3, win, 1)
    ho, wo = win.out_size(h, w)
    residual = _delta(n, cout, ho, wo, 0.2, gen) if with_residual else None
    outs = []
    for b in (REF, be):
        if b is be:
            _no_calls(be, monkeypatch)
        b.work = [0, 0]
        st = None
        if act is not None:
            g = torch.Generator().manual_seed(73)
            acc = _state(3 * torch.randn(n, cout, ho, wo, generator=g))
            st = PointwiseState(act, acc, _state(act(acc) + 0.1 * torch.randn(n, cout, ho, wo, generator=g)), 0.05, "max")
        outs.append((b.conv_block(d, p, residual, st), st, list(b.work)))
    (o1, s1, w1), (o2, s2, w2) = outs
    assert w1 == w2 and w2[0] > 0
    assert torch.equal(o1.mask, o2.mask) and torch.equal(o1.active(), o2.active())
    assert 0 < int(o2.mask.sum()) < o2.mask.numel() and o2.ext is not None
    m = o2.mask.expand_as(o2.values)
    torch.testing.assert_close(o2.values[m], o1.values[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o2.ext[-1], torch.zeros(cout))  # the zero row gathers read
    dense = _dense_conv(d, p) + (residual.zero_filled() if residual is not None else 0)
    cand = _candidates(d, p, residual, (ho, wo))
    if act is None:  # a linear conv sends every candidate: conv (+ residual) there
        assert torch.equal(o2.mask, cand)
        torch.testing.assert_close(o2.values[m], dense[m], rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(s2.acc, s1.acc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.emitted, s1.emitted, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(73)
    acc0 = 3 * torch.randn(n, cout, ho, wo, generator=g)
    torch.testing.assert_close(s2.acc, torch.where(cand, acc0 + dense, acc0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.emitted[m], act(s2.acc)[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("win", [Window.make(3, 1, 1), Window.make(3, 2, 1), Window.make(5, 1, 2, 2)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_depthwise_one_call_equals_reference_and_dense(win: Window, with_residual: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Depthwise convs with f (relu6, MobileNetV2's) in the one call, below the dense crossover."""
    be = _fused()
    monkeypatch.setattr(reference, "DENSE_SWITCH", 1.0)
    gen = torch.Generator().manual_seed(79)
    n, c, h, w = 2, 19, 10, 12
    d = _delta(n, c, h, w, 0.1, gen)
    p = ConvParams(torch.randn(c, 1, *win.kernel, generator=gen), win, c)
    ho, wo = win.out_size(h, w)
    residual = _delta(n, c, ho, wo, 0.2, gen) if with_residual else None
    act = ActSpec("relu6")
    outs = []
    for b in (REF, be):
        if b is be:
            _no_calls(be, monkeypatch)
        b.work = [0, 0]
        g = torch.Generator().manual_seed(83)
        acc = _state(2 * torch.randn(n, c, ho, wo, generator=g))
        st = PointwiseState(act, acc, _state(act(acc)), 0.05, "max")
        outs.append((b.conv_block(d, p, residual, st), st, list(b.work)))
    (o1, s1, w1), (o2, s2, w2) = outs
    assert w1 == w2 and w2[0] > 0
    assert torch.equal(o1.mask, o2.mask) and torch.equal(o1.active(), o2.active()) and int(o2.mask.sum()) > 0
    m = o2.mask.expand_as(o2.values)
    torch.testing.assert_close(o2.values[m], o1.values[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.acc, s1.acc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.emitted, s1.emitted, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(83)
    acc0 = 2 * torch.randn(n, c, ho, wo, generator=g)
    dense = _dense_conv(d, p) + (residual.zero_filled() if residual is not None else 0)
    torch.testing.assert_close(s2.acc, torch.where(_candidates(d, p, residual, (ho, wo)), acc0 + dense, acc0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 19])
def test_one_call_crossover_and_empty_input(groups: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the dense crossover the one call computes nothing and the dense conv runs (same result as the
    reference's dense case); an input without updates gives an empty delta, with the work counted."""
    be = _fused()
    gen = torch.Generator().manual_seed(89)
    n, c, h, w = 1, 19, 9, 10
    win = Window.make(3, 1, 1)
    p = ConvParams(torch.randn(c, c // groups, 3, 3, generator=gen), win, groups)
    act = ActSpec("relu")
    if groups == 1:
        from deltacnn.backends import cpu_fused
        monkeypatch.setattr(cpu_fused, "GEMM_DENSE_SWITCH", 0.3)
    monkeypatch.setattr(reference, "DENSE_SWITCH", 0.3)
    d = _delta(n, c, h, w, 0.3, gen)  # ~80% candidates: dense
    outs = []
    for b in (REF, be):
        b.work = [0, 0]
        acc = _state(torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(97)))
        st = PointwiseState(act, acc, _state(act(acc)), 0.0, "max")
        outs.append((b.conv_block(d, p, None, st), st, list(b.work)))
    (o1, s1, w1), (o2, s2, w2) = outs
    assert w1 == w2 == [w2[1], w2[1]]  # dense: every output pixel's multiply-adds
    assert torch.equal(o1.mask, o2.mask)
    torch.testing.assert_close(s2.acc, s1.acc, rtol=1e-5, atol=1e-5)
    _no_calls(be, monkeypatch)
    empty = _delta(n, c, h, w, 0.0, gen)
    be.work = [0, 0]
    acc = _state(torch.randn(n, c, h, w, generator=gen))
    out = be.conv_block(empty, p, None, PointwiseState(act, acc, _state(act(acc)), 0.0, "max"))
    assert int(out.mask.sum()) == 0 and out.active().numel() == 0 and be.work == [0, w2[1]]
    torch.testing.assert_close(out.ext[-1], torch.zeros(c))


def test_one_call_reuses_its_output_only_when_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one call writes a conv's next output into its last output ext once nothing holds that ext any
    more, and never while a delta (or a view of it) is still alive: a held output keeps its values."""
    be = _fused()
    _no_calls(be, monkeypatch)
    gen = torch.Generator().manual_seed(101)
    n, cin, cout, h, w = 1, 8, 24, 12, 14
    win = Window.make(3, 1, 1)
    p = ConvParams(torch.randn(cout, cin, 3, 3, generator=gen), win, 1)
    d1, d2 = _delta(n, cin, h, w, 0.2, gen), _delta(n, cin, h, w, 0.2, gen)
    held = be.conv_block(d1, p, None, None)
    kept = held.values.clone()
    ptr = held.ext.data_ptr()
    second = be.conv_block(d2, p, None, None)  # `held` is alive: a new buffer
    assert second.ext.data_ptr() != ptr
    m = held.mask.expand_as(kept)
    assert torch.equal(held.values[m], kept[m])
    ptr2 = second.ext.data_ptr()
    del second
    third = be.conv_block(d1, p, None, None)  # `second` released: its buffer again, same result as `held`
    assert third.ext.data_ptr() == ptr2
    assert torch.equal(third.mask, held.mask)
    torch.testing.assert_close(third.values[m], kept[m], rtol=0, atol=0)
    torch.testing.assert_close(third.ext[-1], torch.zeros(cout))
    view = third.values[:, :4]  # a view alone keeps the buffer too
    del third
    fourth = be.conv_block(d2, p, None, None)
    assert fourth.ext.data_ptr() != view.data_ptr()
