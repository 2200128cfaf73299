"""Moving cameras on a real GPU (skipped without CUDA): motion-aligned delta state with the Triton and
reference backends on CUDA, the estimator on the frames' device. Its own scene; the net is
tests/test_motion.py's PanNet.

    python3 -m pytest -q tests/gpu/test_motion_gpu.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

import deltacnn  # noqa: E402
from deltacnn.motion import MotionDeltaModel, PhaseCorrelator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_motion import PanNet  # noqa: E402  (the CPU suite's test net: stride 8, padded convs, a residual)

H, W = 224, 320  # multiples of the net's total stride 8, wider than its 4R + |D| (R = 24) on both axes

pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py: exact float32 on the GPU


def _scene(seed: int, h: int = 480, w: int = 640) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = F.interpolate(torch.randn(1, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear",
                      align_corners=False) + 0.1 * torch.randn(1, 3, h, w, generator=g)
    return s.cuda()


def _camera(scene: torch.Tensor, cx: int, cy: int, t: int) -> torch.Tensor:
    s = scene.clone()
    s[:, :, 150 + 2 * t:170 + 2 * t, 200 + 3 * t:224 + 3 * t] = 1.5  # objects moving in the scene
    s[:, :, 260 - 3 * t:276 - 3 * t, 300:318] = -1.0
    return s[:, :, cy:cy + H, cx:cx + W].contiguous()


PATH = [(120, 100), (128, 100), (136, 100), (136, 92), (136, 92), (128, 92), (120, 100), (120, 108)]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_pan_by_multiples_of_the_stride_is_exact_on_the_gpu(backend):
    torch.manual_seed(0)
    net = PanNet(16).cuda().eval()
    scene = _scene(1)
    mm = MotionDeltaModel(deltacnn.convert(net, _camera(scene, *PATH[0], 0), backend=backend), motion="auto")
    modes = []
    with torch.no_grad():
        for t, (cx, cy) in enumerate(PATH):
            x = _camera(scene, cx, cy, t)
            out = mm(x)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out, net(x), atol=1e-4, rtol=0, msg=f"frame {t}")
            modes.append(mm.dm.last_mode)
    assert mm.view[0] == [0, 8]
    assert modes.count("delta") >= 5, modes  # the pans stayed sparse: strips + delta steps, no keyframes


def test_triton_matches_reference_with_sub_stride_motion_two_streams():
    torch.manual_seed(1)
    net = PanNet(16).cuda().eval()
    scenes = [_scene(2), _scene(3)]
    paths = [[(120 + 3 * t, 100 - t) for t in range(8)], [(100 - 5 * t, 80 + 2 * t) for t in range(8)]]
    seq = torch.tensor([[[0.0, 0.0]] * 2] + [[[p[t][0] - p[t - 1][0], p[t][1] - p[t - 1][1]] for p in paths]
                                             for t in range(1, 8)])
    x0 = torch.cat([_camera(s, *p[0], 0) for s, p in zip(scenes, paths)])
    mms = {b: MotionDeltaModel(deltacnn.convert(net, x0, backend=b, threshold=0.03), motion=seq)
           for b in ("triton", "reference")}
    with torch.no_grad():
        for t in range(8):
            x = torch.cat([_camera(s, *p[t], t) for s, p in zip(scenes, paths)])
            outs = {b: m(x) for b, m in mms.items()}
            torch.testing.assert_close(outs["triton"], outs["reference"], atol=1e-3, rtol=0, msg=f"frame {t}")
            assert mms["triton"].view == mms["reference"].view
            assert mms["triton"].dm.last_mode == mms["reference"].dm.last_mode
    assert mms["triton"].view == [[24, -8], [-32, 16]]


def test_estimator_on_the_gpu_is_sub_pixel_and_stays_on_the_device():
    scene = _scene(4)
    shifts = [(4, 0), (-7, 3), (13, -9)]
    prev = torch.cat([scene[:, :, 100:380, 100:520]] * len(shifts))
    cur = torch.cat([scene[:, :, 100 + dy:380 + dy, 100 + dx:520 + dx] for dx, dy in shifts])
    est = PhaseCorrelator(max_size=128)(prev, cur)
    assert est.shift.device.type == "cuda" and est.confidence.device.type == "cuda"
    torch.testing.assert_close(est.shift.cpu(), torch.tensor(shifts, dtype=torch.float32), atol=0.1, rtol=0)


def test_estimator_on_the_gpu_matches_the_cpu():
    """The grey-and-pool conv and the surface statistics by index (gather / scatter over the peak's
    neighbourhood) give the same estimate and confidence on CUDA as on the CPU, batched over streams."""
    scene = _scene(5)
    shifts = [(3, -2), (-11, 6)]
    prev = torch.cat([scene[:, :, 100:324, 100:420]] * len(shifts))
    cur = torch.cat([scene[:, :, 100 + dy:324 + dy, 100 + dx:420 + dx] for dx, dy in shifts])
    gpu = PhaseCorrelator()(prev, cur)
    cpu = PhaseCorrelator()(prev.cpu(), cur.cpu())
    torch.testing.assert_close(gpu.shift.cpu(), cpu.shift, atol=2e-3, rtol=0)
    torch.testing.assert_close(gpu.confidence.cpu(), cpu.confidence, atol=0, rtol=1e-3)
    torch.testing.assert_close(gpu.peak_ratio.cpu(), cpu.peak_ratio, atol=0, rtol=1e-3)
