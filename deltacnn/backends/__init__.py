"""Backend selection: fused C++ kernels on the CPU, Triton on CUDA, the reference backend everywhere else."""
from __future__ import annotations

import os

import torch

from .base import Backend, ConvParams, PointwiseState
from .reference import ReferenceBackend

BACKENDS = ("reference", "cpu", "syncfree", "triton")


def triton_available() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and why not if it cannot."""
    try:
        from . import triton_backend  # noqa: F401
    except ImportError as e:  # triton missing, or the backend module not built
        return False, f"triton backend unavailable: {e}"
    return True, ""


def get_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend for tensors on `device`: `name` if given, else Triton on CUDA when available and
    the fused CPU kernels on the CPU when they build (each falls back to the reference backend)."""
    if name not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got device {device}")
    if name == "cpu" or (name is None and device.type == "cpu"):
        from .cpu_fused import fused_cpu_backend
        return fused_cpu_backend()
    if name == "reference" or (name is None and device.type != "cuda"):
        return ReferenceBackend()
    if name == "syncfree":
        from .syncfree import SyncFreeBackend
        return SyncFreeBackend()
    ok, why = triton_available()
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
        if not ok:
            raise RuntimeError(why)
    if ok:
        from .triton_backend import TritonBackend
        return TritonBackend()
    return ReferenceBackend()


__all__ = ["Backend", "ConvParams", "PointwiseState", "ReferenceBackend", "get_backend", "BACKENDS"]
