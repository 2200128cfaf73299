"""GPU-only: deltacnn.compile's per-stream passes replayed from CUDA graphs. A stream with a scene cut,
reset, busy frames, NaN or huge values runs its own keyframe / dense pass: it equals the stream run
alone, the other streams' outputs do not change, and the graphs are captured once (the stream index
is a device scalar). Run on the device machine: python3 -m pytest tests/gpu -q"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import deltacnn  # noqa: E402
from deltacnn import models  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_video, rel_err  # noqa: E402


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py: exact float32 on the GPU


def _r50():
    torch.manual_seed(0)
    return models.randomize_bn_(models.build("resnet50", width=8).eval(), 1).cuda()


def _compile(m, x0, dtype=torch.float32, dense_above=None, **kw):
    # keyframe_batch_at=None: two streams reset in one frame still run single-stream passes (tested here)
    return deltacnn.compile(deltacnn.convert(m, x0, backend="triton", dtype=dtype, **kw), dense_above=dense_above,
                            keyframe_batch_at=None)


RESETS = {4: [1], 7: [1], 9: [0], 10: [1], 12: [2], 13: [1], 16: [0, 2]}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_graphed_resets_equal_each_stream_alone(dtype, tol):
    """Streams reset at many frames (stream 1 also cuts to another clip at each reset): every row
    equals dense, the reset stream equals its clip run alone, and the others equal a run without any
    reset; the single-stream keyframe graph is captured once and replayed for every slot."""
    m = _r50()
    T = 20
    clip = make_video(T, n=3, h=64, w=96, noise=0.0, seed=1).cuda()
    other = make_video(T, n=4, h=64, w=96, noise=0.0, seed=2).cuda()
    x = clip.clone()
    for j, t in enumerate([4, 10, 13]):
        x[t:, 1] = other[t:, j]
    g = _compile(m, x[0], dtype)
    plain = _compile(m, x[0], dtype)
    alone = [_compile(m, x[0, k:k + 1], dtype) for k in range(3)]
    for t in range(T):
        for k in RESETS.get(t, []):
            g.reset_stream(k)
            alone[k].reset()
        got = g(x[t])
        ref = plain(x[t])
        with torch.no_grad():
            want = m(x[t])
        assert rel_err(got, want) < tol, t
        for k in range(3):
            solo = alone[k](x[t, k:k + 1])
            assert rel_err(got[k:k + 1], solo) < tol, (t, k)
        # streams 0 and 2 see the same frames as in `plain`: until their own first reset, a reset of
        # another stream leaves their outputs as they were
        for k in (0, 2):
            if not any(k in ks and u <= t for u, ks in RESETS.items()):
                torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)
        if t in RESETS:
            want_modes = ["keyframe" if k in RESETS[t] else "delta" for k in range(3)]
            assert g.last_modes == want_modes, (t, g.last_modes)
    rows = [k for k in g._graphs if k[0] == "rows"]
    assert rows and all(k[1] == "keyframe" for k in rows), list(g._graphs)
    assert g.stream_frames["keyframe"] == 3 + 8


def test_graphed_busy_stream_runs_dense_alone():
    """A stream whose every pixel changes for a while runs its own dense frames (single-stream dense
    graph), then a keyframe; the quiet streams stay on replayed deltas; all exact."""
    m = _r50()
    quiet = make_video(24, n=3, h=64, w=96, noise=0.0, seed=3).cuda()
    x = quiet.clone()
    x[4:14, 2] += 0.2 * torch.randn_like(x[4:14, 2])
    g = _compile(m, x[0], dense_above=0.3)
    seen = []
    for t in range(x.shape[0]):
        got = g(x[t])
        with torch.no_grad():
            assert rel_err(got, m(x[t])) < 1e-5, t
        seen.append(list(g.last_modes))
    assert sum(s[2] == "dense" for s in seen) >= 6, seen
    assert all(s[0] == "delta" and s[1] == "delta" for s in seen[1:]), seen
    assert seen[-1] == ["delta"] * 3
    assert any(k[:2] == ("rows", "dense") for k in g._graphs), list(g._graphs)


@pytest.mark.parametrize("bad", [float("nan"), 1e4, 1e38])
def test_graphed_bad_frame_recovers_that_stream_only(bad):
    """A frame with NaN / 1e4 / 1e38 in a patch of stream 1: the device check flags it, the host reads
    the flag without waiting and keyframes stream 1 a frame or two later; the other streams are exact
    throughout and stream 1 is exact again from then on."""
    m = _r50()
    T = 16
    clip = make_video(T, n=3, h=64, w=96, noise=0.0, seed=4).cuda()
    x = clip.clone()
    x[8, 1, :, 10:20, 10:30] = bad
    g = _compile(m, x[0])
    for t in range(T):
        got = g(x[t])
        torch.cuda.synchronize()  # let the report arrive: the recovery is then exactly one frame late
        with torch.no_grad():
            want = m(x[t])
        for k in (0, 2):
            assert rel_err(got[k], want[k]) < 1e-5, (t, k)
        if t < 8 or t >= 10:
            assert rel_err(got[1], want[1]) < 1e-5, (t, g.last_modes)
    assert (8, 1) in g.flagged_frames, g.flagged_frames
    assert g.stream_frames["keyframe"] >= 4
