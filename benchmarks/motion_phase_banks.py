"""What an exact sub-stride scheme would cost: "phase banks" (an estimate, nothing of it is built).

Why: a scene-fixed state at the total stride S (deltacnn.motion today) makes the network see the camera
frame moved by a residual r (|r| <= S/2), and YOLOv8n's output on a view moved by r px differs from its
output on the camera frame (F1 0.96 at r = 1-2 px, 0.86-0.95 at 4-16 px on vtest: its shift variance).
The only way to equal dense inference on the camera frame is for every layer of stride s to hold its
state on the camera's own grid phase (camera position mod s). A steady pan of v px/frame visits
s / gcd(s, v) phases at stride s: a layer keeping one state per phase ("bank") updates bank p only on
the frames whose camera phase is p, i.e. against what it saw s / gcd(s, v) frames ago. This script
measures that cost without building it: on a static camera (where alignment is exact anyway), plain
delta inference on every k-th frame gives each layer's multiply-adds for changes over k frames; the
banked estimate takes each layer's from the run with its own k. Also the state memory by stride (the
banks multiply it).

    PYTHONPATH=. python3 benchmarks/motion_phase_banks.py --frames 12 --speeds 2,4,8

YOLOv8n, 640x448 window at the centre of vtest.avi (frames from 100), cpu backend, 0.05 relative,
input 0.04, min_blob 3 (the motion rows' settings). MACs do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import torch

import deltacnn
from deltacnn.calibration import measure_scales
from deltacnn.clips import read_frames
from deltacnn.layers import DeltaLayer
from deltacnn.tasks.yolov8 import YOLOv8Task
from deltacnn.tensor import DeltaTensor

VTEST = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"
VIEW_H, VIEW_W = 448, 640
RESULTS = Path(__file__).resolve().parent / "results"


def layer_strides(dm, x: torch.Tensor) -> dict[str, int]:
    """Each delta layer's output stride (by its stats name), from a keyframe."""
    out: dict[str, int] = {}

    def hook(mod, args, res):
        v = res.values if isinstance(res, DeltaTensor) else res
        if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[2]:
            out.setdefault(mod.name, x.shape[2] // v.shape[2])

    hs = [m.register_forward_hook(hook) for m in dm.modules() if isinstance(m, DeltaLayer)]
    try:
        dm.reset()
        with torch.no_grad():
            dm(x)
    finally:
        for h in hs:
            h.remove()
    dm.reset()
    return out


def state_bytes_by_stride(dm, H: int) -> dict[int, int]:
    acc: dict[int, int] = defaultdict(int)
    for m in dm.modules():
        if isinstance(m, DeltaLayer):
            for k, v in m._buffers.items():
                if k.startswith("state_") and v is not None and v.dim() == 4 and v.shape[2]:
                    acc[H // v.shape[2]] += v.numel() * v.element_size()
    return dict(acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=12, help="delta frames per step k")
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--steps", default="1,2,4,8")
    ap.add_argument("--speeds", default="2,4,8", help="pan speeds (px/frame) to estimate")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    steps = [int(s) for s in a.steps.split(",")]
    task = YOLOv8Task()
    net = task.load_model()
    frames = list(read_frames(VTEST, max_frames=a.frames * max(steps) + 1, start=a.start))
    h0, w0 = frames[0].shape[:2]
    y, x = (h0 - VIEW_H) // 2, (w0 - VIEW_W) // 2

    def frame(t: int) -> torch.Tensor:
        return task.preprocess(frames[t][y:y + VIEW_H, x:x + VIEW_W])

    x0 = frame(0)
    dm = deltacnn.convert(net, x0, input_threshold=0.04, threshold=0.05, min_blob=3, backend="cpu")
    measure_scales(dm, x0, relative=True)
    strides = layer_strides(dm, x0)
    dm.enable_stats(True)
    by_step: dict[int, dict[int, float]] = {}  # k -> stride -> mean MACs of that stride's layers
    dense_by_stride: dict[int, float] = defaultdict(float)
    for k in steps:
        dm.reset()
        acc: dict[int, list[float]] = defaultdict(list)
        with torch.no_grad():
            for i, t in enumerate(range(0, a.frames * k + 1, k)):
                dm(frame(t))
                if i == 0:
                    continue
                fs = dm.frame_stats()
                per: dict[int, float] = defaultdict(float)
                for name, s in fs.layers.items():
                    st = strides.get(name, 32)
                    per[st] += s.macs
                    if k == steps[0] and i == 1:
                        dense_by_stride[st] += s.dense_macs
                for st, v in per.items():
                    acc[st].append(v)
        by_step[k] = {st: statistics.mean(v) for st, v in acc.items()}
        tot = sum(by_step[k].values()) / sum(dense_by_stride.values())
        print(f"step {k}: MACs {tot:.1%} of dense; by stride "
              + ", ".join(f"{st}: {by_step[k][st] / dense_by_stride[st]:.1%}" for st in sorted(by_step[k]) if dense_by_stride[st]), flush=True)
    dense = sum(dense_by_stride.values())
    mem = state_bytes_by_stride(dm, VIEW_H)
    est = {}
    for v in (int(s) for s in a.speeds.split(",")):
        macs = 0.0
        banked_mem = 0
        for st, d in dense_by_stride.items():
            kb = st // math.gcd(st, v)  # phases a steady v px/frame pan visits at stride st
            kk = min((k for k in steps if k >= kb), default=steps[-1])
            macs += by_step[kk].get(st, d)
        for st, b in mem.items():
            banked_mem += b * (st // math.gcd(st, v))
        est[v] = {"macs": macs / dense, "state_mb": sum(mem.values()) / 1e6, "banked_state_mb": banked_mem / 1e6}
        print(f"pan {v} px/frame, phase banks: MACs {macs / dense:.1%} of dense (static camera's part only; the "
              f"uncovered strip comes on top); state {sum(mem.values()) / 1e6:.1f} MB -> {banked_mem / 1e6:.1f} MB",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"motion_phase_banks{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps({"settings": vars(a), "dense_by_stride": dense_by_stride,
                               "macs_by_step_and_stride": by_step, "state_bytes_by_stride": mem,
                               "estimate": est}, indent=1) + "\n")


if __name__ == "__main__":
    main()
