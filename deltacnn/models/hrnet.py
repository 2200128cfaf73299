"""An HRNet-style pose network: parallel resolutions with repeated cross-resolution fusion."""
from __future__ import annotations

from torch import Tensor, nn


class Basic(nn.Module):
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
    """steps stride-2 3x3 convs; ReLU between them, none after the last (summed before the ReLU)."""
    layers: list[nn.Module] = []
    for i in range(steps):
        last = i == steps - 1
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)]
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Fuse(nn.Module):
    """Every output branch sums all input branches brought to its resolution."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.paths = nn.ModuleList()
        for i, ci in enumerate(widths):
            row = nn.ModuleList()
            for j, cj in enumerate(widths):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution -> up
                    row.append(nn.Sequential(nn.Conv2d(cj, ci, 1, bias=False), nn.BatchNorm2d(ci),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                else:
                    row.append(_down(cj, ci, i - j))
            self.paths.append(row)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        outs = []
        for row in self.paths:
            y = row[0](xs[0])
            for j in range(1, len(xs)):
                y = y + row[j](xs[j])
            outs.append(self.relu(y))
        return outs


class HRNetLike(nn.Module):
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

    def forward(self, x: Tensor) -> Tensor:
        xs = [self.stem(x)]
        for t in self.transitions:
            xs.append(t(xs[-1]))
        for branches, fuse in self.stages:
            xs = fuse([b(v) for b, v in zip(branches, xs)])
        return self.head(xs[0])


def hrnet_like(in_channels: int = 3, num_classes: int = 17, widths: tuple[int, ...] = (32, 64, 128),
               stages: int = 2, blocks: int = 1) -> HRNetLike:
    """Heatmaps at 1/4 resolution; input sides divisible by 4 * 2**(len(widths) - 1)."""
    return HRNetLike(in_channels, num_classes, tuple(widths), stages, blocks)
