"""Architectures people run, converted unmodified, equal dense PyTorch at tau 0 over 60 frames.

torchvision, timm and Ultralytics models (tests/arch_zoo.py: random weights, random batch-norm
statistics, no downloads) on a synthetic clip with real change: a textured background, four
moving textured objects and sensor noise on a random 15% of the pixels of every frame (so every
frame has large deltas at the objects and small ones scattered over the background, and the delta
paths gather and scatter real subsets of pixels). Outputs of any structure (dict of
FPN levels, YOLO's (decoded, dict of maps) pair) are compared leaf by leaf.

Tolerance: relative to each leaf's largest dense magnitude, 1e-4. At tau 0 the delta model
computes the same sums in another order (per-pixel deltas accumulated frame after frame instead
of one dense sum), so float32 rounding differs by a few ulps per layer; through 50-100 layers
that stays near 1e-6 relative (measured; see LEAD_NOTES.md), and a real bug (a missed pixel, a
wrong channel, a stale state) shows up at 1e-2 or more.

No silent dense op: every Conv2d of the original model that runs must be a delta layer, inside
a dense island the architecture is listed with, or one of its listed dense-tail convs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltacnn
from arch_zoo import ARCHS, build, conv_coverage, leaves, moving_clip, structure
from conftest import make_video
from deltacnn.layers import DeltaConv2d, DeltaLayerNorm, DeltaMul, DeltaScale, DenseIsland

FRAMES = 60
RTOL = 1e-4


def _clip(h: int, w: int, frames: int = FRAMES, seed: int = 5) -> torch.Tensor:
    return moving_clip(frames, h, w, seed=seed)


def _worst_rel(got, want) -> float:
    assert structure(got) == structure(want), f"output structure {structure(got)} != dense {structure(want)}"
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))
               for a, b in zip(leaves(got), leaves(want)))


@pytest.mark.parametrize("arch", ARCHS, ids=[a.id for a in ARCHS])
def test_converts_unmodified_and_matches_dense_at_tau0(arch):
    if not arch.available():
        pytest.skip(f"{arch.package} is not installed")
    model = build(arch)
    clip = _clip(*arch.size)
    # dense_above=None: the noise changes every pixel, and busy frames would otherwise run densely
    dm = deltacnn.convert(model, clip[0], dense_above=None, allow_dense_fallback=arch.islands > 0)
    islands = [m for m in dm.graph_module.modules() if isinstance(m, DenseIsland)]
    assert len(islands) == arch.islands, f"{arch.id}: {len(islands)} dense islands {[m.name for m in islands]}"
    cov = conv_coverage(model, dm, clip[0])
    assert not cov["dense"] and not cov["missing"], f"{arch.id}: convs outside delta layers: {cov}"
    assert set(cov["tail"]) == set(arch.tail_convs), f"{arch.id}: convs in dense tails: {cov['tail']}"
    assert cov["delta"], f"{arch.id}: no conv became a delta layer"
    worst = 0.0
    for t in range(FRAMES):
        with torch.no_grad():
            want = model(clip[t])
        worst = max(worst, _worst_rel(dm(clip[t]), want))
    assert dm.last_mode == "delta"
    assert worst < RTOL, f"{arch.id}: worst relative error {worst:.2e} over {FRAMES} frames"


# ---- the op support these architectures need, on small models --------------------------------------
def _run(model: nn.Module, frames: int = 12, h: int = 16, w: int = 16, **kw) -> tuple:
    model.eval()
    clip = make_video(frames, h=h, w=w, noise=0.01, seed=7, objects=2, size=5)
    dm = deltacnn.convert(model, clip[0], dense_above=None, **kw)
    worst = 0.0
    for t in range(frames):
        with torch.no_grad():
            worst = max(worst, _worst_rel(dm(clip[t]), model(clip[t])))
    return dm, worst


def _kinds(dm) -> list[type]:
    return [type(m) for m in dm.graph_module.modules()]


class FunctionalBN(nn.Module):
    """timm's BatchNormAct2d style: F.batch_norm with the module's buffers, after a conv and after an add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        for b in (self.bn, self.bn2):
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(b.weight, 0.5, 1.5)

    def forward(self, x):
        y = self.conv(x)
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.1, 1e-5)
        y = F.relu(y) + y
        return F.batch_norm(y, self.bn2.running_mean, self.bn2.running_var, None, None, self.training, 0.1, 1e-3)


def test_functional_batch_norm_is_folded_or_a_scale():
    dm, worst = _run(FunctionalBN())
    assert worst < RTOL
    scales = [m for m in dm.graph_module.modules() if isinstance(m, DeltaScale)]
    assert len(scales) == 1, "the first batch norm folds into the conv, the one after the add stays a scale"


def test_conv_then_constant_scale_folds_into_the_conv():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gamma = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

        def forward(self, x):
            return torch.relu(self.conv(x) * self.gamma + 0.25)

    dm, worst = _run(M())
    assert worst < RTOL
    assert DeltaScale not in _kinds(dm)


def test_eval_identities_disappear():
    from torchvision.ops import stochastic_depth

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = F.dropout(self.conv(x), 0.3, training=self.training)
            y = F.dropout2d(y, 0.2, self.training)
            return y + stochastic_depth(y, 0.5, "row", self.training)

    dm, worst = _run(M())
    assert worst < RTOL


class LinearSE(nn.Module):
    """Squeeze-excitation from Linear layers: pool -> flatten -> Linear -> ReLU -> Linear -> sigmoid ->
    view -> expand_as, the gate computed densely per image, multiplying (and offsetting) the map."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, 4), nn.Linear(4, c)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        b, c = y.size(0), y.size(1)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))).view(b, c, 1, 1)
        z = y * s.expand_as(y)
        z = self.conv2(z) / (s + 0.5) - s
        return torch.relu(s.expand_as(z) + z)


def test_map_times_densely_computed_gate_is_exact():
    dm, worst = _run(LinearSE())
    assert worst < RTOL
    assert DeltaMul in _kinds(dm)
    assert not any(isinstance(m, DenseIsland) for m in dm.graph_module.modules())
    # the gate changes whenever any pixel does, so the product updates every pixel: correct, not sparse
    convs = [m for m in dm.graph_module.modules() if isinstance(m, DeltaConv2d)]
    assert len(convs) == 2


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, permute, LayerNorm, Linear, GELU, Linear, permute, layer scale, residual."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.last = nn.Parameter(torch.rand(c) + 0.5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        x = x + self.scale * y.permute(0, 3, 1, 2)
        z = F.layer_norm(x.permute(0, 2, 3, 1), (8,), None, None, 1e-6) * self.last
        return z.permute(0, 3, 1, 2)


def test_layer_norm_over_channels_is_a_delta_layer():
    dm, worst = _run(ChannelsLastBlock())
    assert worst < RTOL
    assert sum(isinstance(m, DeltaLayerNorm) for m in dm.graph_module.modules()) == 2
    assert not any(isinstance(m, DenseIsland) for m in dm.graph_module.modules())


def test_layer_norm_truncation_does_not_drift():
    """tau > 0: truncated change stays in LN(A) - E and is sent later; a static clip converges back."""
    m = ChannelsLastBlock().eval()
    clip = make_video(8, h=16, w=16, noise=0.0, seed=3, objects=2, size=5)
    dm = deltacnn.convert(m, clip[0], threshold=1e-3, dense_above=None)
    for t in range(8):
        dm(clip[t])
    last = clip[7]
    for _ in range(3):  # the same frame again: nothing new, yet what was truncated must not be lost
        out = dm(last)
    with torch.no_grad():
        want = m(last)
    assert (out - want).abs().max() < 0.05
    layer_norms = [m for m in dm.graph_module.modules() if isinstance(m, DeltaLayerNorm)]
    assert all(ln._state("emitted").shape == ln._state("acc").shape for ln in layer_norms)


def test_unsupported_op_on_a_channels_last_view_names_the_node():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.flip(self.conv(x).permute(0, 2, 3, 1), (1,)).permute(0, 3, 1, 2)

    with pytest.raises(deltacnn.UnsupportedOperationError, match="flip.*channels-last"):
        deltacnn.convert(M().eval(), torch.randn(1, 3, 16, 16))


def test_one_dimensional_constant_is_not_taken_for_a_channel_scale():
    """x * t with t of shape (W,) broadcasts over width in PyTorch: a linear map, not a per-channel scale."""
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.t = nn.Parameter(torch.rand(16) + 0.5)
            self.u = nn.Parameter(torch.rand(1, 16, 1) + 0.5)

        def forward(self, x):
            return torch.relu(self.conv(x) * self.t / self.u)

    dm, worst = _run(M())
    assert worst < RTOL
    assert DeltaScale not in _kinds(dm)
