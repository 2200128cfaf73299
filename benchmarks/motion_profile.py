"""Where motion mode's time goes on a pan: per-frame CPU time of each part of MotionDeltaModel.forward.

    PYTHONPATH=. python3 benchmarks/motion_profile.py --path pan4 --frames 24 [--auto] [--clock wall --threads 2]

YOLOv8n on a 640x448 window over vtest.avi (benchmarks/motion_yolo.py's camera paths), cpu backend, 0.05
relative thresholds, input 0.04, min_blob 3, halo exact. The parts (each timed by wrapping the function
MotionDeltaModel.forward calls): estimate (motion estimation incl. refinement), translate (the input moved
by the residual), check (the NaN check before the state moves), shift (state moved / bands recomputed),
model_keyframe / model_delta (the converted model's own pass, by the mode it ran), map_outputs (outputs
translated back), and the rest (the s10 results and earlier counted the converted model's own input
check twice, in check and in model_*: ~0.5 ms). Times are 1-thread CPU-clock ms by default (a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import deltacnn
from deltacnn.calibration import measure_scales
from deltacnn.clips import read_frames
from deltacnn.motion import MotionDeltaModel
from deltacnn.motion import model as motion_model
from deltacnn.motion.padded import PaddedStep
from deltacnn.tasks.yolov8 import YOLOv8Task

from motion_yolo import VIEW_H, VIEW_W, VTEST, camera_path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default="pan4")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--auto", action="store_true")
    ap.add_argument("--clip", default=None)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-residual", type=int, default=None, help="MotionDeltaModel(max_residual=...)")
    ap.add_argument("--edge", choices=("hold", "replicate"), default="hold")
    ap.add_argument("--view-step", choices=("padded", "bands"), default="bands", help="MotionDeltaModel(view_step=...)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1 if a.clock == "cpu" else a.threads)
    task = YOLOv8Task()
    net = task.load_model()
    scene = list(read_frames(a.clip or VTEST, max_frames=a.frames, start=a.start))
    if a.clip:
        h, w = (s - s % 32 for s in scene[0].shape[:2])
        cams = [f[:h, :w] for f in scene]
        given = None
    else:
        org = camera_path(a.path, len(scene), scene[0].shape[:2])
        cams = [f[y:y + VIEW_H, x:x + VIEW_W] for f, (x, y) in zip(scene, org)]
        given = torch.tensor([(0, 0)] + [(q[0] - p[0], q[1] - p[1]) for p, q in zip(org, org[1:])], dtype=torch.float64)
    xs = [task.preprocess(c) for c in cams]
    dm = deltacnn.convert(net, xs[0], input_threshold=0.04, threshold=0.05, min_blob=3, backend="cpu")
    measure_scales(dm, xs[0], relative=True)
    dm.enable_stats(True)
    kw = {"edge": a.edge, "view_step": a.view_step}
    if a.max_residual is not None:
        kw["max_residual"] = a.max_residual
    mm = MotionDeltaModel(dm, motion="auto" if a.auto or given is None else given, **kw)

    acc: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[name] += (clock() - t0) * 1e3
        return wrapper

    motion_model.translate = timed("translate", motion_model.translate)
    # padded view steps: the per-layer crop keyframes inside the delta pass (also counted in model_delta)
    PaddedStep._layer_keyframe = timed("padded_crops (in model_delta)", PaddedStep._layer_keyframe)
    motion_model.map_outputs = timed("map_outputs", motion_model.map_outputs)
    mm._motion = timed("estimate", mm._motion)
    inside = [False]  # the converted model's own input check counts as the model's time
    check_call = dm._check_input

    def check(*args, **kwargs):
        return check_call(*args, **kwargs) if inside[0] else timed("check", check_call)(*args, **kwargs)
    dm._check_input = check
    dm_call = dm.forward

    def dm_forward(*args, **kwargs):
        t0 = clock()
        inside[0] = True
        try:
            out = dm_call(*args, **kwargs)
        finally:
            inside[0] = False
        acc[f"model_{dm.last_mode}"] += (clock() - t0) * 1e3
        return out
    dm.forward = dm_forward
    rows = []
    with torch.no_grad():
        for t, x in enumerate(xs):
            if t == 1:
                mm.aligner.shift = timed("shift", mm.aligner.shift)
            acc.clear()
            t0 = clock()
            mm(x)
            total = (clock() - t0) * 1e3
            row = {"frame": t, "total": total, **dict(acc), "macs": dm.frame_stats().macs / dm.frame_stats().dense_macs,
                   "mode": dm.last_mode, "view_x": mm.view[0][0], "view_y": mm.view[0][1],
                   "residual": mm.input_shift[0]}
            row["rest"] = total - sum(v for k, v in acc.items() if "(in " not in k)
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    body = rows[1:]
    parts = sorted({k for r in body for k in r if k not in ("frame", "mode", "view_x", "view_y", "residual", "macs")})
    summary = {k: sum(r.get(k, 0.0) for r in body) / len(body) for k in parts}
    summary["macs"] = statistics.mean(r["macs"] for r in body)
    summary["keyframes"] = sum(r["mode"] == "keyframe" for r in body)
    summary["delta_frame_ms_mean"] = statistics.mean(r["total"] for r in body if r["mode"] == "delta")
    print("per-frame mean ms (frames 1..):", json.dumps({k: round(v, 2) for k, v in summary.items()}))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"motion_profile_{Path(a.clip).stem if a.clip else a.path}{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps({"settings": vars(a), "rows": rows, "summary": summary}, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
