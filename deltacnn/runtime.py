"""Per-model runtime settings every delta layer reads at call time (one object, shared)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .backends import get_backend
from .backends.base import Backend
from .stats import StatsRecorder
from .thresholds import Thresholds


@dataclass
class Runtime:
    thresholds: Thresholds
    dtype: torch.dtype = torch.float32
    backend_name: str | None = None  # None: chosen from the input's device
    keyframe: bool = True
    keyframe_above: float | None = None  # input update fraction above which a frame runs densely
    # a dense frame that leaves the delta state untouched (DeltaModel.dense_frame); implies keyframe
    stateless: bool = False
    # when set, the input layer leaves the fraction of changed input pixels in `input_change` (a
    # device scalar, no host sync) on every frame, keyframes included; compile's dense dispatch reads it
    track_change: bool = False
    input_change: Tensor | None = None
    stats: StatsRecorder = field(default_factory=StatsRecorder)
    input_mask: Tensor | None = None
    _backends: dict[str, Backend] = field(default_factory=dict)

    def backend_for(self, t: Tensor) -> Backend:
        b = self._backends.get(t.device.type)
        if b is None:
            b = self._backends[t.device.type] = get_backend(t.device, self.backend_name)
        return b
