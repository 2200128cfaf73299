"""Shared test material: synthetic static-camera clips and a dense-vs-delta runner."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_reference_cache(tmp_path_factory):
    """`deltacnn tune` caches dense references (deltacnn.reference_cache): tests use a fresh directory,
    so they neither fill the user's cache nor read what an earlier run left there."""
    old = os.environ.get("DELTACNN_CACHE_DIR")
    os.environ["DELTACNN_CACHE_DIR"] = str(tmp_path_factory.mktemp("deltacnn_cache"))
    yield
    if old is None:
        os.environ.pop("DELTACNN_CACHE_DIR", None)
    else:
        os.environ["DELTACNN_CACHE_DIR"] = old


def make_video(frames: int, n: int = 1, h: int = 32, w: int = 32, c: int = 3, seed: int = 0,
               noise: float = 0.01, objects: int = 2, size: int = 6) -> torch.Tensor:
    """(T, N, C, H, W): a smooth textured static background, textured squares moving at
    different speeds per stream, and a little sensor noise on every pixel."""
    g = torch.Generator().manual_seed(seed)
    bg = F.interpolate(torch.randn(n, c, h // 4 + 2, w // 4 + 2, generator=g), size=(h, w), mode="bilinear",
                       align_corners=False) + 0.2 * torch.randn(n, c, h, w, generator=g)
    tex = torch.randn(n, objects, c, size, size, generator=g)
    speed = torch.randint(1, 3, (n, objects, 2), generator=g)
    start = torch.randint(0, max(1, min(h, w) - size), (n, objects, 2), generator=g)
    out = []
    for t in range(frames):
        f = bg.clone()
        for i in range(n):
            for k in range(objects):
                y = int(start[i, k, 0] + speed[i, k, 0] * t) % (h - size)
                x = int(start[i, k, 1] + speed[i, k, 1] * t) % (w - size)
                f[i, :, y:y + size, x:x + size] = tex[i, k]
        out.append(f + noise * torch.randn(n, c, h, w, generator=g))
    return torch.stack(out)


# tiny but structurally complete versions of the repo's zoo: every block kind and every stride is still
# there (the full-size ones are exercised by benchmarks)
ZOO_SMALL = {
    "resnet18": dict(width=8, num_classes=10),
    "resnet50": dict(width=4, num_classes=10),
    "mobilenet_v2": dict(width_mult=0.25, num_classes=10),
    "mobilenet_v3_large": dict(width_mult=0.25, num_classes=10),
    "mobilenet_v3_small": dict(width_mult=0.25, num_classes=10),
    "unet": dict(base=4, depth=3, num_classes=2),
    "unet_transposed": dict(base=4, depth=3, num_classes=2, bilinear=False),
    "hrnet_like": dict(widths=(4, 8, 16), num_classes=5),
}


def small_zoo_model(name: str) -> torch.nn.Module:
    """The ZOO_SMALL model `name`, seeded, with random batch-norm statistics so that folding them is exercised."""
    from deltacnn import models
    torch.manual_seed(0)
    m = models.build("unet" if name == "unet_transposed" else name, **ZOO_SMALL[name]).eval()
    return models.randomize_bn_(m, seed=1)


class StatefulNet(torch.nn.Module):
    """conv + BN + ReLU, a strided conv, a residual add, a 1x1 head and (pool) a max pool before it: every kind of
    state a stream holds, in a net small enough for the interpreter."""

    def __init__(self, pool: bool = False) -> None:
        super().__init__()
        nn = torch.nn
        self.pool = pool
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.c2(y))
        y = torch.relu(self.c3(y) + y)
        return self.head(torch.nn.functional.max_pool2d(y, 3, 1, 1) if self.pool else y)


def assert_cpu_equals_reference_and_dense(outs: dict, net: torch.nn.Module, frames: torch.Tensor, steps: int,
                                          batch: int) -> None:
    """outs["cpu"][t] and outs["reference"][t] (the outputs of frames[batch * t: batch * (t + 1)] through the two
    backends' delta models) agree with each other and with the dense net."""
    with torch.no_grad():
        for t in range(steps):
            dense = net(frames[batch * t:batch * (t + 1)])
            torch.testing.assert_close(outs["cpu"][t], outs["reference"][t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs["cpu"][t], dense, rtol=1e-4, atol=1e-4)


@pytest.fixture
def no_tf32():
    """float32 matmuls and convs without TF32 for the test (GPU tests compare against float32 references)."""
    a, b = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = a, b


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def run_both(model, delta_model, clip: torch.Tensor, dense_dtype=torch.float32):
    """Yield (t, delta_out, dense_out) frame by frame."""
    model = model.to(dense_dtype)
    for t in range(clip.shape[0]):
        x = clip[t]
        with torch.no_grad():
            dense = model(x.to(dense_dtype))
        yield t, delta_model(x), dense


@pytest.fixture
def video():
    return make_video


@pytest.fixture(params=["avx2", "avx512"])
def cpu_isa(request):
    """Runs the test once per vector ISA of the CPU kernels' micro-kernels (cpu_kernels.cpp set_cpu_isa), so
    that an AVX-512 machine tests the AVX2 path too; skipped where the kernels do not build or the CPU lacks
    the ISA. The ISA in use before the test is restored after it."""
    from deltacnn.backends.cpu_kernels import load
    k = load()
    if k is None:
        pytest.skip("CPU kernels do not build here")
    try:
        old = k.set_cpu_isa(request.param)
    except RuntimeError as e:
        pytest.skip(str(e))
    assert k.cpu_isa() == request.param
    yield request.param
    k.set_cpu_isa(old)


def random_delta(n: int, c: int, h: int, w: int, rate: float, gen: torch.Generator):
    """A random delta with an ext matrix (as produced by the backends) at about `rate` of the pixels."""
    from deltacnn.backends.reference import _scatter_rows
    mask = torch.rand(n, 1, h, w, generator=gen) < rate
    idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
    vals = torch.randn(idx.numel(), c, generator=gen)
    return _scatter_rows(n, c, h, w, idx, vals, vals)


def cl_state(values: torch.Tensor) -> torch.Tensor:
    """A float32 channels_last state tensor holding `values` (as the layers keep A and E)."""
    return values.float().contiguous(memory_format=torch.channels_last)


def check_dense_conv_with_state(backend, x, p, bias, ref, residual, acts) -> None:
    """backend.dense_conv of x against ref (the dense PyTorch conv), with and without `residual`, for each
    activation in `acts` (None: linear): the output, and for an activation the keyframe state it writes
    (A = the pre-activation, E = the output), into buffers first filled with NaN."""
    for act in acts:
        for res in (None, residual):
            v = ref + res if res is not None else ref
            bufs = {}

            def state(shape):
                bufs["acc"] = torch.full(shape, float("nan")).contiguous(memory_format=torch.channels_last)
                bufs["em"] = torch.full(shape, float("nan")).contiguous(memory_format=torch.channels_last)
                return bufs["acc"], bufs["em"]
            out = backend.dense_conv(x, p, bias, res, act, state if act is not None else None)
            assert out is not None and out.is_contiguous(memory_format=torch.channels_last)
            want = act(v) if act is not None else v
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
            if act is not None:
                torch.testing.assert_close(bufs["acc"], v, rtol=1e-5, atol=1e-5)
                assert torch.equal(bufs["em"], out)
