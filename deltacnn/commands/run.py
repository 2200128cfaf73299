"""`deltacnn run`: a source (file, image folder, camera, stream) through the delta model and the
strongest dense peer (for timing; the model as loaded for the error), with annotated and update
heat-map videos, per-frame records, a summary and a plot. Ctrl-C ends it cleanly."""
from __future__ import annotations

import csv
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import viz
from ..model import DeltaModel
from ..tasks.base import Task, rel_error, to_float
from ..interrupt import StopOnInterrupt
from ..peers import PeerChoice, PeerError, strongest_peer
from ..video import VideoWriter
from .common import (UserError, build_delta, finite_mean, finite_median, get_task, json_safe, load_model, open_video,
                     progress, resolve_device, resolve_dtype, timed)

# metric names that mean "lower is better" when a budget does not say (e.g. `--budget 0.95`)
LOWER_BETTER = re.compile(r"err|dist|abs|diff|loss|rmse|mae|mse|px|drift", re.I)


@dataclass
class RunResult:
    """Per-frame records, the clip summary and the files written (None where not written)."""

    rows: list[dict]
    summary: dict
    paths: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        return summary_table(self.summary)


def frame_record(i: int, dm: DeltaModel, delta_ms: float, peer_ms: float) -> dict:
    """One row of frames.csv from the delta model's statistics of the frame just run.

    `peer_ms`: the same frame through the strongest dense peer (deltacnn.peers); `speedup` is
    peer_ms / delta_ms.
    """
    fs = dm.frame_stats()
    inp = fs.layers.get("input")
    mask = dm.input_mask
    rate = inp.update_rate if inp is not None else (float(mask.float().mean()) if mask is not None else 1.0)
    rates = [s.update_rate for s in fs.layers.values() if s.dense_macs > 0]
    return {"frame": i, "keyframe": int(fs.keyframe), "mode": dm.last_mode or "", "update_rate": rate,
            "layer_update_rate": finite_mean(rates) if rates else rate,
            "macs_fraction": fs.macs_fraction if fs.dense_macs else 1.0, "macs": fs.macs, "dense_macs": fs.dense_macs,
            "flush": int(any(dm.last_flushed)), "refresh": int(any(dm.last_refreshed)), "delta_ms": delta_ms, "peer_ms": peer_ms,
            "speedup": peer_ms / delta_ms if delta_ms > 0 else float("nan")}


def spatial_heatmap(dm: DeltaModel, size: tuple[int, int]) -> np.ndarray:
    """(H, W) fraction of the *spatial* layers that recomputed each pixel of the first stream.

    Like dm.update_heatmap, but layers with a 1x1 map (global pooling, squeeze-excitation, dense
    heads) are left out: stretched to the frame they would tint every pixel and hide where the
    work actually went.
    """
    masks = getattr(getattr(dm.rt, "stats", None), "masks", None) or {}
    spatial = [m for m in masks.values() if m.dim() == 4 and m.shape[-1] * m.shape[-2] > 1]
    if not spatial:
        return dm.update_heatmap(size=size)[0, 0].float().cpu().numpy()
    acc = sum(torch.nn.functional.interpolate(m[:1].float(), size=size, mode="nearest") for m in spatial)
    return (acc / len(spatial))[0, 0].cpu().numpy()


def _hud(row: dict) -> list[str]:
    kf = " keyframe" if row["keyframe"] else ""
    return [f"frame {row['frame']}{kf}", f"input updated {row['update_rate']:.1%}  MACs {row['macs_fraction']:.1%}",
            f"{row['delta_ms']:.1f} ms (dense peer {row['peer_ms']:.1f} ms)"]


def run(video: str | int | Path | None = None, model: str | Task | None = None, *, threshold: float | None = None,
        input_threshold: float | None = None,
        thresholds: str | Path | None = None, device: str | None = None, out: str | Path | None = None,
        max_frames: int | None = None, dtype: str | torch.dtype | None = None, keyframe_interval: int | None = None,
        check_dense: bool = False, backend: str | None = None, quiet: bool = False,
        write_videos: bool = True, dense_above: float | None = 0.5, reader: str = "auto",
        compile_peer: bool = False, motion: str | Path | None = None, motion_halo: int | None = None,
        start_frame: int = 0, min_blob: int = 1, input_gate=None, threshold_growth: float = 0.0,
        refresh_held: float | None = None, refresh: str | None = None, refresh_drift: float | None = None,
        refresh_layers: str | None = None) -> RunResult:
    """Run a source through the delta model and, for timing, through the strongest dense peer.

    `video`: a video file, an image folder, a camera index (`0`) or a stream URL (`rtsp://`,
    `http://`; see `deltacnn.video.open_source`, `reader` picks OpenCV or PyAV); None: the demo clip.
    The dense peer is the fastest dense deployment of the same model on the device
    (`deltacnn.peers.strongest_peer`, timed on the first frame); every speedup is against it.
    Writes to `out` (default ./deltacnn_out/<source name>): annotated video, update heat-map video,
    frames.csv / frames.json (per frame: update rate, MACs versus dense, ms per frame of the delta
    model and of the peer, and with `check_dense` the error versus dense), summary.json and
    plot.png. Ctrl-C ends the run after the current frame with all of these written for the
    frames done (summary["interrupted"]); a second Ctrl-C stops at once (the annotated video may
    then hold one frame more than the records). With neither `threshold` nor `thresholds`, the task's
    tuned `default_thresholds` file is used if it ships one, else its `default_threshold` (0, i.e.
    dense-equivalent, if it has none). `dense_above`: see `convert`. `compile_peer`: on a GPU,
    also try torch.compile(mode="max-autotune") as a peer (minutes of compiling). `start_frame`: skip
    the source's frames before it (e.g. run only the held-out segment of a tune; `max_frames` counts
    from it; frame numbers in the records stay the source's).
    `check_dense` compares with the model as loaded (fp32), run once more per frame (the peer's
    outputs match it to 1e-4 only, which is enough to flip a borderline detection).
    `motion`: "none" (default), "auto" or a motion file (deltacnn/motion/files.py): the delta state
    follows the camera (deltacnn.motion.MotionDeltaModel, band width `motion_halo`); the records then
    carry the motion, its confidence, the view origin and the border-band work (counted in `macs`).
    """
    if start_frame < 0:
        raise UserError(f"--start-frame must be >= 0, got {start_frame}")
    motion = _resolve_motion(motion)
    if isinstance(motion, (list, torch.Tensor)):
        motion = motion[start_frame:]  # a motion file has one line per frame of the source
    source = open_video(video, None if max_frames is None else start_frame + max_frames, reader=reader)
    task = get_task(model)
    if threshold is None and thresholds is None and getattr(task, "default_thresholds", None) is not None:
        thresholds = task.default_thresholds  # a tuned file shipped with the task
    if threshold is None:
        threshold = 0.0 if thresholds is not None else float(getattr(task, "default_threshold", 0.0))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if compile_peer and dev.type != "cuda":
        raise UserError("--compile-peer is a GPU peer (torch.compile max-autotune); it needs --device cuda")
    if thresholds is not None and not Path(thresholds).is_file():
        raise UserError(f"thresholds file not found: {thresholds}")
    dense = load_model(task, dev)
    outdir = Path(out) if out is not None else Path("deltacnn_out") / source.name
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {outdir}: {e.strerror}") from None

    annotated = VideoWriter(outdir / "annotated.mp4", source.fps) if write_videos else None
    updates = VideoWriter(outdir / "updates.mp4", source.fps) if write_videos else None
    rows: list[dict] = []
    metric_keys: list[str] = []
    dm: DeltaModel | None = None
    mm = None  # the MotionDeltaModel around dm, with a moving camera
    choice: PeerChoice | None = None
    interrupted = False
    total = None if source.expected_frames is None else max(0, source.expected_frames - start_frame)
    bar = progress(itertools.islice(source, start_frame, None), total, "deltacnn run", quiet)
    try:
        with StopOnInterrupt() as stop:
            for i, frame in enumerate(bar):
                x = task.preprocess(frame).to(dev)
                if dm is None:
                    choice = _choose_peer(dense, x, compile_peer)
                    dm = build_delta(dense, x, threshold=threshold, input_threshold=input_threshold,
                                     thresholds=thresholds, dtype=torch_dtype,
                                     keyframe_interval=keyframe_interval, backend=backend, dense_above=dense_above,
                                     min_blob=min_blob, input_gate=input_gate, threshold_growth=threshold_growth,
                                     refresh_held=refresh_held, refresh=refresh, refresh_drift=refresh_drift,
                                     refresh_layers=refresh_layers)
                    dm.enable_stats(True, keep_masks=write_videos)
                    mm = _motion_model(dm, motion, motion_halo)
                out_delta, delta_ms = _timed_motion(mm, x, dev) if mm is not None else timed(dm, x, dev)
                _, peer_ms = timed(choice.peer, x, dev)
                row = frame_record(start_frame + i, dm, delta_ms, peer_ms)
                result = task.postprocess(to_float(out_delta))
                if mm is not None:
                    row.update(_motion_fields(mm, row))
                    result = mm.camera_result(result, frame.shape[:2])
                if check_dense:
                    # the model itself, not the peer: a 1e-4 difference (onnxruntime) flips borderline boxes
                    out_dense = _dense(dense, x)
                    row["rel_error"] = rel_error(out_delta, out_dense)
                    ref = task.postprocess(out_dense)
                    metrics = {f"task_{k}": float(v) for k, v in task.agreement(result, ref).items()}
                    metric_keys += [k for k in metrics if k not in metric_keys]
                    row.update(metrics)
                if write_videos:
                    annotated.write(viz.put_text(task.draw(frame, result), _hud(row)))
                    heat = spatial_heatmap(dm, frame.shape[:2])
                    updates.write(viz.put_text(viz.heatmap_overlay(frame, heat), _hud(row)))
                rows.append(row)
                if stop.requested:
                    interrupted = True
                    break
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the frame loop's reach
        interrupted = True
    finally:
        if hasattr(bar, "close"):
            bar.close()
        source.close()
        for w in (annotated, updates):
            if w is not None:
                w.close()
    if not rows:
        raise UserError(f"the run was stopped before its first frame was done; nothing written to {outdir}")

    if dm is not None and thresholds is None:
        threshold = threshold if dm.thresholds.input is None else {"default": threshold, "input": dm.thresholds.input}
    summary = summarize(rows, task=task, device=dev, video=source.label, threshold=threshold, thresholds=thresholds,
                        dtype=str(torch_dtype or torch.float32).replace("torch.", ""), metric_keys=metric_keys,
                        peer=choice)
    summary["source"] = source.kind
    summary["motion"] = "none" if motion is None else motion if isinstance(motion, str) else f"{len(motion)} given"
    summary["start_frame"] = start_frame
    summary["interrupted"] = interrupted
    if dm is not None:
        summary["backend"] = dm.rt.backend_on(dev).name
    paths = write_run_outputs(outdir, rows, summary, metric_keys, title=f"{task.name} on {source.name}")
    if write_videos:
        paths = {"annotated": annotated.path, "updates": updates.path, **paths}
    return RunResult(rows, summary, paths)


def _resolve_motion(motion):
    from ..motion import MotionFileError, resolve_motion
    try:
        motion = resolve_motion("none" if motion is None else motion)
    except MotionFileError as e:
        raise UserError(str(e)) from None
    return None if isinstance(motion, str) and motion == "none" else motion


def _motion_model(dm: DeltaModel, motion, halo: int | None):
    if motion is None:
        return None
    from ..motion import MotionDeltaModel
    try:
        return MotionDeltaModel(dm, motion, halo=halo)
    except ValueError as e:
        raise UserError(f"--motion: {e}") from None


def _timed_motion(mm, x, dev):
    from ..motion import MotionNotSupportedError, MotionSequenceError
    try:
        return timed(mm, x, dev)
    except MotionSequenceError as e:
        raise UserError(f"--motion: {e}") from None
    except MotionNotSupportedError as e:
        raise UserError(f"--motion: this model cannot follow a moving camera: {e}") from None


def _motion_fields(mm, row: dict) -> dict:
    """The motion columns of a record; the border bands' work is added to the frame's MACs."""
    from ..motion import motion_record
    rec = motion_record(mm)
    macs = row["macs"] + rec["band_macs"]
    return {**rec, "macs": macs, "macs_fraction": macs / row["dense_macs"] if row["dense_macs"] else 1.0}


def _dense(model, x):
    with torch.no_grad():
        return model(x)


def _choose_peer(dense, x, compile_peer: bool) -> PeerChoice:
    try:
        return strongest_peer(dense, [x], compile=compile_peer, calls=5)
    except PeerError as e:
        raise UserError(f"no dense peer to compare with: {e}") from None


def summarize(rows: list[dict], *, task: Task, device: torch.device, video: str | Path, threshold: float | dict,
              thresholds: str | Path | None, dtype: str, metric_keys: Sequence[str],
              peer: PeerChoice | None = None) -> dict:
    """Clip averages, with the delta frames and all frames reported separately.

    Rates and errors are means over all frames (keyframes included). Times: the delta frames
    (mode "delta": neither keyframes nor frames run densely) have their mean and median; all
    frames their mean. Speedups are against the dense peer on the same frames: over the delta
    frames mean/mean (and median/median), over all frames total peer time over total delta time
    (the throughput ratio).
    """
    delta_rows = [r for r in rows if r.get("mode") == "delta"]
    peer_all = sum(r["peer_ms"] for r in rows)
    delta_all = sum(r["delta_ms"] for r in rows)
    d_mean = finite_mean([r["delta_ms"] for r in delta_rows])
    d_med = finite_median([r["delta_ms"] for r in delta_rows])
    p_mean = finite_mean([r["peer_ms"] for r in delta_rows])
    p_med = finite_median([r["peer_ms"] for r in delta_rows])
    s = {"model": task.name, "video": str(video), "frames": len(rows), "device": str(device), "dtype": dtype,
         "threshold": threshold, "thresholds_file": str(thresholds) if thresholds else None,
         "keyframes": sum(r["keyframe"] for r in rows),
         "flushes": sum(r.get("flush", 0) for r in rows),
         "modes": {m: sum(r.get("mode") == m for r in rows) for m in ("delta", "keyframe", "dense")},
         "mean_update_rate": finite_mean([r["update_rate"] for r in rows]),
         "mean_layer_update_rate": finite_mean([r["layer_update_rate"] for r in rows]),
         "macs_fraction": sum(r["macs"] for r in rows) / max(1, sum(r["dense_macs"] for r in rows)),
         "delta_frames": len(delta_rows),
         "delta_frame_mean_ms": d_mean, "delta_frame_median_ms": d_med,
         "all_frame_mean_ms": delta_all / len(rows),
         "peer_mean_ms": peer_all / len(rows), "peer_median_ms": finite_median([r["peer_ms"] for r in rows]),
         "speedup_delta_frames": p_mean / d_mean if d_mean > 0 else float("nan"),
         "speedup_delta_frames_median": p_med / d_med if d_med > 0 else float("nan"),
         "speedup_all_frames": peer_all / delta_all if delta_all > 0 else float("nan")}
    if peer is not None:
        s["peer"] = peer.peer.name
        s["peer_threads"] = peer.peer.threads
        s["peer_candidates"] = {c.name: c.ms for c in peer.candidates.values()}
        s["peer_rejected"] = dict(peer.rejected)
        s["peer_description"] = peer.describe()
    s["macs_saved"] = 1.0 - s["macs_fraction"]
    if rows and "rel_error" in rows[0]:
        s["mean_rel_error"] = finite_mean([r["rel_error"] for r in rows])
        s["max_rel_error"] = max((r["rel_error"] for r in rows), default=float("nan"))
        s["agreement"] = {k[len("task_"):]: finite_mean([r.get(k, float("nan")) for r in rows]) for k in metric_keys}
    return s


def write_run_outputs(outdir: Path, rows: list[dict], summary: dict, metric_keys: Sequence[str],
                      title: str = "") -> dict[str, Path]:
    """frames.csv, frames.json, summary.json and plot.png in `outdir`."""
    keys = list(rows[0].keys())
    for r in rows:
        keys += [k for k in r if k not in keys]
    csv_path = outdir / "frames.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    json_path = outdir / "frames.json"
    json_path.write_text(json.dumps(json_safe(rows), indent=1) + "\n")
    summary_path = outdir / "summary.json"
    summary_path.write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    # task metrics for the plot: agreement-like ones (errors are already the left axis)
    main_metric = [k for k in metric_keys if not k.startswith("task_n") and not LOWER_BETTER.search(k)][:2]
    plot_path = viz.plot_run(rows, outdir / "plot.png", title=title,
                             error_key="rel_error" if "rel_error" in keys else None, agreement_keys=main_metric,
                             peer=summary.get("peer"))
    return {"frames_csv": csv_path, "frames_json": json_path, "summary": summary_path, "plot": plot_path}


def summary_table(s: dict) -> str:
    """The few numbers a user wants after a run, as aligned text; every speedup is against the peer."""
    th = s["threshold"]
    th = (f"thresholds {s['thresholds_file']}" if s["thresholds_file"] else
          f"threshold {th['default']:g} (input {th['input']:g})" if isinstance(th, dict) else f"threshold {th:g}")
    backend = f", {s['backend']} backend" if s.get("backend") else ""
    stopped = "  (stopped by Ctrl-C)" if s.get("interrupted") else ""
    modes = s.get("modes") or {}
    lines = [f"{s['model']} on {Path(s['video']).name}: {s['frames']} frames{stopped}, {s['device']}{backend}, "
             f"{s['dtype']}, {th}",
             f"  dense peer               {s.get('peer_description') or s.get('peer') or 'none'}",
             f"  mean input update rate   {s['mean_update_rate']:8.1%}   (layers: {s['mean_layer_update_rate']:.1%})",
             f"  multiply-adds saved      {s['macs_saved']:8.1%}",
             f"  frames delta/key/dense   {modes.get('delta', 0):5d} / {modes.get('keyframe', 0)} / "
             f"{modes.get('dense', 0)}" + ("   (dense: too busy for deltas, run densely)" if modes.get("dense")
                                           else "")
             + (f"   ({s['flushes']} delta frames flushed held input)" if s.get("flushes") else "")]
    if s["delta_frames"]:
        lines.append(f"  delta frames ms          {s['delta_frame_mean_ms']:8.1f} mean, "
                     f"{s['delta_frame_median_ms']:.1f} "
                     f"median   speedup vs peer {s['speedup_delta_frames']:.2f}x "
                     f"(median {s['speedup_delta_frames_median']:.2f}x)")
    else:
        lines.append("  delta frames             none (every frame was a keyframe or ran densely)")
    lines.append(f"  all frames ms            {s['all_frame_mean_ms']:8.1f} mean   peer {s['peer_mean_ms']:.1f} mean   "
                 f"speedup vs peer {s['speedup_all_frames']:.2f}x")
    if "mean_rel_error" in s:
        lines.append(f"  rel. error vs dense      {s['mean_rel_error']:8.2e}   (max {s['max_rel_error']:.2e})")
        agree = ", ".join(f"{k} {v:.3g}" for k, v in s["agreement"].items() if not k.startswith("n"))
        if agree:
            lines.append(f"  task agreement vs dense  {agree}")
    else:
        lines.append("  error vs dense           not measured (use --check-dense)")
    return "\n".join(lines)
