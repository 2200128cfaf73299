"""Relative threshold units (calibration.measure_scales) and the input's small-blob gate (min_blob)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.calibration import measure_scales
from deltacnn.thresholds import INPUT


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).eval()


def _frame(scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 24, 32, generator=g) * scale


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_relative_units_scale_with_the_input(backend: str) -> None:
    """The same relative file means the same thing on 0..1 and 0..255 frames: identical masks."""
    masks = []
    for scale in (1.0, 255.0):
        model = _net()
        with torch.no_grad():  # a bias-free copy so a scaled input scales every activation
            for m in model:
                if isinstance(m, nn.Conv2d):
                    m.bias.zero_()
        x0 = _frame(scale)
        dm = deltacnn.convert(model, x0, backend=backend, dense_above=None)
        scales = measure_scales(dm, x0)
        assert scales[INPUT] == pytest.approx(float(x0.max() - x0.min()))
        assert set(scales) == set(dm.thresholds.known)
        dm.thresholds.default, dm.thresholds.input = 0.2, 0.05
        dm.enable_stats(True, keep_masks=True)
        dm(x0)
        x1 = x0.clone()
        x1[..., 4:12, 5:20] += 0.3 * scale * torch.rand(1, 3, 8, 15, generator=torch.Generator().manual_seed(2))
        x1[..., 18, 25] += 0.01 * scale  # below 5% of the range: held back
        dm(x1)
        masks.append({k: v.clone() for k, v in dm.rt.stats.masks.items()})
    assert masks[0].keys() == masks[1].keys()
    for k in masks[0]:
        assert torch.equal(masks[0][k], masks[1][k]), k
    assert not masks[0][INPUT][0, 0, 18, 25]


def test_relative_thresholds_round_trip_and_refuse_other_models(tmp_path) -> None:
    x0 = _frame()
    dm = deltacnn.convert(_net(), x0)
    measure_scales(dm, x0)
    dm.thresholds.default = 0.1
    name = dm.thresholds.known[1]
    assert dm.thresholds.get(name) == pytest.approx(0.1 * dm.thresholds.scales[name])
    p = tmp_path / "th.json"
    dm.thresholds.save(p)
    dm2 = deltacnn.convert(_net(), x0, thresholds_file=str(p))
    assert dm2.thresholds.units == "relative" and dm2.thresholds.get(name) == dm.thresholds.get(name)
    # a relative file without this model's scales is refused, not silently read as absolute
    data = json.loads(p.read_text())
    data["scales"].pop(name)
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="without the scale"):
        deltacnn.convert(_net(), x0, thresholds_file=str(p))


def test_relative_units_without_scales_fail_clearly() -> None:
    x0 = _frame()
    dm = deltacnn.convert(_net(), x0)
    dm.thresholds.units, dm.thresholds.default = "relative", 0.1
    dm(x0)
    with pytest.raises(RuntimeError, match="measure_scales"):
        dm(x0 + 0.5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_min_blob_holds_back_isolated_pixels_and_loses_nothing(backend: str) -> None:
    model = _net()
    x0 = _frame()
    dm = deltacnn.convert(model, x0, backend=backend, dense_above=None, min_blob=3)
    dm.enable_stats(True, keep_masks=True)
    dm(x0)
    # an isolated pixel is held back; a 4x4 blob is sent whole; the output is exact where sent
    x1 = x0.clone()
    x1[..., 2, 3] += 0.7
    x1[..., 10:14, 20:24] += 0.5 * torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3)) + 0.1
    y1 = dm(x1)
    m = dm.input_mask[0, 0]
    assert not m[2, 3] and m[10:14, 20:24].all() and int(m.sum()) == 16
    x_sent = x1.clone()
    x_sent[..., 2, 3] = x0[..., 2, 3]
    with torch.no_grad():
        assert torch.allclose(y1, model(x_sent), atol=1e-5)
    # the held-back change stays pending and goes out with the blob that grows around it
    x2 = x1.clone()
    x2[..., 1:4, 2:5] += 0.2
    y2 = dm(x2)
    with torch.no_grad():
        assert torch.allclose(y2, model(x2), atol=1e-5)


def test_min_blob_checks_its_argument() -> None:
    with pytest.raises(ValueError, match="min_blob"):
        deltacnn.convert(_net(), _frame(), min_blob=2)
