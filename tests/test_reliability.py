"""Reliability of the stateful delta contract: threads, per-stream decisions, huge values, long clips."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import deltacnn
from conftest import make_video, rel_err


class Net(nn.Module):
    """conv + BN + ReLU, a strided conv, a residual add, a max pool and a linear head: every kind of state."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.c2(y))
        y = torch.relu(self.c3(y) + y)
        return self.head(nn.functional.max_pool2d(y, 3, 1, 1))


def net(seed: int = 1, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    m = Net(width).eval()
    m.bn1.running_mean.uniform_(-0.5, 0.5)
    m.bn1.running_var.uniform_(0.5, 2)
    return m


# ---- threads ---------------------------------------------------------------------------------
def run_in_threads(work, n: int = 2) -> None:
    """Runs work(i) for i < n in n threads at once and re-raises the first error any of them hit (an
    assert in a worker thread would otherwise only print)."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_two_models_in_two_threads_stay_exact(backend):
    """Two different models on different clips of one shape, run at the same time from two threads:
    each output equals its dense model (a shared scratch index map gave 0.35 relative error)."""
    frames = 40
    jobs = []
    for seed, width in ((0, 8), (1, 12)):
        m = net(seed, width)
        clip = make_video(frames, h=64, w=64, noise=0.0, seed=seed)  # moving squares: gathered convs
        with torch.no_grad():
            want = [m(clip[t]) for t in range(frames)]
        jobs.append((deltacnn.convert(m, clip[0], backend=backend, dense_above=None), clip, want))
    worst = [0.0, 0.0]
    start = threading.Barrier(2)

    def work(i: int) -> None:
        dm, clip, want = jobs[i]
        start.wait()
        for t in range(frames):
            worst[i] = max(worst[i], rel_err(dm(clip[t]), want[t]))

    run_in_threads(work)
    assert max(worst) < 1e-5, worst


def test_one_model_from_two_threads_at_once_is_refused():
    """A model holds one batch of streams' state: a second thread entering it mid-frame gets a clear error."""
    m = net()
    clip = make_video(3, h=16, w=16, seed=2)
    dm = deltacnn.convert(m, clip[0])
    dm(clip[0])
    entered, release = threading.Event(), threading.Event()
    first = next(iter(dm.layers.values()))
    original = first.forward

    def slow_forward(*a, **kw):
        entered.set()
        release.wait(10)
        return original(*a, **kw)

    first.forward = slow_forward
    t = threading.Thread(target=dm, args=(clip[1],))
    t.start()
    try:
        assert entered.wait(10)
        with pytest.raises(RuntimeError, match="another thread"):
            dm(clip[2])
    finally:
        release.set()
        t.join()
    first.forward = original
    with torch.no_grad():
        assert rel_err(dm(clip[2]), m(clip[2])) < 1e-5


def test_concurrent_convert_in_threads():
    """torch.fx tracing patches functions process-wide: conversions from two threads take turns."""
    x = make_video(1, h=16, w=16)[0]
    out: list = [None, None]

    def work(i: int) -> None:
        for _ in range(3):
            out[i] = deltacnn.convert(net(i), x)

    run_in_threads(work)
    with torch.no_grad():
        assert rel_err(out[1](x), net(1)(x)) < 1e-5


# ---- per-stream decisions ---------------------------------------------------------------------
def _eventful_batch(frames: int = 24, h: int = 24, w: int = 32) -> torch.Tensor:
    """(T, 4, 3, H, W): stream 0 quiet (with a 1e4 patch at frame 15), 1 a scene cut at frame 6,
    2 a busy stretch (every pixel changes, frames 10-13), 3 a region flickering under the input limit
    (frames 2-8) whose deltas spread through most of the network."""
    quiet = make_video(frames, n=4, h=h, w=w, noise=0.0, seed=11)
    other = make_video(frames, n=1, h=h, w=w, noise=0.0, seed=12)[:, 0]
    g = torch.Generator().manual_seed(13)
    clip = quiet.clone()
    clip[6:, 1] = other[6:]
    for t in range(10, 14):
        clip[t, 2] += 0.05 * torch.randn(3, h, w, generator=g)
    for t in range(2, 9):
        clip[t, 3, :, : 3 * h // 4, : 3 * w // 4] = torch.randn(3, 3 * h // 4, 3 * w // 4, generator=g)
    clip[15, 0, :, 4:8, 4:8] = 1e4
    return clip


@pytest.mark.parametrize("backend,tau,interval", [("reference", 0.0, None), ("cpu", 0.0, None), ("cpu", 0.0, 7),
                                                   ("cpu", 0.03, None)])
def test_each_stream_in_a_batch_decides_as_it_would_alone(backend, tau, interval):
    """Scene cut, busy stretch, multiply-add rule, out-of-range values and keyframe intervals hit
    different streams at different frames: every stream's output and mode equal those of the same
    stream run alone (in a batch, a scene cut in one stream changed the others' output by 9.4e-3)."""
    m = net()
    clip = _eventful_batch()
    kw = dict(threshold=tau, backend=backend, dense_above=0.7, keyframe_interval=interval)
    together = deltacnn.convert(m, clip[0], **kw)
    alone = [deltacnn.convert(m, clip[0, i:i + 1], **kw) for i in range(clip.shape[1])]
    seen = set()
    for t in range(clip.shape[0]):
        out = together(clip[t])
        for i, dm in enumerate(alone):
            x = clip[t, i:i + 1]
            want = dm(x)
            torch.testing.assert_close(out[i:i + 1], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-6,
                                       msg=lambda s: f"frame {t}, stream {i}: {s}")
            assert together.last_modes[i] == dm.last_mode, (t, i, together.last_modes, dm.last_mode)
            if tau == 0:
                with torch.no_grad():
                    assert rel_err(out[i:i + 1], m(x)) < 1e-5, (t, i)
        seen.add(together.last_mode)
    assert {"mixed", "delta"} <= seen, seen
    if interval is None:
        modes = [dm.last_mode for dm in alone]  # the last frame: all streams back to deltas
        assert modes == ["delta"] * 4, modes


def test_stream_modes_follow_their_own_events():
    """Which stream ran how, frame by frame, for the eventful batch at tau 0 (reference backend)."""
    m = net()
    clip = _eventful_batch()
    dm = deltacnn.convert(m, clip[0], backend="reference", dense_above=0.7)
    dm.enable_stats()
    modes = []
    for t in range(clip.shape[0]):
        dm(clip[t])
        modes.append(dm.last_modes)
        assert dm.frame_stats().keyframe == (dm.last_mode == "keyframe")
    # k(eyframe), d(elta) or D(ense) per stream and frame
    col = ["".join("D" if md[i] == "dense" else md[i][0] for md in modes) for i in range(4)]
    assert col[0] == "k" + "d" * 14 + "kk" + "d" * 7, col[0]  # 1e4 at 15, and back at 16
    assert col[1] == "k" + "d" * 5 + "Dk" + "d" * 16, col[1]  # the cut at 6: dense, then a keyframe
    assert col[2] == "k" + "d" * 9 + "DDDDDk" + "d" * 8, col[2]  # busy 10-13, 14 differs from 13: dense
    assert col[3][:2] == "kd" and "D" in col[3][2:10] and col[3][-5:] == "ddddd", col[3]


# ---- huge values, NaN and infinity -------------------------------------------------------------
def _small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("huge", [1e4, 1e38])
def test_a_frame_of_huge_values_does_not_corrupt_the_state(huge):
    """A patch of 1e4 (or 1e38) in one frame: that frame and the next run as keyframes (the values
    leave the stream's range 16x), and every later frame is exact again (without the range check the
    error stayed at 7e-4, or 0.7, on every later frame)."""
    m = _small_net()
    clip = make_video(16, h=16, w=16, noise=0.01, seed=4)
    clip[6, :, :, 3:7, 3:7] = huge
    errs = {}
    for ratio in (deltacnn.runtime.RANGE_RATIO, None):
        dm = deltacnn.convert(m, clip[0], dense_above=None)
        dm.rt.range_ratio = ratio
        modes, err = [], []
        for t in range(clip.shape[0]):
            out = dm(clip[t])
            modes.append(dm.last_mode)
            with torch.no_grad():
                err.append(rel_err(out, m(clip[t])) if t != 6 else 0.0)
        errs[ratio] = max(err[8:])
        if ratio is not None:
            assert modes[6:8] == ["keyframe", "keyframe"] and set(modes[8:]) == {"delta"}, modes
    assert errs[deltacnn.runtime.RANGE_RATIO] < 1e-5, errs
    assert errs[None] > 1e-4, errs  # the check is what keeps it exact


def test_a_stream_that_dims_keyframes_once():
    """Values falling far below the keyframe's (lights off) re-seed the stream once, then deltas resume."""
    m = _small_net()
    clip = make_video(10, h=16, w=16, noise=0.01, seed=5)
    clip[4:] *= 0.01
    dm = deltacnn.convert(m, clip[0], dense_above=None)
    modes = []
    for t in range(clip.shape[0]):
        out = dm(clip[t])
        modes.append(dm.last_mode)
        with torch.no_grad():
            assert rel_err(out, m(clip[t])) < 1e-5, t
    assert modes == ["keyframe"] + ["delta"] * 3 + ["keyframe"] + ["delta"] * 5, modes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_frame_is_rejected_and_the_state_kept(bad):
    m = _small_net()
    clip = make_video(8, n=2, h=16, w=16, noise=0.01, seed=6)
    dm = deltacnn.convert(m, clip[0], dense_above=None)
    for t in range(3):
        dm(clip[t])
    before = {k: v.clone() for k, v in dm.state_dict().items() if "state_" in k}
    x = clip[3].clone()
    x[1, 0, 5, 5] = bad
    with pytest.raises(ValueError, match=r"stream\(s\) \[1\] contain NaN or infinity.*state left as it was"):
        dm(x)
    after = {k: v for k, v in dm.state_dict().items() if "state_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    for t in range(3, 8):
        out = dm(clip[t])
        assert dm.last_mode == "delta"
        with torch.no_grad():
            assert rel_err(out, m(clip[t])) < 1e-5, t


# ---- tau-0 error over long clips ---------------------------------------------------------------
def test_tau_zero_error_stays_flat_with_the_refresh():
    """Every pixel changes every frame (noise): float32 accumulators gather rounding error like a random
    walk (~sqrt(T)); the work-based refresh re-seeds the stream, so the error late in the clip stays
    at the level of the first refresh period, while without it the error keeps growing."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 4, 1)).eval()
    frames, period = 600, 40
    clip = make_video(frames, h=12, w=12, noise=0.02, seed=8)
    with torch.no_grad():
        want = [m(clip[t]) for t in range(frames)]
    errs, keys = {}, {}
    for refresh in (period, None):
        dm = deltacnn.convert(m, clip[0], dense_above=None)
        dm.rt.refresh_work = refresh
        e, k = [], 0
        for t in range(frames):
            e.append(rel_err(dm(clip[t]), want[t]))
            k += dm.last_mode == "keyframe"
        errs[refresh], keys[refresh] = e, k
    assert keys[None] == 1 and frames // period - 2 <= keys[period] <= frames // period + 1, keys
    early = max(errs[period][1:period])
    late = max(errs[period][-100:])
    assert late < 2 * early, (early, late)
    assert max(errs[None][-100:]) > 1.5 * late, (max(errs[None][-100:]), late)  # what the refresh prevents
