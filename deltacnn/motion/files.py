"""Camera-motion files for `deltacnn run --motion FILE` and `convert(..., motion=FILE)`.

Format: plain text, one line per frame, numbers separated by spaces, tabs or commas; `#` starts a
comment; blank lines are skipped. Line t is the camera motion from frame t - 1 to frame t (line 0,
the first frame's, is read but not used): either 2 numbers, the camera displacement `dx dy` in
pixels (the camera pans right: dx > 0), or 9 numbers, a row-major 3x3 homography mapping the
previous frame's pixel coordinates to the current frame's. All lines must have the same width.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

MOTION_CHOICES = ("auto", "none")


class MotionFileError(ValueError):
    """A motion file that cannot be read; the message names the file, the line and the problem."""


def load_motion_file(path: str | os.PathLike) -> Tensor:
    """(T, 2) float64 translations or (T, 3, 3) homographies from a motion file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise MotionFileError(f"motion file not found: {p} (give 'auto', 'none' or a text file with one "
                              "'dx dy' or 9-number homography line per frame)")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MotionFileError(f"{p}: cannot read the motion file as text: {e}") from None
    rows: list[list[float]] = []
    width = None
    for no, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0].replace(",", " ").split()
        if not body:
            continue
        try:
            vals = [float(v) for v in body]
        except ValueError:
            bad = next(v for v in body if not _is_number(v))
            raise MotionFileError(f"{p}:{no}: {bad!r} is not a number") from None
        if len(vals) not in (2, 9):
            raise MotionFileError(f"{p}:{no}: {len(vals)} numbers; a line is 'dx dy' (2) or a row-major 3x3 "
                                  "homography (9)")
        if width is not None and len(vals) != width:
            raise MotionFileError(f"{p}:{no}: {len(vals)} numbers after lines of {width}; use one form for the "
                                  "whole file")
        if not all(math.isfinite(v) for v in vals):
            raise MotionFileError(f"{p}:{no}: NaN or infinity in the camera motion")
        width = len(vals)
        rows.append(vals)
    if not rows:
        raise MotionFileError(f"{p}: no motion lines (one 'dx dy' or 9-number line per frame)")
    t = torch.tensor(rows, dtype=torch.float64)
    return t if width == 2 else t.reshape(-1, 3, 3)


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def resolve_motion(motion):
    """'auto' / 'none' / None as they are; a path (str or PathLike naming no mode) loaded as a motion
    file; tensors and sequences as they are."""
    if motion is None or (isinstance(motion, str) and motion in MOTION_CHOICES):
        return motion
    if isinstance(motion, (str, os.PathLike)):
        return load_motion_file(motion)
    return motion
