"""YOLOv8n at tau 0 under padded view steps: the output against dense YOLOv8n on the view it saw, per frame.

    PYTHONPATH=. python3 benchmarks/motion_padded_exact.py --path pan8 --frames 10

Given motion (motion_yolo's camera paths over vtest.avi, 640x448), cpu backend, every threshold 0: the
max abs difference of each output map to dense on the aligned view (mapped back), the view steps, the
mode of each frame. Exactness on a real detector (the tests use small random nets).
"""
from __future__ import annotations

import argparse
import json

import torch

import deltacnn
from deltacnn.clips import read_frames
from deltacnn.motion import MotionDeltaModel, map_outputs
from deltacnn.tasks.yolov8 import YOLOv8Task

from motion_yolo import VIEW_H, VIEW_W, VTEST, camera_path


def _maps(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _maps(o)] if isinstance(out, (tuple, list)) else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default="pan8")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--still-scene", action="store_true",
                    help="every frame the scene's first (only the camera moves): at tau 0 real footage's noise would "
                         "make every frame busy, i.e. dense frames and keyframes, and no view step in a delta pass")
    ap.add_argument("--view-step", default="padded", choices=["padded", "bands"],
                    help="MotionDeltaModel(view_step=...): the padded view steps this script checks, or bands")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = YOLOv8Task()
    net = task.load_model()
    scene = list(read_frames(VTEST, max_frames=a.frames, start=a.start))
    if a.still_scene:
        scene = [scene[0]] * len(scene)
    org = camera_path(a.path, len(scene), scene[0].shape[:2])
    xs = [task.preprocess(f[y:y + VIEW_H, x:x + VIEW_W]) for f, (x, y) in zip(scene, org)]
    given = torch.tensor([(0, 0)] + [(q[0] - p[0], q[1] - p[1]) for p, q in zip(org, org[1:])], dtype=torch.float64)
    mm = MotionDeltaModel(deltacnn.convert(net, xs[0], backend="cpu", threshold=0.0, input_threshold=0.0),
                          motion=given, view_step=a.view_step)
    with torch.no_grad():
        for t, x in enumerate(xs):
            view_before = list(mm.view[0]) if mm.view else [0, 0]
            out = mm(x)
            r = torch.tensor(mm.input_shift)
            want = map_outputs(net(mm.view_frame), -r, tuple(x.shape[2:]))
            diffs = [float((o - w).abs().max()) for o, w in zip(_maps(out), _maps(want))]
            scale = max(float(w.abs().max()) for w in _maps(want))
            print(json.dumps({"frame": t, "mode": mm.dm.last_mode, "view": mm.view[0], "stepped": mm.view[0] != view_before,
                              "max_abs_diff": max(diffs), "output_scale": scale,
                              "padded_ext": mm.aligner.geo.padded_ext}), flush=True)


if __name__ == "__main__":
    main()
