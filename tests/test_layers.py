"""Every delta layer, converted from a small model, equals dense PyTorch at tau = 0 over a clip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltacnn
from conftest import make_video, rel_err

ACT_MODULES = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.LeakyReLU(-0.5), nn.SiLU(), nn.Hardswish(),
               nn.Hardsigmoid(), nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.GELU(approximate="tanh"), nn.PReLU(4),
               nn.ELU(0.7), nn.Hardtanh(-0.5, 0.5)]


class ConvAct(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = act
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv(x)))


class Functional(nn.Module):
    """Functional calls and tensor methods the converter must recognise."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=(2, 1), dilation=(2, 1), groups=8)
        self.c = nn.Conv2d(8, 8, 3, stride=2, padding="valid")
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("offset", torch.randn(1, 8, 1, 1))

    def forward(self, x):
        y = F.leaky_relu(self.a(x), 0.1)
        y = torch.sigmoid(self.b(y)) * y  # two streams
        y = y.relu() - 0.5 * y  # method activation, scale, sub of streams
        y = self.bn(y + self.offset)  # unfolded BN (input is not a conv), constant add
        z = F.max_pool2d(y, 3, 2, 1) + F.max_pool2d(y, 2, ceil_mode=True)
        w = F.avg_pool2d(y, 2)
        y = torch.cat([z[:, :4], w[:, 4:] / 3.0], dim=1)
        y = F.interpolate(self.c(F.hardswish(y)), scale_factor=2, mode="nearest")
        s = F.adaptive_avg_pool2d(y, 1)
        return F.gelu(y) * torch.tanh(s) + F.silu(-y)


class Resample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bil = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.bil2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.pool = nn.AdaptiveAvgPool2d((3, 5))
        self.fc = nn.Linear(6 * 15, 5)

    def forward(self, x):
        d = torch.relu(self.down(x))
        u = self.up(d) + self.up2(d) + self.bil(d)[:, :4] + self.bil2(d)[:, 2:]
        return u, self.fc(torch.flatten(self.pool(d), 1))


def _check(model: nn.Module, frames: int = 25, tol: float = 1e-5, **kw) -> deltacnn.DeltaModel:
    torch.manual_seed(0)
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    clip = make_video(frames, n=2, h=16, w=20, noise=0.0, seed=3)
    kw.setdefault("dense_above", None)  # delta frames only: these tests are about the delta layers
    dm = deltacnn.convert(model, clip[0], **kw)
    for t in range(frames):
        got = dm(clip[t])
        with torch.no_grad():
            want = model(clip[t])
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert g.shape == w.shape
            assert rel_err(g, w) < tol, f"frame {t}: rel err {rel_err(g, w):.2e}"
    return dm


@pytest.mark.parametrize("act", ACT_MODULES, ids=lambda m: repr(m))
def test_activation_layers(act):
    _check(ConvAct(act))


@pytest.mark.parametrize("fuse", [True, False])
def test_functional_ops(fuse):
    _check(Functional(), fuse=fuse)


def test_resampling_and_dense_tail():
    dm = _check(Resample())
    kinds = {type(m).__name__ for m in dm.layers.values()}
    assert {"DeltaConvTranspose2d", "DeltaLinearMap", "Densify"} <= kinds


def test_delta_frames_are_sparse():
    """With no noise only the moving squares change: updates must be a small part of the frame."""
    dm = deltacnn.convert(ConvAct(nn.ReLU()).eval(), make_video(1, h=32, w=32)[0])
    dm.enable_stats()
    clip = make_video(5, h=32, w=32, noise=0.0, objects=1, size=4)
    for t in range(5):
        dm(clip[t])
    s = dm.frame_stats()
    assert not s.keyframe
    assert 0 < s.layers["input"].update_rate < 0.2
    assert 0 < s.macs_fraction < 0.4


def test_statistics_count_each_layers_mask_exactly():
    """Each layer's update rate is its emitted mask's count (a CPU mask counted on the host, as an int), whether the
    mask is contiguous or broadcast, and merged rows add up."""
    from deltacnn.stats import StatsRecorder
    g = torch.Generator().manual_seed(3)
    m = torch.rand(2, 1, 7, 9, generator=g) < 0.3
    rec = StatsRecorder(enabled=True)
    rec.start_frame()
    rec.record("a", "conv", m, 10)
    wide = (torch.rand(1, 1, 7, 9, generator=g) < 0.5).expand(2, 1, 7, 9)  # a broadcast mask (stride 0)
    rec.record("b", "conv", wide, 3)
    rec.record("c", "conv", m, 5, dense=True)
    rec.record_work("d", "dense-island", 100)
    rec.merging = True
    rec.record("a", "conv", m[:1], 10)  # a pass over one stream adds to the frame's row
    rec.merging = False
    rows = {r[0]: r for r in rec._rows}
    assert all(isinstance(r[2], int) for r in rows.values())
    fs = rec.frame(False)
    want_a = int(m.sum()) + int(m[:1].sum())
    assert fs.layers["a"].macs == want_a * 10 and fs.layers["a"].update_rate == want_a / m.numel()
    assert fs.layers["b"].macs == int(wide.sum()) * 3 > 0 and fs.layers["b"].update_rate == int(wide.sum()) / wide.numel()
    assert fs.layers["c"].update_rate == 1.0 and fs.layers["d"].macs == 100


@pytest.mark.parametrize("model", [Functional, Resample, lambda: ConvAct(nn.SiLU())], ids=["functional", "resample",
                                                                                         "conv-silu"])
def test_syncfree_backend_matches_reference(model):
    """The capturable dense-masked backend (GPU fallback) gives the reference backend's results, tau > 0 too."""
    torch.manual_seed(0)
    m = model().eval()
    clip = make_video(12, n=2, h=16, w=20, noise=0.01, seed=4)
    # dense dispatch off: on maps this small deltas do most of the work, and the reference backend
    # would run such frames densely (exact), which the sync-free backend cannot decide
    ref = deltacnn.convert(m, clip[0], threshold=0.05, backend="reference", dense_above=None)
    fast = deltacnn.convert(m, clip[0], threshold=0.05, backend="syncfree")
    for t in range(12):
        a, b = ref(clip[t]), fast(clip[t])
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
