"""Triton GPU backend: sparse kernels for the hot ops, sync-free dense-masked PyTorch for the rest.

Everything here runs without a host synchronisation, so a whole delta frame can be captured in
a CUDA graph (deltacnn.compile). Semantics are the reference backend's; the kernels themselves
live in triton_kernels/ and are tested against plain PyTorch under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..activations import ActSpec
from ..geometry import Window
from ..tensor import Bordered, DeltaTensor, channel_view, to_cl
from . import triton_kernels as tk
from .triton_kernels._common import INTERPRET, is_cl
from .base import ConvParams, PointwiseState
from .syncfree import SyncFreeBackend


def _precision() -> str:
    """float32 GEMMs follow PyTorch's TF32 switch (exact 'ieee' when TF32 is off)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 else "ieee"


def _act(st: PointwiseState) -> tk.Act:
    return tk.Act.from_spec(st.act, st.acc, st.emitted, st.tau, st.score)


def _fused(spec: ActSpec) -> bool:
    """Whether the kernels apply this activation themselves (PReLU's per-channel slope: PyTorch path)."""
    return spec.kind != "prelu"


def _read_in_place(v: Tensor) -> Tensor:
    """A conv's (or add's) input values as sparse_conv2d and sparse_add read them: channels_last, or a channel
    slice of a channels_last map in place (channel_slice's views); anything else copied to channels_last."""
    return v if channel_view(v) else to_cl(v)


def _flat_alike(y: Tensor, residual: Tensor | None) -> bool:
    """y and the residual (if any) are channels_last blocks of one shape: one flat index reads both."""
    return is_cl(y) and (residual is None or (residual.shape == y.shape and is_cl(residual)))


class TritonBackend(SyncFreeBackend):
    name = "triton"
    host_sync_ok = False
    # compute each conv's candidate mask inside its tile-list launch; a switch only so that
    # benchmarks can measure both ways (same results)
    fuse_dilation = True
    # reuse one self-resetting tile counter per conv layer instead of zeroing a new one every call
    # (a switch only for benchmarks)
    persistent_counter = True
    # dense frames: each conv's bias + residual add + activation (+ keyframe state) in one pass
    # (seed_act) instead of PyTorch's separate passes; a switch only for benchmarks (same results)
    fuse_keyframe_seed = True
    # ... with the conv's bias added in that pass instead of by PyTorch after cuDNN (a switch for benchmarks)
    fuse_conv_bias = True
    # the input layer also writes a zero-filled, bordered copy of few-channel frames, from which convs
    # such as the RGB stem gather whole window rows without masks (a switch for benchmarks; same results)
    bordered_input = True
    # the small-blob input gate (min_blob) in the input layer's own kernels, and nearest upsampling of deltas in
    # a kernel of its own (switches for benchmarks; same results)
    fuse_blobs = True
    kernel_upsample = True
    # a delta's channel slice is a view that convs and adds read in place (a switch for benchmarks; same results)
    slice_views = True
    # YOLOv8's box decode (models.yolov8.DeltaBoxDecode) in triton_kernels.yolo_decode_, O += d folded in
    # (a switch for benchmarks; the PyTorch decode otherwise)
    kernel_decode = True
    # max pools after a nonlinear layer read its emitted state instead of accumulating their input
    # into a copy of it (a switch for benchmarks; same results)
    pool_reads_running_sum = True

    def sparsify(self, x: Tensor, ref: Tensor, tau: float, score: str, dilation: int, dtype,
                 scratch: dict | None = None) -> DeltaTensor:
        bordered = self._bordered_buffers(x, dtype, scratch)
        vals, mask = tk.sparsify(x, ref, tau, dilation, score, out_dtype=dtype,  # reads x in its layout
                                 bordered=bordered)
        return DeltaTensor(vals, mask, bordered=Bordered(bordered[0], bordered[2]) if bordered else None)

    def sparsify_blobs(self, x: Tensor, ref: Tensor, tau: float, score: str, k: int, dtype,
                       flush: list[bool] | None = None, scratch: dict | None = None,
                       want_held: bool = True) -> tuple[DeltaTensor, Tensor | None] | None:
        # three launches (score, erosion, dilation + send) instead of ~12 PyTorch ones; flushes and the held
        # fraction (a reduction the refresh rule alone reads) stay on the generic path
        if flush is not None or want_held or not self.fuse_blobs:
            return None
        bordered = self._bordered_buffers(x, dtype, scratch)
        vals, mask = tk.sparsify(x, ref, tau, 1, score, out_dtype=dtype, bordered=bordered, open_k=k)
        return DeltaTensor(vals, mask, bordered=Bordered(bordered[0], bordered[2]) if bordered else None), None

    def channel_slice(self, d: DeltaTensor, start: int, stop: int) -> DeltaTensor:
        # a view (C2f's halves): convs, adds and the YOLOv8 decode read it in place at its pixel stride; the
        # other kernels copy it through to_cl, and the PyTorch fallbacks read it as strided rows
        if not self.slice_views or not channel_view(d.values):
            return super().channel_slice(d, start, stop)
        return DeltaTensor(d.values[:, start:stop], d.mask, _active=d._active)

    def upsample_nearest(self, d: DeltaTensor, factors: tuple[int, int]) -> DeltaTensor | None:
        n, _, h, w = d.shape
        if not self.kernel_upsample or tuple(d.mask.shape) != (n, 1, h, w) or not d.mask.is_contiguous():
            return None  # broadcast or strided masks: the PyTorch form
        vals, mask = tk.upsample_nearest(to_cl(d.values), d.mask, factors)  # one launch, not ~6 PyTorch ones
        return DeltaTensor(vals, mask)

    def _bordered_buffers(self, x: Tensor, dtype: torch.dtype, scratch: dict | None):
        """The bordered copy (and its flags) this input layer keeps in `scratch`, for frames of few
        channels (the convs that read them: sparse_conv2d's `bordered`); None where not wanted."""
        n, c, h, w = x.shape
        if not self.bordered_input or scratch is None or not tk.bordered_fits(n, c, h, w) \
                or not (x.is_cuda or INTERPRET):
            return None
        key = (n, c, h, w, dtype, x.device)
        if scratch.get("bordered_key") != key:
            scratch["bordered"] = tk.bordered_like(n, c, h, w, dtype, x.device)
            scratch["bordered_key"] = key
        return scratch["bordered"]

    def accumulate(self, state: Tensor, d: DeltaTensor) -> None:
        tk.accumulate_(state, to_cl(d.values), d.mask)

    def conv2d(self, d: DeltaTensor, p: ConvParams) -> DeltaTensor:
        return self.conv_block(d, p, None, None)

    def conv_block(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None,
                   act: PointwiseState | None) -> DeltaTensor:
        if act is not None and not _fused(act.act):
            return super().conv_block(d, p, residual, act)
        win = p.window
        h, w = d.shape[2:]
        out_hw = win.out_size(h, w)
        # None: the tile-list launch dilates the input mask itself (one launch less per conv)
        out_mask = None if self.fuse_dilation else \
            tk.dilate_mask(d.mask, win.kernel, win.stride, win.padding, win.dilation, out_hw)
        x = _read_in_place(d.values)
        prepared = p.cached(f"triton_{x.dtype}", lambda: tk.prepare_weight(p.weight, p.groups, x.dtype))
        # this layer's tile counter, left zeroed by each call (no zeroing launch per frame)
        counter = p.cached(f"triton_counter_{x.device}", lambda: torch.zeros(2, dtype=torch.int32, device=x.device)) \
            if self.persistent_counter else None
        # a linear output feeds accumulators with no correction step: keep it float32 (see reference)
        out_dtype = p.weight.dtype if act is not None else torch.float32
        y, ym = tk.sparse_conv2d(
            x, d.mask, p.weight, out_mask, win.stride, win.padding, win.dilation, p.groups,
            residual=_read_in_place(residual.values) if residual is not None else None,
            residual_mask=residual.mask if residual is not None else None,
            act=_act(act) if act is not None else None, out_dtype=out_dtype, input_precision=_precision(),
            prepared=prepared, out_hw=out_hw, counter=counter, **self._window(d, p, out_hw))
        # E sums what this layer sent: the stream's dense value, which a max pool after it can read
        return DeltaTensor(y, ym, running_sum=act.emitted if act is not None else None)

    @staticmethod
    def _window(d: DeltaTensor, p: ConvParams, out_hw: tuple[int, int]) -> dict:
        """sparse_conv2d's window-row arguments where this conv can read d's bordered copy."""
        b = d.bordered
        plan = None if b is None else tk.window_plan(tuple(d.shape), tuple(p.weight.shape), p.window.stride,
                                                      p.window.padding, p.window.dilation, p.groups, out_hw, b)
        if plan is None:
            return {}
        dt = d.values.dtype
        w = p.cached(f"triton_window_{dt}_{plan}", lambda: tk.prepare_window_weight(p.weight, plan, dt))
        return {"bordered": b, "window_weight": w}

    def pointwise(self, d: DeltaTensor, st: PointwiseState) -> DeltaTensor:
        if not _fused(st.act):
            return super().pointwise(d, st)
        out, mask = tk.sparse_nonlinear(to_cl(d.values), d.mask, st.acc, st.emitted, _act(st))
        return DeltaTensor(out, mask, running_sum=st.emitted)

    def fuses_dense_act(self, x: Tensor) -> bool:
        return self.fuse_keyframe_seed and (x.is_cuda or INTERPRET)

    def seed_act(self, y: Tensor, residual: Tensor | None, acc: Tensor | None, emitted: Tensor | None,
                 act: ActSpec, bias: Tensor | None = None) -> bool:
        if not self.fuses_dense_act(y) or not _fused(act) or not _flat_alike(y, residual):
            return False
        tk.seed_act_state_(y, residual, acc, emitted, tk.Act.from_spec(act, acc, emitted, 0.0), bias)
        return True

    def fuses_conv_bias(self, x: Tensor) -> bool:
        # CUDA only: there PyTorch too adds the bias after cuDNN, so the result is bit for bit the same
        # (oneDNN on the CPU adds it inside the conv's accumulation)
        return self.fuse_conv_bias and x.is_cuda and self.fuses_dense_act(x)

    def maxpool(self, d: DeltaTensor, acc: Tensor, emitted: Tensor, win: Window, tau: float, score: str) -> DeltaTensor:
        if self.pool_reads_running_sum and d.running_sum is not None and d.running_sum.shape == acc.shape:
            # the producer's E is, bit for bit, what acc would hold after accumulating this delta (both
            # add the same rounded values to the same keyframe seed): read it, skip the accumulation.
            # A layer's producer is the same every delta frame, so acc is either always or never used.
            acc = d.running_sum
        else:
            tk.accumulate_(acc, to_cl(d.values), d.mask)
        out_hw = tuple(emitted.shape[2:])
        cand = tk.dilate_mask(d.mask, win.kernel, win.stride, win.padding, win.dilation, out_hw)
        out, mask = tk.maxpool_update(acc, cand, emitted, win.kernel, win.stride, win.padding, win.dilation, tau,
                                      score, out_dtype=d.dtype)
        return DeltaTensor(out, mask)

    def cat(self, ds: list[DeltaTensor]) -> DeltaTensor:
        """Channel concatenation of deltas in one launch (sparse_cat) instead of PyTorch's where per input,
        OR per mask and cat (~3 launches per input); same results."""
        n, _, h, w = ds[0].shape
        if any(tuple(d.mask.shape) != (n, 1, h, w) or d.shape[0] != n or
                                    tuple(d.shape[2:]) != (h, w) for d in ds):
            return super().cat(ds)  # broadcast masks: the PyTorch form
        out, mask = tk.sparse_cat([to_cl(d.values) for d in ds], [d.mask.contiguous() for d in ds])
        return DeltaTensor(out, mask)

    def add(self, a: DeltaTensor, b: DeltaTensor) -> DeltaTensor:
        if a.shape != b.shape:
            raise ValueError(f"delta add needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        out, mask = tk.sparse_add(_read_in_place(a.values), a.mask, _read_in_place(b.values), b.mask)
        return DeltaTensor(out, mask)
