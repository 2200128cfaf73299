"""The tuner's cache of dense reference outputs: a second tune of the same model, weights, clip, frames
and input size reads them instead of running the dense model; any of those changed recomputes."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from deltacnn import reference_cache
from deltacnn.commands.tune import _frames


class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


class TinyTask:
    """Resizes to `size`, returns a dict of numpy arrays (as the detection tasks do)."""

    name = "tiny"

    def __init__(self, size: int = 16, conf: float = 0.5) -> None:
        self.size, self.conf = size, conf

    def preprocess(self, frame):
        f = cv2.resize(frame, (self.size, self.size))
        return torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255

    def postprocess(self, out):
        y = out.detach().numpy()[0]
        return {"mean": y.mean((1, 2)).astype(np.float32), "hot": (y > self.conf).sum().astype(np.int64),
                "mask": y[0] > 0, "pair": (np.arange(3, dtype=np.int16), 1.5)}


@pytest.fixture()
def clip(tmp_path, monkeypatch):
    monkeypatch.setenv(reference_cache.CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "clip"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    return folder


def _same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    else:
        assert a == b


def test_second_call_reads_the_cache_with_identical_outputs(clip) -> None:
    net, task, dev = CountingNet(), TinyTask(), torch.device("cpu")
    frames, refs = _frames(str(clip), 1, 4, task, net, dev, "calibration")
    assert net.calls == 4 and len(frames) == 4 and len(list((reference_cache.cache_dir()).glob("*.pt"))) == 1
    frames2, refs2 = _frames(str(clip), 1, 4, task, net, dev, "calibration")
    assert net.calls == 4, "the dense model ran although its outputs were cached"
    assert all(np.array_equal(a, b) for a, b in zip(frames, frames2))
    _same(refs, refs2)
    # cache=False always computes
    _frames(str(clip), 1, 4, task, net, dev, "calibration", cache=False)
    assert net.calls == 8


@pytest.mark.parametrize("change", ["weights", "frames", "start", "input size", "task setting", "clip", "reader"])
def test_anything_the_reference_depends_on_invalidates_it(clip, change) -> None:
    net, task, dev = CountingNet(), TinyTask(), torch.device("cpu")
    _frames(str(clip), 0, 4, task, net, dev, "calibration")
    start, count, reader = 0, 4, "auto"
    if change == "weights":
        with torch.no_grad():
            net.conv.weight[0, 0, 0, 0] += 1e-3
    elif change == "frames":
        count = 5
    elif change == "start":
        start = 1
    elif change == "input size":
        task = TinyTask(size=8)
    elif change == "task setting":
        task = TinyTask(conf=0.25)
    elif change == "clip":
        f = clip / "002.png"
        cv2.imwrite(str(f), np.zeros((24, 32, 3), np.uint8))
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    else:
        reader = "opencv"
    calls = net.calls
    _, refs = _frames(str(clip), start, count, task, net, dev, "calibration", reader=reader)
    assert net.calls == calls + len(refs), f"a changed {change} read a stale cached reference"
    _, fresh = _frames(str(clip), start, count, task, net, dev, "calibration", reader=reader, cache=False)
    _same(refs, fresh)


def test_a_changed_library_source_changes_the_key(clip, monkeypatch) -> None:
    """A task's outputs depend on deltacnn code outside its class's file (NMS, decodes, kernels)."""
    net = CountingNet()
    args = (TinyTask(), net, str(clip), 0, 4, (1, 3, 8, 8), "cpu", "auto")
    key = reference_cache.reference_key(*args)
    assert reference_cache.reference_key(*args) == key
    monkeypatch.setattr(reference_cache, "_library_hash", lambda: "another library")
    assert reference_cache.reference_key(*args) != key


def test_live_sources_and_unstorable_results_are_not_cached(clip, tmp_path) -> None:
    net = CountingNet()
    assert reference_cache.reference_key(TinyTask(), net, 0, 0, 4, (1, 3, 8, 8), "cpu", "auto") is None
    assert reference_cache.reference_key(TinyTask(), net, "rtsp://127.0.0.1/x", 0, 4, (1, 3, 8, 8), "cpu",
                                         "auto") is None
    key = reference_cache.reference_key(TinyTask(), net, str(clip), 0, 4, (1, 3, 8, 8), "cpu", "auto")
    assert key is not None and reference_cache.store(key, [{"boxes": np.array([object()])}]) is None
    assert reference_cache.load(key, 1) is None


def test_a_corrupt_or_short_file_is_recomputed(clip) -> None:
    net, task, dev = CountingNet(), TinyTask(), torch.device("cpu")
    _frames(str(clip), 0, 3, task, net, dev, "calibration")
    (path,) = reference_cache.cache_dir().glob("*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        _, refs = _frames(str(clip), 0, 3, task, net, dev, "calibration")
    assert net.calls == 6 and len(refs) == 3
    key = path.stem
    assert reference_cache.load(key, 3) is not None and reference_cache.load(key, 4) is None


def test_file_fingerprint_follows_size_and_mtime(tmp_path) -> None:
    f = tmp_path / "v.bin"
    f.write_bytes(b"abc")
    a = reference_cache.source_fingerprint(f)
    f.write_bytes(b"abcd")
    b = reference_cache.source_fingerprint(f)
    assert a["path"] == b["path"] and a != b
    assert reference_cache.source_fingerprint(tmp_path / "missing.avi") is None
