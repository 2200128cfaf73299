"""Whole-frame CUDA graphs: capture one delta frame per input shape, then replay it.

A delta frame on the Triton backend launches a few kernels per layer and never waits for the
GPU, so the whole frame can be recorded once and replayed with one launch, which removes the
per-kernel launch overhead that otherwise dominates at low update rates. Keyframes run eagerly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .model import DeltaModel


class GraphedDeltaModel:
    """Callable like the DeltaModel it wraps; delta frames replay a captured CUDA graph."""

    def __init__(self, model: DeltaModel, warmup: int = 2) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("deltacnn.compile needs a CUDA device; on the CPU call the DeltaModel directly")
        if model.rt.stats.enabled:
            raise ValueError("disable statistics (model.enable_stats(False)) before compiling: they are read on the host")
        self.model = model
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, object]] = {}
        self._eager_deltas = 0

    def reset(self) -> None:
        self.model.reset()

    def __call__(self, x: Tensor):
        m = self.model
        if x.device.type != "cuda":
            raise ValueError(f"compiled delta models run on CUDA frames, got a tensor on {x.device}")
        keyframe_next = m.frame_index == 0 or (m.keyframe_interval is not None
                                               and m.frame_index >= m.keyframe_interval)
        if keyframe_next or self._eager_deltas < self.warmup:
            out = m(x)  # keyframes and the first delta frames (Triton autotuning, lazy allocations) run eagerly
            if not keyframe_next:
                self._eager_deltas += 1
            return out
        m._check_input(x)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        m.frame_index += 1
        return _clone(static_out)

    def _capture(self, x: Tensor):
        m = self.model
        static_in = x.clone()
        m.rt.keyframe = False
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
        m._stream = (tuple(x.shape), x.dtype, x.device)
        return graph, static_in, static_out


def _clone(out):
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


def compile(model: DeltaModel, warmup: int = 2) -> GraphedDeltaModel:  # noqa: A001 - mirrors torch.compile
    """Wrap a converted model so that delta frames replay a CUDA graph captured per input shape."""
    if not isinstance(model, DeltaModel):
        raise TypeError(f"deltacnn.compile takes the result of deltacnn.convert, got {type(model).__name__}")
    return GraphedDeltaModel(model, warmup)
