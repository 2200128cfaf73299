"""A delta frame's time predicted from its statistics, calibrated on this device.

Measured time on a shared machine is noisy (other processes deschedule the threads), so decisions
taken on it are noisy too. The work a delta frame does is not: its multiply-adds and which layers
ran are fixed by the thresholds. `CostModel` turns them into milliseconds with three coefficients
fitted to CPU-clock timings of real frames on the device:

    ms = base + per_layer * (layers that did any work) + per_mac * (multiply-adds done)

`base` is the per-frame overhead (input layer, dense tail, Python), `per_layer` the fixed cost of
a layer that runs at all (launches, candidate masks, gathers), `per_mac` the arithmetic. Keyframes
and dense frames run the dense convolutions (oneDNN / cuDNN) at another cost per multiply-add than
sparse work, so they are not in that fit: they cost `keyframe_ms`, the mean of their measured
times (every pass starts with one), so a refresh rule is priced at what its keyframes really cost.
The tuner (`deltacnn tune`) ranks settings by the mean prediction over all frames (delta frames,
flushes, keyframes) and reports measured times beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .stats import FrameStats


@dataclass(frozen=True)
class FrameWork:
    """What one delta frame did: its multiply-adds and the number of layers that did any."""

    macs: int
    active_layers: int
    dense: bool = False  # a keyframe or dense frame (priced at CostModel.keyframe_ms)

    @classmethod
    def of(cls, fs: FrameStats) -> FrameWork:
        return cls(int(fs.macs), sum(1 for s in fs.layers.values() if s.macs > 0), bool(fs.keyframe))


@dataclass(frozen=True)
class CostModel:
    base_ms: float
    per_layer_ms: float
    per_gmac_ms: float  # per 1e9 multiply-adds
    keyframe_ms: float | None = None  # measured mean of keyframes and dense frames (None: none seen)

    def predict(self, w: FrameWork) -> float:
        if w.dense and self.keyframe_ms is not None:
            return self.keyframe_ms
        return self.base_ms + self.per_layer_ms * w.active_layers + self.per_gmac_ms * w.macs * 1e-9

    def mean_ms(self, works: Sequence[FrameWork]) -> float:
        """The predicted mean time of these frames (nan for none)."""
        return sum(self.predict(w) for w in works) / len(works) if works else float("nan")

    @classmethod
    def fit(cls, works: Sequence[FrameWork], ms: Sequence[float]) -> CostModel:
        """Keyframes (`FrameWork.dense`) at their mean time; the delta frames by least squares with every
        coefficient >= 0 (a negative cost is noise, not a finding). Without delta frames, the keyframes
        are fitted like them.

        Columns the samples cannot tell apart (e.g. every frame ran every layer) are dropped by the
        non-negative solve, so their cost is carried by the others; when no per-MAC cost is left,
        time proportional to the multiply-adds. Needs at least one finite sample.
        """
        rows = [(w, t) for w, t in zip(works, ms) if t is not None and math.isfinite(t)]
        if not rows:
            raise ValueError("CostModel.fit needs at least one finite timing")
        keys = [t for w, t in rows if w.dense]
        key_ms = float(np.mean(keys)) if keys else None
        if any(not w.dense for w, _ in rows):
            rows = [(w, t) for w, t in rows if not w.dense]
        a = np.array([[1.0, w.active_layers, w.macs * 1e-9] for w, _ in rows])
        y = np.array([t for _, t in rows])
        coef = _nonneg_lstsq(a, y)
        if coef[2] == 0 and a[:, 2].sum() > 0:
            # no per-MAC cost found: the frames' work varied too little against the timing noise (the
            # first trials of a search). A flat model would rank every setting alike; time
            # proportional to the work is the better guess until the samples tell more.
            return cls(0.0, 0.0, float(y.sum() / a[:, 2].sum()), key_ms)
        return cls(float(coef[0]), float(coef[1]), float(coef[2]), key_ms)

    def describe(self) -> str:
        key = f"; keyframes {self.keyframe_ms:.1f} ms" if self.keyframe_ms is not None else ""
        return (f"{self.base_ms:.2f} ms + {self.per_layer_ms:.3f} ms per active layer + "
                f"{self.per_gmac_ms:.1f} ms per GMAC (delta frames){key}")


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min |a x - y| with x >= 0, by dropping the most negative coefficient until none is left (3 columns)."""
    cols = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while cols:
        sol, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[cols] = sol
            return x
        cols.pop(int(np.argmin(sol)))
    return x
