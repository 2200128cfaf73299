"""Nonlinear layers: keep the accumulated input A and the last emitted output E (float32).

On a delta frame A += d; the candidate change o = f(A) - E is emitted only at pixels whose
truncation score exceeds the layer's threshold, and E records exactly what was emitted, so
truncated change stays in f(A) - E and is sent later: nothing drifts.
"""
from __future__ import annotations

import torch.nn.functional as F


from ..activations import ActSpec
from ..backends.base import PointwiseState
from ..geometry import Window
from ..tensor import DeltaTensor
from .base import DeltaLayer, check_delta


class DeltaActivation(DeltaLayer):
    kind = "activation"

    def __init__(self, act: ActSpec, name: str = "") -> None:
        super().__init__(name)
        self.act = act

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        rt = self.rt
        if d.dense:
            return self.record(DeltaTensor.keyframe(self._seed_act(d.values, self.act)))
        st = PointwiseState(self.act, self._state("acc"), self._state("emitted"), self.tau(), rt.thresholds.score)
        return self.record(rt.backend_for(d.values).pointwise(d, st))

    def extra_repr(self) -> str:
        return self.act.describe()


class DeltaMaxPool2d(DeltaLayer):
    kind = "maxpool"

    def __init__(self, kernel, stride=None, padding=0, dilation=1, ceil_mode: bool = False, name: str = "") -> None:
        super().__init__(name)
        stride = kernel if stride is None or stride == [] else stride
        self.args = (kernel, stride, padding, dilation, ceil_mode)
        self.window = Window.make(kernel, stride, padding, dilation, ceil_mode)

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        rt = self.rt
        if d.dense:
            self._seed_state("acc", d.values)
            y = F.max_pool2d(d.values, *self.args)
            self._seed_state("emitted", y)
            return self.record(DeltaTensor.keyframe(y))
        out = rt.backend_for(d.values).maxpool(d, self._state("acc"), self._state("emitted"), self.window,
                                               self.tau(), rt.thresholds.score)
        return self.record(out)


class DeltaMul(DeltaLayer):
    """Product of two streams (the second may broadcast over space, e.g. squeeze-excitation scales)."""

    kind = "mul"

    def forward(self, a: DeltaTensor, b: DeltaTensor) -> DeltaTensor:
        a, b = check_delta(a, self), check_delta(b, self)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"mul {self.name!r}: batch sizes differ ({a.shape[0]} vs {b.shape[0]})")
        rt = self.rt
        if a.dense != b.dense:
            raise RuntimeError(f"mul {self.name!r}: keyframe and delta inputs mixed")
        if a.dense:
            self._seed_state("a", a.values)
            self._seed_state("b", b.values)
            y = (a.values * b.values).to(rt.dtype)
            self._seed_state("emitted", y)
            return self.record(DeltaTensor.keyframe(y))
        out = rt.backend_for(a.values).mul(a, b, self._state("a"), self._state("b"), self._state("emitted"),
                                           self.tau(), rt.thresholds.score)
        return self.record(out)

