"""Padded view steps (deltacnn/motion/padded.py): a view step inside the delta pass, no keyframe, no bands.

At tau 0 the output must equal dense inference on the camera frame on every frame of a pan by multiples of
the total stride, on the whole frame, for networks with strided and dilated convs, residual adds, a conv
without a nonlinearity into an add, max pools with padding, concatenations, nearest and bilinear
upsampling and two outputs at different strides; and a view step must cost far less than a keyframe.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltacnn
from deltacnn.motion import MotionDeltaModel

H, W = 224, 256  # multiples of MixNet's total stride 16, wide enough for its padded crops (ext 64 px)


class MixNet(nn.Module):
    """Total stride 16: a stem, a dilated residual conv, an SPPF-like 5x5 max pool chain with a cat, a nearest
    and a bilinear upsampling with skip connections, a 3x3 conv without nonlinearity into an add, two heads."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2, 1)
        self.dil = nn.Conv2d(c, c, 3, 1, 2, dilation=2)
        self.down1 = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.down2 = nn.Conv2d(2 * c, 2 * c, 3, 2, 1)
        self.down3 = nn.Conv2d(2 * c, 2 * c, 3, 2, 1)
        self.fuse = nn.Conv2d(6 * c, 2 * c, 1)
        self.up1 = nn.Conv2d(4 * c, 2 * c, 3, 1, 1)
        self.lin = nn.Conv2d(2 * c, 2 * c, 3, 1, 1)
        self.head = nn.Conv2d(2 * c, 3, 1)
        self.head2 = nn.Conv2d(2 * c, 2, 3, 1, 1)

    def forward(self, x):
        a = F.silu(self.stem(x))  # stride 2
        a = F.relu(self.dil(a)) + a
        b = F.silu(self.down1(a))  # 4
        c = F.silu(self.down2(b))  # 8
        d = F.silu(self.down3(c))  # 16
        p1 = F.max_pool2d(d, 5, 1, 2)
        p2 = F.max_pool2d(p1, 5, 1, 2)
        e = F.silu(self.fuse(torch.cat([d, p1, p2], 1)))
        u = F.interpolate(e, scale_factor=2, mode="nearest")  # 8
        f = F.silu(self.up1(torch.cat([u, c], 1)))
        g = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False)  # 4
        h = torch.sigmoid(self.lin(g) + b)
        return self.head(h), self.head2(e)


def _scene(seed: int, h: int = 480, w: int = 560) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (F.interpolate(torch.randn(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear",
                          align_corners=False) + 0.1 * torch.randn(1, 3, h, w, generator=g))


def _camera(scene: torch.Tensor, cx: int, cy: int, t: int) -> torch.Tensor:
    s = scene.clone()
    s[:, :, 150 + 2 * t:170 + 2 * t, 200 + 3 * t:224 + 3 * t] = 1.5  # objects moving in the scene
    s[:, :, 260 - 3 * t:276 - 3 * t, 240:256] = -1.0
    return s[:, :, cy:cy + H, cx:cx + W]


# view steps of 16 and 32 px along x, y, both, both signs, and a still frame
PATH = [(100, 100), (116, 100), (116, 116), (132, 132), (132, 132), (100, 116), (84, 100), (84, 68)]


@pytest.fixture(scope="module")
def mix():
    torch.manual_seed(1)
    return MixNet().eval()


def _close(out, want, msg: str) -> None:
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w, atol=3e-5, rtol=0, msg=msg)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_padded_view_steps_are_exact_at_tau0_and_never_keyframes(mix, backend):
    scene = _scene(1)
    x0 = _camera(scene, *PATH[0], 0)
    seq = torch.tensor([[0.0, 0.0]] + [[b[0] - a[0], b[1] - a[1]] for a, b in zip(PATH, PATH[1:])])
    mm = MotionDeltaModel(deltacnn.convert(mix, x0, backend=backend), motion=seq, view_step="padded")
    with torch.no_grad():
        for t, (cx, cy) in enumerate(PATH):
            x = _camera(scene, cx, cy, t)
            out = mm(x)
            _close(out, mix(x), f"frame {t}")
            if t:
                assert mm.dm.last_mode == "delta", (t, mm.dm.last_mode)
                moved = PATH[t] != PATH[t - 1]
                assert (mm.aligner.recomputed_pixels > 0) == moved
    assert mm.aligner.geo.padded_ext == 64  # the 5x5 pools at stride 16: 32 px of fix, 32 of context
    assert mm.view[0] == [84 - 100, 68 - 100]


def test_two_streams_step_independently(mix):
    scenes = [_scene(2), _scene(3)]
    paths = [PATH[:5], [(60, 60), (60, 60), (44, 60), (44, 76), (44, 76)]]
    seq = torch.tensor([[[0.0, 0.0]] * 2] + [[[p[t][0] - p[t - 1][0], p[t][1] - p[t - 1][1]] for p in paths]
                                             for t in range(1, 5)])
    x0 = torch.cat([_camera(s, *p[0], 0) for s, p in zip(scenes, paths)])
    mm = MotionDeltaModel(deltacnn.convert(mix, x0, backend="cpu"), motion=seq, view_step="padded")
    with torch.no_grad():
        for t in range(5):
            x = torch.cat([_camera(s, *p[t], t) for s, p in zip(scenes, paths)])
            _close(mm(x), mix(x), f"frame {t}")
            if t:
                assert mm.dm.last_mode == "delta", (t, mm.dm.last_mode)
    assert mm.view == [[32, 32], [-16, 16]]


def test_a_padded_view_step_costs_a_fraction_of_a_keyframe(mix):
    """The same 16 px pan, padded against bands (which cover this view: keyframes): multiply-adds of the
    view-step frames, crops included."""
    scene = _scene(4)
    path = [(100, 100), (116, 100), (132, 100), (148, 100)]
    seq = torch.tensor([[0.0, 0.0]] + [[16.0, 0.0]] * 3)
    macs = {}
    for vs in ("padded", "bands"):
        mm = MotionDeltaModel(deltacnn.convert(mix, _camera(scene, *path[0], 0), backend="cpu"), motion=seq,
                              view_step=vs)
        mm.dm.enable_stats(True)
        macs[vs] = []
        with torch.no_grad():
            for t, p in enumerate(path):
                x = _camera(scene, *p, t)
                out = mm(x)
                _close(out, mix(x), f"{vs}, frame {t}")
                fs = mm.dm.frame_stats()
                if t:
                    macs[vs].append((fs.macs + mm.aligner.recompute_macs) / fs.dense_macs)
                    assert mm.dm.last_mode == ("delta" if vs == "padded" else "keyframe"), (vs, t)
    # measured 0.60 a step frame at tau 0 (the border's change reaches far through the 5x5 pools at stride 16 and
    # the upsampling path back to stride 4, on a 256 px wide view); bands: a keyframe on every step
    assert max(macs["padded"]) < 0.7 and min(macs["bands"]) > 0.99, macs


def test_padded_view_steps_with_thresholds_stay_close_to_dense(mix):
    """tau > 0: the strip and bands are emitted where they pass the thresholds; the error stays that of
    the thresholds (here against the band-recomputing steps, which keyframe this view on every step)."""
    scene = _scene(5)
    path = [(100, 100)] + [(100 + 4 * t, 100 + 2 * t) for t in range(1, 13)]  # 4 / 2 px a frame: sub-stride too
    seq = torch.tensor([[0.0, 0.0]] + [[4.0, 2.0]] * 12)
    errs = {}
    for vs in ("padded", "bands"):
        dm = deltacnn.convert(mix, _camera(scene, *path[0], 0), backend="cpu", threshold=0.02, input_threshold=0.02)
        mm = MotionDeltaModel(dm, motion=seq, view_step=vs)
        errs[vs] = []
        with torch.no_grad():
            for t, p in enumerate(path):
                x = _camera(scene, *p, t)
                out = mm(x)
                r = torch.tensor(mm.input_shift)
                want = deltacnn.motion.map_outputs(mix(mm.view_frame), -r, (H, W))  # dense on the view it saw
                errs[vs].append(max(float((o - w).abs().max() / w.abs().max()) for o, w in zip(out, want)))
    assert max(errs["padded"]) < 0.05, errs
    assert max(errs["padded"]) < 3 * max(errs["bands"]) + 1e-3, errs


def test_padded_view_steps_through_yolov8_box_decode_are_exact_at_tau0():
    """YOLOv8n's DeltaBoxDecode keeps its head maps as sums of their deltas and outputs boxes, not a map: a
    padded view step sets those sums at the fix windows before the decode runs (PaddedStep._fix_sums), so the
    decoded boxes stay dense inference on the camera frame (steps of 32 px: the residual is 0)."""
    from deltacnn import models
    from deltacnn.models import yolov8 as Y
    torch.manual_seed(0)
    net = models.randomize_bn_(Y.yolov8("n"), seed=1).eval()
    scene = _scene(3, 448, 800).clamp(-2, 2) * 0.25 + 0.5
    path = [(64, 0), (96, 0), (96, 0), (64, 0)]  # a step right, a still frame, a step back
    hh, ww = 448, 640
    frames = [scene[:, :, y:y + hh, x:x + ww].contiguous() for x, y in path]
    seq = torch.tensor([[0.0, 0.0]] + [[b[0] - a[0], b[1] - a[1]] for a, b in zip(path, path[1:])])
    dm = deltacnn.convert(net, frames[0], backend="cpu", threshold=0.0, input_threshold=0.0, dense_above=None)
    assert any(isinstance(m, Y.DeltaBoxDecode) for m in dm.modules())
    mm = MotionDeltaModel(dm, motion=seq, view_step="padded")
    with torch.no_grad():
        for t, x in enumerate(frames):
            out, want = mm(x), net(x)
            out, want = (out[0], want[0]) if isinstance(out, (tuple, list)) else (out, want)
            err = float((out - want).abs().max() / want.abs().max())
            assert err < 1e-4, (t, err)
            if t:
                assert mm.dm.last_mode == "delta", (t, mm.dm.last_mode)
