"""What every delta layer shares: a name, the model's runtime, keyframe-aware state."""
from __future__ import annotations

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

    @staticmethod
    def state_from(values: Tensor) -> Tensor:
        """A float32 channels_last copy of `values`, to seed an accumulator on a keyframe."""
        return to_cl(values.float()).clone()

    def reset_state(self) -> None:
        """Drop cached state (freed memory); the next frame must be a keyframe."""
        for k, v in list(self._buffers.items()):
            if k.startswith("state_"):
                self._buffers[k] = None

    def _set_state(self, key: str, value: Tensor) -> None:
        """Store state, reusing the existing buffer when it fits, so that a captured CUDA graph
        that reads it stays valid across keyframes."""
        old = self._buffers.get("state_" + key)
        if (old is not None and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device
                and old.stride() == value.stride()):
            old.copy_(value)
        else:
            self._buffers["state_" + key] = value

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

