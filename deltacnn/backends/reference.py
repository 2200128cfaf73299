"""Reference backend: plain PyTorch, CPU and GPU, the ground truth for every faster backend.

It exploits sparsity by gathering the updated pixels into a compact (pixels x channels)
matrix, computing only those rows and scattering the results back, so that on the CPU the
cost follows the update rate. It synchronises with the device (torch.nonzero) and so is not
the CUDA fast path.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import truncation_score
from ..geometry import Window, dilate_mask, receptive_taps
from ..tensor import DeltaTensor, empty_delta, new_rows_ext, rows, to_cl
from .base import Backend, ConvParams, PointwiseState

# Above this fraction of active output pixels a dense conv on zero-filled deltas is cheaper than
# gathering; both are exact, so this only changes speed. Tests set it to 0 and 1 to cover both.
DENSE_SWITCH = 0.85
# Gathered rows processed per chunk, to bound the im2col buffer.
CHUNK_ROWS = 1 << 14


def _acc_dtype(w: Tensor) -> torch.dtype:
    """Arithmetic dtype of linear layers: at least float32 (see ReferenceBackend._conv_rows)."""
    return torch.promote_types(w.dtype, torch.float32)


def _scatter_rows(n: int, c: int, h: int, w: int, idx: Tensor, vals: Tensor, like: Tensor) -> DeltaTensor:
    """Build a delta whose updated pixels are `idx` with row values `vals`."""
    ext, out = new_rows_ext(n, c, h, w, dtype=vals.dtype, device=like.device)
    ext.index_copy_(0, idx, vals)
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool, device=like.device)
    mask.view(-1).index_fill_(0, idx, True)
    return DeltaTensor(out, mask, _active=idx, ext=ext)


def _with_ext(values: Tensor, mask: Tensor, idx: Tensor | None = None) -> DeltaTensor:
    """Wrap densely computed values as a delta that supports zero-row gathers (one copy)."""
    n, c, h, w = values.shape
    ext, out = new_rows_ext(n, c, h, w, dtype=values.dtype, device=values.device)
    out.copy_(values)
    return DeltaTensor(out, mask, _active=idx, ext=ext)


def _gather(d: DeltaTensor, src: Tensor) -> Tensor:
    """Rows of `d` at row indices `src`; the index N*H*W (one past the end) reads zeros."""
    if d.ext is not None:
        return d.ext.index_select(0, src.reshape(-1))
    r = d.rows()
    g = r.index_select(0, src.reshape(-1).clamp(max=r.shape[0] - 1))
    return torch.where((src.reshape(-1) < r.shape[0]).unsqueeze(1), g, torch.zeros((), dtype=g.dtype, device=g.device))


def _pixel_rows(t: Tensor, idx: Tensor) -> Tensor:
    """(P, C) rows of an (N, C, H, W) tensor of any memory layout at flat pixel indices `idx`."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last):
        return rows(t).index_select(0, idx)
    b = idx // (h * w)
    return t.flatten(2)[b, :, idx - b * (h * w)]


def _masked_rows(d: DeltaTensor, idx: Tensor) -> Tensor:
    """Rows of `d` at `idx`, zero where `d` has no update."""
    zero = d.mask.numel()
    return _gather(d, torch.where(d.mask.reshape(-1).index_select(0, idx), idx, zero))


class _IndexMaps:
    """Index tensors that depend only on shapes, built once per shape and reused every frame.

    The per-frame work of a gathered conv is then a few ops on the active pixels instead of
    rebuilding coordinate grids (CPU time per layer matters at low update rates). Every map but
    `padded` is read-only once built, so one process-wide cache serves all models and threads;
    `padded` is a scratch buffer written on every call and so is private to a thread (and on CUDA
    to a stream): two models used from two threads must never share it.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, Tensor] = {}
        self._local = threading.local()  # per-thread scratch maps

    def _get(self, key: tuple, make) -> Tensor:
        t = self._cache.get(key)
        if t is None:
            if len(self._cache) > 512:  # shapes of a new stream: start over
                self._cache.clear()
            t = self._cache[key] = make()
        return t

    def flat(self, n: int, h: int, w: int, device) -> Tensor:
        """(N, H, W) long: each pixel's flat row index."""
        return self._get(("flat", n, h, w, device), lambda: torch.arange(n * h * w, device=device).reshape(n, h, w))

    def padded(self, n: int, hw: tuple[int, int], hp: int, wp: int, top_left: tuple[int, int], device) -> Tensor:
        """(N, Hp, Wp) long scratch map with the (H, W) interior at `top_left`; its border, never
        written after this, points at the zero row N*H*W."""
        h, w = hw
        # a scratch buffer: one per thread, and on CUDA one per stream, so that models running at the
        # same time never write into each other's map
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        scratch = getattr(self._local, "maps", None)
        if scratch is None:
            scratch = self._local.maps = {}
        key = (n, h, w, hp, wp, top_left, device, stream)
        t = scratch.get(key)
        if t is None:
            if len(scratch) > 64:  # shapes of a new stream: start over
                scratch.clear()
            t = scratch[key] = torch.full((n, hp, wp), n * h * w, dtype=torch.long, device=device)
        return t

    def clamped_taps(self, n: int, in_hw: tuple[int, int], out_hw: tuple[int, int], win: Window, device) -> Tensor:
        """(N*Ho*Wo, taps) long: flat input index of every tap, clamped into the image.

        With dilation 1 a clamped tap lands on a pixel that is also inside the same window, so
        an order statistic (max) over the clamped taps equals the one over the inside taps.
        """
        ho, wo = out_hw

        def make() -> Tensor:
            flat, _ = receptive_taps(torch.arange(n * ho * wo, device=device), in_hw, out_hw, win)
            return flat
        return self._get(("taps", n, in_hw, out_hw, win, device), make)

    def scalar(self, v: int, device) -> Tensor:
        return self._get(("scalar", v, device), lambda: torch.tensor(v, device=device))

    def bases(self, n: int, out_hw: tuple[int, int], stride: tuple[int, int], hp: int, wp: int, device) -> Tensor:
        """(N*Ho*Wo,) long: flat index, in the padded map, of each output pixel's first tap."""
        ho, wo = out_hw

        def make() -> Tensor:
            b = torch.arange(n, device=device).reshape(n, 1, 1) * (hp * wp)
            y = torch.arange(ho, device=device).reshape(1, ho, 1) * (stride[0] * wp)
            x = torch.arange(wo, device=device).reshape(1, 1, wo) * stride[1]
            return (b + y + x).reshape(-1)
        return self._get(("base", n, ho, wo, stride, hp, wp, device), make)

    def offsets(self, win: Window, wp: int, device) -> Tensor:
        """(taps,) long: offset of each tap from the first, in the padded map."""
        def make() -> Tensor:
            ky = torch.arange(win.kernel[0], device=device) * (win.dilation[0] * wp)
            kx = torch.arange(win.kernel[1], device=device) * win.dilation[1]
            return (ky.unsqueeze(1) + kx.unsqueeze(0)).reshape(-1)
        return self._get(("offs", win.kernel, win.dilation, wp, device), make)


_MAPS = _IndexMaps()


def _tap_sources(d: DeltaTensor, idx: Tensor, win: Window, out_hw: tuple[int, int]) -> Tensor:
    """(P, taps) row indices feeding output pixels `idx`; inactive or padding taps point at the zero row.

    One lookup in a padded index image replaces bounds and mask checks per tap.
    """
    n, _, h, w = d.shape
    t, b, l, r = win.padding
    ho, wo = out_hw
    # large enough for every tap of every output pixel (also when the last window overhangs)
    hp = max(h + t + b, (ho - 1) * win.stride[0] + win.dilation[0] * (win.kernel[0] - 1) + 1)
    wp = max(w + l + r, (wo - 1) * win.stride[1] + win.dilation[1] * (win.kernel[1] - 1) + 1)
    zero = n * h * w
    dev = idx.device
    imap = _MAPS.padded(n, (h, w), hp, wp, (t, l), dev)
    torch.where(d.mask.reshape(n, h, w), _MAPS.flat(n, h, w, dev), _MAPS.scalar(zero, dev),
                out=imap[:, t:t + h, l:l + w])
    base = _MAPS.bases(n, out_hw, win.stride, hp, wp, dev).index_select(0, idx)
    src = base.unsqueeze(1) + _MAPS.offsets(win, wp, dev).unsqueeze(0)
    return imap.reshape(-1).index_select(0, src.reshape(-1)).reshape(src.shape)


class ReferenceBackend(Backend):
    name = "reference"
    host_sync_ok = True  # may read device values on the host (decisions, index lists)

    def __init__(self) -> None:
        # conv multiply-adds (done, dense) since the model last reset it: DeltaModel reads it to
        # switch to dense frames when deltas do most of a dense frame's work anyway
        self.work = [0, 0]
        # (N,) int64 or None: the multiply-adds done per stream, counted when DeltaModel sets it (each
        # stream of a batch applies the multiply-add rule to its own work)
        self.work_streams: Tensor | None = None

    def _dense_fraction(self, d: DeltaTensor, p: ConvParams) -> float:
        """Candidate fraction above which conv `p` on `d` runs densely (a backend's own crossover)."""
        return DENSE_SWITCH

    def _count(self, p: ConvParams, done_pixels: int, all_pixels: int, idx: Tensor | None = None,
               n: int = 1, dense_fraction: float | None = None) -> None:
        per_pixel = p.weight.numel()
        self.work[0] += done_pixels * per_pixel
        self.work[1] += all_pixels * per_pixel
        if self.work_streams is not None and idx is not None:
            # candidates per stream (idx ascends), counted as that stream alone would: all pixels above
            # the dense fraction, where it would run the conv densely
            per_stream = all_pixels // n
            bounds = torch.arange(n + 1, device=idx.device) * per_stream
            c = torch.searchsorted(idx, bounds).diff()
            switch = DENSE_SWITCH if dense_fraction is None else dense_fraction
            c = torch.where(c > switch * per_stream, per_stream, c)
            self.work_streams += c * per_pixel

    # ---- input / output -------------------------------------------------------------------
    def sparsify(self, x: Tensor, ref: Tensor, tau: float, score: str, dilation: int, dtype,
                 scratch: dict | None = None) -> DeltaTensor:
        """d = x - ref where the pixel's score over channels exceeds tau; ref follows what was sent.

        x may have any layout: the difference and score are computed in x's layout (for a
        3-channel NCHW frame that is 3 contiguous planes, several times faster than 3-wide rows)
        and only the sent pixels are gathered into rows.
        """
        n, c, h, w = x.shape
        d = x.float() - ref
        mask = (truncation_score(d, score) > tau).reshape(n, 1, h, w)
        if dilation > 1:
            mask = dilate_mask(mask, Window.make(dilation, 1, dilation // 2), (h, w))
        idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
        sent = _pixel_rows(d, idx).to(dtype)
        # record exactly what downstream receives, so rounding of `sent` is re-sent later, never lost
        rows(ref).index_add_(0, idx, sent.float())
        return _scatter_rows(n, c, h, w, idx, sent, x)

    def accumulate(self, state: Tensor, d: DeltaTensor) -> None:
        idx = d.active()
        rows(state).index_add_(0, idx, d.rows().index_select(0, idx).float())

    # ---- linear: convolution -----------------------------------------------------------------
    def conv2d(self, d: DeltaTensor, p: ConvParams) -> DeltaTensor:
        n, cin, h, w = d.shape
        cout = p.weight.shape[0]
        ho, wo = p.window.out_size(h, w)
        idx, out_mask = self._candidates(d, p.window, (ho, wo))
        switch = self._dense_fraction(d, p)
        dense = idx.numel() > switch * out_mask.numel()
        self._count(p, out_mask.numel() if dense else idx.numel(), out_mask.numel(), idx, n, switch)
        if idx.numel() == 0:
            return empty_delta(n, cout, ho, wo, dtype=_acc_dtype(p.weight), device=d.device)
        if dense:
            return _with_ext(self._dense_conv(d, p), out_mask, idx)
        return _scatter_rows(n, cout, ho, wo, idx, self._conv_rows_chunked(d, p, idx, (ho, wo)), d.values)

    def _conv_rows_chunked(self, d: DeltaTensor, p: ConvParams, idx: Tensor, out_hw: tuple[int, int]) -> Tensor:
        if idx.numel() <= CHUNK_ROWS:
            return self._conv_rows(d, p, idx, out_hw)
        return torch.cat([self._conv_rows(d, p, idx[i:i + CHUNK_ROWS], out_hw) for i in range(0, idx.numel(), CHUNK_ROWS)])

    @staticmethod
    def _dense_conv(d: DeltaTensor, p: ConvParams) -> Tensor:
        """The conv of the zero-filled delta over the whole map (cheaper when most pixels change)."""
        t, b, l, r = p.window.padding
        acc = _acc_dtype(p.weight)
        x = F.pad(d.zero_filled().to(acc), (l, r, t, b))
        return F.conv2d(x, p.weight.to(acc), None, p.window.stride, 0, p.window.dilation, p.groups)

    def _candidates(self, d: DeltaTensor, win: Window, out_hw: tuple[int, int],
                    extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Output pixels whose receptive field touches an update of `d`, or set in `extra`:
        (flat indices ascending, (N, 1, Ho, Wo) bool mask)."""
        cand = dilate_mask(d.mask, win, out_hw)
        if extra is not None:
            cand = cand | extra
        return torch.nonzero(cand.reshape(-1)).squeeze(1), cand

    def _taps(self, d: DeltaTensor, idx: Tensor, win: Window, out_hw: tuple[int, int]) -> Tensor:
        """(P, taps * Cin) implicit-GEMM rows of output pixels `idx`: zeros for taps outside the
        image or on pixels without an update."""
        return _gather(d, _tap_sources(d, idx, win, out_hw)).reshape(idx.numel(), -1)

    def _conv_rows(self, d: DeltaTensor, p: ConvParams, idx: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """Implicit GEMM over the gathered receptive fields of output pixels `idx`.

        Low-precision weights are applied with float32 arithmetic, like tensor cores with float32
        accumulation: the result is float32, because a linear layer's output feeds accumulators
        with no correction step, and rounding it every frame would drift.
        """
        cin = d.shape[1]
        g = self._taps(d, idx, p.window, out_hw)
        P, K, G = idx.numel(), p.window.taps, p.groups
        cout = p.weight.shape[0]
        cg, og = cin // G, cout // G
        w = p.weight
        acc = _acc_dtype(w)
        g = g.to(acc)
        if G == 1:
            wm = p.cached("ref_gemm", lambda: w.to(acc).permute(2, 3, 1, 0).reshape(K * cin, cout).contiguous())
            return g.reshape(P, K * cin) @ wm
        if cg == 1 and og == 1:  # depthwise: a weighted sum over taps per channel
            wm = p.cached("ref_dw", lambda: w.to(acc).reshape(cout, K).t().contiguous())  # (K, C)
            return (g.reshape(P, K, cin) * wm).sum(1)
        gg = g.reshape(P, K, G, cg).permute(2, 0, 1, 3).reshape(G, P, K * cg)
        wm = p.cached("ref_grouped", lambda: w.to(acc).reshape(G, og, cg, K).permute(0, 3, 2, 1).reshape(G, K * cg, og).contiguous())
        return torch.bmm(gg, wm).permute(1, 0, 2).reshape(P, cout)

    def conv_block(self, d: DeltaTensor, p: ConvParams, residual: DeltaTensor | None,
                   act: PointwiseState | None) -> DeltaTensor:
        """conv, then optional residual add, then optional nonlinear update: the fusion unit.

        Works on the compact rows of the candidate pixels throughout, so the intermediate
        results are never scattered to a dense-shaped buffer and gathered again.
        """
        if act is None and residual is None:
            return self.conv2d(d, p)
        n, _, h, w = d.shape
        cout = p.weight.shape[0]
        ho, wo = p.window.out_size(h, w)
        if residual is not None and tuple(residual.shape) != (n, cout, ho, wo):
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match conv output {(n, cout, ho, wo)}")
        idx, cand = self._candidates(d, p.window, (ho, wo), residual.mask if residual is not None else None)
        switch = self._dense_fraction(d, p)
        dense = idx.numel() > switch * cand.numel()
        self._count(p, cand.numel() if dense else idx.numel(), cand.numel(), idx, n, switch)
        if dense and act is not None:
            out = self._dense_act_block(d, p, idx, residual, act)
            if out is not None:
                return out
        if not dense and act is not None and idx.numel():
            out = self._sparse_act_block(d, p, idx, (ho, wo), residual, act)
            if out is not None:
                return out
        if dense:
            y = rows(to_cl(self._dense_conv(d, p))).index_select(0, idx)
        elif idx.numel():
            # pixels that are candidates only through the residual gather all-zero taps: y = 0 there
            y = self._conv_rows_chunked(d, p, idx, (ho, wo))
        else:
            y = torch.zeros(0, cout, dtype=_acc_dtype(p.weight), device=d.device)
        if act is None:
            if residual is not None:
                y = y + _masked_rows(residual, idx)
            return _scatter_rows(n, cout, ho, wo, idx, y, d.values)
        return self._act_rows(idx, y, residual, act, d.dtype)

    def _dense_act_block(self, d: DeltaTensor, p: ConvParams, idx: Tensor, residual: DeltaTensor | None,
                         st: PointwiseState) -> DeltaTensor | None:
        """conv_block's dense case in one backend pass (a fast backend's hook); None: not handled."""
        return None

    def _sparse_act_block(self, d: DeltaTensor, p: ConvParams, idx: Tensor, out_hw: tuple[int, int],
                          residual: DeltaTensor | None, st: PointwiseState) -> DeltaTensor | None:
        """conv_block's gathered case with its nonlinear update in one backend pass (a fast backend's
        hook); None: not handled."""
        return None

    def _act_rows(self, idx: Tensor, y: Tensor, residual: DeltaTensor | None, st: PointwiseState,
                  dtype) -> DeltaTensor:
        """The nonlinear update of conv_block: y (+ residual) at candidate pixels `idx`."""
        if residual is not None:
            y = y + _masked_rows(residual, idx)
        return self._pointwise_rows(idx, y, st, dtype)

    # ---- linear: elementwise / structural -----------------------------------------------------
    def add(self, a: DeltaTensor, b: DeltaTensor) -> DeltaTensor:
        if a.shape != b.shape:
            raise ValueError(f"delta add needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        idx = torch.nonzero((a.mask | b.mask).reshape(-1)).squeeze(1)
        vals = _masked_rows(a, idx) + _masked_rows(b, idx)
        n, c, h, w = a.shape
        return _scatter_rows(n, c, h, w, idx, vals, a.values)

    def cat(self, ds: list[DeltaTensor]) -> DeltaTensor:
        mask = ds[0].mask
        for d in ds[1:]:
            mask = mask | d.mask
        idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
        vals = torch.cat([_masked_rows(d, idx) for d in ds], dim=1)
        n, _, h, w = ds[0].shape
        return _scatter_rows(n, vals.shape[1], h, w, idx, vals, ds[0].values)

    def channel_slice(self, d: DeltaTensor, start: int, stop: int) -> DeltaTensor:
        """Channels [start, stop) of a delta (same mask)."""
        return DeltaTensor(to_cl(d.values[:, start:stop]), d.mask, _active=d._active)

    def scale(self, d: DeltaTensor, scale: Tensor) -> DeltaTensor:
        """Multiply by a constant (scalar or per-channel (C,)) at updated pixels."""
        idx = d.active()
        vals = d.rows().index_select(0, idx) * scale.to(d.dtype)
        n, c, h, w = d.shape
        return _scatter_rows(n, c, h, w, idx, vals, d.values)

    def dense_linear(self, d: DeltaTensor, fn: Callable[[Tensor], Tensor], mask_fn: Callable[[Tensor], Tensor]) -> DeltaTensor:
        """A linear op computed densely on zero-filled deltas (exact; cost ~ the dense op)."""
        return _with_ext(fn(d.zero_filled()), mask_fn(d.mask))

    def global_avg_pool(self, d: DeltaTensor) -> DeltaTensor:
        """Mean over all pixels of each image: a (N, C, 1, 1) delta, updated where the image had any update."""
        n, c, h, w = d.shape
        idx = d.active()
        sums = torch.zeros(n, c, dtype=torch.float32, device=d.device)
        sums.index_add_(0, idx // (h * w), d.rows().index_select(0, idx).float())
        vals = (sums / (h * w)).to(d.dtype).reshape(n, c, 1, 1)
        return DeltaTensor(vals.contiguous(memory_format=torch.channels_last), d.mask.reshape(n, -1).any(1).reshape(n, 1, 1, 1))

    # ---- nonlinear ---------------------------------------------------------------------------
    def _emit(self, idx: Tensor, o: Tensor, emitted: Tensor, tau: float, score: str, dtype,
              out_shape: tuple[int, int, int, int]) -> DeltaTensor:
        """Truncate candidate changes `o` at pixels `idx`; send the rest, recording what was sent in E."""
        keep = truncation_score(o, score) > tau
        kept = torch.nonzero(keep).squeeze(1)
        if kept.numel() == idx.numel():  # host-side check: this backend may synchronise
            idx_e, sent = idx, o.to(dtype)
        else:
            idx_e, sent = idx.index_select(0, kept), o.index_select(0, kept).to(dtype)
        rows(emitted).index_add_(0, idx_e, sent.float())
        n, c, h, w = out_shape
        return _scatter_rows(n, c, h, w, idx_e, sent, emitted)

    def pointwise(self, d: DeltaTensor, st: PointwiseState) -> DeltaTensor:
        idx = d.active()
        return self._pointwise_rows(idx, d.rows().index_select(0, idx), st, d.dtype)

    def _pointwise_rows(self, idx: Tensor, d_rows: Tensor, st: PointwiseState, dtype) -> DeltaTensor:
        """A += d at pixels `idx` (rows `d_rows`); emit f(A) - E where it passes truncation."""
        a_rows = rows(st.acc)
        a = a_rows.index_select(0, idx)
        a += d_rows
        a_rows.index_copy_(0, idx, a)
        o = st.act.apply_(a)  # A is stored: its gathered copy can become f(A) - E in place
        o -= rows(st.emitted).index_select(0, idx)
        return self._emit(idx, o, st.emitted, st.tau, st.score, dtype, tuple(st.emitted.shape))

    def maxpool(self, d: DeltaTensor, acc: Tensor, emitted: Tensor, win: Window, tau: float, score: str) -> DeltaTensor:
        """Max pooling re-evaluated at output pixels whose window touches an update."""
        n, c, h, w = d.shape
        idx_in = d.active()
        a_rows = rows(acc)
        a_rows.index_copy_(0, idx_in, a_rows.index_select(0, idx_in) + d.rows().index_select(0, idx_in).float())
        ho, wo = emitted.shape[2:]
        out_mask = dilate_mask(d.mask, win, (ho, wo))
        idx = torch.nonzero(out_mask.reshape(-1)).squeeze(1)
        if win.dilation == (1, 1):
            flat = _MAPS.clamped_taps(n, (h, w), (ho, wo), win, idx.device).index_select(0, idx)
            g = a_rows.index_select(0, flat.reshape(-1)).reshape(idx.numel(), win.taps, c)
        else:
            flat, inside = receptive_taps(idx, (h, w), (ho, wo), win)
            g = a_rows.index_select(0, flat.reshape(-1)).reshape(idx.numel(), win.taps, c)
            g = torch.where(inside.unsqueeze(2), g, torch.full((), float("-inf"), device=g.device))
        o = g.amax(1) - rows(emitted).index_select(0, idx)
        return self._emit(idx, o, emitted, tau, score, d.dtype, tuple(emitted.shape))

    def mul(self, a: DeltaTensor, b: DeltaTensor, acc_a: Tensor, acc_b: Tensor, emitted: Tensor,
            tau: float, score: str) -> DeltaTensor:
        """Product of two streams (b may broadcast over space): re-evaluated where either changed."""
        for d, acc in ((a, acc_a), (b, acc_b)):
            i = d.active()
            r = rows(acc)
            r.index_copy_(0, i, r.index_select(0, i) + d.rows().index_select(0, i).float())
        n, c, h, w = emitted.shape
        cand = a.mask.expand(n, 1, h, w) | b.mask.expand(n, 1, h, w)
        idx = torch.nonzero(cand.reshape(-1)).squeeze(1)
        o = _broadcast_rows(acc_a, idx, (h, w)) * _broadcast_rows(acc_b, idx, (h, w)) - rows(emitted).index_select(0, idx)
        return self._emit(idx, o, emitted, tau, score, a.dtype, (n, c, h, w))


def _broadcast_rows(t: Tensor, idx: Tensor, hw: tuple[int, int]) -> Tensor:
    """Rows of `t` (N, C|1, h, w with h, w equal to hw or 1) at flat output indices into (N, H, W)."""
    H, W = hw
    n_, c, h, w = t.shape
    if (h, w) == (H, W):
        r = rows(t).index_select(0, idx)
    else:
        n = idx // (H * W)
        rem = idx - n * (H * W)
        y, x = rem // W, rem % W
        src = (n * h + (y if h > 1 else 0)) * w + (x if w > 1 else 0)
        r = rows(t).index_select(0, src)
    return r
