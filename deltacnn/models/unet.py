"""A UNet: encoder/decoder with skip concatenation, upsampling by bilinear interpolation or transposed conv.

It brings what classifiers lack: channel concatenation and a learned or fixed upsampling.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """(3x3 conv, BN, ReLU) x 2 at constant resolution: the UNet building block."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Up(nn.Module):
    """Upsample x2 (halving channels), concatenate the skip in front, then double conv."""

    def __init__(self, cin: int, cskip: int, cout: int, bilinear: bool) -> None:
        super().__init__()
        self.up: nn.Module
        if bilinear:
            # scale_factor (not a size read from the skip) keeps the graph shape-agnostic for fx
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(cin, cin // 2, 1))
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = double_conv(cin // 2 + cskip, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """depth max-pool downs (channels doubling from base), depth ups, and a 1x1 classifier per pixel."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 64, depth: int = 4,
                 bilinear: bool = True) -> None:
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.inc = double_conv(in_channels, widths[0])
        self.pool = nn.MaxPool2d(2)
        self.downs = nn.ModuleList(double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i], bilinear) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.outc(y)


def unet(in_channels: int = 3, num_classes: int = 2, base: int = 64, depth: int = 4, bilinear: bool = True) -> UNet:
    """Per-pixel logits at input resolution; input height and width must be divisible by 2**depth."""
    return UNet(in_channels, num_classes, base, depth, bilinear)
