"""Streams, keyframes, thresholds, statistics and bad input: the stateful contract of DeltaModel."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltacnn
from conftest import StatefulNet, make_video, rel_err


def net() -> nn.Module:
    torch.manual_seed(1)
    m = StatefulNet().eval()
    m.bn1.running_mean.uniform_(-0.5, 0.5)
    m.bn1.running_var.uniform_(0.5, 2)
    return m


def test_batch_of_streams_equals_each_stream_alone():
    clip = make_video(20, n=3, h=24, w=24, noise=0.005, seed=7)
    for tau in (0.0, 0.05):
        # delta frames only (dispatch off): noise changes every pixel
        together = deltacnn.convert(net(), clip[0], threshold=tau, dense_above=None)
        alone = [deltacnn.convert(net(), clip[0, i:i + 1], threshold=tau, dense_above=None) for i in range(3)]
        for t in range(clip.shape[0]):
            out = together(clip[t])
            for i in range(3):
                torch.testing.assert_close(out[i:i + 1], alone[i](clip[t, i:i + 1]), rtol=1e-5, atol=1e-6)


def test_tau_zero_long_clip_matches_dense():
    m = net()
    clip = make_video(220, h=20, w=20, noise=0.01, seed=2)
    dm = deltacnn.convert(m, clip[0], dense_above=None)  # delta frames only: noise changes every pixel
    worst = 0.0
    for t in range(clip.shape[0]):
        with torch.no_grad():
            worst = max(worst, rel_err(dm(clip[t]), m(clip[t])))
    assert worst < 1e-5


def test_keyframe_interval_and_reset():
    m = net()
    clip = make_video(12, h=16, w=16, seed=3)
    dm = deltacnn.convert(m, clip[0], keyframe_interval=4, threshold=0.02, dense_above=None)
    dm.enable_stats()
    keys = []
    for t in range(12):
        dm(clip[t])
        keys.append(dm.frame_stats().keyframe)
    assert keys == [True, False, False, False] * 3
    dm.reset()
    dm(clip[5])
    assert dm.frame_stats().keyframe
    with torch.no_grad():
        torch.testing.assert_close(dm(clip[6]), m(clip[6]), rtol=0.2, atol=0.05)


def test_thresholds_by_name_and_json_roundtrip(tmp_path):
    m = net()
    x = make_video(1, h=16, w=16)[0]
    dm = deltacnn.convert(m, x, threshold=0.1)
    names = dm.thresholds.known
    assert names[0] == "input" and len(names) == 4  # input + three fused ReLUs
    dm.thresholds.set(names[1], 0.5)
    assert dm.thresholds.get(names[1]) == 0.5 and dm.thresholds.get(names[2]) == 0.1
    with pytest.raises(KeyError, match="no thresholded layer named"):
        dm.thresholds.set("nope", 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        dm.thresholds.set(names[1], -1)
    path = tmp_path / "t.json"
    dm.thresholds.save(path)
    data = json.loads(path.read_text())
    assert data["layers"] == {names[1]: 0.5}
    dm2 = deltacnn.convert(m, x, thresholds_file=str(path))
    assert dm2.thresholds.get(names[1]) == 0.5 and dm2.thresholds.default == 0.1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "deltacnn-thresholds/1", "layers": {"zzz": 1}}))
    with pytest.raises(KeyError):
        deltacnn.convert(m, x, thresholds_file=str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        dm.thresholds.load(bad)


@pytest.mark.parametrize("score", ["max", "l2"])
def test_positive_threshold_bounded_error_and_sparse(score):
    m = net()
    clip = make_video(200, h=32, w=32, noise=0.004, objects=1, size=6, seed=5)
    dm = deltacnn.convert(m, clip[0], threshold=0.02, input_threshold=0.03, score=score, dense_above=None)
    dm.enable_stats()
    errs, rates = [], []
    for t in range(clip.shape[0]):
        with torch.no_grad():
            errs.append(rel_err(dm(clip[t]), m(clip[t])))
        if t:
            rates.append(dm.frame_stats().layers["input"].update_rate)
    early = max(errs[15:25])
    late = max(errs[190:200])
    assert 0 < early < 0.1
    assert late <= 3 * early + 1e-3
    assert sum(rates) / len(rates) < 0.2


def test_stats_macs():
    m = net()
    clip = make_video(3, h=16, w=16, noise=0.0, objects=1, size=3)
    dm = deltacnn.convert(m, clip[0])
    with pytest.raises(RuntimeError, match="enable_stats"):
        dm(clip[0])
        dm.frame_stats()
    dm.enable_stats(keep_masks=True)
    dm(clip[1])
    s = dm.frame_stats()
    dense = 16 * 16 * 8 * 3 * 9 + 8 * 8 * 8 * 8 * 9 * 2 + 8 * 8 * 4 * 8
    assert s.dense_macs == dense
    assert 0 < s.macs < dense
    heat = dm.update_heatmap()
    assert heat.shape == (1, 1, 16, 16) and 0 < float(heat.mean()) < 1
    assert "total" in s.table()


def test_bad_inputs_raise_and_model_keeps_working():
    m = net()
    clip = make_video(6, h=16, w=16, seed=4)
    dm = deltacnn.convert(m, clip[0])
    dm(clip[0])
    dm(clip[1])
    bad = [
        (clip[2, :, :2], ValueError, "3 input channels"),
        (clip[2].permute(0, 2, 3, 1), ValueError, "channels-last"),
        (clip[2, 0], ValueError, "4-D"),
        ((clip[2] * 255).to(torch.uint8), TypeError, "floating-point"),
        (clip[2, :, :, :8], deltacnn.InputChangedError, "reset"),
        (clip[2].double(), deltacnn.InputChangedError, "float64"),
        (torch.full_like(clip[2], float("nan")), ValueError, "NaN"),
        ("frame", TypeError, "torch.Tensor"),
    ]
    for x, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            dm(x)
    for t in range(2, 6):
        with torch.no_grad():
            assert rel_err(dm(clip[t]), m(clip[t])) < 1e-5
    # a different resolution after reset() is a new stream
    dm.reset()
    small = make_video(2, h=8, w=8)
    with torch.no_grad():
        assert rel_err(dm(small[0]), m(small[0])) < 1e-5
    auto = deltacnn.convert(m, clip[0], on_input_change="reset")
    auto(clip[0])
    with torch.no_grad():
        assert rel_err(auto(small[0]), m(small[0])) < 1e-5


def test_convert_errors():
    x = make_video(1, h=8, w=8)[0]

    class Weird(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=2)

    with pytest.raises(deltacnn.UnsupportedOperationError, match="cumsum.*allow_dense_fallback"):
        deltacnn.convert(Weird(), x)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(deltacnn.ConversionError, match="could not trace"):
        deltacnn.convert(Branchy(), x)
    with pytest.raises(ValueError, match="example_input"):
        deltacnn.convert(net(), x[0])
    with pytest.raises(TypeError, match="nn.Module"):
        deltacnn.convert(lambda x: x, x)
    with pytest.raises(ValueError, match="dtype"):
        deltacnn.convert(net(), x, dtype=torch.int8)


def test_dense_fallback_island_is_correct():
    class WithCumsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.relu(torch.cumsum(self.a(x), dim=3) * 0.1))

    m = WithCumsum().eval()
    clip = make_video(15, h=12, w=12, seed=9)
    dm = deltacnn.convert(m, clip[0], allow_dense_fallback=True)
    assert any(isinstance(layer, deltacnn.DenseIsland) for layer in dm.layers.values())
    for t in range(15):
        with torch.no_grad():
            assert rel_err(dm(clip[t]), m(clip[t])) < 1e-5


def test_mostly_changed_frame_runs_as_keyframe():
    m = net()
    clip = make_video(8, h=16, w=16, noise=0.05, seed=3)  # noise changes every pixel at tau 0
    dm = deltacnn.convert(m, clip[0], dense_above=0.5)
    dm.enable_stats()
    for t in range(8):
        with torch.no_grad():
            assert rel_err(dm(clip[t]), m(clip[t])) < 1e-5
        assert dm.frame_stats().keyframe
    quiet = deltacnn.convert(m, clip[0], dense_above=0.5, input_threshold=1.0)  # hardly anything passes
    quiet.enable_stats()
    quiet(clip[0])
    quiet(clip[1])
    assert not quiet.frame_stats().keyframe


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "unet"])
def test_dense_frame_leaves_state_alone_and_next_frame_is_keyframe(arch):
    from deltacnn.models import build, randomize_bn_
    torch.manual_seed(0)
    m = randomize_bn_(build(arch).eval())
    clip = make_video(8, h=64, w=64, noise=0.01, seed=5)
    dm = deltacnn.convert(m, clip[0], dense_above=None)  # noise changes every pixel: no promotion
    dm.rt.track_change = True
    dm.enable_stats()
    with torch.no_grad():
        for t in range(3):
            assert rel_err(dm(clip[t]), m(clip[t])) < 1e-5
        before = {k: v.clone() for k, v in dm.state_dict().items() if "state_" in k and "ref" not in k}
        out = dm.dense_frame(clip[3])
        assert rel_err(out, m(clip[3])) < 1e-5
        assert dm.frame_stats().keyframe
        # measured against the previous input, not 1.0: a little noise changes every pixel at tau 0
        assert 0 < float(dm.rt.input_change) <= 1
        after = {k: v for k, v in dm.state_dict().items() if "state_" in k and "ref" not in k}
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        dm(clip[4])
        assert dm.frame_stats().keyframe  # the state is stale after a dense frame
        for t in range(5, 8):
            assert rel_err(dm(clip[t]), m(clip[t])) < 1e-5
            assert not dm.frame_stats().keyframe


@pytest.mark.parametrize("lag", [0, 1])
def test_dense_dispatch_policy_on_busy_stretch(lag):
    """compile's dispatch logic, driven eagerly on the CPU: busy frames go dense (stateless), quiet
    frames come back to delta frames after one keyframe; the output stays equal to dense throughout.
    `lag` delays each measured change by frames, as the asynchronous copy does on the GPU."""
    from deltacnn.compile import DenseDispatch, run_eager
    m = net()
    quiet = make_video(16, h=32, w=48, noise=0.0, seed=6)  # moving squares on a static scene
    busy = make_video(10, h=32, w=48, noise=0.05, seed=5)  # every pixel changes every frame
    clip = torch.cat([quiet[:6], busy, quiet[6:]])
    dm = deltacnn.convert(m, clip[0], dense_above=None)
    dm.rt.track_change = True
    policy = DenseDispatch(0.3)
    modes, pending = [], []
    for x in clip:
        mode = policy.next_mode(dm)
        with torch.no_grad():
            assert rel_err(run_eager(dm, x, mode), m(x)) < 1e-5, (len(modes), mode)
        modes.append(mode)
        pending.append(float(dm.rt.input_change))
        if len(pending) > lag:
            policy.observe(pending.pop(0))
    first_dense = modes.index("dense")
    assert modes[0] == "keyframe" and set(modes[1:6]) == {"delta"}
    assert first_dense == 7 + lag  # the first busy frame (6) runs delta; its change is seen lag frames later
    back = modes.index("keyframe", first_dense)
    assert all(md == "dense" for md in modes[first_dense:back])
    assert back == 6 + len(busy) + 2 + lag  # busy frames, then the cut back to the quiet scene, then lag
    assert set(modes[back + 1:]) == {"delta"}
    with pytest.raises(ValueError, match="dense_above"):
        DenseDispatch(1.5)


def test_busy_frames_run_dense_without_state_then_keyframe():
    """dense_above on the reference backend: busy frames are stateless dense passes (the state
    is untouched), the first quiet frame re-seeds it as a keyframe, and every output equals dense."""
    m = net()
    quiet = make_video(10, h=24, w=32, noise=0.0, seed=8)
    busy = make_video(4, h=24, w=32, noise=0.05, seed=9)
    clip = torch.cat([quiet[:4], busy, quiet[4:]])
    dm = deltacnn.convert(m, clip[0], dense_above=0.5)
    dm.enable_stats()
    kinds, states = [], []
    for t in range(clip.shape[0]):
        with torch.no_grad():
            assert rel_err(dm(clip[t]), m(clip[t])) < 1e-5, t
        kinds.append("key" if dm.frame_stats().keyframe else "delta")
        states.append({k: v.clone() for k, v in dm.state_dict().items() if "state_" in k and "ref" not in k})
    assert kinds == ["key"] + ["delta"] * 3 + ["key"] * 6 + ["delta"] * 4, kinds
    for t in range(5, 9):  # frames 4-8 are busy (frame 8 is the cut back to the quiet scene): no state write
        assert all(torch.equal(states[t][k], states[3][k]) for k in states[3]), t
    assert not all(torch.equal(states[9][k], states[3][k]) for k in states[3])  # frame 9 re-seeded it


def test_frames_after_a_delta_frame_doing_most_of_the_work_run_dense():
    """A region flickering under the input limit still spreads through the receptive fields to most
    of the network: after one such delta frame the reference backend runs dense frames while the
    input keeps changing as much, and returns to deltas (after a keyframe) when it calms down."""
    from deltacnn.runtime import DENSE_WORK
    m = net()
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 3, 32, 32, generator=g)
    frames = []
    for t in range(12):
        f = base.clone()
        if t < 7:
            f[:, :, :24, :24] = torch.randn(1, 3, 24, 24, generator=g)  # 56% of the pixels change
        frames.append(f)
    dm = deltacnn.convert(m, frames[0], dense_above=0.9)  # the input limit alone would never trigger
    modes = []
    for x in frames:
        with torch.no_grad():
            assert rel_err(dm(x), m(x)) < 1e-5
        modes.append(dm.last_mode)
        if modes[-1] == "delta" and len(modes) == 2:
            work = dm.rt.backend_for(x).work
            assert work[0] > DENSE_WORK * work[1]
    # 7: the calm frame still differs from the last flicker; 8: unchanged, so the state is re-seeded
    assert modes == ["keyframe", "delta"] + ["dense"] * 6 + ["keyframe"] + ["delta"] * 3, modes


def test_end_frame_bookkeeping_matches_eager_frames():
    """compile's graph replays call DeltaModel._end_frame instead of forward: it must leave the model
    where an eager frame of the same mode leaves it (the next call then picks the same mode)."""
    m = net()
    clip = make_video(6, h=24, w=32, noise=0.0, seed=10)
    eager = deltacnn.convert(m, clip[0], dense_above=None, keyframe_interval=3)
    replay = deltacnn.convert(m, clip[0], dense_above=None, keyframe_interval=3)
    with torch.no_grad():
        for t, mode in enumerate(["keyframe", "delta", "delta", "keyframe", "dense", "keyframe"]):
            eager.dense_frame(clip[t]) if mode == "dense" else eager(clip[t])
            assert eager.last_mode == mode
            replay.rt.dense_limit = 0.3  # a keyframe clears it
            replay._end_frame(mode, clip[t])
            assert (replay.frame_index, replay.last_mode, replay._stream) == \
                (eager.frame_index, eager.last_mode, eager._stream), (t, mode)
            assert (replay.rt.dense_limit is None) == (mode == "keyframe")


@pytest.mark.parametrize("shape", [(1, 1, 48, 64), (3, 1, 17, 5), (2, 4, 3, 3)])
def test_stream_fraction_equals_the_float_mean_per_stream(shape):
    """The input layer's per-stream change count (bytes summed into int32) is the float mean of the mask, also
    on a non-contiguous mask."""
    from deltacnn.tensor import stream_fraction
    g = torch.Generator().manual_seed(sum(shape))
    m = torch.rand(shape, generator=g) < 0.3
    for mask in (m, m.transpose(-1, -2)):
        want = mask.reshape(shape[0], -1).float().mean(1)
        got = stream_fraction(mask)
        assert got.dtype == torch.float32 and got.shape == (shape[0],)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
