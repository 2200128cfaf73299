"""Camera motion between frames: estimated (global translation by phase correlation) or given by the caller.

Convention used throughout deltacnn.motion: a stream's motion for a frame is the camera displacement
(dx, dy) in pixels since the previous frame, so the scene point seen at pixel p in the previous frame
is seen at p - (dx, dy) now (the camera pans right: dx > 0, the content moves left).

Phase correlation whitens the cross-power spectrum, so the static background (most of the pixels)
gives one sharp peak at the camera shift while moving objects add weaker, smeared peaks elsewhere; a
Hann window removes the frame border's discontinuity, which would otherwise peak at zero shift. The
peak ratio (highest peak over the highest one outside its neighbourhood) is the confidence: ~1 on a
scene cut or a textureless frame, far above 1 on a real translation; the peak-to-sidelobe ratio
(the peak in standard deviations of the rest of the surface) separates the two more widely and is the
confidence used. The frames are pooled first (the larger side to at most 256 px); the pooled peak is
then refined at full resolution in a small window (see PhaseCorrelator.refine), whose cut reads the
rounded coarse estimate on the host (one sync per frame; the rest stays on the frames' device, batched
over streams).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# below this peak-to-sidelobe ratio an estimate is treated as failed (a cut, a textureless frame): measured
# here, unrelated frames give 5-7 (the largest of ~10^5 noise samples), real pans 70-300
MIN_CONFIDENCE = 10.0


@dataclass
class MotionEstimate:
    """Per-stream camera displacement since the previous frame, with how much to trust it."""

    shift: Tensor  # (N, 2) float32 (dx, dy) in input pixels
    # (N,) float32 peak-to-sidelobe ratio: (peak - mean) / std of the correlation surface outside the
    # peak's neighbourhood; math.inf for motion given by the caller
    confidence: Tensor
    # (N,) peak over the highest value outside its neighbourhood: ~1 on a cut, but also low when a large
    # moving object makes a second real peak, which is why the decision uses `confidence`
    peak_ratio: Tensor | None = None
    # (N,) float32 the change a translation leaves unexplained (see `unexplained_change`): ~0 on a pan, ~1
    # where the frame moved in a way no translation describes (forward motion, zoom, parallax); None when
    # not measured (given motion)
    unexplained: Tensor | None = None


class PhaseCorrelator:
    """Global translation between consecutive frames of each stream, by windowed phase correlation.

    Frames are converted to grey, average-pooled so that the larger side is at most `max_size` (the
    estimate is scaled back; its precision is then ~0.1 of the pooling factor) and windowed. The
    estimate wraps at half the (pooled) frame size: larger motions are aliased, and usually get a low
    confidence.
    """

    MAX_KEPT_SPECTRA = 256  # refine's kept prev-window spectra (one per anchor and stream in use)

    def __init__(self, max_size: int = 256, exclude: int = 3, refine: int = 192) -> None:
        if max_size < 16:
            raise ValueError(f"max_size must be >= 16 pixels, got {max_size}")
        if refine and refine < 16:
            raise ValueError(f"refine must be 0 (off) or a window side >= 16 pixels, got {refine}")
        self.max_size = max_size
        self.exclude = exclude  # half-width of the neighbourhood of the peak left out of the second peak
        # side of the full-resolution window that refines a pooled estimate (0: off): a parabola on the
        # pooled peak is biased by up to ~0.3 of the pooling factor (at 640 px: 4 px read as 3.4-5.0);
        # 128 px failed on textureless parts of vtest (the top of a tilt), 192 px did not
        self.refine_size = refine
        self._window: dict = {}
        self._prev_spectra: dict = {}  # refine's prev_keys -> (window, spectrum)

    @staticmethod
    def grey(x: Tensor) -> Tensor:
        """(N, H, W) float grey frames: what `refine` compares."""
        return x.float().mean(1)

    def _hann(self, h: int, w: int, device) -> Tensor:
        key = (h, w, device)
        win = self._window.get(key)
        if win is None:
            win = self._window[key] = (torch.hann_window(h, periodic=False, device=device).unsqueeze(1)
                                       * torch.hann_window(w, periodic=False, device=device).unsqueeze(0))
        return win

    def refine(self, prev: Tensor, cur: Tensor, coarse: Tensor, factor: int,
               prev_keys: list | None = None) -> Tensor:
        """A pooled estimate (N, 2) made sub-pixel accurate at full resolution: a window of `prev` (their grey,
        N x H x W, see `grey`) is phase-correlated with the window of the frames `cur` (N, C, H, W) displaced
        by minus the rounded estimate, and the peak is searched within the pooling factor of zero. Streams
        whose window does not fit in both frames, or whose refined peak is not clearly above the surface,
        keep the coarse estimate. (The windows are cut at host-side offsets: this reads the coarse estimate
        on the host.)

        `prev_keys` (optional, one hashable per row of `prev`: (stream, version) of an anchor frame): the
        windowed spectrum of a `prev` row is kept under its key and reused while key and window are the
        same (the prev window sits at the frame's centre whatever the estimate, so an anchor's is computed
        once: a third of the refinement's transforms)."""
        if not self.refine_size or factor <= 1:
            return coarse
        n, H, W = prev.shape
        ks = coarse.round().to(torch.int64).cpu().tolist()
        # a square window that fits in both frames at every stream's displacement
        side = min(self.refine_size, _smooth_size(H - max(abs(k[1]) for k in ks)),
                   _smooth_size(W - max(abs(k[0]) for k in ks)))
        if side < 16:
            return coarse
        rad = factor + 1
        win = self._hann(side, side, cur.device)
        out = coarse.clone()
        rows, specs, curs = [], [], []
        for i, (kx, ky) in enumerate(ks):
            # prev's window at o, cur's at o - k: both inside their frames
            y0 = _place((H - side) // 2, -ky, H - side)
            x0 = _place((W - side) // 2, -kx, W - side)
            if y0 is None or x0 is None:
                continue
            key = None if prev_keys is None else prev_keys[i]
            specs.append(self._prev_window_spectrum(prev, i, y0, x0, side, win, key))
            curs.append(cur[i, :, y0 - ky:y0 - ky + side, x0 - kx:x0 - kx + side].float().mean(0))  # its grey only
            rows.append(i)
        if not rows:
            return coarse
        b = torch.stack(curs)
        b = (b - b.mean((1, 2), keepdim=True)) * win
        cross = torch.cat(specs) * torch.fft.rfft2(b).conj()
        cross = cross / cross.abs().clamp_min(1e-12 * float(side * side))
        surf = torch.fft.irfft2(cross, s=(side, side))  # peak at e - k: cur window(p) = prev window(p + e - k)
        m = len(rows)
        flat = surf.reshape(m, -1)
        conf = (flat.max(1).values - flat.mean(1)) / flat.std(1).clamp_min(1e-30)
        wrap = torch.arange(-rad, rad + 1, device=cur.device).remainder(side)  # offsets -rad..rad
        near = surf.index_select(1, wrap).index_select(2, wrap)
        peak, arg = near.reshape(m, -1).max(1)
        py, px = arg // (2 * rad + 1), arg % (2 * rad + 1)
        r = torch.arange(m, device=cur.device)

        def at(dy: int, dx: int) -> Tensor:
            return near[r, (py + dy).clamp(0, 2 * rad), (px + dx).clamp(0, 2 * rad)]

        sub_y = _parabola(at(-1, 0), peak, at(1, 0))
        sub_x = _parabola(at(0, -1), peak, at(0, 1))
        e = torch.stack([px.float() - rad + sub_x, py.float() - rad + sub_y], 1)
        k = torch.tensor([ks[i] for i in rows], dtype=torch.float32, device=cur.device)
        # a refined peak further from the coarse one than the pooled estimate's error (~0.3 of the factor)
        # is another structure in the window (vtest's plain facade at the top of a tilt): keep the coarse
        idx = torch.tensor(rows, device=cur.device)
        near_coarse = ((k + e - coarse[idx]).abs() <= 0.5 * factor + 0.5).all(1, keepdim=True)
        good = (conf >= MIN_CONFIDENCE).unsqueeze(1) & near_coarse
        out[idx] = torch.where(good, k + e, coarse[idx])
        return out

    def _prev_window_spectrum(self, prev: Tensor, i: int, y0: int, x0: int, side: int, win: Tensor,
                              key) -> Tensor:
        """rfft2 of row i's zero-mean, windowed window of `prev` at (y0, x0), (1, side, side // 2 + 1); kept
        under `key` (see refine's prev_keys) while the window is the same."""
        where = (y0, x0, side, prev.dtype, prev.device)
        kept = self._prev_spectra.get(key) if key is not None else None
        if kept is not None and kept[0] == where:
            return kept[1]
        a = prev[i:i + 1, y0:y0 + side, x0:x0 + side]
        spec = torch.fft.rfft2((a - a.mean((1, 2), keepdim=True)) * win)
        if key is not None:
            if len(self._prev_spectra) >= self.MAX_KEPT_SPECTRA:
                self._prev_spectra.clear()  # keys of anchors replaced long ago
            self._prev_spectra[key] = (where, spec)
        return spec

    def prepare(self, x: Tensor) -> tuple[Tensor, int]:
        """(N, h, w) pooled, zero-mean, windowed grey frames and the pooling factor; keep it for the next call."""
        g, f = self.pooled(x)
        return self.windowed(g), f

    def windowed(self, g: Tensor) -> Tensor:
        """Pooled grey frames (see `pooled`) times the Hann window: what is correlated (the one place the
        window is applied)."""
        return g * self._hann(*g.shape[1:], g.device)

    def spectrum(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """rfft2 of the windowed pooled frames (what `correlate` takes as `spectra`), the pooled frames
        themselves (not windowed) and the pooling factor."""
        g, f = self.pooled(x)
        return torch.fft.rfft2(self.windowed(g)), g, f

    def pooled(self, x: Tensor) -> tuple[Tensor, int]:
        """(N, h, w) pooled, zero-mean grey frames (not windowed: what `unexplained_change` compares) and the
        pooling factor."""
        if x.dim() != 4:
            raise ValueError(f"expected (N, C, H, W) frames, got shape {tuple(x.shape)}")
        c = x.shape[1]
        f = max(1, math.ceil(max(x.shape[2:]) / self.max_size))
        if f > 1:  # grey and average pooling in one pass over the frame (a channel mean and avg_pool2d are two)
            key = ("pool", c, f, x.device)
            w = self._window.get(key)
            if w is None:
                w = self._window[key] = torch.full((1, c, f, f), 1.0 / (c * f * f), device=x.device)
            g = F.conv2d(x.float(), w, stride=f)[:, 0]
        else:
            g = x.float().mean(1)
        h, w = g.shape[1:]
        sh, sw = _smooth_size(h), _smooth_size(w)  # FFT-friendly: a pooled 214 px side (2 * 107) is 2x slower
        if (sh, sw) != (h, w):
            g = g[:, (h - sh) // 2:(h - sh) // 2 + sh, (w - sw) // 2:(w - sw) // 2 + sw]
        return g - g.mean((1, 2), keepdim=True), f

    def __call__(self, prev: Tensor, cur: Tensor) -> MotionEstimate:
        """Camera displacement from frames `prev` to `cur`, both (N, C, H, W)."""
        if prev.shape != cur.shape:
            raise ValueError(f"frames differ in shape: {tuple(prev.shape)} vs {tuple(cur.shape)}")
        a, f = self.prepare(prev)
        b, _ = self.prepare(cur)
        est = self.correlate(a, b, f)
        est.shift = self.refine(self.grey(prev), cur, est.shift, f)
        return est

    def step(self, cur: Tensor) -> MotionEstimate | None:
        """Camera displacement from the frame of the last `step` to `cur` (None on the first call, or after
        a change of shape): the previous frame's spectrum is kept, so each frame is prepared and
        transformed once."""
        spec, g, f = self.spectrum(cur)
        grey = self.grey(cur) if self.refine_size and f > 1 else None
        last = getattr(self, "_last", None)
        self._last = (tuple(cur.shape), spec, f, grey)
        if last is None or last[0] != tuple(cur.shape):
            return None
        est = self.correlate(None, None, f, spectra=(last[1], spec), size=tuple(g.shape[1:]))
        if grey is not None:
            est.shift = self.refine(last[3], cur, est.shift, f)
        return est

    def forget(self) -> None:
        """Drop the frame kept by `step` (a new stream)."""
        self._last = None

    def correlate(self, a: Tensor | None, b: Tensor | None, factor: int = 1,
                  spectra: tuple[Tensor, Tensor] | None = None, size: tuple[int, int] | None = None
                  ) -> MotionEstimate:
        """Estimate from two prepared grey batches (see `prepare`), or from their rfft2 `spectra` of frames of
        `size` (h, w)."""
        fa, fb = spectra if spectra is not None else (torch.fft.rfft2(a), torch.fft.rfft2(b))
        n = fb.shape[0]
        h, w = size if size is not None else b.shape[1:]
        cross = fa * fb.conj()
        cross = cross / cross.abs().clamp_min(1e-12 * float(h * w))
        surf = torch.fft.irfft2(cross, s=(h, w))  # peak at the displacement d: cur(p) = prev(p + d)
        flat = surf.reshape(n, -1)
        peak, arg = flat.max(1)
        py, px = arg // w, arg % w
        # the peak's (wrapped) neighbourhood by index, (n, ky, kx): it gives the parabola's neighbours and is
        # left out of the second peak and the sidelobe statistics (no h x w masks: ~30 ops fewer a frame)
        ey, ex = min(self.exclude, (h - 1) // 2), min(self.exclude, (w - 1) // 2)
        ny = (py.view(n, 1, 1) + torch.arange(-ey, ey + 1, device=fb.device).view(1, -1, 1)).remainder(h)
        nx = (px.view(n, 1, 1) + torch.arange(-ex, ex + 1, device=fb.device).view(1, 1, -1)).remainder(w)
        idx = (ny * w + nx).reshape(n, -1)
        near = flat.gather(1, idx)
        grid = near.view(n, 2 * ey + 1, 2 * ex + 1)
        zero = torch.zeros_like(peak)
        sub_y = _parabola(grid[:, ey - 1, ex], peak, grid[:, ey + 1, ex]) if ey else zero
        sub_x = _parabola(grid[:, ey, ex - 1], peak, grid[:, ey, ex + 1]) if ex else zero
        second = flat.scatter(1, idx, float("-inf")).amax(1)
        ratio = torch.where(peak > 0, peak / second.clamp_min(1e-30), zero)
        # mean and std outside the neighbourhood: the whole surface's sums minus the neighbourhood's (float64:
        # the sums of squares cancel)
        f64, n64 = flat.double(), near.double()
        count = max(1, h * w - idx.shape[1])
        mean = (f64.sum(1) - n64.sum(1)) / count
        var = ((f64 * f64).sum(1) - (n64 * n64).sum(1)) / count - mean * mean
        conf = ((peak.double() - mean) / var.clamp_min(0).sqrt().clamp_min(1e-30)).float()
        sy = torch.where(py > h // 2, py - h, py).float() + sub_y
        sx = torch.where(px > w // 2, px - w, px).float() + sub_x
        shift = torch.stack([sx, sy], 1) * factor
        return MotionEstimate(shift, conf, ratio.float())


def unexplained_change(prev: Tensor, cur: Tensor, shift: Tensor) -> Tensor:
    """How much of the change from `prev` to `cur` (pooled grey, N x h x w, see PhaseCorrelator.pooled) a
    camera translation by `shift` (N, 2), in pooled pixels, leaves: mean |cur - prev moved by the shift| over
    mean |cur - prev|, both over the pixels that stay in view (a border of the shift, plus 1 px, left out).

    ~0 when the camera pans over a static scene, ~1 when it does not explain the change: a static camera
    (nothing to explain), forward motion, a zoom, strong parallax, a scene cut. The moving objects of the
    scene are in both sums, so a busy scene reads higher.
    """
    from .aligned import translate  # the same resampling the input gets

    n, h, w = cur.shape
    out = torch.ones(n, dtype=torch.float32, device=cur.device)
    for i, (dx, dy) in enumerate(shift.double().cpu().tolist()):
        bx, by = math.ceil(abs(dx)) + 1, math.ceil(abs(dy)) + 1
        if 2 * bx >= w or 2 * by >= h:
            continue  # the shift leaves no overlap: nothing explained
        moved = translate(prev[i:i + 1, None], torch.tensor([[-dx, -dy]]), "bilinear")[0, 0]
        c = cur[i, by:h - by, bx:w - bx]
        plain = (c - prev[i, by:h - by, bx:w - bx]).abs().mean()
        aligned = (c - moved[by:h - by, bx:w - bx]).abs().mean()
        out[i] = (aligned / plain.clamp_min(1e-12)).clamp(max=1.0)
    return out


def _place(want: int, k: int, top: int) -> int | None:
    """A window start o near `want` with o and o + k both in [0, top]; None if there is none."""
    lo, hi = max(0, -k), min(top, top - k)
    return None if lo > hi else min(max(want, lo), hi)


def _parabola(m: Tensor, c: Tensor, p: Tensor) -> Tensor:
    """Sub-sample offset (within +-0.5) of the vertex of the parabola through (-1, m), (0, c), (1, p)."""
    den = m - 2 * c + p
    ok = den.abs() > 1e-12
    off = torch.where(ok, 0.5 * (m - p) / den.where(ok, torch.ones_like(den)), torch.zeros_like(den))
    return off.clamp(-0.5, 0.5)


def _smooth_size(n: int) -> int:
    """The largest m <= n whose prime factors are 2, 3 and 5 (fast FFT sizes); n itself below 16."""
    if n < 16:
        return n
    for m in range(n, 0, -1):
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
    return n


def given_motion(motion, n: int, frame_hw: tuple[int, int], device) -> MotionEstimate:
    """A caller's motion for one frame: a translation (2,) or (N, 2) (dx, dy), or a homography (3, 3) or
    (N, 3, 3) mapping the previous frame's pixel coordinates to the current frame's (as OpenCV's
    findHomography(prev_points, cur_points) returns it).

    Only translations are supported: of a homography the displacement of the frame centre is used,
    with a warning when it moves the frame corners more than half a pixel differently.
    """
    t = torch.as_tensor(motion, dtype=torch.float64).cpu()
    if not torch.isfinite(t).all():
        raise ValueError("camera motion contains NaN or infinity")
    if t.shape in ((2,), (n, 2)):
        shift = t.reshape(-1, 2).expand(n, 2)
    elif t.shape in ((3, 3), (n, 3, 3)):
        shift = _homography_translation(t.reshape(-1, 3, 3).expand(n, 3, 3), frame_hw)
    else:
        raise ValueError(f"camera motion must be a translation of shape (2,) or ({n}, 2), or a homography of shape "
                         f"(3, 3) or ({n}, 3, 3); got shape {tuple(t.shape)}")
    shift = shift.to(torch.float32).to(device)
    return MotionEstimate(shift, torch.full((n,), math.inf, device=device))


def _homography_translation(hm: Tensor, frame_hw: tuple[int, int]) -> Tensor:
    """(N, 2) camera displacement of N homographies prev -> cur: minus the motion of the frame centre."""
    h, w = frame_hw
    pts = torch.tensor([[w / 2, h / 2, 1.0], [0, 0, 1.0], [w, 0, 1.0], [0, h, 1.0], [w, h, 1.0]], dtype=torch.float64)
    mapped = pts @ hm.transpose(1, 2)  # (N, 5, 3)
    if (mapped[..., 2].abs() < 1e-9).any():
        raise ValueError("homography maps a frame corner to infinity; it cannot describe a camera pan")
    moved = mapped[..., :2] / mapped[..., 2:] - pts[:, :2]  # (N, 5, 2) displacement of each point
    centre = moved[:, 0]
    worst = float((moved[:, 1:] - centre.unsqueeze(1)).norm(dim=2).max())
    if worst > 0.5:
        warnings.warn(f"camera motion: the homography is not a translation (its corners move up to {worst:.1f} px "
                      "differently from the frame centre); deltacnn.motion supports translations only and uses the "
                      "centre's displacement, so alignment is off by up to that much at the corners",
                      stacklevel=3)
    return -centre
