"""CPU backend: the reference backend with its gathered conv stages fused in C++.

A sparse conv in the reference backend is ~35 small PyTorch ops (candidate mask, tap indices,
gathers, the GEMM, the nonlinear update, truncation, scatter). Here a conv (groups 1 or depthwise,
float32, on a CPU with AVX2 + FMA) is one C++ pass (cpu_kernels.cpp): an implicit GEMM that reads
each output pixel's taps in place, skips taps with no update, and runs the nonlinear update
(A += y, f, truncation, emit) in its epilogue, SiLU and sigmoid included (a vectorised exp, a few
ulp from ATen's). It beat the tap gather + MKL matmul 1.4-2.3x per layer and oneDNN's dense conv
even at 97% candidates, so such convs never switch to the dense conv. Candidates, the input
layer's sparsify, max pooling, stream adds, concatenations and channel slices are C++ passes too.
Activations outside the epilogue's set keep their ATen op between two C++ stages (accumulate;
truncate + emit), bit-identical to the reference. Every case the kernels do not cover (non-float32
deltas, grouped convs, input mask dilation, no AVX2) is the reference code, so the semantics are
the reference's.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import SCORE_CODES, ActSpec
from ..geometry import Window
from ..tensor import DeltaTensor, new_cl, rows, to_cl
from . import cpu_kernels
from . import reference as _reference
from .base import ConvParams, PointwiseState
from .reference import ReferenceBackend

# Candidate fraction above which a groups-1 conv runs densely (oneDNN on the zero-filled delta, then the
# C++ update): 1.0 = never. The implicit GEMM skips empty taps and needs no zero-filled copy or
# separate update pass, so it beat the dense conv even at 97% candidates (YOLOv8n at tau 0, 1 thread:
# 386 against 447 ms a frame). Depthwise and other convs keep reference.DENSE_SWITCH.
GEMM_DENSE_SWITCH = 1.0
# (Each fast path below has one capability check, a method named *_ok or fuses_*; the benchmarks'
# A/B runs, benchmarks/cpu_profile.py --variants, switch a path off by patching that check.)
# activation codes of conv_act_rows: the piecewise-linear ones of act_update, plus SiLU and sigmoid
# with a vectorised exp (a few ulp from ATen's: close, not bit-identical)
EPILOGUE_CODES = {**cpu_kernels.ACT_CODES, "silu": 4, "sigmoid": 5}
# conv_dense reads a window row's kw taps as one run of kw * Cin values when the input's pixels are
# contiguous; a channel view (a keyframe's C2f half) has strided pixels and is read tap by tap, which
# costs nothing at Cin >= 32 but ~7% at Cin 16 (YOLOv8n's 16-channel 3x3 conv at 144x192, 1 thread:
# 6.2 against 5.8 ms with the copy): below this width dense_conv copies the view first.
RUNS_CIN = 32
PANEL = 16  # output channels per weight panel of conv_rows (GEMM_NR in cpu_kernels.cpp)
DW_MAX_TAPS = 49  # depthwise_rows' largest window (7 x 7; DW_MAX_TAPS in cpu_kernels.cpp)
# dense-frame conv outputs of at least this many bytes come from the backend's pool of free buffers (_dense_out);
# smaller ones from malloc's free lists, without page faults
DENSE_OUT_KEEP = 1 << 20


def packed_weights(w: Tensor) -> Tensor:
    """conv_rows' weight layout: the (taps * Cin, Cout) GEMM matrix (tap-major, as the tap gather
    orders its rows) in panels of 16 output channels, zero-padded: (ceil(Cout / 16), taps * Cin, 16)."""
    cout = w.shape[0]
    wm = w.float().permute(2, 3, 1, 0).reshape(-1, cout)
    panels = -(-cout // PANEL)
    wm = F.pad(wm, (0, panels * PANEL - cout))
    return wm.reshape(wm.shape[0], panels, PANEL).permute(1, 0, 2).contiguous()


def _geometry(n: int, in_hw: tuple[int, int], out_hw: tuple[int, int], win: Window) -> list[int]:
    return [n, *in_hw, *out_hw, *win.kernel, *win.stride, *win.dilation, win.padding[0], win.padding[2]]


def _rows(d: DeltaTensor) -> Tensor:
    """float32 rows of a delta for the kernels: its ext matrix, else its channels_last values."""
    if d.parts is not None:
        raise RuntimeError("a cat read in place has no rows of its own: only its 1x1 conv reads it (conv_block)")
    return d.ext if d.ext is not None else to_cl(d.values)


def _delta(result: list[Tensor]) -> DeltaTensor:
    """A DeltaTensor from a kernel's [indices, ext, values, mask]."""
    idx, ext, values, mask = result
    return DeltaTensor(values, mask, _active=idx, ext=ext)


def _pointwise(win: Window) -> bool:
    """A 1x1 window of stride 1 without padding: output pixel i reads input pixel i alone, so the
    candidates of a conv are its input's updated pixels (no dilation pass)."""
    return win.kernel == (1, 1) and win.stride == (1, 1) and not any(win.padding)


def _depthwise(d: DeltaTensor, p: ConvParams) -> bool:
    """One filter per channel, as many outputs as inputs (MobileNet-style depthwise convs), a window that
    depthwise_rows takes."""
    return _depthwise_of(d.shape[1], p) and p.window.taps <= DW_MAX_TAPS


def _depthwise_of(channels: int, p: ConvParams) -> bool:
    """_depthwise for an input of `channels` channels."""
    return p.groups == channels == p.weight.shape[0] and p.weight.shape[1] == 1


def _clamp_range(a: ActSpec | None) -> tuple[float, float]:
    """(lo, hi) the kernels clamp activation a to (relu6: 0..6; None: unused zeros)."""
    if a is None:
        return 0.0, 0.0
    return (0.0, 6.0) if a.kind == "relu6" else (a.min_val, a.max_val)


def _epilogue_args(a: ActSpec | None) -> tuple[int, float, float, float]:
    """(code, lo, hi, slope) of activation a in the kernels' epilogue (EPILOGUE_CODES; None: identity)."""
    if a is None:
        return 0, 0.0, 0.0, 0.0
    return (EPILOGUE_CODES[a.kind], *_clamp_range(a), a.slope)


class _ConvCall(NamedTuple):
    """conv_block's one call for one layer, input size and activation: the kernel's bound `run` (None:
    not covered) and what the Python around it needs, found once instead of on every frame."""

    in_shape: torch.Size
    act: ActSpec | None
    run: Callable | None
    run_cat: Callable | None  # run on a cat's parts read in place (1x1 convs with f in the epilogue; else None)
    pointwise: bool  # 1x1, stride 1, no padding: the candidates are the input's pixels (without a residual)
    depthwise: bool  # the dense crossover is reference.DENSE_SWITCH's (groups 1: GEMM_DENSE_SWITCH)
    per_pixel: int  # the weight's numel: _count's multiply-adds per output pixel
    total: int  # output pixels
    out_shape: tuple[int, int, int, int]


def _depthwise_weights(p: ConvParams) -> Tensor:
    """depthwise_rows' weights: (taps, C), tap-major as the tap gather orders them."""
    return p.cached("cpu_dw", lambda: p.weight.float().reshape(p.weight.shape[0], -1).t().contiguous())


class FusedCpuBackend(ReferenceBackend):
    name = "cpu"

    def __init__(self, module) -> None:
        super().__init__()
        self._k = module
        self._gemm = bool(module.has_conv_rows())  # AVX2 + FMA: the implicit-GEMM conv runs here
        self._pool: dict[tuple[int, ...], list[Tensor]] = {}  # _dense_out's buffers by shape
        self._pool_lock = threading.Lock()  # (models in other threads may share this backend)

    def sparsify(self, x: Tensor, ref: Tensor, tau: float, score: str, dilation: int, dtype,
                 scratch: dict | None = None) -> DeltaTensor:
        if x.dtype != torch.float32 or dtype != torch.float32 or dilation > 1:
            return super().sparsify(x, ref, tau, score, dilation, dtype)
        return _delta(self._k.sparsify(x, ref, float(tau), SCORE_CODES[score], self._output_buffer(scratch)))

    def _output_buffer(self, scratch: dict | None):
        """The input layer's kept output (cpu_kernels.OutputBuffer: its delta's memory again on the next frame,
        not fresh pages), in the layer's scratch; None without one."""
        if scratch is None:
            return None
        buf = scratch.get("cpu_out")
        if buf is None or not isinstance(buf, self._k.OutputBuffer):  # (another kernel build's: benchmarks)
            buf = scratch["cpu_out"] = self._k.OutputBuffer()
        return buf

    def _blobs_ok(self, x: Tensor, dtype) -> bool:
        """sparsify_blobs in C++: float32 frames and deltas."""
        return x.dtype == torch.float32 and dtype == torch.float32

    def sparsify_blobs(self, x: Tensor, ref: Tensor, tau: float, score: str, k: int, dtype,
                       flush: list[bool] | None = None, scratch: dict | None = None,
                       want_held: bool = True) -> tuple[DeltaTensor, Tensor | None] | None:
        if not self._blobs_ok(x, dtype):
            return None
        rows_flushed = torch.tensor(flush, dtype=torch.bool) if flush is not None and any(flush) else None
        *d, held = self._k.sparsify_blobs(x, ref, float(tau), SCORE_CODES[score], k, rows_flushed,
                                          self._output_buffer(scratch))
        return _delta(d), held

    def _range_ok(self, x: Tensor) -> bool:
        """frame_range in C++: float32 frames whose images are contiguous blocks (NCHW or channels_last)."""
        return x.dtype == torch.float32 and (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(
            memory_format=torch.channels_last)))

    def changed_fraction(self, x: Tensor, ref: Tensor, tau: float, score: str) -> Tensor:
        # sparsify's score pass without the send: one pass over the frame instead of ~6 PyTorch ones (~1 ms a
        # YOLOv8n keyframe at 576x768)
        if x.dtype != torch.float32 or x.dim() != 4 or ref.dtype != torch.float32 or ref.shape != x.shape or \
                not ref.is_contiguous(memory_format=torch.channels_last):
            return super().changed_fraction(x, ref, tau, score)
        return self._k.changed_fraction(x, ref, float(tau), SCORE_CODES[score])

    def frame_range(self, x: Tensor) -> tuple[list[float], list[float]]:
        if not self._range_ok(x):
            return super().frame_range(x)
        lo, hi = self._k.frame_range(x)
        return lo.tolist(), hi.tolist()

    def maxpool(self, d: DeltaTensor, acc: Tensor, emitted: Tensor, win: Window, tau: float, score: str) -> DeltaTensor:
        if d.dtype != torch.float32:
            return super().maxpool(d, acc, emitted, win, tau, score)
        n, _, h, w = d.shape
        out_hw = tuple(emitted.shape[2:])
        cand_idx, _ = self._candidates(d, win, out_hw)
        return _delta(self._k.maxpool_update(_rows(d), d.active(), cand_idx, acc, emitted,
                                             _geometry(n, (h, w), out_hw, win), float(tau), SCORE_CODES[score]))

    def _candidates(self, d: DeltaTensor, win: Window, out_hw: tuple[int, int],
                    extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n, _, h, w = d.shape
        idx, mask = self._k.candidates(d.mask, extra, _geometry(n, (h, w), out_hw, win))
        return idx, mask  # the C++ returns a list

    def _taps(self, d: DeltaTensor, idx: Tensor, win: Window, out_hw: tuple[int, int]) -> Tensor:
        if d.dtype != torch.float32:
            return super()._taps(d, idx, win, out_hw)
        n, _, h, w = d.shape
        return self._k.gather_taps(_rows(d), d.mask, idx, _geometry(n, (h, w), out_hw, win))

    def _implicit_gemm_ok(self, d: DeltaTensor, p: ConvParams) -> bool:
        """Groups 1 (conv_rows / conv_act_rows) or depthwise (depthwise_rows), float32, AVX2 here."""
        return self._gemm and (p.groups == 1 or _depthwise(d, p)) and d.dtype == torch.float32 \
            and p.weight.dtype == torch.float32

    def _dense_fraction(self, d: DeltaTensor, p: ConvParams) -> float:
        from . import reference
        # depthwise convs keep the dense crossover: only groups-1 convs were measured against oneDNN
        return GEMM_DENSE_SWITCH if p.groups == 1 and self._implicit_gemm_ok(d, p) else reference.DENSE_SWITCH

    def _conv_rows_chunked(self, d: DeltaTensor, p: ConvParams, idx: Tensor, out_hw: tuple[int, int]) -> Tensor:
        if self._implicit_gemm_ok(d, p):  # no tap matrix to bound: one pass over all pixels
            return self._conv_rows(d, p, idx, out_hw)
        return super()._conv_rows_chunked(d, p, idx, out_hw)

    def _conv_rows(self, d: DeltaTensor, p: ConvParams, idx: Tensor, out_hw: tuple[int, int]) -> Tensor:
        if not self._implicit_gemm_ok(d, p):
            return super()._conv_rows(d, p, idx, out_hw)
        n, _, h, w = d.shape
        geo = _geometry(n, (h, w), out_hw, p.window)
        if p.groups > 1:
            return self._k.depthwise_rows(_rows(d), d.mask, idx, _depthwise_weights(p), geo, None, None, None, None,
                                          0, 0.0, 0.0, 0.0, 0.0, 0)[0]
        packed = p.cached("cpu_panels", lambda: packed_weights(p.weight))
        return self._k.conv_rows(_rows(d), d.mask, idx, packed, p.weight.shape[0], geo)

    def fuses_dense_conv(self, x: Tensor) -> bool:
        # the C++ pass reads data pointers, which Dynamo cannot trace: under torch.compile (deltacnn.compile's
        # keyframe passes) the layers run their plain PyTorch path, which Inductor fuses
        return self._gemm and x.dtype == torch.float32 and not torch.compiler.is_compiling()

    def reads_channel_views(self, x: Tensor) -> bool:
        # conv_dense reads pixels at any stride (dense_conv copies only where its window-row runs need
        # contiguous pixels); cat, add and the rest of a keyframe are ATen ops on any layout
        return self.fuses_dense_conv(x)

    def _dense_conv_ok(self, x: Tensor, p: ConvParams, bias: Tensor | None, residual: Tensor | None,
                       act: ActSpec | None) -> bool:
        """conv_dense (groups 1) or depthwise_dense: float32 throughout, an activation of the epilogue (or none).
        A depthwise conv's dense frame is one C++ pass (the conv, bias, residual, f and the keyframe's A and E), not
        ATen's grouped conv then the activation and two state copies (CenterFace's 96- and 144-channel maps at
        288 x 384 and 144 x 192 are 10-42 MB each)."""
        return self.fuses_dense_conv(x) and (act is None or act.kind in EPILOGUE_CODES) \
            and (p.groups == 1 or _depthwise_of(x.shape[1], p)) \
            and p.weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32) \
            and (residual is None or residual.dtype == torch.float32)

    def _dense_out(self, shape: tuple[int, int, int, int]) -> Tensor:
        """A dense conv's output buffer where it is no state (stateless dense frames; convs without f): for maps of
        DENSE_OUT_KEEP bytes and more, a free buffer of that shape from the backend's pool (no Python reference but
        the pool's, no view, no C++ handle: sole_owner), the one handed out last first (the likeliest in cache),
        else a new one added to the pool. CenterFace's dense frames otherwise touch ~20k fresh pages (a 96-channel
        map at 288 x 384 is 42 MB, above glibc's largest mmap threshold), a page fault each (~2 us here). The pool
        holds at most as many buffers of a shape as were in use at once, for the backend's life (the largest dense
        frame's working set of any model run on it, kept after the model is gone)."""
        if 4 * shape[0] * shape[1] * shape[2] * shape[3] < DENSE_OUT_KEEP:
            return new_cl(*shape, dtype=torch.float32, device="cpu")
        with self._pool_lock:
            bufs = self._pool.setdefault(shape, [])
            for i in range(len(bufs) - 1, -1, -1):
                buf = bufs[i]
                if sys.getrefcount(buf) == 3 and self._k.sole_owner(buf):  # refs: the list, buf, the argument
                    bufs.append(bufs.pop(i))
                    return buf
            # (not new_cl's permuted view: under no_grad a view keeps its base, a second holder of the storage)
            buf = torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last)
            bufs.append(buf)
            return buf

    def dense_conv(self, x: Tensor, p: ConvParams, bias: Tensor | None, residual: Tensor | None,
                   act: ActSpec | None, state: Callable[[tuple[int, ...]], tuple[Tensor, Tensor]] | None,
                   parts: tuple[Tensor, ...] | None = None) -> Tensor | None:
        if not self._dense_conv_ok(x, p, bias, residual, act):
            return None
        if parts is not None and (p.groups != 1 or not _pointwise(p.window)
                                  or any(q.dtype != torch.float32 or q.stride(1) != 1 for q in parts)):
            return None  # conv_dense reads a cat's parts for 1x1 convs only (the layer builds the cat)
        code = 0 if act is None else EPILOGUE_CODES[act.kind]
        n, _, h, w = x.shape
        cout = p.weight.shape[0]
        ho, wo = p.window.out_size(h, w)
        shape = (n, cout, ho, wo)
        if residual is not None and tuple(residual.shape) != shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match conv output {shape}")
        # on keyframes the output is E itself (E = f(A) as sent): one map written fewer
        acc, out = state(shape) if state is not None else (None, self._dense_out(shape))
        lo, hi = _clamp_range(act)
        if p.groups > 1:  # depthwise (_dense_conv_ok)
            self._k.depthwise_dense(to_cl(x) if x.stride(1) != 1 else x, _depthwise_weights(p), bias,
                                    _geometry(n, (h, w), (ho, wo), p.window),
                                    to_cl(residual) if residual is not None else None, out, acc, None, code, lo, hi,
                                    act.slope if act is not None else 0.0)
            return out
        packed = p.cached("cpu_panels", lambda: packed_weights(p.weight))
        if parts is not None:  # the cat's parts read in place (x is a placeholder, not read)
            x = parts[0]
        elif x.stride(1) != 1 or (p.window.kernel[1] > 1 and x.shape[1] < RUNS_CIN and x.stride(3) != x.shape[1]):
            x = to_cl(x)  # channels contiguous; and a narrow channel view contiguous, for the runs
        if x.stride(1) != 1 and x.shape[1] == 1:  # one channel: channels_last in memory whatever its stride says
            x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
        self._k.conv_dense(x, packed, bias,
                           _geometry(n, (h, w), (ho, wo), p.window), to_cl(residual) if residual is not None else None,
                           out, acc, None, code, lo, hi, act.slope if act is not None else 0.0, list(parts or ()))
        return out

    def conv_block(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None,
                   act: PointwiseState | None) -> DeltaTensor:
        """A delta conv in one C++ call (DeltaConvPlan.run in cpu_kernels.cpp: candidates, the implicit GEMM
        or depthwise conv, the update or the residual add, the output delta), its static arguments (weights,
        geometry, activation) kept per input size in p's cache as a `_ConvCall`. The convs it covers: groups 1
        or depthwise, float32, f in the epilogue (or none: a linear conv, with or without a residual; depthwise
        only with f), below the dense crossover. The rest, and the dense side of the crossover, run the
        multi-call path (_conv_block_calls); what the kernels compute is the same. An input that is a cat read
        in place (d.parts, cat_in_place) runs DeltaConvPlan.run_cat on its parts, else its cat is built first."""
        if d.parts is not None:
            out = self._one_call(d, p, residual, act, cat=True)
            if out is not None:
                return out
            d = self.cat(list(d.parts))  # not covered on the parts: the cat's rows after all
        out = self._one_call(d, p, residual, act)
        return out if out is not None else self._conv_block_calls(d, p, residual, act)

    def _one_call(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None, act: PointwiseState | None,
                  cat: bool = False) -> DeltaTensor | None:
        """conv_block's one call (with `cat`, run_cat on d's parts); None: not covered (the caller falls back)."""
        if not self._one_call_ok(d, residual):
            return None
        spec = act.act if act is not None else None
        call = p.cache.get("cpu_call")
        if call is None or call.in_shape != d.values.shape or call.act is not spec:
            call = p.cache["cpu_call"] = self._conv_call(d, p, spec)
        run = call.run_cat if cat else call.run
        if run is None:
            return None
        if residual is None:
            res = res_mask = None
            cand = d.active() if call.pointwise else None  # a 1x1 conv's candidates: its input's pixels
        else:
            if residual.values.shape != call.out_shape:
                raise ValueError(f"residual shape {tuple(residual.shape)} does not match conv output {call.out_shape}")
            res, res_mask, cand = _rows(residual), residual.mask, None
        switch = _reference.DENSE_SWITCH if call.depthwise else GEMM_DENSE_SWITCH
        dense_above = -1 if switch >= 1.0 else int(switch * call.total)
        src = ([_rows(q) for q in d.parts], [q.mask for q in d.parts], d.mask) if cat else (_rows(d), d.mask)
        if act is None:
            out, count = run(*src, cand, res, res_mask, None, None, 0.0, 0, dense_above)
        else:
            out, count = run(*src, cand, res, res_mask, act.acc, act.emitted, float(act.tau),
                             SCORE_CODES[act.score], dense_above)
        if not out:  # above the crossover: the dense conv (the candidates are found again, on a dense layer)
            return None
        work = self.work  # _count's rule (no per-stream count: _one_call_ok)
        work[0] += count * call.per_pixel
        work[1] += call.total * call.per_pixel
        idx, ext, values, mask = out
        return DeltaTensor(values, mask, _active=idx, ext=ext)

    def _one_call_ok(self, d: DeltaTensor, residual: DeltaTensor | None) -> bool:
        """conv_block's one call: float32 deltas, and no per-stream work count (it needs the candidates)."""
        return d.values.dtype == torch.float32 and (residual is None or residual.values.dtype == torch.float32) \
            and self.work_streams is None

    def _conv_call(self, d: DeltaTensor, p: ConvParams, spec: ActSpec | None) -> "_ConvCall":
        """The static part of conv_block's one call for input d's size and activation `spec` (run None:
        not covered here)."""
        n, _, h, w = d.values.shape
        out_hw = p.window.out_size(h, w)
        cout = p.weight.shape[0]
        depthwise = p.groups > 1 and _depthwise(d, p)
        run = run_cat = None
        if self._gemm and p.weight.dtype == torch.float32 and (p.groups == 1 or depthwise) and \
                (spec.kind in EPILOGUE_CODES if spec is not None else not depthwise):
            weights = _depthwise_weights(p) if depthwise else p.cached("cpu_panels", lambda: packed_weights(p.weight))
            code, lo, hi, slope = _epilogue_args(spec)
            # reuse: the plan keeps its last output ext and writes the next output into it once no one holds it
            # (one more map of the conv's output size kept between frames, besides A and E, against a page fault
            # per 4 KB of fresh memory its rows touch: ~13 ms of a CenterFace delta frame at 8/0.2, whose 42 MB
            # maps glibc returns to the system on every free)
            plan = self._k.DeltaConvPlan(weights, _geometry(n, (h, w), out_hw, p.window), cout, depthwise, code,
                                         lo, hi, slope, True)
            run = plan.run
            if spec is not None and not depthwise and _pointwise(p.window):  # a cat's parts read in place
                run_cat = plan.run_cat
        return _ConvCall(d.values.shape, spec, run, run_cat, _pointwise(p.window), depthwise, p.weight.numel(),
                         n * out_hw[0] * out_hw[1], (n, cout, *out_hw))

    def _conv_block_calls(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None,
                          act: PointwiseState | None) -> DeltaTensor:
        """The reference's conv_block, with its most common case (groups 1, f in conv_act_rows' epilogue,
        some candidates) in one Python frame: the geometry and weight panels of an input size are kept
        in p's cache, and the chain of hooks (candidates, crossover, epilogue) that cost ~75 us of
        Python a conv at 1 thread is skipped; what the kernels compute is the same."""
        if not self._one_frame_block_ok(d, p, residual, act):
            return super().conv_block(d, p, residual, act)
        n, _, h, w = d.shape
        plan = p.cache.get("cpu_block")
        if plan is None or plan[0] != (n, h, w):
            out_hw = p.window.out_size(h, w)
            plan = p.cache["cpu_block"] = ((n, h, w), (n, p.weight.shape[0], *out_hw),
                                           _geometry(n, (h, w), out_hw, p.window),
                                           p.cached("cpu_panels", lambda: packed_weights(p.weight)),
                                           _pointwise(p.window))
        _, shape, geo, packed, pointwise = plan
        if residual is not None and tuple(residual.shape) != shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match conv output {shape}")
        if pointwise and residual is None:  # a 1x1 conv's candidates are its input's updated pixels
            idx, cand = d.active(), d.mask
        else:
            idx, cand = self._k.candidates(d.mask, residual.mask if residual is not None else None, geo)
        if not idx.numel():  # nothing to compute: the generic path makes the empty delta (and counts it)
            return super().conv_block(d, p, residual, act)
        self._count(p, idx.numel(), cand.numel(), idx, n, GEMM_DENSE_SWITCH)  # 1.0: never dense
        return self._conv_act_rows(d, idx, packed, geo, residual, act)

    def _conv_act_rows(self, d: DeltaTensor, idx: Tensor, packed: Tensor, geo: list[int],
                       residual: DeltaTensor | None, st: PointwiseState) -> DeltaTensor:
        """conv_act_rows on delta d at candidates idx (f in EPILOGUE_CODES), the emitted delta."""
        a = st.act
        lo, hi = _clamp_range(a)
        return _delta(self._k.conv_act_rows(
            _rows(d), d.mask, idx, packed, geo, _rows(residual) if residual is not None else None,
            residual.mask if residual is not None else None, st.acc, st.emitted, EPILOGUE_CODES[a.kind], lo, hi,
            a.slope, float(st.tau), SCORE_CODES[st.score]))

    def conv2d(self, d: DeltaTensor, p: ConvParams) -> DeltaTensor:
        """A plain conv (no activation: YOLOv8's Detect outputs) as the reference computes it, its rows
        written by conv_rows_delta straight into the output delta (the reference scatters a (P, Cout)
        matrix through index_copy afterwards)."""
        if not self._plain_conv_ok(d, p):
            return super().conv2d(d, p)
        n, _, h, w = d.shape
        out_hw = p.window.out_size(h, w)
        # a 1x1 conv's candidates are its input's updated pixels (YOLOv8's Detect outputs)
        idx, out_mask = (d.active(), d.mask) if _pointwise(p.window) else self._candidates(d, p.window, out_hw)
        if idx.numel() == 0:
            return super().conv2d(d, p)  # the empty delta (nothing counted yet)
        self._count(p, idx.numel(), out_mask.numel(), idx, n, GEMM_DENSE_SWITCH)  # 1.0: never dense
        packed = p.cached("cpu_panels", lambda: packed_weights(p.weight))
        return _delta(self._k.conv_rows_delta(_rows(d), d.mask, idx, packed, p.weight.shape[0],
                                              _geometry(n, (h, w), out_hw, p.window)))

    def _plain_conv_ok(self, d: DeltaTensor, p: ConvParams) -> bool:
        """conv2d's one pass: groups 1 on the implicit GEMM, never the dense conv."""
        return p.groups == 1 and GEMM_DENSE_SWITCH >= 1.0 and self._implicit_gemm_ok(d, p)

    def _one_frame_block_ok(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None,
                            act: PointwiseState | None) -> bool:
        """conv_block's one-frame case: groups 1, f in the epilogue, never the dense conv."""
        return act is not None and p.groups == 1 and GEMM_DENSE_SWITCH >= 1.0 and self._epilogue_ok(d, p, residual, act)

    def _epilogue_ok(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None, st: PointwiseState) -> bool:
        """conv_act_rows / depthwise_rows with the update: the implicit GEMM runs, f is in the epilogue."""
        return st.act.kind in EPILOGUE_CODES and self._implicit_gemm_ok(d, p) and \
            (residual is None or residual.dtype == torch.float32)

    def _sparse_act_block(self, d: DeltaTensor, p: ConvParams, idx: Tensor, out_hw: tuple[int, int],
                          residual: DeltaTensor | None, st: PointwiseState) -> DeltaTensor | None:
        if not self._epilogue_ok(d, p, residual, st):
            return None
        code = EPILOGUE_CODES[st.act.kind]
        n, _, h, w = d.shape
        geo = _geometry(n, (h, w), out_hw, p.window)
        a = st.act
        lo, hi = _clamp_range(a)
        res = _rows(residual) if residual is not None else None
        res_mask = residual.mask if residual is not None else None
        if p.groups > 1:
            return _delta(self._k.depthwise_rows(_rows(d), d.mask, idx, _depthwise_weights(p), geo, res, res_mask,
                                                 st.acc, st.emitted, code, lo, hi, a.slope, float(st.tau),
                                                 SCORE_CODES[st.score]))
        return self._conv_act_rows(d, idx, p.cached("cpu_panels", lambda: packed_weights(p.weight)), geo, residual, st)

    def _act_rows(self, idx: Tensor, y: Tensor, residual: DeltaTensor | None, st: PointwiseState,
                  dtype) -> DeltaTensor:
        code = cpu_kernels.ACT_CODES.get(st.act.kind)
        if dtype != torch.float32 or y.dtype != torch.float32 or \
                (residual is not None and residual.dtype != torch.float32):
            return super()._act_rows(idx, y, residual, st, dtype)
        if code is None:  # f is an ATen op: A += v and the emit in C++, f(A) on the gathered rows
            a = self._k.accumulate_rows(y.contiguous(), idx, _rows(residual) if residual is not None else None,
                                        residual.mask if residual is not None else None, st.acc, False)
            return self._emit_f(idx, a, st)
        a = st.act
        lo, hi = _clamp_range(a)
        return _delta(self._k.act_update(
            y.contiguous(), idx, _rows(residual) if residual is not None else None,
            residual.mask if residual is not None else None, st.acc, st.emitted, code, lo, hi, a.slope,
            float(st.tau), SCORE_CODES[st.score], False))

    @staticmethod
    def _dense_conv(d: DeltaTensor, p: ConvParams) -> Tensor:
        """The conv of the zero-filled delta over the whole map, channels_last in and out; symmetric
        padding is the conv's own (no padded copy of the input)."""
        t, b, l, r = p.window.padding
        if (t, l) != (b, r) or d.dtype != torch.float32 or p.weight.dtype != torch.float32:
            return ReferenceBackend._dense_conv(d, p)
        return F.conv2d(d.zero_filled(), p.weight, None, p.window.stride, (t, l), p.window.dilation, p.groups)

    def _dense_act_block(self, d: DeltaTensor, p: ConvParams, idx: Tensor, residual: DeltaTensor | None,
                         st: PointwiseState) -> DeltaTensor | None:
        """Dense conv, then the nonlinear update reading the conv's output map in place (no gather of
        its rows)."""
        if d.dtype != torch.float32 or p.weight.dtype != torch.float32 or \
                (residual is not None and residual.dtype != torch.float32):
            return None
        y = rows(to_cl(self._dense_conv(d, p)))
        res = _rows(residual) if residual is not None else None
        res_mask = residual.mask if residual is not None else None
        code = cpu_kernels.ACT_CODES.get(st.act.kind)
        if code is None:
            return self._emit_f(idx, self._k.accumulate_rows(y, idx, res, res_mask, st.acc, True), st)
        a = st.act
        lo, hi = _clamp_range(a)
        return _delta(self._k.act_update(y, idx, res, res_mask, st.acc, st.emitted, code, lo, hi, a.slope,
                                         float(st.tau), SCORE_CODES[st.score], True))


    def _emit_f(self, idx: Tensor, a: Tensor, st: PointwiseState) -> DeltaTensor:
        """f(A) on the new A rows `a` (in place, the same op on the same (P, C) matrix as the
        reference backend, so bit-identical), then o = f(A) - E, truncation and emit in C++."""
        return _delta(self._k.emit_rows(st.act.apply_(a), idx, st.emitted, float(st.tau), SCORE_CODES[st.score]))

    def pointwise(self, d: DeltaTensor, st: PointwiseState) -> DeltaTensor:
        code = cpu_kernels.ACT_CODES.get(st.act.kind)
        if d.dtype != torch.float32:
            return super().pointwise(d, st)
        idx = d.active()
        # piecewise-linear f (ReLU after CenterFace's transposed convs): act_update reading the delta's rows by pixel,
        # in one pass, not the reference's gathers, index_copy and scatter (~8 ATen ops: 1.9 ms at 24 channels,
        # 144 x 192, 28% updated)
        if code is not None:
            lo, hi = _clamp_range(st.act)
            return _delta(self._k.act_update(_rows(d), idx, None, None, st.acc, st.emitted, code, lo, hi,
                                             st.act.slope, float(st.tau), SCORE_CODES[st.score], True))
        return self._emit_f(idx, self._k.accumulate_rows(_rows(d), idx, None, None, st.acc, True), st)

    def _accumulate_ok(self, state: Tensor, d: DeltaTensor) -> bool:
        """accumulate in C++: float32 state and delta rows."""
        return state.dtype == torch.float32 and d.dtype == torch.float32 and \
            state.is_contiguous(memory_format=torch.channels_last)

    def accumulate(self, state: Tensor, d: DeltaTensor) -> None:
        """O += d at the updated pixels in one pass (the reference's index_select + index_add: the same
        single add per element, so the same values)."""
        if not self._accumulate_ok(state, d):
            return super().accumulate(state, d)
        self._k.accumulate_at(state, _rows(d), d.active())

    def add(self, a: DeltaTensor, b: DeltaTensor) -> DeltaTensor:
        if a.dtype != torch.float32 or b.dtype != torch.float32 or a.shape != b.shape:
            return super().add(a, b)  # the reference also names a shape mismatch
        return _delta(self._k.merge_streams([_rows(a), _rows(b)], [a.mask, b.mask], True))

    def cat(self, ds: list[DeltaTensor]) -> DeltaTensor:
        if any(d.dtype != torch.float32 for d in ds):
            return super().cat(ds)
        return _delta(self._k.merge_streams([_rows(d) for d in ds], [d.mask for d in ds], False))

    def dense_cat_in_place(self, ds: list[DeltaTensor]) -> DeltaTensor | None:
        """A keyframe's cat for conv_dense's `parts`: float32 inputs whose pixels' channels are contiguous
        (channels_last maps, or channel views of them: C2f's halves), outside torch.compile."""
        if not self._gemm or torch.compiler.is_compiling() \
                or any(d.dtype != torch.float32 or d.parts is not None or d.values.stride(1) != 1 for d in ds):
            return None
        return DeltaTensor(_cat_placeholder(ds), ds[0].mask, dense=True, parts=tuple(ds))

    def cat_in_place(self, ds: list[DeltaTensor]) -> DeltaTensor | None:
        """The cat's union mask and its pixels (cpu_kernels.union_masks), the parts kept for the 1x1 conv's
        run_cat; the values a one-element placeholder (see DeltaTensor.parts). float32 parts on AVX2 + FMA."""
        if not self._gemm or any(d.dtype != torch.float32 or d.parts is not None for d in ds):
            return None
        idx, mask = self._k.union_masks([d.mask for d in ds])
        return DeltaTensor(_cat_placeholder(ds), mask, _active=idx, parts=tuple(ds))

    def upsample_nearest(self, d: DeltaTensor, factors: tuple[int, int]) -> DeltaTensor | None:
        if d.dtype != torch.float32:
            return None
        return _delta(self._k.upsample_nearest(_rows(d), d.mask, d.active(), factors[0], factors[1]))

    def channel_slice(self, d: DeltaTensor, start: int, stop: int) -> DeltaTensor:
        if d.dtype != torch.float32:
            return super().channel_slice(d, start, stop)
        n, c, h, w = d.shape
        ext, values = self._k.slice_rows(_rows(d), d.active(), n, h, w, c, start, stop)
        return DeltaTensor(values, d.mask, _active=d.active(), ext=ext)


def _cat_placeholder(ds: list[DeltaTensor]) -> Tensor:
    """The values of a cat read in place (DeltaTensor.parts): its shape, one float32 element broadcast, no data."""
    n, _, h, w = ds[0].shape
    return torch.empty((), dtype=torch.float32).expand(n, sum(d.shape[1] for d in ds), h, w)


def fused_cpu_backend() -> ReferenceBackend:
    """The fused CPU backend when its kernels build here, else the reference backend."""
    module = cpu_kernels.load()
    return FusedCpuBackend(module) if module is not None else ReferenceBackend()

