"""Where dense tensors enter and leave the delta world."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..activations import truncation_score
from ..tensor import DeltaTensor
from ..thresholds import INPUT
from .base import DeltaLayer, check_delta


class Sparsify(DeltaLayer):
    """Turn frames into deltas against the last transmitted frame (threshold over channels, optional dilation)."""

    kind = "sparsify"

    def __init__(self, name: str = INPUT, dilation: int = 1) -> None:
        super().__init__(name)
        if dilation < 1:
            raise ValueError(f"mask dilation must be >= 1, got {dilation}")
        self.dilation = dilation
        self._scratch: dict = {}  # the backend's own buffers between frames (see Backend.sparsify)

    def reset_state(self) -> None:
        super().reset_state()
        self._scratch.clear()

    def forward(self, x: Tensor) -> DeltaTensor:
        rt = self.rt
        backend = rt.backend_for(x)
        track = rt.track_change and self.name == INPUT
        # backends that may read device values decide here whether a frame is too busy for deltas
        limit = rt.busy_limit()
        promote = self.name == INPUT and limit is not None and backend.host_sync_ok and not rt.stateless
        if rt.keyframe:
            if track or promote:
                rt.input_change = self._changed_fraction(x)
                if promote and float(rt.input_change) > limit:
                    rt.stateless = True  # busy: dense without writing state; the next quiet frame re-seeds it
            # the input reference is kept even by stateless dense frames: it measures the next change
            self._seed_state("ref", x, always=True)
            d = DeltaTensor.keyframe(x.to(rt.dtype))
        else:
            ref = self._state("ref")
            # any layout: each backend reads x the way it is fastest for it
            d = backend.sparsify(x, ref, self.tau(), rt.thresholds.score, self.dilation, rt.dtype,
                                 scratch=self._scratch)
            if track or promote:
                rt.input_change = d.mask.float().mean()
            if promote and float(rt.input_change) > limit:
                # most of the frame changed: a dense pass is cheaper than sparse work, and exact; it
                # runs without state (as DeltaModel.dense_frame), so the next frame is a keyframe
                rt.keyframe = rt.stateless = True
                self._seed_state("ref", x, always=True)
                d = DeltaTensor.keyframe(x.to(rt.dtype))
        if self.name == INPUT:
            rt.input_mask = d.mask
        return self.record(d)

    def _changed_fraction(self, x: Tensor) -> Tensor:
        """Fraction of pixels whose change since the last reference passes the threshold.

        0 without a reference (a new stream): nothing to compare with, and the keyframe that
        starts a stream is no reason to run the next frame densely.
        """
        ref = self._buffers.get("state_ref")
        if ref is None or ref.shape != x.shape or ref.device != x.device:
            return torch.zeros((), device=x.device)
        return (truncation_score(x.float() - ref, self.rt.thresholds.score) > self.tau()).float().mean()


class Densify(DeltaLayer):
    """Accumulate deltas into the dense output: O += d at updated pixels; returns O (a copy)."""

    kind = "densify"

    def forward(self, d: DeltaTensor) -> Tensor:
        d = check_delta(d, self)
        if self.rt.stateless:
            return d.values.to(self.rt.dtype, copy=True)
        if d.dense:
            self._seed_state("out", d.values)
        else:
            self.rt.backend_for(d.values).accumulate(self._state("out"), d)
        return self._state("out").to(self.rt.dtype, copy=True)


class Slot:
    """Where the i-th graph value goes in a dense call's argument template."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __repr__(self) -> str:
        return f"Slot({self.i})"


def fill_template(t: Any, vals: tuple) -> Any:
    """The template's structure with every Slot(i) replaced by vals[i]."""
    if isinstance(t, Slot):
        return vals[t.i]
    if isinstance(t, tuple):
        return tuple(fill_template(x, vals) for x in t)
    if isinstance(t, list):
        return [fill_template(x, vals) for x in t]
    if isinstance(t, dict):
        return {k: fill_template(x, vals) for k, x in t.items()}
    if isinstance(t, slice):
        return slice(fill_template(t.start, vals), fill_template(t.stop, vals), fill_template(t.step, vals))
    return t


class DenseCall(DeltaLayer):
    """An op of a dense tail (after the last feature map: classifier head, box decode) run as written.

    `template` is the original call's (args, kwargs) with Slot(i) where the i-th input of this
    layer goes, so every argument, tensor or not, reaches the op. Its work (`macs`, measured at
    conversion) is recorded as done densely on every frame.
    """

    kind = "dense-tail"

    def __init__(self, name: str, fn, template: tuple | None = None, macs: int = 0, what: str = "") -> None:
        super().__init__(name)
        self.fn, self.template, self.macs, self.what = fn, template, int(macs), what

    def _call(self, vals: tuple, kw: dict) -> Any:
        if self.template is None:
            return self.fn(*vals, **kw)
        args, kwargs = fill_template(self.template, vals)
        return self.fn(*args, **kwargs)

    def forward(self, *vals, **kw):
        y = self._call(vals, kw)
        self.rt.stats.record_work(self.name, self.kind, self.macs)
        return y

    def extra_repr(self) -> str:
        return self.what


class DenseIsland(DenseCall):
    """An op with no delta form, run densely: densify its stream inputs, run it, sparsify again (tau 0).

    Correct for any op, at the cost of a dense pass; enabled by convert(allow_dense_fallback=True).
    With a `template`, inputs are the op's graph values in order and `streams[i]` says which are
    delta streams (densified first); without one, the first `n_streams` inputs are streams and
    keyword arguments pass through.
    """

    kind = "dense-island"

    def __init__(self, name: str, fn, n_streams: int, reenter: bool, template: tuple | None = None,
                 streams: list[bool] | None = None, macs: int = 0, what: str = "") -> None:
        super().__init__(name, fn, template, macs, what)
        self.is_stream = list(streams) if streams is not None else [True] * n_streams
        self.inputs = torch.nn.ModuleList(Densify(f"{name}.in{i}") for i in range(sum(self.is_stream)))
        self.output = Sparsify(f"{name}.out") if reenter else None

    def set_runtime(self, rt) -> None:
        super().set_runtime(rt)
        for m in self.inputs:
            m.set_runtime(rt)
        if self.output is not None:
            self.output.set_runtime(rt)

    def forward(self, *vals, **kw):
        dense, k = [], 0
        for i, v in enumerate(vals):
            if i < len(self.is_stream) and self.is_stream[i]:
                v = self.inputs[k](v)
                k += 1
            dense.append(v)
        y = self._call(tuple(dense), kw)
        self.rt.stats.record_work(self.name, self.kind, self.macs)
        if self.output is None:
            return y
        return self.output(y)
