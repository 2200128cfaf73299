"""Drift-triggered keyframes (Runtime.refresh_drift): a keyframe once the input change not sent yet,
mean |x - ref| in input thresholds, passes the level; never while it stays below, never when off."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacnn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.SiLU(), nn.Conv2d(8, 4, 3, 2, 1)).eval()


def _drifting(n: int, step: float) -> list[torch.Tensor]:
    """A random frame brightened by `step` a frame everywhere: below the input threshold, so held."""
    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    return [x + t * step for t in range(n)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_keyframe_when_the_unsent_change_passes_the_level(backend: str) -> None:
    frames = _drifting(12, 0.01)  # threshold 0.1: never sent; unsent change 0.1 thresholds per frame
    dm = deltacnn.convert(_net(), frames[0], backend=backend, dense_above=None, threshold=0.0, input_threshold=0.1)
    dm.rt.refresh_drift = 0.35
    modes = []
    with torch.no_grad():
        for x in frames:
            dm(x)
            modes.append(dm.last_mode)
    # unsent change after frame k of a keyframe run: 0.1 k thresholds; > 0.35 after the 4th delta frame
    assert modes == ["keyframe"] + (["delta"] * 4 + ["keyframe"]) * 2 + ["delta"]
    dm.rt.refresh_drift = None
    dm.reset()
    with torch.no_grad():
        got = [(dm(x), dm.last_mode)[1] for x in frames]
    assert got == ["keyframe"] + ["delta"] * 11
