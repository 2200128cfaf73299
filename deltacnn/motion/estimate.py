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
confidence used. Everything stays on the frames'
device, batched over streams: no host sync.
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


class PhaseCorrelator:
    """Global translation between consecutive frames of each stream, by windowed phase correlation.

    Frames are converted to grey, average-pooled so that the larger side is at most `max_size` (the
    estimate is scaled back; its precision is then ~0.1 of the pooling factor) and windowed. The
    estimate wraps at half the (pooled) frame size: larger motions are aliased, and usually get a low
    confidence.
    """

    def __init__(self, max_size: int = 256, exclude: int = 3) -> None:
        if max_size < 16:
            raise ValueError(f"max_size must be >= 16 pixels, got {max_size}")
        self.max_size = max_size
        self.exclude = exclude  # half-width of the neighbourhood of the peak left out of the second peak
        self._window: dict = {}

    def prepare(self, x: Tensor) -> tuple[Tensor, int]:
        """(N, h, w) pooled, zero-mean, windowed grey frames and the pooling factor; keep it for the next call."""
        if x.dim() != 4:
            raise ValueError(f"expected (N, C, H, W) frames, got shape {tuple(x.shape)}")
        g = x.float().mean(1, keepdim=True)
        f = max(1, math.ceil(max(g.shape[2:]) / self.max_size))
        if f > 1:
            g = F.avg_pool2d(g, f)
        g = g[:, 0]
        h, w = g.shape[1:]
        sh, sw = _smooth_size(h), _smooth_size(w)  # FFT-friendly: a pooled 214 px side (2 * 107) is 2x slower
        if (sh, sw) != (h, w):
            g = g[:, (h - sh) // 2:(h - sh) // 2 + sh, (w - sw) // 2:(w - sw) // 2 + sw]
        g = g - g.mean((1, 2), keepdim=True)
        h, w = g.shape[1:]
        key = (h, w, g.device)
        win = self._window.get(key)
        if win is None:
            win = self._window[key] = (torch.hann_window(h, periodic=False, device=g.device).unsqueeze(1)
                                       * torch.hann_window(w, periodic=False, device=g.device).unsqueeze(0))
        return g * win, f

    def __call__(self, prev: Tensor, cur: Tensor) -> MotionEstimate:
        """Camera displacement from frames `prev` to `cur`, both (N, C, H, W)."""
        if prev.shape != cur.shape:
            raise ValueError(f"frames differ in shape: {tuple(prev.shape)} vs {tuple(cur.shape)}")
        a, f = self.prepare(prev)
        b, _ = self.prepare(cur)
        return self.correlate(a, b, f)

    def step(self, cur: Tensor) -> MotionEstimate | None:
        """Camera displacement from the frame of the last `step` to `cur` (None on the first call, or after
        a change of shape): the previous frame's spectrum is kept, so each frame is prepared and
        transformed once."""
        b, f = self.prepare(cur)
        spec = torch.fft.rfft2(b)
        last = getattr(self, "_last", None)
        self._last = (tuple(cur.shape), spec, f)
        if last is None or last[0] != tuple(cur.shape):
            return None
        return self.correlate(None, b, f, spectra=(last[1], spec))

    def forget(self) -> None:
        """Drop the frame kept by `step` (a new stream)."""
        self._last = None

    def correlate(self, a: Tensor | None, b: Tensor, factor: int = 1,
                  spectra: tuple[Tensor, Tensor] | None = None) -> MotionEstimate:
        """Estimate from two prepared grey batches (see `prepare`), or from their rfft2 `spectra`."""
        n, h, w = b.shape
        fa, fb = spectra if spectra is not None else (torch.fft.rfft2(a), torch.fft.rfft2(b))
        cross = fa * fb.conj()
        cross = cross / cross.abs().clamp_min(1e-12 * float(h * w))
        surf = torch.fft.irfft2(cross, s=(h, w))  # peak at the displacement d: cur(p) = prev(p + d)
        flat = surf.reshape(n, -1)
        peak, arg = flat.max(1)
        py, px = arg // w, arg % w
        rows = torch.arange(n, device=b.device)

        def at(dy: int, dx: int) -> Tensor:
            return surf[rows, (py + dy) % h, (px + dx) % w]

        def parabola(m: Tensor, c: Tensor, p: Tensor) -> Tensor:
            den = m - 2 * c + p
            off = torch.where(den.abs() > 1e-12, 0.5 * (m - p) / den.where(den.abs() > 1e-12, torch.ones_like(den)),
                              torch.zeros_like(den))
            return off.clamp(-0.5, 0.5)

        sub_y = parabola(at(-1, 0), peak, at(1, 0))
        sub_x = parabola(at(0, -1), peak, at(0, 1))
        # the second peak: the maximum outside the (wrapped) neighbourhood of the first
        yy = torch.arange(h, device=b.device).view(1, h, 1)
        xx = torch.arange(w, device=b.device).view(1, 1, w)
        dy = (yy - py.view(n, 1, 1)).remainder(h)
        dx = (xx - px.view(n, 1, 1)).remainder(w)
        e = self.exclude
        near = (torch.minimum(dy, h - dy) <= e) & (torch.minimum(dx, w - dx) <= e)
        second = surf.masked_fill(near, float("-inf")).reshape(n, -1).amax(1)
        ratio = torch.where(peak > 0, peak / second.clamp_min(1e-30), torch.zeros_like(peak))
        far = (~near).reshape(n, -1).float()
        count = far.sum(1)
        mean = (surf.reshape(n, -1) * far).sum(1) / count
        std = ((((surf.reshape(n, -1) - mean.unsqueeze(1)) * far) ** 2).sum(1) / count).sqrt()
        conf = (peak - mean) / std.clamp_min(1e-30)
        sy = torch.where(py > h // 2, py - h, py).float() + sub_y
        sx = torch.where(px > w // 2, px - w, px).float() + sub_x
        shift = torch.stack([sx, sy], 1) * factor
        return MotionEstimate(shift, conf.float(), ratio.float())


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
