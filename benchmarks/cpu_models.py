"""Frames of the real-footage CPU benchmark (cpu_real.py); the models come from deltacnn.tasks."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def load_frames(count: int, scale_01: bool, start: int = 0) -> list[Tensor]:
    """`count` frames of vtest.avi from frame `start` as (1, 3, 576, 768) float tensors, in 0-1 or 0-255."""
    from deltacnn.clips import read_frames
    out = []
    for f in read_frames(max_frames=count, start=start):
        x = torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float()
        out.append((x / 255.0 if scale_01 else x).contiguous())
    return out


def convert_at(model, frame: Tensor, point: str, min_blob: int = 1, backend: str | None = None):
    """The delta model at threshold point "<input>/<layers>" (absolute units) or "r<input>/<layers>"
    (relative: deltacnn.calibration's scales measured on `frame`, the input a fraction of its range),
    every frame after the first a delta frame (dense_above off)."""
    import deltacnn
    relative = point.startswith("r")
    tau_in, tau = (float(v) for v in point.lstrip("r").split("/"))
    dm = deltacnn.convert(model, frame, threshold=0.0 if relative else tau, input_threshold=0.0 if relative else tau_in,
                          dense_above=None, min_blob=min_blob, backend=backend)
    if relative:
        from deltacnn.calibration import measure_scales
        measure_scales(dm, frame)
        dm.thresholds.default, dm.thresholds.input = tau, tau_in
    return dm
