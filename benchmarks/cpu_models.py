"""Frames of the real-footage CPU benchmark (cpu_real.py); the models come from deltacnn.tasks."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def load_frames(count: int, scale_01: bool) -> list[Tensor]:
    """`count` frames of vtest.avi as (1, 3, 576, 768) float tensors, in 0-1 or 0-255."""
    from deltacnn.pretrained import read_frames
    out = []
    for f in read_frames(max_frames=count):
        x = torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float()
        out.append((x / 255.0 if scale_01 else x).contiguous())
    return out
