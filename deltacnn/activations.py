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

# f(spec, x, inplace): with inplace=True, x may be overwritten (dense passes that own their
# intermediates save an allocation and a memory pass); functions without an in-place form ignore it
_FUNCS: dict[str, Callable[["ActSpec", Tensor, bool], Tensor]] = {
    "identity": lambda s, x, ip: x,
    "relu": lambda s, x, ip: F.relu(x, inplace=ip),
    "relu6": lambda s, x, ip: F.hardtanh(x, 0.0, 6.0, inplace=ip),
    "hardtanh": lambda s, x, ip: F.hardtanh(x, s.min_val, s.max_val, inplace=ip),
    "leaky_relu": lambda s, x, ip: F.leaky_relu(x, s.slope, inplace=ip),
    "silu": lambda s, x, ip: F.silu(x, inplace=ip),
    "hardswish": lambda s, x, ip: F.hardswish(x, inplace=ip),
    "hardsigmoid": lambda s, x, ip: F.hardsigmoid(x, inplace=ip),
    "sigmoid": lambda s, x, ip: x.sigmoid_() if ip else torch.sigmoid(x),
    "tanh": lambda s, x, ip: x.tanh_() if ip else torch.tanh(x),
    "gelu": lambda s, x, ip: F.gelu(x, approximate=s.approximate),
    "elu": lambda s, x, ip: F.elu(x, s.alpha, inplace=ip),
}

ACTIVATIONS = tuple(_FUNCS) + ("prelu",)


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
        return _FUNCS[self.kind](self, x, False)

    @property
    def commutes_with_rounding(self) -> bool:
        """f(x) computed in a low-precision dtype equals f(float32 x) rounded to it (max/min against
        0 and 6 only), so keyframes may apply f in the model dtype, skipping a float32 temporary."""
        return self.kind in ("identity", "relu", "relu6")

    def apply_(self, x: Tensor) -> Tensor:
        """f(x), overwriting `x` where PyTorch has an in-place form (else a new tensor)."""
        if self.kind == "prelu":
            return self(x)
        return _FUNCS[self.kind](self, x, True)

    def describe(self) -> str:
        extra = {"leaky_relu": f"({self.slope})", "hardtanh": f"({self.min_val},{self.max_val})",
                 "gelu": f"({self.approximate})" if self.approximate != "none" else "", "elu": f"({self.alpha})"}
        return self.kind + extra.get(self.kind, "")


# the truncation scores by the codes compiled kernels (Triton, C++) take for them
SCORE_CODES = {"max": 0, "l2": 1}


def truncation_score(o: Tensor, score: str) -> Tensor:
    """Per-pixel score of a change `o` over its channels, dim 1: rows of a (P, C) matrix or an
    (N, C, H, W) map."""
    if score == "max":
        return o.abs().amax(dim=1)
    if score == "l2":
        return torch.linalg.vector_norm(o, dim=1)
    raise ValueError(f"truncation score must be 'max' or 'l2', got {score!r}")

