"""deltacnn.compile's keyframe and dense passes traced by torch.compile (dense_compile), and the
refresh_held rule on its per-stream path, without CUDA graphs on the CPU: "aot_eager" traces the
same Dynamo graph (state writes as buffer mutations) that Inductor compiles on the GPU, without
generating code. Graph-replayed Inductor on the GPU: tests/gpu/test_compile_dense_gpu.py."""
from __future__ import annotations

import pytest
import torch

import deltacnn
from conftest import make_video, rel_err
from test_stream_pool import BACKENDS, _clips, _net


def _run(m, frames, backend, **kw):
    g = deltacnn.compile(deltacnn.convert(m, frames[0], backend=backend, dense_above=None),
                         cuda_graphs=False, dense_above=0.35, keyframe_batch_at=None, **kw)
    outs, modes = [], []
    for t in range(frames.shape[0]):
        if t in (3, 8):
            g.reset_stream(t % 2)  # a keyframe of one stream alone (rows pass), twice
        if t in (6, 7):
            for k in range(frames.shape[1]):
                g.reset_stream(k)  # a whole-batch keyframe, twice: the second one is compiled
        outs.append(g(frames[t]))
        modes.append(list(g.last_modes))
    return g, outs, modes


def test_traced_dense_passes_equal_backend_path_and_dense():
    """Whole-batch keyframes through the traced reference path, with one-stream keyframes and one busy
    stream's dense frames between them, give the outputs of the backend's own path and of dense PyTorch."""
    m = _net()
    clip, _ = _clips(10)
    x = clip.clone()
    x[2:5, 2] += 0.3 * torch.randn_like(x[2:5, 2])  # stream 2: every pixel changes -> dense frames
    g, got, modes = _run(m, x, "reference", dense_compile="aot_eager")
    assert not g.dense.failed, g.dense.failed
    kinds = {k[:2] for k in g.dense.compile_s}
    assert kinds == {("batch", "keyframe")}, kinds  # single-stream passes stay on the backend's path
    assert any(mo[2] == "dense" and mo[0] == "delta" for mo in modes) and modes[6] == ["keyframe"] * 3, modes
    assert modes[3] == ["delta", "keyframe", "dense"], modes
    _, plain, plain_modes = _run(m, x, "reference", dense_compile=None)
    assert modes == plain_modes
    for t in range(x.shape[0]):
        with torch.no_grad():
            want = m(x[t])
        assert rel_err(got[t], want) < 1e-5, (t, modes[t])
        torch.testing.assert_close(got[t], plain[t], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (TRITON_INTERPRET=1 on the CPU)")
def test_triton_deltas_read_the_state_a_traced_keyframe_wrote():
    """A whole-batch keyframe through the traced reference path, then delta frames on the Triton
    backend (under the interpreter on the CPU): the state layouts agree, every output equals dense."""
    m = _net()
    clip, _ = _clips(4)
    g = deltacnn.compile(deltacnn.convert(m, clip[0], backend="triton", dense_above=None),
                         cuda_graphs=False, dense_above=None, dense_compile="aot_eager")
    for t in range(clip.shape[0]):
        if t in (1, 2):  # the second batch keyframe is the traced one (the first allocates the state)
            for k in range(clip.shape[1]):
                g.reset_stream(k)
        got = g(clip[t])
        with torch.no_grad():
            assert rel_err(got, m(clip[t])) < 1e-5, t
    assert set(g.last_modes) == {"delta"} and ("batch", "keyframe") in {k[:2] for k in g.dense.compile_s}


def test_dense_compile_option_checked():
    m = _net()
    clip, _ = _clips(2)
    dm = deltacnn.convert(m, clip[0], backend="reference")
    with pytest.raises(ValueError, match="dense_compile"):
        deltacnn.compile(dm, cuda_graphs=False, dense_compile="tensorrt")
    assert deltacnn.compile(dm, cuda_graphs=False).dense is None  # auto: no compile without CUDA graphs


def test_refresh_held_keyframes_streams_on_the_per_stream_path():
    """min_blob holds back isolated changed pixels; with refresh_held the per-stream path keyframes a
    stream once the held-back fraction (read from the device report, a frame or two late) passes it,
    as the eager model does; without it no stream keyframes after its first frame."""
    m = _net()
    clip = make_video(8, n=2, h=16, w=24, noise=0.05, seed=4, size=4)
    counts = {}
    for held in (None, 0.01):
        dm = deltacnn.convert(m, clip[0], backend="reference", threshold=0.02, min_blob=3,
                              refresh_held=held, dense_above=None)
        g = deltacnn.compile(dm, cuda_graphs=False, dense_above=None)
        for t in range(clip.shape[0]):
            g(clip[t])
        counts[held] = g.stream_frames["keyframe"]
    assert counts[None] == 2, counts
    assert counts[0.01] > 2, counts


def test_many_streams_due_keyframe_the_whole_batch():
    """keyframe_batch_at: two of three streams reset in one frame -> every stream keyframes in one
    batched pass (exact); None keeps the single-stream passes; both equal dense."""
    m = _net()
    clip, _ = _clips(5)
    for at, want in ((2, ["keyframe"] * 3), (None, ["keyframe", "delta", "keyframe"])):
        g = deltacnn.compile(deltacnn.convert(m, clip[0], backend="reference", dense_above=None),
                             cuda_graphs=False, dense_above=None, keyframe_batch_at=at)
        for t in range(clip.shape[0]):
            if t == 3:
                g.reset_stream(0)
                g.reset_stream(2)
            got = g(clip[t])
            with torch.no_grad():
                assert rel_err(got, m(clip[t])) < 1e-5, t
            if t == 3:
                assert g.last_modes == want, (at, g.last_modes)
    with pytest.raises(ValueError, match="keyframe_batch_at"):
        deltacnn.compile(deltacnn.convert(m, clip[0], backend="reference"), cuda_graphs=False, keyframe_batch_at=0)


def test_compile_refuses_what_its_graphs_do_not_run():
    """A refresh 'flush' model and a moving-camera model are refused by name instead of running without the rule."""
    m = _net()
    clip, _ = _clips(2)
    dm = deltacnn.convert(m, clip[0], backend="reference", refresh="flush", refresh_held=0.1)
    with pytest.raises(ValueError, match="flush"):
        deltacnn.compile(dm, cuda_graphs=False)
    from deltacnn.motion.model import MotionDeltaModel
    mm = MotionDeltaModel(deltacnn.convert(m, clip[0], backend="reference"), motion="auto")
    with pytest.raises(TypeError, match="moving-camera"):
        deltacnn.compile(mm, cuda_graphs=False)
