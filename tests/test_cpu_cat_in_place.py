"""Delta frames' cats read in place by their 1x1 convs on the cpu backend (DeltaCat.read_in_place,
FusedCpuBackend.cat_in_place, DeltaConvPlan.run_cat): the converter marks only the cats whose one user is such a
conv, the outputs equal the written cat's bit for bit and the reference backend's and dense PyTorch's at tau 0,
and every path the one call does not cover (per-stream counts, the dense crossover) builds the cat first."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.backends import cpu_fused, get_backend
from deltacnn.backends.cpu_fused import FusedCpuBackend
from deltacnn.backends.cpu_kernels import load, load_error
from deltacnn.layers.linear import DeltaCat
from conftest import assert_cpu_equals_reference_and_dense, make_video

pytestmark = pytest.mark.usefixtures("cpu_isa")  # run_cat's GEMM and epilogue on both ISAs

if load() is None:
    pytest.skip(f"CPU kernels do not build here: {load_error()}", allow_module_level=True)


class CatNet(nn.Module):
    """C2f's cat of a conv's two halves and a 3x3 branch into a 1x1 conv (parts of 16 and 8 channels), a neck cat
    of unequal parts into a 1x1 conv with a residual add, a cat into a 3x3 conv and a cat with two users (neither
    read in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.m = nn.Conv2d(8, 8, 3, 1, 1)
        self.cv2 = nn.Conv2d(24, 12, 1)
        self.side = nn.Conv2d(12, 4, 3, 1, 1)
        self.neck = nn.Conv2d(16, 12, 1)
        self.wide = nn.Conv2d(16, 6, 3, 1, 1)
        self.head = nn.Conv2d(22, 5, 1)

    def forward(self, x):
        y = nn.functional.silu(self.stem(x))
        a, b = y.chunk(2, 1)
        z = nn.functional.silu(self.cv2(torch.cat([a, b, nn.functional.silu(self.m(b))], 1)))  # read in place
        s = nn.functional.silu(self.side(z))
        n = nn.functional.silu(self.neck(torch.cat([z, s], 1)) + z)  # read in place, with a residual
        both = torch.cat([n, s], 1)  # two users: written
        w = torch.relu(self.wide(both))  # a 3x3 conv's cat: written
        return self.head(torch.cat([both[:, :6] * 1.0 + w, both], 1))


def _fused() -> FusedCpuBackend:
    be = get_backend(torch.device("cpu"))
    if not isinstance(be, FusedCpuBackend) or not be._gemm:
        pytest.skip("no AVX2/FMA here: the one call does not run")
    return be


def _net() -> nn.Module:
    torch.manual_seed(4)
    return CatNet().eval()


def _run(net: nn.Module, frames: torch.Tensor, backend: str, in_place: bool = True, batch: int = 1) -> list:
    dm = deltacnn.convert(net, frames[:batch], threshold=0.0, backend=backend, dense_above=None)
    dm.rt.cats_in_place = in_place
    with torch.no_grad():
        return [dm(frames[batch * t:batch * (t + 1)]) for t in range(frames.shape[0] // batch)]


def test_the_converter_marks_the_cats_a_1x1_conv_with_an_activation_reads_alone() -> None:
    net = _net()
    dm = deltacnn.convert(net, make_video(1)[0], backend="reference")
    marked = sorted(m.name for m in dm.modules() if isinstance(m, DeltaCat) and m.read_in_place)
    cats = [m for m in dm.modules() if isinstance(m, DeltaCat)]
    assert len(cats) == 4 and len(marked) == 2, marked


def test_cats_in_place_equal_the_written_cats_bit_for_bit_and_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse moving squares (each part's mask differs: the 3x3 branch's is dilated), 8 frames at tau 0; the
    in-place run writes only the two unmarked cats (the convs never build a marked one: run_cat ran)."""
    _fused()
    net, frames = _net(), make_video(8, h=24, w=28, noise=0.0)[:, 0]
    written = _run(net, frames, "cpu", in_place=False)
    counts = {"cat": 0, "in_place": 0}
    real_cat, real_in_place = FusedCpuBackend.cat, FusedCpuBackend.cat_in_place

    def cat(self, ds):
        counts["cat"] += 1
        return real_cat(self, ds)

    def cat_in_place(self, ds):
        out = real_in_place(self, ds)
        counts["in_place"] += out is not None
        return out
    monkeypatch.setattr(FusedCpuBackend, "cat", cat)
    monkeypatch.setattr(FusedCpuBackend, "cat_in_place", cat_in_place)
    outs = {"cpu": _run(net, frames, "cpu"), "reference": _run(net, frames, "reference")}
    assert counts == {"cat": 2 * 7, "in_place": 2 * 7}, counts  # the conv never built a marked cat
    for a, b in zip(outs["cpu"], written):
        assert torch.equal(a, b)
    assert_cpu_equals_reference_and_dense(outs, net, frames, 8, 1)


def test_per_stream_counts_and_the_dense_crossover_build_the_cat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two streams (per-stream work counts: no one call) and a crossover of 0 (every conv dense): the conv builds
    the cat from its parts and the frames still equal the reference's and dense PyTorch's."""
    _fused()
    net = _net()
    frames = make_video(6, n=2, h=24, w=28, noise=0.0).flatten(0, 1)
    outs = {"cpu": _run(net, frames, "cpu", batch=2), "reference": _run(net, frames, "reference", batch=2)}
    assert_cpu_equals_reference_and_dense(outs, net, frames, 6, 2)
    frames = make_video(6, h=24, w=28, noise=0.0)[:, 0]
    monkeypatch.setattr(cpu_fused, "GEMM_DENSE_SWITCH", 0.0)
    outs = {"cpu": _run(net, frames, "cpu"), "reference": _run(net, frames, "reference")}
    assert_cpu_equals_reference_and_dense(outs, net, frames, 6, 1)


def test_a_cat_read_in_place_has_no_rows_for_other_readers() -> None:
    be = _fused()
    d = deltacnn.tensor.DeltaTensor.keyframe(torch.rand(1, 4, 5, 6))
    d = deltacnn.tensor.DeltaTensor(d.values, torch.rand(1, 1, 5, 6) > 0.5)
    cat = be.cat_in_place([d, d])
    assert cat is not None and cat.parts == (d, d) and cat.shape == (1, 8, 5, 6)
    assert torch.equal(cat.mask, d.mask) and torch.equal(cat.active(), d.active())
    with pytest.raises(RuntimeError, match="read in place"):
        cpu_fused._rows(cat)


def test_motion_view_steps_turn_cats_in_place_off_while_they_run() -> None:
    from deltacnn.motion.padded import PaddedStep
    dm = deltacnn.convert(_net(), make_video(1)[0], backend="cpu")
    step = PaddedStep(dm, [], {}, {}, (32, 32))
    with step:
        assert dm.rt.cats_in_place is False
    assert dm.rt.cats_in_place is True


def _spy_dense(monkeypatch: pytest.MonkeyPatch, decline: bool = False) -> dict:
    """Counts the keyframe cats handed over as parts and the dense convs that read them (decline: dense_conv
    refuses parts, so the conv layer must build the cat itself)."""
    counts = {"parts_cats": 0, "parts_convs": 0}
    real_cat, real_conv = FusedCpuBackend.dense_cat_in_place, FusedCpuBackend.dense_conv

    def dense_cat_in_place(self, ds):
        out = real_cat(self, ds)
        counts["parts_cats"] += out is not None
        return out

    def dense_conv(self, x, p, bias, residual, act, state, parts=None):
        if parts is not None and decline:
            return None
        out = real_conv(self, x, p, bias, residual, act, state, parts)
        counts["parts_convs"] += parts is not None and out is not None
        return out
    monkeypatch.setattr(FusedCpuBackend, "dense_cat_in_place", dense_cat_in_place)
    monkeypatch.setattr(FusedCpuBackend, "dense_conv", dense_conv)
    return counts


@pytest.mark.parametrize("decline", [False, True], ids=["conv_dense reads the parts", "the conv builds the cat"])
def test_keyframe_cats_in_place_equal_the_written_cats_and_the_reference(decline: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyframes (every 3rd frame) of the same net: the two marked cats reach conv_dense as parts (C2f's halves are
    channel views, the neck's parts are of unequal width) and are never written; the frames equal the written
    cats' bit for bit, the reference backend's and dense PyTorch's. Where dense_conv declines the parts, the conv
    layer builds the cat and the frames are the same."""
    _fused()
    net, frames = _net(), make_video(7, h=24, w=28, noise=0.0)[:, 0]

    def run(in_place: bool, backend: str = "cpu") -> list:
        dm = deltacnn.convert(net, frames[:1], threshold=0.0, backend=backend, dense_above=None, keyframe_interval=3)
        dm.rt.cats_in_place = in_place
        with torch.no_grad():
            return [dm(frames[t:t + 1]) for t in range(frames.shape[0])]
    written = run(False)
    counts = _spy_dense(monkeypatch, decline)
    outs = {"cpu": run(True), "reference": run(True, "reference")}
    keyframes = 3  # frames 0, 3, 6
    assert counts == {"parts_cats": 2 * keyframes, "parts_convs": 0 if decline else 2 * keyframes}, counts
    for a, b in zip(outs["cpu"], written):
        assert torch.equal(a, b)
    assert_cpu_equals_reference_and_dense(outs, net, frames, 7, 1)


def test_conv_dense_reads_parts_of_any_channel_strides() -> None:
    """conv_dense with `parts` (channels_last maps and a channel view of one, widths 8, 16 and 24: taps of 8) gives
    conv_dense of their torch.cat bit for bit, with and without A."""
    be = _fused()
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(2, 32, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    parts = (base[:, 8:16], torch.randn(2, 16, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last),
             base[:, 8:32])
    conv = nn.Conv2d(48, 20, 1).eval()
    from deltacnn.activations import ActSpec
    from deltacnn.geometry import Window
    from deltacnn.backends.base import ConvParams
    p = ConvParams(conv.weight.detach(), Window((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)), 1)
    cat = torch.cat(parts, 1)
    for act in (None, ActSpec("silu")):
        outs = []
        for x, ps in ((cat, None), (torch.empty(()).expand(cat.shape), parts)):
            a_e = [torch.empty(2, 20, 5, 7).contiguous(memory_format=torch.channels_last) for _ in range(2)]
            y = be.dense_conv(x, p, conv.bias.detach(), None, act, (lambda shape: tuple(a_e)) if act else None, ps)
            outs.append((y.clone(), a_e[0].clone() if act else None))
        assert torch.equal(outs[0][0], outs[1][0]) and (act is None or torch.equal(outs[0][1], outs[1][1]))
