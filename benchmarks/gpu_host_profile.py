"""Where the host time of a compiled YOLOv8n delta frame goes (deltacnn.compile, one stream, the shipped
thresholds file), measured as gpu_yolo.py times frames: one synchronised call per frame. Prints the time from
the call to the graph replay (the GPU idles then), the replay to the return, and a cProfile of the calls.

    python3 benchmarks/gpu_host_profile.py [--frames 200] [--top 25]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np
import torch

import deltacnn
from gpu_yolo import batch_at, convert, load_frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--thresholds", default="deltacnn/data/yolov8n_vtest.json")
    args = ap.parse_args()
    from deltacnn.tasks.yolov8 import YOLOv8Task
    task = YOLOv8Task()
    model32 = task.load_model().cuda().eval()
    base = load_frames(task, args.frames + 40)
    x = batch_at(base, 0, 1)
    dm = convert(model32, x, args.thresholds)
    g = deltacnn.compile(dm, dense_compile=None)  # keyframes on cuDNN: no compile time; delta frames alike
    marks: list[float] = []
    replay = torch.cuda.CUDAGraph.replay

    def timed_replay(self):
        marks.append(time.perf_counter())
        return replay(self)
    torch.cuda.CUDAGraph.replay = timed_replay
    pre, post, ms = [], [], []
    prof = cProfile.Profile()
    try:
        for t in range(30):  # warm-up and captures
            batch_at(base, t, 1, out=x)
            g(x)
            torch.cuda.synchronize()
        for t in range(30, 30 + args.frames):
            batch_at(base, t, 1, out=x)
            torch.cuda.synchronize()
            marks.clear()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            a.record()
            prof.enable()
            g(x)
            prof.disable()
            t1 = time.perf_counter()
            b.record()
            b.synchronize()
            if marks and set(g.last_modes) == {"delta"}:
                pre.append((marks[0] - t0) * 1e3)
                post.append((t1 - marks[-1]) * 1e3)
                ms.append(a.elapsed_time(b))
    finally:
        torch.cuda.CUDAGraph.replay = replay
    if not ms:
        raise SystemExit("no replayed delta frame among the profiled frames")
    print(f"delta frames {len(ms)} of {args.frames}: frame (events) {np.median(ms):.3f} ms, host call -> replay "
          f"{np.median(pre):.3f} ms, replay -> return {np.median(post):.3f} ms (medians)")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
    print(s.getvalue()[:6000])
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.top)
    print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
