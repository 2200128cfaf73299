"""A small model zoo (no weight downloads): the architectures deltacnn is tested on.

Layouts and parameter names follow torchvision where one exists, so real checkpoints load.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .hrnet import hrnet_like
from .mobilenet import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small
from .resnet import resnet18, resnet50
from .unet import unet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large, "mobilenet_v3_small": mobilenet_v3_small,
    "unet": unet, "hrnet_like": hrnet_like,
}


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name with random weights (nothing is downloaded); kwargs go to the factory."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d random running stats and affine terms (in place, seeded), so BN folding is really
    exercised: fresh BNs (mean 0, var 1, weight 1, bias 0) are near-identities that hide folding bugs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model


__all__ = ["MODELS", "build", "randomize_bn_", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large",
           "mobilenet_v3_small", "unet", "hrnet_like"]
