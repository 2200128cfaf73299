"""Per-model runtime settings every delta layer reads at call time (one object, shared)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .backends import get_backend
from .backends.base import Backend
from .gating import Refresh
from .layer_refresh import LayerRefresh, TouchState
from .stats import StatsRecorder
from .thresholds import Thresholds


# dense mode ends when the input change falls below this fraction of the change that started it,
# so that a change rate hovering at a limit does not pay a keyframe every other frame
DENSE_HYSTERESIS = 0.75
# a delta frame whose convolutions did more than this fraction of a dense frame's multiply-adds
# costs more than a dense frame on the CPU (gathers and state on top of the same arithmetic): the
# frames after it run densely while the input changes about as much (backends that may sync only)
DENSE_WORK = 0.6
# a stream whose frame's largest |value| is more than this factor above (or below) its value at the
# stream's last keyframe runs a keyframe: the deltas to and from such values would leave rounding
# error of the large magnitude in every accumulator (1e4 in a patch: 7e-4 relative error on every
# later frame; 1e38: inf and NaN), while a keyframe starts the stream's state afresh. Within the
# factor the rounding stays at float tolerance (about RANGE_RATIO ulps of the output).
RANGE_RATIO = 16.0
# a stream re-seeds its state with a keyframe once its delta frames have done this many dense frames'
# worth of conv multiply-adds since its last keyframe: float32 accumulators gather rounding error like
# a random walk (tau-0 error 2e-7 at frame 10, 7e-7 at 590 when every pixel changes), and a keyframe
# starts it over, so the error stays at the level of this many frames instead of growing with the clip.
# A keyframe costs about one dense frame and sparse multiply-adds cost no less than dense ones, so the
# refresh takes at most about 1/REFRESH_WORK of the time (host backends, which count the work).
REFRESH_WORK = 300.0


@dataclass
class StreamPlan:
    """The host's per-stream routing of one frame (backends that decide on the host, or known keyframes).

    The model fills `keyframe` (streams due for a keyframe: new, interval reached, values out of
    range) and `limits` (each stream's input-change limit above which it runs densely, or None
    when nothing is measured); the input layer measures each stream's change and fills `modes`
    ("delta", "keyframe" or "dense" per stream), `change` and `first` (how the pass that measured
    ran for the whole batch: "delta", "keyframe" or "dense"). Streams whose mode differs from
    `first` are left out of that pass and run afterwards in a pass of their own.
    """

    keyframe: list[bool]
    limits: list[float | None] | None = None
    modes: list[str] | None = None
    change: list[float] | None = None
    first: str | None = None

    def route(self, change: list[float] | None, keyframe_pass: bool) -> None:
        """Each stream's mode from its change; busy streams (change above their limit) run densely."""
        modes = []
        for i, key in enumerate(self.keyframe):
            lim = self.limits[i] if self.limits is not None else None
            busy = change is not None and lim is not None and change[i] > lim
            modes.append("dense" if busy else ("keyframe" if key or keyframe_pass else "delta"))
        self.modes, self.change = modes, change
        if keyframe_pass or "delta" not in modes:
            # no stream needs this frame's deltas: the whole batch runs densely in this pass, without
            # state only when every stream is busy (the busy ones' state is rewritten by their keyframe)
            self.first = "dense" if set(modes) == {"dense"} else "keyframe"
        else:
            self.first = "delta"

    def left_out(self) -> list[int]:
        """Streams the measuring pass did not run (they follow in passes of their own)."""
        if self.first != "delta":
            return []
        return [i for i, m in enumerate(self.modes) if m != "delta"]


@dataclass
class Runtime:
    thresholds: Thresholds
    dtype: torch.dtype = torch.float32
    backend_name: str | None = None  # None: chosen from the input's device
    keyframe: bool = True
    dense_above: float | None = None  # input update fraction above which a frame runs densely
    # the input-change limit in force when lower than dense_above: set after a delta frame that did
    # most of a dense frame's work (DENSE_WORK, DeltaModel.forward), cleared by the next keyframe; one
    # value for the batch, or one per stream (each stream decides for itself)
    dense_limit: float | list[float | None] | None = None
    # a dense frame that leaves the delta state untouched (DeltaModel.dense_frame); implies keyframe
    stateless: bool = False
    # when set, the input layer leaves the fraction of changed input pixels in `input_change` (a
    # device scalar, no host sync) on every frame, keyframes included; compile's dense dispatch reads it.
    # Host backends deciding dense frames (dense_above) measure and leave it there too.
    track_change: bool = False
    input_change: Tensor | None = None
    # per-stream passes (deltacnn.compile): when set, the input layer leaves each stream's fraction of
    # changed input pixels in `stream_change` ((N,) float32 on the device, no host sync), and a delta
    # frame sends nothing for the streams whose entry of `keep` ((N,) bool on the device) is False
    # (they run a keyframe or dense pass of their own, which re-seeds their input reference)
    track_streams: bool = False
    stream_change: Tensor | None = None
    keep: Tensor | None = None
    stats: StatsRecorder = field(default_factory=StatsRecorder)
    input_mask: Tensor | None = None
    # set by deltacnn.compile while it captures a delta pass: the frame's input layer calls
    # `skip.begin(mask)` with the mask it sends, which puts the rest of the pass into a conditional node
    # of the graph that runs only when some pixel is sent (compile.StaticSkip; compile closes the node)
    skip: Any = None
    # the current frame's per-stream routing, read by the input layer (None: the whole batch runs as
    # `keyframe` says)
    plan: StreamPlan | None = None
    # the batch rows (indices into the stream batch) that the running pass computes: a keyframe or a
    # dense pass of some streams only, whose state is written at these rows (None: every stream)
    streams: Tensor | None = None
    # keyframe (or dense) of streams whose largest |value| leaves [1/range_ratio, range_ratio] times its
    # value at their last keyframe (CPU frames; None: never)
    range_ratio: float | None = RANGE_RATIO
    # keyframe of a stream after this many dense frames' worth of delta work (None: never; host backends)
    refresh_work: float | None = REFRESH_WORK
    # keyframe of a stream once its input gates (deltacnn.gating) hold back changes above the input threshold in
    # more than this fraction of its pixels: a change the gate never lets through (a small object that stays)
    # is otherwise held until the next keyframe of another cause (None: never; host backends)
    refresh_held: float | None = None
    input_held: Tensor | None = None  # (N,) that fraction on the last gated frame (set by the input layer)
    # keyframe of a stream once the input change it has not sent, mean |x - ref| over its pixels and channels,
    # exceeds this multiple of the input threshold (DeltaModel._drift): the held change grows with the area
    # that moved since the keyframe (sub-threshold trails, small blobs), and so do the layers' truncation
    # residuals, which a keyframe resets (None: never; host backends)
    refresh_drift: float | None = None
    # re-sending the deep layers' held-back residuals without a keyframe, or a keyframe when their touched
    # area passes a level (deltacnn.layer_refresh; None: off; host backends), and its per-layer bookkeeping
    layer_refresh: LayerRefresh | None = None
    touch: TouchState = field(default_factory=TouchState)
    # what the refresh_held rule runs: a whole keyframe, or a flush of the held-back input change
    # (deltacnn.gating.Refresh); `flush` lists, per stream, whether this frame flushes (set by DeltaModel)
    refresh: Refresh = field(default_factory=Refresh)
    flush: list[bool] | None = None
    # delta frames' cats read in place by their 1x1 convs (DeltaCat.read_in_place); off while hooks read every
    # layer's output values (motion's view steps: such a cat's output holds none)
    cats_in_place: bool = True
    _backends: dict[str, Backend] = field(default_factory=dict)

    def busy_limit(self) -> float | None:
        """Input-change fraction above which the input layer runs the frame densely (host backends)."""
        if self.dense_above is None:
            return None
        lim = self.dense_limit
        if isinstance(lim, list):
            lim = min((v for v in lim if v is not None), default=None)
        return self.dense_above if lim is None else min(self.dense_above, lim)

    def busy_limits(self, n: int) -> list[float | None] | None:
        """busy_limit of each of n streams (dense_limit may be one value for all or one per stream)."""
        if self.dense_above is None:
            return None
        lim = self.dense_limit if isinstance(self.dense_limit, list) else [self.dense_limit] * n
        return [self.dense_above if v is None else min(self.dense_above, v) for v in lim]

    def backend_for(self, t: Tensor) -> Backend:
        return self.backend_on(t.device)

    def backend_on(self, device: torch.device) -> Backend:
        """The backend for tensors on `device` (one per device type, made on first use)."""
        b = self._backends.get(device.type)
        if b is None:
            b = self._backends[device.type] = get_backend(device, self.backend_name)
        return b
