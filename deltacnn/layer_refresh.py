"""Re-sending the deep layers' held-back residuals without a keyframe (`Runtime.layer_refresh`).

A nonlinear layer truncates: the change f(A) - E it does not emit stays in its state, at each pixel
below its threshold. The pixels holding such a residual are the ones the layer recomputed since the
stream's keyframe, so their AREA grows with what moved since then (the trails of walkers), and on
YOLOv8n / vtest.avi the deep layers' residuals are the larger part of the error that makes longer
keyframe intervals break the budget (BENCHMARKS.md, "Keyframe interval and drift"). A keyframe
resets them, at a dense frame's cost (and more: it seeds every layer's state).

A layer refresh resets only them. On a refresh frame the selected conv blocks (those whose output
stride is at least `stride`: the deep layers) also recompute every output pixel they touched since
the keyframe or their last refresh (zero input there: the conv adds nothing, A stays, and the
candidate f(A) - E is the held residual), with their thresholds, and those of the other selected
layers (pools), times `factor`. At factor 0 every selected conv block's emitted state E equals f(A)
afterwards: its residual is 0, and the layers after it receive the difference as ordinary deltas.
Nothing else changes: the input's unsent change and the other layers' residuals stay until they pass
their thresholds or the next keyframe. The cost scales with the area touched, not with the frame.

When (per stream): `every` frames after its keyframe or its last refresh, or once the selected conv
blocks' touched area (the mean over them of the fraction of their input pixels updated since then,
which the bookkeeping here keeps anyway) exceeds `area`. `run="keyframe"` runs a whole keyframe at
that trigger instead: an area-driven keyframe. Host backends (DeltaModel reads the area on the host);
deltacnn.compile refuses any layer refresh.

The bookkeeping: per selected conv block, the union since its stream's last refresh of its input
update masks and of its fused residual input's masks, one OR each per delta frame (bool maps at the
layer's resolution); on a refresh frame the union, dilated by the conv's window, is the set of output
pixels that may hold a residual, and it joins the conv's candidates through a zero-valued residual
delta (Backend.conv_block: pixels that are candidates through the residual alone gather zero taps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .geometry import dilate_mask
from .tensor import DeltaTensor, new_rows_ext, stream_fraction

RUNS = ("flush", "keyframe")


@dataclass(frozen=True)
class LayerRefresh:
    """When the deep layers' residuals are re-sent, which layers, and how (see the module docstring).

    Spec strings (`parse`, `spec`): ``"flush:8"`` (every 8 frames after the keyframe or the last
    refresh), ``"flush:a0.3"`` (once the touched area passes 0.3), ``"keyframe:a0.3"`` (a keyframe
    then), optionally ``":s8"`` (layers of output stride >= 8; default 16) and ``"@0.25"`` (threshold
    factor on refresh frames; default 0), e.g. ``"flush:8:s8@0.25"``.
    """

    every: int | None = None
    area: float | None = None
    stride: float = 16.0
    factor: float = 0.0
    run: str = "flush"

    def __post_init__(self) -> None:
        if self.run not in RUNS:
            raise ValueError(f"layer refresh run must be one of {RUNS}, got {self.run!r}")
        if (self.every is None) == (self.area is None):
            raise ValueError("a layer refresh needs exactly one trigger: every N frames or a touched area")
        if self.every is not None and (not isinstance(self.every, int) or isinstance(self.every, bool)
                                       or self.every < 1):
            raise ValueError(f"layer refresh interval must be an integer >= 1, got {self.every!r}")
        if self.area is not None and not (isinstance(self.area, (int, float)) and 0 <= self.area <= 1):
            raise ValueError(f"layer refresh area must be a fraction in [0, 1], got {self.area!r}")
        if not (isinstance(self.stride, (int, float)) and math.isfinite(self.stride) and self.stride > 0):
            raise ValueError(f"layer refresh stride must be a number > 0, got {self.stride!r}")
        if not (isinstance(self.factor, (int, float)) and 0 <= self.factor <= 1):
            raise ValueError(f"layer refresh threshold factor must be in [0, 1], got {self.factor!r}")
        if self.run == "keyframe" and self.factor != 0.0:
            raise ValueError("a threshold factor is an option of layer refresh 'flush', not of 'keyframe'")

    @classmethod
    def parse(cls, spec: "str | LayerRefresh | None") -> "LayerRefresh | None":
        """'flush:8', 'flush:a0.3', 'keyframe:a0.3', with ':sS' and '@F' (None or 'off': None)."""
        if spec is None or isinstance(spec, LayerRefresh):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"layer refresh must be a string such as 'flush:8' or 'flush:a0.3', got {spec!r}")
        s = spec.strip()
        if s == "off":
            return None
        body, at, factor = s.partition("@")
        parts = body.split(":")
        try:
            if len(parts) in (2, 3) and parts[0] in RUNS:
                trig = parts[1]
                every = int(trig) if not trig.startswith("a") else None
                area = float(trig[1:]) if trig.startswith("a") else None
                stride = 16.0
                if len(parts) == 3:
                    if not parts[2].startswith("s"):
                        raise ValueError(parts[2])
                    stride = float(parts[2][1:])
                return cls(every, area, stride, float(factor) if at else 0.0, parts[0])
        except ValueError as e:
            if "layer refresh" in str(e) or "trigger" in str(e):
                raise ValueError(f"layer refresh {spec!r}: {e}") from None
        raise ValueError(f"cannot parse layer refresh {spec!r}; use 'flush:N' (every N frames) or 'flush:aA' (touched "
                         "area above A), or 'keyframe:aA', optionally ':sS' (layers of output stride >= S, default 16) "
                         "and '@F' (their threshold factor on refresh frames, default 0)")

    def spec(self) -> str:
        """The string `parse` reads back."""
        trig = str(self.every) if self.every is not None else f"a{self.area:g}"
        s = f"{self.run}:{trig}"
        if self.stride != 16.0:
            s += f":s{self.stride:g}"
        if self.factor:
            s += f"@{self.factor:g}"
        return s

    def describe(self) -> str:
        what = "flush of the residuals" if self.run == "flush" else "keyframe"
        when = f"every {self.every} frames" if self.every is not None else f"when their touched area > {self.area:g}"
        how = f" (thresholds x {self.factor:g})" if self.run == "flush" and self.factor else ""
        return f"{what} of layers with stride >= {self.stride:g} {when}{how}"

    def selected(self, strides: dict[str, float]) -> frozenset[str]:
        """The threshold names of the layers this refresh reaches (output stride recorded by convert)."""
        return frozenset(n for n, s in strides.items() if s >= self.stride)


@dataclass
class TouchState:
    """Per selected conv block (by threshold name): [input pixels updated, residual-input pixels updated]
    since each stream's keyframe or last refresh ((N, 1, H, W) bool, the second None until a residual came);
    `rows`: the streams that refresh on the frame being run ((N,) bool; None: none)."""

    masks: dict[str, list] = field(default_factory=dict)
    rows: Tensor | None = None
    _names: frozenset[str] = frozenset()
    _key: tuple | None = None

    def names(self, lr: LayerRefresh, strides: dict[str, float]) -> frozenset[str]:
        key = (lr.stride, id(strides), len(strides))
        if key != self._key:
            self._names, self._key = lr.selected(strides), key
        return self._names

    def clear(self, i: int | None = None) -> None:
        """Forget what stream i (None: every stream) touched: its keyframe reset every residual."""
        if i is None:
            self.masks.clear()
            return
        for u in self.masks.values():
            for m in u:
                if m is not None and i < m.shape[0]:
                    m[i] = False

    def area(self, n: int) -> list[float]:
        """Per stream, the mean over the selected conv blocks of the fraction of their input pixels touched."""
        fr = [stream_fraction(u[0]) for u in self.masks.values() if u[0].shape[0] == n]
        if not fr:
            return [0.0] * n
        return torch.stack(fr).mean(0).tolist()


def touch(layer, d: DeltaTensor, residual: DeltaTensor | None) -> DeltaTensor | None:
    """A selected conv block's bookkeeping on a delta frame, and on a refresh frame the residual delta
    (the conv's own, if any, with zeros at every pixel it may hold a residual) that makes the conv
    recompute those pixels. Layers the refresh does not select pass through unchanged."""
    rt = layer.rt
    lr, ts = rt.layer_refresh, rt.touch
    name = layer.act_name
    if name not in ts.names(lr, rt.thresholds.strides):
        return residual
    u = ts.masks.get(name)
    if u is None or u[0].shape != d.mask.shape:
        u = ts.masks[name] = [torch.zeros_like(d.mask), None]
    u_in, u_res = u[0] | d.mask, u[1]
    if residual is not None:
        u_res = residual.mask.clone() if u_res is None or u_res.shape != residual.mask.shape else u_res | residual.mask
    rows = ts.rows
    if rows is not None:
        n, _, h, w = d.shape
        out_hw = layer.window.out_size(h, w)
        extra = dilate_mask(u_in, layer.window, out_hw)
        if u_res is not None:
            extra |= u_res
        sel = rows.view(-1, 1, 1, 1)
        residual = with_candidates(residual, extra & sel, layer.weight.shape[0], out_hw, rt.dtype)
        if lr.factor == 0:  # the refresh sends all of it: these streams hold no residual here afterwards
            u_in = u_in & ~sel
            u_res = u_res & ~sel if u_res is not None else None
    u[0], u[1] = u_in, u_res
    return residual


def with_candidates(residual: DeltaTensor | None, extra: Tensor, channels: int, out_hw: tuple[int, int],
                    dtype: torch.dtype) -> DeltaTensor:
    """`residual` (None: none) with zero-valued updates added at the pixels of `extra` ((N, 1, Ho, Wo) bool):
    the conv block computes those pixels too and adds nothing there."""
    n = extra.shape[0]
    ho, wo = out_hw
    vdtype = residual.dtype if residual is not None else dtype
    ext, vals = new_rows_ext(n, channels, ho, wo, dtype=vdtype, device=extra.device)
    if residual is None:
        ext.zero_()
        return DeltaTensor(vals, extra, ext=ext)
    vals.copy_(residual.zero_filled())
    return DeltaTensor(vals, residual.mask | extra, ext=ext)
