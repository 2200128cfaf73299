"""Write the thresholds file of one trial of a `deltacnn tune` trials JSON (default: the cheapest
within budget), for a tune that is still running or was stopped before it wrote its file.

The scales are measured as `deltacnn tune` measures them (calibration.measure_scales on the first
calibration frame), so the file equals the one the tune would write for that trial.

    python3 benchmarks/tune_file_from_trials.py TRIALS.json OUT.json --video vtest.avi -m yolov8n \
        --start-frame 0 --min-blob 3 [--trial N]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn, not an installed one

from deltacnn.calibration import measure_scales
from deltacnn.commands.common import build_delta, get_task, load_model, open_video


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trials")
    ap.add_argument("out")
    ap.add_argument("--video", required=True)
    ap.add_argument("-m", "--model", default="yolov8n")
    ap.add_argument("--start-frame", type=int, default=0)
    ap.add_argument("--min-blob", type=int, default=1)
    ap.add_argument("--trial", type=int, default=None, help="index into the trials (default: cheapest ok)")
    a = ap.parse_args()
    trials = json.load(open(a.trials))["trials"]
    if a.trial is None:
        ok = [t for t in trials if t["ok"] and t["ms"] is not None and math.isfinite(t["ms"])]
        fastest = min(t["ms"] for t in ok)
        pick = min((t for t in ok if t["ms"] <= fastest * 1.01), key=lambda t: (t["macs_fraction"], t["ms"]))
    else:
        pick = trials[a.trial]
    task = get_task(a.model)
    frame = list(open_video(a.video, a.start_frame + 1))[a.start_frame]
    x = task.preprocess(frame)
    dm = build_delta(load_model(task, torch.device("cpu")), x, min_blob=a.min_blob)
    measure_scales(dm, x)
    th = dm.thresholds
    th.input, th.default, th.overrides = pick["input"], pick["default"], dict(pick["overrides"])
    th.min_blob = a.min_blob if a.min_blob > 1 else None
    th.save(a.out)
    print(f"trial {trials.index(pick)} ({pick['stage']}): {pick['score']:.4f}, MACs {pick['macs_fraction']:.1%}, "
          f"cost {pick['ms']:.1f} ms -> {a.out}")


if __name__ == "__main__":
    main()
