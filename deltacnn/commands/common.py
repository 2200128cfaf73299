"""What the commands share: user errors, task and device resolution, video opening, timing, conversion.

Mistakes a user can make (missing files, unknown names, bad threshold files) raise `UserError`
with a one-line message; the CLI prints it as `deltacnn: error: ...` and exits with status 2.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import tasks
from ..clips import default_clip_path
from ..convert import ConversionError, UnsupportedOperationError, convert
from ..gating import Refresh
from ..layer_refresh import LayerRefresh
from ..layers import Sparsify
from ..model import DeltaModel
from ..tasks.base import Task
from ..tasks.zoo import ZooTask
from ..thresholds import INPUT
from ..timing import sync as sync_device, timed  # noqa: F401 - re-exported for the commands
from ..video import FrameSource, VideoError, open_source

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UserError(Exception):
    """A problem with the user's input (file, name, option); reported in one line, no traceback."""


# ---- tasks ---------------------------------------------------------------------------------------
def available_models() -> list[str]:
    """Names `--model` accepts: the registered tasks (pretrained ones first), then zoo architectures."""
    from ..models import MODELS

    names = list(tasks.TASKS)
    return names + [n for n in MODELS if n not in names]


def default_model() -> str:
    """The default task's name (`tasks.DEFAULT_TASK`)."""
    return tasks.DEFAULT_TASK


def get_task(model: str | Task | None) -> Task:
    """Resolve `--model`: a Task object passes through; a name looks in the task registry, then the
    zoo (random weights)."""
    if model is None:
        model = default_model()
    if not isinstance(model, str):
        return model
    if model in tasks.TASKS:
        return tasks.get_task(model)
    from ..models import MODELS

    if model in MODELS:
        return ZooTask(model)
    raise UserError(f"unknown model {model!r}; available: {', '.join(available_models())}")


def default_clip() -> Path:
    """The real static-camera clip of `deltacnn.clips` (raises UserError with the install hint)."""
    try:
        return Path(default_clip_path())
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


def open_video(source: str | int | Path | None, max_frames: int | None = None, reader: str = "auto",
               timeout_s: float = 10.0) -> FrameSource:
    """A validated frame source (video file, image folder, camera index, stream URL); None means the
    default clip. Every problem with it is a UserError."""
    try:
        return open_source(default_clip() if source is None else source, max_frames, reader=reader,
                           timeout_s=timeout_s)
    except VideoError as e:
        raise UserError(str(e)) from None


def build_delta(model: nn.Module, example: Tensor, *, threshold: float = 0.0, input_threshold: float | None = None,
                thresholds: str | Path | None = None, dtype: torch.dtype | None = None,
                keyframe_interval: int | None = None,
                backend: str | None = None, dense_above: float | None = 0.5, min_blob: int = 1,
                input_gate=None, threshold_growth: float = 0.0, refresh_held: float | None = None,
                refresh: str | None = None, refresh_drift: float | None = None,
                refresh_layers: str | None = None) -> DeltaModel:
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
    if min_blob < 1 or min_blob % 2 == 0:
        raise UserError(f"--min-blob must be an odd window size >= 1 (1: off), got {min_blob}")
    if refresh_held is not None and not 0 <= refresh_held <= 1:
        raise UserError(f"--refresh-held must be a fraction in [0, 1], got {refresh_held}")
    if not math.isfinite(threshold_growth) or threshold_growth < 0:
        raise UserError(f"--threshold-growth must be a finite number >= 0, got {threshold_growth}")
    if thresholds is not None and input_threshold is not None:
        raise UserError("give --input-threshold or --thresholds, not both (the file sets the input threshold)")
    try:
        Refresh.parse(refresh)
    except (TypeError, ValueError) as e:
        raise UserError(f"--refresh: {e}") from None
    if refresh_drift is not None and not (math.isfinite(refresh_drift) and refresh_drift >= 0):
        raise UserError(f"--refresh-drift must be a finite number >= 0, got {refresh_drift}")
    off_layers = refresh_layers == "off"  # asked for: no layer refresh, whatever the file says
    try:
        LayerRefresh.parse(refresh_layers)
    except (TypeError, ValueError) as e:
        raise UserError(f"--refresh-layers: {e}") from None
    try:
        dm = convert(model, example, threshold=threshold or 0.0, input_threshold=input_threshold, dtype=dtype,
                     keyframe_interval=keyframe_interval, backend=backend, dense_above=dense_above,
                     min_blob=min_blob, input_gate=input_gate, threshold_growth=threshold_growth,
                     refresh_held=refresh_held, refresh=refresh, refresh_drift=refresh_drift,
                     refresh_layers=None if off_layers else refresh_layers)
    except (ConversionError, UnsupportedOperationError) as e:
        raise UserError(f"cannot convert the model: {e}") from None
    if thresholds is not None:
        load_thresholds(dm, thresholds, refresh_given=refresh is not None,
                        layers_given=refresh_layers is not None, drift_given=refresh_drift is not None)
        if keyframe_interval is None and dm.thresholds.keyframe_interval is not None:  # the file's interval
            dm.keyframe_interval = dm.thresholds.keyframe_interval
        th = dm.thresholds
        if threshold_growth and th.growth not in (0.0, threshold_growth):
            raise UserError(f"--threshold-growth {threshold_growth} and the growth {th.growth} of {thresholds} disagree; "
                            "give one")
        th.growth = threshold_growth or th.growth
    return dm


def load_thresholds(dm: DeltaModel, path: str | Path, refresh_given: bool = False, layers_given: bool = False,
                    drift_given: bool = False) -> None:
    """dm.thresholds.load with every failure (JSON, format, unknown layer) as one UserError line; the file's
    refresh rules (refresh_held, refresh, refresh_drift, refresh_layers) apply unless one was asked for."""
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
    if dm.thresholds.refresh_held is not None and dm.rt.refresh_held is None:  # the file's refresh rule
        dm.rt.refresh_held = dm.thresholds.refresh_held
    if dm.thresholds.refresh is not None and not refresh_given:
        dm.rt.refresh = Refresh.parse(dm.thresholds.refresh)
    if dm.thresholds.refresh_drift is not None and not drift_given:
        dm.rt.refresh_drift = dm.thresholds.refresh_drift
    if dm.thresholds.refresh_layers is not None and not layers_given:
        dm.rt.layer_refresh = LayerRefresh.parse(dm.thresholds.refresh_layers)
    if dm.thresholds.min_blob is not None:  # the input gate the file was tuned with
        for m in dm.graph_module.modules():
            if isinstance(m, Sparsify) and m.name == INPUT:
                m.min_blob = dm.thresholds.min_blob


def progress(iterable: Iterable, total: int | None, desc: str, quiet: bool):
    """A tqdm progress bar; without a total (live sources) it shows the count and frames per second."""
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="frame", leave=False, dynamic_ncols=True)


def json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return json_safe(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def finite_mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def finite_median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def save_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(obj), indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    return path


