"""`deltacnn tune`: per-layer thresholds that keep the task output within a budget of dense."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import viz
from ..calibration import measure_scales
from ..model import DeltaModel
from ..tasks.base import Task, to_float
from ..thresholds import INPUT
from .common import (UserError, build_delta, finite_mean, finite_median, get_task, load_model, open_video,
                     resolve_device, resolve_dtype, save_json, timed)
from .run import LOWER_BETTER


@dataclass
class Budget:
    """`metric op value`: how close to dense the task output must stay (aggregated over the clip)."""

    metric: str | None  # None: the task's `budget_metric`, else the first metric `agreement` returns
    op: str  # ">=" or "<=" (None-metric budgets resolve the op from the metric name)
    value: float
    aggregate: str = "mean"  # "mean" or "worst" over the calibration frames

    def resolve(self, metrics: dict[str, float], task: Task) -> Budget:
        name = self.metric or getattr(task, "budget_metric", None) or next(iter(metrics), None)
        if name not in metrics:
            raise UserError(f"budget metric {name!r} is not reported by task {task.name!r}; "
                            f"available: {', '.join(metrics)}")
        op = self.op or ("<=" if LOWER_BETTER.search(name) else ">=")
        return Budget(name, op, self.value, self.aggregate)

    def score(self, per_frame: Sequence[dict[str, float]]) -> float:
        vals = [float(m[self.metric]) for m in per_frame]
        if self.aggregate == "mean":
            return finite_mean(vals)
        return min(vals) if self.op == ">=" else max(vals)

    def holds(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        return score >= self.value if self.op == ">=" else score <= self.value

    def __str__(self) -> str:
        return f"{self.aggregate} {self.metric} {self.op} {self.value:g}"


def parse_budget(spec: str | float, aggregate: str = "mean") -> Budget:
    """'0.95' (the task's main metric, direction from its name), 'f1>=0.95' or 'rel_error<=0.01'."""
    if aggregate not in ("mean", "worst"):
        raise UserError(f"budget aggregate must be mean or worst, got {aggregate!r}")
    if isinstance(spec, (int, float)):
        return Budget(None, "", float(spec), aggregate)
    m = re.fullmatch(r"\s*(?:([A-Za-z_][\w.]*)\s*(>=|<=)\s*)?([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", spec)
    if not m:
        raise UserError(f"cannot parse --budget {spec!r}; use a number (e.g. 0.95) or METRIC>=VALUE / METRIC<=VALUE "
                        "(e.g. f1>=0.95, rel_error<=0.01)")
    return Budget(m.group(1), m.group(2) or "", float(m.group(3)), aggregate)


def controlled_macs(dm: DeltaModel, dense_stats) -> dict[str, int]:
    """Dense multiply-adds downstream of each thresholded layer, up to the next thresholded one.

    A layer's threshold decides which pixels its consumers must recompute, so this is the work
    raising that threshold can save; tune tries the biggest levers first.
    """
    known = set(dm.thresholds.known)
    gm = dm.graph_module
    mods = dict(gm.named_modules())

    def tname(node) -> str | None:
        m = mods.get(node.target) if node.op == "call_module" else None
        if m is None:
            return None
        act = getattr(m, "act_name", None)
        return act if act is not None and getattr(m, "act", True) is not None else getattr(m, "name", None)

    out = {name: 0 for name in known}
    for node in gm.graph.nodes:
        t = tname(node)
        if t not in known:
            continue
        seen, stack = set(), list(node.users)
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            m = mods.get(u.target) if u.op == "call_module" else None
            s = dense_stats.layers.get(getattr(m, "name", None)) if m is not None else None
            if s is not None:
                out[t] += s.dense_macs
            if tname(u) in known:
                continue
            stack.extend(u.users)
    return out


@dataclass
class Trial:
    """One evaluation of a threshold setting on the calibration frames."""

    stage: str
    input: float
    default: float
    overrides: dict[str, float]
    score: float
    macs_fraction: float
    ms: float  # median time of the delta frames (keyframes left out)
    ok: bool

    def row(self) -> dict:
        return {"stage": self.stage, "input": self.input, "default": self.default, "overrides": dict(self.overrides),
                "score": self.score, "macs_fraction": self.macs_fraction, "ms": self.ms, "ok": self.ok}


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """Trials no other trial beats on both time (lower) and task agreement (higher), fastest first."""
    front: list[Trial] = []
    for t in sorted(trials, key=lambda t: (t.ms, -t.score)):
        if not math.isfinite(t.ms) or not math.isfinite(t.score):
            continue
        if not front or t.score > front[-1].score:
            front.append(t)
    return front


@dataclass
class TuneResult:
    """Tuned thresholds (saved at `path`), the budget, and what they achieve on calibration and held-out frames."""

    path: Path | None
    thresholds: dict
    budget: Budget
    best: Trial
    exact: Trial  # all thresholds 0 (the dense-equivalent delta model)
    evals: int
    history: list[Trial]
    calib_frames: tuple[int, int]
    heldout: dict | None = None  # the same metrics on frames tuning never saw
    pareto_path: Path | None = None
    plot_path: Path | None = None

    @property
    def score(self) -> float:
        return self.best.score

    @property
    def macs_fraction(self) -> float:
        return self.best.macs_fraction

    def table(self) -> str:
        b, e = self.best, self.exact
        a, z = self.calib_frames
        lines = [
            f"budget {self.budget}, tuned on frames {a}-{z - 1} (relative thresholds: input x frame range, "
            "layers x their keyframe activation scale)",
            f"  input threshold          {b.input:.4g}",
            f"  layer threshold          {b.default:.4g}   (+ {len(b.overrides)} per-layer overrides)",
            f"  calibration              {self.budget.metric} {b.score:.4g}   MACs {b.macs_fraction:6.1%}   "
            f"delta frame {b.ms:7.2f} ms   (exact: MACs {e.macs_fraction:.1%}, {e.ms:.2f} ms)",
        ]
        if self.heldout:
            h = self.heldout
            lines.append(f"  held-out frames {h['frames'][0]}-{h['frames'][1] - 1}   {self.budget.metric} "
                         f"{h['score']:.4g}   MACs {h['macs_fraction']:6.1%}   delta frame {h['ms']:7.2f} ms"
                         + ("   (budget met)" if self.budget.holds(h['score']) else "   (BUDGET MISSED on held-out frames)"))
        lines.append(f"  evaluations              {self.evals}")
        if self.path:
            lines.append(f"  thresholds written to    {self.path}")
        if self.pareto_path:
            lines.append(f"  Pareto table             {self.pareto_path}" + (f"  (plot {self.plot_path})" if self.plot_path else ""))
        return "\n".join(lines)

    def pareto_table(self) -> str:
        rows = ["| delta frame ms | " + str(self.budget.metric) + " | MACs | input | layers | overrides | stage |",
                "|---|---|---|---|---|---|---|"]
        for t in pareto_front(self.history):
            rows.append(f"| {t.ms:.2f} | {t.score:.4f} | {t.macs_fraction:.1%} | {t.input:.4g} | {t.default:.4g} | "
                        f"{len(t.overrides)} | {t.stage} |")
        return "\n".join(rows)


class _Evaluator:
    """Plays frames through the delta model under given (relative) thresholds.

    Returns the budget score against the dense results, the MACs fraction and the median time of the
    non-keyframes (the steady state thresholds act on).
    """

    def __init__(self, dm: DeltaModel, task: Task, xs: list[Tensor], refs: list[Any], budget: Budget,
                 device: torch.device) -> None:
        self.dm, self.task, self.xs, self.refs, self.budget, self.device = dm, task, xs, refs, budget, device
        self.evals = 0
        self._resolved = False

    def set(self, input_tau: float, default: float, overrides: dict[str, float]) -> None:
        th = self.dm.thresholds
        th.default, th.input, th.overrides = default, input_tau, dict(overrides)

    def __call__(self, input_tau: float, default: float, overrides: dict[str, float]) -> tuple[float, float, float]:
        self.set(input_tau, default, overrides)
        per_frame, macs, ms = play(self.dm, self.task, self.xs, self.refs, self.device)
        self.evals += 1
        if not self._resolved:  # the metric names are known after the first pass
            self.budget, self._resolved = self.budget.resolve(per_frame[0], self.task), True
        return self.budget.score(per_frame), macs, ms


def play(dm: DeltaModel, task: Task, xs: Sequence[Tensor], refs: Sequence[Any],
         device: torch.device) -> tuple[list[dict[str, float]], float, float]:
    """Per-frame agreement, MACs fraction and median delta-frame ms of `xs` from a keyframe on."""
    dm.reset()
    metrics, macs, dense, times = [], 0, 0, []
    for i, x in enumerate(xs):
        y, ms = timed(dm, x, device)
        fs = dm.frame_stats()
        if not fs.keyframe:
            macs, dense = macs + fs.macs, dense + fs.dense_macs
            times.append(ms)
        metrics.append(task.agreement(task.postprocess(to_float(y)), refs[i]))
    return metrics, (macs / dense if dense else 1.0), (finite_median(times) if times else float("nan"))


def _frames(video, start: int, count: int, task: Task, dense, dev: torch.device, what: str, reader: str = "auto"):
    """`count` frames from `start` of the source, preprocessed, with the dense model's results."""
    src = open_video(video, start + count, reader=reader)
    xs, refs = [], []
    with torch.no_grad():
        for i, f in enumerate(src):
            if i < start:
                continue
            x = task.preprocess(f).to(dev)
            xs.append(x)
            refs.append(task.postprocess(dense(x)))
    if len(xs) < 2:
        raise UserError(f"{what} frames {start}-{start + count - 1}: the source {src.label} has only "
                        f"{start + len(xs)} frame(s); need at least 2 in the segment")
    return xs, refs


def tune(video: str | int | Path | None = None, model: str | Task | None = None, *, budget: str | float | Budget = 0.95,
         aggregate: str = "mean", frames: int = 30, start_frame: int = 0, heldout_frames: int = 0,
         heldout_start: int | None = None, max_evals: int = 40, device: str | None = None,
         dtype: str | torch.dtype | None = None, keyframe_interval: int | None = None, backend: str | None = None,
         min_blob: int = 1, out: str | Path | None = None, start: float = 0.01, time_tolerance: float = 0.03,
         quiet: bool = False, reader: str = "auto", input_gate=None, threshold_growth: float = 0.0,
        refresh_held: float | None = None) -> TuneResult:
    """Find the input and per-layer thresholds with the lowest measured delta-frame time whose task
    agreement with dense stays within `budget`, on calibration frames [start_frame, start_frame + frames).

    Thresholds are relative (calibration.measure_scales): the input's a fraction of the frame's value
    range, each layer's a fraction of its activation scale on the first calibration frame. Search
    (bounded by `max_evals` passes over the calibration frames; every pass is timed):
      1. input first: raise the input threshold x2 from `start` with the layers exact, then bisect to
         the largest value within budget, and keep half of it so the layers get budget too;
      2. together: from there, repeatedly try raising the input threshold and the global layer
         threshold (x1.5 each), keep whichever move holds the budget and is fastest;
      3. per layer, largest lever first (dense MACs downstream): double while the budget holds and
         time does not grow by more than `time_tolerance` (timing noise).
    The answer is the fastest trial within budget (within `time_tolerance` of it, the one with the
    fewest multiply-adds: differences below the timing noise decide nothing). With `heldout_frames`, it is then measured on the
    disjoint segment [heldout_start, +heldout_frames) (default: right after the calibration frames).
    Writes the thresholds JSON to `out` if given, with a Pareto table (pareto.md) and plot (pareto.png)
    of time against agreement beside it.
    """
    if frames < 2:
        raise UserError(f"--frames must be >= 2 (the first frame is a dense keyframe), got {frames}")
    if max_evals < 2:
        raise UserError(f"--max-evals must be >= 2, got {max_evals}")
    if not start > 0:
        raise UserError(f"start threshold must be > 0, got {start}")
    if start_frame < 0 or heldout_frames < 0:
        raise UserError("frame numbers must be >= 0")
    hstart = start_frame + frames if heldout_start is None else heldout_start
    if heldout_frames and hstart < start_frame + frames and hstart + heldout_frames > start_frame:
        raise UserError(f"held-out frames {hstart}-{hstart + heldout_frames - 1} overlap the calibration frames "
                        f"{start_frame}-{start_frame + frames - 1}: choose a disjoint segment")
    b = budget if isinstance(budget, Budget) else parse_budget(budget, aggregate)
    task = get_task(model)
    dev = resolve_device(device)
    dense = load_model(task, dev)
    xs, refs = _frames(video, start_frame, frames, task, dense, dev, "calibration", reader)
    dm = build_delta(dense, xs[0], dtype=resolve_dtype(dtype), keyframe_interval=keyframe_interval, backend=backend,
                     min_blob=min_blob, input_gate=input_gate, threshold_growth=threshold_growth,
                     refresh_held=refresh_held)
    measure_scales(dm, xs[0])
    dm.enable_stats(True)
    ev = _Evaluator(dm, task, xs, refs, b, dev)
    bar = None if quiet else __import__("tqdm").tqdm(total=max_evals, desc="deltacnn tune", unit="eval", leave=False,
                                                      dynamic_ncols=True)
    history: list[Trial] = []

    def evaluate(stage: str, ti: float, tg: float, overrides: dict[str, float]) -> Trial:
        score, macs, ms = ev(ti, tg, overrides)
        t = Trial(stage, ti, tg, dict(overrides), score, macs, ms, ev.budget.holds(score))
        history.append(t)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{stage} {ev.budget.metric}={score:.4g} MACs={macs:.1%} {ms:.1f}ms")
        return t

    def left() -> bool:
        return ev.evals < max_evals

    try:
        exact = evaluate("exact", 0.0, 0.0, {})
        if not exact.ok:
            raise UserError(f"budget {ev.budget} is not met even at threshold 0 (dense-equivalent output: "
                            f"{ev.budget.metric} = {exact.score:.4g}); loosen the budget")
        # 1. input first, layers exact: bracket x2, then geometric bisection
        lo, hi, tau = 0.0, None, start
        while left() and tau <= 1.0:
            t = evaluate("input", tau, 0.0, {})
            if not t.ok:
                hi = tau
                break
            lo, tau = tau, tau * 2
        while hi is not None and left() and ev.evals < max_evals * 0.3:
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
            if lo > 0 and hi / lo < 1.3:
                break
            t = evaluate("input", mid, 0.0, {})
            lo, hi = (mid, hi) if t.ok else (lo, mid)
        # 2. input and layers together: the faster of two moves that keep the budget
        ti, tg = lo / 2, start
        cur = evaluate("together", ti, tg, {}) if left() else exact
        if not cur.ok:
            ti, tg = lo, 0.0
        while left() and ev.evals < max_evals * 0.7:
            moves = [evaluate("together", ti * 1.5, tg, {})]
            if left():
                moves.append(evaluate("together", ti, tg * 1.5 if tg else start, {}))
            good = [m for m in moves if m.ok]
            if not good:
                break
            m = min(good, key=lambda m: m.ms)
            ti, tg = m.input, m.default
        # 3. per layer, largest lever first
        overrides: dict[str, float] = {}
        ref_ms = _best(history, time_tolerance).ms
        levers = controlled_macs(dm, _first_delta_stats(dm, xs))
        for name in sorted((n for n in levers if levers[n] > 0 and n != INPUT), key=lambda n: -levers[n]):
            for _ in range(3):
                if not left():
                    break
                trial = {**overrides, name: max(overrides.get(name, tg) * 2, start)}
                t = evaluate(f"layer {name}", ti, tg, trial)
                if t.ok and t.ms <= ref_ms * (1 + time_tolerance):
                    overrides, ref_ms = trial, min(ref_ms, t.ms)
                else:
                    break
            if not left():
                break
    finally:
        if bar is not None:
            bar.close()
    best = _best(history, time_tolerance)
    ev.set(best.input, best.default, best.overrides)
    heldout = None
    if heldout_frames:
        hx, hr = _frames(video, hstart, heldout_frames, task, dense, dev, "held-out", reader)
        scores, macs, ms = play(dm, task, hx, hr, dev)
        heldout = {"frames": (hstart, hstart + len(hx)), "score": ev.budget.score(scores), "macs_fraction": macs,
                   "ms": ms}
        ev.set(best.input, best.default, best.overrides)
    res = TuneResult(None, dm.thresholds.to_dict(), ev.budget, best, exact, ev.evals, history,
                     (start_frame, start_frame + len(xs)), heldout)
    if out is not None:
        _write(res, dm, Path(out))
    return res


def _best(history: Sequence[Trial], time_tolerance: float = 0.03) -> Trial:
    """The fastest trial within budget; trials within `time_tolerance` of the fastest count as equally
    fast (timing noise), and of those the one with the fewest multiply-adds wins."""
    ok = [t for t in history if t.ok and math.isfinite(t.ms)]
    if not ok:
        return history[0]
    fastest = min(t.ms for t in ok)
    return min((t for t in ok if t.ms <= fastest * (1 + time_tolerance)), key=lambda t: (t.macs_fraction, t.ms))


def _write(res: TuneResult, dm: DeltaModel, path: Path) -> None:
    """The thresholds file, and beside it the Pareto table, plot and every trial as JSON."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        dm.thresholds.save(path)
        res.path = path
        res.pareto_path = path.with_name(path.stem + "_pareto.md")
        res.pareto_path.write_text(res.pareto_table() + "\n")
        save_json({"budget": str(res.budget), "best": res.best.row(), "heldout": res.heldout,
                   "trials": [t.row() for t in res.history]}, path.with_name(path.stem + "_trials.json"))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    res.plot_path = viz.pareto_plot([(t.ms, t.score, t.ok) for t in res.history],
                                    [(t.ms, t.score) for t in pareto_front(res.history)],
                                    (res.best.ms, res.best.score), str(res.budget.metric), res.budget.value,
                                    path.with_name(path.stem + "_pareto.png"))


def _first_delta_stats(dm: DeltaModel, xs: list[Tensor]):
    """Statistics of a dense keyframe (every layer at full work): the dense MACs of each layer."""
    dm.reset()
    dm(xs[0])
    return dm.frame_stats()
