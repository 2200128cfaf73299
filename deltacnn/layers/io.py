"""Where dense tensors enter and leave the delta world."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import truncation_score
from ..tensor import DeltaTensor
from ..thresholds import INPUT
from .base import DeltaLayer, check_delta


def check_min_blob(k: int) -> int:
    if not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"min_blob must be an odd window size >= 1 (1: off), got {k!r}")
    return k


class Sparsify(DeltaLayer):
    """Turn frames into deltas against the last transmitted frame (threshold over channels, optional dilation)."""

    kind = "sparsify"

    def __init__(self, name: str = INPUT, dilation: int = 1, min_blob: int = 1) -> None:
        super().__init__(name)
        if dilation < 1:
            raise ValueError(f"mask dilation must be >= 1, got {dilation}")
        self.dilation = dilation
        self.min_blob = check_min_blob(min_blob)
        self._scratch: dict = {}  # the backend's own buffers between frames (see Backend.sparsify)

    def reset_state(self) -> None:
        super().reset_state()
        self._scratch.clear()

    def forward(self, x: Tensor) -> DeltaTensor:
        rt = self.rt
        backend = rt.backend_for(x)
        first = self.name == INPUT and rt.streams is None  # the frame's input layer, not a pass of some streams
        track = rt.track_change and first
        # the model's per-stream routing: each stream's change decides whether it runs densely
        plan = rt.plan if first else None
        measure = plan is not None and plan.limits is not None and not rt.stateless
        if rt.keyframe:
            if measure:
                change = self._changed_fraction(x)
                rt.input_change = change.mean()
                plan.route(change.tolist(), keyframe_pass=True)
                if plan.first == "dense":
                    rt.stateless = True  # busy: dense without writing state; the next quiet frame re-seeds it
            elif track:
                rt.input_change = self._changed_fraction(x).mean()
            if first and rt.track_streams:
                rt.stream_change = self._changed_fraction(x)
            # the input reference is kept even by stateless dense frames: it measures the next change
            self._seed_state("ref", x, always=True)
            d = DeltaTensor.keyframe(x.to(rt.dtype))
        else:
            ref = self._state("ref")
            if self.min_blob > 1:
                x = self._without_small_blobs(x, ref)
            # any layout: each backend reads x the way it is fastest for it
            d = backend.sparsify(x, ref, self.tau(), rt.thresholds.score, self.dilation, rt.dtype,
                                 scratch=self._scratch)
            change = None
            if measure:
                change = d.mask.reshape(d.shape[0], -1).float().mean(1)
                rt.input_change = change.mean()
            elif track:
                rt.input_change = d.mask.float().mean()
            if first and rt.track_streams:
                rt.stream_change = d.mask.reshape(d.shape[0], -1).float().mean(1)
            if first and rt.keep is not None:
                # whole streams left out (an index-free mask product: no host sync, capturable); the
                # bordered copy stays: no output pixel of a left-out stream is a candidate, and a
                # window never reaches into another stream
                d = DeltaTensor(d.values, d.mask & rt.keep.view(-1, 1, 1, 1), ext=d.ext, bordered=d.bordered)
            if plan is not None:
                plan.route(change.tolist() if change is not None else None, keyframe_pass=False)
                if plan.first != "delta":
                    # no stream runs deltas (most of the frame changed, or keyframes due): a dense pass is
                    # exact and cheaper than sparse work; without state when all streams are busy (as
                    # DeltaModel.dense_frame), so that their next frame is a keyframe
                    rt.keyframe = True
                    rt.stateless = plan.first == "dense"
                    self._seed_state("ref", x, always=True)
                    d = DeltaTensor.keyframe(x.to(rt.dtype))
                elif plan.left_out():
                    # these streams run densely after this pass: here they send nothing (their reference
                    # is re-seeded by that pass)
                    d = _without_streams(d, torch.tensor(plan.left_out(), device=x.device))
        if first:
            rt.input_mask = d.mask
        return self.record(d)

    def _without_small_blobs(self, x: Tensor, ref: Tensor) -> Tensor:
        """x where the changed pixels form blobs of at least min_blob x min_blob, else the reference.

        Codec noise and sensor speckle pass the input threshold in isolated pixels that every
        receptive field then spreads through the network; a morphological opening (erosion, then
        dilation, by a k x k window) of the changed-pixel mask keeps only changes that cover a k x k
        square somewhere. Nothing is lost: held-back change stays in x - ref and is sent once its
        blob grows (or at the next keyframe). The backend then sends exactly the opened mask, since
        every pixel in it passed the threshold and every other one now has a zero difference.
        """
        d = x.float() - ref
        k = self.min_blob
        changed = (truncation_score(d, self.rt.thresholds.score) > self.tau()).unsqueeze(1).float()
        kept = F.max_pool2d(-F.max_pool2d(-changed, k, 1, k // 2), k, 1, k // 2) > 0
        return torch.where(kept, x.float(), ref)

    def _changed_fraction(self, x: Tensor) -> Tensor:
        """Per stream (N,), the fraction of pixels whose change since the last reference passes the threshold.

        0 without a reference (a new stream): nothing to compare with, and the keyframe that
        starts a stream is no reason to run the next frame densely.
        """
        ref = self._buffers.get("state_ref")
        if ref is None or ref.shape != x.shape or ref.device != x.device:
            return torch.zeros(x.shape[0], device=x.device)
        changed = truncation_score(x.float() - ref, self.rt.thresholds.score) > self.tau()
        return changed.reshape(x.shape[0], -1).float().mean(1)


def _without_streams(d: DeltaTensor, streams: Tensor) -> DeltaTensor:
    """`d` with no update in the batch rows `streams` (their values become undefined, as everywhere
    a mask is False); the bordered copy, which would still hold them, is left out."""
    mask = d.mask.clone()
    mask[streams] = False
    return DeltaTensor(d.values, mask, ext=d.ext)


class Densify(DeltaLayer):
    """Accumulate deltas into the dense output: O += d at updated pixels; returns O (a copy)."""

    kind = "densify"

    def forward(self, d: DeltaTensor) -> Tensor:
        d = check_delta(d, self)
        if self.rt.stateless:
            return d.values.to(self.rt.dtype, copy=True)
        if d.dense:
            self._seed_state("out", d.values)
            if self.rt.streams is not None:  # some streams' keyframe: their rows are this pass's output
                return d.values.to(self.rt.dtype, copy=True)
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
