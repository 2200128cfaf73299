"""Scales that make thresholds relative: each thresholded layer's typical activation, measured on a keyframe.

A threshold of 0.05 on a layer whose outputs are ~20 means little; on one whose outputs are ~0.1 it
drops half the signal. Expressing thresholds as fractions of each layer's own scale (and the input
threshold as a fraction of the frame's value range) gives one number the same meaning at every depth,
across models and across input scalings, so a tuned file and a global default both carry over.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .activations import truncation_score
from .layers import DeltaActivation, DeltaConv2d, DeltaLayer, DeltaMaxPool2d, DeltaMul, Sparsify
from .model import DeltaModel
from .tensor import DeltaTensor
from .thresholds import INPUT


def threshold_name(m: DeltaLayer) -> str | None:
    """The thresholds key a delta layer truncates with (None: the layer has no threshold)."""
    if isinstance(m, DeltaConv2d):
        return m.act_name if m.act is not None else None
    if isinstance(m, (DeltaActivation, DeltaMaxPool2d, DeltaMul, Sparsify)):
        return m.name
    return None


def _scale_of(out: Any, score: str) -> float | None:
    v = out.values if isinstance(out, DeltaTensor) else out
    if not isinstance(v, Tensor) or v.dim() != 4 or not v.is_floating_point():
        return None
    return float(truncation_score(v.float(), score).mean())


def measure_scales(dm: DeltaModel, frame: Tensor, *, relative: bool = True) -> dict[str, float]:
    """Run `frame` as a keyframe and record every thresholded layer's scale (see the module docstring).

    The input's scale is the frame's value range (max - min). Layers whose outputs are all zero on
    this frame get scale 1, so a relative threshold there acts like an absolute one. With `relative`,
    the model's thresholds switch to relative units with these scales. The delta state is reset
    (the next frame is a keyframe).
    """
    score = dm.thresholds.score
    scales: dict[str, float] = {}
    hooks = []
    for m in dm.graph_module.modules():
        name = threshold_name(m) if isinstance(m, DeltaLayer) else None
        if name is None:
            continue

        def hook(mod, args, out, name=name):
            # a sparsify (the input, or a re-entry after a dense island) is scaled by what it receives
            s = _scale_of(args[0] if isinstance(mod, Sparsify) else out, score)
            if s is not None:
                scales[name] = max(scales.get(name, 0.0), s)

        hooks.append(m.register_forward_hook(hook))
    try:
        dm.reset()
        with torch.no_grad():
            dm(frame)
    finally:
        for h in hooks:
            h.remove()
        dm.reset()
    f = frame.float()
    scales[INPUT] = float(f.max() - f.min())
    scales = {k: (v if v > 0 else 1.0) for k, v in scales.items()}
    if relative:
        th = dm.thresholds
        th.units, th.scales = "relative", dict(scales)
    return scales
