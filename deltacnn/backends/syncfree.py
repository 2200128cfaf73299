"""Dense-masked PyTorch delta ops that never synchronise with the host.

Every op here works on whole dense-shaped tensors with masks (torch.where), never on index
lists, so no result size depends on the data: a frame built from them can be captured in a
CUDA graph. They cost a dense memory pass per op; the Triton backend subclasses this and
replaces the expensive ones (convolutions, activations, add) with sparse kernels, keeping these
as the correct, capturable fallback for the rest. Runs on CPU too, which is how CI checks it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..geometry import Window, dilate_mask
from ..tensor import DeltaTensor, to_cl
from .base import ConvParams, PointwiseState
from .reference import ReferenceBackend


def _score(o: Tensor, score: str) -> Tensor:
    """Per-pixel truncation score over channels of an (N, C, H, W) tensor, as (N, 1, H, W)."""
    if score == "max":
        return o.abs().amax(1, keepdim=True)
    return torch.linalg.vector_norm(o, dim=1, keepdim=True)


def _zero(like: Tensor) -> float:
    """The `other` of a masked where: a Python 0 (a 0-d device tensor would cost a fill launch per call)."""
    return 0.0


class SyncFreeBackend(ReferenceBackend):
    name = "syncfree"
    host_sync_ok = False

    def sparsify(self, x: Tensor, ref: Tensor, tau: float, score: str, dilation: int, dtype,
                 scratch: dict | None = None) -> DeltaTensor:
        d = x.float() - ref
        mask = _score(d, score) > tau
        if dilation > 1:
            mask = dilate_mask(mask, Window.make(dilation, 1, dilation // 2), tuple(x.shape[2:]))
        sent = d.to(dtype)
        ref.add_(torch.where(mask, sent.float(), _zero(ref)))
        return DeltaTensor(to_cl(sent), mask)

    def accumulate(self, state: Tensor, d: DeltaTensor) -> None:
        state.add_(torch.where(d.mask, d.values.float(), _zero(state)))

    def conv2d(self, d: DeltaTensor, p: ConvParams) -> DeltaTensor:
        h, w = d.shape[2:]
        out_mask = dilate_mask(d.mask, p.window, p.window.out_size(h, w))
        t, b, l, r = p.window.padding
        acc = torch.promote_types(p.weight.dtype, torch.float32)  # see ReferenceBackend._conv_rows
        y = F.conv2d(F.pad(d.zero_filled().to(acc), (l, r, t, b)), p.weight.to(acc), None, p.window.stride, 0, p.window.dilation,
                     p.groups)
        return DeltaTensor(to_cl(y), out_mask)

    def conv_block(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None,
                   act: PointwiseState | None) -> DeltaTensor:
        y = self.conv2d(d, p)
        if residual is not None:
            y = self.add(y, residual)
        return self.pointwise(y, act) if act is not None else y

    def _emit_dense(self, cand: Tensor, o: Tensor, emitted: Tensor, tau: float, score: str, dtype) -> DeltaTensor:
        emit = cand & (_score(o, score) > tau)
        sent = o.to(dtype)
        emitted.add_(torch.where(emit, sent.float(), _zero(emitted)))
        return DeltaTensor(to_cl(sent), emit)

    def pointwise(self, d: DeltaTensor, st: PointwiseState) -> DeltaTensor:
        st.acc.add_(torch.where(d.mask, d.values.float(), _zero(st.acc)))
        o = st.act(st.acc) - st.emitted
        return self._emit_dense(d.mask, o, st.emitted, st.tau, st.score, d.dtype)

    def maxpool(self, d: DeltaTensor, acc: Tensor, emitted: Tensor, win: Window, tau: float, score: str) -> DeltaTensor:
        acc.add_(torch.where(d.mask, d.values.float(), _zero(acc)))
        cand = dilate_mask(d.mask, win, tuple(emitted.shape[2:]))
        t, b, l, r = win.padding
        pooled = F.max_pool2d(F.pad(acc, (l, r, t, b), value=float("-inf")), win.kernel, win.stride, 0, win.dilation,
                              win.ceil_mode)[..., : emitted.shape[2], : emitted.shape[3]]
        return self._emit_dense(cand, pooled - emitted, emitted, tau, score, d.dtype)

    def mul(self, a: DeltaTensor, b: DeltaTensor, acc_a: Tensor, acc_b: Tensor, emitted: Tensor,
            tau: float, score: str) -> DeltaTensor:
        acc_a.add_(torch.where(a.mask, a.values.float(), _zero(acc_a)))
        acc_b.add_(torch.where(b.mask, b.values.float(), _zero(acc_b)))
        n, _, h, w = emitted.shape
        cand = a.mask.expand(n, 1, h, w) | b.mask.expand(n, 1, h, w)
        return self._emit_dense(cand, acc_a * acc_b - emitted, emitted, tau, score, a.dtype)

    def add(self, a: DeltaTensor, b: DeltaTensor) -> DeltaTensor:
        if a.shape != b.shape:
            raise ValueError(f"delta add needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        return DeltaTensor(to_cl(a.zero_filled() + b.zero_filled()), a.mask | b.mask)

    def cat(self, ds: list[DeltaTensor]) -> DeltaTensor:
        mask = ds[0].mask
        for d in ds[1:]:
            mask = mask | d.mask
        return DeltaTensor(to_cl(torch.cat([d.zero_filled() for d in ds], 1)), mask)

    def scale(self, d: DeltaTensor, scale: Tensor) -> DeltaTensor:
        s = scale.to(d.dtype)
        return DeltaTensor(d.values * (s.reshape(1, -1, 1, 1) if s.numel() > 1 else s), d.mask)

    def dense_linear(self, d: DeltaTensor, fn: Callable[[Tensor], Tensor], mask_fn: Callable[[Tensor], Tensor]) -> DeltaTensor:
        return DeltaTensor(to_cl(fn(d.zero_filled())), mask_fn(d.mask))

    def global_avg_pool(self, d: DeltaTensor) -> DeltaTensor:
        n = d.shape[0]
        vals = d.zero_filled().float().mean((2, 3), keepdim=True).to(d.dtype)
        return DeltaTensor(to_cl(vals), d.mask.reshape(n, -1).any(1).reshape(n, 1, 1, 1))
