"""Noise options: the input gates (deltacnn.gating.InputGate) and deep-layer truncation (Thresholds.growth).

Every option is exact when off, sends only what it says, loses nothing (held-back change stays in
x - ref), and gives on the reference and cpu backends the dense model's output on the frame that
was actually transmitted.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacnn
from deltacnn import InputGate
from deltacnn.thresholds import INPUT

BACKENDS = ["reference", "cpu"]


def _net(stride: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _clip(n: int = 4, h: int = 32, w: int = 40, seed: int = 1) -> list[torch.Tensor]:
    """Random frames: a textured background, sprinkled noise pixels, a moving blob with a faint rim."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.rand(1, 3, h, w, generator=g)
    out = []
    for t in range(n):
        x = bg.clone()
        noise = (torch.rand(1, 1, h, w, generator=g) < 0.03).float()
        x += noise * (0.15 + 0.2 * torch.rand(1, 3, h, w, generator=g))
        r, c = 6 + 2 * t, 8 + 3 * t
        x[..., r - 1:r + 6, c - 1:c + 6] += 0.06  # faint rim
        x[..., r:r + 5, c:c + 5] += 0.3 + 0.2 * torch.rand(1, 3, 5, 5, generator=g)  # strong core
        out.append(x)
    return out


def _run(dm, frames):
    with torch.no_grad():
        return [dm(x).clone() for x in frames]


def _sparsify(dm):
    return dm.layers[INPUT]


GATES = [InputGate(tile=8, tile_min=4), InputGate(low=0.3), InputGate(low=0.3, hysteresis="temporal"),
         InputGate(min_blob=3, tile=4, tile_min=2, low=0.3, hysteresis="both", steps=3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_and_growth_off_are_exact(backend: str) -> None:
    """Default gate, an inactive one (low=1) and growth 0 give bit-identical outputs to plain convert."""
    frames = _clip()
    plain = _run(deltacnn.convert(_net(), frames[0], threshold=0.05, input_threshold=0.1, backend=backend,
                                  dense_above=None), frames)
    for kw in ({"input_gate": InputGate()}, {"input_gate": InputGate(low=1.0)}, {"threshold_growth": 0.0}):
        dm = deltacnn.convert(_net(), frames[0], threshold=0.05, input_threshold=0.1, backend=backend,
                              dense_above=None, **kw)
        assert not _sparsify(dm).gate.active
        for a, b in zip(plain, _run(dm, frames)):
            assert torch.equal(a, b), kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES, ids=lambda g: g.describe())
def test_gated_input_gives_dense_output_of_the_sent_frame(backend: str, gate: InputGate) -> None:
    """At tau 0 in the layers the output is dense PyTorch on the transmitted reference frame; the reference
    moves only at sent pixels (held-back change is kept, not lost); sent pixels pass the low threshold."""
    model, frames, tau = _net(), _clip(), 0.1
    dm = deltacnn.convert(model, frames[0], input_threshold=tau, backend=backend, dense_above=None, input_gate=gate)
    sp = _sparsify(dm)
    held = added = 0
    with torch.no_grad():
        dm(frames[0])
        for x in frames[1:]:
            before = sp._state("ref").clone()
            y = dm(x)
            ref = sp._state("ref")
            sent = dm.input_mask
            change = (x - before).abs().amax(1, keepdim=True)
            assert (change[sent] > gate.send_threshold(tau)).all()
            assert torch.allclose(ref, torch.where(sent, x, before), atol=1e-6)  # moved only where sent
            held += int(((change > tau) & ~sent).sum())
            added += int(((change <= tau) & sent).sum())
            assert torch.allclose(y, model(ref), atol=1e-5)
    # on this clip each gate does something: holds noise back (blob, tile) or adds faint pixels (hysteresis)
    assert held > 0 if gate.min_blob > 1 or gate.tile > 1 else held == 0
    assert added > 0 if gate.hysteresis_on else added == 0


@pytest.mark.parametrize("gate", GATES, ids=lambda g: g.describe())
def test_gates_agree_between_backends_and_streams(gate: InputGate) -> None:
    """reference == cpu backend, and a batch of two streams == each stream alone (per-stream gating)."""
    a, b = _clip(seed=1), _clip(seed=2)
    kw = dict(threshold=0.02, input_threshold=0.1, dense_above=None, input_gate=gate)
    ref = _run(deltacnn.convert(_net(), a[0], backend="reference", **kw), a)
    cpu = _run(deltacnn.convert(_net(), a[0], backend="cpu", **kw), a)
    for r, c in zip(ref, cpu):
        assert torch.allclose(r, c, atol=1e-5)
    both = _run(deltacnn.convert(_net(), torch.cat([a[0], b[0]]), backend="cpu", **kw),
                [torch.cat([x, y]) for x, y in zip(a, b)])
    alone_b = _run(deltacnn.convert(_net(), b[0], backend="cpu", **kw), b)
    for i in range(len(a)):
        assert torch.allclose(both[i][:1], cpu[i], atol=1e-5)
        assert torch.allclose(both[i][1:], alone_b[i], atol=1e-5)


def _step(gate: InputGate, x0: torch.Tensor, xs: list[torch.Tensor], tau: float = 0.1) -> list[torch.Tensor]:
    dm = deltacnn.convert(_net(), x0, input_threshold=tau, backend="reference", dense_above=None, input_gate=gate)
    masks = []
    with torch.no_grad():
        dm(x0)
        for x in xs:
            dm(x)
            masks.append(dm.input_mask[0, 0].clone())
    return masks


def test_spatial_hysteresis_sends_the_faint_rim_but_not_faint_noise() -> None:
    x0 = torch.full((1, 3, 24, 24), 0.5)  # not zeros: a frame 16x above its keyframe's range re-keys
    x1 = x0.clone()
    x1[..., 8:12, 8:12] += 0.5  # strong core
    x1[..., 7, 7:13] += 0.05  # faint rim next to it
    x1[..., 20, 3] += 0.05  # the same faint change, isolated
    off, on = _step(InputGate(), x0, [x1])[0], _step(InputGate(low=0.4), x0, [x1])[0]
    assert off.sum() == 16 and not off[7].any()
    assert on[8:12, 8:12].all() and on[7, 7:13].all() and not on[20, 3]
    assert int(on.sum()) == 16 + 6


def test_temporal_hysteresis_keeps_an_updating_pixel_updating() -> None:
    x0 = torch.full((1, 3, 16, 16), 0.5)
    x1 = x0.clone()
    x1[..., 5, 5] += 0.5  # strong: sent
    x2 = x1.clone()
    x2[..., 5, 5] += 0.05  # then faint changes of the same pixel
    x2[..., 9, 9] += 0.05  # and a faint change of a pixel that was not updating
    x3 = x2.clone()
    x3[..., 5, 5] += 0.01  # below the low threshold: the pixel stops
    off = _step(InputGate(), x0, [x1, x2, x3])
    on = _step(InputGate(low=0.4, hysteresis="temporal"), x0, [x1, x2, x3])
    assert off[0][5, 5] and not off[1][5, 5]
    assert on[0][5, 5] and on[1][5, 5] and not on[1][9, 9] and int(on[1].sum()) == 1
    assert not on[2].any()


def test_tile_gate_keeps_a_thin_line_that_an_opening_drops() -> None:
    x0 = torch.full((1, 3, 16, 16), 0.5)
    x1 = x0.clone()
    x1[..., 2, 1:7] += 0.5  # a thin line: 6 pixels in tile (0, 0)
    x1[..., 12, 12] += 0.5  # two lone pixels in tile (1, 1)
    x1[..., 13, 9] += 0.5
    tile = _step(InputGate(tile=8, tile_min=4), x0, [x1])[0]
    blob = _step(InputGate(min_blob=3), x0, [x1])[0]
    assert tile[2, 1:7].all() and int(tile.sum()) == 6
    assert not blob.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_frames_after_a_gated_input_are_exact(backend: str) -> None:
    """A frame that runs densely (dense_above) uses the real frame, not the gated one."""
    model, frames = _net(), _clip()
    dm = deltacnn.convert(model, frames[0], input_threshold=0.1, backend=backend, dense_above=0.05,
                          input_gate=InputGate(min_blob=3, low=0.5))
    busy = frames[0] + 0.3 * torch.rand(frames[0].shape, generator=torch.Generator().manual_seed(5))
    busy[..., 3, 3] += 0.5  # an isolated pixel the gate would hold back
    with torch.no_grad():
        dm(frames[0])
        y = dm(busy)
        assert dm.last_mode == "dense"
        assert torch.allclose(y, model(busy), atol=1e-5)


def test_growth_scales_thresholds_by_stride_and_equals_explicit_overrides(tmp_path) -> None:
    frames = _clip()
    dm = deltacnn.convert(_net(stride=2), frames[0], threshold=0.03, input_threshold=0.1, backend="cpu",
                          dense_above=None, threshold_growth=0.5)
    th = dm.thresholds
    assert sorted(th.strides.values()) == [2.0, 4.0, 8.0]
    names = sorted(th.strides, key=th.strides.get)
    assert [th.get(n) for n in names] == pytest.approx([0.03, 0.03 * 2 ** 0.5, 0.03 * 2.0])
    assert th.get(INPUT) == 0.1  # the input is not scaled
    grown = _run(dm, frames)
    manual = deltacnn.convert(_net(stride=2), frames[0], threshold=0.03, input_threshold=0.1, backend="cpu",
                              dense_above=None)
    for n in names:
        manual.thresholds.set(n, 0.03 * (th.strides[n] / 2.0) ** 0.5)
    for a, b in zip(grown, _run(manual, frames)):
        assert torch.allclose(a, b, atol=1e-6)
    ref = _run(deltacnn.convert(_net(stride=2), frames[0], threshold=0.03, input_threshold=0.1, backend="reference",
                                dense_above=None, threshold_growth=0.5), frames)
    for a, b in zip(grown, ref):
        assert torch.allclose(a, b, atol=1e-5)
    # saved with the file; a file without growth leaves a model's convert-time growth alone
    p = tmp_path / "th.json"
    th.save(p)
    again = deltacnn.convert(_net(stride=2), frames[0], thresholds_file=str(p))
    assert again.thresholds.growth == 0.5 and again.thresholds.get(names[-1]) == pytest.approx(th.get(names[-1]))
    with pytest.raises(ValueError, match="disagree"):
        deltacnn.convert(_net(stride=2), frames[0], thresholds_file=str(p), threshold_growth=1.0)


def test_gate_arguments_are_checked() -> None:
    for kw in ({"tile": 8, "tile_min": 65}, {"tile": 0}, {"low": 1.5}, {"hysteresis": "sideways"}, {"steps": -1},
               {"min_blob": 2}):
        with pytest.raises(ValueError):
            InputGate(**kw)
    with pytest.raises(ValueError, match="disagree"):
        deltacnn.convert(_net(), _clip(1)[0], min_blob=3, input_gate=InputGate(min_blob=5))
    with pytest.raises(TypeError, match="InputGate"):
        deltacnn.convert(_net(), _clip(1)[0], input_gate={"min_blob": 3})
    with pytest.raises(ValueError, match="growth"):
        deltacnn.convert(_net(), _clip(1)[0], threshold_growth=-1.0)


def test_cli_flags_make_the_gate_and_growth() -> None:
    from deltacnn.cli import _gate, build_parser
    from deltacnn.commands.common import UserError, build_delta

    a = build_parser().parse_args(["run", "--min-blob", "3", "--tile-gate", "8:4", "--input-low", "0.3",
                                   "--hysteresis", "both", "--threshold-growth", "0.5",
                                   "--refresh-held", "0.01"])
    assert _gate(a) == InputGate(min_blob=3, tile=8, tile_min=4, low=0.3, hysteresis="both")
    assert a.threshold_growth == 0.5 and a.refresh_held == 0.01
    t = build_parser().parse_args(["tune", "--budget", "f1>=0.9", "--input-low", "0.5", "--hysteresis", "temporal"])
    assert _gate(t) == InputGate(low=0.5, hysteresis="temporal")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--tile-gate", "8:100"])
    with pytest.raises(UserError, match="low"):
        _gate(build_parser().parse_args(["run", "--input-low", "2"]))
    x0 = _clip(1)[0]
    dm = build_delta(_net(), x0, input_gate=_gate(a), threshold_growth=0.5, refresh_held=a.refresh_held)
    assert _sparsify(dm).gate == _gate(a) and dm.thresholds.growth == 0.5 and dm.rt.refresh_held == 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_held_keyframes_a_stream_whose_gate_holds_change_back(backend: str) -> None:
    """A small change that stays (below min_blob) is held by the gate for good; with refresh_held the stream
    runs a keyframe on the next frame and its output is exact again; the other stream of the batch runs on."""
    model = _net()
    x0 = torch.cat([_clip(1, 24, 24, seed=1)[0], _clip(1, 24, 24, seed=2)[0]])
    x1 = x0.clone()
    x1[0, :, [3, 10, 17], [4, 12, 20]] += 0.5  # three isolated pixels of stream 0 (0.5% of its pixels)
    outs = {}
    for refresh in (None, 0.004):
        dm = deltacnn.convert(model, x0, input_threshold=0.1, backend=backend, dense_above=None, min_blob=3,
                              refresh_held=refresh)
        with torch.no_grad():
            dm(x0)
            dm(x1)
            assert dm.last_mode == "delta"
            y = dm(x1)
            outs[refresh] = (y, dm.last_modes)
    with torch.no_grad():
        dense = model(x1)
    assert not torch.allclose(outs[None][0][:1], dense[:1], atol=1e-4)  # held back without the refresh
    assert outs[None][1] == ["delta", "delta"]
    assert outs[0.004][1] == ["keyframe", "delta"]
    assert torch.allclose(outs[0.004][0], dense, atol=1e-5)
    with pytest.raises(ValueError, match="refresh_held"):
        deltacnn.convert(model, x0, refresh_held=2.0)
