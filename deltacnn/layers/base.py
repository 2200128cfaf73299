"""What every delta layer shares: a name, the model's runtime, keyframe-aware state."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..activations import ActSpec
from ..runtime import Runtime
from ..thresholds import Thresholds
from ..tensor import DeltaTensor, new_cl


def standalone_runtime() -> Runtime:
    """A runtime for layers used on their own (outside `convert`): tau 0, float32, auto backend."""
    return Runtime(Thresholds())


class DeltaLayer(nn.Module):
    """Base of all delta layers. `rt` is shared by every layer of one converted model."""

    kind = "layer"

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name
        object.__setattr__(self, "rt", standalone_runtime())  # not a submodule

    def set_runtime(self, rt: Runtime) -> None:
        object.__setattr__(self, "rt", rt)

    def record(self, out: DeltaTensor, macs_per_pixel: int = 0) -> DeltaTensor:
        self.rt.stats.record(self.name, self.kind, out.mask, macs_per_pixel, dense=out.dense)
        return out

    def tau(self) -> float:
        return self.rt.thresholds.get(self.name)

    def _state_buffer(self, key: str, like: Tensor) -> Tensor:
        """The float32 channels_last state `key` shaped like `like`, for the caller to overwrite.

        The existing buffer is reused when it fits, so that a captured CUDA graph reading it stays
        valid across keyframes, and so that a keyframe costs one pass per state, not an allocation.
        """
        return self._state_buffer_of(key, tuple(like.shape), like.device)

    def _state_buffer_of(self, key: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """`_state_buffer` by shape and device (no tensor to describe them needed)."""
        if self.rt.streams is not None:
            raise RuntimeError(f"layer {self.name!r}: a keyframe of some streams writes state rows through "
                               "_seed_state, not a whole new buffer")
        old = self._buffers.get("state_" + key)
        if old is not None and old.shape == shape and old.device == device and old.dtype == torch.float32:
            return old
        n, c, h, w = shape
        buf = self._buffers["state_" + key] = new_cl(n, c, h, w, dtype=torch.float32, device=device)
        return buf

    def _seed_state(self, key: str, values: Tensor, *, always: bool = False) -> None:
        """Set state `key` to a copy of `values` (on keyframes).

        Stateless dense frames (DeltaModel.dense_frame) skip it unless `always`. A pass over some
        streams of the batch (rt.streams) overwrites only their rows.
        """
        rt = self.rt
        if rt.stateless and not always:
            return
        if rt.streams is not None:
            self._state(key).index_copy_(0, rt.streams, values.to(torch.float32))
            return
        self._state_buffer(key, values).copy_(values)

    def _seed_act(self, y: Tensor, act, owned: bool = False) -> Tensor:
        """Keyframe of a nonlinear update: A = y, E = f(A) as sent; returns f(y) in the model dtype.

        A stateless dense frame computes f(y) directly in the model dtype (one pass, no state),
        in place when the caller `owned` y (a temporary nobody else reads).
        """
        if self.rt.stateless:
            return (act.apply_(y) if owned and y.dtype == self.rt.dtype else act(y)).to(self.rt.dtype)
        if self.rt.streams is not None:  # some streams' rows: A = y, E = f(A) as sent, from y's values
            a = y.float()
            out = act(a).to(self.rt.dtype)
            self._seed_state("acc", a)
            self._seed_state("emitted", out)
            return out
        self._seed_state("acc", y)
        if y.dtype == self.rt.dtype and act.commutes_with_rounding:
            out = act.apply_(y) if owned else act(y)  # A holds y already; E is f(A) as sent either way
        else:
            out = act(self._state("acc")).to(self.rt.dtype)
        self._seed_state("emitted", out)
        return out

    def _seed_act_fused(self, y: Tensor, residual: Tensor | None, act: ActSpec, bias: Tensor | None = None) -> bool:
        """`_seed_act` of y + bias + residual in one backend pass where the backend has one (y is
        overwritten with the output; stateless dense frames write no state); False: nothing done, the
        caller adds and seeds the generic way."""
        rt = self.rt
        if y.dtype != rt.dtype or rt.streams is not None:  # an output dtype y cannot hold; some streams' rows
            return False
        acc = emitted = None
        if not rt.stateless:
            acc, emitted = self._state_buffer("acc", y), self._state_buffer("emitted", y)
        return rt.backend_for(y).seed_act(y, residual, acc, emitted, act, bias)

    def reset_state(self) -> None:
        """Drop cached state (frees memory); the next frame must be a keyframe."""
        for k in list(self._buffers):
            if k.startswith("state_"):
                self._buffers[k] = None

    def _state(self, key: str) -> Tensor:
        t = self._buffers.get("state_" + key)
        if t is None:
            raise RuntimeError(f"layer {self.name!r} has no state: the first frame after reset() must be a keyframe")
        return t


def check_delta(x: object, layer: DeltaLayer) -> DeltaTensor:
    if not isinstance(x, DeltaTensor):
        raise TypeError(f"{type(layer).__name__} {layer.name!r} expects a DeltaTensor, got {type(x).__name__}; "
                        "wrap raw tensors with deltacnn.Sparsify first")
    return x

