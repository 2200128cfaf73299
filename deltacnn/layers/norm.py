"""Normalisation over each pixel's channel vector (LayerNorm of ConvNeXt and channels-last blocks).

LayerNorm over channels is nonlinear in the whole channel vector but independent per pixel, so
it works like a pointwise nonlinearity: keep the accumulated input A and the last emitted output
E per pixel; on a delta frame A += d at updated pixels, o = LN(A) - E there, truncated by the
pixel's score over channels, and E += o where sent. Truncated change stays in LN(A) - E and is
sent later, so nothing drifts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import truncation_score
from ..tensor import DeltaTensor, empty_delta, new_rows_ext, rows
from .base import DeltaLayer, check_delta


class DeltaLayerNorm(DeltaLayer):
    """LayerNorm over the channels of each pixel of an (N, C, H, W) stream (optional affine)."""

    kind = "layer_norm"

    def __init__(self, channels: int, weight: Tensor | None, bias: Tensor | None, eps: float, name: str = "") -> None:
        super().__init__(name)
        self.channels, self.eps = channels, float(eps)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def norm_rows(self, a: Tensor) -> Tensor:
        """LayerNorm of (P, C) rows, in float32."""
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(a.float(), (self.channels,), w, b, self.eps)

    def dense(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return self.norm_rows(x.permute(0, 2, 3, 1).reshape(-1, c)).reshape(n, h, w, c).permute(0, 3, 1, 2)

    def forward(self, d: DeltaTensor) -> DeltaTensor:
        d = check_delta(d, self)
        rt = self.rt
        if d.shape[1] != self.channels:
            raise ValueError(f"layer_norm {self.name!r}: expected {self.channels} channels, got {d.shape[1]}")
        if d.dense:
            if rt.stateless:
                return self.record(DeltaTensor.keyframe(self.dense(d.values).to(rt.dtype)))
            self._seed_state("acc", d.values)
            out = self.dense(self._state("acc")).to(rt.dtype)
            self._seed_state("emitted", out)
            return self.record(DeltaTensor.keyframe(out))
        acc, emitted = self._state("acc"), self._state("emitted")
        idx = d.active()
        n, c, h, w = d.shape
        if idx.numel() == 0:
            return self.record(empty_delta(n, c, h, w, dtype=d.dtype, device=d.device))
        a_rows = rows(acc)
        a = a_rows.index_select(0, idx) + d.rows().index_select(0, idx).float()
        a_rows.index_copy_(0, idx, a)
        o = self.norm_rows(a) - rows(emitted).index_select(0, idx)
        kept = torch.nonzero(truncation_score(o, rt.thresholds.score) > self.tau()).squeeze(1)
        idx_e, sent = idx.index_select(0, kept), o.index_select(0, kept).to(rt.dtype)
        rows(emitted).index_add_(0, idx_e, sent.float())
        ext, values = new_rows_ext(n, c, h, w, dtype=sent.dtype, device=d.device)
        ext.index_copy_(0, idx_e, sent)
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool, device=d.device)
        mask.view(-1).index_fill_(0, idx_e, True)
        return self.record(DeltaTensor(values, mask, _active=idx_e, ext=ext))

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, affine={self.weight is not None}"
