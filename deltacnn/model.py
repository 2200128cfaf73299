"""A converted, stateful delta model: frame bookkeeping, keyframes, input checks, statistics."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers.base import DeltaLayer
from .runtime import DENSE_HYSTERESIS, DENSE_WORK, Runtime
from .stats import FrameStats
from .thresholds import Thresholds


class InputChangedError(RuntimeError):
    """The input's shape, dtype or device differs from the stream's; state cannot be mixed."""


class DeltaModel(nn.Module):
    """Call it on consecutive frames of one batch of streams; it returns what the dense model would.

    The first frame (and the first after `reset()`, and every `keyframe_interval` frames) runs
    densely and fills the caches; later frames propagate only what changed.
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
        self.in_channels = in_channels
        self.keyframe_interval = keyframe_interval
        self.on_input_change = on_input_change
        self.frame_index = 0  # frames since the last keyframe (0: next frame is a keyframe)
        self._stream: tuple | None = None  # (shape, dtype, device) of the current stream
        self.last_mode: str | None = None  # how the last frame ran: "keyframe", "delta" or "dense"
        # bumped whenever the state tensors may be freed or replaced (reset, .to(), casts): CUDA graphs
        # captured before read the old memory and must be captured again
        self.state_epoch = 0

    # ---- state -----------------------------------------------------------------------------
    @property
    def thresholds(self) -> Thresholds:
        return self.rt.thresholds

    def reset(self) -> None:
        """Forget all cached state; the next frame is a keyframe and may have any shape."""
        self.frame_index = 0
        self._stream = None
        self.rt.dense_limit = None
        self.state_epoch += 1
        for layer in self._all_layers():
            layer.reset_state()

    def _all_layers(self):
        return (m for m in self.modules() if isinstance(m, DeltaLayer))

    def _apply(self, fn, recurse=True):
        # moving or casting the model invalidates the caches: start over with a keyframe
        self.frame_index = 0
        self._stream = None
        if "rt" in self.__dict__:  # not yet set while nn.Module.__init__ runs
            self.rt.dense_limit = None
            self.state_epoch += 1
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
        # min and max propagate NaN and hold any infinity: one cheap pass instead of isfinite(x).all()
        if x.device.type == "cpu" and x.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(x)):
            raise ValueError("input contains NaN or infinity; it would poison the cached state, so it was rejected")
        sig = (tuple(x.shape), x.dtype, x.device)
        if self._stream is not None and sig != self._stream:
            if self.on_input_change == "reset":
                self.reset()
            else:
                was = self._stream
                raise InputChangedError(
                    f"input changed mid-stream from shape {was[0]}, {was[1]}, {was[2]} to {sig[0]}, {sig[1]}, {sig[2]}; "
                    "call model.reset() to start a new stream (or convert with on_input_change='reset')")

    @torch.no_grad()
    def forward(self, x: Tensor):
        self._check_input(x)
        keyframe = self.frame_index == 0 or (self.keyframe_interval is not None
                                             and self.frame_index >= self.keyframe_interval)
        if keyframe:
            self.frame_index = 0
        rt = self.rt
        backend = rt.backend_for(x)
        work = getattr(backend, "work", None)  # multiply-adds counted by host-side backends
        if work is not None:
            work[:] = [0, 0]
        out = self._run(x, keyframe)
        if rt.stateless:  # the input layer found the frame busy (dense_above): it ran densely,
            rt.stateless = False  # without state, so the next frame must be a keyframe
            self._end_frame("dense", x)
            return out
        if not keyframe and rt.dense_above is not None and backend.host_sync_ok and work is not None and work[1]:
            # deltas did most of a dense frame's work (high update rates through the network): run
            # dense frames while the input keeps changing about as much as in this frame
            busy = work[0] > DENSE_WORK * work[1]
            rt.dense_limit = DENSE_HYSTERESIS * float(rt.input_change) if busy else None  # set by the input layer
        self._end_frame("keyframe" if keyframe else "delta", x)
        return out

    def _end_frame(self, mode: str, x: Tensor) -> None:
        """Bookkeeping after a frame of `mode` ("keyframe", "delta" or "dense") ran on `x`, eagerly
        here or replayed from a CUDA graph by deltacnn.compile."""
        self._stream = (tuple(x.shape), x.dtype, x.device)
        self.last_mode = mode
        if mode == "dense":  # the state no longer matches the stream: the next frame is a keyframe
            self.frame_index = 0
            return
        if mode == "keyframe":
            self.frame_index = 0
            self.rt.dense_limit = None
        self.frame_index += 1

    @torch.no_grad()
    def dense_frame(self, x: Tensor):
        """Run the converted network densely on `x` without touching the delta state; returns the output.

        This is what to do with a frame where most pixels changed (a scene cut, a camera move): the
        folded convolutions run on cuDNN / oneDNN at dense speed, with no state to write. Only the
        input reference is refreshed (so the next change can be measured); the next ordinary call
        is a keyframe, because the state no longer matches the stream. `deltacnn.compile` switches
        to dense frames by itself when the measured change is high.
        """
        self._check_input(x)
        self.frame_index = 0
        self.rt.stateless = True
        try:
            out = self._run(x, keyframe=True)
        finally:
            self.rt.stateless = False
        self._end_frame("dense", x)
        return out

    def _run(self, x: Tensor, keyframe: bool):
        self.rt.keyframe = keyframe
        self.rt.stats.start_frame()
        try:
            out = self.graph_module(x)
        except BaseException:
            self.frame_index = 0  # state may be half-updated: re-synchronise with a keyframe next time
            self._stream = None
            self.rt.stateless = False
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
