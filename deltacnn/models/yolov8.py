"""YOLOv8 detection network (n/s/m/l/x), written from its published structure, parameter names as in
Ultralytics' checkpoints (``model.N....``) so their state dicts load as they are.

Structure (Jocher et al., Ultralytics 2023): a CSP backbone of Conv (conv + BN + SiLU) and C2f blocks
with an SPPF at the end; a PAN neck (nearest upsampling, channel concatenation, C2f, strided Conv);
a decoupled anchor-free head (per level two 3x3 Convs and a 1x1 conv for the box distribution, the
same for the class logits), boxes as a distribution over 16 bins per side (DFL).

Written for delta conversion: C2f splits its channels with slices (``y[:, :c]``, ``y[:, c:]``), every
conv is an ordinary module, and only the box decode (DFL softmax, anchors, reshapes) runs after the
last feature maps, as one traced function the converter keeps as a dense tail.
"""
from __future__ import annotations

import math
import os

import torch
import torch.fx
from torch import Tensor, nn

from ..layers.base import check_delta
from ..layers.io import DenseCall, fill_template
from ..tensor import DeltaTensor, all_true_mask, channel_view

__all__ = ["YOLOv8", "SCALES", "yolov8", "decode_boxes", "infer_scale"]

# scale -> (depth multiple, width multiple, max channels), as in the published yolov8.yaml
SCALES: dict[str, tuple[float, float, int]] = {
    "n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768),
    "l": (1.00, 1.00, 512), "x": (1.00, 1.25, 512),
}
REG_MAX = 16
STRIDES = (8, 16, 32)


class Conv(nn.Module):
    """conv (no bias) + BatchNorm (eps 1e-3) + SiLU, 'same' padding for odd kernels."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, with a residual add when asked and the widths match."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 Conv to 2c channels, split in halves; n Bottlenecks chained on the second half; all pieces
    concatenated and mixed by a 1x1 Conv. The split is two channel slices (a delta-convertible op)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        ys = [y[:, :self.c], y[:, self.c:]]
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: a 1x1 Conv, three chained stride-1 max-pools, concat, 1x1 Conv."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(4 * c_, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y0 = self.cv1(x)
        y1 = self.m(y0)
        y2 = self.m(y1)
        return self.cv2(torch.cat([y0, y1, y2, self.m(y2)], 1))


class Concat(nn.Module):
    """Channel concatenation (a parameter-free layer, kept so the layer indices match the checkpoints)."""

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.cat(xs, 1)


class DFL(nn.Module):
    """The fixed 1x1 conv whose weights are 0..reg_max-1: the expectation of each side's bin distribution."""

    def __init__(self, reg_max: int = REG_MAX) -> None:
        super().__init__()
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))


class Detect(nn.Module):
    """Per level: box branch (Conv 3x3, Conv 3x3, conv 1x1 to 4*reg_max) and class branch (to nc logits).

    `forward` returns the raw per-level maps (B, 4*reg_max + nc, H/s, W/s); `decode_boxes` turns them
    into boxes."""

    def __init__(self, nc: int, ch: tuple[int, ...]) -> None:
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), REG_MAX
        c2 = max(16, ch[0] // 4, 4 * REG_MAX)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1))
                                 for c in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in ch)
        self.dfl = DFL(REG_MAX)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [torch.cat([self.cv2[i](x), self.cv3[i](x)], 1) for i, x in enumerate(xs)]


_ANCHORS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _anchors(shapes: tuple[tuple[int, int], ...], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Cell centres (2, A) in grid units and the stride of each anchor (1, A), cached per shape."""
    key = (shapes, str(device), dtype)
    if key not in _ANCHORS:
        pts, strides = [], []
        for (h, w), s in zip(shapes, STRIDES):
            ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) + 0.5,
                                    torch.arange(w, device=device, dtype=dtype) + 0.5, indexing="ij")
            pts.append(torch.stack([xs.reshape(-1), ys.reshape(-1)]))
            strides.append(torch.full((1, h * w), float(s), device=device, dtype=dtype))
        _ANCHORS[key] = (torch.cat(pts, 1), torch.cat(strides, 1))
    return _ANCHORS[key]


@torch.fx.wrap
def decode_boxes(feats: list[Tensor], nc: int, dfl_weight: Tensor) -> Tensor:
    """Raw head maps -> (B, 4 + nc, A): boxes (cx, cy, w, h in input pixels) and class probabilities.

    Each side's distance is the expectation of a softmax over reg_max bins (the DFL weights), measured
    from the cell centre in units of the level's stride. One fx leaf, so delta conversion keeps it as
    the dense tail after the head's feature maps.
    """
    fast = _decode_on_cpu_kernels(feats, nc, dfl_weight)
    if fast is not None:
        return fast
    b = feats[0].shape[0]
    reg = dfl_weight.shape[1]
    flat = torch.cat([f.reshape(b, 4 * reg + nc, -1) for f in feats], 2)
    box, cls = flat[:, :4 * reg], flat[:, 4 * reg:]
    a = box.shape[-1]
    dist = (box.reshape(b, 4, reg, a).softmax(2) * dfl_weight.reshape(1, 1, reg, 1).to(box.dtype)).sum(2)
    anchors, strides = _anchors(tuple((int(f.shape[2]), int(f.shape[3])) for f in feats), box.device, box.dtype)
    lt, rb = dist[:, :2], dist[:, 2:]
    x1y1, x2y2 = anchors - lt, anchors + rb
    xywh = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * strides
    return torch.cat([xywh, cls.sigmoid()], 1)


def _cpu_decode_ok(feats: list[Tensor]):
    """The C++ kernels module when decode_boxes may run on it: float32 CPU maps without grad, outside
    tracing, ONNX export and torch.compile (the exported and traced graphs keep the PyTorch code), on a
    CPU where the kernels build (AVX2); else None."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return None
    if any(f.device.type != "cpu" or f.dtype != torch.float32 or f.requires_grad or f.dim() != 4 for f in feats):
        return None
    from ..backends import cpu_kernels
    k = cpu_kernels.load()
    return k if k is not None and k.has_conv_rows() else None


def _decode_on_cpu_kernels(feats: list[Tensor], nc: int, dfl_weight: Tensor) -> Tensor | None:
    """decode_boxes in one C++ pass over the anchors (cpu_kernels.yolo_decode: ~10 ATen passes, 7 ms a
    768x576 frame at 1 thread, become one) for float32 CPU maps outside tracing and ONNX export, where
    the kernels build (AVX2); None: the PyTorch code above runs. Softmax, expectation and sigmoid use a
    vectorised exp (a few ulp from ATen's)."""
    k = _cpu_decode_ok(feats)
    if k is None:
        return None
    anchors, strides = _anchors(tuple((int(f.shape[2]), int(f.shape[3])) for f in feats), feats[0].device,
                                torch.float32)
    maps = [f.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for f in feats]  # channels_last (no copy if so)
    return k.yolo_decode(maps, anchors, strides.reshape(-1), dfl_weight.reshape(-1).float().contiguous(), nc)


class DeltaBoxDecode(DenseCall):
    """decode_boxes on the head's delta streams, re-decoding only the anchors whose head maps changed.

    The converter gives this layer the head maps as delta streams instead of densified copies (it is
    decode_boxes' `delta_tail`), and a level's concatenation of its box and class maps, used by the decode
    alone, as its two parts (read in place: no cat). It keeps each map's dense value O (O += d at updated
    pixels, as Densify would) and the last decode; on a delta frame it decodes again only the anchors where
    a map was updated (cpu_kernels.yolo_decode_at: the same per-anchor arithmetic as the full decode, so the
    output equals decode_boxes of O, bit for bit) and returns a copy of the cache. On the Triton backend one
    kernel a level adds the deltas into O and decodes every anchor (triton_kernels.yolo_decode_). Elsewhere
    (other devices, dtypes, under torch.compile) it decodes every anchor of O each frame with decode_boxes:
    Densify's semantics without its copies.
    """

    def __init__(self, name: str, template: tuple, macs: int = 0, what: str = "") -> None:
        super().__init__(name, decode_boxes, template, macs, what)
        # the last decode (B, 4 + nc, A) and the identity and version of each O it was made from: not a
        # `state_*` buffer (motion alignment moves those as maps; an O it moves or rewrites changes the key,
        # and the next frame decodes every anchor again)
        self._cache: Tensor | None = None
        self._cache_key: tuple | None = None

    def reset_state(self) -> None:
        super().reset_state()
        self._cache = self._cache_key = None

    def summed_inputs(self, *vals, **kw) -> list[tuple]:
        """(delta input, the state buffer O it is summed into) pairs, in forward's order: what motion's padded
        view steps correct before this layer runs (motion/padded.py, PaddedStep._fix_sums)."""
        args, kwargs = fill_template(self.template, vals)
        feats, _, _ = _decode_args(*args, **kwargs)
        levels = [tuple(f) if isinstance(f, (tuple, list)) else (f,) for f in feats]
        return [(d, f"state_out{i}") for i, d in enumerate(d for lv in levels for d in lv)]

    def _o_key(self, count: int) -> tuple:
        return tuple((id(o), o.data_ptr(), o._version) for o in (self._state(f"out{i}") for i in range(count)))

    def forward(self, *vals, **kw):
        args, kwargs = fill_template(self.template, vals)
        feats, nc, dfl = _decode_args(*args, **kwargs)
        levels = [tuple(f) if isinstance(f, (tuple, list)) else (f,) for f in feats]
        ds = [check_delta(d, self) for lv in levels for d in lv]
        self.rt.stats.record_work(self.name, self.kind, self.macs)
        rt = self.rt
        if rt.stateless:
            return decode_boxes([_joined([d.values for d in lv], rt.dtype) for lv in levels], nc, dfl)
        kinds = {d.dense for d in ds}
        if len(kinds) > 1:
            raise RuntimeError(f"box decode {self.name!r}: keyframe and delta inputs mixed")
        if kinds.pop():
            for i, d in enumerate(ds):
                self._seed_state(f"out{i}", d.values)
            if rt.streams is not None:  # some streams' keyframe: their rows are this pass's output
                sub = decode_boxes([_joined([d.values for d in lv], rt.dtype) for lv in levels], nc, dfl)
                cache = self._cache
                if cache is not None and sub.dtype == cache.dtype and sub.shape[1:] == cache.shape[1:] \
                        and self._cache_key is not None:
                    cache.index_copy_(0, rt.streams, sub)  # those streams' rows, from their new O rows
                    self._cache_key = self._o_key(len(ds))
                return sub
            fresh = False
        else:
            fresh = self._cache_key is not None and self._cache_key == self._o_key(len(ds))
            backend = rt.backend_for(ds[0].values)
            if _kernel_decode(backend) and (out := self._decode_on_triton(levels, ds, nc, dfl)) is not None:
                return out  # O += d and the decode in one launch per level
            for i, d in enumerate(ds):
                backend.accumulate(self._state(f"out{i}"), d)
        return self._decode(levels, ds, nc, dfl, fresh)

    def _state_maps(self, levels: list[tuple]) -> list[list[Tensor]]:
        """Each level's O maps, in the order of its parts."""
        maps, i = [], 0
        for lv in levels:
            maps.append([self._state(f"out{i + j}") for j in range(len(lv))])
            i += len(lv)
        return maps

    def _decode_on_triton(self, levels: list[tuple], ds: list[DeltaTensor] | None, nc: int,
                          dfl: Tensor) -> Tensor | None:
        """Every anchor decoded from O by the Triton kernel (triton_kernels.yolo_decode_), after O += d where `ds`
        (this delta frame's head deltas) is given, in the same launch; None where it does not apply (see
        _triton_decode_parts, _kernel_reads): the caller runs the generic path. The kernel computes in float32
        and rounds the output to the model's dtype once; decode_boxes on an fp16 model computes in fp16, so the
        two differ at fp16 rounding."""
        maps = self._state_maps(levels)
        parts = _triton_decode_parts(maps, dfl, nc)
        if parts is None:
            return None
        from ..backends import triton_kernels as tk
        if self._cache is not None:  # the CPU decode's cache is not kept up to date from here
            self._cache = self._cache_key = None
        deltas = None
        if ds is not None:
            if not all(_kernel_reads(d) for d in ds):
                return None
            deltas, i = [], 0
            for lv in levels:
                lds = ds[i:i + len(lv)]
                i += len(lv)
                box_d, cls_d = _level_split(lds, dfl.numel(), nc, lambda d: d.values)
                box_m, cls_m = _level_split(lds, dfl.numel(), nc, lambda d: d.mask, whole=True)
                deltas.append((box_d, box_m, cls_d, cls_m))
        boxes, classes = parts
        n = boxes[0].shape[0]
        total = sum(int(b.shape[2] * b.shape[3]) for b in boxes)
        out = torch.empty(n, 4 + nc, total, dtype=self.rt.dtype, device=boxes[0].device)
        return tk.yolo_decode_(boxes, classes, dfl, nc, out, STRIDES, deltas)

    def _decode(self, levels: list[tuple], ds: list[DeltaTensor], nc: int, dfl: Tensor, fresh: bool) -> Tensor:
        """The decode of O: the changed anchors into the cache when it is `fresh` (made from these O as they
        were before this frame's updates), else every anchor; a copy of the cache is returned (callers may
        keep or edit it)."""
        maps = self._state_maps(levels)
        if _kernel_decode(self.rt.backend_for(maps[0][0])) and \
                (out := self._decode_on_triton(levels, None, nc, dfl)) is not None:
            return out
        k = _delta_decode_ok(maps, dfl, nc, self.rt.dtype)
        if k is None:
            if self._cache is not None:  # not kept up to date from here: rebuilt when next needed
                self._cache = self._cache_key = None
            return decode_boxes([_joined(m, self.rt.dtype) for m in maps], nc, dfl)
        boxes, classes, offset = k[1]
        anchors, strides = _anchors(tuple((int(m[0].shape[2]), int(m[0].shape[3])) for m in maps),
                                    maps[0][0].device, torch.float32)
        shape = (maps[0][0].shape[0], 4 + nc, anchors.shape[1])
        cache = self._cache
        if not fresh or cache is None or tuple(cache.shape) != shape:  # every anchor
            cache = self._cache = torch.empty(shape, dtype=torch.float32)
            masks = [[all_true_mask(m.shape[0], m.shape[2], m.shape[3], m.device)] for m in boxes]
        else:  # the anchors where a part of the level's head map was updated
            masks, i = [], 0
            for lv in levels:
                masks.append([ds[i + j].mask for j in range(len(lv))])
                i += len(lv)
        k[0].yolo_decode_at(boxes, classes, offset, masks, anchors, strides.reshape(-1),
                            dfl.reshape(-1).float().contiguous(), nc, cache)
        self._cache_key = self._o_key(len(ds))
        return cache.clone()


def _decode_args(feats, nc, dfl_weight):
    """decode_boxes' arguments by name, from the call as the model wrote it."""
    return feats, nc, dfl_weight


def _joined(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    """A level's head map from its parts (box and class maps of a bypassed cat), in the model's dtype."""
    t = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return t.to(dtype)


def _delta_decode_ok(maps: list[list[Tensor]], dfl: Tensor, nc: int, dtype: torch.dtype):
    """(the C++ kernels module, (box maps, class maps, class channel offset)) when DeltaBoxDecode may decode
    in place on the kernels: float32 CPU state outside tracing and compiling, each level one head map of
    4 * reg + nc channels or a box map of 4 * reg and a class map of nc; else None (the full decode)."""
    if dtype != torch.float32:
        return None
    k = _cpu_decode_ok([m for lv in maps for m in lv])
    if k is None:
        return None
    reg = dfl.numel()
    boxes, classes, offsets = [], [], set()
    for lv in maps:
        widths = [int(m.shape[1]) for m in lv]
        if widths == [4 * reg + nc]:
            boxes.append(lv[0]), classes.append(lv[0]), offsets.add(4 * reg)
        elif widths == [4 * reg, nc]:
            boxes.append(lv[0]), classes.append(lv[1]), offsets.add(0)
        else:
            return None
    if len(offsets) != 1:
        return None
    return k, (boxes, classes, offsets.pop())


def _kernel_decode(backend) -> bool:
    """Whether DeltaBoxDecode decodes on `backend` with triton_kernels.yolo_decode_ (the Triton backend)."""
    return backend.name == "triton" and getattr(backend, "kernel_decode", False)


def _kernel_reads(d: DeltaTensor) -> bool:
    """Whether yolo_decode_ reads this head delta as it is: channels_last values (or a channel view) and a
    contiguous (N, 1, H, W) bool mask; else the generic path runs (accumulate, which copies what it needs)."""
    n, _, h, w = d.values.shape
    m = d.mask
    return channel_view(d.values) and m.dtype == torch.bool and tuple(m.shape) == (n, 1, h, w) and m.is_contiguous()


def _level_split(parts: list, reg: int, nc: int, get, whole: bool = False) -> tuple:
    """A level's (box, class) pieces from its parts: [box map, class map], or one joined map whose channel
    ranges [0, 4 reg) and [4 reg, 4 reg + nc) are taken as views (`whole`: the piece is per pixel, a mask,
    and is the joined part's itself)."""
    if len(parts) == 2:
        return get(parts[0]), get(parts[1])
    t = get(parts[0])
    return (t, t) if whole else (t[:, :4 * reg], t[:, 4 * reg:4 * reg + nc])


def _triton_decode_parts(maps: list[list[Tensor]], dfl: Tensor, nc: int) -> tuple[list, list] | None:
    """(box maps, class maps) of the levels' O for triton_kernels.yolo_decode_: float32 channels_last maps on a
    device the kernels run on, outside tracing and compiling, each level one head map of 4 reg + nc channels or
    a box map of 4 reg and a class map of nc, reg a power of two; else None (the PyTorch decode)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return None
    reg = dfl.numel()
    flat = [m for lv in maps for m in lv]
    if reg & (reg - 1) or any(m.dtype != torch.float32 or m.dim() != 4 or not channel_view(m) for m in flat):
        return None
    if not (flat[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    boxes, classes = [], []
    for lv in maps:
        if [int(m.shape[1]) for m in lv] not in ([4 * reg + nc], [4 * reg, nc]):
            return None
        b, c = _level_split(lv, reg, nc, lambda m: m)
        boxes.append(b), classes.append(c)
    return boxes, classes


decode_boxes.delta_tail = DeltaBoxDecode


def _width(c: int, width: float, max_ch: int) -> int:
    return int(math.ceil(min(c, max_ch) * width / 8) * 8)


def _depth(n: int, depth: float) -> int:
    return max(round(n * depth), 1)


class YOLOv8(nn.Module):
    """YOLOv8 detect model: (B, 3, H, W) RGB in [0, 1], H and W multiples of 32 -> (B, 4 + nc, A).

    `model` holds the 23 layers in the checkpoints' order (backbone 0-9, neck 10-21, Detect 22).
    """

    def __init__(self, scale: str = "n", nc: int = 80, names: dict[int, str] | None = None) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"unknown YOLOv8 scale {scale!r}; use one of {', '.join(SCALES)}")
        depth, width, max_ch = SCALES[scale]
        self.scale, self.nc = scale, nc
        self.names = dict(names) if names else {i: f"class {i}" for i in range(nc)}
        c = {k: _width(k, width, max_ch) for k in (64, 128, 256, 512, 1024)}
        d = {k: _depth(k, depth) for k in (3, 6)}
        layers: list[nn.Module] = [
            Conv(3, c[64], 3, 2), Conv(c[64], c[128], 3, 2), C2f(c[128], c[128], d[3], True),      # 0-2
            Conv(c[128], c[256], 3, 2), C2f(c[256], c[256], d[6], True),                          # 3-4 (P3)
            Conv(c[256], c[512], 3, 2), C2f(c[512], c[512], d[6], True),                          # 5-6 (P4)
            Conv(c[512], c[1024], 3, 2), C2f(c[1024], c[1024], d[3], True), SPPF(c[1024], c[1024], 5),  # 7-9
            nn.Upsample(scale_factor=2.0, mode="nearest"), Concat(), C2f(c[1024] + c[512], c[512], d[3]),  # 10-12
            nn.Upsample(scale_factor=2.0, mode="nearest"), Concat(), C2f(c[512] + c[256], c[256], d[3]),   # 13-15
            Conv(c[256], c[256], 3, 2), Concat(), C2f(c[256] + c[512], c[512], d[3]),              # 16-18
            Conv(c[512], c[512], 3, 2), Concat(), C2f(c[512] + c[1024], c[1024], d[3]),            # 19-21
            Detect(nc, (c[256], c[512], c[1024])),                                                 # 22
        ]
        self.model = nn.ModuleList(layers)
        self.stride = STRIDES

    def features(self, x: Tensor) -> list[Tensor]:
        """The head's raw per-level maps (strides 8, 16, 32): everything before the box decode."""
        m = self.model
        x = m[1](m[0](x))
        x = m[2](x)
        p3 = m[4](m[3](x))
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        h12 = m[12](m[11]([m[10](p5), p4]))
        h15 = m[15](m[14]([m[13](h12), p3]))
        h18 = m[18](m[17]([m[16](h15), h12]))
        h21 = m[21](m[20]([m[19](h18), p5]))
        return m[22]([h15, h18, h21])

    def forward(self, x: Tensor) -> Tensor:
        return decode_boxes(self.features(x), self.nc, self.model[22].dfl.conv.weight)


def infer_scale(state_dict: dict[str, Tensor]) -> tuple[str, int]:
    """(scale, number of classes) of a YOLOv8 detect state dict, from its first conv's width and the
    number of bottlenecks in layer 2; ValueError when no scale matches."""
    try:
        c0 = state_dict["model.0.conv.weight"].shape[0]
        n2 = len({k.split(".")[3] for k in state_dict if k.startswith("model.2.m.")})
        nc = state_dict["model.22.cv3.0.2.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a YOLOv8 detect state dict: no {e.args[0]!r}") from None
    for s, (depth, width, max_ch) in SCALES.items():
        if _width(64, width, max_ch) == c0 and _depth(3, depth) == n2:
            return s, int(nc)
    raise ValueError(f"not a YOLOv8 detect state dict: first conv width {c0} and {n2} bottleneck(s) in layer 2 "
                     f"match none of the scales {', '.join(SCALES)}")


def yolov8(scale: str = "n", nc: int = 80, state_dict: dict[str, Tensor] | None = None,
           names: dict[int, str] | None = None) -> YOLOv8:
    """A YOLOv8 detect model in eval mode (random weights unless `state_dict` is given, loaded strictly)."""
    model = YOLOv8(scale, nc, names)
    if state_dict is not None:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shapes differ
            raise ValueError(f"state dict does not fit YOLOv8{scale} (nc={nc}): {e}") from None
        if missing or unexpected:
            raise ValueError(f"state dict does not fit YOLOv8{scale} (nc={nc}): missing {missing[:4]}"
                             f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                             f"{'...' if len(unexpected) > 4 else ''}")
    return model.eval()
