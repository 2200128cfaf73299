"""`deltacnn tune`: per-layer thresholds that keep the task output within a budget of dense."""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .. import reference_cache, viz
from ..calibration import measure_scales
from ..cost_model import CostModel, FrameWork
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


@dataclass(frozen=True)
class Schedule:
    """When a stream refreshes and how hard deep layers truncate: the frame-schedule part of a setting.

    `refresh_held` / `refresh`: deltacnn.convert's refresh rule (a keyframe, or a flush of the held-back
    input change, once the input gates hold back more than that fraction of the pixels; None: off);
    `keyframe_interval`: a keyframe every N frames (None: off); `growth`: Thresholds.growth;
    `refresh_drift`: Runtime.refresh_drift (a keyframe once the input's unsent change passes that many
    input thresholds; None: off); `refresh_layers`: a deltacnn.layer_refresh spec (None: off).
    """

    refresh_held: float | None = None
    refresh: str = "keyframe"
    keyframe_interval: int | None = None
    growth: float = 0.0
    refresh_drift: float | None = None
    refresh_layers: str | None = None

    def describe(self) -> str:
        parts = []
        if self.refresh_held is not None:
            parts.append(f"{self.refresh} when held > {self.refresh_held:g}")
        if self.keyframe_interval is not None:
            parts.append(f"keyframe every {self.keyframe_interval}")
        if self.refresh_drift is not None:
            parts.append(f"keyframe when drift > {self.refresh_drift:g}")
        if self.refresh_layers is not None:
            parts.append(f"layers {self.refresh_layers}")
        if self.growth:
            parts.append(f"growth {self.growth:g}")
        return ", ".join(parts) or "no refresh"

    def row(self) -> dict:
        return {"refresh_held": self.refresh_held, "refresh": self.refresh,
                "keyframe_interval": self.keyframe_interval, "growth": self.growth,
                "refresh_drift": self.refresh_drift, "refresh_layers": self.refresh_layers}


def parse_schedule(spec: str, base: Schedule | None = None) -> Schedule:
    """'held=0.1,refresh=flush,kf=50,growth=0.5,drift=0.25,layers=flush:8' (keys left out keep `base`'s
    value; held=off, kf=off, drift=off, layers=off)."""
    from ..gating import Refresh
    from ..layer_refresh import LayerRefresh

    base = base or Schedule()
    vals = base.row()
    keys = {"held": "refresh_held", "refresh": "refresh", "kf": "keyframe_interval", "growth": "growth",
            "drift": "refresh_drift", "layers": "refresh_layers"}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        k, _, v = part.partition("=")
        if k not in keys or not v:
            raise UserError(f"bad schedule item {part!r} in {spec!r}; use held=F|off, refresh=keyframe|flush|flush:B:M, "
                            "kf=N|off, growth=G, drift=L|off, layers=SPEC|off (comma-separated)")
        try:
            if k == "drift":
                val = None if v == "off" else float(v)
                if val is not None and not (math.isfinite(val) and val >= 0):
                    raise ValueError("drift must be a finite number >= 0")
            elif k == "layers":
                lr = LayerRefresh.parse(v)
                val = lr.spec() if lr is not None else None
            elif k == "held":
                val = None if v == "off" else float(v)
                if val is not None and not 0 <= val <= 1:
                    raise ValueError("held must be a fraction in [0, 1]")
            elif k == "refresh":
                val = Refresh.parse(v).spec()
            elif k == "kf":
                val = None if v == "off" else int(v)
                if val is not None and val < 1:
                    raise ValueError("kf must be >= 1")
            else:
                val = float(v)
                if not (math.isfinite(val) and val >= 0):
                    raise ValueError("growth must be a finite number >= 0")
        except ValueError as e:
            raise UserError(f"schedule {spec!r}: {e}") from None
        vals[keys[k]] = val
    return Schedule(**vals)


def default_schedules(base: Schedule) -> list[Schedule]:
    """Refresh rules the tuner tries besides `base` (cheapest guess first): with a refresh rule, a flush
    of the held change at the same fraction, and keyframes at twice and four times the fraction; deep
    truncation (growth 0.25); without one, a keyframe every 50 frames."""
    out: list[Schedule] = []
    if base.refresh_held is not None:
        q = base.refresh_held
        if base.refresh == "keyframe":
            out.append(Schedule(q, "flush", base.keyframe_interval, base.growth))
        out += [Schedule(min(1.0, f * q), base.refresh, base.keyframe_interval, base.growth) for f in (2, 4)]
    elif base.keyframe_interval is None:
        out.append(Schedule(None, base.refresh, 50, base.growth))
    if base.keyframe_interval is not None and base.refresh_layers is None:
        # keyframes half as often, the deep layers' residuals re-sent in between (deltacnn.layer_refresh)
        k = base.keyframe_interval
        out.append(replace(base, keyframe_interval=2 * k, refresh_layers=f"flush:{k}"))
    if not base.growth:
        out.append(replace(base, growth=0.25))
    return [o for o in out if o != base]


@dataclass
class Trial:
    """One evaluation of a threshold setting on the calibration frames.

    `ms` is the objective: the mean time of a frame after the first (delta frames and flushes at the
    work they did, keyframes and dense frames at their measured mean time) predicted by the device's
    cost model (`deltacnn.cost_model`), so a refresh rule is paid for over all frames;
    `cpu_ms` the same frames' measured CPU-clock mean, `wall_ms` the measured median of the delta
    frames (both noisy on a loaded machine; reported, not decided on).
    """

    stage: str
    input: float
    default: float
    overrides: dict[str, float]
    score: float
    macs_fraction: float  # multiply-adds of every frame after the first, against dense ones
    ms: float
    ok: bool
    cpu_ms: float = float("nan")
    wall_ms: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)  # every agreement metric, mean over the frames
    modes: dict[str, int] = field(default_factory=dict)  # frames after the first by how they ran ("flush": delta
    # frames that flushed the held input)
    works: list[FrameWork] = field(default_factory=list, repr=False)
    schedule: Schedule = field(default_factory=Schedule)

    def row(self) -> dict:
        return {"stage": self.stage, "input": self.input, "default": self.default, "overrides": dict(self.overrides),
                "score": self.score, "macs_fraction": self.macs_fraction, "ms": self.ms, "cpu_ms": self.cpu_ms,
                "wall_ms": self.wall_ms, "ok": self.ok, "metrics": dict(self.metrics), "modes": dict(self.modes),
                "schedule": self.schedule.row()}


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
    exact: Trial  # all thresholds 0 (the dense-equivalent delta model), or the `init` file's setting
    evals: int
    history: list[Trial]
    calib_frames: tuple[int, int]
    heldout: dict | None = None  # the same metrics on frames tuning never saw
    pareto_path: Path | None = None
    plot_path: Path | None = None
    cost: CostModel | None = None
    margin: float = 0.0

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
            f"budget {self.budget}" + (f" (+ margin {self.margin:g} on the calibration frames)" if self.margin else "")
            + f", tuned on frames {a}-{z - 1} (relative thresholds: input x frame range, layers x their keyframe "
            "activation scale)",
            f"  input threshold          {b.input:.4g}",
            f"  layer threshold          {b.default:.4g}   (+ {len(b.overrides)} per-layer overrides)",
            f"  schedule                 {b.schedule.describe()}",
            f"  calibration              {self.budget.metric} {b.score:.4g}   "
            + _other_metrics(b.metrics, self.budget.metric)
            + f"MACs {b.macs_fraction:6.1%}   cost {b.ms:7.2f} ms (measured CPU {b.cpu_ms:.1f} ms)   "
            f"({e.stage}: MACs {e.macs_fraction:.1%}, cost {e.ms:.2f} ms)",
        ]
        if self.cost is not None:
            lines.append(f"  cost model               {self.cost.describe()} (CPU clock, fitted on the trials' frames)")
        if self.heldout:
            h = self.heldout
            lines.append(f"  held-out frames {h['frames'][0]}-{h['frames'][1] - 1}   {self.budget.metric} "
                         f"{h['score']:.4g}   " + _other_metrics(h.get("metrics", {}), self.budget.metric)
                         + f"MACs {h['macs_fraction']:6.1%}   cost {h['ms']:7.2f} ms (measured CPU {h['cpu_ms']:.1f} ms)"
                         + ("   (budget met)" if self.budget.holds(h['score']) else "   (BUDGET MISSED on held-out frames)"))
        lines.append(f"  evaluations              {self.evals}")
        if self.path:
            lines.append(f"  thresholds written to    {self.path}")
        if self.pareto_path:
            lines.append(f"  Pareto table             {self.pareto_path}" + (f"  (plot {self.plot_path})" if self.plot_path else ""))
        return "\n".join(lines)

    def pareto_table(self) -> str:
        """Every trial on the Pareto front of predicted time against agreement, with what was measured."""
        extra = [k for k in ("f1",) if k != self.budget.metric and k in self.best.metrics]
        rows = ["| cost ms | CPU ms | " + str(self.budget.metric) + "".join(f" | {k}" for k in extra)
                + " | MACs | input | layers | overrides | schedule | frames delta/flush/key (flush: input or layers) | stage |",
                "|---|---|---" + "|---" * len(extra) + "|---|---|---|---|---|---|---|"]
        for t in pareto_front(self.history):
            rows.append(f"| {t.ms:.2f} | {t.cpu_ms:.1f} | {t.score:.4f} | "
                        + "".join(f"{t.metrics.get(k, float('nan')):.4f} | " for k in extra)
                        + f"{t.macs_fraction:.1%} | {t.input:.4g} | {t.default:.4g} | {len(t.overrides)} | "
                        f"{t.schedule.describe()} | {t.modes.get('delta', 0)}/{t.modes.get('flush', 0) + t.modes.get('refresh', 0)}/"
                        f"{t.modes.get('keyframe', 0) + t.modes.get('dense', 0)} | {t.stage} |")
        if self.cost is not None:
            rows.append(f"\ncost model: {self.cost.describe()}")
        return "\n".join(rows)


def _other_metrics(metrics: dict[str, float], main: str | None) -> str:
    return "".join(f"{k} {metrics[k]:.4g}   " for k in ("f1",) if k != main and k in metrics)


@dataclass
class Pass:
    """One pass over a segment from a keyframe on: per-frame agreement and work, measured times."""

    metrics: list[dict[str, float]]
    works: list[FrameWork]  # every frame after the first, at the work it did (dense frames: all of it)
    cpu_ms: list[float]  # the same frames' CPU-clock time
    wall_ms: list[float]  # the delta frames' wall time
    macs_fraction: float
    modes: dict[str, int]
    stopped: int | None = None
    key_cpu_ms: float = float("nan")  # the first frame's (the keyframe's) CPU-clock time  # the pass gave up after this many frames (the budget could no longer hold)


def play(dm: DeltaModel, task: Task, frames: Sequence[Any], refs: Sequence[Any], device: torch.device,
         give_up: Callable[[list[dict[str, float]]], bool] | None = None) -> Pass:
    """Run `frames` (RGB frames, preprocessed here) from a keyframe on and compare with the dense `refs`.
    `give_up(metrics so far)` true ends the pass early (`Pass.stopped`): the budget can no longer hold."""
    dm.reset()
    p = Pass([], [], [], [], 1.0, {})
    macs = dense = 0
    for i, f in enumerate(frames):
        x = task.preprocess(f).to(device)
        c0 = time.process_time()
        y, ms = timed(dm, x, device)
        cpu = (time.process_time() - c0) * 1e3
        fs = dm.frame_stats()
        if i == 0:
            p.key_cpu_ms = cpu
        else:
            p.works.append(FrameWork.of(fs))
            p.cpu_ms.append(cpu)
            mode = dm.last_mode or ("keyframe" if fs.keyframe else "delta")
            counted = "flush" if mode == "delta" and any(dm.last_flushed) else mode
            if mode == "delta" and any(dm.last_refreshed):  # a layer refresh (deltacnn.layer_refresh)
                counted = "refresh"
            p.modes[counted] = p.modes.get(counted, 0) + 1
            if mode == "delta":
                p.wall_ms.append(ms)
            macs, dense = macs + fs.macs, dense + fs.dense_macs
        p.metrics.append(task.agreement(task.postprocess(to_float(y)), refs[i]))
        if give_up is not None and i + 1 < len(frames) and give_up(p.metrics):
            p.stopped = i + 1
            break
    p.macs_fraction = macs / dense if dense else 1.0
    return p


class _Evaluator:
    """Plays the calibration frames under given (relative) thresholds and keeps the device's cost model
    fitted to every frame timed so far (CPU clock), so trials are ranked by the work they do."""

    def __init__(self, dm: DeltaModel, task: Task, frames: list, refs: list[Any], budget: Budget,
                 device: torch.device, margin: float = 0.0) -> None:
        self.dm, self.task, self.frames, self.refs, self.budget, self.device = dm, task, frames, refs, budget, device
        self.margin = margin
        self.schedule = Schedule()  # the frame schedule of trials that do not name one
        self.evals = 0
        self._resolved = False
        self._works: list[FrameWork] = []
        self._cpu: list[float] = []
        self.cost: CostModel | None = None

    def set(self, input_tau: float, default: float, overrides: dict[str, float],
            schedule: Schedule | None = None) -> None:
        from ..gating import Refresh

        th = self.dm.thresholds
        th.default, th.input, th.overrides = default, input_tau, dict(overrides)
        if schedule is not None:
            from ..layer_refresh import LayerRefresh

            rt = self.dm.rt
            rt.refresh_held, rt.refresh = schedule.refresh_held, Refresh.parse(schedule.refresh)
            rt.refresh_drift = th.refresh_drift = schedule.refresh_drift
            rt.layer_refresh = LayerRefresh.parse(schedule.refresh_layers)
            th.refresh_layers = schedule.refresh_layers
            self.dm.keyframe_interval = th.keyframe_interval = schedule.keyframe_interval
            th.growth = schedule.growth
            # the file carries the rule (convert and run --thresholds apply it)
            th.refresh_held = schedule.refresh_held
            th.refresh = schedule.refresh if schedule.refresh_held is not None and schedule.refresh != "keyframe" \
                else None

    def holds(self, score: float) -> bool:
        """The budget tightened by the calibration margin (held-out frames are judged by the budget itself)."""
        b = self.budget
        return b.holds(score) and b.holds(score - self.margin if b.op == ">=" else score + self.margin)

    def __call__(self, stage: str, input_tau: float, default: float, overrides: dict[str, float],
                 schedule: Schedule | None = None) -> Trial:
        schedule = schedule or self.schedule
        self.set(input_tau, default, overrides, schedule)
        p = play(self.dm, self.task, self.frames, self.refs, self.device, self._give_up if self._resolved else None)
        self.evals += 1
        if not self._resolved:  # the metric names are known after the first pass
            self.budget, self._resolved = self.budget.resolve(p.metrics[0], self.task), True
        self._works += p.works + [FrameWork(0, 0, dense=True)]  # the pass's first frame prices keyframes
        self._cpu += p.cpu_ms + [p.key_cpu_ms]
        self.cost = CostModel.fit(self._works, self._cpu)
        score = self.budget.score(p.metrics)
        means = {k: finite_mean([float(m[k]) for m in p.metrics]) for k in p.metrics[0]}
        stage = stage if p.stopped is None else f"{stage} (stopped at frame {p.stopped})"
        return Trial(stage, input_tau, default, dict(overrides), score, p.macs_fraction, self.cost.mean_ms(p.works),
                     self.holds(score) and p.stopped is None, finite_mean(p.cpu_ms), finite_median(p.wall_ms), means,
                     p.modes, p.works, schedule)

    def _give_up(self, metrics: list[dict[str, float]]) -> bool:
        """True when the (margin-tightened) budget cannot hold whatever the remaining frames score: for a
        mean of a ">=" metric every later frame counted at 1 (F1, accuracy; none give up once a frame
        scored above 1), of a "<=" metric at 0; for the worst frame, as soon as one frame breaks it."""
        b, n = self.budget, len(self.frames)
        vals = [float(m[b.metric]) for m in metrics]
        if b.aggregate == "worst":
            return not self.holds(vals[-1])
        if b.op == ">=":
            if max(vals) > 1:
                return False
            return not self.holds((sum(vals) + (n - len(vals))) / n)
        return not self.holds(sum(vals) / n)

    def reprice(self, trials: Sequence[Trial]) -> None:
        """Every trial's objective under the latest cost model (fitted on all frames timed so far)."""
        for t in trials:
            if t.works and self.cost is not None:
                t.ms = self.cost.mean_ms(t.works)


def _frames(video, start: int, count: int, task: Task, dense, dev: torch.device, what: str, reader: str = "auto",
            cache: bool = True):
    """`count` RGB frames from `start` of the source (kept as uint8: 595 float frames of 768x576 would
    take 3 GB), with the dense model's results: from `deltacnn.reference_cache` when `cache` and a
    reference of the same task, weights, clip, frames and input shape is there, else computed (and
    stored)."""
    src = open_video(video, start + count, reader=reader)
    frames = [f for i, f in enumerate(src) if i >= start]
    if len(frames) < 2:
        raise UserError(f"{what} frames {start}-{start + count - 1}: the source {src.label} has only "
                        f"{start + len(frames)} frame(s); need at least 2 in the segment")
    key = None
    if cache:
        shape = tuple(task.preprocess(frames[0]).shape)
        key = reference_cache.reference_key(task, dense, src.label, start,
                                            len(frames), shape, dev, reader)
        refs = reference_cache.load(key, len(frames))
        if refs is not None:
            return frames, refs
    with torch.no_grad():
        refs = [task.postprocess(dense(task.preprocess(f).to(dev))) for f in frames]
    reference_cache.store(key, refs)
    return frames, refs


def layer_groups(dm: DeltaModel, levers: dict[str, int], k: int = 4) -> list[list[str]]:
    """The thresholded layers (not the input) in graph order, cut into `k` contiguous groups of about
    equal controlled multiply-adds (`levers`).

    Neighbouring layers have similar depth and role (stem, backbone, neck, head), so a group is tuned
    as one lever: the tuner raises the groups one by one and holds a group at 0 when even its smallest
    step breaks the budget (a sensitive part, such as a detection head, cannot veto the others).
    """
    gm = dm.graph_module
    mods = dict(gm.named_modules())
    order: list[str] = []
    for node in gm.graph.nodes:
        m = mods.get(node.target) if node.op == "call_module" else None
        name = getattr(m, "act_name", None) if m is not None and getattr(m, "act", None) is not None else \
            getattr(m, "name", None)
        if name in levers and name != INPUT and name not in order:
            order.append(name)
    order += sorted(n for n in levers if n not in order and n != INPUT)
    total = sum(levers[n] for n in order) or 1
    k = min(k, len(order))
    groups: list[list[str]] = [[]]
    acc = 0
    for i, n in enumerate(order):
        # a new group once this one holds its share, or when each group left needs one of the layers left
        if groups[-1] and len(groups) < k and (acc >= total * len(groups) / k or len(order) - i <= k - len(groups)):
            groups.append([])
        groups[-1].append(n)
        acc += levers[n]
    return [g for g in groups if g]


def search(evaluate: Callable[..., Trial], left: Callable[[], bool], exact: Trial,
           budget: Budget, margin: float, levers: dict[str, int], parts: Sequence[Sequence[str]], start: float = 0.01,
           min_gain: float = 0.02, schedules: Sequence[Schedule] = (),
           remaining: Callable[[], int] | None = None, from_init: bool = False) -> Trial:
    """The search of `tune` (its docstring), on any `evaluate(stage, input_tau, layer_overrides, schedule)
    -> Trial` whose `ok` says the (margin-tightened) budget holds; `left()` says whether evaluations
    remain. `schedules`: frame schedules (refresh rule, keyframe interval, growth) to try besides the
    exact trial's; `remaining()` (evaluations left), when given, keeps two evaluations per schedule (and
    one for the last input step) out of the layer stages, so the schedules are always tried.
    `from_init`: `exact` is a tuned setting to continue from (tune's `init`): its input stays, the
    schedules are tried first (layers as they are), then the groups rise from their levels.
    Returns the last accepted trial (the caller picks the answer from every trial)."""
    sign = 1 if budget.op == ">=" else -1
    sched = exact.schedule
    reserve = 2 * len(schedules) + 1 if remaining is not None else 0
    all_left = left

    def layers_left() -> bool:
        return all_left() and (remaining is None or remaining() > reserve)

    def cheaper(t: Trial, ref: Trial) -> bool:
        return t.ms <= ref.ms * (1 - min_gain)

    # 1. input first, layers exact; it may use half of the slack, the rest is the layers'
    lim = budget.value + sign * (margin + (sign * (exact.score - budget.value) - margin) / 2)

    def keeps(t: Trial) -> bool:
        return t.ok and sign * (t.score - lim) >= 0

    cur, hi, tau = exact, None, start
    while left() and tau <= 1.0 and not from_init:
        t = evaluate("input", tau, {}, sched)
        if not keeps(t):
            hi = tau
            break
        gained = cheaper(t, cur)
        cur = t if t.ms < cur.ms else cur
        if not gained:
            break
        tau *= 2
    if hi is not None and cur.input > 0 and left() and not from_init:
        t = evaluate("input", math.sqrt(cur.input * hi), {}, sched)
        if keeps(t) and t.ms < cur.ms:
            cur = t
    ti = cur.input
    # 2. layer groups, largest lever first, round by round (each group one x2 step per round, so every
    # part of the network is reached before any one goes far); a group that breaks the budget at its
    # first step stays exact, one that breaks it or stops paying later stays where it was
    overrides: dict[str, float] = dict(exact.overrides) if from_init else {}
    level = {i: max((overrides.get(n, 0.0) for n in g), default=0.0) for i, g in enumerate(parts)}
    raised: list[Sequence[str]] = [g for i, g in enumerate(parts) if level[i] > 0]

    def raise_groups(cur: Trial, overrides: dict[str, float], sched: Schedule, rising: list[int]):
        while rising and layers_left():
            for i in list(rising):
                if not layers_left():
                    break
                g = parts[i]
                tau = level[i] * 2 if level[i] else start
                if tau > 1.0:
                    rising.remove(i)
                    continue
                trial = {**overrides, **{n: tau for n in g}}
                t = evaluate(f"group {g[0]}..{g[-1]} ({len(g)})", ti, trial, sched)
                if not (t.ok and t.ms < cur.ms):
                    rising.remove(i)
                    continue
                gained = cheaper(t, cur)
                cur, overrides, level[i] = t, trial, tau
                if tau == start:
                    raised.append(g)
                elif not gained:  # the first step may gain little (a small threshold); later ones must pay
                    rising.remove(i)
        return cur, overrides

    def per_layer(cur: Trial, overrides: dict[str, float]):
        # 3. per layer within the raised groups, largest lever first
        for name in sorted((n for g in raised for n in g if levers.get(n, 0) > 0 and overrides.get(n, 0) > 0),
                           key=lambda n: -levers[n]):
            if not layers_left():
                break
            trial = {**overrides, name: overrides[name] * 2}
            t = evaluate(f"layer {name}", ti, trial, sched)
            if t.ok and cheaper(t, cur):
                cur, overrides = t, trial
        return cur, overrides

    def try_schedules(cur: Trial, overrides: dict[str, float], sched: Schedule):
        # 4. the frame schedule with the layers set: each candidate (fewer keyframes, a flush, ...) replaces
        # the current one when it is cheaper over all frames (keyframes at their measured cost) within
        # budget; one that breaks the budget is tried once more with every layer threshold halved (rarer
        # refreshes leave truncation error longer in the state, so they need milder layers)
        changed = False
        for sc in schedules:
            if not left():
                break
            if sc == sched:
                continue
            t = evaluate(f"schedule: {sc.describe()}", ti, overrides, sc)
            if not t.ok and overrides and left():
                half = {k: v / 2 for k, v in overrides.items()}
                t2 = evaluate(f"schedule: {sc.describe()}, layers / 2", ti, half, sc)
                if t2.ok and cheaper(t2, cur):
                    cur, overrides, sched, changed = t2, half, sc, True
                    for i in level:
                        level[i] /= 2
                continue
            if t.ok and cheaper(t, cur):
                cur, sched, changed = t, sc, True
        return cur, overrides, sched, changed

    if from_init:  # a tuned setting: its schedule alternatives first, then the layers further
        cur, overrides, sched, _ = try_schedules(cur, overrides, sched)
        reserve = 1 if ti > 0 else 0
        cur, overrides = raise_groups(cur, overrides, sched, list(range(len(parts))))
        cur, overrides = per_layer(cur, overrides)
    else:
        cur, overrides = raise_groups(cur, overrides, sched, list(range(len(parts))))
        cur, overrides = per_layer(cur, overrides)
        cur, overrides, sched, changed = try_schedules(cur, overrides, sched)
        # 5. after a new schedule, the groups once more from where they are (the reserve is spent now)
        if changed:
            reserve = 1 if ti > 0 else 0
            cur, overrides = raise_groups(cur, overrides, sched, [i for i in level if level[i] > 0])
    # 6. the input once more, with the layers set
    if left() and ti > 0:
        t = evaluate("input again", ti * 1.5, overrides, sched)
        if t.ok and t.ms < cur.ms:
            cur = t
    return cur


def tune(video: str | int | Path | None = None, model: str | Task | None = None, *, budget: str | float | Budget = 0.95,
         aggregate: str = "mean", frames: int = 30, start_frame: int = 0, heldout_frames: int = 0,
         heldout_start: int | None = None, max_evals: int = 40, device: str | None = None,
         dtype: str | torch.dtype | None = None, keyframe_interval: int | None = None, backend: str | None = None,
         min_blob: int = 1, out: str | Path | None = None, start: float = 0.01, time_tolerance: float = 0.01,
         margin: float = 0.0, groups: int = 4, min_gain: float = 0.02, dense_above: float | None = 0.5,
         quiet: bool = False, reader: str = "auto", input_gate=None, threshold_growth: float = 0.0,
         refresh_held: float | None = None, refresh: str | None = None, refresh_drift: float | None = None,
         refresh_layers: str | None = None,
         schedules: Sequence[str | Schedule] | None = None, init: str | Path | None = None,
         ref_cache: bool = True) -> TuneResult:
    """Find the input and per-layer thresholds with the lowest delta-model frame time whose task
    agreement with dense stays within `budget` (tightened by `margin`), on calibration frames
    [start_frame, start_frame + frames).

    Time is the device's cost model (`deltacnn.cost_model`: per frame, per active layer and per
    multiply-add, fitted to the CPU-clock time of every frame played so far), averaged over every
    frame after the first. Measured times are reported beside it. The search runs delta frames
    only (no dense fallback): a dense frame is exact, so on a clip whose deltas are busy (scattered
    changes densify the network) the fallback hides what an input threshold holds back, until the
    layer thresholds make the deltas cheap and the staleness shows. The held-out segment runs with
    `dense_above` (run's default 0.5), as `deltacnn run --thresholds FILE` will.

    Thresholds are relative (calibration.measure_scales): the input's a fraction of the frame's value
    range, each layer's a fraction of its activation scale on the first calibration frame. Search
    (bounded by `max_evals` passes over the calibration frames):
      1. input first, layers exact: x2 from `start` while the score keeps half of the budget's slack
         for the layers and the cost falls by at least `min_gain`; bisect once when a step fails;
      2. layer groups (`layer_groups`: `groups` contiguous parts of the network, largest lever
         first), round by round: each group one x2 step from `start` per round while the budget
         holds and the cost falls (after the first step, by at least `min_gain`), so the stem, the
         backbone and the head are all tried before any group goes far; a group whose first step
         breaks the budget stays exact;
      3. per layer within the raised groups, largest lever first: x2 while that holds;
      4. the frame schedule with the layers set: each of `schedules` (refresh rule: keyframe or flush
         and its held fraction, keyframe interval, threshold growth; `parse_schedule` specs; None: a
         few around the given one, `default_schedules`) replaces the given one when it costs at least
         `min_gain` less over all frames (keyframes at their measured cost) within budget; one that
         breaks the budget is tried once more with every layer threshold halved;
      5. after a new schedule, the raised groups once more, round by round;
      6. the input once more (x1.5) with the layers set.
    With `init` (a thresholds file of this model, e.g. an earlier tune's), the search continues from
    it instead of from exact: its input threshold, layer thresholds and schedule (refresh rule,
    keyframe interval, growth; the flags given override them) are the first trial, step 1 is left
    out, the schedules are tried first, then the groups rise from their levels.
    The answer is the cheapest trial within budget (within `time_tolerance` of it, the one with the
    fewest multiply-adds). With `heldout_frames`, it is then measured on the disjoint segment
    [heldout_start, +heldout_frames) (default: right after the calibration frames), against the
    budget without the margin. The dense model's outputs on both segments come from
    `deltacnn.reference_cache` when an earlier tune stored them (`ref_cache=False`: always computed).
    Writes the thresholds JSON to `out` if given, with a Pareto table
    (_pareto.md), plot (_pareto.png) and every trial (_trials.json) beside it.
    """
    if frames < 2:
        raise UserError(f"--frames must be >= 2 (the first frame is a dense keyframe), got {frames}")
    if max_evals < 2:
        raise UserError(f"--max-evals must be >= 2, got {max_evals}")
    if not start > 0:
        raise UserError(f"start threshold must be > 0, got {start}")
    if start_frame < 0 or heldout_frames < 0:
        raise UserError("frame numbers must be >= 0")
    if not (math.isfinite(margin) and margin >= 0):
        raise UserError(f"--margin must be a finite number >= 0, got {margin}")
    if groups < 1:
        raise UserError(f"--groups must be >= 1, got {groups}")
    hstart = start_frame + frames if heldout_start is None else heldout_start
    if heldout_frames and hstart < start_frame + frames and hstart + heldout_frames > start_frame:
        raise UserError(f"held-out frames {hstart}-{hstart + heldout_frames - 1} overlap the calibration frames "
                        f"{start_frame}-{start_frame + frames - 1}: choose a disjoint segment")
    b = budget if isinstance(budget, Budget) else parse_budget(budget, aggregate)
    task = get_task(model)
    dev = resolve_device(device)
    dense = load_model(task, dev)
    xs, refs = _frames(video, start_frame, frames, task, dense, dev, "calibration", reader, ref_cache)
    x0 = task.preprocess(xs[0]).to(dev)
    # the search sees delta frames only: dense fallback frames (run's --dense-above) are exact, so
    # they would hide what an input threshold holds back, until layer thresholds made the deltas cheap
    dm = build_delta(dense, x0, dtype=resolve_dtype(dtype), keyframe_interval=keyframe_interval, backend=backend,
                     min_blob=min_blob, dense_above=None, input_gate=input_gate,
                     threshold_growth=threshold_growth, refresh_held=refresh_held, refresh=refresh,
                     refresh_drift=refresh_drift, refresh_layers=refresh_layers)
    measure_scales(dm, x0)
    dm.thresholds.min_blob = min_blob if min_blob > 1 else None
    dm.enable_stats(True)
    start_from = None
    if init is not None:
        from ..thresholds import Thresholds

        f = Thresholds(known=dm.thresholds.known)
        try:
            f.load(init)
            for name in f.overrides:
                f._check_name(name)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--init {init}: {e}") from None
        if f.units != "relative":
            raise UserError(f"--init {init}: the tuner works in relative units; this file is {f.units}")
        start_from = (f.input or 0.0, f.default, dict(f.overrides))
        refresh_held = f.refresh_held if refresh_held is None else refresh_held
        refresh = f.refresh if refresh is None else refresh
        keyframe_interval = f.keyframe_interval if keyframe_interval is None else keyframe_interval
        threshold_growth = threshold_growth or f.growth
        refresh_drift = f.refresh_drift if refresh_drift is None else refresh_drift
        refresh_layers = f.refresh_layers if refresh_layers is None else refresh_layers
        from ..gating import Refresh
        dm.rt.refresh = Refresh.parse(refresh)
    from ..layer_refresh import LayerRefresh
    lr = LayerRefresh.parse(refresh_layers)
    base = Schedule(refresh_held, dm.rt.refresh.spec(), keyframe_interval, threshold_growth, refresh_drift,
                    lr.spec() if lr is not None else None)
    scheds = default_schedules(base) if schedules is None else \
        [sc if isinstance(sc, Schedule) else parse_schedule(sc, base) for sc in schedules]
    ev = _Evaluator(dm, task, xs, refs, b, dev, margin)
    ev.schedule = base
    bar = None if quiet else __import__("tqdm").tqdm(total=max_evals, desc="deltacnn tune", unit="eval", leave=False,
                                                      dynamic_ncols=True)
    history: list[Trial] = []

    seen: dict[tuple, Trial] = {}

    def evaluate(stage: str, ti: float, tg: float, overrides: dict[str, float], sc: Schedule | None = None) -> Trial:
        sc = sc or base
        key = (ti, tg, tuple(sorted((k, v) for k, v in overrides.items() if v)), sc)
        if key in seen:  # the same setting again (e.g. a layer step its group already tried): no new pass
            return seen[key]
        t = seen[key] = ev(stage, ti, tg, overrides, sc)
        history.append(t)
        ev.reprice(history)
        if out is not None:  # progress on disk: a long tune that is stopped still shows its trials
            save_json({"budget": str(ev.budget), "margin": margin, "in_progress": True,
                       "trials": [h.row() for h in history]}, Path(out).with_name(Path(out).stem + "_trials.json"))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{stage} {ev.budget.metric}={t.score:.4g} MACs={t.macs_fraction:.1%} {t.ms:.1f}ms")
        return t

    def left() -> bool:
        return ev.evals < max_evals

    try:
        if start_from is not None:
            ti0, d0, ov0 = start_from
            exact = evaluate("init", ti0, d0, ov0)
            if not exact.ok:
                raise UserError(f"--init {init}: budget {ev.budget} is not met by the file on the calibration frames "
                                f"({ev.budget.metric} = {exact.score:.4g}); tune from exact instead")
        else:
            exact = evaluate("exact", 0.0, 0.0, {})
        if not exact.ok:
            raise UserError(f"budget {ev.budget} is not met even at threshold 0 (dense-equivalent output: "
                            f"{ev.budget.metric} = {exact.score:.4g}); loosen the budget")
        levers = controlled_macs(dm, _first_delta_stats(dm, task.preprocess(xs[0]).to(dev)))
        parts = sorted(layer_groups(dm, levers, groups), key=lambda g: -sum(levers[n] for n in g))
        search(lambda stage, ti, ov, sc=None: evaluate(stage, ti, 0.0, ov, sc), left, exact, ev.budget, margin,
               levers, parts, start, min_gain, scheds, remaining=lambda: max_evals - ev.evals,
               from_init=start_from is not None)
    finally:
        if bar is not None:
            bar.close()
    best = _best(history, time_tolerance)
    ev.set(best.input, best.default, best.overrides, best.schedule)
    heldout = None
    if heldout_frames:
        hx, hr = _frames(video, hstart, heldout_frames, task, dense, dev, "held-out", reader, ref_cache)
        dm.rt.dense_above = dense_above  # as `deltacnn run` will run the file
        p = play(dm, task, hx, hr, dev)
        dm.rt.dense_above = None
        heldout = {"frames": (hstart, hstart + len(hx)), "score": ev.budget.score(p.metrics),
                   "metrics": {k: finite_mean([float(m[k]) for m in p.metrics]) for k in p.metrics[0]},
                   "macs_fraction": p.macs_fraction, "ms": ev.cost.mean_ms(p.works), "cpu_ms": finite_mean(p.cpu_ms),
                   "wall_ms": finite_median(p.wall_ms), "modes": p.modes}
        ev.set(best.input, best.default, best.overrides, best.schedule)
    res = TuneResult(None, dm.thresholds.to_dict(), ev.budget, best, exact, ev.evals, history,
                     (start_frame, start_frame + len(xs)), heldout, cost=ev.cost, margin=margin)
    if out is not None:
        _write(res, dm, Path(out))
    return res


def _best(history: Sequence[Trial], time_tolerance: float = 0.01) -> Trial:
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
        save_json({"budget": str(res.budget), "margin": res.margin, "best": res.best.row(), "heldout": res.heldout,
                   "cost_model": None if res.cost is None else vars(res.cost),
                   "trials": [t.row() for t in res.history]}, path.with_name(path.stem + "_trials.json"))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    res.plot_path = viz.pareto_plot([(t.ms, t.score, t.ok) for t in res.history],
                                    [(t.ms, t.score) for t in pareto_front(res.history)],
                                    (res.best.ms, res.best.score), str(res.budget.metric), res.budget.value,
                                    path.with_name(path.stem + "_pareto.png"),
                                    xlabel="frame time predicted by the cost model (ms, CPU clock)")


def _first_delta_stats(dm: DeltaModel, x: Tensor):
    """Statistics of a dense keyframe (every layer at full work): the dense MACs of each layer."""
    dm.reset()
    dm(x)
    return dm.frame_stats()
