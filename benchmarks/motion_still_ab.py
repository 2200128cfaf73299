"""What motion mode costs on a still camera: plain delta against motion="auto" at several still_every,
interleaved frame by frame in one process (paired), YOLOv8n on a 640x448 crop of vtest.avi.

    PYTHONPATH=.:benchmarks python3 benchmarks/motion_still_ab.py --frames 120 --threads 2 --every 2,3

Wall clock (use on a quiet machine). Prints a table and writes benchmarks/results/motion_still_ab[_TAG].json.
"""
from __future__ import annotations

import argparse
import json
import statistics as st
import time

import torch

import deltacnn
from deltacnn.calibration import measure_scales
from deltacnn.clips import read_frames
from deltacnn.motion import MotionDeltaModel
from deltacnn.tasks.yolov8 import YOLOv8Task

from motion_yolo import RESULTS, VIEW_H, VIEW_W, VTEST


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", default="2,3", help="still_every values, comma-separated")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    task = YOLOv8Task()
    net = task.load_model()
    xs = [task.preprocess(f[:VIEW_H, :VIEW_W]) for f in read_frames(VTEST, max_frames=a.frames, start=a.start)]

    def delta_model():  # the thresholds motion_yolo.py's rows use (0.05 / 0.04 relative, min_blob 3)
        dm = deltacnn.convert(net, xs[0], input_threshold=0.04, threshold=0.05, min_blob=3, backend="cpu")
        measure_scales(dm, xs[0], relative=True)
        return dm

    models = {"plain": delta_model()}
    for e in (int(v) for v in a.every.split(",")):
        models[f"still_every={e}"] = MotionDeltaModel(delta_model(), motion="auto", still_every=e)
    ms = {k: [] for k in models}
    with torch.no_grad():
        for i, x in enumerate(xs):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                if i >= 2:  # the keyframe and one warm-up frame left out
                    ms[k].append((time.perf_counter() - t0) * 1e3)
    rows = []
    print(f"{'model':<16} {'mean ms':>8} {'median':>8} {'vs plain: mean':>15} {'paired median':>14}")
    for k, t in ms.items():
        ratio = [x / y - 1 for x, y in zip(t, ms["plain"])]
        row = {"model": k, "ms_mean": st.mean(t), "ms_median": st.median(t),
               "over_plain_mean": st.mean(t) / st.mean(ms["plain"]) - 1, "over_plain_paired_median": st.median(ratio)}
        rows.append(row)
        print(f"{k:<16} {row['ms_mean']:8.2f} {row['ms_median']:8.2f} {row['over_plain_mean']:+15.1%} "
              f"{row['over_plain_paired_median']:+14.1%}")
    out = RESULTS / f"motion_still_ab{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps({"frames": len(xs) - 2, "threads": a.threads, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
