"""Receptive-field arithmetic shared by every sliding-window layer (conv, pooling).

Output pixel (y, x) of a window op reads input pixels
(y*stride - pad_top + ky*dilation, x*stride - pad_left + kx*dilation) for each tap (ky, kx).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class Window:
    """Geometry of a sliding window: kernel, stride, dilation and (top, bottom, left, right) padding."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    @classmethod
    def make(cls, kernel, stride=1, padding=0, dilation=1, ceil_mode: bool = False) -> "Window":
        if isinstance(padding, int) or len(padding) == 2:
            ph, pw = _pair(padding)
            pad4 = (ph, ph, pw, pw)
        else:
            pad4 = tuple(int(p) for p in padding)
        return cls(_pair(kernel), _pair(stride), pad4, _pair(dilation), ceil_mode)

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output size, with PyTorch's rules (ceil_mode drops a last window that starts in the padding)."""
        sizes = []
        for n, k, s, d, p0, p1 in ((h, self.kernel[0], self.stride[0], self.dilation[0], self.padding[0], self.padding[1]),
                                   (w, self.kernel[1], self.stride[1], self.dilation[1], self.padding[2], self.padding[3])):
            span = n + p0 + p1 - d * (k - 1) - 1
            if self.ceil_mode:
                o = -(-span // s) + 1
                if (o - 1) * s >= n + p0:
                    o -= 1
            else:
                o = span // s + 1
            sizes.append(o)
        return sizes[0], sizes[1]


def dilate_mask(mask: Tensor, win: Window, out_hw: tuple[int, int]) -> Tensor:
    """Output pixels whose receptive field touches an updated input pixel (out-of-bounds taps never do)."""
    t, b, l, r = win.padding
    m = mask.to(torch.float16 if mask.is_cuda else torch.float32)
    # extra zero rows/cols on the far side cover ceil_mode windows that run past the input
    extra_h = max(0, (out_hw[0] - 1) * win.stride[0] + win.dilation[0] * (win.kernel[0] - 1) + 1 - (mask.shape[2] + t + b))
    extra_w = max(0, (out_hw[1] - 1) * win.stride[1] + win.dilation[1] * (win.kernel[1] - 1) + 1 - (mask.shape[3] + l + r))
    m = F.pad(m, (l, r + extra_w, t, b + extra_h))
    out = F.max_pool2d(m, win.kernel, win.stride, 0, win.dilation)
    return out[:, :, : out_hw[0], : out_hw[1]] > 0


def receptive_taps(out_idx: Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int], win: Window) -> tuple[Tensor, Tensor]:
    """For flat output indices (into N*Ho*Wo), the flat input index of every tap and whether it is in bounds.

    Returns (flat_in, inside), both (P, kh*kw); flat_in is clamped to a valid index where outside.
    """
    H, W = in_hw
    Ho, Wo = out_hw
    n = out_idx // (Ho * Wo)
    rem = out_idx - n * (Ho * Wo)
    oy = rem // Wo
    ox = rem - oy * Wo
    dev = out_idx.device
    ky = torch.arange(win.kernel[0], device=dev) * win.dilation[0]
    kx = torch.arange(win.kernel[1], device=dev) * win.dilation[1]
    iy = (oy * win.stride[0] - win.padding[0]).unsqueeze(1) + ky.repeat_interleave(win.kernel[1]).unsqueeze(0)
    ix = (ox * win.stride[1] - win.padding[2]).unsqueeze(1) + kx.repeat(win.kernel[0]).unsqueeze(0)
    inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    flat = (n.unsqueeze(1) * H + iy.clamp(0, H - 1)) * W + ix.clamp(0, W - 1)
    return flat, inside
