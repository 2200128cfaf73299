"""Dense reference outputs of a clip segment, cached on disk.

`deltacnn tune` compares every trial with the dense model's output on the same frames; on a CPU that
reference costs minutes per tune (200 + 595 YOLOv8n frames), and it is the same on every run. The cache
key holds everything the reference depends on: the task (its class, settings and source code), the
model (architecture and a hash of its weights), deltacnn's own sources (NMS, decodes, kernels), the
clip (path, size and modification time, or an image folder's listing), the frame range, the model
input's shape, the reader as asked for (not the decoder it resolved to), the device (on a GPU its name
and the TF32 settings) and torch's version. References come back on the CPU. Live sources (cameras, streams) are never cached. A result that cannot be stored as tensors
(weights_only) is not cached either. Location: ``$DELTACNN_CACHE_DIR/refs`` (default
``~/.cache/deltacnn/refs``).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

CACHE_ENV = "DELTACNN_CACHE_DIR"
FORMAT = "deltacnn-dense-refs/1"


def cache_dir() -> Path:
    """Where cached references live: ``$DELTACNN_CACHE_DIR/refs``, else ``~/.cache/deltacnn/refs``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/deltacnn").expanduser() / "refs"


def source_fingerprint(source: Any) -> dict | None:
    """What identifies a recorded source's frames: a file's resolved path, size and mtime; an image
    folder's listing with each file's size and mtime. None for cameras and network streams."""
    if isinstance(source, int) or source is None:
        return None
    s = str(source)
    if "://" in s or s.isdigit():
        return None
    p = Path(s).expanduser()
    try:
        p = p.resolve()
        if p.is_file():
            st = p.stat()
            return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(q for q in p.iterdir() if q.is_file()):
                st = f.stat()
                h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            return {"path": str(p), "listing": h.hexdigest()}
    except OSError:
        return None
    return None


def weights_hash(model: nn.Module) -> str:
    """sha256 over the architecture's class and every state-dict entry (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _source_hash(obj: type) -> str:
    """sha256 of the file that defines `obj` (a changed decode or metric invalidates the cache)."""
    try:
        return hashlib.sha256(Path(inspect.getsourcefile(obj) or "").read_bytes()).hexdigest()
    except (OSError, TypeError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def _library_hash() -> str:
    """sha256 of deltacnn's own sources: a task's outputs also depend on helpers outside its class's file
    (NMS, box decode, the C++ kernels), so any change of the library invalidates the cache."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp") and p.is_file()):
        h.update(f"{f.relative_to(root)}\n".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _precision(device: torch.device) -> dict:
    """The float32 precision settings that change a GPU's dense outputs (TF32 in cuDNN and matmuls)."""
    if device.type != "cuda":
        return {}
    return {"cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul": torch.get_float32_matmul_precision(),
            "gpu": torch.cuda.get_device_name(device) if torch.cuda.is_available() else "unknown"}


def _task_settings(task: Any) -> dict:
    """The task's public scalar settings (e.g. YOLOv8's conf, iou, max_det, borderline)."""
    return {k: v for k, v in sorted(vars(task).items())
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}


def reference_key(task: Any, model: nn.Module, source: Any, start: int, count: int,
                  input_shape: Sequence[int], device: torch.device | str, reader: str) -> str | None:
    """The cache key of the dense reference of frames [start, start + count) of `source`, or None when
    the source cannot be fingerprinted (a live source: its frames differ on every run)."""
    src = source_fingerprint(source)
    if src is None:
        return None
    desc = {"format": FORMAT, "task": f"{type(task).__module__}.{type(task).__qualname__}",
            "task_code": _source_hash(type(task)), "library": _library_hash(), "task_settings": _task_settings(task),
            "model_code": _source_hash(type(model)), "weights": weights_hash(model), "source": src,
            "start": int(start), "count": int(count), "input_shape": [int(s) for s in input_shape],
            "device": str(torch.device(device).type), "precision": _precision(torch.device(device)),
            "reader": str(reader), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


class _NotStorable(Exception):
    pass


def _encode(obj: Any) -> Any:
    """Numpy arrays become tagged tensors so the file loads with torch.load(weights_only=True)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise _NotStorable(obj.dtype)
        return {"__np__": torch.from_numpy(np.ascontiguousarray(obj).copy()), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):  # a numpy scalar (e.g. a count from .sum()) stays one
        if isinstance(obj, (np.str_, np.bytes_, np.object_)):
            raise _NotStorable(type(obj).__name__)
        return {"__np__": torch.from_numpy(np.asarray(obj).copy()), "dtype": str(obj.dtype), "scalar": True}
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj) or "__np__" in obj:
            raise _NotStorable("dict keys")
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    if isinstance(obj, (bool, int, float, str, type(None))):
        return obj
    raise _NotStorable(type(obj).__name__)


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__np__" in obj:
            a = obj["__np__"].numpy().astype(obj["dtype"], copy=False)
            return a[()] if obj.get("scalar") else a
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


def load(key: str | None, count: int) -> list | None:
    """The cached references under `key` (None when absent, unreadable or not `count` long)."""
    if key is None:
        return None
    path = cache_dir() / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: recompute (and overwrite it)
        warnings.warn(f"ignoring the unreadable dense-reference cache {path}: {e}", stacklevel=2)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key \
            or len(data.get("refs", ())) != count:
        return None
    return list(_decode(data["refs"]))


def store(key: str | None, refs: Sequence[Any]) -> Path | None:
    """Write `refs` under `key` (atomically); None when not cached (no key, not storable, or the
    directory cannot be written: a warning, the tune goes on)."""
    if key is None:
        return None
    try:
        payload = {"format": FORMAT, "key": key, "refs": _encode(list(refs))}
    except _NotStorable:
        return None
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            path = d / f"{key}.pt"
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
    except OSError as e:
        print(f"deltacnn: cannot write the dense-reference cache in {d}: {e.strerror}", file=sys.stderr)
        return None
