"""Pointwise nonlinearities that delta layers re-evaluate on accumulated inputs.

An `ActSpec` names the function and its parameters once, so the reference backend, the Triton
epilogue and the converter all agree on what "leaky_relu(0.2)" means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_FUNCS: dict[str, Callable[["ActSpec", Tensor], Tensor]] = {
    "identity": lambda s, x: x,
    "relu": lambda s, x: F.relu(x),
    "relu6": lambda s, x: F.hardtanh(x, 0.0, 6.0),
    "hardtanh": lambda s, x: F.hardtanh(x, s.min_val, s.max_val),
    "leaky_relu": lambda s, x: F.leaky_relu(x, s.slope),
    "silu": lambda s, x: F.silu(x),
    "hardswish": lambda s, x: F.hardswish(x),
    "hardsigmoid": lambda s, x: F.hardsigmoid(x),
    "sigmoid": lambda s, x: torch.sigmoid(x),
    "tanh": lambda s, x: torch.tanh(x),
    "gelu": lambda s, x: F.gelu(x, approximate=s.approximate),
    "elu": lambda s, x: F.elu(x, s.alpha),
}

ACTIVATIONS = tuple(_FUNCS) + ("prelu",)

# in-place forms, for dense passes that own their intermediate tensors (saves an allocation and a
# memory pass per layer on the CPU)
_INPLACE: dict[str, Callable[["ActSpec", Tensor], Tensor]] = {
    "identity": lambda s, x: x,
    "relu": lambda s, x: F.relu_(x),
    "relu6": lambda s, x: F.hardtanh_(x, 0.0, 6.0),
    "hardtanh": lambda s, x: F.hardtanh_(x, s.min_val, s.max_val),
    "leaky_relu": lambda s, x: F.leaky_relu_(x, s.slope),
    "silu": lambda s, x: F.silu(x, inplace=True),
    "hardswish": lambda s, x: F.hardswish(x, inplace=True),
    "hardsigmoid": lambda s, x: F.hardsigmoid(x, inplace=True),
    "sigmoid": lambda s, x: x.sigmoid_(),
    "tanh": lambda s, x: x.tanh_(),
    "elu": lambda s, x: F.elu_(x, s.alpha),
}


@dataclass(frozen=True)
class ActSpec:
    """A pointwise function f with its parameters. `prelu_weight` holds PReLU's per-channel slope."""

    kind: str
    slope: float = 0.01
    min_val: float = -1.0
    max_val: float = 1.0
    alpha: float = 1.0
    approximate: str = "none"
    prelu_weight: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.kind!r}; known: {', '.join(ACTIVATIONS)}")

    def __call__(self, x: Tensor, channel_dim: int = 1) -> Tensor:
        """Apply f to `x`; `channel_dim` says where channels are (1 for NCHW, -1 for rows)."""
        if self.kind == "prelu":
            w = self.prelu_weight.to(x.dtype)
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            w = w.reshape(shape) if w.numel() > 1 else w.reshape([1] * x.dim())
            return torch.where(x >= 0, x, w * x)
        return _FUNCS[self.kind](self, x)

    def apply_(self, x: Tensor) -> Tensor:
        """f(x), overwriting `x` where PyTorch has an in-place form (else a new tensor)."""
        fn = _INPLACE.get(self.kind)
        return fn(self, x) if fn is not None else self(x)

    def describe(self) -> str:
        extra = {"leaky_relu": f"({self.slope})", "hardtanh": f"({self.min_val},{self.max_val})",
                 "gelu": f"({self.approximate})" if self.approximate != "none" else "", "elu": f"({self.alpha})"}
        return self.kind + extra.get(self.kind, "")


def truncation_score(o: Tensor, score: str) -> Tensor:
    """Per-pixel score of a candidate change `o` (rows: pixels, columns: channels)."""
    if score == "max":
        return o.abs().amax(dim=1)
    if score == "l2":
        return torch.linalg.vector_norm(o, dim=1)
    raise ValueError(f"truncation score must be 'max' or 'l2', got {score!r}")

