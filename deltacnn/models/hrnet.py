"""An HRNet-style pose network: parallel resolutions with repeated cross-resolution fusion.

Small by default (a test model); it brings many-to-many sums of strided and upsampled paths.
"""
from __future__ import annotations

from torch import Tensor, nn


class Basic(nn.Module):
    """Residual block of two 3x3 conv-BN at constant width and resolution."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def _down(cin: int, cout: int, steps: int) -> nn.Sequential:
    """steps stride-2 3x3 conv-BN; intermediate ones keep cin and get a ReLU, the last maps to cout with none
    (its output is summed before the fusion ReLU), as in HRNet."""
    layers: list[nn.Module] = []
    for i in range(steps):
        last = i == steps - 1
        c = cout if last else cin
        layers += [nn.Conv2d(cin, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c)]
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _up(cin: int, cout: int, factor: int) -> nn.Sequential:
    """1x1 conv-BN then nearest upsampling by a fixed scale_factor (fx-traceable, no size read from tensors)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.Upsample(scale_factor=factor, mode="nearest"))


class Fuse(nn.Module):
    """Every output branch i is ReLU(sum over input branches j brought to branch i's resolution and width)."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.paths = nn.ModuleList()
        for i, ci in enumerate(widths):
            row = nn.ModuleList()
            for j, cj in enumerate(widths):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution -> up
                    row.append(_up(cj, ci, 2 ** (j - i)))
                else:  # higher resolution -> down
                    row.append(_down(cj, ci, i - j))
            self.paths.append(row)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        outs = []
        for row in self.paths:
            y = row[0](xs[0])
            for j in range(1, len(xs)):  # len(xs) is a Python constant while tracing
                y = y + row[j](xs[j])
            outs.append(self.relu(y))
        return outs


class HRNetLike(nn.Module):
    """Stem to 1/4, transitions adding the 1/8, 1/16 ... branches, `stages` x (residual blocks per branch, fusion),
    and a 1x1 heatmap head on the 1/4 branch."""

    def __init__(self, in_channels: int = 3, num_classes: int = 17, widths: tuple[int, ...] = (32, 64, 128),
                 stages: int = 2, blocks: int = 1) -> None:
        super().__init__()
        c0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 3, 2, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(True),
                                  nn.Conv2d(c0, c0, 3, 2, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(True))
        self.transitions = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i - 1], widths[i], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[i]),
                          nn.ReLU(True)) for i in range(1, len(widths)))
        self.stages = nn.ModuleList()
        for _ in range(stages):
            branches = nn.ModuleList(nn.Sequential(*[Basic(c) for _ in range(blocks)]) for c in widths)
            self.stages.append(nn.ModuleList([branches, Fuse(widths)]))
        self.head = nn.Conv2d(c0, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        xs = [self.stem(x)]
        for t in self.transitions:
            xs.append(t(xs[-1]))
        for branches, fuse in self.stages:
            xs = fuse([b(v) for b, v in zip(branches, xs)])
        return self.head(xs[0])


def hrnet_like(in_channels: int = 3, num_classes: int = 17, widths: tuple[int, ...] = (32, 64, 128),
               stages: int = 2, blocks: int = 1) -> HRNetLike:
    """Heatmaps at 1/4 resolution; input sides must be divisible by 4 * 2**(len(widths) - 1)."""
    return HRNetLike(in_channels, num_classes, tuple(widths), stages, blocks)
