"""Linear layers without parameters to learn on deltas: add, cat, scale, pooling, resampling, slicing.

Each applies its linear map to the delta; constants (a BN shift, `x + 3`) enter on keyframes only.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..tensor import DeltaTensor, channel_view, to_cl
from .base import DeltaLayer, check_delta


def _same_kind(layer: DeltaLayer, ds) -> bool:
    kinds = {d.dense for d in ds}
    if len(kinds) > 1:
        raise RuntimeError(f"{layer.kind} {layer.name!r}: keyframe and delta inputs mixed")
    return kinds.pop()


class DeltaAdd(DeltaLayer):
    kind = "add"

    def forward(self, a: DeltaTensor, b: DeltaTensor) -> DeltaTensor:
        a, b = check_delta(a, self), check_delta(b, self)
        if _same_kind(self, (a, b)):
            return self.record(DeltaTensor.keyframe(a.values + b.values))
        return self.record(self.rt.backend_for(a.values).add(a, b))


class DeltaCat(DeltaLayer):
    """Concatenation along channels.

    `read_in_place` (set by the converter, mark_cats_read_in_place): the cat's one consumer is a 1x1 conv that
    may read its parts in place on delta frames (Backend.cat_in_place) and keyframes (Backend.dense_cat_in_place)
    while the runtime allows it (rt.cats_in_place: off while motion's view-step hooks read every layer's values)."""

    kind = "cat"
    read_in_place = False

    def forward(self, *ds: DeltaTensor) -> DeltaTensor:
        ds = tuple(check_delta(d, self) for d in ds)
        if _same_kind(self, ds):
            if self.read_in_place and self.rt.cats_in_place:
                out = self.rt.backend_for(ds[0].values).dense_cat_in_place(list(ds))
                if out is not None:
                    return self.record(out)
            return self.record(DeltaTensor.keyframe(torch.cat([d.values for d in ds], 1)))
        backend = self.rt.backend_for(ds[0].values)
        if self.read_in_place and self.rt.cats_in_place:
            out = backend.cat_in_place(list(ds))
            if out is not None:
                return self.record(out)
        return self.record(backend.cat(list(ds)))


class DeltaScale(DeltaLayer):
    """y = x * scale + shift with constant scale (scalar or per channel) and shift (any broadcastable constant).

    Unfoldable batch norm, `x * 0.5`, `x / 6`, `x + 3`, `-x` all land here.
    """

    kind = "scale"

    def __init__(self, scale: Tensor | float, shift: Tensor | float = 0.0, name: str = "") -> None:
        super().__init__(name)
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32).detach().clone())

    def _channel(self, t: Tensor, x: Tensor) -> Tensor:
        return t.reshape(1, -1, 1, 1) if t.dim() == 1 else t

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        if d.dense:
            y = d.values * self._channel(self.scale, d.values).to(d.dtype) + self._channel(self.shift, d.values).to(d.dtype)
            return self.record(DeltaTensor.keyframe(y))
        if self.scale.numel() == 1 and float(self.scale) == 1.0:
            return self.record(d)
        return self.record(self.rt.backend_for(d.values).scale(d, self.scale.reshape(-1)))


class DeltaGlobalAvgPool(DeltaLayer):
    """Mean over all pixels, keeping (N, C, 1, 1): the squeeze of squeeze-excitation and classifier heads."""

    kind = "global_pool"

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        if d.dense:
            return self.record(DeltaTensor.keyframe(d.values.mean((2, 3), keepdim=True)))
        return self.record(self.rt.backend_for(d.values).global_avg_pool(d))


class DeltaLinearMap(DeltaLayer):
    """A parameter-free linear op (pooling, resampling, padding, roll, pixel shuffle) given as `fn`, with its mask rule.

    Deltas go through the backend's `dense_linear`: `fn` on the zero-filled delta, which is exact for
    any linear op and costs about one dense pass of an op that is cheap anyway (no weights), so a
    sparse kernel per op would not pay off. `mask_fn` maps the (N, 1, H, W) update mask: an output
    pixel is updated iff any input pixel it reads is. `key_fn` (default `fn`) runs on keyframes,
    for ops with a constant part (a pad value) that enters on keyframes only.
    """

    kind = "linear_map"

    def __init__(self, fn: Callable[[Tensor], Tensor], mask_fn: Callable[[Tensor], Tensor], name: str = "",
                 what: str = "", key_fn: Callable[[Tensor], Tensor] | None = None,
                 nearest: tuple[int, int] | None = None) -> None:
        super().__init__(name)
        self.fn, self.mask_fn, self.what, self.key_fn = fn, mask_fn, what, key_fn
        self.nearest = nearest  # (sy, sx): fn is a nearest upsampling by these integer factors (linear_maps)

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        if d.dense:
            return self.record(DeltaTensor.keyframe((self.key_fn or self.fn)(d.values)))
        backend = self.rt.backend_for(d.values)
        if self.nearest is not None and (out := backend.upsample_nearest(d, self.nearest)) is not None:
            return self.record(out)  # the updated pixels' rows copied, not the op on the zero-filled map
        return self.record(backend.dense_linear(d, self.fn, self.mask_fn))

    def extra_repr(self) -> str:
        return self.what


class DeltaSlice(DeltaLayer):
    """Select channels (a slice or an index list) and a strided window of pixels: values and mask alike.

    A pure gather, exact on deltas and keyframes, with no zero-filling: channel-only selections
    keep the mask (and its active list) as they are, spatial ones slice the mask the same way.
    Channel slices, `chunk`/`split` parts, space-to-depth slices (`x[..., ::2, ::2]`) and channel
    shuffles (a view/transpose/view chain is a channel permutation) land here.
    """

    kind = "slice"

    def __init__(self, channels: slice | list[int] = slice(None), rows: slice = slice(None),
                 cols: slice = slice(None), name: str = "") -> None:
        super().__init__(name)
        self.channels, self.rows, self.cols = channels, rows, cols
        if isinstance(channels, list):
            self.register_buffer("index", torch.tensor(channels, dtype=torch.long), persistent=False)
        self.spatial = rows != slice(None) or cols != slice(None)

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        ch = self.channels
        if not self.spatial and not d.dense and isinstance(ch, slice) and ch.step in (None, 1):
            # a contiguous channel range of a delta: the backend copies only the updated pixels' rows
            start, stop, _ = ch.indices(d.values.shape[1])
            return self.record(self.rt.backend_for(d.values).channel_slice(d, start, stop))
        v = d.values
        v = v.index_select(1, self.index.to(v.device)) if isinstance(ch, list) else v[:, ch]
        if not self.spatial:
            if d.dense and channel_view(v) and self.rt.streams is None and \
                    self.rt.backend_for(v).reads_channel_views(v):
                # a keyframe's channel range (C2f's halves): its consumers read it in place, no copy
                return self.record(DeltaTensor(v, d.mask, dense=True))
            return self.record(DeltaTensor(to_cl(v), d.mask, dense=d.dense, _active=d._active))
        v = v[:, :, self.rows, self.cols]
        return self.record(DeltaTensor(to_cl(v), d.mask[:, :, self.rows, self.cols].contiguous(), dense=d.dense))

    def extra_repr(self) -> str:
        c = self.channels if isinstance(self.channels, slice) else f"[{len(self.channels)} channels]"
        return f"channels={c}, rows={self.rows}, cols={self.cols}"


class DeltaChannelSlice(DeltaSlice):
    """x[:, start:stop] (kept for code that builds delta models by hand)."""

    def __init__(self, start: int, stop: int, name: str = "") -> None:
        super().__init__(slice(start, stop), name=name)
        self.start, self.stop = start, stop
