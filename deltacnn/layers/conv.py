"""Convolutions on deltas (linear: bias enters on keyframes only), optionally fused with what follows.

`DeltaConv2d` is also the fusion unit the converter builds: conv, then an optional residual
add of another stream, then an optional nonlinearity with truncation. The reference backend
runs these one after another; a fast backend runs them in one kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import ActSpec
from ..backends.base import ConvParams, PointwiseState
from ..geometry import Window
from ..layer_refresh import touch
from ..tensor import DeltaTensor
from .base import DeltaLayer, check_delta


class DeltaConv2d(DeltaLayer):
    kind = "conv"

    def __init__(self, weight: Tensor, bias: Tensor | None, window: Window, groups: int = 1,
                 name: str = "", act: ActSpec | None = None, act_name: str | None = None,
                 residual: bool = False) -> None:
        super().__init__(name)
        cout, cin_g = weight.shape[:2]
        if cout % groups:
            raise ValueError(f"conv {name!r}: out_channels {cout} not divisible by groups {groups}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.window = window
        self.groups = groups
        self.act = act
        self.act_name = act_name  # thresholds key of the fused nonlinearity
        self.residual = residual

    @classmethod
    def from_module(cls, m: nn.Conv2d, name: str = "") -> "DeltaConv2d":
        if m.padding_mode != "zeros":
            raise NotImplementedError(f"conv {name!r}: padding_mode={m.padding_mode!r} is not supported "
                                      "(only 'zeros'); pad explicitly before the conv")
        if isinstance(m.padding, str):
            pad = _same_padding(m) if m.padding == "same" else (0, 0, 0, 0)
        else:
            pad = (m.padding[0], m.padding[0], m.padding[1], m.padding[1])
        return cls(m.weight, m.bias, Window(tuple(m.kernel_size), tuple(m.stride), pad, tuple(m.dilation)),
                   m.groups, name)

    @property
    def macs_per_pixel(self) -> int:
        w = self._parameters["weight"]  # (not nn.Module's __getattr__: statistics read this on every conv of a frame)
        return w.shape[0] * w.shape[1] * self.window.taps

    def params(self) -> ConvParams:
        w = self._parameters["weight"]  # (not nn.Module's __getattr__: ~2 us, on every conv of every frame)
        key = (w.data_ptr(), w.dtype, w.device, w._version)
        if getattr(self, "_params_key", None) != key:  # weights moved, cast or edited: rebuild caches
            self._params = ConvParams(w, self.window, self.groups)
            self._params_key = key
        return self._params

    def dense(self, x: Tensor, bias: bool = True) -> Tensor:
        t, b, l, r = self.window.padding
        bias_t = self.bias if bias else None
        if (t, l) == (b, r):
            return F.conv2d(x, self.weight, bias_t, self.window.stride, (t, l), self.window.dilation, self.groups)
        return F.conv2d(F.pad(x, (l, r, t, b)), self.weight, bias_t, self.window.stride, 0,
                        self.window.dilation, self.groups)

    def forward(self, d: DeltaTensor, residual: DeltaTensor | None = None) -> DeltaTensor:
        d = check_delta(d, self)
        rt = self.rt
        y = None
        if d.dense and d.parts is not None:  # a keyframe's cat read in place (Backend.dense_cat_in_place)
            y = self._dense_fused(d.values, residual, d.parts)
            if y is None:  # the fused pass declined the parts: the cat is built here, then runs as any keyframe's
                d = DeltaTensor.keyframe(torch.cat([q.values for q in d.parts], 1))
        if d.dense and (y is not None or (y := self._dense_fused(d.values, residual)) is not None):
            out = DeltaTensor.keyframe(y)
        elif d.dense:
            # PyTorch adds a conv's bias in its own pass after cuDNN; a backend that fuses the dense
            # epilogue adds it there instead
            late_bias = self.bias if self.act is not None and rt.backend_for(d.values).fuses_conv_bias(d.values) \
                else None
            y = self.dense(d.values, bias=late_bias is None)  # a fresh tensor: updated in place below
            r = residual.values if residual is not None else None
            if self.act is None or not self._seed_act_fused(y, r, self.act, late_bias):
                if late_bias is not None:  # the fused pass declined: add the bias as the conv would have
                    y.add_(late_bias.view(1, -1, 1, 1))
                if r is not None:
                    y.add_(r)
                if self.act is not None:
                    y = self._seed_act(y, self.act, owned=True)
            out = DeltaTensor.keyframe(y)
        else:
            st = None
            backend = rt.backend_for(d.values)
            if self.act is not None:
                st = PointwiseState(self.act, self._state("acc"), self._state("emitted"),
                                    rt.thresholds.get(self.act_name), rt.thresholds.score)
                # deltacnn.layer_refresh: what it touched; on refresh frames, more (host backends only: elsewhere
                # DeltaModel warns once and never reads the bookkeeping)
                if rt.layer_refresh is not None and backend.host_sync_ok:
                    residual = touch(self, d, residual)
            out = backend.conv_block(d, self.params(), residual, st)
            if not rt.stats.enabled:
                return out
        return self.record(out, self.macs_per_pixel)

    def _dense_fused(self, x: Tensor, residual: DeltaTensor | None,
                     parts: tuple[DeltaTensor, ...] | None = None) -> Tensor | None:
        """A dense frame's conv, bias, residual add and activation, with a keyframe's A and E, in one
        backend pass where the backend has one (Backend.dense_conv; `parts`: x is the placeholder of a cat read
        in place); None: the generic path runs."""
        rt = self.rt
        backend = rt.backend_for(x)
        if rt.streams is not None or rt.dtype != torch.float32 or not backend.fuses_dense_conv(x):
            return None  # some streams' state rows; other dtypes; no such pass here (or not inside a trace)
        state = None
        if self.act is not None and not rt.stateless:
            def state(shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
                return self._state_buffer_of("acc", shape, x.device), self._state_buffer_of("emitted", shape, x.device)
        return backend.dense_conv(x, self.params(), self.bias, residual.values if residual is not None else None,
                                  self.act, state, tuple(q.values for q in parts) if parts is not None else None)

    def extra_repr(self) -> str:
        w = self.window
        s = (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel={w.kernel}, stride={w.stride}, "
             f"padding={w.padding}, dilation={w.dilation}, groups={self.groups}")
        if self.residual:
            s += ", +residual"
        if self.act is not None:
            s += f", act={self.act.describe()} [{self.act_name}]"
        return s


def _same_padding(m: nn.Conv2d) -> tuple[int, int, int, int]:
    pads = []
    for k, d in zip(m.kernel_size, m.dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return (*pads[0], *pads[1])


class DeltaConvTranspose2d(DeltaLayer):
    """Transposed convolution; computed densely on zero-filled deltas by the reference backend."""

    kind = "conv_transpose"

    def __init__(self, m: nn.ConvTranspose2d, name: str = "") -> None:
        super().__init__(name)
        if m.padding_mode != "zeros":
            raise NotImplementedError(f"conv_transpose {name!r}: padding_mode={m.padding_mode!r} is not supported")
        self.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False) if m.bias is not None else None
        self.stride, self.padding = tuple(m.stride), tuple(m.padding)
        self.output_padding, self.dilation, self.groups = tuple(m.output_padding), tuple(m.dilation), m.groups

    def _conv(self, x: Tensor, w: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        return F.conv_transpose2d(x, w, bias, self.stride, self.padding, self.output_padding, groups, self.dilation)

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        if d.dense:
            return self.record(DeltaTensor.keyframe(self._conv(d.values, self.weight, self.bias, self.groups)),
                               self.macs_per_pixel)
        kh, kw = self.weight.shape[2:]
        ones = torch.ones(1, 1, kh, kw, device=d.device)
        out = self.rt.backend_for(d.values).dense_linear(  # float32 math: the output feeds accumulators
            d, lambda x: self._conv(x.float(), self.weight.float(), None, self.groups),
            lambda m: self._conv(m.float(), ones, None, 1) > 0)
        return self.record(out, self.macs_per_pixel)

    @property
    def macs_per_pixel(self) -> int:
        # per output pixel, on average: every input pixel feeds kh*kw outputs spread over stride^2 positions
        cin, cout_g, kh, kw = self.weight.shape
        return max(1, cin // self.groups * cout_g * kh * kw // (self.stride[0] * self.stride[1]))
