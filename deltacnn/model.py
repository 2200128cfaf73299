"""A converted, stateful delta model: frame bookkeeping, keyframes, input checks, statistics."""
from __future__ import annotations

import math
import threading
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers.base import DeltaLayer
from .runtime import DENSE_HYSTERESIS, DENSE_WORK, Runtime, StreamPlan
from .stats import FrameStats
from .thresholds import INPUT, Thresholds


class InputChangedError(RuntimeError):
    """The input's shape, dtype or device differs from the stream's; state cannot be mixed."""


class DeltaModel(nn.Module):
    """Call it on consecutive frames of one batch of streams; it returns what the dense model would.

    The first frame (and the first after `reset()`, and every `keyframe_interval` frames) runs
    densely and fills the caches; later frames propagate only what changed.

    Every stream (batch element) decides for itself, exactly as it would alone: a keyframe when it
    is new, at its own `keyframe_interval`, or when its values leave the range it had at its last
    keyframe (`rt.range_ratio`, 16x up or down: a frame with 1e4 or 1e38 in a patch would otherwise
    leave rounding error of that size in the state); a dense frame when most of it changed
    (`dense_above`, and the multiply-add rule of DENSE_WORK); a keyframe again once its delta frames
    have done `rt.refresh_work` dense frames' worth of multiply-adds (REFRESH_WORK, 300: float32
    accumulators gather rounding error like a random walk, and the refresh keeps the tau-0 error at
    the level it has after that much work, for clips of any length, for at most ~1/300 of the time;
    host backends only, which count the work); deltas otherwise. With `rt.layer_refresh`
    (deltacnn.layer_refresh) a stream's delta frame re-sends its deep layers' held-back residuals every N
    frames or once their touched area passes a level (or runs a keyframe then). Streams that differ
    from the rest of the batch run in a dense pass of their own after the batch's delta pass, which
    writes only their rows of the state. Frames holding NaN or infinity are rejected with a
    ValueError before anything runs, so the state stays as it was (CPU frames; on CUDA the check
    would wait for the device, so it is not made there, and neither is the range check).

    A model holds one batch's state: use one model per thread (a second thread entering a model
    mid-frame gets a RuntimeError). Different models may run in different threads at once.
    """

    def __init__(self, graph_module: nn.Module, rt: Runtime, layers: dict[str, DeltaLayer], in_channels: int,
                 keyframe_interval: int | None = None, on_input_change: str = "error") -> None:
        super().__init__()
        if keyframe_interval is not None and keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1 or None, got {keyframe_interval}")
        if on_input_change not in ("error", "reset"):
            raise ValueError(f"on_input_change must be 'error' or 'reset', got {on_input_change!r}")
        self.graph_module = graph_module
        object.__setattr__(self, "rt", rt)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "_frame_lock", threading.Lock())
        self.in_channels = in_channels
        self.keyframe_interval = keyframe_interval
        self.on_input_change = on_input_change
        # per stream: frames since its last keyframe (0: its next frame is a keyframe)
        self._since: list[int] = []
        # per stream: the largest |value| of its last keyframe (None: not known)
        self._scale: list[float | None] = []
        # per stream: conv work of its delta frames since its last keyframe, in dense frames (refresh_work)
        self._work: list[float] = []
        # per stream: the fraction of its pixels whose change the input gates held back last frame (refresh_held)
        self._held: list[float] = []
        # per stream: its input's unsent change after its last frame, in input thresholds (refresh_drift)
        self._drift: list[float] = []
        # per stream: frames since its keyframe or its last layer refresh (deltacnn.layer_refresh, `every`)
        self._ref_age: list[int] = []
        # per stream: its selected layers' touched area after its last frame (deltacnn.layer_refresh, `area`)
        self._touched: list[float] = []
        self._amax: list[float] | None = None  # per stream: the largest |value| of the frame being run
        self._stream: tuple | None = None  # (shape, dtype, device) of the current stream
        self.last_mode: str | None = None  # how the last frame ran: "keyframe", "delta", "dense" or "mixed"
        self.last_modes: list[str] = []  # ... per stream
        self.last_flushed: list[bool] = []  # per stream: the last frame flushed the held input (refresh "flush")
        self.last_refreshed: list[bool] = []  # per stream: the last frame re-sent the deep layers' residuals
        # bumped whenever the state tensors may be freed or replaced (reset, .to(), casts): CUDA graphs
        # captured before read the old memory and must be captured again
        self.state_epoch = 0

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_frame_lock", None)  # copies and pickles get a lock of their own
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        object.__setattr__(self, "_frame_lock", threading.Lock())

    # ---- state -----------------------------------------------------------------------------
    @property
    def thresholds(self) -> Thresholds:
        return self.rt.thresholds

    @property
    def frame_index(self) -> int:
        """Frames since the last keyframe (the least over the streams; 0: the next frame is a keyframe)."""
        return min(self._since) if self._since else 0

    @frame_index.setter
    def frame_index(self, value: int) -> None:
        self._since = [value] * len(self._since)

    def reset(self) -> None:
        """Forget all cached state; the next frame is a keyframe and may have any shape."""
        self._forget()
        for layer in self._all_layers():
            layer.reset_state()

    def _forget(self) -> None:
        self._since, self._scale, self._work, self._held, self._drift = [], [], [], [], []
        self._ref_age, self._touched = [], []
        self.rt.touch.clear()
        self._stream = None
        self.rt.dense_limit = None
        self.state_epoch += 1

    def _all_layers(self):
        return (m for m in self.modules() if isinstance(m, DeltaLayer))

    def _apply(self, fn, recurse=True):
        # moving or casting the model invalidates the caches: start over with a keyframe
        if "rt" in self.__dict__:  # not yet set while nn.Module.__init__ runs
            self._forget()
        return super()._apply(fn, recurse)

    # ---- frames ----------------------------------------------------------------------------
    def _check_input(self, x: object) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor frame batch of shape (N, {self.in_channels}, H, W), "
                            f"got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D frame batch (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            hint = " (channels-last image? use x.permute(0, 3, 1, 2))" if x.shape[3] == self.in_channels else ""
            raise ValueError(f"expected {self.in_channels} input channels, got shape {tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point frame, got {x.dtype}; convert uint8 images with x.float() / 255 "
                            "(or whatever the dense model expects)")
        param = next(self.parameters(), None)
        if param is not None and param.device != x.device:
            raise ValueError(f"input is on {x.device} but the model is on {param.device}; move one of them "
                             "(model.to(device) also resets the stream)")
        self._amax = None
        if x.device.type == "cpu" and x.numel():
            # min and max per stream propagate NaN and hold any infinity: one pass, no isfinite tensor
            lo, hi = self.rt.backend_for(x).frame_range(x)
            bad = [i for i, (a, b) in enumerate(zip(lo, hi)) if not (math.isfinite(a) and math.isfinite(b))]
            if bad:
                raise ValueError(f"input stream(s) {bad} contain NaN or infinity; it would poison the cached state, "
                                 "so the frame was rejected and the state left as it was")
            self._amax = [max(-a, b) for a, b in zip(lo, hi)]
        sig = (tuple(x.shape), x.dtype, x.device)
        if self._stream is not None and sig != self._stream:
            if self.on_input_change == "reset":
                self.reset()
            else:
                was = self._stream
                raise InputChangedError(
                    f"input changed mid-stream from shape {was[0]}, {was[1]}, {was[2]} to {sig[0]}, {sig[1]}, {sig[2]}; "
                    "call model.reset() to start a new stream (or convert with on_input_change='reset')")

    @contextmanager
    def _frame(self):
        if not self._frame_lock.acquire(blocking=False):
            raise RuntimeError("this DeltaModel is running a frame in another thread (or was re-entered): a model "
                               "holds one batch of streams' state; convert one model per thread")
        try:
            yield
        finally:
            self._frame_lock.release()

    def _due(self, i: int) -> bool:
        """Whether stream i's next frame must be a keyframe (new, interval reached, values out of range)."""
        since = self._since[i]
        if since == 0 or (self.keyframe_interval is not None and since >= self.keyframe_interval):
            return True
        if self.rt.refresh_work is not None and self._work[i] >= self.rt.refresh_work:
            return True
        if not self.rt.refresh.flush and self._held_over(i):
            return True
        if self.rt.refresh_drift is not None and i < len(self._drift) and self._drift[i] > self.rt.refresh_drift:
            return True
        lr = self.rt.layer_refresh
        if lr is not None and lr.run == "keyframe" and self._layer_due(i):
            return True
        ratio = self.rt.range_ratio
        if ratio is None or self._amax is None or self._scale[i] is None:
            return False
        now, then = self._amax[i], self._scale[i]
        return now > ratio * then or then > ratio * now

    def _layer_due(self, i: int) -> bool:
        """Whether stream i's layer refresh (deltacnn.layer_refresh) triggers: `every` frames since its keyframe
        or last refresh, or its selected layers' touched area above `area` (measured on host backends)."""
        lr = self.rt.layer_refresh
        if lr.every is not None:
            return i < len(self._ref_age) and self._ref_age[i] >= lr.every
        return i < len(self._touched) and self._touched[i] > lr.area

    def _held_over(self, i: int) -> bool:
        """Whether stream i's gates held back more than refresh_held of its pixels on its last frame."""
        return self.rt.refresh_held is not None and i < len(self._held) and self._held[i] > self.rt.refresh_held

    @torch.no_grad()
    def forward(self, x: Tensor):
        with self._frame():
            self._check_input(x)
            return self._forward(x)

    def _forward(self, x: Tensor):
        rt = self.rt
        n = x.shape[0]
        if len(self._since) != n:  # a new stream batch
            self._since, self._scale, self._work = [0] * n, [None] * n, [0.0] * n
            self._ref_age, self._touched = [0] * n, []
        due = [self._due(i) for i in range(n)]
        backend = rt.backend_for(x)
        # layer refresh (deltacnn.layer_refresh): host backends only, whatever it runs (a flush, or a keyframe at
        # an area trigger, which reads the touched area on the host); "flush": streams not due for a keyframe
        # whose trigger fired
        lr = rt.layer_refresh
        if lr is not None and not backend.host_sync_ok:
            if not getattr(self, "_warned_refresh", False):
                warnings.warn(f"the layer refresh {lr.spec()!r} runs on host backends only (reference, cpu); the "
                              f"{backend.name} backend runs this model without it", RuntimeWarning, stacklevel=3)
                self._warned_refresh = True
            lr = None
        if lr is not None and lr.run != "flush":
            lr = None
        refresh = [not due[i] and self._layer_due(i) for i in range(n)] if lr is not None else [False] * n
        if any(refresh):
            rt.touch.rows = torch.tensor(refresh, device=x.device)
            rt.thresholds.refresh_factor = lr.factor
            rt.thresholds.refresh_names = rt.touch.names(lr, rt.thresholds.strides)
        work = getattr(backend, "work", None)  # multiply-adds counted by host-side backends
        decides = rt.dense_above is not None and backend.host_sync_ok
        limits = rt.busy_limits(n) if decides else None
        if work is not None:
            work[:] = [0, 0]
            # per-stream counts, for the multiply-add rule of each stream (one stream: the totals)
            backend.work_streams = torch.zeros(n, dtype=torch.long, device=x.device) if n > 1 else None
        keyframe = all(due)
        # refresh "flush": a stream whose gates held too much back sends it on this delta frame instead
        flush = [not due[i] and self._held_over(i) for i in range(n)] if rt.refresh.flush else [False] * n
        rt.flush = flush if any(flush) else None
        if rt.flush is not None:
            rt.thresholds.frame_factor = rt.refresh.layers  # "flush@F": residuals the flush reaches go out too
        plan = rt.plan = StreamPlan(due, limits)
        try:
            out = self._run(x, keyframe)
        finally:
            rt.plan = None
            rt.flush = None
            rt.thresholds.frame_factor = 1.0
            rt.touch.rows = None
            rt.thresholds.refresh_factor = 1.0
        modes = plan.modes if plan.modes is not None else ["keyframe" if keyframe else "delta"] * n
        first = plan.first or ("keyframe" if keyframe else "delta")
        if first == "dense":  # the input layer found every stream busy: it ran densely without state
            rt.stateless = False
        rt.keyframe = first != "delta"
        left = plan.left_out()
        if left:
            out = self._run_streams(x, out, modes, left)
        if first == "delta" and work is not None and work[1]:
            done = backend.work_streams.tolist() if backend.work_streams is not None else [work[0]]
            per_stream = work[1] / n
            lim = list(rt.dense_limit) if isinstance(rt.dense_limit, list) else [rt.dense_limit] * n
            for i, m in enumerate(modes):
                if m != "delta":
                    continue
                self._work[i] += done[i] / per_stream
                if decides:
                    # deltas did most of a dense frame's work (high update rates through the network): the
                    # stream runs dense frames while its input keeps changing about as much as in this frame
                    busy = done[i] > DENSE_WORK * per_stream
                    lim[i] = DENSE_HYSTERESIS * plan.change[i] if busy else None
            if decides:
                rt.dense_limit = lim
        if rt.refresh_held is not None and rt.input_held is not None and backend.host_sync_ok:
            self._held = rt.input_held.tolist()
        rt.input_held = None
        if rt.refresh_drift is not None and backend.host_sync_ok:
            self._drift = self._unsent_change(x, modes)
        self.last_refreshed = [r and m == "delta" for r, m in zip(refresh, modes)]
        for i, r in enumerate(self.last_refreshed):
            if r:
                self._ref_age[i] = 0
        self._end_streams(modes, x)
        self.last_flushed = [f and m == "delta" for f, m in zip(flush, modes)]
        if rt.layer_refresh is not None and rt.layer_refresh.area is not None and backend.host_sync_ok:
            self._touched = rt.touch.area(n)
        return out

    def _unsent_change(self, x: Tensor, modes: list[str]) -> list[float]:
        """Per stream: mean |x - ref| of the input (the change not sent yet) over the input threshold;
        0 for streams that did not run deltas (their reference is the frame) and at threshold 0."""
        tau = self.rt.thresholds.get(INPUT)
        ref = self.layers[INPUT]._buffers.get("state_ref")
        if not tau or ref is None or ref.shape != x.shape:
            return [0.0] * len(modes)
        held = (x - ref).abs_().flatten(1).mean(1).div_(tau).tolist()
        return [h if m == "delta" else 0.0 for h, m in zip(held, modes)]

    def _run_streams(self, x: Tensor, out, modes: list[str], left: list[int]):
        """Run the streams `left` out of the delta pass densely, each pass writing only their state rows
        (keyframes) or none (busy streams), and put their outputs into `out`."""
        rt = self.rt
        mask = rt.input_mask.clone() if rt.input_mask is not None else None
        for mode in ("keyframe", "dense"):
            rows = [i for i in left if modes[i] == mode]
            if not rows:
                continue
            idx = torch.tensor(rows, device=x.device)
            rt.streams, rt.stateless, rt.keyframe = idx, mode == "dense", True
            rt.stats.merging = True
            try:
                sub = self._run(x.index_select(0, idx), keyframe=True, start=False)
            finally:
                rt.streams, rt.stateless, rt.keyframe = None, False, False
                rt.stats.merging = False
            out = _put_rows(out, idx, sub, x.shape[0])
            if mask is not None:
                mask[idx] = True
        rt.input_mask = mask
        return out

    def _end_frame(self, mode: str, x: Tensor) -> None:
        """Bookkeeping after a frame of `mode` ("keyframe", "delta" or "dense") ran on every stream of
        `x`, eagerly here or replayed from a CUDA graph by deltacnn.compile."""
        n = x.shape[0]
        if len(self._since) != n:
            self._since, self._scale, self._work = [0] * n, [None] * n, [0.0] * n
        self._end_streams([mode] * n, x)

    def _end_streams(self, modes: list[str], x: Tensor) -> None:
        """Per-stream bookkeeping after a frame in which stream i ran as modes[i]."""
        self._stream = (tuple(x.shape), x.dtype, x.device)
        self.last_modes = modes
        self.last_mode = modes[0] if len(set(modes)) == 1 else "mixed"
        lim = self.rt.dense_limit
        lim = list(lim) if isinstance(lim, list) else [lim] * len(modes)
        if len(self._ref_age) != len(modes):
            self._ref_age = [0] * len(modes)
        for i, mode in enumerate(modes):
            if mode != "delta" and self.rt.touch.masks:  # a keyframe resets every residual (dense: one follows)
                self.rt.touch.clear(i)
            if mode == "dense":  # the state no longer matches the stream: its next frame is a keyframe
                self._since[i] = 0
                continue
            if mode == "keyframe":
                self._since[i] = 0
                self._ref_age[i] = 0
                self._work[i] = 0.0
                if i < len(self._held):
                    self._held[i] = 0.0  # a keyframe sent everything
                if i < len(self._drift):
                    self._drift[i] = 0.0
                self._scale[i] = self._amax[i] if self._amax is not None else None
                lim[i] = None
            self._since[i] += 1
            self._ref_age[i] += 1
        self.rt.dense_limit = None if all(v is None for v in lim) else (lim[0] if len(set(lim)) == 1 else lim)

    @torch.no_grad()
    def dense_frame(self, x: Tensor):
        """Run the converted network densely on `x` without touching the delta state; returns the output.

        This is what to do with a frame where most pixels changed (a scene cut, a camera move): the
        folded convolutions run on cuDNN / oneDNN at dense speed, with no state to write. Only the
        input reference is refreshed (so the next change can be measured); the next ordinary call
        is a keyframe, because the state no longer matches the stream. `deltacnn.compile` switches
        to dense frames by itself when the measured change is high.
        """
        with self._frame():
            self._check_input(x)
            self.rt.stateless = True
            try:
                out = self._run(x, keyframe=True)
            finally:
                self.rt.stateless = False
            self._end_frame("dense", x)
            return out

    def _run(self, x: Tensor, keyframe: bool, start: bool = True):
        rt = self.rt
        rt.keyframe = keyframe
        if start:
            rt.stats.start_frame()
        try:
            out = self.graph_module(x)
        except BaseException:
            self._since = [0] * len(self._since)  # state may be half-updated: re-synchronise with a keyframe
            self._stream = None
            rt.stateless = False
            raise
        return out

    # ---- statistics ------------------------------------------------------------------------
    def enable_stats(self, enabled: bool = True, keep_masks: bool = False) -> None:
        """Record per-layer update rates and multiply-adds (costs a host sync when read, nothing otherwise)."""
        self.rt.stats.enabled = enabled
        self.rt.stats.keep_masks = keep_masks

    def frame_stats(self) -> FrameStats:
        """Statistics of the last frame."""
        return self.rt.stats.frame(self.rt.keyframe)

    def summary(self, show: bool = True) -> str:
        """Per layer: name, kind (delta / dense island / dense tail), dense MACs per frame, share of the
        model's MACs, and the last frame's update rate when statistics are on. Printed unless show=False."""
        from .stats import summary_table
        report = getattr(self, "report", None)
        last = self.rt.stats.frame(self.rt.keyframe) if self.rt.stats.enabled and self.rt.stats._rows else None
        table = summary_table(self.layers, report.layer_macs if report is not None else {}, last)
        if show:
            print(table)
        return table

    @property
    def input_mask(self) -> Tensor | None:
        """(N, 1, H, W) bool: which input pixels the last frame transmitted."""
        return self.rt.input_mask

    def update_heatmap(self, size: tuple[int, int] | None = None) -> Tensor:
        """(N, 1, H, W) in [0, 1]: fraction of layers that recomputed each pixel in the last frame.

        Needs enable_stats(keep_masks=True). Each layer's mask is resized to the input resolution.
        """
        masks = self.rt.stats.masks
        if not masks:
            raise RuntimeError("no masks recorded: call model.enable_stats(keep_masks=True) before running frames")
        if size is None:
            size = tuple(self.rt.input_mask.shape[2:])
        acc = None
        for m in masks.values():
            r = F.interpolate(m.float(), size=size, mode="nearest")
            acc = r if acc is None else acc + r
        return acc / len(masks)

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, thresholds={self.rt.thresholds.to_dict()}"


def _put_rows(full, idx: Tensor, sub, n: int):
    """`full` (an output of the whole batch: a tensor or a tuple, list or dict of them) with batch rows
    `idx` replaced by `sub` (the same structure, computed for those rows only)."""
    if isinstance(full, Tensor):
        if full.dim() == 0 or full.shape[0] != n:
            raise RuntimeError(f"the model's output of shape {tuple(full.shape)} has no batch dimension of {n} "
                               "streams first, so streams cannot run keyframes of their own; use batch 1 per model")
        return full.index_copy(0, idx, sub.to(full.dtype))
    if isinstance(full, (tuple, list)):
        vals = [_put_rows(f, idx, s, n) for f, s in zip(full, sub)]
        return type(full)(*vals) if hasattr(full, "_fields") else type(full)(vals)
    if isinstance(full, dict):
        return type(full)((k, _put_rows(v, idx, sub[k], n)) for k, v in full.items())
    return full
