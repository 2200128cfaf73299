"""The delta tensor: dense-shaped values plus a per-pixel update mask.

One place defines how a sparse feature map is laid out, so every backend agrees:
values are (N, C, H, W) in channels_last memory (each pixel's channels are one contiguous
row of a (N*H*W, C) matrix, which is what gathers and GEMMs want), the mask is (N, 1, H, W)
bool. Values at pixels whose mask is False are undefined and must never be read as data. (The Triton
backend's channel slices are views of a wider channels_last map: their pixel rows are `channel_view`s,
one row per pixel at a stride of more than C.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def new_cl(n: int, c: int, h: int, w: int, *, dtype: torch.dtype, device: torch.device | str,
           fill: float | None = None) -> Tensor:
    """Allocate an (N, C, H, W) tensor whose memory is NHWC (channels_last, even for C == 1)."""
    t = torch.empty(n, h, w, c, dtype=dtype, device=device)
    if fill is not None:
        t.fill_(fill)
    return t.permute(0, 3, 1, 2)


def new_rows_ext(n: int, c: int, h: int, w: int, *, dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """An (N*H*W + 1, C) matrix with a zero last row, and the (N, C, H, W) channels_last view of the rest."""
    ext = torch.empty(n * h * w + 1, c, dtype=dtype, device=device)
    ext[-1].zero_()
    return ext, ext[:-1].view(n, h, w, c).permute(0, 3, 1, 2)


def to_cl(t: Tensor) -> Tensor:
    """Return `t` with NHWC memory (a copy only when it is not laid out that way already)."""
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def channel_view(t: Tensor) -> bool:
    """Whether t is a channel slice of a channels_last map: each pixel's channels contiguous, pixels at a
    fixed stride of at least C, in (N, H, W) order. Its rows are a strided (N*H*W, C) view (`rows` gives
    it; kernels that want one dense matrix need to_cl first); per pixel they are what the keyframe paths
    (cat, add, dense conv) and the Triton backend's convs, adds and box decode read."""
    if t.dim() != 4 or t.stride(1) != 1:
        return False
    n, c, h, w = t.shape
    sx = t.stride(3)
    return sx >= c and (h == 1 or t.stride(2) == w * sx) and (n == 1 or t.stride(0) == h * w * sx)


_ALL_TRUE: dict[tuple, Tensor] = {}


def all_true_mask(n: int, h: int, w: int, device: torch.device) -> Tensor:
    """An (N, 1, H, W) all-true bool mask: a keyframe's. On the CPU one tensor per shape is shared by
    every keyframe map of that shape (~90 a YOLOv8n keyframe, each a torch.ones otherwise); masks are
    never written in place (code that changes one clones it first). Elsewhere, and inside a
    torch.compile trace, a new one each call (a tensor made during a CUDA graph capture belongs to it)."""
    if torch.device(device).type != "cpu" or torch.compiler.is_compiling():
        return torch.ones(n, 1, h, w, dtype=torch.bool, device=device)
    key = (n, h, w)
    m = _ALL_TRUE.get(key)
    if m is None:
        if len(_ALL_TRUE) > 256:  # many input sizes: start over rather than keep them all
            _ALL_TRUE.clear()
        m = _ALL_TRUE[key] = torch.ones(n, 1, h, w, dtype=torch.bool)
    return m


def stream_fraction(mask: Tensor) -> Tensor:
    """Per stream (N,), float32: the fraction of True elements of an (N, ...) bool mask. Counted as bytes
    into int32 (a float copy of the mask, as `.float().mean(1)`, is ~3x slower: ~120 us a 640x448 frame
    on the CPU, and the input layer measures its change on every frame). Under torch.compile the float form:
    inductor fuses it, and torch 2.11's inductor on CUDA cannot lower the bool-as-uint8 view (the compiled
    keyframe pass failed and ran eagerly, H200 session 16)."""
    n = mask.shape[0]
    flat = mask.reshape(n, -1)
    per = flat.shape[1]
    if mask.dtype != torch.bool or per == 0 or torch.compiler.is_compiling():
        return flat.float().mean(1)
    return flat.view(torch.uint8).sum(1, dtype=torch.int32).float() / per


def rows(t: Tensor) -> Tensor:
    """The (N*H*W, C) row view of a channels_last (N, C, H, W) tensor (shares memory)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).view(n * h * w, c)


@dataclass(frozen=True)
class Bordered:
    """A zero-filled, zero-bordered copy of a delta's values, for gathers that need neither masks nor
    bounds checks (the RGB stem reads whole window rows of it as aligned vectors).

    `values` is (N, H + 2 * border, Wp, cp) in the delta's dtype, Wp = W + 2 * border rounded up to a
    multiple of 16; pixel (n, y, x) of the delta is values[n, y + border, x + border, :C], channels C..cp
    are 0, and every pixel outside the delta's mask or the image is 0.
    """

    values: Tensor
    border: int


@dataclass
class DeltaTensor:
    """A sparse feature map flowing between delta layers.

    `dense` marks a keyframe: then `values` are absolute values (not deltas), every pixel is
    updated, and stateful layers re-initialise their state from them.
    """

    values: Tensor
    mask: Tensor
    dense: bool = False
    _active: Tensor | None = field(default=None, repr=False)
    # optional (N*H*W + 1, C) matrix whose first rows are `values` and whose last row is zero, so
    # gathers can route inactive or out-of-bounds taps to zeros without a masking pass
    ext: Tensor | None = field(default=None, repr=False)
    # optional zero-filled, bordered copy of `values` (the input layer of the Triton backend writes it)
    bordered: Bordered | None = field(default=None, repr=False)
    # optional float32 sum of every delta this stream has carried since its keyframe, i.e. its dense
    # value (a nonlinear layer's emitted state E), for consumers that would otherwise keep that sum
    running_sum: Tensor | None = field(default=None, repr=False)
    # optional: the channel parts of a cat whose one consumer, a 1x1 conv, reads them in place (Backend.cat_in_place
    # on delta frames, Backend.dense_cat_in_place on keyframes); `values` is then a placeholder of the cat's shape
    # holding no data (one element broadcast), and only that conv (FusedCpuBackend.conv_block, DeltaConv2d's dense
    # path) may read the delta: it builds the cat where its pass does not cover the conv
    parts: tuple["DeltaTensor", ...] | None = field(default=None, repr=False)

    @classmethod
    def keyframe(cls, values: Tensor) -> "DeltaTensor":
        """Absolute values as a keyframe: every pixel updated. Values already laid out channels_last are
        kept as they are, and so is a channel slice of such a map (pixel rows strided, each pixel's
        channels contiguous: `channel_view`), which the keyframe paths read in place."""
        n, _, h, w = values.shape
        if not (values.is_contiguous(memory_format=torch.channels_last) or channel_view(values)):
            values = to_cl(values)
        return cls(values, all_true_mask(n, h, w, values.device), dense=True)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def active(self) -> Tensor:
        """Flat indices (into N*H*W) of updated pixels; computed once and cached."""
        if self._active is None:
            self._active = torch.nonzero(self.mask.reshape(-1)).squeeze(1)
        return self._active

    def rows(self) -> Tensor:
        return rows(self.values)

    def zero_filled(self) -> Tensor:
        """Values with inactive pixels set to 0 (dense; for layers computed densely)."""
        # a Python 0 (not a 0-d tensor on the device, whose creation is a launch of its own on a GPU)
        return torch.where(self.mask, self.values, 0.0)


def empty_delta(n: int, c: int, h: int, w: int, *, dtype: torch.dtype, device: torch.device) -> DeltaTensor:
    """A delta with no updated pixel (values left undefined)."""
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool, device=device)
    ext, values = new_rows_ext(n, c, h, w, dtype=dtype, device=device)
    return DeltaTensor(values, mask, _active=torch.zeros(0, dtype=torch.long, device=device), ext=ext)
