"""Layer refresh (deltacnn.layer_refresh): the deep layers' held-back residuals re-sent without a keyframe.

At factor 0 a refresh frame leaves every selected conv block with no residual (E = f(A) everywhere), so
with every layer selected and an exact input it gives the dense output of that frame; the layers it
does not select keep theirs. The triggers fire exactly when they should, a refresh that never fires
changes nothing, and the rule travels through the thresholds file, convert, the CLI and the tuner.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.commands.common import UserError, build_delta
from deltacnn.commands.tune import Schedule, default_schedules, parse_schedule
from deltacnn.layer_refresh import LayerRefresh
from deltacnn.layers import DeltaConv2d
from deltacnn.thresholds import Thresholds

BACKENDS = ["reference", "cpu"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()


def _frames(n: int, batch: int = 1) -> list[torch.Tensor]:
    """A random background with a bright textured square moving 2 px a frame (each stream its own row)."""
    g = torch.Generator().manual_seed(1)
    bg = torch.rand(batch, 3, 32, 40, generator=g)
    tex = torch.rand(batch, 3, 8, 8, generator=g) + 0.5
    out = []
    for t in range(n):
        x = bg.clone()
        x[:, :, 10:18, 2 + 2 * t:10 + 2 * t] = tex
        out.append(x)
    return out


def _convert(backend: str, frames, spec: str | None, tau: float = 0.3, **kw):
    return deltacnn.convert(_net(), frames[0], backend=backend, dense_above=None, threshold=tau, input_threshold=0.0,
                            refresh_layers=spec, **kw)


def _residual(layer: DeltaConv2d) -> float:
    return float((layer.act(layer._state("acc")) - layer._state("emitted")).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_of_every_layer_gives_the_dense_output(backend: str) -> None:
    frames = _frames(9)
    net = _net()
    dm = _convert(backend, frames, "flush:4:s1")
    errs, refreshed = [], []
    with torch.no_grad():
        for x in frames:
            errs.append(float((dm(x) - net(x)).abs().max()))
            refreshed.append(dm.last_refreshed[0])
    assert refreshed == [False] * 4 + [True] + [False] * 3 + [True]
    assert errs[4] < 1e-4 and errs[8] < 1e-4, errs  # exact input, no residual left anywhere: the dense output
    assert errs[3] > 1e-3 and errs[7] > 1e-3, errs  # the truncation error the refresh removed (the test can fail)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_clears_the_selected_layers_only(backend: str) -> None:
    frames = _frames(5)
    dm = _convert(backend, frames, "flush:4:s2", tau=0.05)  # the stride-2 and stride-4 blocks, not the first
    convs = [m for m in dm.layers.values() if isinstance(m, DeltaConv2d) and m.act is not None]
    assert [dm.thresholds.strides[c.act_name] for c in convs] == [1.0, 2.0, 4.0]
    dm.thresholds.set(convs[0].act_name, 0.3)  # a residual in the first block too (which the refresh leaves)
    with torch.no_grad():
        for x in frames[:4]:
            dm(x)
        before = [_residual(c) for c in convs]
        dm(frames[4])
    assert dm.last_refreshed == [True]
    after = [_residual(c) for c in convs]
    assert min(before) > 1e-3, before
    assert after[1] < 1e-5 and after[2] < 1e-5, after
    assert after[0] > 1e-3, after  # not selected: its residual stays


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_of_several_streams(backend: str) -> None:
    frames = _frames(6, batch=2)
    net = _net()
    dm = _convert(backend, frames, "flush:5:s1")
    with torch.no_grad():
        for x in frames:
            y = dm(x)
    assert dm.last_refreshed == [True, True]
    with torch.no_grad():
        assert float((y - net(frames[-1])).abs().max()) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_and_keyframe_interval_schedule(backend: str) -> None:
    frames = _frames(13)
    dm = _convert(backend, frames, "flush:3", keyframe_interval=6)
    modes = []
    with torch.no_grad():
        for x in frames:
            dm(x)
            modes.append("refresh" if dm.last_refreshed[0] else dm.last_mode)
    assert modes == (["keyframe", "delta", "delta", "refresh", "delta", "delta"] * 2 + ["keyframe"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refresh_that_never_fires_changes_nothing(backend: str) -> None:
    frames = _frames(7)
    outs = {}
    for spec in (None, "flush:1000:s1"):
        dm = _convert(backend, frames, spec)
        with torch.no_grad():
            outs[spec] = [dm(x) for x in frames]
    for a, b in zip(outs[None], outs["flush:1000:s1"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_area_triggers(backend: str) -> None:
    frames = _frames(6)
    got = {}
    for spec in ("flush:a0:s1", "flush:a1:s1", "keyframe:a0:s1"):
        dm = _convert(backend, frames, spec)
        modes = []
        with torch.no_grad():
            for x in frames:
                dm(x)
                modes.append("refresh" if dm.last_refreshed[0] else dm.last_mode)
        got[spec] = modes
        if spec == "flush:a0:s1":
            assert 0 < dm._touched[0] < 1  # after the refresh: the area this frame's square touched
    # area 0: the frame after one that touched anything refreshes (which sends all, so the area starts over
    # at 0); area 1: never; keyframe: a keyframe instead
    assert got["flush:a0:s1"] == ["keyframe", "delta", "refresh", "delta", "refresh", "delta"]
    assert got["flush:a1:s1"] == ["keyframe"] + ["delta"] * 5
    assert got["keyframe:a0:s1"] == ["keyframe", "delta"] * 3


def test_spec_round_trip_and_errors() -> None:
    for spec in ("flush:8", "flush:a0.3", "keyframe:a0.25:s8", "flush:6:s8@0.25"):
        assert LayerRefresh.parse(spec).spec() == spec
    assert LayerRefresh.parse("off") is None and LayerRefresh.parse(None) is None
    lr = LayerRefresh.parse("flush:6:s8@0.25")
    assert (lr.every, lr.area, lr.stride, lr.factor, lr.run) == (6, None, 8.0, 0.25, "flush")
    for bad in ("flush", "flush:0", "flush:a2", "flush:8:x8", "keyframe:8@0.5", "often:8", "flush:8@2"):
        with pytest.raises(ValueError):
            LayerRefresh.parse(bad)


def test_thresholds_file_carries_the_rules(tmp_path) -> None:
    frames = _frames(2)
    dm = _convert("reference", frames, None)
    dm.thresholds.refresh_drift, dm.thresholds.refresh_layers = 0.25, "flush:8"
    path = tmp_path / "t.json"
    dm.thresholds.save(path)
    data = json.loads(path.read_text())
    assert data["refresh_drift"] == 0.25 and data["refresh_layers"] == "flush:8"
    dm2 = deltacnn.convert(_net(), frames[0], backend="reference", thresholds_file=str(path))
    assert dm2.rt.refresh_drift == 0.25 and dm2.rt.layer_refresh == LayerRefresh.parse("flush:8")
    dm3 = deltacnn.convert(_net(), frames[0], backend="reference", thresholds_file=str(path),
                           refresh_layers="flush:a0.3", refresh_drift=0.5)  # asked for: the file's rule yields
    assert dm3.rt.refresh_drift == 0.5 and dm3.rt.layer_refresh.area == 0.3
    dm4 = deltacnn.convert(_net(), frames[0], backend="reference", thresholds_file=str(path), refresh_layers="off")
    assert dm4.rt.layer_refresh is None
    data["refresh_layers"] = "flush:zero"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="layer refresh"):
        Thresholds().load(path)


def test_build_delta_and_cli_flags(tmp_path) -> None:
    from deltacnn.cli import build_parser

    frames = _frames(2)
    a = build_parser().parse_args(["run", "--refresh-layers", "flush:8:s8", "--refresh-drift", "0.3", "clip.avi"])
    assert a.refresh_layers == "flush:8:s8" and a.refresh_drift == 0.3
    a = build_parser().parse_args(["tune", "--budget", "0.9", "--refresh-layers", "flush:a0.2", "clip.avi"])
    assert a.refresh_layers == "flush:a0.2"
    dm = build_delta(_net(), frames[0], refresh_layers="flush:8", refresh_drift=0.3)
    assert dm.rt.layer_refresh.every == 8 and dm.rt.refresh_drift == 0.3
    with pytest.raises(UserError, match="--refresh-layers"):
        build_delta(_net(), frames[0], refresh_layers="flush:")
    th = tmp_path / "t.json"
    Thresholds(refresh_layers="flush:4", refresh_drift=0.2).save(th)
    dm = build_delta(_net(), frames[0], thresholds=th)
    assert dm.rt.layer_refresh.every == 4 and dm.rt.refresh_drift == 0.2
    dm = build_delta(_net(), frames[0], thresholds=th, refresh_layers="off")
    assert dm.rt.layer_refresh is None


def test_schedules_carry_the_rules() -> None:
    base = Schedule(keyframe_interval=8)
    sc = parse_schedule("kf=16,layers=flush:8,drift=0.25", base)
    assert (sc.keyframe_interval, sc.refresh_layers, sc.refresh_drift) == (16, "flush:8", 0.25)
    assert parse_schedule("layers=off,drift=off", sc).refresh_layers is None
    assert Schedule(keyframe_interval=16, refresh_layers="flush:8") in default_schedules(base)
    with pytest.raises(UserError):
        parse_schedule("layers=flush:x", base)
    assert "layers flush:8" in sc.describe() and sc.row()["refresh_layers"] == "flush:8"


def test_compile_refuses_a_layer_refresh() -> None:
    frames = _frames(2)
    dm = _convert("reference", frames, "flush:8")
    with pytest.raises(ValueError, match="layer refresh"):
        deltacnn.compile(dm)
