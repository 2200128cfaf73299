"""MobileNetV2 and MobileNetV3 (large/small) in the torchvision layout (same module names and state_dict keys).

They bring the layer kinds ResNets lack: depthwise convs, ReLU6/Hardswish, and (V3) squeeze-excitation,
a per-channel product of a feature map with a function of its global average.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn


def _div(v: float, d: int = 8) -> int:
    """Round channels to a multiple of d, never below d nor below 90% of v (torchvision's _make_divisible)."""
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                act: Callable[..., nn.Module] | None = nn.ReLU6, eps: float = 1e-5) -> nn.Sequential:
    """Conv-BN(-activation) as a Sequential, so keys read ``.0.weight`` / ``.1.running_mean`` like torchvision."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def _init(model: nn.Module) -> None:
    """torchvision's MobileNet init: kaiming convs, unit BN, small-normal linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class InvertedResidual(nn.Module):
    """V2 block: 1x1 expand (skipped when t == 1), depthwise 3x3, linear 1x1 project; residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, 1))
        layers += [conv_bn_act(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # use_res_connect is fixed at construction, so this branch is resolved while tracing
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """features (stem, 17 inverted residuals, 1x1 to last_channel), global pool, dropout + linear."""

    # expansion t, channels c, repeats n, first stride s
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        cin = _div(32 * width_mult)
        self.last_channel = _div(1280 * max(1.0, width_mult))
        feats: list[nn.Module] = [conv_bn_act(3, cin, 3, 2)]
        for t, c, n, s in self.CFG:
            cout = _div(c * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        feats.append(conv_bn_act(cin, self.last_channel, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(x.flatten(1))


class SqueezeExcitation(nn.Module):
    """Channel attention: global average -> 1x1 fc1 -> ReLU -> 1x1 fc2 -> Hardsigmoid -> scale the input."""

    def __init__(self, cin: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(cin, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, cin, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class V3Block(nn.Module):
    """V3 inverted residual: optional 1x1 expand, depthwise kxk, optional SE, linear 1x1 project (``block``)."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: Callable[..., nn.Module],
                 stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_bn_act(cin, exp, 1, act=act, eps=_V3_EPS))
        layers.append(conv_bn_act(exp, exp, k, stride, exp, act=act, eps=_V3_EPS))
        if se:
            layers.append(SqueezeExcitation(exp, _div(exp // 4)))
        layers.append(conv_bn_act(exp, cout, 1, act=None, eps=_V3_EPS))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


_V3_EPS = 1e-3  # torchvision builds V3 BatchNorms with eps=0.001: folding must honour bn.eps
# kernel, expansion, out, squeeze-excitation, activation (RE: ReLU, HS: Hardswish), stride; then last_channel
_V3 = {
    "large": ([(3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
               (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
               (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
               (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
               (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1)], 1280),
    "small": ([(3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
               (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
               (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
               (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1)], 1024),
}


class MobileNetV3(nn.Module):
    """features (Hardswish stem, V3 blocks, 1x1 to 6x channels), avgpool, Linear-Hardswish-Dropout-Linear."""

    def __init__(self, kind: str, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        cfg, last = _V3[kind]
        last = _div(last * width_mult)  # torchvision scales last_channel with width_mult
        cin = _div(16 * width_mult)
        feats: list[nn.Module] = [conv_bn_act(3, cin, 3, 2, act=nn.Hardswish, eps=_V3_EPS)]
        for k, e, c, se, a, s in cfg:
            cout = _div(c * width_mult)
            feats.append(V3Block(cin, k, _div(e * width_mult), cout, se, nn.Hardswish if a == "HS" else nn.ReLU, s))
            cin = cout
        feats.append(conv_bn_act(cin, 6 * cin, 1, act=nn.Hardswish, eps=_V3_EPS))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * cin, last), nn.Hardswish(inplace=True), nn.Dropout(dropout),
                                        nn.Linear(last, num_classes))
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2; width_mult scales every layer except the final 1280 (which only grows)."""
    return MobileNetV2(num_classes, width_mult)


def mobilenet_v3_large(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV3:
    """MobileNetV3-Large (15 blocks, SE in 8 of them)."""
    return MobileNetV3("large", num_classes, width_mult)


def mobilenet_v3_small(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV3:
    """MobileNetV3-Small (11 blocks, SE in 9 of them, the first at stride 2)."""
    return MobileNetV3("small", num_classes, width_mult)
