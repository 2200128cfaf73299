"""What every delta layer shares: a name, the model's runtime, keyframe-aware state."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..runtime import Runtime
from ..thresholds import Thresholds
from ..tensor import DeltaTensor, to_cl


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

    def _seed_state(self, key: str, values: Tensor, *, always: bool = False) -> None:
        """Set float32 channels_last state `key` to a copy of `values` (on keyframes).

        The existing buffer is reused when it fits, so that a captured CUDA graph reading it stays
        valid across keyframes, and so that a keyframe costs one copy per state, not an allocation.
        Stateless dense frames (DeltaModel.dense_frame) skip it unless `always`.
        """
        if self.rt.stateless and not always:
            return
        old = self._buffers.get("state_" + key)
        if old is not None and old.shape == values.shape and old.device == values.device:
            old.copy_(values)
        else:
            self._buffers["state_" + key] = to_cl(values.float()).clone() if values.dtype == torch.float32 \
                else to_cl(values.float())

    def _seed_act(self, y: Tensor, act, owned: bool = False) -> Tensor:
        """Keyframe of a nonlinear update: A = y, E = f(A) as sent; returns f(y) in the model dtype.

        A stateless dense frame computes f(y) directly in the model dtype (one pass, no state),
        in place when the caller `owned` y (a temporary nobody else reads).
        """
        if self.rt.stateless:
            return (act.apply_(y) if owned and y.dtype == self.rt.dtype else act(y)).to(self.rt.dtype)
        self._seed_state("acc", y)
        if y.dtype == self.rt.dtype and act.commutes_with_rounding:
            out = act.apply_(y) if owned else act(y)  # A holds y already; E is f(A) as sent either way
        else:
            out = act(self._state("acc")).to(self.rt.dtype)
        self._seed_state("emitted", out)
        return out

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

