"""Linear layers without parameters to learn on deltas: add, cat, scale, pooling, resampling, slicing.

Each applies its linear map to the delta; constants (a BN shift, `x + 3`) enter on keyframes only.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..tensor import DeltaTensor, to_cl
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
    """Concatenation along channels."""

    kind = "cat"

    def forward(self, *ds: DeltaTensor) -> DeltaTensor:
        ds = tuple(check_delta(d, self) for d in ds)
        if _same_kind(self, ds):
            return self.record(DeltaTensor.keyframe(torch.cat([d.values for d in ds], 1)))
        return self.record(self.rt.backend_for(ds[0].values).cat(list(ds)))


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
    """A parameter-free linear spatial op (avg pooling, up/down-sampling) given as `fn`, with its mask rule."""

    kind = "linear_map"

    def __init__(self, fn: Callable[[Tensor], Tensor], mask_fn: Callable[[Tensor], Tensor], name: str = "",
                 what: str = "") -> None:
        super().__init__(name)
        self.fn, self.mask_fn, self.what = fn, mask_fn, what

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        if d.dense:
            return self.record(DeltaTensor.keyframe(self.fn(d.values)))
        return self.record(self.rt.backend_for(d.values).dense_linear(d, self.fn, self.mask_fn))

    def extra_repr(self) -> str:
        return self.what


class DeltaChannelSlice(DeltaLayer):
    kind = "slice"

    def __init__(self, start: int, stop: int, name: str = "") -> None:
        super().__init__(name)
        self.start, self.stop = start, stop

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        if not d.dense:  # a backend copies only the updated pixels' rows
            return self.rt.backend_for(d.values).channel_slice(d, self.start, self.stop)
        v = to_cl(d.values[:, self.start:self.stop])
        return DeltaTensor(v, d.mask, dense=d.dense, _active=d._active)
