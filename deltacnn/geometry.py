"""Receptive-field arithmetic shared by every sliding-window layer (conv, pooling).

Output pixel (y, x) of a window op reads input pixels
(y*stride - pad_top + ky*dilation, x*stride - pad_left + kx*dilation) for each tap (ky, kx).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
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
    """Output pixels whose receptive field touches an updated input pixel (out-of-bounds taps never do).

    Separable: OR over the kernel's columns, then over its rows, on strided views of the padded
    boolean mask (a few byte-sized passes, no float pooling).
    """
    n, _, h, w = mask.shape
    (kh, kw), (sh, sw), (dh, dw) = win.kernel, win.stride, win.dilation
    t, _, l, _ = win.padding
    ho, wo = out_hw
    # pad so that every tap of every output pixel lands inside the buffer
    hp = max(h + t, (ho - 1) * sh + dh * (kh - 1) + 1)
    wp = max(w + l, (wo - 1) * sw + dw * (kw - 1) + 1)
    m = torch.zeros(n, hp, wp, dtype=torch.bool, device=mask.device)
    m[:, t:t + h, l:l + w] = mask.reshape(n, h, w)[:, : max(0, hp - t), : max(0, wp - l)]
    cols = m[:, :, 0:(wo - 1) * sw + 1:sw].clone()
    for kx in range(1, kw):
        cols |= m[:, :, kx * dw:kx * dw + (wo - 1) * sw + 1:sw]
    out = cols[:, 0:(ho - 1) * sh + 1:sh].clone()
    for ky in range(1, kh):
        out |= cols[:, ky * dh:ky * dh + (ho - 1) * sh + 1:sh]
    return out.reshape(n, 1, ho, wo)


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
