"""MotionDeltaModel: a converted DeltaModel whose state follows a moving camera.

    dm = deltacnn.convert(cnn, frame)
    mm = deltacnn.motion.MotionDeltaModel(dm, motion="auto")   # or "none", or a (T, N, 2) tensor
    for frame in video:
        out = mm(frame)                 # camera coordinates; mm(frame, motion=(dx, dy)) to give it
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .aligned import StateAligner, map_outputs, probe_geometry, translate
from .estimate import MIN_CONFIDENCE, MotionEstimate, PhaseCorrelator, given_motion


class MotionDeltaModel(nn.Module):
    """Camera-motion-aligned delta inference (translations; see deltacnn/motion/aligned.py).

    Args:
        dm: a DeltaModel from deltacnn.convert (its frames must be multiples of the total stride).
        motion: "auto" (phase correlation between consecutive frames), "none" (plain delta
            inference), or a sequence of per-frame camera displacements, (T, 2) / (T, N, 2)
            translations or (T, 3, 3) / (T, N, 3, 3) homographies (translation part used), entry t
            being the motion from frame t - 1 to frame t (entry 0 is ignored).
        min_confidence: streams whose estimate's peak ratio is below it (a cut, a failed estimate)
            are recomputed on the new frame (a per-stream keyframe).
        resample: how the frame is moved by the sub-stride residual: "nearest" (whole pixels, an
            exact copy) or "bilinear".
        estimator: a PhaseCorrelator to use for "auto".
    """

    def __init__(self, dm, motion="auto", *, min_confidence: float = MIN_CONFIDENCE, resample: str = "nearest",
                 estimator: PhaseCorrelator | None = None) -> None:
        super().__init__()
        if resample not in ("nearest", "bilinear"):
            raise ValueError(f"resample must be 'nearest' or 'bilinear', got {resample!r}")
        if isinstance(motion, str):
            if motion not in ("auto", "none"):
                raise ValueError(f"motion must be 'auto', 'none' or a tensor of per-frame motions, got {motion!r}")
            self._sequence = None
        else:
            self._sequence = torch.as_tensor(motion, dtype=torch.float64)
            motion = "given"
        self.dm = dm
        self.mode = motion
        self.min_confidence = min_confidence
        self.resample = resample
        self.estimator = estimator or PhaseCorrelator()
        self.aligner: StateAligner | None = None
        self.reset_motion()

    def reset_motion(self) -> None:
        self._frames = 0
        self._shape: tuple | None = None
        self._prev: Tensor | None = None  # the previous camera frame (for "auto")
        self.camera: list[list[float]] = []  # per stream: accumulated camera position (x, y), pixels
        self.view: list[list[int]] = []  # per stream: view origin, a multiple of the total stride
        self.last_estimate: MotionEstimate | None = None
        self.last_full: list[bool] = []  # streams recomputed entirely in the last frame (low confidence)

    def reset(self) -> None:
        """Forget all state (the converted model's and the camera's); the next frame is a keyframe."""
        self.dm.reset()
        self.reset_motion()

    @property
    def residual(self) -> list[list[float]]:
        """Per stream, camera position minus view origin: the translation applied to the input frame."""
        return [[c - v for c, v in zip(cs, vs)] for cs, vs in zip(self.camera, self.view)]

    @torch.no_grad()
    def forward(self, x: Tensor, motion=None):
        if self.mode == "none":
            return self.dm(x)
        self.dm._check_input(x)
        n = x.shape[0]
        sig = (tuple(x.shape), x.dtype, x.device)
        if self._shape is not None and sig != self._shape:
            if self.dm.on_input_change != "reset":
                self.dm._check_input(x)  # raises InputChangedError naming both shapes
            self.reset()
        if self._shape is None:  # a new stream: its first frame is the keyframe that fixes the geometry
            self._shape = sig
            self.camera = [[0.0, 0.0] for _ in range(n)]
            self.view = [[0, 0] for _ in range(n)]
            self.last_full = [False] * n
            geometry, out = probe_geometry(self.dm, x)
            self.aligner = StateAligner(self.dm, geometry)
            if self.mode == "auto":
                self._prev = x
            self._frames = 1
            return out
        est = self._motion(x, motion)
        self.last_estimate = est
        shifts = est.shift.double().cpu().tolist()  # the host decides the strips: one sync per frame
        conf = est.confidence.cpu().tolist()
        S = self.aligner.geo.total_stride
        view_shift, full = [], []
        for i in range(n):
            ok = conf[i] >= self.min_confidence
            full.append(not ok)
            if not ok:  # a cut or a failed estimate: the view stays, the stream is recomputed on this frame
                shifts[i] = [0.0, 0.0]
            cam = self.camera[i]
            cam[0] += shifts[i][0]
            cam[1] += shifts[i][1]
            v = [S * round(c / S) for c in cam]
            view_shift.append((v[0] - self.view[i][0], v[1] - self.view[i][1]))
            self.view[i] = v
        self.last_full = full
        res = self.residual
        if self.resample == "nearest":
            res = [[float(round(r)) for r in rs] for rs in res]
        aligned = translate(x, torch.tensor(res), self.resample) if any(any(r) for r in res) else x
        if not self._next_is_keyframe():
            self.aligner.shift(view_shift, aligned, full)
        else:
            self.aligner.recomputed_pixels = self.aligner.recompute_macs = 0
        self._frames += 1
        out = self.dm(aligned)
        return map_outputs(out, torch.tensor(res).neg(), self.aligner.geo.frame_hw)

    def _next_is_keyframe(self) -> bool:
        dm = self.dm
        return dm.frame_index == 0 or (dm.keyframe_interval is not None and dm.frame_index >= dm.keyframe_interval)

    def _motion(self, x: Tensor, motion) -> MotionEstimate:
        n, hw = x.shape[0], tuple(x.shape[2:])
        if motion is not None:
            return given_motion(motion, n, hw, x.device)
        if self.mode == "given":
            t = self._frames
            if t >= self._sequence.shape[0]:
                raise IndexError(f"the motion sequence has {self._sequence.shape[0]} frames; frame {t} has none "
                                 "(pass motion= to the call, or give a longer sequence)")
            return given_motion(self._sequence[t], n, hw, x.device)
        est = self.estimator(self._prev, x)
        self._prev = x
        return est
