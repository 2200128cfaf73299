"""Delta state kept in scene coordinates, so that a panning or tilting camera stays sparse.

Design (translations only; reference, cpu and Triton backends, outside CUDA graphs):

* The network sees a *view* of the scene whose origin v stays on a multiple of the network's total
  stride S. The camera is at c (accumulated motion, float); the frame is translated by the residual
  r = c - v (|r| <= S/2, or MotionDeltaModel's max_residual) before it enters the network, and every
  spatial output is translated back by -r / s_out, so outputs are in camera coordinates. The band of
  the translated frame that the camera does not reach keeps the input reference there (edge="hold",
  no change for the delta step) or repeats the frame's edge (edge="replicate"). With
  `resample="nearest"` (default) the frame is shifted by round(r) whole pixels (an exact copy; the alignment is off by < 0.5 px); "bilinear"
  shifts by r exactly (which low-passes the frame a little). Outputs at stride > 1 are always
  translated bilinearly. So the result equals dense inference on the camera frame when the motion is
  a multiple of S, and is a sub-stride-shifted (and re-sampled) version of it otherwise.
* When v moves by D = k*S, every cached buffer (input reference, A/E of nonlinear layers, pooling
  state, output accumulators: every `state_*` buffer a layer keeps) moves by D / s_l, s_l its
  layer's cumulative stride. The buffers are shifted by one copy per view step (see below for why
  not wrap-around buffers).
* Then the state is made exactly what the dense network computes on the new view's reference
  (the shifted old reference, and the new frame where the view uncovered the scene). Wrong after the
  shift are: the uncovered strip, the band within R of the old view's border (it saw the old
  padding) and the band within R of the new view's border (it did not see padding): R is a bound
  of the network's receptive-field radius. Feature maps there are not zero after biases and
  activations, so they are recomputed: a keyframe of the network on a crop of the new reference
  that covers the bands plus R of context (where the crop ends inside the view its padding is not the
  view's, and only pixels further than R from that end are kept), pasted into the buffers at the
  bands. Per moving axis that costs (4R + |D|) / W of a dense frame; when that reaches a whole frame
  (large receptive fields, small frames) the stream takes a keyframe instead.
* Then the ordinary delta step runs on the aligned frame: only what moved in the scene changes.
* Alternative (view_step="padded", padded.py): no bands; each layer fixes its own strip and a thin band at
  each border inside the frame's delta pass, and the step reaches the consumers as deltas (exact too).

What a backend must provide for this is nothing new (the host decides the strips; the state is moved
with torch ops on the buffers): the reference, cpu and Triton backends all run it (Triton tested under
TRITON_INTERPRET=1 against the reference: the input layer's bordered scratch holds one frame's deltas
only, so a shift does not invalidate it). Not inside deltacnn.compile / CUDA graphs: that needs strips
of fixed size decided on the device (the host reads the motion once per frame).

Why the shift is a copy and not wrap-around buffers with per-layer offsets: measured on YOLOv8n at
640x448 (81.5 MB of state, 1 thread), one shift is ~20 ms CPU, 7% of a dense frame, once per view step;
with the exact bands every YOLOv8n view step is a keyframe anyway (4R + |D| > the view), so no copy
runs. Offset-indexed buffers would need every kernel of every backend to index modulo the buffer (the
reference backend's torch convs would need a roll per layer per frame, i.e. more copying, not less).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..layers import (DeltaConv2d, DeltaConvTranspose2d, DeltaLayer, DeltaLinearMap, DeltaMaxPool2d, DenseIsland,
                      Sparsify)
from ..stats import StatsRecorder
from ..tensor import DeltaTensor
from ..thresholds import INPUT


class MotionNotSupportedError(NotImplementedError):
    """The converted model keeps state that cannot follow a moving view in this implementation."""


# ---- translating images ------------------------------------------------------------------------------
def translate(x: Tensor, t: Tensor | list, mode: str = "bilinear") -> Tensor:
    """out[i](q) = x[i](q - t[i]) per stream (content moves by +t[i] = (tx, ty)); borders replicated.

    Whole-pixel shifts are exact copies; fractional ones are separable linear interpolation
    ("nearest" rounds them first).
    """
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 2).tolist()
    if len(t) not in (1, x.shape[0]):
        raise ValueError(f"{len(t)} translations for a batch of {x.shape[0]}")
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        tx, ty = t[i] if len(t) > 1 else t[0]
        if mode == "nearest":
            tx, ty = float(round(tx)), float(round(ty))
        if tx.is_integer() and ty.is_integer() and abs(tx) < x.shape[3] and abs(ty) < x.shape[2]:
            _shift_whole(x[i], int(tx), int(ty), out[i])
        else:
            out[i] = _translate_axis(_translate_axis(x[i], ty, 1), tx, 2)
    return out


def _shift_whole(x: Tensor, tx: int, ty: int, out: Tensor) -> None:
    """out(q) = x(q - t) for one (C, H, W) image and whole pixels |t| < its size, borders replicated: one
    copy of the overlap and broadcast copies of the edge rows / columns (an index_select per axis was
    ~14 ms per 640x448 frame at 1 thread, 8% of a YOLOv8n delta frame on a pan)."""
    H, W = x.shape[1:]
    y0, y1 = max(ty, 0), H + min(ty, 0)  # rows of out that see x (x rows y0 - ty .. y1 - ty)
    x0, x1 = max(tx, 0), W + min(tx, 0)
    out[:, y0:y1, x0:x1] = x[:, y0 - ty:y1 - ty, x0 - tx:x1 - tx]
    if x0 > 0:
        out[:, y0:y1, :x0] = out[:, y0:y1, x0:x0 + 1]
    if x1 < W:
        out[:, y0:y1, x1:] = out[:, y0:y1, x1 - 1:x1]
    if y0 > 0:
        out[:, :y0] = out[:, y0:y0 + 1]
    if y1 < H:
        out[:, y1:] = out[:, y1 - 1:y1]


def _translate_axis(x: Tensor, t: float, dim: int) -> Tensor:
    n = x.shape[dim]
    lo = math.floor(t)
    frac = t - lo
    src = torch.arange(n, device=x.device) - lo  # out[q] = (1 - frac) x[q - lo] + frac x[q - lo - 1]
    a = x.index_select(dim, src.clamp(0, n - 1))
    if frac == 0.0:
        return a
    b = x.index_select(dim, (src - 1).clamp(0, n - 1))
    return a * (1 - frac) + b * frac


# ---- geometry of a converted model ------------------------------------------------------------------
@dataclass
class StateGeometry:
    """Where each cached buffer lives relative to the frame, and how far padding effects reach."""

    frame_hw: tuple[int, int]
    strides: dict[tuple[int, str], int]  # (id(layer), state key) -> cumulative stride
    total_stride: int  # S: every state stride divides it
    halo: int  # R: a multiple of S, > the receptive-field radius of every state pixel (input pixels)
    layers: list[DeltaLayer] = field(default_factory=list)
    # id(layer) -> how far (frame px) its output pixels read beyond their own block (padded view steps)
    reach: dict[int, float] = field(default_factory=dict)
    # padded view steps: width (frame px, a multiple of S) of the value crops beyond the strip, enough for
    # every layer's fix band and context plus the reach of all stateless spatial layers (padded.py)
    padded_ext: int = 0


def _state_keys(layer: DeltaLayer) -> list[str]:
    return [k for k, v in layer._buffers.items() if k.startswith("state_") and v is not None]


def _window_reach(win, s_in: float) -> float:
    """How far (frame pixels) a window op's output pixel reads beyond its own block of the frame.

    Output pixel j (block [j*s_out, (j+1)*s_out)) reads input pixels j*stride - pad .. j*stride - pad +
    (k-1)*dil, i.e. the frame range [j*s_out - pad*s_in, (j+1)*s_out + ((k-1)*dil - pad + 1 - stride)*s_in).
    """
    reach = 0
    for ax in (0, 1):
        k, s, d = win.kernel[ax], win.stride[ax], win.dilation[ax]
        lo, hi = win.padding[2 * ax], win.padding[2 * ax + 1]
        reach = max(reach, lo, hi, (k - 1) * d - lo + 1 - s)
    return reach * s_in


def _map_reach(layer: DeltaLinearMap, in_hw: tuple[int, int], s_in: float, frame_hw: tuple[int, int]) -> float:
    """Reach of a parameter-free spatial op, from its own mask rule applied to one pixel."""
    h, w = in_hw
    m = torch.zeros(1, 1, h, w, dtype=torch.bool)
    cy, cx = h // 2, w // 2
    m[0, 0, cy, cx] = True
    out = layer.mask_fn(m)
    ho, wo = out.shape[2:]
    s_out = frame_hw[0] / ho
    ys, xs = torch.nonzero(out[0, 0], as_tuple=True)
    if ys.numel() == 0:
        return 0.0
    reach = 0.0
    for o, c in ((ys, cy), (xs, cx)):
        lo, hi = float(o.min()) * s_out, (float(o.max()) + 1) * s_out
        reach = max(reach, c * s_in - lo, hi - (c + 1) * s_in)
    return max(0.0, reach)


def probe_geometry(dm, frame: Tensor) -> tuple[StateGeometry, object]:
    """Run a keyframe on `frame` (this seeds dm's state, as the first frame of a stream does) and
    derive every buffer's stride and the receptive-field bound R from the layers that ran; returns the
    geometry and the keyframe's output."""
    H, W = frame.shape[2:]
    inputs: dict[int, tuple[DeltaLayer, tuple[int, int]]] = {}

    def hook(mod, args):
        a = args[0] if args else None
        v = a.values if isinstance(a, DeltaTensor) else a
        if isinstance(v, Tensor) and v.dim() == 4:
            inputs.setdefault(id(mod), (mod, tuple(v.shape[2:])))

    calls: list[tuple[DeltaLayer, list, object]] = []  # in call order: (layer, its delta inputs, its output)

    def after(mod, args, kwargs, out):
        calls.append((mod, [a for a in list(args) + list(kwargs.values()) if isinstance(a, DeltaTensor)], out))

    layers = [m for m in dm.modules() if isinstance(m, DeltaLayer)]
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    handles += [m.register_forward_hook(after, with_kwargs=True) for m in layers]
    try:
        dm.reset()
        out = dm(frame)
    finally:
        for hd in handles:
            hd.remove()
    strides: dict[tuple[int, str], int] = {}
    for m in layers:
        for k in _state_keys(m):
            h, w = m._buffers[k].shape[2:]
            if H % h or W % w or H // h != W // w or (h == 1 and H > 1):
                raise MotionNotSupportedError(
                    f"layer {m.name!r} keeps state {k[6:]!r} of spatial size {h}x{w} for a {H}x{W} frame; motion "
                    "alignment needs every cached map to be the frame divided by its stride (no global pooling "
                    "or squeeze-excitation state, no unpadded convs); pad the frame to a multiple of the stride")
            strides[(id(m), k)] = H // h
    total = 1
    for s in strides.values():
        total = math.lcm(total, s)
    for o in _spatial_outputs(out):
        if H % o.shape[2] or W % o.shape[3] or H // o.shape[2] != W // o.shape[3]:
            raise MotionNotSupportedError(f"an output of spatial size {tuple(o.shape[2:])} is not the {H}x{W} frame "
                                          "divided by a stride; it cannot be mapped back to camera coordinates")
        total = math.lcm(total, H // o.shape[2])
    reach = 0.0
    reaches: dict[int, float] = {}
    for mod, (h, w) in inputs.values():
        s_in = H / h
        if isinstance(mod, DenseIsland):
            raise MotionNotSupportedError(f"dense island {mod.name!r} runs an op of unknown receptive field; "
                                          "motion alignment cannot bound which pixels it makes depend on the border")
        r = 0.0
        if isinstance(mod, (DeltaConv2d, DeltaMaxPool2d)):
            r = _window_reach(mod.window, s_in)
        elif isinstance(mod, DeltaConvTranspose2d):
            r = max(mod.weight.shape[2:]) * s_in
        elif isinstance(mod, DeltaLinearMap):
            r = _map_reach(mod, (h, w), s_in, (H, W))
        reaches[id(mod)] = r
        reach += r
    if H % total or W % total:
        raise MotionNotSupportedError(f"motion alignment needs the frame ({H}x{W}) to be a multiple of the network's "
                                      f"total stride {total}; pad or crop the frames")
    halo = total * math.ceil((reach + total) / total)
    return StateGeometry((H, W), strides, total, halo, layers, reaches, _padded_ext(calls, reaches, total)), out


def round_up(v: float, q: int) -> int:
    """v frame px rounded up to a multiple of q (0 for v <= 0): the widths of padded view steps' fix bands
    and crops, which _padded_ext and padded.PaddedStep must compute alike."""
    return int(q * math.ceil(v / q)) if v > 0 else 0


def _padded_ext(calls: list, reaches: dict[int, float], S: int) -> int:
    """Width (frame px beyond the strip, a multiple of S) of the value crops of padded view steps: every
    stateful layer fixes up(reach + chain) px from a crop up(reach) px wider, where chain is the reach of
    the stateless layers between it and its stateful producers, whose values are valid only that far
    inside the kept crops (padded.py)."""
    def up(v: float) -> int:
        return round_up(v, S)

    chain: dict[int, float] = {}
    ext = 0
    for mod, ins, out in calls:
        c = max((chain.get(id(t), 0.0) for t in ins), default=0.0)
        r = reaches.get(id(mod), 0.0)
        if _state_keys(mod):
            chain[id(out)] = 0.0
            ext = max(ext, up(r + c) + up(r) + up(c))
        else:
            chain[id(out)] = c + r
    return ext


def _spatial_outputs(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.dim() == 4 else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _spatial_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _spatial_outputs(o)]
    return []


def map_outputs(out, shift: Tensor | list, frame_hw: tuple[int, int]):
    """Translate every spatial output map by `shift` (input pixels, per stream) at its own stride."""
    if isinstance(out, Tensor):
        if out.dim() != 4:
            return out
        s = frame_hw[0] / out.shape[2]
        t = (torch.as_tensor(shift, dtype=torch.float64).reshape(-1, 2) / s)
        if not bool(t.any()):
            return out
        return translate(out, t, "bilinear")
    if isinstance(out, tuple):
        return tuple(map_outputs(o, shift, frame_hw) for o in out)
    if isinstance(out, list):
        return [map_outputs(o, shift, frame_hw) for o in out]
    if isinstance(out, dict):
        return {k: map_outputs(o, shift, frame_hw) for k, o in out.items()}
    return out


# ---- moving the state ---------------------------------------------------------------------------
def _strips(d: int, size: int, halo: int) -> list[tuple[int, int, int, int]] | None:
    """(write_lo, write_hi, crop_lo, crop_hi) along one axis for a view shift d (a multiple of S);
    None: the strips would cover the axis, recompute the whole view."""
    if d == 0:
        return []
    a = abs(d)
    if 4 * halo + a >= size:
        return None
    if d > 0:  # new content at the high end; old border at size - d
        return [(0, halo, 0, 2 * halo), (size - a - halo, size, size - a - 2 * halo, size)]
    return [(0, a + halo, 0, a + 2 * halo), (size - halo, size, size - 2 * halo, size)]


VIEW_STEPS = ("padded", "bands")


def _padded_regions(d: int, axis: int, size: int, ext: int) -> list:
    """The two regions of one axis a view step by d changes (padded.Region): the end where the strip
    enters and the end the view left; [None] where their crops would cover the axis."""
    from .padded import Region
    if d == 0:
        return []
    a = abs(d)
    if a + 2 * ext >= size:
        return [None]
    return [Region(axis, d < 0, a, a + ext), Region(axis, d > 0, 0, ext)]


def _zero_uncovered(v: Tensor, ky: int, kx: int) -> None:
    """Zero the rows / columns of a rolled (C, h, w) buffer that no old pixel moved into (the strip):
    what the consumers of a padded view step take as the padding they saw there."""
    h, w = v.shape[1:]
    if ky > 0:
        v[:, max(h - ky, 0):] = 0
    elif ky < 0:
        v[:, :min(-ky, h)] = 0
    if kx > 0:
        v[:, :, max(w - kx, 0):] = 0
    elif kx < 0:
        v[:, :, :min(-kx, w)] = 0


class _Counted:
    """Runs a PaddedStep's hooks and leaves its work in the aligner's counters."""

    def __init__(self, aligner: "StateAligner", step) -> None:
        self.aligner, self.step = aligner, step

    def __enter__(self):
        return self.step.__enter__()

    def __exit__(self, *exc) -> None:
        self.step.__exit__(*exc)
        H, W = self.aligner.geo.frame_hw
        self.aligner.recompute_macs += self.step.macs
        # view pixels whose state the step touched: the regions' value crops
        self.aligner.recomputed_pixels += sum(r.width * (W if r.axis == 2 else H)
                                              for regs in self.step.steps.values() for r in regs)


class StateAligner:
    """Moves a converted model's cached state with the view (see the module docstring)."""

    def __init__(self, dm, geometry: StateGeometry, view_step: str = "bands") -> None:
        if view_step not in VIEW_STEPS:
            raise ValueError(f"view_step must be one of {VIEW_STEPS}, got {view_step!r}")
        self.dm = dm
        self.geo = geometry
        self.view_step = view_step
        self._pending: dict = {}  # padded view steps for the next delta pass: stream -> regions
        self.stepped: list[int] = []  # the streams whose padded view step the last delta pass carried
        self.input_layer = next(m for m in geometry.layers if isinstance(m, Sparsify) and m.name == INPUT)
        self.recomputed_pixels = 0  # input pixels recomputed densely by the last shift (all streams)
        self.recompute_macs = 0  # their multiply-adds (counted only while the model records statistics)

    def shift(self, view_shift: list[tuple[int, int]], frame: Tensor, full: list[bool]) -> list[int]:
        """Move stream i's view origin by view_shift[i] = (dx, dy) (multiples of S) and make its state the
        dense network's on the new reference; `frame` (aligned, N, C, H, W) fills uncovered pixels. With
        view_step="padded" the state is only moved here: the converted model's next call must run inside
        `delta_pass()`, which fixes it (a shift whose fix was never run raises on the next shift).

        Returns the streams whose whole view must be recomputed instead (full[i]: a failed estimate, a
        cut; or bands that would cover the view): the caller runs them as keyframes of the converted
        model on `frame` (one dense pass, where recomputing here and then running a delta step would
        be two)."""
        if self._pending:
            raise RuntimeError("StateAligner.shift: the padded view step of the last shift was never fixed; run "
                               "the converted model inside aligner.delta_pass() after each shift (MotionDeltaModel "
                               "does)")
        H, W = self.geo.frame_hw
        S = self.geo.total_stride
        self.recomputed_pixels = 0
        self.recompute_macs = 0
        keyframes = []
        for i, ((dx, dy), whole) in enumerate(zip(view_shift, full)):
            if dx % S or dy % S:
                raise ValueError(f"view shift ({dx}, {dy}) is not a multiple of the total stride {S}")
            if whole:
                keyframes.append(i)
                continue
            if dx == 0 and dy == 0:
                continue
            if self.view_step == "padded":
                regions = _padded_regions(dx, 3, W, self.geo.padded_ext) + _padded_regions(dy, 2, H, self.geo.padded_ext)
                if any(r is None for r in regions):  # the crops would cover the view
                    keyframes.append(i)
                    continue
                self._roll(i, dx, dy)
                self._fill_uncovered(self.input_layer._state("ref")[i], frame[i], dx, dy)
                self._pending[i] = regions
                continue
            sx, sy = _strips(dx, W, self.geo.halo), _strips(dy, H, self.geo.halo)
            if sx is None or sy is None or sum(c1 - c0 for *_, c0, c1 in sx) * H + \
                    sum(c1 - c0 for *_, c0, c1 in sy) * W >= H * W:  # the strips cost more than the view
                keyframes.append(i)
                continue
            self._roll(i, dx, dy)
            ref = self.input_layer._state("ref")
            self._fill_uncovered(ref[i], frame[i], dx, dy)
            regions = [((0, H, 0, H), xs) for xs in sx] + [(ys, (0, W, 0, W)) for ys in sy]
            self._recompute(i, ref[i:i + 1], regions)
        self.recomputed_pixels += len(keyframes) * H * W
        return keyframes

    def _roll(self, i: int, dx: int, dy: int) -> None:
        """Move stream i's state so that new[j] = old[j + D / s]. One stream: each buffer is replaced by a
        fresh one holding the shifted overlap (one copy; the uncovered strip is zeroed: the caller
        recomputes it); several streams: stream i's rows are shifted in place through a
        temporary (two copies). Both work in the buffers' NHWC memory order: torch.roll on the strided
        view is ~10x slower. (Wrap-around buffers with per-layer offsets would need no copy at all, but
        every backend kernel would have to index with the offsets.)"""
        single = self.dm_streams() == 1
        for m in self.geo.layers:
            for k in _state_keys(m):
                s = self.geo.strides[(id(m), k)]
                buf = m._buffers[k]
                ky, kx = dy // s, dx // s
                h, w = buf.shape[2:]
                src = (slice(max(ky, 0), h + min(ky, 0)), slice(max(kx, 0), w + min(kx, 0)))
                dst = (slice(max(-ky, 0), h + min(-ky, 0)), slice(max(-kx, 0), w + min(-kx, 0)))
                if single:
                    new = torch.empty_like(buf)  # keeps the memory format (NHWC state stays NHWC)
                    new[:, :, dst[0], dst[1]] = buf[:, :, src[0], src[1]]
                    _zero_uncovered(new[0], ky, kx)
                    m._buffers[k] = new
                else:
                    v = buf[i].permute(1, 2, 0)  # (h, w, C)
                    v[dst].copy_(v[src].clone())
                    _zero_uncovered(buf[i], ky, kx)

    def delta_pass(self):
        """The context the converted model's next call runs in: the hooks of the padded view steps that
        shift() left pending (padded.py), or nothing."""
        steps, self._pending = self._pending, {}
        self.stepped = sorted(steps)  # the streams whose view step this pass carries
        if not steps:
            return contextlib.nullcontext()
        from .padded import PaddedStep
        return _Counted(self, PaddedStep(self.dm, self.geo.layers, steps, self.geo.reach, self.geo.frame_hw))

    def dm_streams(self) -> int:
        return self.input_layer._state("ref").shape[0]

    @staticmethod
    def _fill_uncovered(ref: Tensor, frame: Tensor, dx: int, dy: int) -> None:
        H, W = ref.shape[1:]
        f = frame.to(ref.dtype)
        if dx > 0:
            ref[:, :, W - dx:] = f[:, :, W - dx:]
        elif dx < 0:
            ref[:, :, :-dx] = f[:, :, :-dx]
        if dy > 0:
            ref[:, H - dy:] = f[:, H - dy:]
        elif dy < 0:
            ref[:, :-dy] = f[:, :-dy]

    def _recompute(self, i: int, src: Tensor, regions) -> None:
        """For each ((wy0, wy1, cy0, cy1), (wx0, wx1, cx0, cx1)): run a keyframe on src's crop [cy0:cy1,
        cx0:cx1] and paste every state it seeds into stream i's buffers at the write window."""
        dtype = next((p.dtype for p in self.dm.parameters()), src.dtype)
        for (wy0, wy1, cy0, cy1), (wx0, wx1, cx0, cx1) in regions:
            crop = src[:, :, cy0:cy1, cx0:cx1].to(dtype).contiguous()  # NCHW, as frames come
            states = self._crop_keyframe(crop)
            for m in self.geo.layers:
                for k in _state_keys(m):
                    s = self.geo.strides[(id(m), k)]
                    new = states[(id(m), k)]
                    m._buffers[k][i, :, wy0 // s:wy1 // s, wx0 // s:wx1 // s] = \
                        new[0, :, (wy0 - cy0) // s:(wy1 - cy0) // s, (wx0 - cx0) // s:(wx1 - cx0) // s]
            self.recomputed_pixels += crop.shape[2] * crop.shape[3]

    def _crop_keyframe(self, crop: Tensor) -> dict[tuple[int, str], Tensor]:
        """The state a keyframe on `crop` seeds in every layer, leaving the model's own state, runtime
        flags and statistics as they were."""
        dm, rt = self.dm, self.dm.rt
        saved = {id(m): {k: m._buffers[k] for k in _state_keys(m)} for m in self.geo.layers}
        scratch = {id(m): dict(m._scratch) for m in self.geo.layers if isinstance(m, Sparsify)}
        flags = (rt.keyframe, rt.stateless, rt.dense_above, rt.dense_limit, rt.track_change, rt.input_change,
                 rt.input_mask, rt.stats)
        try:
            for m in self.geo.layers:
                for k in saved[id(m)]:
                    m._buffers[k] = None  # the keyframe allocates crop-sized state instead of reusing these
                if isinstance(m, Sparsify):
                    m._scratch.clear()
            rt.keyframe, rt.stateless, rt.dense_above, rt.dense_limit, rt.track_change = True, False, None, None, False
            rt.stats = StatsRecorder(enabled=flags[7].enabled)
            rt.stats.start_frame()
            dm.graph_module(crop)
            if rt.stats.enabled:
                self.recompute_macs += rt.stats.frame(True).macs
            return {(id(m), k): m._buffers[k] for m in self.geo.layers for k in saved[id(m)]}
        finally:
            for m in self.geo.layers:
                for k, v in saved[id(m)].items():
                    m._buffers[k] = v
                if isinstance(m, Sparsify):
                    m._scratch.clear()
                    m._scratch.update(scratch[id(m)])
            (rt.keyframe, rt.stateless, rt.dense_above, rt.dense_limit, rt.track_change, rt.input_change,
             rt.input_mask, rt.stats) = flags
