"""deltacnn.compile's per-stream passes without CUDA graphs (cuda_graphs=False): each stream of a batch
runs delta / keyframe / dense for itself, equal to the stream run alone and to dense PyTorch; the
other streams are not affected. Triton backend under TRITON_INTERPRET=1 and the reference backend,
small shapes (the graph-replayed path: tests/gpu/test_stream_pool_gpu.py)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import deltacnn
from conftest import StatefulNet, make_video, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"]
try:
    import triton  # noqa: F401
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        BACKENDS.append("triton")
except ImportError:
    pass


def _net() -> nn.Module:
    torch.manual_seed(3)
    m = StatefulNet(pool=True).eval()
    m.bn1.running_mean.uniform_(-0.5, 0.5)
    m.bn1.running_var.uniform_(0.5, 2)
    return m.to(DEV)


def _compiled(m, x0, backend, **kw):
    dm = deltacnn.convert(m, x0, backend=backend, dense_above=None)
    return deltacnn.compile(dm, cuda_graphs=False, **kw)


def _clips(frames=7, n=3):
    clip = make_video(frames, n=n, h=16, w=24, noise=0.0, seed=1, size=4).to(DEV)
    other = make_video(frames, n=1, h=16, w=24, noise=0.0, seed=9, size=4).to(DEV)
    return clip, other


@pytest.mark.parametrize("backend", BACKENDS)
def test_scene_cut_in_one_stream_equals_that_stream_alone(backend):
    """Stream 1 cuts to another clip at frame 4 and is reset there: its rows equal the cut clip run
    alone (and dense), and streams 0 and 2 give the same outputs as in a batch without the cut."""
    m = _net()
    # the interpreter is slow: the Triton variant runs fewer frames and leaves out the uncut batch
    # (its other rows are still checked against dense)
    cut_at, frames = (4, 6) if backend == "reference" else (2, 4)
    clip, other = _clips(frames)
    cut = clip.clone()
    cut[cut_at:, 1] = other[cut_at:, 0]
    g = _compiled(m, clip[0], backend)
    plain = _compiled(m, clip[0], backend) if backend == "reference" else None
    alone = _compiled(m, cut[:, 1:2][0], backend)
    for t in range(clip.shape[0]):
        if t == cut_at:
            g.reset_stream(1)
        got = g(cut[t])
        solo = alone(cut[t, 1:2])
        with torch.no_grad():
            want = m(cut[t])
        assert rel_err(got, want) < 1e-5, t
        assert rel_err(got[1:2], solo) < 1e-5, t
        if plain is not None:
            torch.testing.assert_close(got[0::2], plain(clip[t])[0::2], rtol=1e-5, atol=1e-6)
        if t == cut_at:
            assert g.last_modes == ["delta", "keyframe", "delta"]
    assert g.frames["mixed"] == 1 and g.stream_frames["keyframe"] == 4, (g.frames, g.stream_frames)


@pytest.mark.parametrize("backend", ["reference"])
def test_busy_stream_runs_dense_alone_then_returns_to_delta(backend):
    """A stream whose frames change everywhere runs dense frames of its own (the host reads each
    stream's change), then a keyframe once it is quiet; the others stay on deltas; always exact."""
    m = _net()
    clip, _ = _clips(11)
    noisy = clip.clone()
    noisy[2:6, 2] += 0.3 * torch.randn_like(noisy[2:6, 2])  # every pixel of stream 2 changes
    g = _compiled(m, clip[0], backend, dense_above=0.35)
    seen = []
    for t in range(clip.shape[0]):
        got = g(noisy[t])
        with torch.no_grad():
            assert rel_err(got, m(noisy[t])) < 1e-5, t
        seen.append(list(g.last_modes))
    assert any(s[2] == "dense" and s[0] == "delta" for s in seen), seen
    assert seen[-1] == ["delta"] * 3, seen
    assert all(s[0] == "delta" for s in seen[1:]), seen


@pytest.mark.parametrize("backend", ["reference"])
def test_leave_and_join(backend):
    """A slot that leaves is left out of every pass; a camera joining it starts with its own keyframe."""
    m = _net()
    clip, other = _clips(7)
    g = _compiled(m, clip[0], backend)
    for t in range(2):
        g(clip[t])
    g.leave(0)
    out = g(clip[2])
    assert g.last_modes == ["idle", "delta", "delta"]
    with torch.no_grad():
        assert rel_err(out[1:], m(clip[2, 1:])) < 1e-5
    x = clip.clone()
    x[:, 0] = other[:, 0]
    g.join(0)
    for t in range(3, 7):
        out = g(x[t])
        if t == 3:
            assert g.last_modes == ["keyframe", "delta", "delta"]
        with torch.no_grad():
            assert rel_err(out, m(x[t])) < 1e-5, t
    with pytest.raises(IndexError, match="slot 5"):
        g.reset_stream(5)


@pytest.mark.parametrize("backend", ["reference"])
def test_huge_values_in_one_stream_rekeyframe_only_that_stream(backend):
    """1e4 in a patch of stream 0: that stream is keyframed (range check), the others keep running
    deltas, and every output equals dense again on the frames after."""
    m = _net()
    clip, _ = _clips(7)
    x = clip.clone()
    x[4, 0, :, 4:10, 4:10] = 1e4
    g = _compiled(m, clip[0], backend)
    for t in range(clip.shape[0]):
        out = g(x[t])
        if t == 4:
            assert g.last_modes[1:] == ["delta", "delta"]
            assert g.last_modes[0] == "keyframe"
        if t != 4:
            with torch.no_grad():
                assert rel_err(out, m(x[t])) < 1e-5, t


def test_per_stream_options_checked():
    m = _net()
    clip, _ = _clips(2)
    dm = deltacnn.convert(m, clip[0], backend="reference", dense_above=None)
    with pytest.raises(ValueError, match="dense_above"):
        deltacnn.compile(dm, dense_above=2.0, cuda_graphs=False)
    with pytest.raises(ValueError, match="per_stream"):
        deltacnn.compile(dm, per_stream=False, cuda_graphs=False)


def test_batch_keyframes_do_not_measure_the_input_change_and_dense_passes_do(monkeypatch):
    """A whole-batch keyframe's own input change is never read (the report of a stream's keyframe frame is not
    fresh), so its input layer skips that pass over the frame; a whole-batch dense pass still measures it
    (it decides when the streams go back to deltas), and a dense phase still ends once the scene is quiet."""
    from deltacnn.layers.io import Sparsify
    calls = []
    real = Sparsify._changed_fraction
    monkeypatch.setattr(Sparsify, "_changed_fraction", lambda self, x: calls.append(1) or real(self, x))
    m = _net()
    clip, _ = _clips(frames=8, n=2)
    g = _compiled(m, clip[0], "reference", dense_above=0.5)
    g(clip[0])
    g(clip[1])
    for k in range(2):
        g.reset_stream(k)
    calls.clear()
    g(clip[2])
    assert g.last_modes == ["keyframe", "keyframe"] and calls == []
    assert g._bufs["report"][0].tolist() == [0.0, 0.0]
    noise = torch.rand_like(clip[3])  # every pixel changes: the streams run dense frames
    outs = [g(noise) for _ in range(3)] + [g(clip[4]) for _ in range(4)]
    assert calls, "dense passes measure the input change"
    assert g.frames["dense"] >= 1 and g.last_modes == ["delta", "delta"]
    with torch.no_grad():
        torch.testing.assert_close(outs[-1], m(clip[4]), rtol=1e-4, atol=1e-4)
