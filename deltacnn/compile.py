"""Whole-frame CUDA graphs: capture one delta frame per input shape, then replay it.

A delta frame on the Triton backend launches a few kernels per layer and never waits for the
GPU, so the whole frame can be recorded once and replayed with one launch, which removes the
per-kernel launch overhead that otherwise dominates at low update rates.

Frames where most pixels change (scene cuts, camera motion) are cheaper dense: the compiled model
measures the input change of every frame on the GPU, copies it to pinned host memory without
waiting, and when the last completed frame changed more than `dense_above` of its pixels it runs
the next frames as stateless dense frames (cuDNN, also replayed from a graph) until the change
drops again; then a keyframe re-seeds the delta state. The decision lags by about one frame and
never synchronises with the device. Keyframes are replayed from a graph too, once an eager keyframe
of the same shape has allocated the state they write into.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .model import DeltaModel
from .runtime import DENSE_HYSTERESIS as HYSTERESIS


class DenseDispatch:
    """When to run dense frames: after a frame whose input change exceeded `above`, and until the
    change drops below HYSTERESIS * `above` (so that a rate hovering at the threshold does not pay
    a keyframe every other frame). Pure host logic; the caller feeds it the changes it has read."""

    def __init__(self, above: float | None) -> None:
        if above is not None and not 0 <= above <= 1:
            raise ValueError(f"dense_above must be in [0, 1] (a fraction of input pixels) or None, got {above}")
        self.above = above
        self.dense = False
        self.last_change = 0.0  # input change of the last frame whose value has arrived

    def observe(self, change: float) -> None:
        self.last_change = change

    def reset(self) -> None:
        self.dense = False
        self.last_change = 0.0

    def next_mode(self, model: DeltaModel) -> str:
        """'dense', 'keyframe' or 'delta' for the model's next frame."""
        if self.above is not None and model._stream is not None:
            self.dense = self.last_change > self.above * (HYSTERESIS if self.dense else 1.0)
            if self.dense:
                return "dense"
        keyframe = model.frame_index == 0 or (model.keyframe_interval is not None
                                              and model.frame_index >= model.keyframe_interval)
        return "keyframe" if keyframe else "delta"


def run_eager(model: DeltaModel, x: Tensor, mode: str):
    """Run one frame of `mode` without a graph (a dense frame is stateless; see next_mode)."""
    return model.dense_frame(x) if mode == "dense" else model(x)


class GraphedDeltaModel:
    """Callable like the DeltaModel it wraps; delta and dense frames replay captured CUDA graphs."""

    def __init__(self, model: DeltaModel, warmup: int = 2, dense_above: float | None = 0.35) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("deltacnn.compile needs a CUDA device; on the CPU call the DeltaModel directly")
        if model.rt.stats.enabled:
            raise ValueError("disable statistics (model.enable_stats(False)) before compiling: they are read on the host")
        self.policy = DenseDispatch(dense_above)
        self.model = model
        self.warmup = warmup
        model.rt.track_change = dense_above is not None
        # (shape, dtype, device, mode) -> (graph, static input, static output, static change fraction)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, object, Tensor | None]] = {}
        self._eager: dict[tuple, int] = {}  # eager frames per graph key since the state was (re)allocated
        self._epoch = model.state_epoch  # the graphs read and write the state tensors of this epoch
        self._change_host = torch.zeros((), dtype=torch.float32, pin_memory=True)
        self._change_event: torch.cuda.Event | None = None
        self.frames = {"keyframe": 0, "delta": 0, "dense": 0}  # how each frame ran

    @property
    def last_change(self) -> float:
        """Input change of the last frame whose value has reached the host."""
        return self.policy.last_change

    def reset(self) -> None:
        self.model.reset()
        self.policy.reset()
        self._change_event = None

    def _poll_change(self) -> None:
        """Hand the policy the newest input change that has arrived (never waits for the GPU)."""
        ev = self._change_event
        if ev is not None and ev.query():
            self.policy.observe(float(self._change_host))
            self._change_event = None

    def __call__(self, x: Tensor):
        m = self.model
        if x.device.type != "cuda":
            raise ValueError(f"compiled delta models run on CUDA frames, got a tensor on {x.device}")
        m._check_input(x)  # first: it may start a new stream (on_input_change="reset")
        if m.state_epoch != self._epoch:
            # reset, moved or cast: the state the graphs point at is gone; capture again
            self._graphs.clear()
            self._eager.clear()
            self._epoch = m.state_epoch
        self._poll_change()
        mode = self.policy.next_mode(m)
        key = (tuple(x.shape), x.dtype, x.device, mode)
        change = None
        # the first frames of each kind run eagerly (Triton autotuning, cuDNN heuristics, lazy
        # allocations; the first keyframe allocates the state that later graphs read and write)
        n_eager = self._eager.get(key, 0)
        if n_eager < self.warmup:
            out = run_eager(m, x, mode)
            self._eager[key] = n_eager + 1
            change = m.rt.input_change
        else:
            if key not in self._graphs:
                self._graphs[key] = self._capture(x, mode)
            graph, static_in, static_out, change = self._graphs[key]
            static_in.copy_(x)
            graph.replay()
            m._end_frame(mode, x)
            out = _clone(static_out)
        self.frames[mode] += 1
        if self.policy.above is not None and change is not None:
            self._change_host.copy_(change, non_blocking=True)
            self._change_event = torch.cuda.Event()
            self._change_event.record()
        return out

    def _capture(self, x: Tensor, mode: str):
        m = self.model
        static_in = x.clone()
        m.rt.keyframe = mode != "delta"
        m.rt.stateless = mode == "dense"
        graph = torch.cuda.CUDAGraph()
        # the frame recorded during capture is not executed: the state stays as it was
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                with torch.no_grad():
                    static_out = m.graph_module(static_in)
        except RuntimeError as e:
            raise RuntimeError(
                "could not capture a delta frame in a CUDA graph: some layer synchronises with the host "
                f"(probably one that runs on the reference backend on this GPU): {e}") from e
        finally:
            m.rt.stateless = False
        return graph, static_in, static_out, m.rt.input_change if m.rt.track_change else None


def _clone(out):
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


def compile(model: DeltaModel, warmup: int = 2, dense_above: float | None = 0.35) -> GraphedDeltaModel:  # noqa: A001
    """Wrap a converted model so that frames replay CUDA graphs captured per input shape.

    dense_above: when more than this fraction of input pixels changed in the last completed frame,
    run frames densely (stateless, at cuDNN speed) until the change drops below 3/4 of it; None
    always runs delta frames. The best value depends on the model and GPU (`deltacnn bench`).
    """
    if not isinstance(model, DeltaModel):
        raise TypeError(f"deltacnn.compile takes the result of deltacnn.convert, got {type(model).__name__}")
    return GraphedDeltaModel(model, warmup, dense_above)
