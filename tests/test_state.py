"""Streams, keyframes, thresholds, statistics and bad input: the stateful contract of DeltaModel."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltacnn
from conftest import make_video, rel_err


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.c2(y))
        return self.head(torch.relu(self.c3(y) + y))


def net() -> nn.Module:
    torch.manual_seed(1)
    m = Net().eval()
    m.bn1.running_mean.uniform_(-0.5, 0.5)
    m.bn1.running_var.uniform_(0.5, 2)
    return m


def test_batch_of_streams_equals_each_stream_alone():
    clip = make_video(20, n=3, h=24, w=24, noise=0.005, seed=7)
    for tau in (0.0, 0.05):
        together = deltacnn.convert(net(), clip[0], threshold=tau)
        alone = [deltacnn.convert(net(), clip[0, i:i + 1], threshold=tau) for i in range(3)]
        for t in range(clip.shape[0]):
            out = together(clip[t])
            for i in range(3):
                torch.testing.assert_close(out[i:i + 1], alone[i](clip[t, i:i + 1]), rtol=1e-5, atol=1e-6)


def test_tau_zero_long_clip_matches_dense():
    m = net()
    clip = make_video(220, h=20, w=20, noise=0.01, seed=2)
    dm = deltacnn.convert(m, clip[0])
    worst = 0.0
    for t in range(clip.shape[0]):
        with torch.no_grad():
            worst = max(worst, rel_err(dm(clip[t]), m(clip[t])))
    assert worst < 1e-5


def test_keyframe_interval_and_reset():
    m = net()
    clip = make_video(12, h=16, w=16, seed=3)
    dm = deltacnn.convert(m, clip[0], keyframe_interval=4, threshold=0.02, keyframe_above=None)
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
    dm = deltacnn.convert(m, clip[0], threshold=0.02, input_threshold=0.03, score=score)
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
    dm = deltacnn.convert(m, clip[0], keyframe_above=0.5)
    dm.enable_stats()
    for t in range(8):
        with torch.no_grad():
            assert rel_err(dm(clip[t]), m(clip[t])) < 1e-5
        assert dm.frame_stats().keyframe
    quiet = deltacnn.convert(m, clip[0], keyframe_above=0.5, input_threshold=1.0)  # hardly anything passes
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
    dm = deltacnn.convert(m, clip[0], keyframe_above=None)  # noise changes every pixel: no promotion
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
