"""The tuner's parts on small inputs: the cost model, layer groups, the search on a synthetic world,
frame accounting of a pass, and the input gate a thresholds file carries."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.commands.common import build_delta
from deltacnn.commands.tune import Budget, Trial, controlled_macs, layer_groups, play, search
from deltacnn.cost_model import CostModel, FrameWork
from deltacnn.layers import Sparsify
from deltacnn.thresholds import INPUT, Thresholds


def test_cost_model_recovers_its_coefficients_and_stays_nonnegative() -> None:
    rng = np.random.default_rng(0)
    works = [FrameWork(int(rng.integers(1e8, 9e9)), int(rng.integers(0, 60))) for _ in range(40)]
    ms = [3.0 + 0.4 * w.active_layers + 25.0 * w.macs * 1e-9 + rng.normal(0, 0.01) for w in works]
    c = CostModel.fit(works, ms)
    assert c.base_ms == pytest.approx(3.0, abs=0.05) and c.per_layer_ms == pytest.approx(0.4, abs=0.01)
    assert c.per_gmac_ms == pytest.approx(25.0, rel=0.01)
    assert c.predict(FrameWork(2 * 10**9, 10)) == pytest.approx(3 + 4 + 50, rel=0.01)
    # every frame ran every layer: the layer column cannot be told from the constant; no negative cost
    same = [FrameWork(w.macs, 64) for w in works]
    c2 = CostModel.fit(same, [10.0 + 20.0 * w.macs * 1e-9 for w in same] + [float("nan")])
    assert min(c2.base_ms, c2.per_layer_ms, c2.per_gmac_ms) >= 0
    assert c2.predict(same[0]) == pytest.approx(10.0 + 20.0 * same[0].macs * 1e-9, rel=1e-6)
    # time that falls with more work is noise: no negative cost; time proportional to the work instead
    c3 = CostModel.fit([FrameWork(10**9, 1), FrameWork(2 * 10**9, 1)], [5.0, 4.0])
    assert (c3.base_ms, c3.per_layer_ms) == (0.0, 0.0) and c3.per_gmac_ms == pytest.approx(3.0)
    assert c3.predict(FrameWork(10**9, 1)) < c3.predict(FrameWork(2 * 10**9, 1))
    with pytest.raises(ValueError):
        CostModel.fit([FrameWork(1, 1)], [float("nan")])


class _Task:
    """A task whose frames and outputs are the tensors themselves, scored by `agreement(out, ref)`."""

    name = "t"

    def __init__(self, agreement) -> None:
        self.agreement = agreement

    def preprocess(self, f):
        return f

    def postprocess(self, y):
        return y


def _chain() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c = 3
    for w in (8, 8, 16, 16, 16, 8):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.Conv2d(c, 2, 1)).eval()


def test_layer_groups_are_contiguous_and_cover_every_layer() -> None:
    x = torch.rand(1, 3, 16, 16)
    dm = deltacnn.convert(_chain(), x)
    dm.enable_stats(True)
    dm(x)
    levers = controlled_macs(dm, dm.frame_stats())
    names = [n for n in dm.thresholds.known if n != INPUT]
    for k in (1, 2, 3, 10):
        groups = layer_groups(dm, levers, k)
        flat = [n for g in groups for n in g]
        assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
        assert len(groups) == min(k, len(names))
        # graph order: the i-th ReLU of the chain comes before the (i+1)-th
        order = [int(n.split(".")[0]) for n in flat]
        assert order == sorted(order)


def _world(fatal: set[str], input_ok: float = 0.08):
    """A synthetic tuning problem: cost falls with every threshold; the score breaks when the input
    exceeds `input_ok` or any layer of `fatal` is truncated at all."""
    layers = [f"l{i}" for i in range(8)]
    calls: list[tuple[str, float, dict]] = []

    def evaluate(stage: str, ti: float, ov: dict[str, float], sc=None) -> Trial:
        calls.append((stage, ti, dict(ov)))
        score = 1.0 - 0.01 * ti / input_ok - sum(0.001 * v for v in ov.values())
        if ti > input_ok or any(ov.get(n, 0) > 0 for n in fatal):
            score = 0.5
        ms = 100.0 / (1 + 10 * ti) - sum(40 * min(v, 0.2) for v in ov.values())
        return Trial(stage, ti, 0.0, dict(ov), score, ms / 100, ms, score >= 0.98)

    return layers, calls, evaluate


def test_search_holds_a_fatal_group_at_zero_and_raises_the_others() -> None:
    layers, calls, evaluate = _world(fatal={"l6", "l7"})
    parts = [layers[i:i + 2] for i in range(0, 8, 2)][::-1]  # the fatal "head" group is tried first
    levers = {n: 10 - i for i, n in enumerate(layers)}
    exact = evaluate("exact", 0.0, {})
    n = [0]

    def left() -> bool:
        n[0] += 1
        return n[0] <= 30

    b = Budget("score", ">=", 0.98)
    cur = search(evaluate, left, exact, b, 0.0, levers, parts, start=0.01, min_gain=0.02)
    assert cur.ok and cur.ms < exact.ms
    assert all(cur.overrides.get(x, 0.0) == 0.0 for x in ("l6", "l7"))  # broke at its first step: stays exact
    assert all(cur.overrides.get(x, 0.0) > 0 for x in layers[:6])  # the others were raised
    inputs = [ti for stage, ti, _ in calls if stage == "input"]
    assert inputs[:4] == [0.01, 0.02, 0.04, 0.08] and max(inputs) > 0.08  # bracketed past the limit, then bisected
    assert 0 < cur.input <= 0.08
    assert len(calls) <= 31  # exact + the evaluations left() allowed


def test_search_leaves_half_the_slack_to_the_layers() -> None:
    """The input alone may take the score only halfway from exact to the budget (plus the margin)."""
    layers, calls, evaluate = _world(fatal=set(), input_ok=0.5)
    exact = evaluate("exact", 0.0, {})
    b = Budget("score", ">=", 0.98)
    n = [0]
    search(evaluate, lambda: (n.__setitem__(0, n[0] + 1) or n[0] <= 6), exact, b, 0.004, {}, [], 0.01, 0.0)
    # the limit for the input: 0.98 + 0.004 + (1 - 0.98 - 0.004) / 2 = 0.992, i.e. ti <= 0.4
    kept = [ti for stage, ti, _ in calls if stage == "input" and 1 - 0.01 * ti / 0.5 >= 0.992]
    assert kept and max(kept) <= 0.4 and [ti for stage, ti, _ in calls if stage == "input"][-1] > 0.16


def test_play_counts_dense_fallback_frames_at_full_work() -> None:
    """A pass reports every frame after the first: dense fallback frames at their full work."""

    def agreement(r, ref):
        return {"err": float((r - ref).abs().max())}

    net = _chain()
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(4)]  # every pixel changes: busy
    with torch.no_grad():
        refs = [net(f) for f in frames]
    for dense_above, mode in ((0.0, "dense"), (None, "delta")):
        dm = build_delta(net, frames[0], dense_above=dense_above)
        dm.enable_stats(True)
        p = play(dm, _Task(agreement), frames, refs, torch.device("cpu"))
        assert p.modes == {mode: 3} and len(p.works) == len(p.cpu_ms) == 3
        assert len(p.wall_ms) == (3 if mode == "delta" else 0)
        assert max(m["err"] for m in p.metrics) < 1e-4
        if mode == "dense":
            assert p.macs_fraction == pytest.approx(1.0)
            assert all(w.macs == p.works[0].macs > 0 for w in p.works)


def test_a_tuned_file_carries_the_input_gate(tmp_path) -> None:
    x = torch.rand(1, 3, 16, 16)
    dm = build_delta(_chain(), x, min_blob=3)
    dm.thresholds.min_blob = 3
    path = tmp_path / "th.json"
    dm.thresholds.save(path)
    assert json.loads(path.read_text())["min_blob"] == 3

    def gate(m) -> int:
        return next(l.min_blob for l in m.graph_module.modules() if isinstance(l, Sparsify) and l.name == INPUT)

    assert gate(build_delta(_chain(), x, thresholds=path)) == 3  # run --thresholds
    assert gate(deltacnn.convert(_chain(), x, thresholds_file=str(path))) == 3
    assert gate(deltacnn.convert(_chain(), x, thresholds_file=str(path), min_blob=5)) == 5  # asked for explicitly
    assert gate(build_delta(_chain(), x)) == 1
    for bad in (2, 0, "3", True):
        with pytest.raises(ValueError, match="min_blob"):
            Thresholds(min_blob=bad)
    data = json.loads(path.read_text())
    data["min_blob"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="min_blob"):
        Thresholds().load(path)
    assert math.isfinite(Thresholds(min_blob=None).default)


def test_a_pass_gives_up_once_the_budget_cannot_hold() -> None:
    """With a mean F1 budget of 0.9 over 10 frames, two frames at 0.4 already make 0.9 impossible."""
    from deltacnn.commands.tune import _Evaluator

    def agreement(r, ref):
        return {"f1": 1.0 if ref is None else 0.4}

    net = _chain()
    frames = [torch.rand(1, 3, 16, 16) for _ in range(10)]
    refs = [None] + [0] * 9  # the keyframe agrees, every later frame scores 0.4
    dm = build_delta(net, frames[0], dense_above=None)
    dm.enable_stats(True)
    ev = _Evaluator(dm, _Task(agreement), frames, refs, Budget("f1", ">=", 0.9), torch.device("cpu"))
    first = ev("a", 0.0, 0.0, {})  # the metric is resolved by the first pass, which plays every frame
    assert len(first.works) == 9 and not first.ok
    t = ev("b", 0.0, 0.0, {})
    # after frame k (0-based) the best mean is (1 + 0.4 k + (9 - k)) / 10 < 0.9 from k = 2 on
    assert "stopped at frame 3" in t.stage and len(t.works) == 2 and not t.ok
    loose = _Evaluator(dm, _Task(agreement), frames, refs, Budget("f1", ">=", 0.4), torch.device("cpu"))
    loose("a", 0.0, 0.0, {})
    assert len(loose("b", 0.0, 0.0, {}).works) == 9


def test_a_tuned_file_carries_the_refresh_rule(tmp_path) -> None:
    x = torch.rand(1, 3, 16, 16)
    dm = build_delta(_chain(), x, refresh_held=0.05)
    dm.thresholds.refresh_held = 0.05
    path = tmp_path / "th.json"
    dm.thresholds.save(path)
    assert json.loads(path.read_text())["refresh_held"] == 0.05
    assert build_delta(_chain(), x, thresholds=path).rt.refresh_held == 0.05  # run --thresholds
    assert deltacnn.convert(_chain(), x, thresholds_file=str(path)).rt.refresh_held == 0.05
    assert deltacnn.convert(_chain(), x, thresholds_file=str(path), refresh_held=0.2).rt.refresh_held == 0.2
    assert build_delta(_chain(), x).rt.refresh_held is None
    with pytest.raises(ValueError, match="refresh_held"):
        Thresholds(refresh_held=2.0)


def test_search_reaches_every_group_before_any_goes_far() -> None:
    """Round by round: with 4 groups and evaluations for one round only, every group gets its first step."""
    layers, calls, evaluate = _world(fatal=set(), input_ok=0.01)
    parts = [layers[i:i + 2] for i in range(0, 8, 2)]
    levers = {n: 1 for n in layers}
    exact = evaluate("exact", 0.0, {})
    n = [0]

    def left() -> bool:
        return n[0] < 7  # 3 input evaluations (0.01, 0.02, the bisection), then one round of 4 groups

    def counted(*a):
        n[0] += 1
        return evaluate(*a)

    search(counted, left, exact, Budget("score", ">=", 0.98), 0.0, levers, parts, start=0.01, min_gain=0.0)
    groups = [ov for stage, _, ov in calls if stage.startswith("group")]
    assert len(groups) == 4
    assert [sorted(k for k, v in ov.items() if v == 0.01) for ov in groups][-1] == sorted(layers)


def test_search_takes_a_cheaper_schedule_that_keeps_the_budget() -> None:
    from deltacnn.commands.tune import Schedule

    base, cheap, bad = Schedule(0.05), Schedule(0.05, "flush"), Schedule(0.2)
    calls = []

    def evaluate(stage, ti, ov, sc=None):
        sc = sc or base
        calls.append((stage, sc))
        score = 0.995 - 0.001 * len(ov) - (0.1 if sc == bad else 0.0)
        ms = 100.0 - 5 * len(ov) - (30 if sc == cheap else 0) - (40 if sc == bad else 0)
        return Trial(stage, ti, 0.0, dict(ov), score, ms / 100, ms, score >= 0.98, schedule=sc)

    exact = evaluate("exact", 0.0, {}, base)
    n = [0]

    def left() -> bool:
        n[0] += 1
        return n[0] <= 12

    cur = search(evaluate, left, exact, Budget("score", ">=", 0.98), 0.0, {"a": 1, "b": 1}, [["a"], ["b"]],
                 start=0.01, min_gain=0.02, schedules=[bad, cheap])
    assert cur.schedule == cheap and cur.overrides  # the layers, then the flush under them
    stages = [stage for stage, _ in calls]
    assert any("layers / 2" in st and "0.2" in st for st in stages)  # the bad one got its second chance
    assert stages.index(next(st for st in stages if "flush" in st)) > stages.index(next(
        st for st in stages if st.startswith("group")))  # schedules come after the groups


def test_cost_model_prices_keyframes_at_their_measured_time_and_schedules_parse() -> None:
    from deltacnn.commands.common import UserError
    from deltacnn.commands.tune import Schedule, parse_schedule

    works = [FrameWork(10**9 * k, 5) for k in range(1, 6)] + [FrameWork(10**10, 9, dense=True)] * 2
    ms = [2.0 + 10.0 * k for k in range(1, 6)] + [60.0, 64.0]
    c = CostModel.fit(works, ms)
    assert c.keyframe_ms == pytest.approx(62.0)
    assert c.predict(FrameWork(10**10, 9, dense=True)) == pytest.approx(62.0)  # not 2 + 100 of the delta fit
    assert c.predict(FrameWork(2 * 10**9, 5)) == pytest.approx(22.0, rel=1e-3)
    assert c.mean_ms([FrameWork(10**9, 5), FrameWork(0, 0, dense=True)]) == pytest.approx((12.0 + 62.0) / 2, rel=1e-3)
    base = Schedule(0.05, "keyframe", None, 0.0)
    assert parse_schedule("refresh=flush:16:32", base) == Schedule(0.05, "flush:16:32")
    assert parse_schedule("held=off,kf=50,growth=0.5", base) == Schedule(None, "keyframe", 50, 0.5)
    for bad in ("held=2", "kf=0", "refresh=flash", "speed=3", "growth=-1"):
        with pytest.raises(UserError):
            parse_schedule(bad, base)
