"""The real static-camera demo clip (OpenCV's vtest.avi from Debian's opencv-doc): where to find it, and a
frame iterator with a start and a step (OpenCV, else PyAV) for scripts and tests.

Nothing is downloaded; see docs/ASSETS.md for the clip's origin and licence.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator

import numpy as np

__all__ = ["CLIP_ENV", "CLIP_INSTALL_HINT", "default_clip_path", "read_frames", "clip_info"]

CLIP_ENV = "DELTACNN_CLIP"
_CLIP_CANDIDATES = (
    # Debian / Ubuntu package opencv-doc (bookworm: 4.6.0+dfsg-12)
    "/usr/share/doc/opencv-doc/examples/data/vtest.avi",
    # the same file unpacked without installing: dpkg -x opencv-doc_*.deb ~/.cache/deltacnn/opencv-doc
    "~/.cache/deltacnn/opencv-doc/usr/share/doc/opencv-doc/examples/data/vtest.avi",
    # OpenCV source tree layouts, if a checkout happens to be around
    "/usr/share/opencv4/samples/data/vtest.avi",
    "/usr/local/share/opencv4/samples/data/vtest.avi",
)
CLIP_INSTALL_HINT = (
    "the real static-camera clip vtest.avi (OpenCV sample, pedestrians, 768x576, 10 fps) is not "
    "installed. Install it with:  apt-get install -y --no-install-recommends opencv-doc  "
    "(Debian bookworm 4.6.0+dfsg-12; file /usr/share/doc/opencv-doc/examples/data/vtest.avi), "
    f"or point ${CLIP_ENV} at a copy of the file."
)


def default_clip_path() -> pathlib.Path:
    """Path of the real clip: ``$DELTACNN_CLIP``, else the file installed by Debian's opencv-doc."""
    env = os.environ.get(CLIP_ENV)
    if env:
        p = pathlib.Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${CLIP_ENV}={env!r} is not a file")
        return p
    for c in _CLIP_CANDIDATES:
        p = pathlib.Path(c).expanduser()
        if p.is_file():
            return p
    raise FileNotFoundError(CLIP_INSTALL_HINT)


def _open_cv2(path: pathlib.Path):
    import cv2  # opencv-python-headless

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise OSError(f"OpenCV cannot open {path}")
    return cap


def read_frames(path: str | os.PathLike | None = None, max_frames: int | None = None,
                start: int = 0, step: int = 1) -> Iterator[np.ndarray]:
    """Decode a video into HxWx3 uint8 RGB frames (OpenCV if importable, else PyAV)."""
    path = pathlib.Path(path) if path is not None else default_clip_path()
    if not path.is_file():
        raise FileNotFoundError(path)
    n_out = 0
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        cap = _open_cv2(path)
        try:
            i = 0
            while max_frames is None or n_out < max_frames:
                ok, bgr = cap.read()
                if not ok:
                    break
                if i >= start and (i - start) % step == 0:
                    yield np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    n_out += 1
                i += 1
        finally:
            cap.release()
        return
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding video needs opencv-python-headless or av "
                          "(pip install opencv-python-headless==5.0.0.93)") from e
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if max_frames is not None and n_out >= max_frames:
                break
            if i >= start and (i - start) % step == 0:
                yield frame.to_ndarray(format="rgb24")
                n_out += 1


def clip_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Width, height, fps and frame count of a clip (OpenCV)."""
    import cv2

    path = pathlib.Path(path) if path is not None else default_clip_path()
    cap = _open_cv2(path)
    try:
        return {"path": str(path), "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), "fps": cap.get(cv2.CAP_PROP_FPS),
                "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), "bytes": path.stat().st_size}
    finally:
        cap.release()
