"""Keyframes on the cpu backend: channel slices read in place, shared all-true masks, the input's
reference as the keyframe's values; the cached state they leave must be what the reference backend
caches (tau 0: every later frame equals dense)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.backends.cpu_kernels import load, load_error
from deltacnn.layers.linear import DeltaSlice
from deltacnn.models.yolov8 import SPPF, C2f, Conv
from deltacnn.tensor import DeltaTensor, all_true_mask, channel_view

from conftest import assert_cpu_equals_reference_and_dense

if load() is None:
    pytest.skip(f"CPU kernels do not build here: {load_error()}", allow_module_level=True)


class _C2fChunk(C2f):
    """YOLOv8's C2f with its split written as chunk (Ultralytics' own form): two DeltaSlices whatever
    the converter makes of y[:, :c]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class _Net(nn.Module):
    """A small YOLOv8 backbone and neck: C2f halves of 8 channels (copied for conv_dense's runs) and of
    32 (read in place), shortcut adds, SPPF's pools and concat, an upsampled concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)
        self.c2f1 = _C2fChunk(16, 16, 1, True)
        self.down = Conv(16, 64, 3, 2)
        self.c2f2 = _C2fChunk(64, 64, 2, True)
        self.sppf = SPPF(64, 64)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.head = nn.Conv2d(64 + 16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c2f1(self.stem(x))
        b = self.sppf(self.c2f2(self.down(a)))
        return self.head(torch.cat([self.up(b), a], 1))


def _net() -> _Net:
    torch.manual_seed(3)
    net = _Net()
    for m in net.modules():  # BN statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def _frames(n: int, t: int) -> torch.Tensor:
    """t frames of n streams (t*n, 3, 48, 64): random noise with moving patches of fresh noise."""
    g = torch.Generator().manual_seed(5)
    frames = torch.rand(n, 3, 48, 64, generator=g).repeat(t, 1, 1, 1)
    for k in range(1, t):
        frames[k * n:, :, 4 + 3 * k:16 + 3 * k, 6 + 4 * k:20 + 4 * k] = torch.rand(3, 12, 14, generator=g)
    return frames


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("interval", [1, 3])
def test_keyframes_equal_reference_and_dense(interval: int) -> None:
    """Keyframes every `interval` frames (state buffers reused, seeded from slice views), deltas in
    between at tau 0: the cpu backend equals the reference backend and dense PyTorch on every frame."""
    net = _net()
    frames = _frames(1, 7)
    outs = {}
    for be in ("cpu", "reference"):
        dm = deltacnn.convert(net, frames[:1], threshold=0.0, backend=be, keyframe_interval=interval,
                              dense_above=None)
        views = []
        for m in dm.modules():
            if isinstance(m, DeltaSlice):
                m.register_forward_hook(lambda mod, a, out: views.append(
                    out.dense and not out.values.is_contiguous(memory_format=torch.channels_last)))
        with torch.no_grad():
            outs[be] = [dm(frames[t:t + 1]) for t in range(len(frames))]
            modes = dm.last_mode
        assert modes in ("keyframe", "delta")
        if be == "cpu":  # the 32-channel halves were read in place on keyframes
            assert any(views), "no keyframe channel slice stayed a view"
        else:
            assert not any(views)
    with torch.no_grad():
        for t in range(len(frames)):
            dense = net(frames[t:t + 1])
            torch.testing.assert_close(outs["cpu"][t], outs["reference"][t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs["cpu"][t], dense, rtol=1e-4, atol=1e-4)


def test_keyframe_state_equals_reference() -> None:
    """The state a keyframe caches (every layer's buffers) is the reference backend's."""
    net = _net()
    x = _frames(1, 1)
    states = {}
    for be in ("cpu", "reference"):
        dm = deltacnn.convert(net, x, threshold=0.0, backend=be)
        with torch.no_grad():
            dm(x)
        states[be] = {k: v for k, v in dm.named_buffers() if ".state_" in "." + k or k.startswith("state_")}
    assert states["cpu"].keys() == states["reference"].keys() and len(states["cpu"]) > 10
    for k, v in states["cpu"].items():
        torch.testing.assert_close(v, states["reference"][k], rtol=1e-5, atol=1e-5, msg=k)


def test_streams_keyframe_and_stateless_dense_frame_equal_reference() -> None:
    """A keyframe of one stream of a batch (its own pass, state rows) and a stateless dense frame take
    the copying paths; both still equal the reference backend, and the deltas after them equal dense."""
    net = _net()
    frames = _frames(2, 5)
    outs = {}
    for be in ("cpu", "reference"):
        dm = deltacnn.convert(net, frames[:2], threshold=0.0, backend=be, dense_above=None)
        res = []
        with torch.no_grad():
            for t in range(5):
                x = frames[2 * t:2 * t + 2]
                if t == 2:
                    res.append(dm.dense_frame(x))
                    continue
                if t == 4:
                    dm._since[1] = 0  # stream 1 is due for a keyframe: a pass of its own
                res.append(dm(x))
        outs[be] = res
    assert_cpu_equals_reference_and_dense(outs, net, frames, steps=5, batch=2)


def test_shared_keyframe_masks_stay_all_true_and_input_mask_is_own() -> None:
    """The all-true masks are shared per shape on the CPU; the model hands users a copy of the input's
    (so writing into it cannot corrupt later keyframes)."""
    net = _net()
    x = _frames(1, 1)
    dm = deltacnn.convert(net, x, threshold=0.0, backend="cpu")
    with torch.no_grad():
        dm(x)
    shared = all_true_mask(1, 48, 64, torch.device("cpu"))
    assert shared is all_true_mask(1, 48, 64, torch.device("cpu"))
    assert dm.input_mask is not shared and bool(dm.input_mask.all())
    dm.input_mask.zero_()
    assert bool(shared.all())
    with torch.no_grad():
        dm.reset()
        y = dm(x)
    torch.testing.assert_close(y, net(x), rtol=1e-4, atol=1e-4)


def test_channel_view_and_keyframe_layout() -> None:
    """channel_view: channel slices of channels_last maps, not other strided tensors; keyframe keeps
    channels_last maps and channel views as they are and copies anything else."""
    cl = torch.randn(2, 12, 5, 7).contiguous(memory_format=torch.channels_last)
    v = cl[:, 4:9]
    assert channel_view(v) and channel_view(cl)
    assert not channel_view(torch.randn(2, 12, 5, 7))  # NCHW
    assert not channel_view(cl[:, :, ::2])  # every other row
    assert not channel_view(cl[:, :, :, 1:])  # a column window: rows no longer follow each other
    assert DeltaTensor.keyframe(v).values is v
    assert DeltaTensor.keyframe(cl).values is cl
    nchw = torch.randn(2, 12, 5, 7)
    k = DeltaTensor.keyframe(nchw)
    assert k.values.is_contiguous(memory_format=torch.channels_last) and torch.equal(k.values, nchw)
    assert k.mask.shape == (2, 1, 5, 7) and bool(k.mask.all())
