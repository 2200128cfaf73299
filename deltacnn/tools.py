"""The Python API behind the `deltacnn` command line: run a clip, tune thresholds, benchmark.

    from deltacnn import tools
    res = tools.run("clip.mp4", model="centerface", threshold=0.02, check_dense=True, out="out/")
    tun = tools.tune("clip.mp4", budget="f1>=0.95", out="thresholds.json")
    rows = tools.bench("clip.mp4", thresholds=[0.0, 0.02])

A *task* adapts a model to video: it loads the network, turns an RGB frame into the model input,
decodes and draws the output, and scores a delta result against the dense one (`Task` below).
Tasks come from `deltacnn.pretrained` (real weights), from the architecture zoo
(`deltacnn.models`, random weights: useful for timing, not for results) or `register_task`.

Mistakes a user can make (missing files, unknown names, bad threshold files) raise `UserError`
with a one-line message; the CLI prints it as `deltacnn: error: ...` and exits with status 2.
"""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import viz
from .convert import ConversionError, UnsupportedOperationError, convert
from .model import DeltaModel
from .video import VideoError, VideoReader, VideoWriter, read_frames

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# metric names that mean "lower is better" when a budget does not say (e.g. `--budget 0.95`)
_LOWER_BETTER = re.compile(r"err|dist|abs|diff|loss|rmse|mae|mse|px|drift", re.I)


class UserError(Exception):
    """A problem with the user's input (file, name, option); reported in one line, no traceback."""


class Task(Protocol):
    """How deltacnn drives a model on video (the protocol of `deltacnn.pretrained` tasks)."""

    name: str

    def load_model(self) -> nn.Module: ...

    def preprocess(self, frame_rgb: np.ndarray) -> Tensor: ...  # HxWx3 uint8 -> (1, 3, h, w) float

    def postprocess(self, output) -> Any: ...

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray: ...

    def agreement(self, result, reference) -> dict[str, float]: ...  # task metric vs dense result


# ---- tasks ---------------------------------------------------------------------------------------
class ZooTask:
    """A zoo architecture with random weights (seeded): for timing and update rates, not for results.

    Input: the frame scaled to [0, 1] and ImageNet-normalised. Agreement: relative L2 error of the
    raw output versus dense, and, for class-like outputs, agreement of the arg-max.
    """

    budget_metric = "rel_error"

    def __init__(self, arch: str) -> None:
        self.name = arch

    def load_model(self) -> nn.Module:
        from .models import build, randomize_bn_

        torch.manual_seed(0)
        return randomize_bn_(build(self.name)).eval()

    def preprocess(self, frame_rgb: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frame_rgb)).permute(2, 0, 1)[None].float() / 255.0
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return (x - mean) / std

    def postprocess(self, output) -> Tensor:
        return _flat_output(output)

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray:
        return frame_rgb

    def agreement(self, result: Tensor, reference: Tensor) -> dict[str, float]:
        return {"rel_error": _rel_error(result, reference)}


_REGISTRY: dict[str, Callable[[], Task]] = {}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make `factory()` available as `--model name` (e.g. your own task, or a test's)."""
    _REGISTRY[name] = factory


def _pretrained():
    try:
        from . import pretrained
    except ImportError as e:  # its optional dependencies are missing
        raise UserError(f"the pretrained tasks are unavailable: {e}") from None
    return pretrained


def available_models() -> list[str]:
    """Names `--model` accepts: registered tasks, pretrained tasks, then zoo architectures."""
    from .models import MODELS

    names = list(_REGISTRY)
    try:
        names += [n for n in _pretrained().TASKS if n not in names]
    except UserError:
        pass
    return names + [n for n in MODELS if n not in names]


def default_model() -> str:
    """The pretrained default task (the first of `pretrained.TASKS`)."""
    p = _pretrained()
    return getattr(p, "DEFAULT_TASK", None) or next(iter(p.TASKS))


def get_task(model: str | Task | None) -> Task:
    """Resolve `--model`: a Task object passes through; a name looks in the registry, the pretrained
    tasks, then the zoo (random weights)."""
    if model is None:
        model = default_model()
    if not isinstance(model, str):
        return model
    if model in _REGISTRY:
        return _REGISTRY[model]()
    try:
        p = _pretrained()
        if model in p.TASKS:
            return p.get_task(model)
    except UserError:
        pass
    from .models import MODELS

    if model in MODELS:
        return ZooTask(model)
    raise UserError(f"unknown model {model!r}; available: {', '.join(available_models())}")


def default_clip() -> Path:
    """The real static-camera clip of `deltacnn.pretrained` (raises UserError with the install hint)."""
    try:
        return Path(_pretrained().default_clip_path())
    except FileNotFoundError as e:
        raise UserError(f"no VIDEO given and the default clip is missing: {e}") from None


def load_model(task: Task, device: torch.device) -> nn.Module:
    """The task's dense model in eval mode on `device`; missing weights become a UserError."""
    try:
        model = task.load_model()
    except (FileNotFoundError, ImportError) as e:
        raise UserError(f"cannot load model {task.name!r}: {e}") from None
    return model.eval().to(device)


# ---- helpers -------------------------------------------------------------------------------------
def resolve_device(device: str | None) -> torch.device:
    """`None`/"auto": CUDA when available, else CPU; asking for a missing CUDA is a user error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available (torch "
                        f"{torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def open_video(path: str | Path | None, max_frames: int | None = None) -> VideoReader:
    """A validated reader; no path means the default clip."""
    try:
        return VideoReader(default_clip() if path is None else path, max_frames)
    except VideoError as e:
        raise UserError(str(e)) from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[Tensor], Any], x: Tensor, device: torch.device) -> tuple[Any, float]:
    """fn(x) and its wall time in ms (the device is synchronised on both sides)."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        y = fn(x)
    _sync(device)
    return y, (time.perf_counter() - t0) * 1e3


def _tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _flat_output(out) -> Tensor:
    ts = _tensors(out)
    return torch.cat([t.detach().float().reshape(-1).cpu() for t in ts]) if ts else torch.zeros(0)


def _to_float(out):
    """Outputs of a half-precision delta model as float32, so tasks decode them like dense ones."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_to_float(o) for o in out)
    if isinstance(out, list):
        return [_to_float(o) for o in out]
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


def _rel_error(a, b) -> float:
    """Relative L2 error of output `a` versus reference `b` (all output tensors together)."""
    fa, fb = _flat_output(a), _flat_output(b)
    if fa.shape != fb.shape:
        return float("nan")
    denom = float(fb.norm())
    return float((fa - fb).norm()) / denom if denom > 0 else float((fa - fb).norm())


def build_delta(model: nn.Module, example: Tensor, *, threshold: float = 0.0, input_threshold: float | None = None,
                thresholds: str | Path | None = None, dtype: torch.dtype | None = None,
                keyframe_interval: int | None = None,
                backend: str | None = None, dense_above: float | None = 0.5) -> DeltaModel:
    """Convert with conversion and threshold-file problems reported as UserErrors."""
    if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
        raise UserError(f"--threshold must be a finite number >= 0, got {threshold}")
    if input_threshold is not None and (not math.isfinite(input_threshold) or input_threshold < 0):
        raise UserError(f"--input-threshold must be a finite number >= 0, got {input_threshold}")
    if keyframe_interval is not None and keyframe_interval < 1:
        raise UserError(f"--keyframe-interval must be >= 1, got {keyframe_interval}")
    if dense_above is not None and not 0 <= dense_above <= 1:
        raise UserError(f"--dense-above must be a fraction in [0, 1], got {dense_above}")
    if thresholds is not None and not Path(thresholds).is_file():
        raise UserError(f"thresholds file not found: {thresholds}")
    if thresholds is not None and input_threshold is not None:
        raise UserError("give --input-threshold or --thresholds, not both (the file sets the input threshold)")
    try:
        dm = convert(model, example, threshold=threshold or 0.0, input_threshold=input_threshold, dtype=dtype,
                     keyframe_interval=keyframe_interval, backend=backend, dense_above=dense_above)
    except (ConversionError, UnsupportedOperationError) as e:
        raise UserError(f"cannot convert the model: {e}") from None
    if thresholds is not None:
        load_thresholds(dm, thresholds)
    return dm


def load_thresholds(dm: DeltaModel, path: str | Path) -> None:
    """dm.thresholds.load with every failure (JSON, format, unknown layer) as one UserError line."""
    try:
        dm.thresholds.load(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except KeyError as e:  # a layer this model does not have: wrong model or stale file
        msg = e.args[0] if e.args else str(e)
        raise UserError(f"{path}: {msg} (was it tuned for another model?)") from None
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise UserError(msg if str(path) in msg else f"{path}: {msg}") from None


def _progress(iterable: Iterable, total: int | None, desc: str, quiet: bool):
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="frame", leave=False, dynamic_ncols=True)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _json_safe(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


# ---- run -----------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """Per-frame records, the clip summary and the files written (None where not written)."""

    rows: list[dict]
    summary: dict
    paths: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        return summary_table(self.summary)


def frame_record(i: int, dm: DeltaModel, delta_ms: float, dense_ms: float) -> dict:
    """One row of frames.csv from the delta model's statistics of the frame just run."""
    fs = dm.frame_stats()
    inp = fs.layers.get("input")
    mask = dm.input_mask
    rate = inp.update_rate if inp is not None else (float(mask.float().mean()) if mask is not None else 1.0)
    rates = [s.update_rate for s in fs.layers.values() if s.dense_macs > 0]
    return {"frame": i, "keyframe": int(fs.keyframe), "mode": dm.last_mode or "", "update_rate": rate,
            "layer_update_rate": _mean(rates) if rates else rate,
            "macs_fraction": fs.macs_fraction if fs.dense_macs else 1.0, "macs": fs.macs, "dense_macs": fs.dense_macs,
            "delta_ms": delta_ms, "dense_ms": dense_ms,
            "speedup": dense_ms / delta_ms if delta_ms > 0 else float("nan")}


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
            f"{row['delta_ms']:.1f} ms (dense {row['dense_ms']:.1f} ms)"]


def run(video: str | Path | None = None, model: str | Task | None = None, *, threshold: float | None = None,
        input_threshold: float | None = None,
        thresholds: str | Path | None = None, device: str | None = None, out: str | Path | None = None,
        max_frames: int | None = None, dtype: str | torch.dtype | None = None, keyframe_interval: int | None = None,
        check_dense: bool = False, backend: str | None = None, quiet: bool = False,
        write_videos: bool = True, dense_above: float | None = 0.5) -> RunResult:
    """Run a clip through the delta model (and the dense model, for timing and error).

    Writes to `out` (default ./deltacnn_out/<clip stem>): annotated video, update heat-map video,
    frames.csv / frames.json (per frame: update rate, MACs versus dense, ms per frame, and with
    `check_dense` the error versus dense), summary.json and plot.png. With neither `threshold` nor
    `thresholds`, the task's tuned `default_thresholds` file is used if it ships one, else its
    `default_threshold` (0, i.e. dense-equivalent, if it has none). `dense_above`: see `convert`
    (frames busier than this run densely; on the CPU only, where the decision may wait for data).
    """
    reader = open_video(video, max_frames)
    task = get_task(model)
    if threshold is None and thresholds is None and getattr(task, "default_thresholds", None) is not None:
        thresholds = task.default_thresholds  # a tuned file shipped with the task
    if threshold is None:
        threshold = 0.0 if thresholds is not None else float(getattr(task, "default_threshold", 0.0))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if thresholds is not None and not Path(thresholds).is_file():
        raise UserError(f"thresholds file not found: {thresholds}")
    dense = load_model(task, dev)
    outdir = Path(out) if out is not None else Path("deltacnn_out") / reader.path.stem
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {outdir}: {e.strerror}") from None

    annotated = VideoWriter(outdir / "annotated.mp4", reader.fps) if write_videos else None
    updates = VideoWriter(outdir / "updates.mp4", reader.fps) if write_videos else None
    rows: list[dict] = []
    metric_keys: list[str] = []
    dm: DeltaModel | None = None
    try:
        for i, frame in enumerate(_progress(reader, reader.expected_frames, "deltacnn run", quiet)):
            x = task.preprocess(frame).to(dev)
            if dm is None:
                dm = build_delta(dense, x, threshold=threshold, input_threshold=input_threshold,
                                 thresholds=thresholds, dtype=torch_dtype,
                                 keyframe_interval=keyframe_interval, backend=backend, dense_above=dense_above)
                dm.enable_stats(True, keep_masks=write_videos)
                _timed(dense, x, dev)  # warm-up: the first dense call pays one-off allocation costs
            out_delta, delta_ms = _timed(dm, x, dev)
            out_dense, dense_ms = _timed(dense, x, dev)
            row = frame_record(i, dm, delta_ms, dense_ms)
            result = task.postprocess(_to_float(out_delta))
            if check_dense:
                row["rel_error"] = _rel_error(out_delta, out_dense)
                ref = task.postprocess(out_dense)
                metrics = {f"task_{k}": float(v) for k, v in task.agreement(result, ref).items()}
                metric_keys += [k for k in metrics if k not in metric_keys]
                row.update(metrics)
            if write_videos:
                annotated.write(viz.put_text(task.draw(frame, result), _hud(row)))
                heat = spatial_heatmap(dm, frame.shape[:2])
                updates.write(viz.put_text(viz.heatmap_overlay(frame, heat), _hud(row)))
            rows.append(row)
    finally:
        for w in (annotated, updates):
            if w is not None:
                w.close()

    if dm is not None and thresholds is None:
        threshold = threshold if dm.thresholds.input is None else {"default": threshold, "input": dm.thresholds.input}
    summary = summarize(rows, task=task, device=dev, video=reader.path, threshold=threshold, thresholds=thresholds,
                        dtype=str(torch_dtype or torch.float32).replace("torch.", ""), metric_keys=metric_keys)
    if dm is not None:
        summary["backend"] = dm.rt.backend_on(dev).name
    paths = write_run_outputs(outdir, rows, summary, metric_keys, title=f"{task.name} on {reader.path.name}")
    if write_videos:
        paths = {"annotated": annotated.path, "updates": updates.path, **paths}
    return RunResult(rows, summary, paths)


def summarize(rows: list[dict], *, task: Task, device: torch.device, video: Path, threshold: float | dict,
              thresholds: str | Path | None, dtype: str, metric_keys: Sequence[str]) -> dict:
    """Clip averages. Rates and errors are means over all frames (keyframes included); the speedup is
    total dense time over total delta time, i.e. the throughput ratio."""
    dense_ms = sum(r["dense_ms"] for r in rows)
    delta_ms = sum(r["delta_ms"] for r in rows)
    s = {"model": task.name, "video": str(video), "frames": len(rows), "device": str(device), "dtype": dtype,
         "threshold": threshold, "thresholds_file": str(thresholds) if thresholds else None,
         "keyframes": sum(r["keyframe"] for r in rows),
         "modes": {m: sum(r.get("mode") == m for r in rows) for m in ("delta", "keyframe", "dense")},
         "mean_update_rate": _mean([r["update_rate"] for r in rows]),
         "mean_layer_update_rate": _mean([r["layer_update_rate"] for r in rows]),
         "macs_fraction": sum(r["macs"] for r in rows) / max(1, sum(r["dense_macs"] for r in rows)),
         "mean_delta_ms": delta_ms / len(rows), "mean_dense_ms": dense_ms / len(rows),
         "median_delta_ms": _median([r["delta_ms"] for r in rows]),
         "median_dense_ms": _median([r["dense_ms"] for r in rows]),
         "speedup": dense_ms / delta_ms if delta_ms > 0 else float("nan")}
    s["macs_saved"] = 1.0 - s["macs_fraction"]
    if rows and "rel_error" in rows[0]:
        s["mean_rel_error"] = _mean([r["rel_error"] for r in rows])
        s["max_rel_error"] = max((r["rel_error"] for r in rows), default=float("nan"))
        s["agreement"] = {k[len("task_"):]: _mean([r.get(k, float("nan")) for r in rows]) for k in metric_keys}
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
    json_path.write_text(json.dumps(_json_safe(rows), indent=1) + "\n")
    summary_path = outdir / "summary.json"
    summary_path.write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    # task metrics for the plot: agreement-like ones (errors are already the left axis)
    main_metric = [k for k in metric_keys if not k.startswith("task_n") and not _LOWER_BETTER.search(k)][:2]
    plot_path = viz.plot_run(rows, outdir / "plot.png", title=title,
                             error_key="rel_error" if "rel_error" in keys else None, agreement_keys=main_metric)
    return {"frames_csv": csv_path, "frames_json": json_path, "summary": summary_path, "plot": plot_path}


def summary_table(s: dict) -> str:
    """The few numbers a user wants after a run, as aligned text."""
    th = s["threshold"]
    th = (f"thresholds {s['thresholds_file']}" if s["thresholds_file"] else
          f"threshold {th['default']:g} (input {th['input']:g})" if isinstance(th, dict) else f"threshold {th:g}")
    backend = f", {s['backend']} backend" if s.get("backend") else ""
    lines = [f"{s['model']} on {Path(s['video']).name}: {s['frames']} frames, {s['device']}{backend}, {s['dtype']}, {th}",
             f"  mean input update rate   {s['mean_update_rate']:8.1%}   (layers: {s['mean_layer_update_rate']:.1%})",
             f"  multiply-adds saved      {s['macs_saved']:8.1%}",
             f"  ms/frame dense / delta   {s['mean_dense_ms']:8.1f} / {s['mean_delta_ms']:.1f}",
             f"  speedup                  {s['speedup']:8.2f}x"]
    modes = s.get("modes") or {}
    if modes.get("dense"):
        # busy frames ran as dense passes of the converted model (channels_last, BN folded): say so,
        # since their speed is not a delta speedup
        lines.append(f"  frames delta/key/dense   {modes['delta']:5d} / {modes['keyframe']} / {modes['dense']}"
                     "   (dense: too busy for deltas, run densely)")
    if "mean_rel_error" in s:
        lines.append(f"  rel. error vs dense      {s['mean_rel_error']:8.2e}   (max {s['max_rel_error']:.2e})")
        agree = ", ".join(f"{k} {v:.3g}" for k, v in s["agreement"].items() if not k.startswith("n"))
        if agree:
            lines.append(f"  task agreement vs dense  {agree}")
    else:
        lines.append("  error vs dense           not measured (use --check-dense)")
    return "\n".join(lines)


# ---- tune ----------------------------------------------------------------------------------------
@dataclass
class Budget:
    """`metric op value`: how close to dense the task output must stay (aggregated over the clip)."""

    metric: str | None  # None: the task's `budget_metric`, else the first metric `agreement` returns
    op: str  # ">=" or "<=" (None-metric budgets resolve the op from the metric name)
    value: float
    aggregate: str = "mean"  # "mean" or "worst" over the calibration frames

    def resolve(self, metrics: dict[str, float], task: Task) -> Budget:
        name = self.metric or getattr(task, "budget_metric", None) or next(iter(metrics), None)
        if name not in metrics:
            raise UserError(f"budget metric {name!r} is not reported by task {task.name!r}; "
                            f"available: {', '.join(metrics)}")
        op = self.op or ("<=" if _LOWER_BETTER.search(name) else ">=")
        return Budget(name, op, self.value, self.aggregate)

    def score(self, per_frame: Sequence[dict[str, float]]) -> float:
        vals = [float(m[self.metric]) for m in per_frame]
        if self.aggregate == "mean":
            return _mean(vals)
        return min(vals) if self.op == ">=" else max(vals)

    def holds(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        return score >= self.value if self.op == ">=" else score <= self.value

    def __str__(self) -> str:
        return f"{self.aggregate} {self.metric} {self.op} {self.value:g}"


def parse_budget(spec: str | float, aggregate: str = "mean") -> Budget:
    """'0.95' (the task's main metric, direction from its name), 'f1>=0.95' or 'rel_error<=0.01'."""
    if aggregate not in ("mean", "worst"):
        raise UserError(f"budget aggregate must be mean or worst, got {aggregate!r}")
    if isinstance(spec, (int, float)):
        return Budget(None, "", float(spec), aggregate)
    m = re.fullmatch(r"\s*(?:([A-Za-z_][\w.]*)\s*(>=|<=)\s*)?([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", spec)
    if not m:
        raise UserError(f"cannot parse --budget {spec!r}; use a number (e.g. 0.95) or METRIC>=VALUE / METRIC<=VALUE "
                        "(e.g. f1>=0.95, rel_error<=0.01)")
    return Budget(m.group(1), m.group(2) or "", float(m.group(3)), aggregate)


def controlled_macs(dm: DeltaModel, dense_stats) -> dict[str, int]:
    """Dense multiply-adds downstream of each thresholded layer, up to the next thresholded one.

    A layer's threshold decides which pixels its consumers must recompute, so this is the work
    raising that threshold can save; tune tries the biggest levers first.
    """
    known = set(dm.thresholds.known)
    gm = dm.graph_module
    mods = dict(gm.named_modules())

    def tname(node) -> str | None:
        m = mods.get(node.target) if node.op == "call_module" else None
        if m is None:
            return None
        act = getattr(m, "act_name", None)
        return act if act is not None and getattr(m, "act", True) is not None else getattr(m, "name", None)

    out = {name: 0 for name in known}
    for node in gm.graph.nodes:
        t = tname(node)
        if t not in known:
            continue
        seen, stack = set(), list(node.users)
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            m = mods.get(u.target) if u.op == "call_module" else None
            s = dense_stats.layers.get(getattr(m, "name", None)) if m is not None else None
            if s is not None:
                out[t] += s.dense_macs
            if tname(u) in known:
                continue
            stack.extend(u.users)
    return out


@dataclass
class TuneResult:
    """Tuned thresholds (saved at `path`), the budget, and what they achieve on the calibration clip."""

    path: Path | None
    thresholds: dict
    budget: Budget
    score: float
    macs_fraction: float
    dense_macs_fraction: float  # at threshold 0 (the exact delta model)
    global_threshold: float
    evals: int
    history: list[dict]

    def table(self) -> str:
        n = len(self.thresholds["layers"])
        return "\n".join([
            f"budget {self.budget}: achieved {self.budget.metric} = {self.score:.4g} on the calibration clip",
            f"  global threshold         {self.global_threshold:.4g}   (+ {n} per-layer overrides)",
            f"  multiply-adds vs dense   {self.macs_fraction:8.1%}   (threshold 0: {self.dense_macs_fraction:.1%})",
            f"  evaluations              {self.evals}",
        ] + ([f"  thresholds written to    {self.path}"] if self.path else []))


class _Evaluator:
    """Plays the calibration frames through the delta model under given thresholds.

    Returns the budget score against the dense results and the MACs fraction over the non-keyframes
    (the steady state thresholds act on).
    """

    def __init__(self, dm: DeltaModel, task: Task, xs: list[Tensor], refs: list[Any], budget: Budget) -> None:
        self.dm, self.task, self.xs, self.refs, self.budget = dm, task, xs, refs, budget
        self.evals = 0
        self._resolved = False

    def __call__(self, default: float, overrides: dict[str, float], input_tau: float | None = None):
        th = self.dm.thresholds
        th.default, th.input, th.overrides = default, input_tau, dict(overrides)
        self.dm.reset()
        metrics, macs, dense = [], 0, 0
        for i, x in enumerate(self.xs):
            y = self.dm(x)
            fs = self.dm.frame_stats()
            if not fs.keyframe:
                macs, dense = macs + fs.macs, dense + fs.dense_macs
            metrics.append(self.task.agreement(self.task.postprocess(_to_float(y)), self.refs[i]))
        self.evals += 1
        if not self._resolved:  # the metric names are known after the first pass
            self.budget, self._resolved = self.budget.resolve(metrics[0], self.task), True
        return self.budget.score(metrics), (macs / dense if dense else 1.0)


def tune(video: str | Path | None = None, model: str | Task | None = None, *, budget: str | float | Budget = 0.95,
         aggregate: str = "mean", frames: int = 30, max_evals: int = 40, device: str | None = None,
         dtype: str | torch.dtype | None = None, keyframe_interval: int | None = None, backend: str | None = None,
         out: str | Path | None = None, start: float = 1e-3, quiet: bool = False) -> TuneResult:
    """Find per-layer thresholds that keep the task output within `budget` of dense, skipping most work.

    Search (bounded by `max_evals` passes over `frames` calibration frames):
      1. one global threshold: grow it x4 from `start` until the budget breaks, then bisect
         geometrically between the last pass and the first failure;
      2. per layer, largest lever first (dense MACs downstream of the layer): double its threshold
         while the budget still holds and the multiply-adds do not grow.
    Writes the thresholds JSON (dm.thresholds.save) to `out` if given.
    """
    if frames < 2:
        raise UserError(f"--frames must be >= 2 (the first frame is a dense keyframe), got {frames}")
    if max_evals < 2:
        raise UserError(f"--max-evals must be >= 2, got {max_evals}")
    if not start > 0:
        raise UserError(f"start threshold must be > 0, got {start}")
    b = budget if isinstance(budget, Budget) else parse_budget(budget, aggregate)
    reader = open_video(video, frames)
    task = get_task(model)
    dev = resolve_device(device)
    dense = load_model(task, dev)
    raw = list(reader)
    if len(raw) < 2:
        raise UserError(f"calibration clip {reader.path} has only {len(raw)} frame(s); tune needs at least 2")
    xs, refs = [], []
    with torch.no_grad():
        for f in raw:
            x = task.preprocess(f).to(dev)
            xs.append(x)
            refs.append(task.postprocess(dense(x)))
    dm = build_delta(dense, xs[0], dtype=resolve_dtype(dtype), keyframe_interval=keyframe_interval, backend=backend)
    dm.enable_stats(True)
    ev = _Evaluator(dm, task, xs, refs, b)
    bar = None if quiet else __import__("tqdm").tqdm(total=max_evals, desc="deltacnn tune", unit="eval", leave=False,
                                                      dynamic_ncols=True)
    history: list[dict] = []

    def evaluate(stage: str, default: float, overrides: dict[str, float]) -> tuple[bool, float, float]:
        score, macs = ev(default, overrides)
        ok = ev.budget.holds(score)
        history.append({"stage": stage, "default": default, "overrides": dict(overrides), "score": score,
                        "macs_fraction": macs, "ok": ok})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{stage} {ev.budget.metric}={score:.4g} MACs={macs:.1%}")
        return ok, score, macs

    try:
        ok0, score0, macs0 = evaluate("exact", 0.0, {})
        if not ok0:
            raise UserError(f"budget {ev.budget} is not met even at threshold 0 (dense-equivalent output: "
                            f"{ev.budget.metric} = {score0:.4g}); loosen the budget")
        best = (0.0, {}, score0, macs0)
        # 1. global threshold: bracket, then geometric bisection
        lo, hi, tau = 0.0, None, start
        while ev.evals < max_evals and tau <= 1e3:
            ok, score, macs = evaluate("global", tau, {})
            if not ok:
                hi = tau
                break
            lo, best = tau, (tau, {}, score, macs)
            if macs == 0:  # nothing left to skip
                break
            tau *= 4
        budget_global = max(ev.evals + 1, int(max_evals * 0.4))  # keep most of the evaluations for stage 2
        while hi is not None and ev.evals < min(budget_global, max_evals):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
            if lo > 0 and hi / lo < 1.25:
                break
            ok, score, macs = evaluate("global", mid, {})
            if ok:
                lo, best = mid, (mid, {}, score, macs)
            else:
                hi = mid
        g = best[0]
        # 2. per-layer greedy raising, biggest lever first
        levers = controlled_macs(dm, _first_delta_stats(dm, xs))
        order = sorted((n for n in levers if levers[n] > 0), key=lambda n: -levers[n])
        overrides: dict[str, float] = {}
        for name in order:
            for _ in range(4):
                if ev.evals >= max_evals or best[3] == 0:
                    break
                cur = overrides.get(name, g)
                trial = {**overrides, name: max(cur * 2, start)}
                ok, score, macs = evaluate(f"layer {name}", g, trial)
                if ok and macs <= best[3]:
                    overrides, best = trial, (g, trial, score, macs)
                else:
                    break
            if ev.evals >= max_evals:
                break
    finally:
        if bar is not None:
            bar.close()
    g, overrides, score, macs = best
    dm.thresholds.default, dm.thresholds.input, dm.thresholds.overrides = g, None, dict(overrides)
    path = Path(out) if out is not None else None
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            dm.thresholds.save(path)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
    return TuneResult(path, dm.thresholds.to_dict(), ev.budget, score, macs, macs0, g, ev.evals, history)


def _first_delta_stats(dm: DeltaModel, xs: list[Tensor]):
    """Statistics of a dense keyframe (every layer at full work): the dense MACs of each layer."""
    dm.reset()
    dm(xs[0])
    return dm.frame_stats()


# ---- bench ---------------------------------------------------------------------------------------
def bench(video: str | Path | None = None, model: str | Task | None = None, *,
          thresholds: Sequence[float | str | Path] = (0.0,), frames: int = 30, warmup: int = 3,
          device: str | None = None, dtype: str | torch.dtype | None = None, backend: str | None = None,
          quiet: bool = False) -> list[dict]:
    """Median time per frame of the dense model and of the delta model (one row per threshold setting).

    Each entry of `thresholds` is a global threshold or a thresholds JSON file. Delta frames are
    timed without statistics; update rate and MACs come from a second, untimed pass. The dense
    keyframe is excluded from the delta median (it is steady-state cost that matters on video).
    """
    if frames < 2:
        raise UserError(f"--frames must be >= 2, got {frames}")
    reader = open_video(video, frames)
    task = get_task(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    dense = load_model(task, dev)
    xs = [task.preprocess(f).to(dev) for f in _progress(reader, reader.expected_frames, "decoding", quiet)]
    for x in xs[:warmup]:
        _timed(dense, x, dev)
    dense_ms = [_timed(dense, x, dev)[1] for x in _progress(xs, len(xs), "dense", quiet)]
    rows = []
    for spec in thresholds:
        tau, tfile = (float(spec), None) if _is_number(spec) else (0.0, Path(spec))
        dm = build_delta(dense, xs[0], threshold=tau, thresholds=tfile, dtype=torch_dtype, backend=backend)
        for x in xs[:max(warmup, 2)]:  # warm-up includes one sparse frame
            dm(x)
        dm.reset()
        delta_ms = [_timed(dm, x, dev)[1] for x in _progress(xs, len(xs), f"delta {spec}", quiet)]
        dm.enable_stats(True)
        dm.reset()
        recs = []
        for x in xs:
            dm(x)
            fs = dm.frame_stats()
            if not fs.keyframe:
                recs.append((fs.layers["input"].update_rate if "input" in fs.layers else float("nan"),
                             fs.macs, fs.dense_macs))
        d, t = _median(dense_ms), _median(delta_ms[1:])
        rows.append({"model": task.name, "device": str(dev), "dtype": str(torch_dtype or torch.float32)[6:],
                     "backend": dm.rt.backend_for(xs[0]).name,
                     "input": "x".join(str(s) for s in xs[0].shape[-2:][::-1]), "frames": len(xs),
                     "threshold": str(spec), "dense_ms": d, "delta_ms": t, "speedup": d / t if t > 0 else float("nan"),
                     "update_rate": _mean([r[0] for r in recs]),
                     "macs_fraction": sum(r[1] for r in recs) / max(1, sum(r[2] for r in recs))})
    return rows


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def bench_table(rows: list[dict]) -> str:
    """The benchmark as an aligned text table."""
    if not rows:
        return "(no results)"
    r0 = rows[0]
    head = (f"{r0['model']} on {r0['device']} ({r0['dtype']}, {r0['backend']} backend), input {r0['input']}, "
            f"{r0['frames']} frames; "
            "median ms per frame (delta: non-keyframes)")
    cols = f"{'threshold':>16} {'dense ms':>9} {'delta ms':>9} {'speedup':>8} {'input upd.':>10} {'MACs':>7}"
    lines = [head, cols]
    for r in rows:
        th = r["threshold"] if len(r["threshold"]) <= 16 else "..." + r["threshold"][-13:]
        lines.append(f"{th:>16} {r['dense_ms']:9.2f} {r['delta_ms']:9.2f} {r['speedup']:7.2f}x "
                     f"{r['update_rate']:10.1%} {r['macs_fraction']:7.1%}")
    return "\n".join(lines)


def save_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(obj), indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    return path


__all__ = ["UserError", "Task", "ZooTask", "register_task", "available_models", "get_task", "run", "tune", "bench",
           "RunResult", "TuneResult", "Budget", "parse_budget", "summary_table", "bench_table", "controlled_macs",
           "read_frames"]
