"""The Triton backend inside whole converted models, under TRITON_INTERPRET=1 on the CPU (GPU in tests/gpu)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("set TRITON_INTERPRET=1 (done by conftest) or run on a GPU", allow_module_level=True)

import deltacnn  # noqa: E402
from conftest import make_video  # noqa: E402
from deltacnn import models  # noqa: E402
from deltacnn.backends import triton_kernels as tk  # noqa: E402
from deltacnn.models.resnet import BasicBlock, Bottleneck  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# exact float32 convs on a GPU: cuDNN uses TF32 by default, which alone puts the float32 reference 1e-3 off
pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py


class Block(nn.Module):
    """conv+relu, strided conv, depthwise, residual add + activations, unfused add, maxpool."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 16, 1)
        self.d = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.e = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.pool(torch.relu(self.a(x)))
        z = torch.nn.functional.hardswish(self.c(torch.relu(self.b(y))))
        s = self.d(y)
        return self.e(torch.sigmoid(s + torch.nn.functional.max_pool2d(z, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.0, 0.03])
def test_triton_backend_matches_reference(dtype, tau):
    torch.manual_seed(0)
    m = Block().eval().to(DEV)
    clip = make_video(6, n=2, h=12, w=12, noise=0.01, seed=5).to(DEV)
    ref = deltacnn.convert(m, clip[0], threshold=tau, dtype=dtype, backend="reference", dense_above=None)
    fast = deltacnn.convert(m, clip[0], threshold=tau, dtype=dtype, backend="triton")
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    for t in range(clip.shape[0]):
        a, b = ref(clip[t]), fast(clip[t])
        err = float((a.float() - b.float()).norm() / a.float().norm())
        assert err < tol, f"frame {t}: {err:.2e}"


class ResidualNet(nn.Module):
    """Stem, a BasicBlock and a strided Bottleneck with a downsample path (torchvision layout): after
    conversion every block ends in a conv fused with the residual add and the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.basic = BasicBlock(8, 8)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.bottleneck = Bottleneck(8, 4, stride=2, downsample=down)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.bottleneck(self.basic(self.stem(x))))


def _states(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".state_" in k or k.startswith("state_")}


def test_triton_dense_epilogue_adds_conv_bias_and_runs_stateless_frames(monkeypatch):
    """On CUDA each conv leaves its bias to the fused dense pass (PyTorch adds it in a pass of its own
    there too). Forced here on the CPU: keyframes match the reference backend with the bias passed
    to every fused call, and a stateless dense frame runs the same pass without writing any state."""
    from deltacnn.backends.triton_backend import TritonBackend
    torch.manual_seed(0)
    m = models.randomize_bn_(ResidualNet().eval(), 3).to(DEV)
    clip = make_video(3, n=2, h=12, w=12, noise=0.01, seed=7).to(DEV)
    ref = deltacnn.convert(m, clip[0], backend="reference", dense_above=None)
    fast = deltacnn.convert(m, clip[0], backend="triton")
    monkeypatch.setattr(TritonBackend, "fuses_conv_bias", lambda self, x: True)
    calls = []
    real = tk.seed_act_state_

    def spy(y, r, a, e, act, bias=None):
        calls.append((a is not None, bias is not None))
        return real(y, r, a, e, act, bias)
    monkeypatch.setattr(tk, "seed_act_state_", spy)
    torch.testing.assert_close(fast(clip[0]), ref(clip[0]), rtol=1e-5, atol=1e-6)
    assert len(calls) == 6 and set(calls) == {(True, True)}, calls  # every conv + ReLU (BN folded: a bias)
    before = {k: v.clone() for k, v in _states(fast).items() if "input" not in k}
    calls.clear()
    with torch.no_grad():
        want = m(clip[1])
    torch.testing.assert_close(fast.dense_frame(clip[1]), want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 6 and set(calls) == {(False, True)}, calls
    after = _states(fast)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_fused_keyframe_seeding_in_residual_blocks(dtype, monkeypatch):
    """Keyframe: every conv + residual + ReLU seeds its state in one kernel, bit for bit what the
    reference backend's PyTorch path stores; the delta frames after it still match the reference."""
    torch.manual_seed(0)
    m = models.randomize_bn_(ResidualNet().eval(), 3).to(DEV)
    clip = make_video(4, n=2, h=12, w=12, noise=0.01, seed=7).to(DEV)
    ref = deltacnn.convert(m, clip[0], dtype=dtype, backend="reference", dense_above=None)
    fast = deltacnn.convert(m, clip[0], dtype=dtype, backend="triton")
    seeded = []
    real = tk.seed_act_state_
    monkeypatch.setattr(tk, "seed_act_state_", lambda y, r, *a: seeded.append(r is not None) or real(y, r, *a))
    a, b = ref(clip[0]), fast(clip[0])
    # stem, basic.conv1, bottleneck.conv1 and conv2 alone; basic.conv2 and bottleneck.conv3 with their residual
    assert seeded == [False, False, True, False, False, True], seeded
    assert torch.equal(a, b)
    sa, sb = _states(ref), _states(fast)
    assert sa.keys() == sb.keys() and len(sa) > 10
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    tol = {torch.float32: 1e-4, torch.float16: 3e-3}[dtype]
    for t in range(1, clip.shape[0]):
        a, b = ref(clip[t]), fast(clip[t])
        assert float((a.float() - b.float()).norm() / a.float().norm()) < tol, t


class RGBStem(nn.Module):
    """The ResNet stem (7x7 stride 2 on RGB), then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, 2, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_stem_reads_the_bordered_input(dtype, monkeypatch):
    """The input layer's bordered copy reaches the RGB stem, which reads window rows of it; over
    frames whose changes move, the outputs match the reference and the per-tap gathers."""
    from deltacnn.backends.triton_backend import TritonBackend
    torch.manual_seed(0)
    m = RGBStem().eval().to(DEV)
    clip = make_video(5, n=2, h=18, w=20, noise=0.01, seed=9).to(DEV)
    seen = []
    real = tk.sparse_conv2d

    def spy(x, *a, **kw):
        seen.append(kw.get("bordered") is not None and kw.get("window_weight") is not None)
        return real(x, *a, **kw)
    monkeypatch.setattr(tk, "sparse_conv2d", spy)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]
    ref = deltacnn.convert(m, clip[0], dtype=dtype, backend="reference", dense_above=None)
    outs = {}
    for bordered in (True, False):
        monkeypatch.setattr(TritonBackend, "bordered_input", bordered)
        seen.clear()
        fast = deltacnn.convert(m, clip[0], dtype=dtype, backend="triton")
        outs[bordered] = [fast(clip[t]) for t in range(clip.shape[0])]
        assert seen == [bordered, False] * (clip.shape[0] - 1), seen  # the stem only, on delta frames
    for t in range(clip.shape[0]):
        a = ref(clip[t]).float()
        for b in (outs[True][t].float(), outs[False][t].float()):
            assert float((a - b).norm() / a.norm()) < tol, t


@pytest.mark.parametrize("tau", [0.0, 0.03])
def test_triton_pool_reads_the_producers_running_sum(tau, monkeypatch):
    """A max pool after a fused conv + ReLU reads the conv's emitted state instead of accumulating its
    input into its own copy: no accumulation launch, and bit for bit the same outputs."""
    from deltacnn.backends.triton_backend import TritonBackend
    torch.manual_seed(0)
    m = Block().eval().to(DEV)
    clip = make_video(5, n=2, h=12, w=12, noise=0.01, seed=5).to(DEV)
    accumulated = []
    real = tk.accumulate_
    monkeypatch.setattr(tk, "accumulate_", lambda s, v, mk: accumulated.append(tuple(s.shape)) or real(s, v, mk))
    outs = {}
    for reads in (True, False):
        monkeypatch.setattr(TritonBackend, "pool_reads_running_sum", reads)
        accumulated.clear()
        fast = deltacnn.convert(m, clip[0], threshold=tau, dtype=torch.float16, backend="triton")
        outs[reads] = [fast(clip[t]) for t in range(clip.shape[0])]
        pooled = [s for s in accumulated if s[1:] == (8, 12, 12)]  # the first pool's input: conv `a`'s output
        assert len(pooled) == (0 if reads else clip.shape[0] - 1), accumulated
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b)


class CatBlock(nn.Module):
    """A C2f-like block: chunk, a conv on one part, cat of the parts (three inputs, mixed producers)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y0, y1 = torch.nn.functional.silu(self.a(x)).chunk(2, 1)
        z = torch.nn.functional.silu(self.b(y1))
        return self.c(torch.cat([y0, y1, z], 1))


def test_triton_cat_matches_reference(monkeypatch):
    """The delta cat runs sparse_cat (counted) and matches the reference backend at tau > 0."""
    calls = []
    monkeypatch.setattr(tk, "sparse_cat", lambda *a, _f=tk.sparse_cat, **k: calls.append(1) or _f(*a, **k))
    torch.manual_seed(1)
    m = CatBlock().eval().to(DEV)
    clip = make_video(3, n=2, h=8, w=10, noise=0.01, seed=7).to(DEV)
    ref = deltacnn.convert(m, clip[0], threshold=0.02, backend="reference", dense_above=None)
    fast = deltacnn.convert(m, clip[0], threshold=0.02, backend="triton")
    for t in range(clip.shape[0]):
        a, b = ref(clip[t]), fast(clip[t])
        assert float((a - b).norm() / a.norm()) < 1e-4, t
    assert len(calls) == clip.shape[0] - 1  # one per delta frame


@pytest.mark.parametrize("refresh_held", [None, 0.5])
def test_small_blob_gate_runs_in_the_input_kernels_and_equals_the_reference(refresh_held, monkeypatch):
    """The input layer with min_blob 3 on the Triton backend: its own kernels (tk.sparsify's open_k) send the same
    pixels and values as the reference backend's gate (max-pool opening, then sparsify) over a few frames of
    moving blobs and isolated noise; with the refresh rule on (it reads the held-back fraction) the generic path
    runs, with the same result."""
    from deltacnn.layers.io import Sparsify
    from deltacnn.runtime import Runtime
    from deltacnn.thresholds import Thresholds
    gen = torch.Generator().manual_seed(71)
    n, c, h, w = 2, 3, 21, 30
    clip = [torch.rand(n, c, h, w, generator=gen)]
    for t in range(4):
        x = clip[-1].clone()
        x += 0.5 * torch.randn(n, c, h, w, generator=gen) * (torch.rand(n, 1, h, w, generator=gen) < 0.06)
        x[:, :, 2 + 3 * t:8 + 3 * t, 4 * t:4 * t + 7] += 0.6
        x[:, :, 15:18, 20 + t:23 + t] += 0.6  # 3x3 and 4x4 blobs: kept by min_blob 3, not by 5
        x[:, :, 2:6, 22:26] += 0.6 * (t % 2)
        clip.append(x)
    runs = {}
    for be in ("reference", "triton"):
        rt = Runtime(Thresholds(input=0.2), backend_name=be, refresh_held=refresh_held)
        layer = Sparsify(min_blob=3)
        layer.set_runtime(rt)
        backend = rt.backend_on(torch.device(DEV))
        fused = []
        if be == "triton":
            blobs = backend.sparsify_blobs
            monkeypatch.setattr(backend, "sparsify_blobs", lambda *a, **kw: fused.append(blobs(*a, **kw)) or fused[-1])
        outs = []
        for t, x in enumerate(clip):
            rt.keyframe = t == 0
            d = layer(x.to(DEV))
            outs.append((d.mask.clone(), d.zero_filled().float().cpu(), layer._state("ref").float().cpu().clone()))
        runs[be] = outs
        if be == "triton":  # delta frames went to the input kernels unless the held fraction is wanted
            assert len(fused) == len(clip) - 1 and all((f is None) == (refresh_held is not None) for f in fused)
    for t, ((m1, v1, r1), (m2, v2, r2)) in enumerate(zip(runs["reference"], runs["triton"])):
        assert torch.equal(m1.cpu(), m2.cpu()), f"frame {t}"
        if t:
            assert 0 < int(m1.sum()) < m1.numel()
        torch.testing.assert_close(v2, v1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r2, r1, rtol=1e-6, atol=1e-6)


class UpsampleNet(nn.Module):
    """A strided conv, a nearest x2 upsampling (YOLOv8's neck) cat with the full-resolution branch, a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.cat([self.up(torch.relu(self.b(y))), y], 1))


@pytest.mark.parametrize("min_blob", [1, 3])
def test_upsample_and_small_blob_gate_kernels_in_a_model_equal_the_reference(min_blob, monkeypatch):
    """A converted model with a nearest upsampling and the small-blob input gate on the Triton backend: its own
    upsampling kernel runs on every delta frame, and the outputs follow the reference backend's."""
    torch.manual_seed(3)
    m = UpsampleNet().eval().to(DEV)
    clip = make_video(6, n=2, h=16, w=16, noise=0.02, seed=9).to(DEV)
    kw = dict(threshold=0.02, dtype=torch.float32, dense_above=None, min_blob=min_blob)
    ref = deltacnn.convert(m, clip[0], backend="reference", **kw)
    fast = deltacnn.convert(m, clip[0], backend="triton", **kw)
    calls = []
    up = tk.upsample_nearest
    monkeypatch.setattr(tk, "upsample_nearest", lambda *a, **k: calls.append(a[2]) or up(*a, **k))
    for t in range(clip.shape[0]):
        a, b = ref(clip[t]), fast(clip[t])
        err = float((a.float() - b.float()).norm() / a.float().norm())
        assert err < 1e-4, f"frame {t}: {err:.2e}"
    assert calls == [(2, 2)] * (clip.shape[0] - 1)


@pytest.mark.parametrize("shortcut", [False, True])
def test_c2f_halves_are_read_in_place_and_equal_the_reference(shortcut, monkeypatch):
    """YOLOv8's C2f on the Triton backend: the channel half its bottleneck reads is a view of cv1's output
    (channel_slice), read in place by the bottleneck's first conv and by the shortcut add; outputs follow the
    reference backend's over delta frames at tau > 0."""
    from deltacnn.models import yolov8 as y8
    from deltacnn.backends.triton_kernels import pointwise
    torch.manual_seed(4)
    m = models.randomize_bn_(nn.Sequential(y8.Conv(3, 16, 3, 2), y8.C2f(16, 16, 1, shortcut)), 2).eval().to(DEV)
    clip = make_video(5, n=1, h=16, w=24, noise=0.01, seed=3).to(DEV)
    kw = dict(threshold=0.01, dtype=torch.float32, dense_above=None)
    ref = deltacnn.convert(m, clip[0], backend="reference", **kw)
    fast = deltacnn.convert(m, clip[0], backend="triton", **kw)
    strided = []  # (op, whether its first input was a whole channels_last map)

    def spy(op: str, fn):
        return lambda x, *a, **k: strided.append((op, tk._common.is_cl(x))) or fn(x, *a, **k)
    monkeypatch.setattr(tk, "sparse_conv2d", spy("conv", tk.sparse_conv2d))
    monkeypatch.setattr(tk, "sparse_add", spy("add", pointwise.sparse_add))
    for t in range(clip.shape[0]):
        a, b = ref(clip[t]), fast(clip[t])
        err = float((a.float() - b.float()).norm() / a.float().norm())
        assert err < 1e-4, f"frame {t}: {err:.2e}"
    views = {k for k, is_cl in strided if not is_cl}
    assert views == ({"conv", "add"} if shortcut else {"conv"}), strided
