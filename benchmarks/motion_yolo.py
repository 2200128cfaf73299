"""YOLOv8n on a moving camera: a 640x448 window panning / tilting over vtest.avi (768x576, real
pedestrians walking) at 2-8 px/frame, or a real moving-camera clip. Dense YOLOv8n on the camera frames
is the reference; plain delta inference (no alignment) and motion-aligned delta inference
(deltacnn.motion) are compared with it: F1 / f1_stable, multiply-adds, update rate, 1-thread CPU time.

    PYTHONPATH=. python3 benchmarks/motion_yolo.py --paths static,pan4 --frames 40 [--auto] [--halo exact,64]
        [--input-threshold 0.04 --min-blob 3] [--clip FILE] [--plot] [--video]

Times are CPU-clock (time.process_time) with torch at 1 thread, so that a loaded machine slows every
variant alike (--clock wall --threads 2 on a quiet machine); the dense peers (deltacnn.peers: torch as
loaded, channels_last, onnxruntime, at the same thread count) are timed the same way on the first frames. Statistics stay on while timing (the MAC counts need them).
Outputs: benchmarks/results/motion_yolo_<path>.json, and with --plot / --video the plot of motion, update
rate and speed over the clip and the heat-map video of the view drifting over the scene.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import deltacnn
from deltacnn.calibration import measure_scales
from deltacnn.clips import read_frames
from deltacnn.motion import MotionDeltaModel, motion_record, translate
from deltacnn.peers import build_peers
from deltacnn.tasks.yolov8 import YOLOv8Task

VTEST = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"
VIEW_H, VIEW_W = 448, 640
RESULTS = Path(__file__).resolve().parent / "results"


def triangle(t: int, speed: int, span: int) -> int:
    """Position at frame t of a camera sweeping [0, span] back and forth at `speed` px/frame."""
    if speed == 0 or span == 0:
        return span // 2
    p = (speed * t) % (2 * span)
    return p if p <= span else 2 * span - p


def camera_path(name: str, frames: int, scene_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """View origins (x, y) in the scene: static, panN, tiltN, pantiltN (N px/frame), stillpanN (still for the
    first half of the frames, then a pan: a still camera's estimator must wake up)."""
    span_x, span_y = scene_hw[1] - VIEW_W, scene_hw[0] - VIEW_H
    kind = name.rstrip("0123456789")
    speed = int(name[len(kind):] or 0)
    out = []
    for t in range(frames):
        x = triangle(t, speed, span_x) if kind in ("pan", "pantilt") else span_x // 2
        y = triangle(t, speed, span_y) if kind in ("tilt", "pantilt") else span_y // 2
        if kind == "stillpan":
            x = span_x // 2 + triangle(max(0, t - frames // 2), speed, span_x - span_x // 2)
        if kind not in ("static", "pan", "tilt", "pantilt", "stillpan"):
            raise SystemExit(f"unknown camera path {name!r} (static, panN, tiltN, pantiltN, stillpanN)")
        out.append((x, y))
    return out


CLOCK = time.process_time  # --clock wall: time.perf_counter (a quiet machine)


def cpu_ms(fn, *a):
    t0 = CLOCK()
    y = fn(*a)
    return y, (CLOCK() - t0) * 1e3


def still_options(args) -> dict:
    """MotionDeltaModel's still-camera options given on the command line (the library's defaults otherwise)."""
    out = {}
    if args.still_every is not None:
        out["still_every"] = args.still_every
    if args.wake_change is not None:
        out["wake_change"] = None if args.wake_change == "none" else float(args.wake_change)
    return out


def run_path(args, task: YOLOv8Task, net, name: str, scene_frames: list[np.ndarray]) -> dict:
    if args.clip:  # a real clip: the camera frame is the whole frame, cropped to a multiple of 32
        h, w = (s - s % 32 for s in scene_frames[0].shape[:2])
        cams = [f[:h, :w] for f in scene_frames]
        origins = None
    else:
        origins = camera_path(name, len(scene_frames), scene_frames[0].shape[:2])
        cams = [f[y:y + VIEW_H, x:x + VIEW_W] for f, (x, y) in zip(scene_frames, origins)]
    xs = [task.preprocess(c) for c in cams]
    given = None
    if origins is not None:
        given = torch.tensor([(0, 0)] + [(b[0] - a[0], b[1] - a[1]) for a, b in zip(origins, origins[1:])],
                             dtype=torch.float64)
    kw = dict(input_threshold=args.input_threshold, threshold=args.threshold, min_blob=args.min_blob, backend="cpu")
    if args.thresholds:  # a tuned file: its thresholds, gate and refresh rule (what `deltacnn run` uses)
        kw = dict(thresholds_file=args.thresholds, backend="cpu")

    def delta_model():
        dm = deltacnn.convert(net, xs[0], **kw)
        if args.relative and not args.thresholds:  # thresholds as fractions of each layer's scale
            # (the input's: the frame's range)
            measure_scales(dm, xs[0], relative=True)
        return dm

    models = {"delta": delta_model()}
    motion = "auto" if args.auto or given is None else given
    for vs in args.view_step.split(","):
        if vs == "padded":  # no bands: one variant (--halo is for the band-recomputing view steps)
            models["aligned_padded"] = MotionDeltaModel(delta_model(), motion=motion, max_residual=args.max_residual,
                                                        edge=args.edge, view_step="padded")
            continue
        for h in args.halo.split(","):
            halo = None if h == "exact" else int(h)
            models[f"aligned_{h}"] = MotionDeltaModel(delta_model(), motion=motion, halo=halo,
                                                      max_residual=args.max_residual, edge=args.edge,
                                                      view_step="bands", **still_options(args))
    for m in models.values():
        (m.dm if isinstance(m, MotionDeltaModel) else m).enable_stats(True, keep_masks=args.video)
    rows = []
    video = None
    if args.video:
        from deltacnn.video import VideoWriter
        stem = Path(args.clip).stem if args.clip else name
        video = VideoWriter(RESULTS / f"motion_yolo_{stem}{'_' + args.tag if args.tag else ''}_heat.mp4", 10)
    with torch.no_grad():
        for t, (x, cam) in enumerate(zip(xs, cams)):
            row = {"frame": t}
            out_dense, row["dense_ms"] = cpu_ms(net, x)
            ref = task.postprocess(out_dense)
            row["n_ref"] = len(ref["boxes"])
            for key, m in models.items():
                y, ms = cpu_ms(m, x)
                dm = m.dm if isinstance(m, MotionDeltaModel) else m
                res = task.postprocess(y)
                if isinstance(m, MotionDeltaModel):
                    res = m.camera_result(res, cam.shape[:2])
                    mr = motion_record(m)
                    row.update({f"{key}_{k}": v for k, v in mr.items()})
                    band = mr["band_macs"]
                else:
                    band = 0
                fs = dm.frame_stats()
                ag = task.agreement(res, ref)
                inp = fs.layers.get("input")
                row.update({f"{key}_ms": ms, f"{key}_macs": (fs.macs + band) / fs.dense_macs,
                            f"{key}_mode": dm.last_mode or "", f"{key}_update": inp.update_rate if inp else 1.0,
                            f"{key}_f1": ag["f1"], f"{key}_f1_stable": ag["f1_stable"]})
                if isinstance(m, MotionDeltaModel) and "phase_f1" not in row:
                    # the ceiling of any stride-aligned method: dense YOLOv8n on the view the aligned model saw
                    # (the camera frame moved by the sub-stride residual), boxes mapped back
                    view_out = net(translate(x, torch.tensor(m.input_shift), "nearest"))
                    phase = m.camera_result(task.postprocess(view_out), cam.shape[:2])
                    pa = task.agreement(phase, ref)
                    row["phase_f1"], row["phase_f1_stable"] = pa["f1"], pa["f1_stable"]
                    row["residual_x"], row["residual_y"] = m.input_shift[0]
                if isinstance(m, MotionDeltaModel):  # the delta model's own error: against that view's result
                    va = task.agreement(res, phase)
                    row[f"{key}_f1_vs_view"] = va["f1"]
                if video is not None and key == next(k for k in models if k.startswith("aligned")):
                    video.write(heat_frame(scene_frames[t], cam, dm, m, origins[t] if origins else (0, 0), row, key))
            rows.append(row)
            if not args.quiet:
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if video is not None:
        video.close()
    return {"path": name, "rows": rows, "summary": summarize(rows, list(models))}


def heat_frame(scene: np.ndarray, cam: np.ndarray, dm, mm: MotionDeltaModel, origin, row, key) -> np.ndarray:
    """The scene (dimmed) with the aligned model's update heat map pasted where its view lies: the view
    origin (a multiple of the stride) drifts over the scene while the camera moves."""
    from deltacnn import viz
    from deltacnn.commands.run import spatial_heatmap

    canvas = (scene.astype(np.float32) * 0.35).astype(np.uint8)
    heat = spatial_heatmap(dm, cam.shape[:2])
    tx, ty = (int(round(v)) for v in mm.input_shift[0])
    # the aligned frame shows the camera frame moved by the residual: paste it there
    ox, oy = origin[0] - tx, origin[1] - ty
    aligned = np.ascontiguousarray(np.roll(cam, (ty, tx), (0, 1)))
    tile = viz.heatmap_overlay(aligned, heat, legend=False)
    H, W = canvas.shape[:2]
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + tile.shape[0], H), min(ox + tile.shape[1], W)
    canvas[y0:y1, x0:x1] = tile[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    import cv2
    cv2.rectangle(canvas, (origin[0], origin[1]), (origin[0] + cam.shape[1] - 1, origin[1] + cam.shape[0] - 1),
                  (255, 255, 255), 1)
    return viz.put_text(canvas, [f"frame {row['frame']}  view origin {mm.view[0]}  camera {origin}",
                                 f"MACs {row[key + '_macs']:.1%}  input updated {row[key + '_update']:.1%}  "
                                 f"F1 {row[key + '_f1']:.3f}"])


def summarize(rows: list[dict], keys: list[str]) -> dict:
    body = rows[1:]  # frame 0 is every model's keyframe
    s = {"frames": len(rows), "dense_ms_mean": statistics.mean(r["dense_ms"] for r in body)}
    if "phase_f1" in rows[0]:
        s["phase_f1"] = statistics.mean(r["phase_f1"] for r in body)
        s["phase_f1_stable"] = statistics.mean(r["phase_f1_stable"] for r in body)
    for k in keys:
        s[k] = {"f1": statistics.mean(r[f"{k}_f1"] for r in body),
                "f1_stable": statistics.mean(r[f"{k}_f1_stable"] for r in body),
                "macs": statistics.mean(r[f"{k}_macs"] for r in body),
                "update": statistics.mean(r[f"{k}_update"] for r in body),
                "ms_mean": statistics.mean(r[f"{k}_ms"] for r in body),
                "ms_median": statistics.median(r[f"{k}_ms"] for r in body),
                "dense_frames": sum(r[f"{k}_mode"] == "dense" for r in body)}
        if k.startswith("aligned"):
            s[k]["f1_vs_view"] = statistics.mean(r[f"{k}_f1_vs_view"] for r in body)
            s[k]["min_confidence"] = min(r[f"{k}_motion_confidence"] for r in body)
            s[k]["recomputed_streams"] = sum(r[f"{k}_motion_recomputed"] for r in body)
            s[k]["band_fraction"] = statistics.mean(r[f"{k}_band_fraction"] for r in body)
            s[k]["held_frames"] = sum(1 - r[f"{k}_motion_translating"] for r in body)
            s[k]["unexplained_range"] = [min(r[f"{k}_motion_unexplained"] for r in body),
                                         max(r[f"{k}_motion_unexplained"] for r in body)]
    return s


def time_peers(net, xs: list[torch.Tensor], calls: int) -> dict[str, float]:
    """Median 1-thread CPU ms of each dense peer, interleaved over the first frames."""
    peers, rejected = build_peers(net, xs[0], threads=torch.get_num_threads())
    times = {p.key: [] for p in peers}
    with torch.no_grad():
        for p in peers:
            p(xs[0])  # warm-up (onnxruntime's first call allocates)
        for i in range(calls):
            for p in peers:
                times[p.key].append(cpu_ms(p, xs[i % len(xs)])[1])
    return {k: statistics.median(v) for k, v in times.items()} | {f"rejected_{k}": v for k, v in rejected.items()}


def plot(result: dict, path: Path, keys: list[str], peer_ms: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    f = [r["frame"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True, constrained_layout=True)
    ax = axes[0]
    k0 = next(k for k in keys if k.startswith("aligned"))
    ax.plot(f, [r[f"{k0}_motion_dx"] for r in rows], label="camera dx (px/frame)")
    ax.plot(f, [r[f"{k0}_motion_dy"] for r in rows], label="camera dy (px/frame)")
    ax.set_ylabel("motion (px)")
    ax2 = ax.twinx()
    ax2.plot(f, [min(r[f"{k0}_motion_confidence"], 1e4) for r in rows], color="grey", ls=":", label="confidence")
    ax2.set_yscale("log")
    ax2.set_ylabel("estimate confidence")
    for r in rows:  # frames whose motion is no translation: the camera was held (plain delta)
        if not r.get(f"{k0}_motion_translating", 1):
            ax.axvspan(r["frame"] - 0.5, r["frame"] + 0.5, color="tab:red", alpha=0.15, lw=0)
    ax.plot(f, [r.get(f"{k0}_motion_unexplained", 0.0) for r in rows], color="tab:red", lw=0.8,
            label="change unexplained by the translation (0-1; shaded: held, plain delta)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Camera motion ({result['path']})")
    ax = axes[1]
    for k in keys:
        ax.plot(f, [100 * r[f"{k}_macs"] for r in rows], label=f"{k}: MACs vs dense")
        ax.plot(f, [100 * r[f"{k}_update"] for r in rows], ls="--", lw=0.8, label=f"{k}: input updated")
    ax.set_ylabel("% of dense")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("Work")
    ax = axes[2]
    ax.plot(f, [r["dense_ms"] for r in rows], color="grey", label="dense (torch as loaded)")
    if peer_ms:
        ax.axhline(peer_ms, color="black", lw=0.8, ls=":", label="strongest dense peer (median)")
    for k in keys:
        ax.plot(f, [r[f"{k}_ms"] for r in rows], label=k)
    ax.set_ylabel("ms per frame (CPU clock, 1 thread)" if CLOCK is time.process_time else "ms per frame (wall)")
    ax.set_xlabel("frame")
    ax.legend(fontsize=7)
    ax.set_title("Speed (CPU clock, loaded machine)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default="static,pan4")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--start", type=int, default=100, help="first vtest frame (default 100: people in view)")
    ap.add_argument("--clip", default=None, help="a real moving-camera clip instead of the synthetic pans")
    ap.add_argument("--auto", action="store_true", help="estimate the motion instead of giving the true one")
    ap.add_argument("--view-step", default="bands",
                    help="aligned variants, comma-separated: padded (view steps inside the delta pass) and/or bands "
                         "(recomputed border bands, one variant per --halo)")
    ap.add_argument("--halo", default="exact,64", help="view_step bands: band widths (exact: the bound R)")
    ap.add_argument("--max-residual", type=float, default=None,
                    help="MotionDeltaModel(max_residual=...): px the camera may drift before the view steps")
    ap.add_argument("--edge", choices=("hold", "replicate"), default="hold", help="MotionDeltaModel(edge=...)")
    ap.add_argument("--still-every", type=int, default=None, help="MotionDeltaModel(still_every=...)")
    ap.add_argument("--wake-change", default=None, help="MotionDeltaModel(wake_change=...): a fraction or 'none'")
    ap.add_argument("--input-threshold", type=float, default=0.04)
    ap.add_argument("--threshold", type=float, default=0.0)
    ap.add_argument("--min-blob", type=int, default=3)
    ap.add_argument("--relative", action="store_true", help="thresholds relative to each layer's measured scale")
    ap.add_argument("--thresholds", default=None,
                    help="a tuned thresholds file instead of the global ones (e.g. deltacnn/data/yolov8n_vtest.json)")
    ap.add_argument("--peers", type=int, default=4, help="timed calls per dense peer (0: skip)")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--video", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: 1 thread, time.process_time (default); wall: perf_counter at --threads")
    ap.add_argument("--threads", type=int, default=2, help="torch threads with --clock wall (default 2)")
    a = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    threads = 1 if a.clock == "cpu" else a.threads
    torch.set_num_threads(threads)
    RESULTS.mkdir(exist_ok=True)
    task = YOLOv8Task()
    net = task.load_model()
    scene = list(read_frames(a.clip or VTEST, max_frames=a.frames, start=a.start))
    paths = ["clip"] if a.clip else a.paths.split(",")
    peers = None
    for name in paths:
        res = run_path(a, task, net, name, scene)
        if peers is None and a.peers:
            xs = [task.preprocess(f[:VIEW_H, :VIEW_W] if not a.clip else f[:f.shape[0] // 32 * 32,
                                                                            :f.shape[1] // 32 * 32])
                  for f in scene[:3]]
            peers = time_peers(net, xs, a.peers)
        res["peers_cpu_ms"] = peers
        res["settings"] = {k: v for k, v in vars(a).items()}
        tag = f"_{a.tag}" if a.tag else ""
        out = RESULTS / f"motion_yolo_{Path(a.clip).stem if a.clip else name}{tag}.json"
        out.write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(name, json.dumps(res["summary"], indent=1, default=float), "peers", peers, flush=True)
        if a.plot:
            keys = [k for k in res["summary"] if isinstance(res["summary"][k], dict)]
            best_peer = min((v for k, v in (peers or {}).items() if not k.startswith("rejected")), default=None)
            plot(res, out.with_suffix(".png"), keys, best_peer)


if __name__ == "__main__":
    main()
