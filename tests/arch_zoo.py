"""Architectures people run (torchvision, timm, Ultralytics), built unmodified with random weights.

Shared by tests/test_real_architectures.py and benchmarks/arch_support.py so both check the same
list. Nothing is downloaded: weights=None / pretrained=False, Ultralytics from its yaml files
with YOLO_OFFLINE=1 and a throwaway config dir. Batch norms get random running statistics
(deltacnn.models.randomize_bn_) so that folding them is really exercised.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from deltacnn.models import randomize_bn_


@dataclass(frozen=True)
class Arch:
    """One architecture of the support list.

    `islands`: how many dense islands the model really needs (converted with
    allow_dense_fallback=True only then); `tail_convs`: qualified names of convs that run in a
    dense tail after the last feature map (a detector's box decode), allowed to stay dense.
    """

    id: str
    package: str
    build: Callable[[], nn.Module]
    size: tuple[int, int] = (32, 32)  # the smallest input every listed architecture takes (stride 32)
    islands: int = 0
    tail_convs: tuple[str, ...] = field(default=())

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kw)
    return make


def _tv_detection_backbone(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision
        m = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        return m.backbone  # BackboneWithFPN: returns an OrderedDict of FPN levels
    return make


def _tv_segmentation(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision
        return torchvision.models.get_model(name, weights=None, weights_backbone=None)  # returns {"out": ...}
    return make


def _timm(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False)
    return make


def _yolo(yaml: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo_cfg_"))
        from ultralytics import YOLO
        return YOLO(yaml).model
    return make


ARCHS: list[Arch] = [
    Arch("tv_resnet18", "torchvision", _tv("resnet18")),
    Arch("tv_resnet50", "torchvision", _tv("resnet50")),
    Arch("tv_mobilenet_v2", "torchvision", _tv("mobilenet_v2")),
    Arch("tv_mobilenet_v3_small", "torchvision", _tv("mobilenet_v3_small")),
    Arch("tv_mobilenet_v3_large", "torchvision", _tv("mobilenet_v3_large")),
    Arch("tv_efficientnet_b0", "torchvision", _tv("efficientnet_b0")),
    Arch("tv_regnet_y_400mf", "torchvision", _tv("regnet_y_400mf")),
    Arch("tv_shufflenet_v2_x1_0", "torchvision", _tv("shufflenet_v2_x1_0")),
    Arch("tv_fcos_resnet50_fpn_backbone", "torchvision", _tv_detection_backbone("fcos_resnet50_fpn")),
    Arch("tv_retinanet_resnet50_fpn_backbone", "torchvision", _tv_detection_backbone("retinanet_resnet50_fpn")),
    Arch("tv_deeplabv3_mobilenet_v3_large", "torchvision", _tv_segmentation("deeplabv3_mobilenet_v3_large")),
    Arch("tv_lraspp_mobilenet_v3_large", "torchvision", _tv_segmentation("lraspp_mobilenet_v3_large")),
    Arch("tv_convnext_tiny", "torchvision", _tv("convnext_tiny")),
    Arch("timm_efficientnet_b0", "timm", _timm("efficientnet_b0")),
    Arch("timm_mobilenetv3_large_100", "timm", _timm("mobilenetv3_large_100")),
    Arch("timm_regnety_002", "timm", _timm("regnety_002")),
    Arch("timm_cs3darknet_s", "timm", _timm("cs3darknet_s")),
    Arch("timm_hrnet_w18_small", "timm", _timm("hrnet_w18_small")),
    # the box decode (DFL's fixed 1x1 conv over softmaxed bins, anchors) runs after the maps: a dense tail
    Arch("yolov8n", "ultralytics", _yolo("yolov8n.yaml"), size=(64, 64), tail_convs=("model.22.dfl.conv",)),
    # C2PSA's attention (view, transpose, matmul, softmax, matmul, reshape, view) mixes all pixels: 8 islands,
    # its convs (qkv, proj, positional) stay delta layers
    Arch("yolo11n", "ultralytics", _yolo("yolo11n.yaml"), size=(64, 64), islands=8, tail_convs=("model.23.dfl.conv",)),
]


def build(arch: Arch, seed: int = 0) -> nn.Module:
    """The model in eval mode with seeded random weights and random batch-norm statistics."""
    torch.manual_seed(seed)
    m = arch.build().eval()
    randomize_bn_(m, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    for mod in m.modules():  # LayerNorms start as identities too
        if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
            with torch.no_grad():
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                if mod.bias is not None:
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    return m


# ---- what a conversion covers ---------------------------------------------------------------------
def conv_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of every Conv2d of the dense model on `x`, by qualified name (summed over calls)."""
    macs: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, inp, out, name=name):
                k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
                macs[name] = macs.get(name, 0) + out.numel() * k
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return macs


def _has(model: nn.Module, qualname: str) -> bool:
    try:
        model.get_submodule(qualname)
        return True
    except AttributeError:
        return False


def _conv_names(m: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" if n else prefix for n, s in m.named_modules() if isinstance(s, nn.Conv2d)]


def conv_coverage(model: nn.Module, dm, x: torch.Tensor) -> dict:
    """Where each Conv2d of `model` that runs ended up in the converted `dm`: a delta layer, inside a
    dense island, inside a dense tail (DenseCall), or a plain module call left in the graph (a
    silent dense op); with each group's share of the dense model's conv multiply-adds."""
    from deltacnn.layers import DeltaConv2d, DenseIsland
    from deltacnn.layers.io import DenseCall
    macs = conv_macs(model, x)
    orig = set(macs)  # convs that run (unused modules are not counted)
    delta, island, tail, plain = set(), set(), set(), set()
    for layer in dm.layers.values():
        if isinstance(layer, DeltaConv2d):
            name = layer.name
            if name not in orig:
                base = name.rsplit("_", 1)[0]
                name = base if base in orig else name
            delta.add(name)
    gm = dm.graph_module
    mods = dict(gm.named_modules())
    for m in mods.values():
        if isinstance(m, DenseCall) and isinstance(m.fn, nn.Module):
            # a dense call of a module is named after it (a second call of it gets _1, _2 ...)
            src = m.name if _has(model, m.name) else m.name.rsplit("_", 1)[0]
            # by kind: the converter marks dense calls whose result re-enters the maps as island work
            is_island = isinstance(m, DenseIsland) or m.kind == DenseIsland.kind
            (island if is_island else tail).update(_conv_names(m.fn, src))
    for node in gm.graph.nodes:
        if node.op == "call_module" and not str(node.target).startswith("_delta."):
            plain.update(_conv_names(mods[node.target], node.target))
    missing = orig - delta - island - tail - plain
    total = sum(macs.values()) or 1
    share = lambda names: sum(macs.get(n, 0) for n in names) / total  # noqa: E731
    return {"convs": len(orig), "delta": sorted(delta & orig), "island": sorted(island & orig),
            "tail": sorted(tail & orig), "dense": sorted(plain & orig), "missing": sorted(missing),
            "delta_mac_share": share(delta), "island_mac_share": share(island), "tail_mac_share": share(tail),
            "dense_mac_share": share(plain)}


def leaves(out) -> list[torch.Tensor]:
    """The tensors of a model output of any structure (tensor, dict, list, tuple), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in out for t in leaves(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in leaves(o)]
    return []


def structure(out) -> object:
    """The output's structure with tensors replaced by their shapes (to compare containers)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: structure(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [structure(o) for o in out]
    return out


def moving_clip(frames: int, h: int, w: int, seed: int = 5, objects: int = 4, noise: float = 0.01,
                noisy_fraction: float = 0.15) -> torch.Tensor:
    """(T, 1, 3, H, W): a random textured background, `objects` textured squares moving at different
    speeds, and sensor noise on a random `noisy_fraction` of the pixels each frame (never all: the
    delta paths then gather and scatter real subsets of pixels, not just every pixel)."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.nn.functional.interpolate(torch.randn(1, 3, h // 4 + 2, w // 4 + 2, generator=g), size=(h, w),
                                         mode="bilinear", align_corners=False) + 0.3 * torch.randn(1, 3, h, w, generator=g)
    size = max(6, h // 6)
    tex = torch.randn(objects, 3, size, size, generator=g)
    speed = torch.randint(1, 4, (objects, 2), generator=g)
    start = torch.randint(0, max(1, min(h, w) - size), (objects, 2), generator=g)
    out = []
    for t in range(frames):
        f = bg.clone()
        for k in range(objects):
            y = int(start[k, 0] + speed[k, 0] * t) % (h - size)
            x = int(start[k, 1] + speed[k, 1] * t) % (w - size)
            f[0, :, y:y + size, x:x + size] = tex[k]
        noisy = (torch.rand(1, 1, h, w, generator=g) < noisy_fraction).float()
        out.append(f + noise * noisy * torch.randn(1, 3, h, w, generator=g))
    return torch.stack(out)
