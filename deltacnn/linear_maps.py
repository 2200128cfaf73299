"""Delta forms of parameter-free linear ops on feature maps: the op itself and its mask rule.

Each builder returns a `LinearMapSpec` (or None when that configuration has no delta form, so the
converter reports it): `fn` maps a zero-filled delta (linear, so deltas map to deltas), `mask_fn`
maps the (N, 1, H, W) update mask by the rule "an output pixel is updated iff any input pixel it
reads is", and `key_fn` (when set) runs on keyframes instead of `fn`, for the constant part
(a pad value) that must enter once. DeltaLinearMap runs them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Fn = Callable[[Tensor], Tensor]


@dataclass
class LinearMapSpec:
    fn: Fn
    mask_fn: Fn
    what: str
    key_fn: Fn | None = None
    # (sy, sx) when fn is a nearest upsampling by integer factors: each output pixel (y, x) copies input
    # pixel (y // sy, x // sx), which a backend may run on the updated pixels alone (Backend.upsample_nearest)
    nearest: tuple[int, int] | None = None


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def avg_pool(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> LinearMapSpec:
    stride = kernel if stride is None or stride == [] else stride

    def fn(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    def mask_fn(m: Tensor) -> Tensor:
        return F.max_pool2d(m.float(), kernel, stride, padding, 1, ceil_mode) > 0

    return LinearMapSpec(fn, mask_fn, f"avg_pool2d(kernel={kernel}, stride={stride}, padding={padding})")


def adaptive_avg_pool(output_size) -> LinearMapSpec:
    return LinearMapSpec(lambda x: F.adaptive_avg_pool2d(x, output_size),
                         lambda m: F.adaptive_max_pool2d(m.float(), output_size) > 0,
                         f"adaptive_avg_pool2d({output_size})")


INTERPOLATE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def interpolate(size=None, scale_factor=None, mode: str = "nearest", align_corners=None,
                recompute_scale_factor=None, antialias: bool = False) -> LinearMapSpec | None:
    """F.interpolate with a static size or scale factor.

    Mask rules: nearest modes read one pixel (the same op on the mask is exact); bilinear reads
    a 2 x 2 neighbourhood with weights >= 0 (bilinear on the mask, > 0); bicubic reads 4 x 4
    around the same point (the mask dilated by 3 x 3, then bilinear); area is adaptive average
    pooling (adaptive max pooling on the mask). Antialiased resampling reads a wider window: no
    delta form.
    """
    if mode not in INTERPOLATE_MODES or antialias:
        return None
    if mode == "area":
        return adaptive_avg_pool(size) if size is not None and scale_factor is None else None
    ac = align_corners if mode in ("bilinear", "bicubic") else None
    kw = dict(size=size, scale_factor=scale_factor, recompute_scale_factor=recompute_scale_factor)

    def fn(x: Tensor) -> Tensor:
        return F.interpolate(x, mode=mode, align_corners=ac, **kw)

    def mask_fn(m: Tensor) -> Tensor:
        m = m.float()
        if mode.startswith("nearest"):
            return F.interpolate(m, mode=mode, **kw) > 0
        if mode == "bicubic":
            m = F.max_pool2d(m, 3, 1, 1)
        return F.interpolate(m, mode="bilinear", align_corners=ac, **kw) > 0

    return LinearMapSpec(fn, mask_fn, f"interpolate(size={size}, scale_factor={scale_factor}, mode={mode})",
                         nearest=_integer_factors(scale_factor) if mode == "nearest" and size is None else None)


def _integer_factors(scale_factor) -> tuple[int, int] | None:
    """(sy, sx) of a scale factor that is a whole number >= 1 in both dims (2, 2.0, (2, 3)); else None."""
    if scale_factor is None:
        return None
    f = _pair(scale_factor)
    if len(f) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 1 or v != int(v) for v in f):
        return None
    return int(f[0]), int(f[1])


def pad(padding, mode: str = "constant", value=None) -> LinearMapSpec | None:
    """F.pad / nn.*Pad2d. Constant: deltas pad with 0, keyframes with the value, the border never updates.
    Reflect, replicate, circular: each output pixel reads one input pixel, so the mask is padded the same way."""
    padding = tuple(int(p) for p in padding)
    if len(padding) % 2 or not 2 <= len(padding) <= 6 or mode not in ("constant", "reflect", "replicate", "circular"):
        return None
    spatial = padding[:4]
    if len(padding) == 6 and mode != "constant":
        return None  # a non-constant pad of channels (5-D semantics): not a 2-D map op
    value = 0.0 if value is None else float(value)

    def fn(x: Tensor) -> Tensor:
        return F.pad(x, padding, mode) if mode != "constant" else F.pad(x, padding, "constant", 0.0)

    def key_fn(x: Tensor) -> Tensor:
        return F.pad(x, padding, "constant", value)

    def mask_fn(m: Tensor) -> Tensor:
        m = m.float()
        return (F.pad(m, spatial, mode) if mode != "constant" else F.pad(m, spatial, "constant", 0.0)) > 0

    return LinearMapSpec(fn, mask_fn, f"pad({padding}, mode={mode}, value={value})",
                         key_fn if mode == "constant" and value != 0 else None)


def roll(shifts, dims) -> LinearMapSpec | None:
    """torch.roll over any of (N, C, H, W): the mask rolls over the same batch and spatial dims."""
    if dims is None:
        return None  # a roll of the flattened tensor mixes channels into pixels
    shifts = tuple(shifts) if isinstance(shifts, (tuple, list)) else (shifts,)
    dims = tuple(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
    if len(shifts) != len(dims):
        return None
    mask_pairs = [(s, d) for s, d in zip(shifts, dims) if d != 1]

    def mask_fn(m: Tensor) -> Tensor:
        if not mask_pairs:
            return m
        return torch.roll(m, tuple(s for s, _ in mask_pairs), tuple(d for _, d in mask_pairs))

    return LinearMapSpec(lambda x: torch.roll(x, shifts, dims), mask_fn, f"roll(shifts={shifts}, dims={dims})")


def pixel_shuffle(r: int) -> LinearMapSpec:
    """Each output pixel reads one input pixel (at h // r, w // r): the mask is upsampled by r."""
    return LinearMapSpec(lambda x: F.pixel_shuffle(x, r),
                         lambda m: F.interpolate(m.float(), scale_factor=r, mode="nearest") > 0,
                         f"pixel_shuffle({r})")


def pixel_unshuffle(r: int) -> LinearMapSpec:
    """Each output pixel reads an r x r block: the mask is max-pooled by r."""
    return LinearMapSpec(lambda x: F.pixel_unshuffle(x, r), lambda m: F.max_pool2d(m.float(), r) > 0,
                         f"pixel_unshuffle({r})")


def flip(dims) -> LinearMapSpec:
    dims = tuple(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
    mdims = tuple(d for d in dims if d != 1)
    return LinearMapSpec(lambda x: torch.flip(x, dims), (lambda m: torch.flip(m, mdims)) if mdims else (lambda m: m),
                         f"flip({dims})")
