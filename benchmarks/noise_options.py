"""What the noise options buy on YOLOv8n on vtest.avi: multiply-adds, update rates, agreement, CPU time.

Each configuration is a comma-separated list of key=value (thresholds relative: the input as a
fraction of the frame's range, layers as a fraction of their keyframe activation scale, as
`deltacnn tune` writes them):

    in=0.02        input threshold               layer=0.05    layer threshold (every nonlinear layer)
    blob=3         InputGate.min_blob            tile=8:4      InputGate tile / tile_min
    low=0.33       InputGate.low (hysteresis)    hyst=spatial  InputGate.hysteresis (spatial|temporal|both)
    steps=2        InputGate.steps               growth=0.5    Thresholds.growth (deep-layer truncation)
    kf=50          keyframe_interval             refresh=off   rt.refresh_work off (or a number)
    lscale=0.5     every layer threshold (the file's overrides too) times this factor
    drift=0.3      refresh_drift: a keyframe once the input's unsent change, mean |x - ref|, exceeds 0.3 input thresholds
    layers=flush:8 layer refresh (deltacnn.layer_refresh spec; ';' for ':' is accepted too, e.g. flush;8;s8@0.25)
    held=0.005     refresh_held (keyframe once the gates hold back changes in this fraction of the pixels; off)
    flush=all      what `held` runs: a flush of every held pixel instead of a keyframe (flush=16:32: only in
                   16x16 tiles holding >= 32 held pixels; all@0.25: layer thresholds x 0.25 on flush
                   frames; deltacnn.gating.Refresh)
    file=PATH      a thresholds file (its input/layer thresholds, scales, min_blob, refresh rule) under the
                   other keys (`file=shipped`: deltacnn/data/yolov8n_vtest.json)

Frame `--start` is the keyframe; every later frame is a delta frame (dense_above off) unless a
keyframe is due. Agreement is deltacnn.tasks.yolov8's (F1 at IoU 0.5, same class, conf 0.25;
f1_stable leaves borderline objects out) against the dense model on the same frames. MACs: the
convolutions' computed pixels (the backend's count: candidates, the real work) and the emitted
pixels (statistics), keyframes counted as 100%. CPU time: process CPU clock of `dm(x)` at
--threads (1 by default; robust to a loaded machine, compare within a table only).

    python3 benchmarks/noise_options.py --start 200 --frames 200 --tag sweep \\
        'in=0.02' 'in=0.02,blob=3' 'in=0.06,low=0.33' ...
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn, not an installed one
import deltacnn  # noqa: E402
from common import environment as common_environment  # noqa: E402
from deltacnn import reference_cache  # noqa: E402
from deltacnn.calibration import measure_scales  # noqa: E402
from deltacnn.gating import InputGate  # noqa: E402
from deltacnn.thresholds import INPUT  # noqa: E402

CLIP = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"
KEYS = {"in", "layer", "lscale", "drift", "layers", "blob", "tile", "low", "hyst", "steps", "growth", "kf", "refresh", "held", "flush", "file"}
SHIPPED = Path(__file__).resolve().parents[1] / "deltacnn" / "data" / "yolov8n_vtest.json"


def environment() -> dict:
    """common.environment plus the load average (these runs are CPU-clock timed on a shared machine)."""
    return {**common_environment(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": os.getloadavg()}


def write_json(name: str, payload: dict) -> Path:
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def parse_config(spec: str) -> dict:
    cfg = {}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition("=")
        if k not in KEYS or not v:
            raise SystemExit(f"bad configuration item {part!r} in {spec!r}; keys: {sorted(KEYS)}")
        cfg[k] = v
    return cfg


def load_frames(start: int, n: int, task) -> list[torch.Tensor]:
    import cv2
    cap = cv2.VideoCapture(CLIP)
    out, i = [], 0
    while len(out) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        if i >= start:
            out.append(task.preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        i += 1
    if len(out) < n:
        raise SystemExit(f"{CLIP} has only {i} frames; asked for {start}..{start + n - 1}")
    return out


def dense_results(model, task, xs: list[torch.Tensor], start: int, store: str | None = None) -> list[dict]:
    """The dense model's decoded output per frame, from `deltacnn.reference_cache` (the key `deltacnn tune`
    uses for the same clip, frames and task, so a tune's calibration or held-out reference serves here too,
    and the other way round); computed and stored when absent. `store` (--refs): a file of this script's own
    for the same clip segment, whose key leaves out deltacnn's sources (which the cache's key holds, so that
    every edit of the library recomputes the reference): for runs while the library changes, when the dense
    model and its decode do not."""
    if store is not None and Path(store).is_file():
        saved = torch.load(store, weights_only=False)  # a file this script wrote (numpy arrays inside)
        if saved.get("clip") == CLIP and saved.get("start") == start and saved.get("frames") == len(xs):
            return saved["refs"]
        raise SystemExit(f"--refs {store} holds another segment ({saved.get('start')}, {saved.get('frames')} frames)")
    key = reference_cache.reference_key(task, model, CLIP, start, len(xs), tuple(xs[0].shape), "cpu", "auto")
    res = reference_cache.load(key, len(xs))
    if res is None:
        with torch.no_grad():
            res = [task.postprocess(model(x)) for x in xs]
        reference_cache.store(key, res)
    if store is not None:
        torch.save({"clip": CLIP, "start": start, "frames": len(xs), "refs": res}, store)
    return res


def build(model, x0: torch.Tensor, cfg: dict):
    from deltacnn.thresholds import Thresholds
    fth = None
    if "file" in cfg:
        fth = Thresholds()
        fth.load(SHIPPED if cfg["file"] == "shipped" else cfg["file"])
    tile, tile_min = (int(v) for v in cfg.get("tile", "1:1").split(":"))
    blob = int(cfg.get("blob", fth.min_blob if fth is not None and fth.min_blob else 1))
    gate = InputGate(min_blob=blob, tile=tile, tile_min=tile_min,
                     low=float(cfg["low"]) if "low" in cfg else None, steps=int(cfg.get("steps", 2)),
                     hysteresis=cfg.get("hyst", "spatial"))
    held = (None if cfg["held"] == "off" else float(cfg["held"])) if "held" in cfg else \
        (fth.refresh_held if fth is not None else None)
    refresh = fth.refresh if fth is not None else None
    if "flush" in cfg:
        body, at, f = cfg["flush"].partition("@")
        refresh = ("flush" if body == "all" else f"flush:{body}") + (at + f if at else "")
    kf = fth.keyframe_interval if fth is not None else None
    dm = deltacnn.convert(model, x0, backend="cpu", dense_above=None, input_gate=gate,
                          threshold_growth=float(cfg.get("growth", 0.0)),
                          keyframe_interval=int(cfg["kf"]) if "kf" in cfg else kf,
                          refresh_held=held, refresh=refresh or "keyframe")
    if fth is not None:
        dm.thresholds.update_from_dict(fth.to_dict())
        if "growth" in cfg:
            dm.thresholds.growth = float(cfg["growth"])
        if "kf" in cfg:
            dm.keyframe_interval = dm.thresholds.keyframe_interval = int(cfg["kf"])
    else:
        measure_scales(dm, x0)
    if "in" in cfg or fth is None:
        dm.thresholds.input = float(cfg.get("in", 0.0))
    if "layer" in cfg or fth is None:
        dm.thresholds.default = float(cfg.get("layer", 0.0))
        if fth is not None:
            dm.thresholds.overrides = {}
    if "lscale" in cfg:
        f = float(cfg["lscale"])
        dm.thresholds.default *= f
        dm.thresholds.overrides = {k: v * f for k, v in dm.thresholds.overrides.items()}
    if "drift" in cfg:
        dm.rt.refresh_drift = None if cfg["drift"] == "off" else float(cfg["drift"])
    if "layers" in cfg:
        from deltacnn.layer_refresh import LayerRefresh
        dm.rt.layer_refresh = LayerRefresh.parse(cfg["layers"].replace(";", ":"))
    elif fth is not None and fth.refresh_layers is not None:
        from deltacnn.layer_refresh import LayerRefresh
        dm.rt.layer_refresh = LayerRefresh.parse(fth.refresh_layers)
    if "drift" not in cfg and fth is not None and fth.refresh_drift is not None:
        dm.rt.refresh_drift = fth.refresh_drift
    if "refresh" in cfg:
        dm.rt.refresh_work = None if cfg["refresh"] == "off" else float(cfg["refresh"])
    return dm


def run_config(model, task, xs, refs, spec: str) -> dict:
    cfg = parse_config(spec)
    dm = build(model, xs[0], cfg)
    dm.enable_stats(True, keep_masks=True)
    backend = dm.rt.backend_on(torch.device("cpu"))
    h_in = xs[0].shape[2]
    cpu_s, macs, emitted, input_rate, f1, f1s, modes, flushes, refreshes = [], [], [], [], [], [], [], 0, 0
    refreshed = []
    touched = []  # the layer refresh's touched area after each frame (its `area` trigger reads it; else empty)
    by_stride: dict[float, list[float]] = {}
    with torch.no_grad():
        for i, x in enumerate(xs):
            t0 = time.process_time()
            y = dm(x)
            dt = time.process_time() - t0
            if i == 0:
                continue
            modes.append(dm.last_mode)
            flushes += any(dm.last_flushed)
            refreshes += any(dm.last_refreshed)
            refreshed.append(any(dm.last_refreshed))
            if dm._touched:
                touched.append(dm._touched[0])
            cpu_s.append(dt)
            fs = dm.frame_stats()
            if dm.last_mode == "delta":
                work = backend.work
                conv_t = sum(s.dense_macs for s in fs.layers.values() if s.kind == "conv_transpose")
                macs.append((work[0] + conv_t) / (work[1] + conv_t) if work[1] else 0.0)
                emitted.append(fs.macs_fraction)
                input_rate.append(fs.layers[INPUT].update_rate)
                for name, s in fs.layers.items():
                    m = dm.rt.stats.masks.get(name)
                    if m is None or name == INPUT or m.shape[2] <= 1:
                        continue
                    by_stride.setdefault(round(h_in / m.shape[2]), []).append(s.update_rate)
            else:  # a keyframe: a dense frame's work (update rates are over delta frames only)
                macs.append(1.0)
                emitted.append(1.0)
            a = task.agreement(task.postprocess(y), refs[i])
            f1.append(a["f1"])
            f1s.append(a["f1_stable"])
    half = len(f1) // 2
    delta_cpu = [t for t, m in zip(cpu_s, modes) if m == "delta"]
    return {"config": spec, "settings": cfg, "gate": dm.layers[INPUT].gate.describe(),
            "growth": dm.thresholds.growth,
            "frames": len(cpu_s), "keyframes": sum(m != "delta" for m in modes), "flushes": flushes,
            "refreshes": refreshes,
            "macs_delta_frames": statistics.fmean([m for m, md in zip(macs, modes) if md == "delta"] or [float("nan")]),
            "macs": statistics.fmean(macs), "macs_emitted": statistics.fmean(emitted),
            "input_rate": statistics.fmean(input_rate) if input_rate else float("nan"),
            "layer_rate_by_stride": {str(k): statistics.fmean(v) for k, v in sorted(by_stride.items())},
            "f1": statistics.fmean(f1), "f1_stable": statistics.fmean(f1s), "f1_min": min(f1),
            "f1_first_half": statistics.fmean(f1[:half]), "f1_second_half": statistics.fmean(f1[half:]),
            "cpu_ms_mean": 1e3 * statistics.fmean(cpu_s),
            "cpu_ms_delta_median": 1e3 * statistics.median(delta_cpu) if delta_cpu else float("nan"),
            "per_frame": {"macs": macs, "f1": f1, "f1_stable": f1s, "cpu_ms": [1e3 * t for t in cpu_s],
                          "modes": ["refresh" if r else m for m, r in zip(modes, refreshed)], "touched": touched}}


COLS = ["config", "macs", "macs_delta_frames", "macs_emitted", "input_rate", "f1", "f1_stable", "f1_first_half", "f1_second_half",
        "keyframes", "flushes", "refreshes", "cpu_ms_mean", "cpu_ms_delta_median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="sweep")
    ap.add_argument("--refs", default=None, metavar="FILE",
                    help="keep the dense reference in FILE too (see dense_results), for runs while the library changes")
    args = ap.parse_args()
    for spec in args.configs:
        parse_config(spec)  # every configuration checked before the first long pass
    torch.set_num_threads(args.threads)
    from deltacnn.tasks.yolov8 import YOLOv8Task

    task = YOLOv8Task()
    model = task.load_model().eval()
    xs = load_frames(args.start, args.frames, task)
    refs = dense_results(model, task, xs, args.start, args.refs)
    env = environment()
    print(f"YOLOv8n, vtest.avi frames {args.start}..{args.start + args.frames - 1} {tuple(xs[0].shape[2:])}, "
          f"{args.threads} thread(s), cpu backend, CPU clock, commit {env['commit']}", flush=True)
    rows = []
    for spec in args.configs:
        t0 = time.time()
        row = run_config(model, task, xs, refs, spec)
        rows.append(row)
        print(f"{spec:40s} MACs {row['macs']:.1%} (emitted {row['macs_emitted']:.1%}) input {row['input_rate']:.2%} "
              f"F1 {row['f1']:.3f} f1_stable {row['f1_stable']:.3f} halves {row['f1_first_half']:.3f}/"
              f"{row['f1_second_half']:.3f} kf {row['keyframes']} flushes {row['flushes']} refreshes {row['refreshes']} "
              f"(delta-frame MACs {row['macs_delta_frames']:.1%}) cpu {row['cpu_ms_mean']:.0f} ms "
              f"(delta median {row['cpu_ms_delta_median']:.0f}) strides "
              + " ".join(f"{k}:{v:.0%}" for k, v in row["layer_rate_by_stride"].items())
              + f"  [{time.time() - t0:.0f} s]", flush=True)
        path = write_json(f"noise_options_{args.tag}", {"env": env, "start": args.start, "frames": args.frames,
                                                         "threads": args.threads, "clock": "process CPU",
                                                         "rows": rows})
    print()
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS))
    for r in rows:
        print("| " + " | ".join(_fmt(r[c]) for c in COLS) + " |")
    print(f"\nwrote {path}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.0f}"
    return str(v)


if __name__ == "__main__":
    main()
