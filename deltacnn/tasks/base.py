"""What every task shares: the Task protocol, output comparison, box metrics, NMS and box drawing.

A *task* adapts a network to video: it loads the model, turns an RGB frame into the model input,
decodes and draws the output, and scores a delta result against the dense one (`agreement`).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn


class Task(Protocol):
    """How deltacnn drives a model on video."""

    name: str

    def load_model(self) -> nn.Module: ...

    def preprocess(self, frame_rgb: np.ndarray) -> Tensor: ...  # HxWx3 uint8 -> (1, 3, h, w) float

    def postprocess(self, output) -> Any: ...

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray: ...

    def agreement(self, result, reference) -> dict[str, float]: ...  # task metric vs dense result


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(boxes: np.ndarray, scores: np.ndarray, ref_boxes: np.ndarray, iou_thr: float = 0.5,
                classes: np.ndarray | None = None, ref_classes: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy (by score) one-to-one matching at IoU >= iou_thr (and the same class when both class arrays
    are given): for each box the index of its reference box (-1: none), and the IoU of the pair."""
    n, m = len(boxes), len(ref_boxes)
    match, ious = np.full(n, -1, np.int64), np.zeros(n)
    if n == 0 or m == 0:
        return match, ious
    iou = iou_matrix(boxes, ref_boxes)
    if classes is not None and ref_classes is not None:
        iou = np.where(np.asarray(classes)[:, None] == np.asarray(ref_classes)[None, :], iou, 0.0)
    taken = np.zeros(m, bool)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        cand = np.where(~taken, iou[i], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= iou_thr:
            taken[j], match[i], ious[i] = True, j, cand[j]
    return match, ious


def f1_scores(tp: int, n: int, n_ref: int) -> dict[str, float]:
    """F1, precision and recall of `tp` matches among `n` boxes and `n_ref` reference boxes (0 of 0: 1)."""
    p = tp / n if n else 1.0
    r = tp / n_ref if n_ref else 1.0
    return {"f1": 2 * p * r / (p + r) if p + r > 0 else 0.0, "precision": p, "recall": r}


def box_f1(boxes: np.ndarray, scores: np.ndarray, ref_boxes: np.ndarray, iou_thr: float = 0.5,
           classes: np.ndarray | None = None, ref_classes: np.ndarray | None = None) -> dict[str, float]:
    """F1 / precision / recall / mean matched IoU of `match_boxes`. Both empty counts as F1 = 1."""
    n, m = len(boxes), len(ref_boxes)
    if n == 0 and m == 0:
        return {"f1": 1.0, "precision": 1.0, "recall": 1.0, "mean_iou": 1.0, "n": 0.0, "n_ref": 0.0}
    match, ious = match_boxes(boxes, scores, ref_boxes, iou_thr, classes, ref_classes)
    hit = match >= 0
    return {**f1_scores(int(hit.sum()), n, m), "mean_iou": float(ious[hit].mean()) if hit.any() else 0.0,
            "n": float(n), "n_ref": float(m)}


def nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(boxes), bool)
    iou = iou_matrix(boxes, boxes)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= iou[i] >= thr
    return np.asarray(keep, dtype=np.int64)


def draw_rect(img: np.ndarray, box, color, thickness: int = 2) -> None:
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
    y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
    t = thickness
    img[y1:min(y1 + t, h), x1:x2 + 1] = color
    img[max(y2 - t + 1, 0):y2 + 1, x1:x2 + 1] = color
    img[y1:y2 + 1, x1:min(x1 + t, w)] = color
    img[y1:y2 + 1, max(x2 - t + 1, 0):x2 + 1] = color


def draw_labelled_box(img: np.ndarray, box, color, label: str, thickness: int = 2) -> None:
    """A rectangle with `label` on a filled strip above it (inside the frame when the box touches the top)."""
    import cv2

    draw_rect(img, box, color, thickness)
    h, w = img.shape[:2]
    x1, y1 = max(0, min(int(round(box[0])), w - 1)), max(0, min(int(round(box[1])), h - 1))
    scale = 0.4
    (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1
    img[top:top + th + base + 2, x1:min(w, x1 + tw + 4)] = color
    text = (255, 255, 255) if sum(color) < 400 else (0, 0, 0)
    cv2.putText(img, label, (x1 + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, text, 1, cv2.LINE_AA)


# ---- raw outputs ---------------------------------------------------------------------------------
def output_tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def flat_output(out) -> Tensor:
    ts = output_tensors(out)
    return torch.cat([t.detach().float().reshape(-1).cpu() for t in ts]) if ts else torch.zeros(0)


def to_float(out):
    """Outputs of a half-precision delta model as float32, so tasks decode them like dense ones."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(to_float(o) for o in out)
    if isinstance(out, list):
        return [to_float(o) for o in out]
    if isinstance(out, dict):
        return {k: to_float(v) for k, v in out.items()}
    return out


def rel_error(a, b) -> float:
    """Relative L2 error of output `a` versus reference `b` (all output tensors together)."""
    fa, fb = flat_output(a), flat_output(b)
    if fa.shape != fb.shape:
        return float("nan")
    denom = float(fb.norm())
    return float((fa - fb).norm()) / denom if denom > 0 else float((fa - fb).norm())
