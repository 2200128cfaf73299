"""MotionDeltaModel: a converted DeltaModel whose state follows a moving camera.

    dm = deltacnn.convert(cnn, frame)
    mm = deltacnn.motion.MotionDeltaModel(dm, motion="auto")   # or "none", or a (T, N, 2) tensor
    for frame in video:
        out = mm(frame)                 # camera coordinates; mm(frame, motion=(dx, dy)) to give it
"""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import torch
from torch import Tensor, nn

from .aligned import StateAligner, map_outputs, probe_geometry, translate
from .files import MOTION_CHOICES, load_motion_file
from .estimate import MIN_CONFIDENCE, MotionEstimate, PhaseCorrelator, given_motion, unexplained_change

# "auto": above this fraction of the frame's change left unexplained by the estimated translation (see
# estimate.unexplained_change), the stream is not treated as translating: its camera position is held,
# i.e. plain delta inference on its frames. Measured against an anchor 1-8 frames back: the vtest pans and
# tilts (2-4 px/frame, people walking, codec noise) 0.23-0.55, Market Street's forward motion 0.97-1.0,
# cityCC0's moving time-lapse 0.82-0.97 (its translation is < 1 px: alignment changes nothing there)
MAX_UNEXPLAINED = 0.75
# "auto", still camera: above this fraction of a stream's input pixels changed in a frame, the next frame is
# estimated (MotionDeltaModel._woken; so is the frame after a busy or dense one). vtest.avi's still camera
# changes 2.6-16% of its input pixels a frame (people walking, codec noise), the same view panned by 4 px
# unaligned 17% (gated, relative thresholds) to 96% (tau 0).
WAKE_CHANGE = 0.5
_ANCHOR_SERIALS = itertools.count(1)  # see MotionDeltaModel._next_serial


def _columns_on_host(shift: Tensor, confidence: Tensor, unexplained: Tensor | None = None
                     ) -> tuple[list[list[float]], list[float], list[float] | None]:
    """(N, 2) shifts, (N,) confidences and optionally (N,) unexplained fractions as host lists, in one
    device-to-host transfer (float64: the float32 values exactly, and confidence's inf for given motion)."""
    cols = [shift.double(), confidence.double()[:, None]]
    if unexplained is not None:
        cols.append(unexplained.double()[:, None])
    rows = torch.cat(cols, 1).cpu().tolist()
    return [r[:2] for r in rows], [r[2] for r in rows], ([r[3] for r in rows] if unexplained is not None else None)


class MotionSequenceError(IndexError):
    """A given motion sequence ended before the clip did."""


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
            exact copy; the shift changes once the camera moved HOLD_PX = 0.75 px from it) or "bilinear".
        estimator: a PhaseCorrelator to use for "auto".
        max_residual: how far (input pixels) the camera may drift from the view origin before the view
            steps. None (default): S / 2, the view origin is the multiple of S nearest the camera, so
            motion by multiples of S leaves no residual (exact, item 3). A larger value M steps the view
            less often and by more (it lands M - S/2 ahead of the camera in the direction it drifted:
            at M = S a steady pan steps 2S every 2S px instead of S every S); on YOLOv8n every view
            step is a keyframe, so that halves them, at the cost of up to M px at the frame's edge that
            the camera did not see (replicated border) and outputs equal to dense on the camera frame
            moved by a residual up to M instead of S / 2.
        max_unexplained: "auto" only: when the estimated translation leaves more than this fraction of
            the frame's change (against the anchor frame) unexplained, the stream's camera position is
            held for that frame (no alignment: plain delta inference on it, while `translating` is
            False); forward motion, zooms and strong parallax are not translations, and following the
            wandering estimate there costs accuracy. None: always follow the estimate.
        edge: what the aligned frame holds where the camera frame does not reach (a band of the residual's
            width at the view's edge): "hold" (default) keeps what the view last saw there (the input
            reference: the scene the camera saw before it moved on, or the keyframe's replicated edge),
            so the band is no change for the delta step; "replicate" repeats the camera frame's edge
            pixels, which change on every frame of a pan.
        still_every: "auto" only: once the estimates found every stream still (< STILL_PX from its anchor) on
            STILL_RUN consecutive estimates, the motion is estimated on one frame in `still_every` only (the
            others take zero motion: the estimator is a static camera's whole overhead); 1: every frame. A
            camera that starts to move in a skipped frame is caught up at the next estimate (the estimate
            is against the anchor); that frame runs as plain delta inference on the shifted view (correct,
            as dense as plain delta's frames). With `wake_change`, the next estimate is the next frame.
            Default 8 (with the wake; session 14, YOLOv8n on vtest.avi's still camera, 1 thread, paired, one
            run): +4.4% mean / +2.4% paired median over plain delta, against +6.1% / +3.7% at 3 (session 12
            chose 3 without the wake: +2.6-3.8% paired median at 2 threads, +5.3-6.0% at 2).
        wake_change: "auto" with still_every > 1: a frame that ran densely, went busy, or changed more than
            this fraction of a stream's input pixels (the converted model's input layer counts them) makes
            the next frame an estimate (see `_woken`). None: only still_every decides.
        view_step: how the state follows a view step. "bands" (default): the network is recomputed on
            crops covering bands of `halo` around both borders, or the whole view when they cover it (a
            keyframe: every view step of YOLOv8n). "padded": inside the frame's delta pass, each layer
            recomputes only its uncovered strip and a thin band at each view border from its own current
            input, and the strip and bands reach its consumers as deltas (motion/padded.py); exact at
            tau 0 like the bands, but on YOLOv8n at 640x448 the view step's change still reaches most
            of the deep and head layers (a step frame does ~64% of dense MACs in sparse kernels, crops
            13%), which costs more than the keyframe on the cpu backend (motion6 in BENCHMARKS.md).
        halo: view_step="bands" only: width (input pixels, rounded up to a multiple of the total stride) of
            the border bands recomputed when the view moves. None: the network's receptive-field bound R, which makes
            the result exact but, for deep nets (YOLOv8n: R = 832 px), recomputes the whole view on
            every view step. A smaller halo is an approximation: the state within R of the view
            border keeps a trace of the old border's padding (measure it, e.g. with task F1).
    """

    def __init__(self, dm, motion="auto", *, min_confidence: float = MIN_CONFIDENCE, resample: str = "nearest",
                 estimator: PhaseCorrelator | None = None, halo: int | None = None,
                 max_residual: float | None = None, max_unexplained: float | None = MAX_UNEXPLAINED,
                 edge: str = "hold", still_every: int = 8, wake_change: float | None = WAKE_CHANGE,
                 view_step: str = "bands") -> None:
        super().__init__()
        from .aligned import VIEW_STEPS
        if view_step not in VIEW_STEPS:
            raise ValueError(f"view_step must be one of {VIEW_STEPS}, got {view_step!r}")
        if halo is not None and view_step != "bands":
            raise ValueError("halo= sets the width of view_step='bands'; padded view steps need no bands")
        self.view_step = view_step
        if not isinstance(still_every, int) or still_every < 1:
            raise ValueError(f"still_every must be an int >= 1 (1: estimate every frame), got {still_every!r}")
        self.still_every = still_every
        if wake_change is not None and not (isinstance(wake_change, (int, float)) and 0 < wake_change <= 1):
            raise ValueError(f"wake_change must be a fraction of the input's pixels in (0, 1] or None (no wake), "
                             f"got {wake_change!r}")
        self.wake_change = wake_change
        if edge not in ("hold", "replicate"):
            raise ValueError(f"edge must be 'hold' or 'replicate', got {edge!r}")
        self.edge = edge
        self.max_unexplained = max_unexplained
        if max_residual is not None and not (isinstance(max_residual, (int, float)) and max_residual >= 0):
            raise ValueError(f"max_residual must be a number of pixels >= 0 or None (half the total stride), "
                             f"got {max_residual!r}")
        self.max_residual = max_residual
        if resample not in ("nearest", "bilinear"):
            raise ValueError(f"resample must be 'nearest' or 'bilinear', got {resample!r}")
        if halo is not None and (not isinstance(halo, int) or halo < 0):
            raise ValueError(f"halo must be a number of pixels >= 0 or None (the exact bound), got {halo!r}")
        self.halo = halo
        if isinstance(motion, (str, os.PathLike)) and motion not in MOTION_CHOICES:
            if not os.path.isfile(motion):
                raise ValueError(f"motion must be 'auto', 'none', a motion file or a tensor of per-frame motions; "
                                 f"{str(motion)!r} is none of these (no such file)")
            motion = load_motion_file(motion)
        if isinstance(motion, str):
            self._sequence = None
        else:
            self._sequence = torch.as_tensor(motion, dtype=torch.float64)
            if self._sequence.dim() not in (2, 3, 4) or self._sequence.shape[-1] not in (2, 3) or \
                    (self._sequence.shape[-1] == 3 and self._sequence.shape[-2] != 3) or \
                    (self._sequence.shape[-1] == 2 and self._sequence.dim() == 4):
                raise ValueError("a motion sequence must be (T, 2) / (T, N, 2) translations or (T, 3, 3) / "
                                 f"(T, N, 3, 3) homographies; got shape {tuple(self._sequence.shape)}")
            motion = "given"
        self.dm = dm
        self.mode = motion
        if motion == "auto" and still_every > 1 and wake_change is not None:
            dm.rt.track_streams = True  # the input layer keeps each stream's changed fraction (rt.stream_change)
        self.min_confidence = min_confidence
        self.resample = resample
        self.estimator = estimator or PhaseCorrelator()
        self.aligner: StateAligner | None = None
        self.reset_motion()

    def reset_motion(self) -> None:
        self._frames = 0
        self._shape: tuple | None = None
        self.camera: list[list[float]] = []  # per stream: accumulated camera position (x, y), pixels
        self.aligned_at: list[list[int]] = []  # per stream ("nearest"): the whole-pixel position aligned to
        self.view: list[list[int]] = []  # per stream: view origin, a multiple of the total stride
        self.last_estimate: MotionEstimate | None = None
        self.last_full: list[bool] = []  # streams recomputed entirely in the last frame (low confidence)
        self.translating: list[bool] = []  # per stream: the last frame's motion was followed (see max_unexplained)
        self.input_shift: list[list[float]] = []  # per stream: the translation applied to the last frame
        self.view_frame: Tensor | None = None  # the frame the converted model got last (aligned, edges held)
        self._anchor: Tensor | None = None  # "auto": spectra of the anchor frames (see _estimate_from_anchor)
        self.estimated = True  # "auto": whether the last frame's motion was estimated (see still_every)
        self._still_run: list[int] = []  # "auto", per stream: consecutive estimates that found it still
        self._skipped = 0  # "auto": frames since the last estimate

    def reset(self) -> None:
        """Forget all state (the converted model's and the camera's); the next frame is a keyframe."""
        self.dm.reset()
        self.reset_motion()

    @property
    def residual(self) -> list[list[float]]:
        """Per stream, camera position minus view origin (`input_shift`: the translation applied to the frame)."""
        return [[c - v for c, v in zip(cs, vs)] for cs, vs in zip(self.camera, self.view)]

    @torch.no_grad()
    def forward(self, x: Tensor, motion=None):
        if self.mode == "none":
            return self.dm(x)
        if not isinstance(x, Tensor) or x.dim() != 4 or self._shape is None:
            self.dm._check_input(x)  # the full check (a pass over the frame) runs again in dm before any state
            # changes, and here only before the state is moved (below)
        n = x.shape[0]
        sig = (tuple(x.shape), x.dtype, x.device)
        if self._shape is not None and sig != self._shape:
            if self.dm.on_input_change != "reset":
                self.dm._check_input(x)  # raises InputChangedError naming both shapes
            self.reset()
        if self._shape is None:  # a new stream: its first frame is the keyframe that fixes the geometry
            self._shape = sig
            self.camera = [[0.0, 0.0] for _ in range(n)]
            self.aligned_at = [[0, 0] for _ in range(n)]
            self.view = [[0, 0] for _ in range(n)]
            self.last_full = [False] * n
            self.translating = [True] * n
            geometry, out = probe_geometry(self.dm, x)
            if self.halo is not None:  # the caller's approximation: narrower bands than the exact bound
                S = geometry.total_stride
                geometry.halo = min(geometry.halo, S * -(-self.halo // S))
            self.aligner = StateAligner(self.dm, geometry, self.view_step)
            self.input_shift = [[0.0, 0.0] for _ in range(n)]
            if self.mode == "auto":
                self._anchor_to(x, list(range(n)))
            self._frames = 1
            self.view_frame = x
            return out
        est = self._motion(x, motion)
        self.last_estimate = est
        # the host decides the strips: one transfer per frame for the shifts, confidences and the check
        shifts, conf, unexplained = _columns_on_host(est.shift, est.confidence, est.unexplained)
        if unexplained is None:
            unexplained = [0.0] * n
        S = self.aligner.geo.total_stride
        view_shift, full = [], []
        self.translating = []
        for i in range(n):
            ok = conf[i] >= self.min_confidence
            full.append(not ok)
            follow = self.max_unexplained is None or unexplained[i] <= self.max_unexplained
            self.translating.append(follow)
            if not ok or not follow:  # a cut or a failed estimate (the stream is recomputed on this frame), or
                shifts[i] = [0.0, 0.0]  # motion that is no translation (plain delta): the view stays
            cam = self.camera[i]
            cam[0] += shifts[i][0]
            cam[1] += shifts[i][1]
            if self.resample == "nearest":  # the whole-pixel position the input is aligned to, with a hold
                held = self.aligned_at[i]
                for ax in (0, 1):
                    if abs(cam[ax] - held[ax]) >= self.HOLD_PX:
                        held[ax] = round(cam[ax])
                v = self._view_origin(held, self.view[i], S)
            else:
                v = self._view_origin(cam, self.view[i], S)
            view_shift.append((v[0] - self.view[i][0], v[1] - self.view[i][1]))
            self.view[i] = v
        self.last_full = full
        if self.resample == "nearest":
            res = [[float(a - v) for a, v in zip(al, vs)] for al, vs in zip(self.aligned_at, self.view)]
        else:
            res = self.residual
        self.input_shift = res
        aligned = translate(x, torch.tensor(res), self.resample) if any(any(r) for r in res) else x
        due = self._due_streams(n)
        # due and moved: the stream's reference is an old view's, so it must not take the converted model's
        # busy-stream rule (see _as_keyframes); due but still: the converted model's own schedule decides,
        # exactly as without alignment (a held camera, e.g. forward motion, is then plain delta inference)
        keyframes = [i for i, d in enumerate(due) if d and (any(view_shift[i]) or full[i])]
        if any(any(v) for v in view_shift) or any(full) or any(due):
            self.dm._check_input(x)  # NaN or infinity: rejected before the state moves
        if not all(due):  # streams due for a keyframe (interval, refresh, after dense frames) need no shift
            keyframes += self.aligner.shift([(0, 0) if d else v for d, v in zip(due, view_shift)], aligned,
                                            [f and not d for f, d in zip(full, due)])
        else:
            self.aligner.recomputed_pixels = self.aligner.recompute_macs = 0
        # a stream recomputed on a cut or failed estimate whose view did not move keeps a reference of this
        # view: the converted model's busy-stream rule decides between keyframe and dense frame, as without
        # alignment (forcing a keyframe there made cityCC0's busy frames after its cut delta frames)
        self._as_keyframes(keyframes, aligned, copy_ref=[bool(any(v)) for v in view_shift])
        if self.edge == "hold" and aligned is not x:
            self._hold_edges(aligned, res, set(keyframes) | {i for i, d in enumerate(due) if d})
        self.view_frame = aligned
        self._frames += 1
        with self.aligner.delta_pass():  # padded view steps ride on this pass (motion/padded.py)
            out = self.dm(aligned)
        if self.aligner.stepped:
            self._forget_step_work(self.aligner.stepped, n)
        return map_outputs(out, torch.tensor(res).neg(), self.aligner.geo.frame_hw)

    def _forget_step_work(self, streams: list[int], n: int) -> None:
        """A padded view step's own work (the strip and border bands through the network, several times a
        still frame's at low thresholds) is no reason for the converted model's busy-stream rule to run the
        next frames densely: that rule is about the input's change, which the step does not raise."""
        lim = self.dm.rt.dense_limit
        if lim is None:
            return
        lim = list(lim) if isinstance(lim, list) else [lim] * n
        for i in streams:
            lim[i] = None
        self.dm.rt.dense_limit = None if all(v is None for v in lim) else (lim[0] if len(set(lim)) == 1 else lim)

    def _view_origin(self, pos, view: list[int], S: int) -> list[int]:
        """The view origin (multiples of S) for a camera at `pos`, the view being at `view` (see max_residual)."""
        M = self.max_residual
        if M is None or M <= S / 2:
            return [S * round(c / S) for c in pos]
        out = []
        for c, v in zip(pos, view):
            r = c - v
            out.append(v if abs(r) <= M else S * round((c + math.copysign(M - S / 2, r)) / S))
        return out

    def camera_boxes(self, boxes, stream: int = 0):
        """Boxes (..., 4) xyxy that the model's outputs gave in view coordinates, in camera coordinates
        (spatial output maps are mapped back by forward itself; decoded boxes are not maps)."""
        if not self.input_shift:
            return boxes
        tx, ty = self.input_shift[stream]
        if not (tx or ty):
            return boxes
        off = [tx, ty, tx, ty]
        if isinstance(boxes, Tensor):
            return boxes - torch.tensor(off, dtype=boxes.dtype, device=boxes.device)
        return np.asarray(boxes, dtype=np.float64) - np.asarray(off)

    def camera_result(self, result, frame_hw: tuple[int, int] | None = None, stream: int = 0):
        """A task's decoded result (a dict with ``boxes``-like xyxy arrays) moved to camera coordinates,
        the boxes clipped to the frame (`frame_hw`, default the model's input size)."""
        if not isinstance(result, dict):
            return result
        h, w = frame_hw or (self.aligner.geo.frame_hw if self.aligner is not None else (None, None))
        out = dict(result)
        for k, v in result.items():
            if k.endswith("boxes") and getattr(v, "ndim", 0) == 2 and v.shape[-1] == 4:
                b = self.camera_boxes(v, stream)
                if w is not None:
                    b = b.copy() if not isinstance(b, Tensor) else b.clone()
                    b[:, 0::2] = b[:, 0::2].clip(0, w)
                    b[:, 1::2] = b[:, 1::2].clip(0, h)
                out[k] = b.astype(v.dtype) if hasattr(b, "astype") else b
        return out

    def _as_keyframes(self, streams: list[int], aligned: Tensor, copy_ref: list[bool] | None = None) -> None:
        """Make the converted model run `streams` as keyframes on the aligned frame: due, and (where
        copy_ref, default all: their view moved) with the aligned frame as their input reference, so that
        the busy-stream rule (which compares the frame with the reference, here an old view's) does not
        turn the keyframe into a stateless dense frame, and a moving camera into dense frames for good."""
        ref = self.aligner.input_layer._buffers.get("state_ref")
        for i in streams:
            self.dm._since[i] = 0
            if ref is not None and (copy_ref is None or copy_ref[i]):
                ref[i].copy_(aligned[i].to(ref.dtype))

    def _hold_edges(self, aligned: Tensor, res: list[list[float]], skip: set[int]) -> None:
        """Where the translated frame has no camera pixels (|residual| px at one edge per axis), put the
        input reference's values (no change for the delta step), except in the streams `skip` (keyframes and
        streams due for one, moved or not: their reference is being rebuilt from this frame)."""
        ref = self.aligner.input_layer._buffers.get("state_ref")
        if ref is None:
            return
        H, W = aligned.shape[2:]
        for i, (tx, ty) in enumerate(res):
            if i in skip:
                continue
            bx, by = (int(round(t)) if self.resample == "nearest" else int(math.copysign(math.ceil(abs(t)), t))
                      for t in (tx, ty))
            if bx > 0:
                aligned[i, :, :, :bx] = ref[i, :, :, :bx]
            elif bx < 0:
                aligned[i, :, :, W + bx:] = ref[i, :, :, W + bx:]
            if by > 0:
                aligned[i, :, :by] = ref[i, :, :by]
            elif by < 0:
                aligned[i, :, H + by:] = ref[i, :, H + by:]

    def _due_streams(self, n: int) -> list[bool]:
        """Per stream, whether the converted model will run it as a keyframe next (its state is rebuilt)."""
        dm = self.dm
        if dm.frame_index == 0 or len(dm._since) != n:
            return [True] * n
        return [dm._due(i) for i in range(n)]

    def _motion(self, x: Tensor, motion) -> MotionEstimate:
        n, hw = x.shape[0], tuple(x.shape[2:])
        if motion is not None:
            return given_motion(motion, n, hw, x.device)
        if self.mode == "given":
            t = self._frames
            if t >= self._sequence.shape[0]:
                raise MotionSequenceError(f"the motion sequence has {self._sequence.shape[0]} frames; frame {t} has none "
                                 "(pass motion= to the call, or give a longer sequence)")
            return given_motion(self._sequence[t], n, hw, x.device)
        return self._estimate_from_anchor(x)

    # ---- "auto": estimates against an anchor frame, so that estimator noise does not accumulate -----
    # "nearest": the input's whole-pixel shift follows the camera only once it moved this far from it, so
    # that sub-pixel jitter (a shaky or forward-moving camera: Market Street's estimates wander within
    # +-0.6 px) does not shift the whole input by 1 px back and forth (a frame where every pixel changes,
    # and the detector's own 1 px shift variance: F1 0.8 on those frames there)
    HOLD_PX = 0.75
    REFINE_PX = 0.25  # "auto": refine again once the pooled estimate moved this far (see _refined)
    REANCHOR_PX = 16.0  # a new anchor once the camera moved this far from the anchor (keeps the overlap large)
    REANCHOR_FRAMES = 50  # ... or this many frames after it (the scene's movers drift away from the anchor)
    # ... or once the confidence fell below this fraction of the first estimate's against the anchor (and
    # below REANCHOR_CONFIDENCE x min_confidence): a stale anchor (a time-lapse: cityCC0's confidence falls
    # from ~400 to ~40 in 15 frames) brings the frames before a cut close to the threshold that detects
    # the cut (~6 there). Relative, so that a confidence that is low but steady (sensor noise on a static
    # camera) does not re-anchor every frame and chain the estimates' noise into a drift.
    REANCHOR_DECAY = 0.25
    STILL_PX = 0.5  # "auto": below this displacement from the anchor the camera counts as still (translating)
    STILL_RUN = 2  # "auto": still estimates in a row before frames are skipped (see still_every)
    REANCHOR_CONFIDENCE = 8.0

    @staticmethod
    def _next_serial() -> int:
        """A number no anchor of any model had before (refine's keys for the anchors' window spectra: an
        estimator may be shared by several models)."""
        return next(_ANCHOR_SERIALS)

    def _anchor_to(self, x: Tensor, streams: list[int], spec: Tensor | None = None,
                   pooled: Tensor | None = None) -> None:
        """Make the current frame (its spectrum `spec`, its pooled grey `pooled`) the anchor of `streams`, at
        their camera positions."""
        if spec is None:
            spec, pooled, _ = self.estimator.spectrum(x)
        grey = self.estimator.grey(x[streams] if len(streams) < x.shape[0] else x)  # for the sub-pixel refinement
        if getattr(self, "_anchor", None) is None or self._anchor.shape != spec.shape or len(streams) == x.shape[0]:
            self._anchor = spec.clone()
            self._anchor_pooled = pooled.clone()  # what unexplained_change compares the frames with
            self._anchor_grey = grey if len(streams) == x.shape[0] else self.estimator.grey(x)
            self._anchor_cam = [list(c) for c in (self.camera or [[0.0, 0.0]] * x.shape[0])]
            self._anchor_age = [0] * x.shape[0]
            self._anchor_conf = [math.inf] * x.shape[0]  # the first estimate's confidence against the anchor
            self._refined_at = [None] * x.shape[0]  # per stream: (pooled, refined) estimates at the last refinement
            self._anchor_serial = [self._next_serial() for _ in range(x.shape[0])]  # refine's prev_keys
            return
        for j, i in enumerate(streams):
            self._anchor[i] = spec[i]
            self._anchor_pooled[i] = pooled[i]
            self._anchor_grey[i] = grey[j]
            self._anchor_cam[i] = list(self.camera[i])
            self._anchor_age[i] = 0
            self._anchor_conf[i] = math.inf
            self._refined_at[i] = None
            self._anchor_serial[i] = self._next_serial()

    def _refined(self, x: Tensor, coarse: Tensor, factor: int) -> Tensor:
        """The pooled estimates (vs the anchor) refined at full resolution, for the streams whose pooled
        estimate moved more than REFINE_PX since their last refinement; the others reuse that
        refinement plus the pooled estimate's change (a static camera refines once per anchor: the
        refinement is ~40% of the estimator's time)."""
        if factor <= 1 or not self.estimator.refine_size:
            return coarse
        c = coarse.double().cpu().tolist()
        last = self._refined_at
        todo = [i for i in range(len(c))
                if last[i] is None or max(abs(a - b) for a, b in zip(c[i], last[i][0])) > self.REFINE_PX]
        out = [None if last[i] is None else [r + a - b for r, a, b in zip(last[i][1], c[i], last[i][0])]
               for i in range(len(c))]
        if todo:
            keys = [(i, self._anchor_serial[i]) for i in todo]  # an anchor's window spectrum is computed once
            if todo == list(range(todo[0], todo[-1] + 1)):  # consecutive streams: views (x[sel] copies frames)
                part = slice(todo[0], todo[-1] + 1)
            else:
                part = torch.tensor(todo, device=x.device)
            fine = self.estimator.refine(self._anchor_grey[part], x[part], coarse[part], factor,
                                         keys).double().cpu().tolist()
            for j, i in enumerate(todo):
                out[i] = fine[j]
                last[i] = (c[i], fine[j])
        return torch.tensor(out, dtype=coarse.dtype, device=coarse.device)

    def _woken(self) -> bool:
        """Whether the last frame looked like a camera that started to move, so that this frame is estimated
        whatever still_every says: a stream ran densely or went busy (its deltas did most of a dense frame's
        work: the converted model's busy rule), or more than wake_change of its input pixels changed. A
        4 px/frame pan's first unaligned frame on vtest.avi changes only 17% of the gated input pixels (a
        still camera there: 2-3%) but does 88% of the multiply-adds. Such frames are near-dense anyway,
        so estimating after every busy frame of a still camera (a crowd) costs little next to them."""
        if self.wake_change is None:
            return False
        dm = self.dm
        if "dense" in dm.last_modes:
            return True
        lim = dm.rt.dense_limit
        if isinstance(lim, list) and any(v is not None for v in lim):
            return True
        change = dm.rt.stream_change
        return change is not None and float(change.max()) > self.wake_change

    def _estimate_from_anchor(self, x: Tensor) -> MotionEstimate:
        """The camera displacement since the last frame, as (position vs the anchor) - (last position).

        Chaining frame-to-frame estimates adds their noise up (a random walk of ~0.1 px per frame, which
        on a static camera soon rounds to a 1 px shift of the whole input, i.e. a frame where every
        pixel changes); measured against an anchor frame the position error stays that of one estimate.
        """
        n = x.shape[0]
        if len(self._still_run) != n:
            self._still_run = [0] * n
        if self.still_every > 1 and min(self._still_run) >= self.STILL_RUN and self._skipped < self.still_every - 1 \
                and not self._woken():
            # every stream still: no estimate on this frame (zero motion, the last confidence)
            self._skipped += 1
            self.estimated = False
            self._anchor_age = [a + 1 for a in self._anchor_age]
            last = self.last_estimate
            zero = torch.zeros(n, dtype=torch.float32, device=x.device)
            return MotionEstimate(torch.zeros(n, 2, dtype=torch.float32, device=x.device),
                                  last.confidence if last is not None else zero + math.inf, None, zero)
        self._skipped = 0
        self.estimated = True
        spec, g, f = self.estimator.spectrum(x)
        est = self.estimator.correlate(None, None, f, spectra=(self._anchor, spec), size=tuple(g.shape[1:]))
        est.shift = self._refined(x, est.shift, f)
        d, conf, _ = _columns_on_host(est.shift, est.confidence)
        unexplained = [0.0] * x.shape[0]
        if self.max_unexplained is not None and any(max(abs(v) for v in di) >= self.STILL_PX for di in d):
            unexplained = unexplained_change(self._anchor_pooled, g, est.shift / f).tolist()
        step, renew = [], []
        for i in range(x.shape[0]):
            ok = conf[i] >= self.min_confidence
            pos = [a + v for a, v in zip(self._anchor_cam[i], d[i])] if ok else list(self.camera[i])
            step.append([p - c for p, c in zip(pos, self.camera[i])])
            if max(abs(v) for v in d[i]) < self.STILL_PX and ok:
                unexplained[i] = 0.0  # a still camera: nothing for a translation to explain, nothing to hold
                self._still_run[i] += 1
            else:
                self._still_run[i] = 0
            if ok and self.max_unexplained is not None and unexplained[i] > self.max_unexplained:
                # not a translation: forward holds the camera, and the anchor's position is moved so
                # that the next step is the motion from this frame on (not a jump by all the held motion)
                self._anchor_cam[i] = [a - v for a, v in zip(self._anchor_cam[i], step[i])]
            self._anchor_age[i] += 1
            if self._anchor_age[i] == 1:
                self._anchor_conf[i] = conf[i]
            stale = conf[i] < min(self.REANCHOR_DECAY * self._anchor_conf[i],
                                  self.REANCHOR_CONFIDENCE * self.min_confidence)
            if not ok or stale or max(abs(v) for v in d[i]) >= self.REANCHOR_PX or \
                    self._anchor_age[i] >= self.REANCHOR_FRAMES:
                renew.append(i)
        shift = torch.tensor(step, dtype=torch.float32, device=x.device)
        held = torch.tensor(unexplained, dtype=torch.float32, device=x.device)
        if renew:  # anchored at the position this frame will have (forward adds `step` to the camera, or
            saved = [list(c) for c in self.camera]  # holds it: then the anchor is where the camera is)
            for i in renew:
                if self.max_unexplained is None or unexplained[i] <= self.max_unexplained:
                    self.camera[i] = [c + v for c, v in zip(self.camera[i], step[i])]
            self._anchor_to(x, renew, spec, g)
            self.camera = saved
        return MotionEstimate(shift, est.confidence, est.peak_ratio, held)


def motion_record(mm: MotionDeltaModel, stream: int = 0) -> dict:
    """Per-frame motion fields for run records: the camera motion used, its confidence, the view
    origin, whether the stream was recomputed, and the border-band work of the last frame."""
    est = mm.last_estimate
    dx, dy = (est.shift[stream].tolist() if est is not None else (0.0, 0.0))
    conf = float(est.confidence[stream]) if est is not None else float("inf")
    al = mm.aligner
    h, w = al.geo.frame_hw if al is not None else (1, 1)
    view = mm.view[stream] if mm.view else [0, 0]
    unexplained = float(est.unexplained[stream]) if est is not None and est.unexplained is not None else 0.0
    return {"motion_dx": dx, "motion_dy": dy, "motion_confidence": conf, "view_x": view[0], "view_y": view[1],
            "motion_unexplained": unexplained,
            "motion_translating": int(bool(mm.translating[stream])) if mm.translating else 1,
            "motion_estimated": int(bool(mm.estimated)),
            "motion_recomputed": int(bool(mm.last_full and mm.last_full[stream])),
            "band_fraction": (al.recomputed_pixels / (h * w * max(1, len(mm.view)))) if al is not None else 0.0,
            "band_macs": al.recompute_macs if al is not None else 0}
