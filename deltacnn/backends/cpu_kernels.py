"""Loader of the fused CPU kernels (cpu_kernels.cpp), compiled once per machine on first use.

The C++ source is built with PyTorch's JIT extension builder (needs a C++ compiler and ninja;
both come with the package's setup) into PyTorch's extension cache, so only the first CPU run on a
machine pays the ~40 s build. When the build is impossible, `load()` returns None with the reason
in `load_error()`, and the CPU backend falls back to the pure-PyTorch reference.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_NAME = "deltacnn_cpu_kernels"
_module: ModuleType | None = None
_error: str | None = None
_lock = threading.Lock()  # two threads making their first CPU model at once build and load it once

# activation kinds the fused update implements, with their codes in cpu_kernels.cpp
ACT_CODES = {"identity": 0, "relu": 1, "relu6": 2, "hardtanh": 2, "leaky_relu": 3}


def load() -> ModuleType | None:
    """The compiled module, building it if needed; None if it cannot be built here."""
    if _module is not None or _error is not None:
        return _module
    with _lock:
        return _load_locked()


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported with its logger quiet: on a CUDA build of torch without a GPU its
    import logs "No CUDA runtime is found" to a user's stderr, which says nothing about these CPU kernels."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _load_locked() -> ModuleType | None:
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    if os.environ.get("DELTACNN_NO_CPU_KERNELS") == "1":
        _error = "disabled by DELTACNN_NO_CPU_KERNELS=1"
        return None
    if not _built():
        print("deltacnn: compiling the CPU kernels (once per machine, about a minute)...", file=sys.stderr)
    try:
        cpp_extension = _cpp_extension()
        _module = cpp_extension.load(
            name=_NAME, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: run the reference code instead
        _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"deltacnn: fused CPU kernels unavailable ({_error}); using the slower pure-PyTorch "
                      "reference backend", RuntimeWarning, stacklevel=2)
    return _module


def _built() -> bool:
    """Whether PyTorch's extension cache already holds a build (only decides the progress message)."""
    try:
        cpp_extension = _cpp_extension()
        return any(Path(cpp_extension._get_build_directory(_NAME, verbose=False)).glob("*.so"))
    except Exception:  # a private helper of PyTorch's: if it moves, just print the message
        return False


def load_error() -> str | None:
    """Why load() returned None (None if it has not failed)."""
    return _error
