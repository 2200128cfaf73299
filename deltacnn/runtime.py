"""Per-model runtime settings every delta layer reads at call time (one object, shared)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .backends import get_backend
from .backends.base import Backend
from .stats import StatsRecorder
from .thresholds import Thresholds


# dense mode ends when the input change falls below this fraction of the change that started it,
# so that a change rate hovering at a limit does not pay a keyframe every other frame
DENSE_HYSTERESIS = 0.75
# a delta frame whose convolutions did more than this fraction of a dense frame's multiply-adds
# costs more than a dense frame on the CPU (gathers and state on top of the same arithmetic): the
# frames after it run densely while the input changes about as much (backends that may sync only)
DENSE_WORK = 0.6


@dataclass
class Runtime:
    thresholds: Thresholds
    dtype: torch.dtype = torch.float32
    backend_name: str | None = None  # None: chosen from the input's device
    keyframe: bool = True
    dense_above: float | None = None  # input update fraction above which a frame runs densely
    # the input-change limit in force when lower than dense_above: set after a delta frame that did
    # most of a dense frame's work (DENSE_WORK, DeltaModel.forward), cleared by the next keyframe
    dense_limit: float | None = None
    # a dense frame that leaves the delta state untouched (DeltaModel.dense_frame); implies keyframe
    stateless: bool = False
    # when set, the input layer leaves the fraction of changed input pixels in `input_change` (a
    # device scalar, no host sync) on every frame, keyframes included; compile's dense dispatch reads it.
    # Host backends deciding dense frames (dense_above) measure and leave it there too.
    track_change: bool = False
    input_change: Tensor | None = None
    stats: StatsRecorder = field(default_factory=StatsRecorder)
    input_mask: Tensor | None = None
    _backends: dict[str, Backend] = field(default_factory=dict)

    def busy_limit(self) -> float | None:
        """Input-change fraction above which the input layer runs the frame densely (host backends)."""
        if self.dense_above is None:
            return None
        return self.dense_above if self.dense_limit is None else min(self.dense_above, self.dense_limit)

    def backend_for(self, t: Tensor) -> Backend:
        return self.backend_on(t.device)

    def backend_on(self, device: torch.device) -> Backend:
        """The backend for tensors on `device` (one per device type, made on first use)."""
        b = self._backends.get(device.type)
        if b is None:
            b = self._backends[device.type] = get_backend(device, self.backend_name)
        return b
