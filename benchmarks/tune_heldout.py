"""A thresholds file on a held-out segment, as `deltacnn tune --heldout-frames` reports it (same `play`),
with the dense results cached on disk so a loaded machine computes them once (and can do so while
the tune still searches).

    python3 benchmarks/tune_heldout.py --video vtest.avi -m yolov8n --start 200 --frames 595 \
        --refs /tmp/refs_200_795.pkl [--thresholds FILE] [--dense-above 0.5|off] [--json OUT]

Without --thresholds it only fills the cache. Reports the task metrics (mean over frames), the
multiply-adds of every frame after the first against dense, the input and mean layer update
rates of the delta frames, how the frames ran, and the CPU-clock mean per frame (1 thread unless
--threads; a loaded machine's CPU clock, not wall time).
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn, not an installed one

from deltacnn.commands.common import build_delta, finite_mean, get_task, load_model, open_video, save_json
from deltacnn.commands.tune import play


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", required=True)
    ap.add_argument("-m", "--model", default="yolov8n")
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--frames", type=int, default=595)
    ap.add_argument("--refs", required=True, help="pickle of the dense results (written if missing)")
    ap.add_argument("--thresholds", default=None)
    ap.add_argument("--dense-above", default="0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    task = get_task(a.model)
    dev = torch.device("cpu")
    dense = load_model(task, dev)
    frames = list(open_video(a.video, a.start + a.frames))[a.start:]
    refs_path = Path(a.refs)
    if refs_path.is_file():
        refs = pickle.loads(refs_path.read_bytes())
    else:
        t0 = time.process_time()
        with torch.no_grad():
            refs = [task.postprocess(dense(task.preprocess(f))) for f in frames]
        refs_path.write_bytes(pickle.dumps(refs))
        print(f"dense results of frames {a.start}-{a.start + len(frames) - 1} cached in {refs_path} "
              f"({time.process_time() - t0:.0f} s CPU)", flush=True)
    if len(refs) != len(frames):
        raise SystemExit(f"{refs_path} holds {len(refs)} frames, the segment {len(frames)}")
    if a.thresholds is None:
        return
    dense_above = None if a.dense_above == "off" else float(a.dense_above)
    x0 = task.preprocess(frames[0])
    dm = build_delta(dense, x0, thresholds=a.thresholds, dense_above=dense_above)
    dm.enable_stats(True)
    rates: list[float] = []
    layer_rates: list[float] = []
    orig = dm.forward

    def forward(x):  # the update rates of each frame, as `deltacnn run` records them
        y = orig(x)
        fs = dm.frame_stats()
        if dm.last_mode == "delta":
            inp = fs.layers.get("input")
            rates.append(inp.update_rate if inp is not None else float("nan"))
            lr = [s.update_rate for s in fs.layers.values() if s.dense_macs > 0]
            layer_rates.append(finite_mean(lr))
        return y

    dm.forward = forward
    p = play(dm, task, frames, refs, dev)
    metrics = {k: finite_mean([float(m[k]) for m in p.metrics]) for k in p.metrics[0]}
    row = {"thresholds": a.thresholds, "frames": [a.start, a.start + len(frames)], "dense_above": dense_above,
           "metrics": metrics, "macs_fraction": p.macs_fraction, "modes": p.modes,
           "input_update_rate_delta_frames": finite_mean(rates), "layer_update_rate_delta_frames": finite_mean(layer_rates),
           "cpu_ms_mean": finite_mean(p.cpu_ms), "threads": a.threads}
    print(json.dumps(row, indent=1))
    if a.json:
        save_json(row, a.json)


if __name__ == "__main__":
    main()
