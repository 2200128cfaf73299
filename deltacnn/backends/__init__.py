"""Backend selection: the reference backend everywhere, the Triton backend for CUDA tensors."""
from __future__ import annotations

import os

import torch

from .base import Backend, ConvParams, PointwiseState
from .reference import ReferenceBackend

BACKENDS = ("reference", "syncfree", "triton")


def triton_available() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and why not if it cannot."""
    try:
        from . import triton_backend  # noqa: F401
    except ImportError as e:  # triton missing, or the backend module not built
        return False, f"triton backend unavailable: {e}"
    return True, ""


def get_backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend for tensors on `device`: `name` if given, else Triton on CUDA when available."""
    if name not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
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
