"""CPU backend: the reference backend with its gathered conv stages fused in C++.

A sparse conv in the reference backend is ~35 small PyTorch ops (candidate mask, tap indices,
gathers, the nonlinear update, truncation, scatter); on a 2-core CPU their fixed costs take as
long as the GEMMs at 5% changed pixels. Here three of those stages are one C++ pass each
(cpu_kernels.cpp): candidate pixels, the tap gather, and the fused nonlinear update + emit; so
are the input layer's sparsify and max pooling.
Everything else, and every case the kernels do not cover (non-float32 deltas, activations other
than the piecewise-linear ones, input mask dilation), is the reference code, so semantics are the reference's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import Window
from ..tensor import DeltaTensor, new_rows_ext, rows, to_cl
from . import cpu_kernels
from .base import PointwiseState
from .reference import ReferenceBackend


_SCORES = {"max": 0, "l2": 1}


def _u8(mask: Tensor) -> Tensor:
    return mask.contiguous().view(torch.uint8).reshape(-1)


def _geometry(n: int, in_hw: tuple[int, int], out_hw: tuple[int, int], win: Window) -> list[int]:
    return [n, *in_hw, *out_hw, *win.kernel, *win.stride, *win.dilation, win.padding[0], win.padding[2]]


def _rows_f32(d: DeltaTensor) -> Tensor:
    """(>= N*H*W, C) row-contiguous float32 rows of a delta (its ext matrix when it has one)."""
    if d.ext is not None:
        return d.ext
    return rows(to_cl(d.values))


class FusedCpuBackend(ReferenceBackend):
    name = "cpu"

    def __init__(self, module) -> None:
        super().__init__()
        self._k = module

    def sparsify(self, x: Tensor, ref: Tensor, tau: float, score: str, dilation: int, dtype) -> DeltaTensor:
        if x.dtype != torch.float32 or dtype != torch.float32 or dilation > 1:
            return super().sparsify(x, ref, tau, score, dilation, dtype)
        n, c, h, w = x.shape
        ext, out = new_rows_ext(n, c, h, w, dtype=torch.float32, device=x.device)
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
        idx = self._k.sparsify(x, rows(ref), float(tau), _SCORES[score], ext, _u8(mask))
        return DeltaTensor(out, mask, _active=idx, ext=ext)

    def maxpool(self, d: DeltaTensor, acc: Tensor, emitted: Tensor, win: Window, tau: float, score: str) -> DeltaTensor:
        if d.dtype != torch.float32:
            return super().maxpool(d, acc, emitted, win, tau, score)
        n, c, h, w = d.shape
        out_hw = tuple(emitted.shape[2:])
        cand_idx, _ = self._candidates(d, win, out_hw)
        ext, out = new_rows_ext(n, c, *out_hw, dtype=torch.float32, device=d.device)
        mask = torch.zeros(n, 1, *out_hw, dtype=torch.bool)
        idx = self._k.maxpool_update(_rows_f32(d), d.active(), cand_idx, rows(acc), rows(emitted),
                                     _geometry(n, (h, w), out_hw, win), float(tau), _SCORES[score], ext, _u8(mask))
        return DeltaTensor(out, mask, _active=idx, ext=ext)

    def _candidates(self, d: DeltaTensor, win: Window, out_hw: tuple[int, int],
                    extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n, _, h, w = d.shape
        empty = torch.empty(0, dtype=torch.uint8)
        idx, cand = self._k.candidates(_u8(d.mask), _u8(extra) if extra is not None else empty,
                                       _geometry(n, (h, w), out_hw, win))
        return idx, cand.view(torch.bool).reshape(n, 1, *out_hw)

    def _taps(self, d: DeltaTensor, idx: Tensor, win: Window, out_hw: tuple[int, int]) -> Tensor:
        if d.dtype != torch.float32:
            return super()._taps(d, idx, win, out_hw)
        n, _, h, w = d.shape
        return self._k.gather_taps(_rows_f32(d), _u8(d.mask), idx, _geometry(n, (h, w), out_hw, win))

    def _act_rows(self, idx: Tensor, y: Tensor, residual: DeltaTensor | None, st: PointwiseState,
                  dtype) -> DeltaTensor:
        code = cpu_kernels.ACT_CODES.get(st.act.kind)
        if code is None or dtype != torch.float32 or y.dtype != torch.float32 or \
                (residual is not None and residual.dtype != torch.float32):
            return super()._act_rows(idx, y, residual, st, dtype)
        n, c, h, w = st.emitted.shape
        ext, out = new_rows_ext(n, c, h, w, dtype=torch.float32, device=y.device)
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
        a = st.act
        lo, hi = (0.0, 6.0) if a.kind == "relu6" else (a.min_val, a.max_val)
        empty = torch.empty(0, dtype=torch.uint8)
        idx_e = self._k.act_update(
            y.contiguous(), idx, _rows_f32(residual) if residual is not None else torch.empty(0, 0),
            _u8(residual.mask) if residual is not None else empty, rows(st.acc), rows(st.emitted),
            code, lo, hi, a.slope, float(st.tau), _SCORES[st.score], ext, mask.view(torch.uint8).reshape(-1))
        return DeltaTensor(out, mask, _active=idx_e, ext=ext)


def fused_cpu_backend() -> ReferenceBackend:
    """The fused CPU backend when its kernels build here, else the reference backend."""
    module = cpu_kernels.load()
    return FusedCpuBackend(module) if module is not None else ReferenceBackend()

