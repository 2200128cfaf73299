"""Wall-clock timing of one model call, with the device synchronised on both sides.

Shared by the command-line tools and the dense peers, so both sides of a speedup are timed the
same way.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[Tensor], Any], x: Tensor, device: torch.device) -> tuple[Any, float]:
    """fn(x) under no_grad and its wall time in ms (the device is synchronised on both sides)."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        y = fn(x)
    sync(device)
    return y, (time.perf_counter() - t0) * 1e3
