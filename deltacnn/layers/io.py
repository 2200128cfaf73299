"""Where dense tensors enter and leave the delta world."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import truncation_score
from ..gating import InputGate, gated_mask
from ..tensor import DeltaTensor, stream_fraction
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
        self.gate = InputGate(min_blob=check_min_blob(min_blob))  # deltacnn.gating: what of the change is sent
        self._scratch: dict = {}  # the backend's own buffers between frames (see Backend.sparsify)
        self._sent: Tensor | None = None  # the pixels sent on the last frame (temporal hysteresis only)

    @property
    def min_blob(self) -> int:
        return self.gate.min_blob

    @min_blob.setter
    def min_blob(self, k: int) -> None:
        self.gate = replace(self.gate, min_blob=check_min_blob(k))

    def reset_state(self) -> None:
        super().reset_state()
        self._scratch.clear()
        self._sent = None

    def forward(self, x: Tensor) -> DeltaTensor:
        rt = self.rt
        backend = rt.backend_for(x)
        first = self.name == INPUT and rt.streams is None  # the frame's input layer, not a pass of some streams
        track = rt.track_change and first
        # the model's per-stream routing: each stream's change decides whether it runs densely
        plan = rt.plan if first else None
        measure = plan is not None and plan.limits is not None and not rt.stateless
        if rt.keyframe:
            streams = first and rt.track_streams
            change = self._changed_fraction(x) if measure or track or streams else None  # one pass for all
            if measure or track:
                rt.input_change = change.mean()
            if measure:
                plan.route(change.tolist(), keyframe_pass=True)
                if plan.first == "dense":
                    rt.stateless = True  # busy: dense without writing state; the next quiet frame re-seeds it
            if streams:
                rt.stream_change = change
            d = self._keyframe(x)
        else:
            ref = self._state("ref")
            tau = self.tau()
            gate, sent = self.gate, x
            d = self._blobs_fused(backend, x, ref, tau)
            if d is None and gate.active:
                # the gated frame goes to the backend only: a dense pass below still runs on x itself
                sent = self._gated(x, ref, tau)
                tau = gate.send_threshold(tau)
            if d is None:
                # any layout: each backend reads x the way it is fastest for it
                d = backend.sparsify(sent, ref, tau, rt.thresholds.score, self.dilation, rt.dtype,
                                     scratch=self._scratch)
            change = None
            if measure or track or (first and rt.track_streams):
                fractions = stream_fraction(d.mask)  # once, for each of the three users
                if measure:
                    change = fractions
                if measure or track:
                    rt.input_change = fractions.mean()
                if first and rt.track_streams:
                    rt.stream_change = fractions
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
                    d = self._keyframe(x)
                elif plan.left_out():
                    # these streams run densely after this pass: here they send nothing (their reference
                    # is re-seeded by that pass)
                    d = _without_streams(d, torch.tensor(plan.left_out(), device=x.device))
        if self.gate.temporal and not rt.keyframe:
            self._sent = d.mask.clone()  # what went out (dilated, streams left out): continues next frame
        if first:  # a keyframe's all-true mask is shared (tensor.all_true_mask): users get their own
            rt.input_mask = d.mask.clone() if d.dense else d.mask
        out = self.record(d)
        if first and not rt.keyframe and rt.skip is not None:
            # deltacnn.compile is capturing this delta pass: the rest of the network runs only when some
            # pixel is sent (compile.StaticSkip)
            rt.skip.begin(d.mask)
        return out

    def _keyframe(self, x: Tensor) -> DeltaTensor:
        """The frame as a keyframe. The input reference is seeded with x (even by stateless dense frames:
        it measures the next change); when it then holds x exactly (float32 throughout, the whole batch)
        it is the keyframe's values too: one copy of the frame instead of two (the reference is
        channels_last, as the first conv reads it). Nothing writes the reference before the next frame."""
        rt = self.rt
        self._seed_state("ref", x, always=True)
        self._forget_sent()
        if rt.streams is None and x.dtype == rt.dtype == torch.float32:
            return DeltaTensor.keyframe(self._state("ref"))
        return DeltaTensor.keyframe(x.to(rt.dtype))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dilation={self.dilation}, gate={self.gate.describe()}"

    def _blobs_fused(self, backend, x: Tensor, ref: Tensor, tau: float) -> DeltaTensor | None:
        """The delta of a frame gated by min_blob alone, with a whole refresh flush, in one backend pass
        where the backend has one (the same pixels as _gated + sparsify); None: the generic path runs
        (gate tiles, hysteresis, input dilation and flushes in tiles)."""
        g = self.gate
        if g.min_blob == 1 or (g.tile > 1 and g.tile_min > 1) or g.hysteresis_on or self.dilation > 1:
            return None
        flush = self._flushed_streams()
        if flush is not None and self.rt.refresh.tiled:  # the fused pass sends every held pixel
            return None
        got = backend.sparsify_blobs(x, ref, tau, self.rt.thresholds.score, g.min_blob, self.rt.dtype, flush,
                                     scratch=self._scratch, want_held=self.rt.refresh_held is not None)
        if got is None:
            return None
        d, held = got
        if self.rt.refresh_held is not None:
            self.rt.input_held = held
        return d

    def _flushed_streams(self) -> list[bool] | None:
        """Per stream, whether a refresh "flush" sends the change the gate holds back on this frame
        (deltacnn.gating.Refresh; set by DeltaModel for the model's input); None: no stream flushes."""
        flush = self.rt.flush if self.name == INPUT and self.rt.streams is None else None
        return flush if flush is not None and any(flush) else None

    def _gated(self, x: Tensor, ref: Tensor, tau: float) -> Tensor:
        """x where the gate sends the pixel's change, else the reference (deltacnn.gating, self.gate).

        Nothing is lost: held-back change stays in x - ref and is sent once it passes the gate (or at
        the next keyframe). The backend then sends exactly the gated mask, since every pixel in it
        passes gate.send_threshold(tau) and every other one now has a zero difference.
        """
        score = truncation_score(x.float() - ref, self.rt.thresholds.score)
        gate = self.gate
        prev = self._sent if gate.temporal and self._sent is not None and self._sent.shape[0] == x.shape[0] else None
        kept = gated_mask(score, tau, gate, prev)
        flush = self._flushed_streams()
        if flush is not None:  # refresh "flush": these streams send what the gate holds back (Refresh)
            rows = torch.tensor(flush, device=kept.device).view(-1, 1, 1, 1)
            kept = kept | (self.rt.refresh.flush_mask((score > tau).unsqueeze(1) & ~kept) & rows)
        if self.rt.refresh_held is not None:
            held = (score > tau).unsqueeze(1) & ~kept
            self.rt.input_held = stream_fraction(held)
        return torch.where(kept, x.float(), ref)

    def _forget_sent(self) -> None:
        """After a keyframe nothing is pending: no pixel continues an update (temporal hysteresis)."""
        if self._sent is None:
            return
        if self.rt.streams is not None and self._sent.shape[0] > int(self.rt.streams.max()):
            self._sent[self.rt.streams] = False  # a keyframe of some streams: only their rows start over
        else:
            self._sent = None

    def _changed_fraction(self, x: Tensor) -> Tensor:
        """Per stream (N,), the fraction of pixels whose change since the last reference passes the threshold.

        0 without a reference (a new stream): nothing to compare with, and the keyframe that
        starts a stream is no reason to run the next frame densely.
        """
        ref = self._buffers.get("state_ref")
        if ref is None or ref.shape != x.shape or ref.device != x.device:
            return torch.zeros(x.shape[0], device=x.device)
        return self.rt.backend_for(x).changed_fraction(x, ref, self.tau(), self.rt.thresholds.score)


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
