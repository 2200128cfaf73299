"""YOLOv8's box decode on the head's delta streams (models.yolov8.DeltaBoxDecode): only the anchors whose head
maps changed are decoded again, and the output equals the full decode of the same maps, bit for bit; the
Detect cats are read as their parts. Checked against the C++ full decode, against the converter's old path
(a Densify per head map and the full decode), against the reference backend and against dense PyTorch."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

import deltacnn
from conftest import make_video, rel_err
from deltacnn.backends import cpu_kernels
from deltacnn.layers import DeltaCat, DeltaConv2d, DeltaSlice, Densify
from deltacnn.models import yolov8 as Y

K = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(K is None or not K.has_conv_rows(), reason="no C++ kernels / AVX2 here")
REG, NC = 16, 80
SHAPES = ((6, 8), (3, 4), (2, 2))


def _maps(b: int, g: torch.Generator) -> list[torch.Tensor]:
    return [(3 * torch.randn(b, 4 * REG + NC, h, w, generator=g)).contiguous(memory_format=torch.channels_last)
            for h, w in SHAPES]


def _decode_inputs():
    anchors, strides = Y._anchors(SHAPES, torch.device("cpu"), torch.float32)
    return anchors, strides.reshape(-1), torch.arange(REG, dtype=torch.float32)


@needs_kernels
@pytest.mark.parametrize("split", [False, True], ids=["one map", "box and class maps"])
def test_decode_at_changed_anchors_equals_full_decode(split):
    g = torch.Generator().manual_seed(0)
    anchors, strides, dfl = _decode_inputs()
    maps = _maps(2, g)
    out = K.yolo_decode(maps, anchors, strides, dfl, NC)
    masks = []
    for m in maps:  # change the maps at random pixels, some in each image
        mask = torch.rand(m.shape[0], 1, *m.shape[2:], generator=g) < 0.3
        m.add_(torch.where(mask, torch.randn(m.shape, generator=g), 0.0))
        masks.append(mask)
    want = K.yolo_decode(maps, anchors, strides, dfl, NC)
    assert not torch.equal(out, want)
    if split:
        boxes = [m[:, :4 * REG].contiguous(memory_format=torch.channels_last) for m in maps]
        classes = [m[:, 4 * REG:].contiguous(memory_format=torch.channels_last) for m in maps]
        # each level's change split over the two maps' masks (their union is the changed anchors)
        lv_masks = [[mk & (torch.rand(mk.shape, generator=g) < 0.5), mk] for mk in masks]
        count = K.yolo_decode_at(boxes, classes, 0, lv_masks, anchors, strides, dfl, NC, out)
    else:
        count = K.yolo_decode_at(maps, maps, 4 * REG, [[mk] for mk in masks], anchors, strides, dfl, NC, out)
    assert count == sum(int(mk.sum()) for mk in masks)
    assert torch.equal(out, want)


@needs_kernels
def test_accumulate_at_equals_the_reference_accumulate():
    from deltacnn.backends.cpu_fused import fused_cpu_backend
    from deltacnn.backends.reference import ReferenceBackend
    from deltacnn.tensor import DeltaTensor, to_cl
    g = torch.Generator().manual_seed(1)
    state = to_cl(torch.randn(2, 24, 5, 7, generator=g))
    mask = torch.rand(2, 1, 5, 7, generator=g) < 0.4
    d = DeltaTensor(to_cl(torch.randn(2, 24, 5, 7, generator=g)), mask)
    a, b = state.clone(), state.clone()
    ReferenceBackend().accumulate(a, d)
    backend = fused_cpu_backend()
    assert backend._accumulate_ok(b, d)
    backend.accumulate(b, d)
    assert torch.equal(a, b) and not torch.equal(a, state)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = Y.yolov8("n")
    from deltacnn import models
    return models.randomize_bn_(m, seed=1)


def _clip(frames: int, n: int = 1) -> torch.Tensor:
    return make_video(frames, n=n, h=64, w=96, noise=0.003, seed=2, size=12).clamp(0, 1)


# an input threshold that holds changes back (layers at 0: the random weights' deep activations are tiny, any
# layer threshold that truncates at all stops every change before the head)
_HELD = {"threshold": 0.0, "input_threshold": 0.03}


def _convert(m, x0, backend: str, new: bool, monkeypatch, **kw):
    """The delta model; new=False: as session 11 converted it (a Densify per head map and the full decode,
    C2f cats with the two slices as parts)."""
    C = importlib.import_module("deltacnn.convert")  # (the package exports the function under that name)
    if not new:
        monkeypatch.setattr(C, "_delta_tail_of", lambda node: None)
        monkeypatch.setattr(C._Converter, "_channel_range", lambda self, n: None)
    try:
        return deltacnn.convert(m, x0, backend=backend, dense_above=None, **kw)
    finally:
        monkeypatch.undo()


def test_converter_gives_the_decode_the_head_streams_and_the_cat_parts(monkeypatch):
    m = _model()
    x0 = _clip(1)[0]
    dm = _convert(m, x0, "reference", True, monkeypatch)
    mods = dict(dm.graph_module.named_modules())
    decodes = [n for n in dm.graph_module.graph.nodes if n.op == "call_module"
               and isinstance(mods[n.target], Y.DeltaBoxDecode)]
    assert len(decodes) == 1 and len(decodes[0].all_input_nodes) == 7  # 3 levels x (box, class) + the DFL bins
    assert not any(isinstance(x, Densify) for x in mods.values())
    cats = [x for x in mods.values() if isinstance(x, DeltaCat)]
    assert len(cats) == 13  # the 3 Detect cats are gone (8 C2f, SPPF, 4 neck concats remain)
    assert [r.op.rsplit(".", 1)[-1] for r in dm.report.tails] == ["decode_boxes"] and dm.report.islands == []
    # each C2f cat reads cv1's output whole; only the slice y[:, c:] (the bottlenecks' input) is left
    assert _cats_of_slices(dm) == 0 and sum(isinstance(x, DeltaSlice) for x in mods.values()) == 8
    old = _convert(m, x0, "reference", False, monkeypatch)
    assert sum(isinstance(x, DeltaCat) for x in old.graph_module.modules()) == 16
    assert sum(isinstance(x, DeltaSlice) for x in old.graph_module.modules()) == 16 and _cats_of_slices(old) == 8


def _cats_of_slices(dm) -> int:
    """Cats whose first part is a channel slice (C2f's y[:, :c] before the slices were joined)."""
    mods = dict(dm.graph_module.named_modules())
    return sum(1 for n in dm.graph_module.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], DeltaCat)
               and n.args[0].op == "call_module" and isinstance(mods[n.args[0].target], DeltaSlice))


@pytest.mark.parametrize("path", ["changed anchors", "full decode"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_delta_decode_equals_the_densify_path_bit_for_bit(backend, path, monkeypatch):
    """A truncating input threshold, a batch of two different streams, a reset in the middle: the new conversion
    (decode on the streams: parts in place, O per part, only changed anchors decoded on the cpu backend;
    C2f cats reading y whole) gives exactly the old one's output (Detect cat, Densify, full decode; the
    two slices) on every frame."""
    if backend == "cpu" and (K is None or not K.has_conv_rows()):
        pytest.skip("no C++ kernels here")
    m = _model()
    clip = _clip(9, n=2)
    new = _convert(m, clip[0], backend, True, monkeypatch, **_HELD)
    old = _convert(m, clip[0], backend, False, monkeypatch, **_HELD)
    modes, decoded = [], []
    if K is not None and path == "changed anchors":  # count the anchors the kernel decodes
        real = K.yolo_decode_at
        monkeypatch.setattr(K, "yolo_decode_at", lambda *a: decoded.append(real(*a)) or decoded[-1])
    for t in range(clip.shape[0]):
        if t == 5:
            new.reset(), old.reset()
        with torch.no_grad(), monkeypatch.context() as mp:
            if path == "full decode":  # DeltaBoxDecode's path without the kernels: every anchor of O each frame
                mp.setattr(Y, "_delta_decode_ok", lambda *a: None)
            a = new(clip[t])
        with torch.no_grad():
            b = old(clip[t])
        modes.append(new.last_mode)
        assert torch.equal(a, b), (t, float((a - b).abs().max()))
    assert modes == ["keyframe"] + ["delta"] * 4 + ["keyframe"] + ["delta"] * 3
    if decoded:  # keyframes decode every anchor of both streams, delta frames only some
        every = 2 * sum(h * w for h, w in ((8, 12), (4, 6), (2, 3)))
        assert decoded[0] == decoded[5] == every and all(0 < c < every for c in decoded[1:5] + decoded[6:]), decoded


@needs_kernels
def test_delta_decode_at_threshold_zero_equals_dense_and_the_reference_backend(monkeypatch):
    m = _model()
    clip = _clip(7, n=2)
    cpu = _convert(m, clip[0], "cpu", True, monkeypatch)
    ref = _convert(m, clip[0], "reference", True, monkeypatch)
    for t in range(clip.shape[0]):
        with torch.no_grad():
            a, r, want = cpu(clip[t]), ref(clip[t]), m(clip[t])
        assert rel_err(a, want) < 1e-4, t
        assert rel_err(a, r) < 1e-4, t
        torch.testing.assert_close(a[:, 4:], want[:, 4:], rtol=1e-4, atol=1e-4)


@needs_kernels
def test_cache_is_not_the_returned_tensor_and_a_stream_keyframe_updates_it(monkeypatch):
    """Outputs are copies (editing one changes nothing later); a keyframe of one stream of a batch (mixed
    frame) refreshes that stream's rows of the cache, so the next delta frame is still the full decode."""
    m = _model()
    clip = _clip(6, n=2)
    new = _convert(m, clip[0], "cpu", True, monkeypatch, **_HELD)
    old = _convert(m, clip[0], "cpu", False, monkeypatch, **_HELD)
    for t in range(clip.shape[0]):
        if t == 3:  # stream 1 alone runs a keyframe (as after a per-stream refresh)
            new._since[1] = old._since[1] = 0
        with torch.no_grad():
            a, b = new(clip[t]), old(clip[t])
        assert torch.equal(a, b), t
        if t == 3:
            assert new.last_modes == ["delta", "keyframe"]
        a.fill_(float("nan"))  # a caller editing its output in place


class _SliceCats(torch.nn.Module):
    """Cats of channel slices: of the input stream (Sparsify) covering it, C2f-like halves of a conv output
    that also feeds another conv, the halves in reverse order and a slice that covers only part of its
    source (these two must stay parts)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = torch.nn.Conv2d(3 + 12 + 8 + 6, 8, 1)

    def forward(self, x):
        y = torch.nn.functional.silu(self.c1(x))
        s = torch.cat([x[:, :1], x[:, 1:]], 1)
        z = torch.cat([y[:, :4], y[:, 4:], torch.relu(self.c2(y[:, 4:]))], 1)
        r = torch.cat([y[:, 4:], y[:, :4]], 1)
        p = torch.cat([y[:, :4], y[:, 4:6]], 1)
        return self.c3(torch.cat([s, z, r, p], 1))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_joined_slices_equal_dense_and_the_unjoined_cats(backend, monkeypatch):
    if backend == "cpu" and (K is None or not K.has_conv_rows()):
        pytest.skip("no C++ kernels here")
    torch.manual_seed(4)
    m = _SliceCats().eval()
    clip = make_video(8, n=2, h=16, w=24, noise=0.0, seed=5, size=5)
    new = _convert(m, clip[0], backend, True, monkeypatch, threshold=0.0)
    old = _convert(m, clip[0], backend, False, monkeypatch, threshold=0.0)
    # s and z read x and y whole; r (reversed halves) and p (a part of y) keep their slices
    assert _cats_of_slices(new) == 2 and _cats_of_slices(old) == 4
    for t in range(clip.shape[0]):
        if t == 4:
            new.reset(), old.reset()
        with torch.no_grad():
            a, b, want = new(clip[t]), old(clip[t]), m(clip[t])
        assert torch.equal(a, b), t
        assert rel_err(a, want) < 1e-5, t


def test_delta_decode_under_camera_motion_equals_the_densify_path(monkeypatch):
    """A camera panning by the deepest stride (32 px) over a small view: motion alignment recomputes the
    view (crop keyframes replace the decode's state for a moment); the output stays the old path's, bit for
    bit. (The view is too small for a delta step after a pan: the next test rewrites O directly.)"""
    from deltacnn.motion import MotionDeltaModel
    m = _model()
    g = torch.Generator().manual_seed(7)
    scene = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 20, generator=g), size=(96, 320), mode="bilinear",
                                            align_corners=False)
    frames = [scene[:, :, :64, 32 * (t // 2):32 * (t // 2) + 96].contiguous() for t in range(6)]
    seq = torch.tensor([[0.0, 0.0]] + [[32.0 if t % 2 == 0 else 0.0, 0.0] for t in range(1, 6)])
    new = MotionDeltaModel(_convert(m, frames[0], "cpu", True, monkeypatch, **_HELD), motion=seq)
    old = MotionDeltaModel(_convert(m, frames[0], "cpu", False, monkeypatch, **_HELD), motion=seq)
    for t, x in enumerate(frames):
        with torch.no_grad():
            a, b = new(x), old(x)
        assert torch.equal(a, b), (t, float((a - b).abs().max()))


@needs_kernels
def test_o_rewritten_or_replaced_outside_the_layer_is_decoded_again(monkeypatch):
    """Whoever edits or replaces an O map between frames (as motion alignment does) makes the next frame
    decode every anchor: the output equals the old path's with the same edit of its Densify map."""
    m = _model()
    clip = _clip(6)
    new = _convert(m, clip[0], "cpu", True, monkeypatch, **_HELD)
    old = _convert(m, clip[0], "cpu", False, monkeypatch, **_HELD)
    dec = next(x for x in new.graph_module.modules() if isinstance(x, Y.DeltaBoxDecode))
    dens = [x for x in old.graph_module.modules() if isinstance(x, Densify)]
    assert len(dens) == 3
    for t in range(clip.shape[0]):
        if t == 3:  # edit level 0's box bins in place, replace level 0's class map by an edited copy
            dens = sorted(dens, key=lambda d: -d._state("out").shape[2])
            dens[0]._state("out")[:, :4 * REG, :3, :4] = 0.25
            dens[0]._state("out")[:, 4 * REG:, 5:, 6:] = -1.0
            dec._state("out0")[:, :, :3, :4] = 0.25
            fresh = dec._state("out1").clone()
            fresh[:, :, 5:, 6:] = -1.0
            dec._buffers["state_out1"] = fresh
        with torch.no_grad():
            a, b = new(clip[t]), old(clip[t])
        assert torch.equal(a, b), (t, float((a - b).abs().max()))


triton_ok = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="triton not runnable here")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton_ok
@pytest.mark.parametrize("split", [False, True], ids=["one map", "box and class maps"])
@pytest.mark.parametrize("with_deltas", [False, True], ids=["decode", "accumulate and decode"])
def test_triton_decode_equals_decode_boxes(split, with_deltas, monkeypatch):
    """triton_kernels.yolo_decode_ (one launch per level) against decode_boxes' PyTorch code on the same maps,
    float32: a joined head map read as two channel ranges, or box and class maps; with this frame's deltas it
    first adds them into O at their masks (written back, as accumulate does)."""
    from deltacnn.backends import triton_kernels as tk
    monkeypatch.setattr(Y, "_decode_on_cpu_kernels", lambda *a: None)  # the PyTorch code, not the C++ one
    g = torch.Generator().manual_seed(3)
    dfl = torch.arange(REG, dtype=torch.float32, device=DEV)
    maps = [m.to(DEV) for m in _maps(2, g)]
    deltas, want_maps = None, maps
    if with_deltas:
        deltas, want_maps = [], []
        for m in maps:
            mask = (torch.rand(m.shape[0], 1, *m.shape[2:], generator=g) < 0.4).to(DEV)
            d = (2 * torch.randn(m.shape, generator=g)).to(DEV).contiguous(memory_format=torch.channels_last)
            want_maps.append(m + torch.where(mask, d, 0.0))
            deltas.append((d[:, :4 * REG], mask, d[:, 4 * REG:], mask) if split else (d, mask))
    want = Y.decode_boxes(want_maps, NC, dfl.view(1, REG, 1, 1))
    if split:
        boxes = [m[:, :4 * REG].contiguous(memory_format=torch.channels_last) for m in maps]
        classes = [m[:, 4 * REG:].contiguous(memory_format=torch.channels_last) for m in maps]
    else:
        boxes, classes = [m[:, :4 * REG] for m in maps], [m[:, 4 * REG:] for m in maps]
        if deltas is not None:
            deltas = [(d[:, :4 * REG], mk, d[:, 4 * REG:], mk) for d, mk in deltas]
    out = torch.full_like(want, float("nan"))
    tk.yolo_decode_(boxes, classes, dfl, NC, out, Y.STRIDES, deltas)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-4)
    if with_deltas:  # O now holds O + d
        for b, c, w in zip(boxes, classes, want_maps):
            assert torch.equal(torch.cat([b, c], 1), w)


class _Head(torch.nn.Module):
    """Three strided convs to stride-8/16/32 maps, YOLOv8's Detect head and its box decode."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = torch.nn.ModuleList(Y.Conv(3, c, 3, s) for c, s in ((16, 8), (32, 16), (32, 32)))
        self.det = Y.Detect(NC, (16, 32, 32))

    def forward(self, x):
        return Y.decode_boxes(self.det([lv(x) for lv in self.levels]), NC, self.det.dfl.conv.weight)


@triton_ok
def test_delta_decode_on_triton_decodes_in_its_kernel_and_equals_the_reference(monkeypatch):
    """DeltaBoxDecode on the Triton backend (interpreter): keyframes and delta frames go to yolo_decode_ (delta
    frames with their head deltas, no accumulate of their own), and the boxes follow the reference backend's."""
    from deltacnn.backends import triton_kernels as tk
    from deltacnn import models
    torch.manual_seed(5)
    m = models.randomize_bn_(_Head(), seed=2).eval().to(DEV)
    clip = make_video(4, n=1, h=64, w=96, noise=0.003, seed=4, size=14).clamp(0, 1).to(DEV)
    kw = dict(threshold=0.0, input_threshold=0.03, dense_above=None)
    ref = deltacnn.convert(m, clip[0], backend="reference", **kw)
    fast = deltacnn.convert(m, clip[0], backend="triton", **kw)
    calls = []
    real = tk.yolo_decode_
    monkeypatch.setattr(tk, "yolo_decode_", lambda *a: calls.append(a[6] is not None) or real(*a))
    decodes = [next(mod for mod in dm.modules() if isinstance(mod, Y.DeltaBoxDecode)) for dm in (ref, fast)]
    for t in range(clip.shape[0]):
        with torch.no_grad():
            a, b = ref(clip[t]), fast(clip[t])
        # (a frame's change of the output is ~1e-4 of it: a decode that dropped the deltas would pass 1e-4)
        assert rel_err(b, a) < 1e-6, t
        for i in range(6):  # O += d happened in the kernel: the head maps' states follow the reference's
            o_ref, o_fast = (dec._state(f"out{i}") for dec in decodes)
            assert rel_err(o_fast, o_ref) < 1e-6, (t, i)
    assert calls == [False] + [True] * (clip.shape[0] - 1)
