"""GPU-only: deltacnn.compile's StaticSkip (the network after the input layer in a conditional graph
node that runs only when some input pixel is sent). Outputs equal those of the same graphs without
it (up to the rounding order of split-K atomics) on clips with static runs right after the capture,
after changes and after keyframes; static frames then launch no conv kernel. Run on the device machine: python3 -m pytest tests/gpu -q"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import deltacnn  # noqa: E402
from deltacnn import models  # noqa: E402
from deltacnn.compile import conditional_nodes_supported  # noqa: E402

if not conditional_nodes_supported():
    pytest.skip(f"torch {torch.__version__} cannot capture conditional graph nodes from Python", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_video, rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_tf32")


def _clip() -> tuple[torch.Tensor, list[int]]:
    """(T, 2, 3, 64, 96) with runs of repeated frames, and which frames repeat their predecessor."""
    src = make_video(12, n=2, h=64, w=96, noise=0.0, seed=4)
    # 0 1 2 | 3 (captured) 3 3 | 4 4 | 5 ... : static runs right after the capture, after a change, and
    # after the keyframes that keyframe_interval=7 puts at frames 7 and 14
    order = [0, 1, 2, 3, 3, 3, 4, 4, 5, 5, 6, 7, 7, 7, 8, 8, 8, 9, 10, 10]
    static = [t for t in range(1, len(order)) if order[t] == order[t - 1]]
    return src[order].cuda(), static


def _conv_kernels(fn) -> int:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.name.startswith(("_conv_gemm_kernel", "_tiles_kernel")))


@pytest.mark.parametrize("tau", [0.0, 0.02])
def test_skip_equals_no_skip_and_dense(tau):
    torch.manual_seed(0)
    m = models.randomize_bn_(models.build("resnet18", width=16).eval(), 1).cuda()
    clip, static = _clip()
    outs = {}
    for skip in (True, False):
        dm = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float16, threshold=tau, keyframe_interval=7)
        g = deltacnn.compile(dm, dense_above=None, dense_compile=None, skip_static=skip)
        outs[skip] = [g(clip[t]).clone() for t in range(clip.shape[0])]
        assert g.skip_static is skip  # no fallback: the conditional node was captured
        assert bool(g._skips) is skip
        assert g.frames["keyframe"] >= 2
    # the same kernels on the frames that send (split-K atomics may round in another order)
    for t, (a, b) in enumerate(zip(outs[True], outs[False])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=f"frame {t} (static: {t in static})")
    if tau == 0:
        with torch.no_grad():
            worst = max(rel_err(outs[True][t], m(clip[t])) for t in range(clip.shape[0]))
        assert worst < 5e-3


def test_static_frames_launch_no_conv():
    """A replayed frame that sends nothing runs no tile-list or conv kernel; one that sends runs them."""
    torch.manual_seed(0)
    m = models.randomize_bn_(models.build("resnet18", width=16).eval(), 1).cuda()
    clip, _ = _clip()
    counts = {}
    for skip in (True, False):
        dm = deltacnn.convert(m, clip[0], backend="triton", dtype=torch.float16)
        g = deltacnn.compile(dm, dense_above=None, dense_compile=None, skip_static=skip)
        for t in range(5):  # keyframe, 2 eager frames, the capture (frame 3), a first replay
            g(clip[t])
        counts[skip] = (_conv_kernels(lambda: g(clip[5])), _conv_kernels(lambda: g(clip[6])))  # static, changed
    if counts[False][0] == 0:
        pytest.skip(f"the profiler sees no kernels of replayed graphs here ({counts})")
    assert counts[True][0] == 0, counts
    assert counts[True][1] == counts[False][1] > 0, counts
