"""Padded against band view steps on a wider view: YOLOv8n on a 1280x896 window panning over vtest.avi upscaled 2x.

    PYTHONPATH=.:benchmarks python3 benchmarks/motion_padded_wide.py --frames 13 --speed 8

The padded step's cost is its change's reach through the network (fixed in pixels), the keyframe's the whole
view: the wider the view, the better padded steps should fare. Given motion, cpu backend, s11 thresholds
(0.05 relative, input 0.04, min_blob 3), 1 thread, CPU clock, variants paired per frame.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import cv2
import torch

import deltacnn
from deltacnn.calibration import measure_scales
from deltacnn.clips import read_frames
from deltacnn.motion import MotionDeltaModel
from deltacnn.tasks.yolov8 import YOLOv8Task

from motion_yolo import VTEST, RESULTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=13)
    ap.add_argument("--speed", type=int, default=8)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = YOLOv8Task()
    net = task.load_model()
    scene = [cv2.resize(f, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
             for f in read_frames(VTEST, max_frames=a.frames, start=100)]
    vw, vh = 1280, 896
    xs = [task.preprocess(f[64:64 + vh, a.speed * t:a.speed * t + vw]) for t, f in enumerate(scene)]
    seq = torch.tensor([[0.0, 0.0]] + [[float(a.speed), 0.0]] * (len(xs) - 1))

    def dm():
        m = deltacnn.convert(net, xs[0], input_threshold=0.04, threshold=0.05, min_blob=3, backend="cpu")
        measure_scales(m, xs[0], relative=True)
        m.enable_stats(True)
        return m
    models = {"plain": dm(), "bands": MotionDeltaModel(dm(), motion=seq, view_step="bands"),
              "padded": MotionDeltaModel(dm(), motion=seq, view_step="padded")}
    rows = []
    with torch.no_grad():
        for t, x in enumerate(xs):
            row = {"frame": t}
            for k, m in models.items():
                t0 = time.process_time()
                m(x)
                row[k + "_ms"] = (time.process_time() - t0) * 1e3
                d = m.dm if isinstance(m, MotionDeltaModel) else m
                fs = d.frame_stats()
                band = m.aligner.recompute_macs if isinstance(m, MotionDeltaModel) else 0
                row[k + "_macs"] = (fs.macs + band) / fs.dense_macs
                row[k + "_mode"] = d.last_mode
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    body = rows[1:]
    summary = {k: {"ms_mean": statistics.mean(r[k + "_ms"] for r in body),
                   "macs": statistics.mean(r[k + "_macs"] for r in body)} for k in models}
    print(json.dumps(summary))
    (RESULTS / f"motion_padded_wide{'_' + a.tag if a.tag else ''}.json").write_text(
        json.dumps({"settings": vars(a), "rows": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
