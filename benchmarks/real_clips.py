"""Real static-camera clips: task agreement with dense, multiply-adds done and update rates (no wall clock).

For each clip of `deltacnn.clips` and each model (YOLOv8n; CenterFace on vtest), the dense model's results
are the reference; the delta model then plays the same frames from a keyframe at several threshold
settings, in relative units (`deltacnn.calibration.measure_scales` on the segment's first frame: the input
threshold a fraction of the frame's range, each layer's a fraction of its keyframe activation scale), plus
any thresholds files given (their relative values, scales re-measured on the clip's first frame unless
--file-scales). Reported per setting, over the frames after the first:

- F1 vs dense at IoU 0.5, same class, score >= the task's threshold (mean over frames and worst frame), and
  `f1_stable` (borderline objects, dense score within 0.05 of the threshold, left out on both sides);
- multiply-adds done / dense, over all frames after the first and over the delta frames alone, with the
  count of frames that ran as delta / dense (busy, `dense_above`) / keyframe;
- the input update rate (fraction of input pixels sent) over the delta frames.

By default every frame after the first runs as a delta frame (`dense_above` off); `--dense-above 0.5` gives
the library's default, where busy frames run densely (counted at full multiply-adds, exact output).

Multiply-adds and F1 do not depend on machine load; nothing here is timed (use benchmarks/cpu_real.py
or gpu_yolo.py on a quiet machine for time).

    python3 benchmarks/real_clips.py                                    # vtest 200-794 + bikes-street, YOLOv8n
    python3 benchmarks/real_clips.py --clips vtest --models centerface --frames 60
    python3 benchmarks/real_clips.py --points 0/0/1,0.02/0.05/3 --thresholds deltacnn/data/yolov8n.json

A point is INPUT/LAYERS[/MIN_BLOB] (relative; MIN_BLOB: `convert(min_blob=)`, odd, 1 = off).
Frame sizes: YOLOv8n and CenterFace need multiples of 32; their tasks pad the frame at the bottom/right
(YOLOv8n with grey 114, as Ultralytics does; CenterFace by resizing, see its task) and report boxes in frame
pixels, so bikes-street's 640x272 runs as 640x288.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's deltacnn, not an installed one
import deltacnn  # noqa: E402
from deltacnn import clips  # noqa: E402
from deltacnn.calibration import measure_scales  # noqa: E402
from deltacnn.tasks import get_task  # noqa: E402
from deltacnn.tasks.base import to_float  # noqa: E402
from deltacnn.thresholds import INPUT  # noqa: E402

# clip -> (first frame of the segment used, models that make sense on it)
DEFAULT_SEGMENT = {"vtest": 200}  # issue 12: tune on vtest 0-199, evaluate on 200-794
MODELS_FOR = {"centerface": {"vtest"}}  # a face detector on the clips with faces big enough to find


def parse_points(spec: str) -> list[tuple[float, float, int]]:
    out = []
    for p in spec.split(","):
        parts = p.strip().split("/")
        if len(parts) not in (2, 3):
            raise SystemExit(f"bad point {p!r}: use INPUT/LAYERS[/MIN_BLOB], e.g. 0.02/0.05/3")
        ti, tl = float(parts[0]), float(parts[1])
        mb = int(parts[2]) if len(parts) == 3 else 1
        if ti < 0 or tl < 0 or mb < 1 or mb % 2 == 0:
            raise SystemExit(f"bad point {p!r}: thresholds >= 0, MIN_BLOB odd >= 1")
        out.append((ti, tl, mb))
    return out


def environment() -> dict:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        rev, dirty = "unknown", ""
    return {"commit": rev + ("+dirty" if dirty else ""), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "deltacnn": str(Path(deltacnn.__file__).parent), "load_average": os.getloadavg()}


def segment(name: str, frames: int | None) -> tuple[int, int]:
    """[start, stop) in the clip's own frame numbers."""
    c = clips.CLIPS[name]
    a, b = c.segment or (DEFAULT_SEGMENT.get(name, 0), c.frames)
    return a, b if frames is None else min(b, a + frames)


def load_segment(name: str, a: int, b: int) -> list[np.ndarray]:
    c = clips.CLIPS[name]
    s0 = c.segment[0] if c.segment else 0
    return list(clips.read_clip(name, max_frames=b - a, start=a - s0))


def play(dm, task, xs, refs, hw) -> dict:
    """One pass from a keyframe: agreement per frame after the first, MACs, modes, input update rate."""
    dm.reset()
    sums: dict[str, float] = {}
    f1, f1s, macs, dense, dmacs, ddense, rates, modes = [], [], 0, 0, 0, 0, [], {"delta": 0, "dense": 0, "keyframe": 0}
    with torch.no_grad():
        for i, x in enumerate(xs):
            y = dm(x)
            if i == 0:
                continue
            fs = dm.frame_stats()
            mode = dm.last_mode
            modes[mode] = modes.get(mode, 0) + 1
            macs, dense = macs + fs.macs, dense + fs.dense_macs
            if mode == "delta":
                dmacs, ddense = dmacs + fs.macs, ddense + fs.dense_macs
                inp = fs.layers.get(INPUT)
                if inp is not None:
                    rates.append(inp.update_rate)
            a = task.agreement(task.postprocess(to_float(y), hw), refs[i])
            for k, v in a.items():  # every metric the task reports (CenterFace: heat-map differences too)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + float(v)
            f1.append(a["f1"])
            if "f1_stable" in a:
                f1s.append(a["f1_stable"])
    nan = float("nan")
    return {"f1_mean": float(np.mean(f1)), "f1_worst": float(np.min(f1)),
            "f1_stable_mean": float(np.mean(f1s)) if f1s else nan, "f1_stable_worst": float(np.min(f1s)) if f1s else nan,
            "macs_all": macs / dense if dense else nan, "macs_delta": dmacs / ddense if ddense else nan,
            "input_update_delta": float(np.mean(rates)) if rates else nan, "modes": modes, "frames_scored": len(f1),
            "metric_means": {k: v / len(f1) for k, v in sums.items()} if f1 else {}}


def run_clip_model(clip: str, model: str, points, files, args) -> list[dict]:
    a, b = segment(clip, args.frames)
    raw = load_segment(clip, a, b)
    if len(raw) < 2:
        raise SystemExit(f"{clip}: segment {a}-{b - 1} has {len(raw)} frame(s); need 2")
    hw = raw[0].shape[:2]
    task = get_task(model)
    net = task.load_model().eval()
    xs = [task.preprocess(f) for f in raw]
    with torch.no_grad():
        refs = [task.postprocess(net(x), hw) for x in xs]
    n_ref = [len(r["boxes"]) for r in refs]
    print(f"\n{clip} frames {a}-{a + len(raw) - 1} ({hw[1]}x{hw[0]} -> model input {xs[0].shape[3]}x{xs[0].shape[2]}), "
          f"{model}: dense finds {min(n_ref)}-{max(n_ref)} objects a frame (mean {np.mean(n_ref):.1f})", flush=True)
    rows, converted = [], {}

    def delta_model(min_blob: int):
        if min_blob not in converted:
            dm = deltacnn.convert(net, xs[0], backend=args.backend, min_blob=min_blob,
                                  dense_above=None if args.dense_above < 0 else args.dense_above)
            measure_scales(dm, xs[0])  # relative units, scales of this clip's first frame
            dm.enable_stats(True)
            converted[min_blob] = dm
        return converted[min_blob]

    settings = [(f"{ti:g}/{tl:g}/{mb}", ti, tl, mb, None) for ti, tl, mb in points]
    # a file's own min_blob (files written by deltacnn tune carry it), else --file-min-blob
    settings += [(f"file {Path(p).name}", None, None, int(json.loads(Path(p).read_text()).get("min_blob") or
                                                         args.file_min_blob), p) for p in files]
    for label, ti, tl, mb, path in settings:
        dm = delta_model(mb)
        th = dm.thresholds
        scales = dict(th.scales)
        if path is None:
            th.units, th.default, th.input, th.overrides = "relative", tl, ti, {}
        else:
            th.load(path)
            if th.units == "relative" and not args.file_scales:
                th.scales = scales  # the file's relative values on this clip's own scales
        t0 = time.process_time()
        r = play(dm, task, xs, refs, hw)
        th.scales = scales
        row = {"clip": clip, "frames": [a, a + len(raw)], "size": [hw[1], hw[0]],
               "model_input": [int(xs[0].shape[3]), int(xs[0].shape[2])], "model": model, "setting": label,
               "input": th.input if path else ti, "layers": th.default if path else tl, "min_blob": mb,
               "units": th.units, "overrides": len(th.overrides), "thresholds_file": path,
               "dense_objects_mean": float(np.mean(n_ref)), "cpu_s": round(time.process_time() - t0, 1), **r}
        rows.append(row)
        print(_line(row), flush=True)
    return rows


HEADER = ("| clip | model | setting (in/layers/blob) | F1 mean | F1 worst | f1_stable | MACs all | MACs delta | "
          "input updated | frames delta/dense/key |")


def _line(r: dict) -> str:
    m = r["modes"]
    fs = "-" if math.isnan(r["f1_stable_mean"]) else f"{r['f1_stable_mean']:.4f}"
    return (f"| {r['clip']} {r['frames'][0]}-{r['frames'][1] - 1} | {r['model']} | {r['setting']} | {r['f1_mean']:.4f} | "
            f"{r['f1_worst']:.3f} | {fs} | {r['macs_all']:.1%} | {r['macs_delta']:.1%} | "
            f"{r['input_update_delta']:.1%} | {m.get('delta', 0)}/{m.get('dense', 0)}/{m.get('keyframe', 0)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", default="vtest,bikes-street", help=f"comma list of {', '.join(clips.CLIPS)}")
    ap.add_argument("--models", default="yolov8n,centerface", help="comma list; centerface runs on vtest only")
    ap.add_argument("--points", default="0/0/1,0.01/0/3,0.02/0.05/3,0.03/0.1/3",
                    help="INPUT/LAYERS[/MIN_BLOB] relative thresholds, comma-separated")
    ap.add_argument("--thresholds", nargs="*", default=[], help="thresholds files to evaluate as extra settings")
    ap.add_argument("--file-scales", action="store_true",
                    help="use a relative file's own scales (measured on its tuning clip) instead of this clip's")
    ap.add_argument("--file-min-blob", type=int, default=3, help="min_blob for the thresholds files' settings")
    ap.add_argument("--frames", type=int, default=None, help="at most this many frames of each clip's segment")
    ap.add_argument("--centerface-frames", type=int, default=60, help="at most this many frames for CenterFace (~10x YOLOv8n's cost a frame)")
    ap.add_argument("--backend", default=None, help="reference / cpu (default: convert's choice)")
    ap.add_argument("--dense-above", type=float, default=-1.0,
                    help="convert(dense_above=) (the library's default is 0.5); default -1: off, every frame after the "
                         "first is a delta frame, so the numbers are the delta path's (busy frames would otherwise run "
                         "dense and hide what the thresholds hold back)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default=None, help="results file benchmarks/results/real_clips_<tag>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    points = parse_points(args.points)
    env = environment()
    out = ROOT / "benchmarks" / "results" / f"real_clips_{args.tag or env['commit'].replace('+', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save() -> None:  # after every clip and model, so a long run that is stopped keeps what it measured
        out.write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=2) + "\n")

    for clip in args.clips.split(","):
        try:
            clips.clip_path(clip)
        except clips.ClipNotInstalled as e:
            raise SystemExit(f"error: {e}") from None
        for model in args.models.split(","):
            if model in MODELS_FOR and clip not in MODELS_FOR[model]:
                continue
            n = args.frames
            if model == "centerface":
                n = args.centerface_frames if n is None else min(n, args.centerface_frames)
            sub = argparse.Namespace(**{**vars(args), "frames": n})
            rows += run_clip_model(clip, model, points, args.thresholds, sub)
            save()
    print("\n" + HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in rows:
        print(_line(r))
    env["load_average_end"] = os.getloadavg()
    save()
    print(f"\ncommit {env['commit']}, {env['date']}, torch {env['torch']}, {env['threads']} thread(s), "
          f"load average {env['load_average'][0]:.1f} (multiply-adds and F1 do not depend on load)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
