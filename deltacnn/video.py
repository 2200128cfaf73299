"""Video input/output for the command-line tools, on OpenCV (`opencv-python-headless`) and PyAV.

Sources (`open_source`): video files, image folders, cameras (`0`, `1`, ...) and network streams
(`rtsp://`, `http://`, `https://`, ...). Frames are RGB uint8 numpy arrays of shape (H, W, 3)
everywhere in deltacnn; OpenCV's BGR order stays inside this module. Problems a user can cause
(missing, empty, corrupt or frameless files, empty folders, absent cameras, unreachable streams)
raise `VideoError` with a one-line message, so the CLI can report them without a traceback.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

# OpenCV and its FFmpeg print decoder chatter ("moov atom not found") to stderr for bad files;
# we report those ourselves in one line. Set before cv2 is first imported; users may override.
os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

# (fourcc, extension) tried in order: MPEG-4 part 2 in .mp4 plays almost everywhere and is in
# every opencv-python wheel; Motion-JPEG .avi is the fallback that needs no external encoder.
CODECS: tuple[tuple[str, str], ...] = (("mp4v", ".mp4"), ("MJPG", ".avi"))


class VideoError(ValueError):
    """The video cannot be read or written (a user-facing problem, reported in one line)."""


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise VideoError(f"video support needs OpenCV: pip install opencv-python-headless ({e})") from None
    return cv2


class FrameSource:
    """Frames of a video file, an image folder, a camera or a network stream, as RGB uint8 arrays.

    Opening validates the source and decodes its first frame, so a problem (missing file, empty
    folder, absent camera, unreachable stream) fails at the start of a run, before a model is
    loaded. `live` sources (cameras, streams) have no frame count: they end when the stream does
    or when the run is stopped. Subclasses provide `_read` (the next RGB frame, or None at the end)
    and `_release`.
    """

    kind = "source"
    live = False

    def __init__(self, label: str, max_frames: int | None) -> None:
        if max_frames is not None and max_frames < 1:
            raise VideoError(f"--max-frames must be >= 1, got {max_frames}")
        self.label = label  # what the user gave: path, camera index or URL
        self.max_frames = max_frames
        self.fps = 25.0
        self.frame_count: int | None = None  # the container's claim (may be off); None when unknown
        self.height = self.width = 0
        self._first: np.ndarray | None = None
        self._open = True

    def _start(self) -> None:
        """Read the first frame (fixes the size); call at the end of a subclass's __init__."""
        try:
            first = self._read()
        except VideoError:
            self.close()
            raise
        if first is None:
            self.close()
            raise VideoError(f"{self.kind} has no decodable frames: {self.label}")
        self._first = first
        self.height, self.width = first.shape[:2]

    @property
    def name(self) -> str:
        """A short name for output folders: the file's stem, 'camera0', the stream's last path part."""
        return Path(self.label).stem or self.kind

    @property
    def path(self) -> Path:
        return Path(self.label)

    @property
    def expected_frames(self) -> int | None:
        """Frames the iteration will probably yield (for progress bars); None if unknown (live)."""
        if self.frame_count is None:
            return self.max_frames
        return min(self.frame_count, self.max_frames) if self.max_frames else self.frame_count

    def _read(self) -> np.ndarray | None:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def __iter__(self) -> Iterator[np.ndarray]:
        if not self._open:
            raise VideoError(f"the reader of {self.label} was already consumed; open it again")
        n = 0
        try:
            frame, self._first = self._first, None
            while frame is not None and (self.max_frames is None or n < self.max_frames):
                yield frame
                n += 1
                frame = self._read()
        finally:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._release()

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plausible_fps(fps: float) -> float:
    return fps if 0.5 <= fps <= 1000 else 25.0  # some containers and streams report 0 or nonsense


class _OpenCVSource(FrameSource):
    """A cv2.VideoCapture (files, cameras, FFmpeg network streams)."""

    def _attach(self, cap) -> None:
        cv2 = _cv2()
        self._cap = cap
        self.fps = _plausible_fps(float(cap.get(cv2.CAP_PROP_FPS) or 0.0))
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0
        # streams report 0 or a huge negative number; files their (approximate) frame count
        self.frame_count = int(count) if 0 < count < 1e9 and not self.live else None

    def _read(self) -> np.ndarray | None:
        ok, frame = self._cap.read()
        if not ok or frame is None:
            return None  # end of stream (or a corrupt tail: keep what decoded)
        return _cv2().cvtColor(frame, _cv2().COLOR_BGR2RGB)

    def _release(self) -> None:
        cap = getattr(self, "_cap", None)
        if cap is not None:
            cap.release()
            self._cap = None


class VideoReader(_OpenCVSource):
    """A video file's frames (OpenCV)."""

    kind = "video"

    def __init__(self, path: str | Path, max_frames: int | None = None) -> None:
        super().__init__(str(path), max_frames)
        p = Path(path)
        if not p.exists():
            raise VideoError(f"video not found: {p}")
        if not p.is_file():
            raise VideoError(f"not a video file: {p} (is a directory)")
        if p.stat().st_size == 0:
            raise VideoError(f"video file is empty (0 bytes): {p}")
        cap = _cv2().VideoCapture(str(p))
        if not cap.isOpened():
            raise VideoError(f"cannot decode video: {p} (corrupt, truncated or not a video file)")
        self._attach(cap)
        self._start()


class CameraSource(_OpenCVSource):
    """A local camera by index (`0` is the first), through OpenCV; live."""

    kind = "camera"
    live = True

    def __init__(self, index: int, max_frames: int | None = None) -> None:
        super().__init__(str(index), max_frames)
        self.index = index
        cap = _cv2().VideoCapture(index)
        if not cap.isOpened():
            cap.release()
            raise VideoError(f"camera {index} not found or busy (no /dev/video{index}, or another program holds "
                             "it); give a video file, an image folder or a stream URL instead")
        self._attach(cap)
        self._start()

    @property
    def name(self) -> str:
        return f"camera{self.index}"


class _StreamMixin:
    label: str
    live: bool

    @property
    def name(self) -> str:
        if not self.live:
            return Path(self.label).stem
        tail = self.label.split("://", 1)[-1].split("?", 1)[0].rstrip("/")
        stem = Path(tail).stem if "/" in tail else ""
        host = tail.split("/", 1)[0].replace(":", "_")
        return re.sub(r"[^\w.-]+", "_", stem or host) or "stream"


class OpenCVStream(_StreamMixin, _OpenCVSource):
    """A network stream (rtsp://, http(s)://, ...) through OpenCV's FFmpeg backend; live."""

    kind = "stream"
    live = True

    def __init__(self, url: str, max_frames: int | None = None, timeout_s: float = 10.0) -> None:
        super().__init__(url, max_frames)
        cv2 = _cv2()
        ms = int(timeout_s * 1000)
        cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms,
                                                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        if not cap.isOpened():
            cap.release()
            raise VideoError(f"cannot open stream {url}: unreachable, refused, timed out ({timeout_s:g} s) or not "
                             "a video stream")
        self._attach(cap)
        self._start()


class PyAVSource(_StreamMixin, FrameSource):
    """A network stream or a video file through PyAV (FFmpeg): precise open errors, open/read timeouts."""

    def __init__(self, url: str, max_frames: int | None = None, timeout_s: float = 10.0, live: bool = True) -> None:
        super().__init__(url, max_frames)
        self.live = live
        self.kind = "stream" if live else "video"
        av = _av()
        try:
            self._container = av.open(url, timeout=(timeout_s, timeout_s))
        except Exception as e:  # noqa: BLE001 - av.error.* (refused, not found, timed out, invalid data)
            raise VideoError(f"cannot open {self.kind} {url}: {_av_reason(e)}") from None
        if not self._container.streams.video:
            self.close()
            raise VideoError(f"{self.kind} {url} has no video")
        vs = self._container.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate
        self.fps = _plausible_fps(float(rate) if rate else 0.0)
        self.frame_count = int(vs.frames) if vs.frames and not live else None
        self._frames = self._container.decode(vs)
        self._start()

    def _read(self) -> np.ndarray | None:
        try:
            return next(self._frames).to_ndarray(format="rgb24")
        except StopIteration:
            return None
        except Exception as e:  # noqa: BLE001 - a live stream ends by dropping the connection
            if self._first is None and self.height == 0:  # nothing decoded yet: a real error
                raise VideoError(f"cannot read stream {self.label}: {_av_reason(e)}") from None
            return None

    def _release(self) -> None:
        c = getattr(self, "_container", None)
        if c is not None:
            c.close()
            self._container = None


class ImageFolder(FrameSource):
    """The .jpg/.jpeg/.png images of a folder, in natural name order (frame2 before frame10)."""

    kind = "image folder"
    EXTENSIONS = (".jpg", ".jpeg", ".png")

    def __init__(self, folder: str | Path, max_frames: int | None = None, fps: float = 25.0) -> None:
        super().__init__(str(folder), max_frames)
        self.folder = Path(folder)
        self.files = sorted((p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in self.EXTENSIONS),
                            key=lambda p: _natural_key(p.name))
        if not self.files:
            raise VideoError(f"no .jpg or .png images in folder {self.folder}")
        self.fps = float(fps)
        self.frame_count = len(self.files)
        self._next = 0
        self._start()

    @property
    def name(self) -> str:
        return self.folder.resolve().name or "images"

    def _read(self) -> np.ndarray | None:
        if self._next >= len(self.files):
            return None
        p = self.files[self._next]
        self._next += 1
        cv2 = _cv2()
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise VideoError(f"cannot decode image {p} (corrupt or not an image)")
        if self.height and bgr.shape[:2] != (self.height, self.width):
            raise VideoError(f"image {p.name} is {bgr.shape[1]}x{bgr.shape[0]}, the folder's first image "
                             f"{self.files[0].name} is {self.width}x{self.height}; all frames must have one size")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _av():
    try:
        import av
    except ImportError as e:
        raise VideoError(f"the pyav reader needs PyAV: pip install av ({e})") from None
    try:  # FFmpeg's own log lines ("Stream ends prematurely"): we report problems ourselves
        av.logging.set_libav_level(av.logging.PANIC)
    except AttributeError:  # pragma: no cover - older PyAV
        pass
    return av


def _av_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return f"{msg} ({type(e).__name__})" if msg else type(e).__name__


STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
READERS = ("auto", "opencv", "pyav")


def is_stream(spec: str) -> bool:
    """True for network stream URLs (rtsp://, http://, https://, ...)."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    return bool(m) and m.group(1).lower() in STREAM_SCHEMES


def have_pyav() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def open_source(spec: str | int | Path, max_frames: int | None = None, *, reader: str = "auto",
                timeout_s: float = 10.0) -> FrameSource:
    """The frame source a user means by `spec`.

    - an existing directory: its images (.jpg/.png, natural name order);
    - an existing file: a video file (OpenCV; PyAV with reader="pyav");
    - `0`, `1`, ...: a camera by index;
    - `rtsp://`, `http://`, `https://` (and rtsps, rtmp, udp, tcp, srt): a network stream; reader
      "auto" uses PyAV when it is installed (precise errors), else OpenCV's FFmpeg backend;
    - `clip:NAME`: a real clip of `deltacnn.clips` by name (its whole file; `python3 -m deltacnn.clips list`).
    `timeout_s` bounds opening a stream and waiting for each of its frames.
    """
    if reader not in READERS:
        raise VideoError(f"unknown reader {reader!r}; use one of {', '.join(READERS)}")
    if isinstance(spec, int):
        return CameraSource(spec, max_frames)
    s = str(spec)
    if s.startswith("clip:"):
        from .clips import ClipNotInstalled, clip_path
        try:
            s = str(clip_path(s[len("clip:"):]))
        except (ClipNotInstalled, KeyError) as e:
            raise VideoError(e.args[0] if e.args else str(e)) from None
    if is_stream(s):
        if reader == "pyav" or (reader == "auto" and have_pyav()):
            return PyAVSource(s, max_frames, timeout_s)
        return OpenCVStream(s, max_frames, timeout_s)
    p = Path(s).expanduser()
    if p.is_dir():
        return ImageFolder(p, max_frames)
    if re.fullmatch(r"\d+", s) and not p.exists():
        return CameraSource(int(s), max_frames)
    if "://" in s:
        raise VideoError(f"unsupported URL scheme in {s!r}; streams: {', '.join(s_ + '://' for s_ in STREAM_SCHEMES)}")
    if reader == "pyav" and p.is_file() and p.stat().st_size > 0:
        return PyAVSource(str(p), max_frames, timeout_s, live=False)
    return VideoReader(p, max_frames)


def read_frames(path: str | Path, max_frames: int | None = None) -> list[np.ndarray]:
    """All frames (up to max_frames) of a video as RGB uint8 arrays; for short calibration clips."""
    return list(VideoReader(path, max_frames))


class VideoWriter:
    """Write RGB uint8 frames to a video, falling back to another codec if one is unavailable.

    Opened lazily at the first frame (its size fixes the video's). `path`'s suffix is replaced by
    the codec's container (`.mp4`, else `.avi`); the final name is in `.path` after the first write.
    """

    def __init__(self, path: str | Path, fps: float = 25.0) -> None:
        self.path = Path(path)
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self._w = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def _open(self, width: int, height: int) -> None:
        cv2 = _cv2()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for fourcc, ext in CODECS:
            path = self.path.with_suffix(ext)
            w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), self.fps, (width, height))
            if w.isOpened():
                self._w, self.path, self._size = w, path, (width, height)
                return
            w.release()
            path.unlink(missing_ok=True)
        raise VideoError(f"cannot write video {self.path}: none of the codecs {[c for c, _ in CODECS]} is available "
                         "in this OpenCV build")

    def write(self, frame_rgb: np.ndarray) -> None:
        if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB frame, got shape {frame_rgb.shape}")
        h, w = frame_rgb.shape[:2]
        if self._w is None:
            self._open(w, h)
        elif (w, h) != self._size:
            raise ValueError(f"frame size {w}x{h} differs from the video's {self._size[0]}x{self._size[1]}")
        cv2 = _cv2()
        self._w.write(cv2.cvtColor(np.ascontiguousarray(frame_rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self._w is not None:
            self._w.release()
            self._w = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames, fps: float = 25.0) -> Path:
    """Write an iterable of RGB uint8 frames; returns the path actually written (codec fallback)."""
    with VideoWriter(path, fps) as w:
        for f in frames:
            w.write(f)
    if w.frames == 0:
        raise VideoError(f"no frames to write to {path}")
    return w.path
