"""GPU-only: deltacnn.compile's keyframe and dense passes compiled by Inductor (dense_compile="inductor",
the default) and replayed from CUDA graphs: outputs equal dense PyTorch and the backend's own path
(dense_compile=None), the state a compiled keyframe writes equals the eager keyframe's, and the delta
frames after it stay exact. The outputs are kept and compared after the clip: a graph's static output
returned without a copy would show as every frame equal to the last replay's. Run on the device machine:
python3 -m pytest tests/gpu -q"""
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


def _model(name):
    torch.manual_seed(0)
    kw = {"resnet18": dict(width=16), "mobilenet_v3_small": dict(width_mult=0.5), "unet": dict(base=8, depth=3)}[name]
    return models.randomize_bn_(models.build(name, **kw).eval(), 1).cuda()


def _drive(g, x):
    """Frames of every kind: batch keyframes, one-stream keyframes, delta frames, a busy stream's dense
    frames, then whole-batch dense frames; returns the outputs and modes."""
    n = x.shape[1]
    outs, modes = [], []
    for t in range(x.shape[0]):
        if 1 <= t <= 5:
            for k in range(n):
                g.reset_stream(k)
        elif 6 <= t <= 10:
            g.reset_stream(t % n)
        g.above = 0.0 if t >= 20 else 0.35
        outs.append(g(x[t]))
        modes.append(list(g.last_modes))
        torch.cuda.synchronize()  # each frame's report arrives before the next: the same modes in every run
    return outs, modes


@pytest.mark.parametrize("name,dtype,tol", [("resnet18", torch.float16, 5e-3), ("unet", torch.float32, 1e-4)])
def test_inductor_passes_replayed_equal_dense_and_backend_path(name, dtype, tol):
    m = _model(name)
    x = make_video(28, n=3, h=64, w=96, noise=0.0, seed=1).cuda()
    x[12:16, 2] += 0.3 * torch.randn_like(x[12:16, 2])  # stream 2 busy: dense frames of its own
    res = {}
    for dc in ("inductor", None):
        dm = deltacnn.convert(m, x[0], backend="triton", dtype=dtype)
        g = deltacnn.compile(dm, dense_compile=dc, keyframe_batch_at=None)
        res[dc] = _drive(g, x)
        if dc:
            assert not g.dense.failed, g.dense.failed
            kinds = {k[:2] for k in g.dense.compile_s}
            assert kinds == {("batch", "keyframe"), ("batch", "dense")}, kinds
    (got, modes), (plain, plain_modes) = res["inductor"], res[None]
    assert modes == plain_modes
    assert modes[3] == ["keyframe"] * 3 and modes[-1] == ["dense"] * 3, modes
    assert any(mo[2] == "dense" and mo[0] == "delta" for mo in modes), modes
    for t in range(x.shape[0]):
        with torch.no_grad():
            want = m(x[t])
        assert rel_err(got[t], want) < tol, (t, modes[t])
        assert rel_err(got[t], plain[t]) < tol, (t, modes[t])


def test_compiled_keyframe_writes_the_eager_keyframes_state():
    """Every state buffer (input reference, A and E of each nonlinear layer, the output accumulator)
    after a compiled, graph-replayed keyframe equals the one an eager backend keyframe writes."""
    m = _model("resnet18")
    x = make_video(6, n=2, h=64, w=96, noise=0.0, seed=2).cuda()
    dm = deltacnn.convert(m, x[0], backend="triton")
    g = deltacnn.compile(dm)
    for t in range(5):  # keyframes: eager (backend), eager (compiled), capture + replay, replay, replay
        if t:
            for k in range(2):
                g.reset_stream(k)
        g(x[t])
    got = {k: v.clone() for k, v in dm.named_buffers() if ".state_" in k}
    ref = deltacnn.convert(m, x[0], backend="triton")
    ref(x[4])
    want = {k: v for k, v in ref.named_buffers() if ".state_" in k}
    assert got.keys() == want.keys() and len(got) > 10
    for k in got:
        assert rel_err(got[k], want[k]) < 1e-5, k
