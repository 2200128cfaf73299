"""Moving cameras: state aligned to the scene must reproduce dense inference on the camera frames."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltacnn
from deltacnn.motion import (MotionDeltaModel, MotionNotSupportedError, PhaseCorrelator, given_motion, map_outputs,
                             translate)
from deltacnn.motion.estimate import MIN_CONFIDENCE

H, W = 112, 144  # multiples of the test net's total stride 8, and larger than its 4R + |D| (R = 24)


class PanNet(nn.Module):
    """Strided padded convs, ReLU, max pool, a residual add: total stride 8."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, 1, 1)
        self.c2 = nn.Conv2d(c, c, 3, 2, 1)
        self.c3 = nn.Conv2d(c, c, 3, 1, 1)
        self.c4 = nn.Conv2d(c, c, 3, 2, 1)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.c3(x) + x)
        return self.head(F.relu(self.c4(x)))


def _scene(seed: int, h: int = 320, w: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (F.interpolate(torch.randn(1, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear",
                          align_corners=False) + 0.1 * torch.randn(1, 3, h, w, generator=g))


def _camera(scene: torch.Tensor, cx: int, cy: int, t: int) -> torch.Tensor:
    """The camera's view at (cx, cy) of the scene at time t, with two objects moving in the scene."""
    s = scene.clone()
    s[:, :, 120 + 2 * t:136 + 2 * t, 150 + 3 * t:170 + 3 * t] = 1.5
    s[:, :, 200 - 3 * t:212 - 3 * t, 190:204] = -1.0
    return s[:, :, cy:cy + H, cx:cx + W]


PATH = [(100, 80), (108, 80), (116, 72), (116, 72), (100, 80), (92, 96), (84, 104), (84, 112)]


def _view_frame(mm: MotionDeltaModel, x: torch.Tensor) -> torch.Tensor:
    """The frame the aligned model saw, checked: the camera frame moved by the whole-pixel residual,
    except the edge band the camera does not reach (held from the reference there, see edge=)."""
    v = mm.view_frame
    r = torch.tensor(mm.input_shift).round()
    moved = translate(x, r, "nearest")
    for i, (tx, ty) in enumerate(r.int().tolist()):
        win = (slice(None), slice(max(ty, 0), H + min(ty, 0)), slice(max(tx, 0), W + min(tx, 0)))
        assert torch.equal(v[i][win], moved[i][win])
    return v


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return PanNet().eval()


@pytest.mark.parametrize("backend,view_step", [("reference", "bands"), ("cpu", "bands"), ("reference", "padded"),
                                               ("cpu", "padded")])
def test_pan_by_multiples_of_the_stride_is_exact(net, backend, view_step):
    scene = _scene(1)
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend=backend), motion="none")
    mm = MotionDeltaModel(mm.dm, motion="auto", view_step=view_step)
    rates = []
    for t, (cx, cy) in enumerate(PATH):
        x = _camera(scene, cx, cy, t)
        out = mm(x)
        torch.testing.assert_close(out, net(x), atol=2e-5, rtol=0, msg=f"frame {t}")
        if t:
            moved = [a != b for a, b in zip(PATH[t], PATH[t - 1])]
            if sum(moved) == 1 or (view_step == "padded" and any(moved)):
                # bands along one axis, padded steps along both: strips, not the whole view, in a delta step
                assert 0 < mm.aligner.recomputed_pixels < H * W
                assert mm.dm.last_mode == "delta", (t, mm.dm.last_mode)
            if mm.dm.last_mode == "delta":
                # padded: the uncovered strips enter the input as values (with bands they are in the state)
                dx, dy = (abs(a - b) for a, b in zip(PATH[t], PATH[t - 1]))
                strips = (dx * H + dy * W - dx * dy) / (H * W) if view_step == "padded" else 0.0
                rates.append(float(mm.dm.input_mask.float().mean()) - strips)
            else:  # both axes: the bands cover this small view, which is recomputed as a keyframe
                assert mm.dm.last_mode == "keyframe" and sum(moved) == 2, (t, mm.dm.last_mode)
    assert mm.view[0] == [84 - 100, 112 - 80]
    assert len(rates) >= 3 and max(rates) < 0.15, rates  # aligned: only the moving objects changed


def test_too_small_halo_breaks_exactness(net):
    """The border bands matter: recomputing less than R around the borders gives wrong outputs."""
    scene = _scene(2)
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion="auto",
                          view_step="bands")
    mm(_camera(scene, *PATH[0], 0))
    mm.aligner.geo.halo = mm.aligner.geo.total_stride
    x = _camera(scene, *PATH[1], 1)
    assert (mm(x) - net(x)).abs().max() > 1e-3


def test_streams_move_independently_and_a_cut_recomputes_its_stream(net):
    scenes = [_scene(3), _scene(4)]
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(2, 3, H, W), backend="reference"), motion="auto")
    path1 = [(60, 60), (60, 60), (68, 52), (68, 52)]
    for t in range(4):
        x1 = _camera(scenes[1], *path1[t], t)
        if t >= 2:  # stream 1 cuts to another scene, without the objects
            x1 = _scene(5)[:, :, path1[t][1]:path1[t][1] + H, path1[t][0]:path1[t][0] + W]
        x = torch.cat([_camera(scenes[0], *PATH[t], t), x1])
        out = mm(x)
        torch.testing.assert_close(out, net(x), atol=2e-5, rtol=0, msg=f"frame {t}")
        if t == 2:
            assert mm.last_full == [False, True]
            assert float(mm.last_estimate.confidence[1]) < MIN_CONFIDENCE
    assert mm.view[0] == [16, -8]


def test_sub_stride_pan_is_exact_on_the_aligned_view_and_close_to_dense(net):
    """3 px/frame: the output is exactly the dense output of the aligned view (the frame moved by the
    whole-pixel residual) mapped back to the camera; on a smooth scene that is close to dense inference on
    the camera frame, closer than without mapping back (the rest is the net's own stride-8 aliasing)."""
    g = torch.Generator().manual_seed(6)
    scene = F.interpolate(torch.randn(1, 3, 20, 25, generator=g), size=(320, 400), mode="bilinear", align_corners=False)
    seq = torch.tensor([[0.0, 0.0]] + [[3.0, -2.0]] * 7)
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion=seq)
    errs, unmapped = [], []
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the replicated border
    rel = lambda a, b: float((a - b)[inner].abs().mean() / b[inner].abs().mean())  # noqa: E731
    with torch.no_grad():
        for t in range(8):
            x = _camera(scene, 100 + 3 * t, 100 - 2 * t, t)
            out = mm(x)
            r = torch.tensor(mm.residual).round()
            view_out = net(_view_frame(mm, x))
            torch.testing.assert_close(out, deltacnn.motion.map_outputs(view_out, -r, (H, W)), atol=2e-5, rtol=0,
                                       msg=f"frame {t}")
            if r.abs().sum() > 0:
                errs.append(rel(out, net(x)))
                unmapped.append(rel(view_out, net(x)))
    assert mm.view[0] == [24, -16]
    assert len(errs) >= 5 and max(errs) < 0.15, errs
    assert sum(errs) < sum(unmapped), (errs, unmapped)


def test_max_residual_steps_the_view_half_as_often_and_stays_exact_on_the_view(net):
    """max_residual = S: a steady 2 px/frame pan (S = 8) steps the view by 2S every 8 frames instead of by S
    every 4 (2 steps instead of 4 in 30 px); the output is still dense inference on the view it saw (the
    frame moved by the residual, up to S)."""
    scene = _scene(12)
    steps = {}
    for m in (None, 8):
        seq = torch.tensor([[0.0, 0.0]] + [[2.0, 0.0]] * 15)
        mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion=seq,
                              max_residual=m)
        views, res = [], []
        with torch.no_grad():
            for t in range(16):
                x = _camera(scene, 60 + 2 * t, 80, t)
                out = mm(x)
                r = torch.tensor(mm.input_shift)
                want = deltacnn.motion.map_outputs(net(_view_frame(mm, x)), -r, (H, W))
                torch.testing.assert_close(out, want, atol=2e-5, rtol=0, msg=f"max_residual {m}, frame {t}")
                views.append(mm.view[0][0])
                res.append(abs(r[0, 0].item()))
        steps[m] = [b - a for a, b in zip(views, views[1:]) if b != a]
        assert max(res) <= (4 if m is None else 8), (m, res)
    assert steps[None] == [8] * 4 and steps[8] == [16, 16], steps
    with pytest.raises(ValueError, match="max_residual"):
        MotionDeltaModel(mm.dm, max_residual=-1)


def test_held_edge_is_no_change_where_replicated_edges_change_every_frame(net):
    """A 3 px/frame pan: with edge="hold" (default) the band the camera does not reach keeps the reference (no input
    update there, fewer updates overall); with "replicate" it is the camera frame's edge repeated."""
    scene = _scene(13)
    seq = torch.tensor([[0.0, 0.0]] + [[3.0, 0.0]] * 2)
    rates = {}
    for edge in ("hold", "replicate"):  # max_residual 8: residuals 3, 6 (no view step)
        mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference",
                                               input_threshold=1e-3), motion=seq, edge=edge, max_residual=8)
        rates[edge] = []
        for t in range(3):
            x = _camera(scene, 60 + 3 * t, 80, t)
            ref = mm.aligner.input_layer._state("ref").clone() if t else None
            mm(x)
            v = _view_frame(mm, x)
            r = int(round(mm.input_shift[0][0]))
            if t:
                assert r > 0 and mm.dm.last_mode == "delta"
                if edge == "hold":
                    assert torch.equal(v[:, :, :, :r], ref[:, :, :, :r].to(v.dtype))
                    assert not bool(mm.dm.input_mask[..., :r].any())
                else:
                    assert torch.equal(v, translate(x, torch.tensor(mm.input_shift), "nearest"))
                rates[edge].append(float(mm.dm.input_mask.float().mean()))
    assert sum(rates["hold"]) < sum(rates["replicate"]), rates
    with pytest.raises(ValueError, match="edge"):
        MotionDeltaModel(mm.dm, edge="wrap")


def _zoom_pan(scene: torch.Tensor, t: int, zoom: float, pan: float) -> torch.Tensor:
    """Frame t of a camera moving forward (the view shrinks by `zoom` per frame) while panning `pan` px."""
    s = 1 - zoom * t
    h, w = int(H * 1.6 * s), int(W * 1.6 * s)
    cy, cx = 160, 200 + int(pan * t)
    crop = scene[:, :, cy - h // 2:cy - h // 2 + h, cx - w // 2:cx - w // 2 + w]
    return F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)


def test_unexplained_change_separates_pans_from_forward_motion():
    scene = _scene(21, 320, 400)
    pc = PhaseCorrelator()
    for zoom, lo, hi in ((0.0, 0.0, 0.2), (0.02, 0.8, 1.0)):
        a, f = pc.pooled(_zoom_pan(scene, 0, zoom, 3.0))
        x = _zoom_pan(scene, 4, zoom, 3.0)
        est = pc(_zoom_pan(scene, 0, zoom, 3.0), x)
        u = float(deltacnn.motion.estimate.unexplained_change(a, pc.pooled(x)[0], est.shift / f)[0])
        assert lo <= u <= hi, (zoom, u)


@pytest.mark.parametrize("max_unexplained", [None, 0.0])
def test_a_held_camera_is_plain_delta_inference(net, max_unexplained):
    """max_unexplained 0 holds every moving camera: the input is never shifted and the outputs equal plain
    delta inference's (thresholds > 0, so equal means the same updates); None follows the pan."""
    scene = _scene(22, 320, 400)
    kw = dict(backend="reference", input_threshold=0.05, threshold=0.02)
    plain = deltacnn.convert(net, torch.zeros(1, 3, H, W), **kw)
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), **kw), motion="auto",
                          max_unexplained=max_unexplained)
    with torch.no_grad():
        for t in range(5):
            x = _zoom_pan(scene, t, 0.0, 3.0)
            out, want = mm(x), plain(x)
            if t:
                assert mm.translating == [max_unexplained is None]
                rec = deltacnn.motion.motion_record(mm)
                assert rec["motion_translating"] == int(max_unexplained is None) and rec["motion_dx"] > 1.0
            if max_unexplained == 0.0:
                assert mm.input_shift == [[0.0, 0.0]]
                torch.testing.assert_close(out, want, atol=1e-6, rtol=0, msg=f"frame {t}")
    assert (mm.camera[0][0] > 4.0) == (max_unexplained is None), mm.camera  # followed, or held at 0


def test_estimator_recovers_shifts_despite_moving_objects():
    scene = _scene(7, 400, 480)
    pc = PhaseCorrelator()
    shifts = [(5, -3), (-8, 7), (0, 0), (2, 6)]
    prev = torch.cat([scene[:, :, 100:220, 100:260]] * len(shifts))
    cur = torch.cat([scene[:, :, 100 + dy:220 + dy, 100 + dx:260 + dx] for dx, dy in shifts]).clone()
    cur[:, :, 20:50, 30:60] = 2.0  # objects that appear or move: they must not pull the estimate
    cur[1, :, 70:100, 100:140] = -2.0
    est = pc(prev, cur)
    torch.testing.assert_close(est.shift, torch.tensor(shifts, dtype=torch.float32), atol=0.25, rtol=0)
    assert (est.confidence > MIN_CONFIDENCE).all(), est.confidence
    assert est.shift.device == prev.device and est.shift.shape == (4, 2)
    pooled = PhaseCorrelator(max_size=64)(prev, cur)  # 3x3 average pooling first: coarser, still sub-pixel
    torch.testing.assert_close(pooled.shift, torch.tensor(shifts, dtype=torch.float32), atol=0.5, rtol=0)


def test_refinement_removes_the_pooled_estimate_bias():
    """A frame pooled 5x before correlating: the parabola on the pooled peak is off by up to ~0.3 of the
    pooling factor; the full-resolution window around the rounded estimate brings it within 0.1 px."""
    scene = _scene(13, 400, 480)
    shifts = [(4, 0), (-7, 3), (2, 1), (13, -9)]
    prev = torch.cat([scene[:, :, 100:300, 100:360]] * len(shifts))
    cur = torch.cat([scene[:, :, 100 + dy:300 + dy, 100 + dx:360 + dx] for dx, dy in shifts]).clone()
    cur[:, :, 20:50, 30:60] = 2.0  # a mover
    want = torch.tensor(shifts, dtype=torch.float32)
    coarse = PhaseCorrelator(max_size=52, refine=0)(prev, cur)
    fine = PhaseCorrelator(max_size=52)(prev, cur)
    torch.testing.assert_close(fine.shift, want, atol=0.1, rtol=0)
    assert (coarse.shift - want).abs().max() > (fine.shift - want).abs().max()
    torch.testing.assert_close(fine.confidence, coarse.confidence)  # confidence: the whole-frame estimate's
    pc = PhaseCorrelator(max_size=52)
    assert pc.step(prev) is None
    torch.testing.assert_close(pc.step(cur).shift, want, atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="refine"):
        PhaseCorrelator(refine=8)


def test_refine_keeps_an_anchor_windows_spectrum_under_its_key():
    """refine's prev_keys: a prev row's window spectrum is computed once per key and window and reused (the
    motion model's anchors); keyed and unkeyed refinements agree, and a new key recomputes."""
    scene = _scene(13, 400, 480)
    shifts = [(4, 0), (-7, 3)]
    prev = torch.cat([scene[:, :, 100:300, 100:360]] * len(shifts))
    cur = torch.cat([scene[:, :, 100 + dy:300 + dy, 100 + dx:360 + dx] for dx, dy in shifts]).clone()
    pc = PhaseCorrelator(max_size=52)
    _, f = pc.prepare(prev)
    coarse = PhaseCorrelator(max_size=52, refine=0)(prev, cur).shift
    g = pc.grey(prev)
    plain = pc.refine(g, cur, coarse, f)
    keys = [("s0", 1), ("s1", 1)]
    torch.testing.assert_close(pc.refine(g, cur, coarse, f, keys), plain, atol=0, rtol=0)
    assert len(pc._prev_spectra) == 2
    # the kept spectra are what is used under the same keys (here: even for another prev)
    torch.testing.assert_close(pc.refine(torch.zeros_like(g), cur, coarse, f, keys), plain, atol=0, rtol=0)
    # new keys: the (textureless) prev is transformed and the coarse estimates are kept
    torch.testing.assert_close(pc.refine(torch.zeros_like(g), cur, coarse, f, [("s0", 2), ("s1", 2)]), coarse)
    torch.testing.assert_close(plain, torch.tensor(shifts, dtype=torch.float32), atol=0.1, rtol=0)


def test_estimator_reports_low_confidence_on_a_cut():
    a = _scene(8, 120, 160)
    b = _scene(9, 120, 160)
    est = PhaseCorrelator()(torch.cat([a, a]), torch.cat([b, torch.zeros_like(a)]))
    assert (est.confidence < MIN_CONFIDENCE).all(), est.confidence


def test_given_motion_translations_and_homographies():
    est = given_motion([2.0, -1.0], 2, (60, 80), "cpu")
    assert est.shift.tolist() == [[2.0, -1.0], [2.0, -1.0]]
    hm = torch.eye(3)
    hm[0, 2], hm[1, 2] = -4.0, 3.0  # content moves by (-4, 3): the camera moved by (4, -3)
    assert given_motion(hm, 1, (60, 80), "cpu").shift.tolist() == [[4.0, -3.0]]
    rot = torch.tensor([[0.99, -0.1, 0.0], [0.1, 0.99, 0.0], [0.0, 0.0, 1.0]])
    with pytest.warns(UserWarning, match="not a translation"):
        given_motion(rot, 1, (60, 80), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given_motion(hm, 1, (60, 80), "cpu")
    with pytest.raises(ValueError, match="translation of shape"):
        given_motion(torch.zeros(3), 1, (60, 80), "cpu")


def test_translate_whole_and_fractional_pixels():
    x = torch.randn(2, 3, 10, 12)
    y = translate(x, torch.tensor([[2.0, -1.0], [0.0, 0.0]]))
    assert torch.equal(y[0, :, 1:9, 2:], x[0, :, 2:10, :-2]) and torch.equal(y[1], x[1])
    half = translate(x[:1], torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(half[0, :, :, 1:], 0.5 * (x[0, :, :, 1:] + x[0, :, :, :-1]))


@pytest.mark.parametrize("t", [(3, -5), (-7, 4), (11, 0), (0, -9), (-11, 9), (30, 2)])
def test_whole_pixel_translate_replicates_borders_like_clamped_indexing(t):
    """The slice-copy fast path (whole pixels) against clamped gather indexing, in both memory formats."""
    x = torch.randn(2, 3, 10, 12)
    tx, ty = t
    ys = (torch.arange(10) - ty).clamp(0, 9)
    xs = (torch.arange(12) - tx).clamp(0, 11)
    want = x[0][:, ys][:, :, xs]
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        got = translate(inp, torch.tensor([[float(tx), float(ty)], [0.0, 0.0]]), "nearest")
        assert torch.equal(got[0], want) and torch.equal(got[1], x[1])


def test_unsupported_models_and_frames_are_refused(net):
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, 1, 1)

        def forward(self, x):
            y = F.relu(self.c(x))
            return y * torch.sigmoid(y.mean((2, 3), keepdim=True))

    mm = MotionDeltaModel(deltacnn.convert(SE().eval(), torch.zeros(1, 3, 32, 32), backend="reference"))
    with pytest.raises(MotionNotSupportedError, match="1x1"):
        mm(torch.randn(1, 3, 32, 32))
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, 36, 36), backend="reference"))
    with pytest.raises(MotionNotSupportedError, match="pad the frame"):
        mm(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match="motion must be"):
        MotionDeltaModel(mm.dm, motion="gyro")


def test_narrow_halo_is_cheaper_with_bounded_error(net):
    """halo= below the receptive-field bound: fewer pixels recomputed per view step, and an error that
    stays small (the old border's padding leaks only through the outer layers' taps) but is not zero."""
    scene = _scene(10)
    exact = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion="auto",
                             view_step="bands")
    narrow = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion="auto",
                              halo=8, view_step="bands")
    errs, cost = [], {"exact": 0, "narrow": 0}
    for t, (cx, cy) in enumerate(PATH[:5]):
        x = _camera(scene, cx, cy, t)
        with torch.no_grad():
            ref = net(x)
        torch.testing.assert_close(exact(x), ref, atol=2e-5, rtol=0)
        errs.append(float((narrow(x) - ref).abs().max() / ref.abs().max()))
        cost["exact"] += exact.aligner.recomputed_pixels
        cost["narrow"] += narrow.aligner.recomputed_pixels
    assert narrow.aligner.geo.halo == 8 < exact.aligner.geo.halo
    assert cost["narrow"] < 0.7 * cost["exact"], cost
    assert max(errs) > 1e-4 and max(errs) < 0.15, errs  # measured: 0.06-0.07 of the output's range
    with pytest.raises(ValueError, match="halo"):
        MotionDeltaModel(exact.dm, halo=-1, view_step="bands")
    with pytest.raises(ValueError, match="halo"):
        MotionDeltaModel(exact.dm, halo=8, view_step="padded")  # bands only: padded view steps have none
    with pytest.raises(ValueError, match="view_step"):
        MotionDeltaModel(exact.dm, view_step="wrap")


def test_estimates_do_not_drift_on_a_static_noisy_camera(net):
    """Auto motion on a static camera with sensor noise: estimates are taken against an anchor frame, so
    their noise does not add up into a whole-pixel shift of the input (a frame where everything changes)."""
    g = torch.Generator().manual_seed(11)
    scene = _scene(12)[:, :, 100:100 + H, 100:100 + W]
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion="auto",
                          still_every=1)  # an estimate on every frame (see the skip's own test below)
    total = 0.0
    for t in range(30):
        mm(scene + 0.8 * torch.randn(scene.shape, generator=g))  # chained estimates: > 0.5 px off in 30 frames
        if t:
            total += abs(float(mm.last_estimate.shift[0, 0])) + abs(float(mm.last_estimate.shift[0, 1]))
    assert total > 1.0  # the frame-to-frame estimates are noisy ...
    assert mm.view[0] == [0, 0] and mm.input_shift == [[0.0, 0.0]]  # ... but the position is not
    assert max(abs(c) for c in mm.camera[0]) < 0.5, mm.camera


class TinyNet(nn.Module):
    """Total stride 4, halo (R rounded up to the stride) 8 px: small enough frames for the Triton interpreter."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, 1, 1)
        self.c2 = nn.Conv2d(4, 4, 3, 2, 1)
        self.c3 = nn.Conv2d(4, 3, 3, 2, 1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))


@pytest.mark.parametrize("view_step", ["bands", "padded"])
def test_triton_backend_follows_the_camera_like_the_reference(view_step):
    """The Triton backend (TRITON_INTERPRET=1 on the CPU) under motion alignment: a state shift with its
    border-band crops, sub-stride residuals and a two-axis move give what the reference backend gives,
    frame by frame, at tau > 0, for two streams with their own motion."""
    pytest.importorskip("triton")
    torch.manual_seed(3)
    tiny = TinyNet().eval()
    h, w = 48, 64
    scenes = [_scene(14), _scene(15)]
    path = [[(100, 80), (104, 80), (106, 79), (110, 75)], [(60, 60), (60, 60), (56, 60), (55, 61)]]
    seq = torch.tensor([[[0.0, 0.0]] * 2] + [[[p[t][0] - p[t - 1][0], p[t][1] - p[t - 1][1]] for p in path]
                                             for t in range(1, 4)])
    mms = {b: MotionDeltaModel(deltacnn.convert(tiny, torch.zeros(2, 3, h, w), backend=b, threshold=0.05),
                               motion=seq, view_step=view_step) for b in ("triton", "reference")}
    modes = []
    for t in range(4):
        frames = []
        for s, p in zip(scenes, path):
            s = s.clone()
            s[:, :, 90 + 2 * t:98 + 2 * t, 115 + 3 * t:123 + 3 * t] = 1.5  # an object moving in the scene
            frames.append(s[:, :, p[t][1]:p[t][1] + h, p[t][0]:p[t][0] + w])
        x = torch.cat(frames)
        outs = {b: m(x) for b, m in mms.items()}
        torch.testing.assert_close(outs["triton"], outs["reference"], atol=1e-4, rtol=0, msg=f"frame {t}")
        assert mms["triton"].view == mms["reference"].view
        modes.append(mms["triton"].dm.last_mode)
        if t == 1:
            assert mms["triton"].aligner.geo.halo == 8
            assert 0 < mms["triton"].aligner.recomputed_pixels < 2 * h * w  # stream 0's bands, not a keyframe
    assert modes[1] == "delta" and modes.count("delta") >= 2, modes
    assert mms["triton"].input_shift == [[2.0, -1.0], [-1.0, 1.0]]  # sub-stride residuals


def test_sub_pixel_jitter_does_not_shift_the_input(net):
    """'nearest' holds the whole-pixel alignment until the camera moved 0.75 px from it: a camera that
    wanders by +-0.6 px keeps the input where it is (no frame where every pixel changes); a real 1 px
    move still moves it, and the output stays the dense output of the view it saw."""
    scene = _scene(16)
    cam_x = [0.0, 0.6, -0.6, 0.0, 1.0, 1.4, 2.2]  # the motion estimates' camera path
    img_x = [0, 0, 0, 0, 1, 1, 2]  # where the camera really is (the estimates' jitter is noise)
    seq = torch.tensor([[0.0, 0.0]] + [[b - a, 0.0] for a, b in zip(cam_x, cam_x[1:])])
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion=seq)
    shifts, rates = [], []
    for t in range(len(cam_x)):
        x = _camera(scene, 100 + img_x[t], 80, t)
        out = mm(x)
        shifts.append(mm.input_shift[0][0])
        if t:
            rates.append(float(mm.dm.input_mask.float().mean()))
        s = torch.tensor(mm.input_shift)
        want = map_outputs(net(_view_frame(mm, x)), s.neg(), (H, W))
        torch.testing.assert_close(out, want, atol=2e-5, rtol=0)
    assert shifts == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0], shifts
    assert mm.aligned_at[0] == [2, 0]
    assert max(rates) < 0.15, rates  # every frame changed only where the objects moved


def test_static_camera_refines_once_per_anchor_and_pans_every_frame(net):
    """The full-resolution refinement runs again only once the pooled estimate moved 0.25 px: a static
    camera pays it once per anchor, a pan on every frame (and still lands on the true positions)."""
    scene = _scene(17)
    calls = []
    pc = PhaseCorrelator(max_size=64)  # 144 px frames pooled 3x: the refinement is used
    orig = pc.refine
    pc.refine = lambda *a: calls.append(1) or orig(*a)
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion="auto",
                          estimator=pc, still_every=1)
    for t in range(5):
        mm(_camera(scene, 100, 80, t))
    assert len(calls) == 1 and mm.camera[0] == pytest.approx([0.0, 0.0], abs=0.3), (calls, mm.camera)
    for t in range(5, 9):
        mm(_camera(scene, 100 + 3 * (t - 4), 80, t))
    assert len(calls) == 5, calls
    assert mm.camera[0] == pytest.approx([12.0, 0.0], abs=0.3) and mm.aligned_at[0] == [12, 0], mm.camera


# still_every (default 8) and wake_change (default 0.5): the camera path (still, then a 4 px/frame pan that
# starts on a skipped frame), which frames are estimated, and where the view follows the camera (the skipped
# pan frames unaligned). The pan's first frame changes most of the unaligned view and goes busy: with the wake
# (by either signal: wake_change 1.0 leaves only the busy one), the next frame is estimated; without it, the
# next one of still_every.
STILL_CASES = {
    "every_2": ({"still_every": 2}, [100] * 5 + [104, 108, 112, 116, 120], [1, 1, 1, 0, 1, 0, 1, 1, 1, 1],
                [0, 0, 0, 0, 0, 0, 8, 12, 16, 20]),
    "every_3": ({"still_every": 3}, [100] * 6 + [104, 108, 112, 116, 120, 124], [1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1],
                [0, 0, 0, 0, 0, 0, 0, 8, 12, 16, 20, 24]),
    "default": ({}, [100] * 6 + [104, 108, 112, 116, 120, 124], [1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                [0, 0, 0, 0, 0, 0, 0, 8, 12, 16, 20, 24]),
    "every_3_busy_wake": ({"still_every": 3, "wake_change": 1.0}, [100] * 6 + [104, 108, 112, 116, 120, 124],
                          [1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 8, 12, 16, 20, 24]),
    "every_3_no_wake": ({"still_every": 3, "wake_change": None}, [100] * 6 + [104, 108, 112, 116, 120, 124],
                        [1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 12, 16, 20, 24]),
}


@pytest.mark.parametrize("case", list(STILL_CASES))
def test_still_camera_skips_estimates_and_a_pan_start_is_caught_up(net, case):
    """After two still estimates only one frame in still_every is estimated (frame 0, the keyframe, has no
    estimate); a pan that starts on a skipped frame runs unaligned (plain delta on the old view) until the next
    estimate, which catches the view up (it is against the anchor), after which the view follows the camera as
    with an estimate per frame. At tau 0 every frame's output is dense inference on the view it saw."""
    kw, xs, want_estimated, want_cams = STILL_CASES[case]
    scene = _scene(19)
    pc = PhaseCorrelator()
    calls = []
    orig = pc.correlate
    pc.correlate = lambda *a, **k: calls.append(1) or orig(*a, **k)
    mm = MotionDeltaModel(deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference"), motion="auto",
                          estimator=pc, **kw)
    assert mm.still_every == kw.get("still_every", 8)
    estimated, cams = [], []
    for t, cx in enumerate(xs):
        x = _camera(scene, cx, 80, t)
        out = mm(x)
        estimated.append(deltacnn.motion.motion_record(mm)["motion_estimated"])
        cams.append(round(mm.camera[0][0]))
        want = map_outputs(net(_view_frame(mm, x)), torch.tensor(mm.input_shift).neg(), (H, W))
        torch.testing.assert_close(out, want, atol=2e-5, rtol=0)
    assert estimated == want_estimated, estimated
    assert len(calls) == sum(want_estimated) - 1, calls
    assert cams == want_cams, cams


def test_still_every_must_be_a_positive_int(net):
    dm = deltacnn.convert(net, torch.zeros(1, 3, H, W), backend="reference")
    with pytest.raises(ValueError, match="still_every"):
        MotionDeltaModel(dm, still_every=0)
    for bad in (0, 1.5, "0.5"):
        with pytest.raises(ValueError, match="wake_change"):
            MotionDeltaModel(dm, wake_change=bad)
