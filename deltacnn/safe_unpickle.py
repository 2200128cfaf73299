"""Read a pickled PyTorch checkpoint whose model objects belong to a package we do not import.

A full checkpoint (e.g. Ultralytics' ``yolov8n.pt``) pickles whole ``nn.Module`` objects, so a
plain ``torch.load`` imports their classes and would run whatever a hostile file names
(``os.system``, ``builtins.eval``). `load_checkpoint` instead maps the classes of the allowed
packages to inert placeholders (they only record the state pickle gives them), lets through only
the globals needed to rebuild tensors and containers, and refuses everything else with
`UnsafeCheckpointError`. `module_state_dict` then walks the placeholders to a plain state dict.
"""
from __future__ import annotations

import collections
import os
import pickle
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "Placeholder", "load_checkpoint", "module_state_dict"]

# globals a tensor / parameter / container needs (the storages are resolved by torch.load itself)
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint names a global outside the allowed set (it could run code when loaded)."""


class Placeholder:
    """Stands in for a class of an allowed package: keeps constructor args and pickled state, runs nothing."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<placeholder {self.qualname}>"


def _placeholder_class(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"qualname": f"{module}.{name}", "__module__": "deltacnn.safe_unpickle"})


def _restricted_pickle_module(placeholder_prefixes: tuple[str, ...]):
    """A module object with the `Unpickler` torch.load uses (and `load`, for completeness)."""
    cache: dict[tuple[str, str], type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module == "__builtin__":  # protocol-2 pickles name Python 2's module
                module = "builtins"
            key = (module, name)
            if key in _ALLOWED_GLOBALS:
                return _ALLOWED_GLOBALS[key]
            if any(module == p or module.startswith(p + ".") for p in placeholder_prefixes):
                if key not in cache:
                    cache[key] = _placeholder_class(module, name)
                return cache[key]
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name} from the checkpoint: only tensors, containers and "
                f"the classes of {', '.join(placeholder_prefixes)} (as inert placeholders) are allowed, so the "
                "file may be malicious or is not a checkpoint of the expected kind")

    class _Module:
        Unpickler = RestrictedUnpickler
        UnpicklingError = pickle.UnpicklingError

        @staticmethod
        def load(f, **kw):
            return RestrictedUnpickler(f, **kw).load()

    return _Module


def load_checkpoint(path: str | os.PathLike,
                    placeholder_prefixes: tuple[str, ...] = ("ultralytics", "torch.nn.modules")) -> Any:
    """The checkpoint's object tree, with classes of `placeholder_prefixes` as `Placeholder`s (on the CPU)."""
    return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle_module(placeholder_prefixes),
                      weights_only=False)


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a placeholder module tree (its `_parameters`, persistent `_buffers`, `_modules`)."""
    out: dict[str, torch.Tensor] = {}
    state = getattr(obj, "__dict__", {})
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for k, v in (state.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v.detach()
    for k, v in (state.get("_buffers") or {}).items():
        if v is not None and k not in non_persistent:
            out[prefix + k] = v
    for k, m in (state.get("_modules") or {}).items():
        if m is not None:
            out.update(module_state_dict(m, f"{prefix}{k}."))
    return out
