"""GPU-only: whole converted models on the Triton backend, eager and CUDA-graph replay, against
the reference backend and dense PyTorch. Run on the device machine: python3 -m pytest tests/gpu -q"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import deltacnn  # noqa: E402
from deltacnn import models  # noqa: E402
from deltacnn.backends.base import Backend  # noqa: E402
from deltacnn.backends.triton_backend import TritonBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_video, rel_err  # noqa: E402


def _model(name: str):
    torch.manual_seed(0)
    kw = {"resnet18": dict(width=16), "resnet50": dict(width=8), "mobilenet_v3_small": dict(width_mult=0.5),
          "unet": dict(base=8, depth=3), "hrnet_like": dict(widths=(8, 16, 32))}[name]
    return models.randomize_bn_(models.build(name, **kw).eval(), 1).cuda()


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py: exact float32 on the GPU


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_small", "unet", "hrnet_like"])
def test_triton_fp32_tau0_equals_dense(name):
    m = _model(name)
    clip = make_video(40, n=2, h=64, w=96, noise=0.0, seed=1).cuda()
    dm = deltacnn.convert(m, clip[0], backend="triton")
    for t in range(clip.shape[0]):
        with torch.no_grad():
            want = m(clip[t])
        assert rel_err(dm(clip[t]), want) < 1e-5, t


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 1e-2)])
def test_triton_half_tau0_close_to_dense(dtype, tol):
    m = _model("resnet18")
    clip = make_video(200, n=1, h=64, w=96, noise=0.002, seed=2).cuda()
    dm = deltacnn.convert(m, clip[0], backend="triton", dtype=dtype)
    worst = 0.0
    for t in range(clip.shape[0]):
        with torch.no_grad():
            worst = max(worst, rel_err(dm(clip[t]), m(clip[t])))
    assert worst < tol


@pytest.mark.parametrize("tau", [0.0, 0.02])
def test_graph_replay_equals_eager(tau):
    m = _model("resnet50")
    clip = make_video(30, n=2, h=64, w=96, noise=0.003, seed=3).cuda()
    eager = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float16, threshold=tau)
    # noise changes every pixel at tau 0: keep the dense dispatch off, this test is about delta replay
    graphed = deltacnn.compile(deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float16, threshold=tau),
                               dense_above=None)
    for t in range(clip.shape[0]):
        torch.testing.assert_close(graphed(clip[t]), eager(clip[t]), rtol=1e-3, atol=1e-3)
    assert graphed.frames["dense"] == 0


def _kinds(g) -> set[str]:
    """Which passes a compiled model captured: 'delta', 'dense', 'keyframe' (whole batch), 'rows:<mode>'."""
    if hasattr(g, "stream_frames"):  # per-stream model: keys (pass, [mode,] shape, dtype, device)
        return {k[0] if k[0] == "delta" else (k[1] if k[0] == "batch" else f"rows:{k[1]}") for k in g._graphs}
    return {k[3] for k in g._graphs}


@pytest.mark.parametrize("per_stream", [False, True])
@pytest.mark.parametrize("name", ["resnet50", "unet"])
def test_compiled_dense_dispatch_on_high_change_then_back_to_delta(name, per_stream):
    """Busy frames run dense (stateless graph), quiet frames return to delta replay; always close to dense."""
    m = _model(name)
    busy = make_video(12, n=2, h=64, w=96, noise=0.01, seed=5).cuda()  # every pixel changes
    quiet = make_video(20, n=2, h=64, w=96, noise=0.0, seed=6).cuda()  # a few moving objects
    clip = torch.cat([quiet[:6], busy, quiet[6:]])
    graphed = deltacnn.compile(deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float32), dense_above=0.3,
                               per_stream=per_stream)
    for t in range(clip.shape[0]):
        with torch.no_grad():
            want = m(clip[t])
        assert rel_err(graphed(clip[t]), want) < 1e-5, t
    if per_stream:  # each stream enters and leaves dense mode by its own change (counted per stream)
        f = graphed.stream_frames
        assert 20 <= f["dense"] <= 32 and f["delta"] >= 20 and f["keyframe"] >= 4, f
        assert {"delta", "dense"} <= _kinds(graphed), _kinds(graphed)
        return
    # the busy stretch, entered and left a frame or two late (the decision never waits for the GPU)
    assert 10 <= graphed.frames["dense"] <= 16, graphed.frames
    assert graphed.frames["delta"] >= 10, graphed.frames  # before it, and after the re-seeding keyframe
    assert graphed.frames["keyframe"] == 2, graphed.frames  # the first frame, and the one leaving dense mode
    assert _kinds(graphed) == {"delta", "dense"}


def test_triton_matches_reference_with_thresholds():
    m = _model("mobilenet_v3_small")
    clip = make_video(30, n=3, h=64, w=64, noise=0.003, seed=4).cuda()
    ref = deltacnn.convert(m, clip[0], backend="reference", threshold=0.02, dense_above=None)
    fast = deltacnn.convert(m, clip[0], backend="triton", threshold=0.02)
    for t in range(clip.shape[0]):
        assert rel_err(fast(clip[t]), ref(clip[t])) < 1e-4, t


def test_compiled_keyframes_replay_and_survive_reset():
    """Periodic keyframes replay their own graph once an eager keyframe allocated the state; reset()
    frees the state, so the graphs are captured again (never replayed onto freed memory)."""
    m = _model("resnet50")
    clip = make_video(24, n=2, h=64, w=96, noise=0.0, seed=7).cuda()
    dm = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float32, keyframe_interval=3, threshold=0.05)
    graphed = deltacnn.compile(dm, dense_above=None)
    kinds = []
    for t in range(clip.shape[0]):
        if t == 14:
            graphed.reset()
        with torch.no_grad():
            want = m(clip[t])
        err = rel_err(graphed(clip[t]), want)
        kinds.append(dm.last_mode)
        # a keyframe is a dense pass: exact even though tau > 0 lets delta frames drift a little
        assert err < (1e-5 if dm.last_mode == "keyframe" else 0.2), (t, dm.last_mode, err)
    # keyframes at 0, 3, 6, 9, 12, then reset: 14, 17, 20, 23
    assert [t for t, k in enumerate(kinds) if k == "keyframe"] == [0, 3, 6, 9, 12, 14, 17, 20, 23], kinds
    assert _kinds(graphed) == {"delta", "keyframe"}


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small"])
def test_fused_keyframe_equals_unfused(name, monkeypatch):
    """fp16 keyframe: the one-pass Triton seeding of conv bias + residual + activation stores the same
    output and state as the generic PyTorch path, whose cuDNN conv adds the bias itself (bit for bit
    for ReLU nets; an ulp for hardswish), and the delta frames after it agree."""
    m = _model(name)
    clip = make_video(4, n=2, h=64, w=96, noise=0.003, seed=8).cuda()
    fused = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float16)
    unfused = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float16)
    out_f = fused(clip[0])
    monkeypatch.setattr(TritonBackend, "seed_act", Backend.seed_act)  # the generic keyframe path
    monkeypatch.setattr(TritonBackend, "fuses_conv_bias", Backend.fuses_conv_bias)  # bias inside F.conv2d
    out_u = unfused(clip[0])
    sf, su = (dict(d.named_buffers()) for d in (fused, unfused))
    states = [k for k in sf if k.rsplit(".", 1)[-1].startswith("state_")]
    assert len(states) > 20 and sf.keys() == su.keys()
    for k in states + ["out"]:
        a, b = (out_f, out_u) if k == "out" else (sf[k], su[k])
        if name == "resnet50":
            assert torch.equal(a, b), k
        else:
            assert rel_err(a, b) < 2e-3, k
    for t in range(1, clip.shape[0]):
        assert rel_err(fused(clip[t]), unfused(clip[t])) < (1e-6 if name == "resnet50" else 5e-3), t


def test_pdl_launches_match_plain_launches(monkeypatch):
    """Programmatic dependent launch changes only when kernels start, never what they compute: a
    graph-replayed clip (keyframes included) gives the same outputs with and without it."""
    from deltacnn.backends.triton_kernels import _common
    if torch.cuda.get_device_capability()[0] >= 9:
        assert _common.launch_opts(torch.device("cuda"))["launch_pdl"]
    m = _model("resnet50")
    clip = make_video(12, n=2, h=64, w=96, noise=0.003, seed=9).cuda()
    outs = {}
    for pdl in ("off", "early", "exit", "auto"):
        monkeypatch.setattr(_common, "PDL", pdl)
        dm = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float16, keyframe_interval=5)
        g = deltacnn.compile(dm, dense_above=None)
        outs[pdl] = [g(clip[t]).clone() for t in range(clip.shape[0])]
    for mode in ("early", "exit", "auto"):
        for t, (a, b) in enumerate(zip(outs["off"], outs[mode])):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=f"{mode}, frame {t}")


@pytest.mark.parametrize("tau", [0.0, 0.02])
def test_pixel_lists_match_tile_lists(tau, monkeypatch):
    """Conv work units of listed candidate pixels or of whole tiles: the same graph-replayed outputs."""
    from deltacnn.backends.triton_kernels import conv
    m = _model("resnet50")
    clip = make_video(12, n=2, h=64, w=96, noise=0.003, seed=10).cuda()
    outs = {}
    for pixels in (False, True):
        monkeypatch.setattr(conv, "PIXEL_LISTS", pixels)
        dm = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float16, threshold=tau)
        g = deltacnn.compile(dm, dense_above=None)
        outs[pixels] = [g(clip[t]).clone() for t in range(clip.shape[0])]
    for t, (a, b) in enumerate(zip(outs[False], outs[True])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=f"frame {t}")


@pytest.mark.parametrize("compiled", [False, True])
def test_yolov8_on_triton_equals_dense(compiled):
    """YOLOv8n's C2f channel slices, delta cats, SPPF and nearest upsampling on the Triton backend, eager and
    graph-replayed, stay equal to dense at tau 0 (the slices take the backend's channel_slice since 9fdd674)."""
    from deltacnn.models.yolov8 import yolov8
    torch.manual_seed(0)
    m = models.randomize_bn_(yolov8("n"), 1).cuda()
    clip = make_video(12, n=1, h=96, w=128, noise=0.0, seed=7).cuda()
    dm = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float32)
    if compiled:
        dm = deltacnn.compile(dm, dense_above=None)
    for t in range(clip.shape[0]):
        with torch.no_grad():
            want = m(clip[t])
            got = dm(clip[t])
        assert rel_err(got, want) < 1e-5, t
