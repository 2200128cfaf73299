"""Refresh by flush (deltacnn.gating.Refresh): the held-back input change goes out on a delta frame.

At threshold 0 a whole flush leaves nothing pending, so the flushed frame's output is the dense
output of that frame (against dense PyTorch and between the reference and cpu backends); frames
in between are not (the gate holds change back), so the check can fail. A flush costs the
multiply-adds of the held area, not of a keyframe; the tiled flush sends only clustered held change.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.gating import Refresh

BACKENDS = ["reference", "cpu"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _clip(n: int, h: int = 32, w: int = 40, seed: int = 3, streams: int = 1) -> list[torch.Tensor]:
    """Random frames: a random background; each frame changes a few isolated pixels (held by min_blob 3)
    and moves a 5x5 textured square (sent)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(streams, 3, h, w, generator=g)
    out = [x.clone()]
    for t in range(1, n):
        x = x.clone()
        lone = torch.rand(streams, 1, h, w, generator=g) < 0.01
        x += lone * (0.2 + torch.rand(streams, 3, h, w, generator=g))
        r, c = 4 + t, 5 + 2 * t
        x[..., r:r + 5, c:c + 5] = torch.rand(streams, 3, 5, 5, generator=g)
        out.append(x)
    return out


def _play(dm, frames):
    outs, flushed, modes = [], [], []
    with torch.no_grad():
        for x in frames:
            outs.append(dm(x).clone())
            flushed.append(list(dm.last_flushed))
            modes.append(dm.last_mode)
    return outs, flushed, modes


@pytest.mark.parametrize("backend", BACKENDS)
def test_flush_at_tau0_gives_the_dense_output_of_that_frame(backend: str) -> None:
    model, frames = _net(), _clip(8)
    dm = deltacnn.convert(model, frames[0], backend=backend, dense_above=None, min_blob=3, refresh_held=0.0,
                          refresh="flush")
    dm.enable_stats(True)
    outs, flushed, modes = [], [], []
    macs = []
    with torch.no_grad():
        for x in frames:
            outs.append(dm(x).clone())
            flushed.append(dm.last_flushed[0])
            modes.append(dm.last_mode)
            macs.append(dm.frame_stats().macs_fraction)
        dense = [model(x) for x in frames]
    assert modes == ["keyframe"] + ["delta"] * 7  # the refresh never ran a keyframe
    # refresh_held 0: a frame whose gate held anything back is followed by a flush
    assert flushed == [False, False, True, False, True, False, True, False]
    for t in range(1, 8):
        close = torch.allclose(outs[t], dense[t], atol=1e-5, rtol=1e-5)
        assert close == flushed[t], t  # exact on the flushes, held back in between
    # the flush is a delta frame: the held pixels and their receptive fields, not the whole frame
    assert all(m < 1.0 for m in macs[1:])


def test_flush_reference_and_cpu_agree() -> None:
    frames = _clip(6, streams=2)
    outs = {}
    for backend in BACKENDS:
        dm = deltacnn.convert(_net(), frames[0], backend=backend, dense_above=None, min_blob=3, refresh_held=0.0,
                              threshold=0.02, input_threshold=0.05, refresh="flush")
        outs[backend] = _play(dm, frames)
    assert outs["reference"][1] == outs["cpu"][1]
    assert any(f for fl in outs["cpu"][1] for f in fl)
    for a, b in zip(outs["reference"][0], outs["cpu"][0]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_flush_is_per_stream_and_keyframe_mode_unchanged() -> None:
    """Stream 0 holds change back, stream 1 does not: only stream 0 flushes; refresh 'keyframe' (default)
    keyframes the same stream instead, with the same output at tau 0."""
    model = _net()
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 3, 24, 24, generator=g)
    x1 = x0.clone()
    x1[0, :, [3, 10, 17], [4, 12, 20]] += 0.5  # isolated pixels of stream 0: held by min_blob 3
    x1[1, :, 8:14, 8:14] += 0.5  # a blob in stream 1: sent
    res = {}
    for refresh in ("flush", "keyframe"):
        dm = deltacnn.convert(model, x0, dense_above=None, min_blob=3, refresh_held=0.004, refresh=refresh)
        with torch.no_grad():
            dm(x0)
            dm(x1)
            assert dm.last_flushed == [False, False]
            y = dm(x1)
        res[refresh] = (y, dm.last_modes, dm.last_flushed)
    with torch.no_grad():
        dense = model(x1)
    assert res["flush"][1] == ["delta", "delta"] and res["flush"][2] == [True, False]
    assert res["keyframe"][1] == ["keyframe", "delta"] and res["keyframe"][2] == [False, False]
    for y, _, _ in res.values():
        assert torch.allclose(y, dense, atol=1e-5)


def test_tiled_flush_sends_clustered_held_change_only() -> None:
    """flush:8:6 sends the held pixels of an 8x8 tile holding >= 6 of them (a thin line), not lone ones."""
    model = _net()
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(1, 3, 32, 32, generator=g)
    x1 = x0.clone()
    x1[0, :, 2:10, 20] += 0.5  # a thin vertical line, 8 px in one tile column: held by min_blob 3
    x1[0, :, 25, 4] += 0.5  # one lone pixel
    dm = deltacnn.convert(model, x0, dense_above=None, min_blob=3, refresh_held=0.0, refresh="flush:8:6")
    with torch.no_grad():
        dm(x0)
        dm(x1)
        dm(x1)
    assert dm.last_flushed == [True]
    sent = dm.input_mask[0, 0]
    assert sent[2:8, 20].all() and not sent[25, 4]  # the line's full tile (rows 0-7) went out, the lone pixel waits
    ref = dm.layers["input"]._state("ref")
    assert torch.equal(ref[0, :, 25, 4], x0[0, :, 25, 4])


def test_refresh_spec_parsing_and_files(tmp_path) -> None:
    assert Refresh.parse(None) == Refresh() and Refresh.parse("flush") == Refresh("flush")
    assert Refresh.parse("flush:16:32") == Refresh("flush", 16, 32) and Refresh("flush", 16, 32).spec() == "flush:16:32"
    for bad in ("flash", "flush:16", "flush:4:17", "keyframe:2:2", "flush:a:b"):
        with pytest.raises(ValueError, match="refresh|flush"):
            Refresh.parse(bad)
    x0 = _clip(1)[0]
    dm = deltacnn.convert(_net(), x0, refresh_held=0.05, refresh="flush:8:4")
    dm.thresholds.refresh_held, dm.thresholds.refresh = 0.05, "flush:8:4"
    path = tmp_path / "t.json"
    dm.thresholds.save(path)
    again = deltacnn.convert(_net(), x0, thresholds_file=str(path))
    assert again.rt.refresh == Refresh("flush", 8, 4) and again.rt.refresh_held == 0.05
    assert deltacnn.convert(_net(), x0, thresholds_file=str(path), refresh="keyframe").rt.refresh == Refresh()
    # the keyframe interval a file was tuned with applies unless one is asked for
    dm.thresholds.keyframe_interval = 8
    dm.thresholds.save(path)
    assert deltacnn.convert(_net(), x0, thresholds_file=str(path)).keyframe_interval == 8
    assert deltacnn.convert(_net(), x0, thresholds_file=str(path), keyframe_interval=3).keyframe_interval == 3
    from deltacnn.thresholds import Thresholds
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="keyframe_interval"):
            Thresholds(keyframe_interval=bad)
    with pytest.raises(ValueError, match="refresh"):
        Thresholds(refresh="flush:3")


def test_flush_with_a_layer_factor_sends_the_residuals_it_reaches() -> None:
    """flush@0: on flush frames the layers run at threshold 0 where the flush's deltas arrive, so the
    output is closer to dense than with a plain flush; the factor holds for that frame only."""
    model, frames = _net(), _clip(8)
    with torch.no_grad():
        dense = [model(x) for x in frames]
    errs = {}
    for refresh in ("flush", "flush@0"):
        dm = deltacnn.convert(model, frames[0], dense_above=None, min_blob=3, refresh_held=0.0, threshold=0.3,
                              input_threshold=0.0, refresh=refresh)
        outs, flushed, _ = _play(dm, frames)
        assert dm.thresholds.frame_factor == 1.0
        errs[refresh] = sum(float((o - d).abs().max()) for o, d, f in zip(outs, dense, flushed) if f[0])
        assert any(f[0] for f in flushed)
    assert errs["flush@0"] < 0.5 * errs["flush"]
    assert Refresh.parse("flush:8:4@0.25") == Refresh("flush", 8, 4, 0.25)
    assert Refresh("flush", layers=0.5).spec() == "flush@0.5"
    for bad in ("keyframe@0.5", "flush@2", "flush@x"):
        with pytest.raises(ValueError):
            Refresh.parse(bad)
