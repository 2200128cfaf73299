"""Video input/output for the command-line tools, on OpenCV (`opencv-python-headless`).

Frames are RGB uint8 numpy arrays of shape (H, W, 3) everywhere in deltacnn; OpenCV's BGR order
stays inside this module. Problems a user can cause (missing, empty, corrupt or frameless files)
raise `VideoError` with a one-line message, so the CLI can report them without a traceback.
"""
from __future__ import annotations

import os
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


class VideoReader:
    """Iterate a video file's frames as RGB uint8 arrays; validated on construction.

    Opening decodes the first frame, so a file that opens but holds no frames fails here, at the
    start of a run, rather than after a model was loaded.
    """

    def __init__(self, path: str | Path, max_frames: int | None = None) -> None:
        self.path = Path(path)
        if max_frames is not None and max_frames < 1:
            raise VideoError(f"--max-frames must be >= 1, got {max_frames}")
        self.max_frames = max_frames
        if not self.path.exists():
            raise VideoError(f"video not found: {self.path}")
        if not self.path.is_file():
            raise VideoError(f"not a video file: {self.path} (is a directory)")
        if self.path.stat().st_size == 0:
            raise VideoError(f"video file is empty (0 bytes): {self.path}")
        cv2 = _cv2()
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise VideoError(f"cannot decode video: {self.path} (corrupt, truncated or not a video file)")
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise VideoError(f"video has no decodable frames: {self.path}")
        self._first: np.ndarray | None = first
        self.height, self.width = first.shape[:2]
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0.5 <= fps <= 1000 else 25.0  # some containers report 0 or nonsense
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count: int | None = count if count > 0 else None  # container's claim (may be off)

    @property
    def expected_frames(self) -> int | None:
        """Frames the iteration will probably yield (for progress bars); None if unknown."""
        if self.frame_count is None:
            return self.max_frames
        return min(self.frame_count, self.max_frames) if self.max_frames else self.frame_count

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._cap is None:
            raise VideoError(f"video reader for {self.path} was already consumed; open it again")
        cv2 = _cv2()
        n = 0
        try:
            frame = self._first
            self._first = None
            while frame is not None and (self.max_frames is None or n < self.max_frames):
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                n += 1
                ok, frame = self._cap.read()
                if not ok:
                    frame = None  # end of stream (or a corrupt tail: keep what decoded)
        finally:
            self.close()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
