"""`deltacnn tune`: per-layer thresholds that keep the task output within a budget of dense."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..model import DeltaModel
from ..tasks.base import Task, to_float
from .common import (UserError, build_delta, finite_mean, get_task, load_model, open_video, resolve_device,
                     resolve_dtype)
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
class TuneResult:
    """Tuned thresholds (saved at `path`), the budget, and what they achieve on the calibration clip."""

    path: Path | None
    thresholds: dict
    budget: Budget
    score: float
    macs_fraction: float
    dense_macs_fraction: float  # at threshold 0 (the exact delta model)
    global_threshold: float
    evals: int
    history: list[dict]

    def table(self) -> str:
        n = len(self.thresholds["layers"])
        return "\n".join([
            f"budget {self.budget}: achieved {self.budget.metric} = {self.score:.4g} on the calibration clip",
            f"  global threshold         {self.global_threshold:.4g}   (+ {n} per-layer overrides)",
            f"  multiply-adds vs dense   {self.macs_fraction:8.1%}   (threshold 0: {self.dense_macs_fraction:.1%})",
            f"  evaluations              {self.evals}",
        ] + ([f"  thresholds written to    {self.path}"] if self.path else []))


class _Evaluator:
    """Plays the calibration frames through the delta model under given thresholds.

    Returns the budget score against the dense results and the MACs fraction over the non-keyframes
    (the steady state thresholds act on).
    """

    def __init__(self, dm: DeltaModel, task: Task, xs: list[Tensor], refs: list[Any], budget: Budget) -> None:
        self.dm, self.task, self.xs, self.refs, self.budget = dm, task, xs, refs, budget
        self.evals = 0
        self._resolved = False

    def __call__(self, default: float, overrides: dict[str, float], input_tau: float | None = None):
        th = self.dm.thresholds
        th.default, th.input, th.overrides = default, input_tau, dict(overrides)
        self.dm.reset()
        metrics, macs, dense = [], 0, 0
        for i, x in enumerate(self.xs):
            y = self.dm(x)
            fs = self.dm.frame_stats()
            if not fs.keyframe:
                macs, dense = macs + fs.macs, dense + fs.dense_macs
            metrics.append(self.task.agreement(self.task.postprocess(to_float(y)), self.refs[i]))
        self.evals += 1
        if not self._resolved:  # the metric names are known after the first pass
            self.budget, self._resolved = self.budget.resolve(metrics[0], self.task), True
        return self.budget.score(metrics), (macs / dense if dense else 1.0)


def tune(video: str | Path | None = None, model: str | Task | None = None, *, budget: str | float | Budget = 0.95,
         aggregate: str = "mean", frames: int = 30, max_evals: int = 40, device: str | None = None,
         dtype: str | torch.dtype | None = None, keyframe_interval: int | None = None, backend: str | None = None,
         out: str | Path | None = None, start: float = 1e-3, quiet: bool = False) -> TuneResult:
    """Find per-layer thresholds that keep the task output within `budget` of dense, skipping most work.

    Search (bounded by `max_evals` passes over `frames` calibration frames):
      1. one global threshold: grow it x4 from `start` until the budget breaks, then bisect
         geometrically between the last pass and the first failure;
      2. per layer, largest lever first (dense MACs downstream of the layer): double its threshold
         while the budget still holds and the multiply-adds do not grow.
    Writes the thresholds JSON (dm.thresholds.save) to `out` if given.
    """
    if frames < 2:
        raise UserError(f"--frames must be >= 2 (the first frame is a dense keyframe), got {frames}")
    if max_evals < 2:
        raise UserError(f"--max-evals must be >= 2, got {max_evals}")
    if not start > 0:
        raise UserError(f"start threshold must be > 0, got {start}")
    b = budget if isinstance(budget, Budget) else parse_budget(budget, aggregate)
    reader = open_video(video, frames)
    task = get_task(model)
    dev = resolve_device(device)
    dense = load_model(task, dev)
    raw = list(reader)
    if len(raw) < 2:
        raise UserError(f"calibration clip {reader.path} has only {len(raw)} frame(s); tune needs at least 2")
    xs, refs = [], []
    with torch.no_grad():
        for f in raw:
            x = task.preprocess(f).to(dev)
            xs.append(x)
            refs.append(task.postprocess(dense(x)))
    dm = build_delta(dense, xs[0], dtype=resolve_dtype(dtype), keyframe_interval=keyframe_interval, backend=backend)
    dm.enable_stats(True)
    ev = _Evaluator(dm, task, xs, refs, b)
    bar = None if quiet else __import__("tqdm").tqdm(total=max_evals, desc="deltacnn tune", unit="eval", leave=False,
                                                      dynamic_ncols=True)
    history: list[dict] = []

    def evaluate(stage: str, default: float, overrides: dict[str, float]) -> tuple[bool, float, float]:
        score, macs = ev(default, overrides)
        ok = ev.budget.holds(score)
        history.append({"stage": stage, "default": default, "overrides": dict(overrides), "score": score,
                        "macs_fraction": macs, "ok": ok})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{stage} {ev.budget.metric}={score:.4g} MACs={macs:.1%}")
        return ok, score, macs

    try:
        ok0, score0, macs0 = evaluate("exact", 0.0, {})
        if not ok0:
            raise UserError(f"budget {ev.budget} is not met even at threshold 0 (dense-equivalent output: "
                            f"{ev.budget.metric} = {score0:.4g}); loosen the budget")
        best = (0.0, {}, score0, macs0)
        # 1. global threshold: bracket, then geometric bisection
        lo, hi, tau = 0.0, None, start
        while ev.evals < max_evals and tau <= 1e3:
            ok, score, macs = evaluate("global", tau, {})
            if not ok:
                hi = tau
                break
            lo, best = tau, (tau, {}, score, macs)
            if macs == 0:  # nothing left to skip
                break
            tau *= 4
        budget_global = max(ev.evals + 1, int(max_evals * 0.4))  # keep most of the evaluations for stage 2
        while hi is not None and ev.evals < min(budget_global, max_evals):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
            if lo > 0 and hi / lo < 1.25:
                break
            ok, score, macs = evaluate("global", mid, {})
            if ok:
                lo, best = mid, (mid, {}, score, macs)
            else:
                hi = mid
        g = best[0]
        # 2. per-layer greedy raising, biggest lever first
        levers = controlled_macs(dm, _first_delta_stats(dm, xs))
        order = sorted((n for n in levers if levers[n] > 0), key=lambda n: -levers[n])
        overrides: dict[str, float] = {}
        for name in order:
            for _ in range(4):
                if ev.evals >= max_evals or best[3] == 0:
                    break
                cur = overrides.get(name, g)
                trial = {**overrides, name: max(cur * 2, start)}
                ok, score, macs = evaluate(f"layer {name}", g, trial)
                if ok and macs <= best[3]:
                    overrides, best = trial, (g, trial, score, macs)
                else:
                    break
            if ev.evals >= max_evals:
                break
    finally:
        if bar is not None:
            bar.close()
    g, overrides, score, macs = best
    dm.thresholds.default, dm.thresholds.input, dm.thresholds.overrides = g, None, dict(overrides)
    path = Path(out) if out is not None else None
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            dm.thresholds.save(path)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
    return TuneResult(path, dm.thresholds.to_dict(), ev.budget, score, macs, macs0, g, ev.evals, history)


def _first_delta_stats(dm: DeltaModel, xs: list[Tensor]):
    """Statistics of a dense keyframe (every layer at full work): the dense MACs of each layer."""
    dm.reset()
    dm(xs[0])
    return dm.frame_stats()
