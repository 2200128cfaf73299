"""Shape-aware torch.fx tracing: every proxy carries a meta tensor of the example input's shapes.

A delta model is static per stream (DeltaModel refuses, or resets on, a shape change), so
everything derived from shapes is a constant of the stream: `x.shape`, `x.size(1)`, `x.dim()`,
`len(x)` and arithmetic on them return plain Python values while tracing, and the graph holds
literals (`F.interpolate(y, size=x.shape[-2:])`, `x[:, : x.shape[1] // 2]`). Proxies whose
value is a tuple or list (`conv(x).chunk(2, 1)`) can be iterated and unpacked; a root
`forward(self, x, *args, **kwargs)` is traced with the extra arguments left out. Python
control flow on tensor *data* cannot be traced: the error names the node, the op and the
user's source line, and says what to do.

Meta tensors cost no compute and no memory; an op without a meta implementation just leaves
its node without meta (its shape is then unknown while tracing, which only matters if the
model asks for it).
"""
from __future__ import annotations

import linecache
import os
import sys
import threading
import types
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, fx, nn
from torch.fx._symbolic_trace import _orig_module_call  # noqa: F401 - the unpatched nn.Module.__call__

from .errors import ConversionError

META = "deltacnn_meta"  # node.meta key: the meta value (tensor, tuple, ...) of the node's result
SOURCE = "deltacnn_source"  # node.meta key: "file:line in function: code" of the user code that made the node
_UNKNOWN = object()

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONCRETE_ATTRS = {"shape", "ndim", "dtype", "layout", "is_sparse", "is_quantized", "is_meta"}
_CONCRETE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
                     "element_size", "is_contiguous"}

WHAT_TO_DO = ("To convert it: decorate the function that holds this logic with torch.fx.wrap (it then runs as one "
              "opaque op, a dense island with allow_dense_fallback=True), make the module that holds it a leaf with "
              "convert(..., leaf_modules=[ModuleClass or 'qualified.name']) (likewise a dense island), or move the "
              "logic out of forward()")


def user_frame(frame: types.FrameType | None = None) -> str | None:
    """'file:line in function: code' of the innermost frame outside torch and deltacnn (the user's code)."""
    f = frame if frame is not None else sys._getframe(1)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if not (name.startswith(_TORCH_DIR) or name.startswith(_OWN_DIR) or f.f_code.co_filename.startswith("<")):
            line = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
            return f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}: {line}"
        f = f.f_back
    return None


def _tb_user_frame(tb: types.TracebackType | None) -> str | None:
    """The innermost user frame of an exception's traceback."""
    last = None
    while tb is not None:
        name = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if not (name.startswith(_TORCH_DIR) or name.startswith(_OWN_DIR) or name.startswith("<")):
            last = tb
        tb = tb.tb_next
    if last is None:
        return None
    code = last.tb_frame.f_code
    line = linecache.getline(code.co_filename, last.tb_lineno).strip()
    return f"{code.co_filename}:{last.tb_lineno} in {code.co_name}: {line}"


def describe_node(node: fx.Node) -> str:
    """'graph node 'x' (calls Y)' plus where the user's code made it, for error messages."""
    t = node.target
    what = t if isinstance(t, str) else getattr(t, "__qualname__", getattr(t, "__name__", repr(t)))
    if node.op == "call_method":
        what = f".{what}()"
    elif node.op == "call_module":
        what = f"module {t}"
    src = node.meta.get(SOURCE)
    return f"graph node {node.name!r} ({what})" + (f" made at {src}" if src else "")


def _is_static(v: Any) -> bool:
    """A shape-derived Python value (ints, sizes, dtypes, tuples of them): a constant of the stream."""
    if isinstance(v, (bool, int, float, str, torch.dtype, torch.Size)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_is_static(x) for x in v)
    return False


def _to_meta(v: Any) -> Any:
    if isinstance(v, fx.Proxy):
        m = v.node.meta.get(META, _UNKNOWN)
        if m is _UNKNOWN:
            raise LookupError(v.node.name)
        return m
    if isinstance(v, Tensor):
        return v.to("meta") if v.device.type != "meta" else v
    if isinstance(v, tuple):
        return tuple(_to_meta(x) for x in v)
    if isinstance(v, list):
        return [_to_meta(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_meta(x) for k, x in v.items()}
    if isinstance(v, slice):
        return slice(_to_meta(v.start), _to_meta(v.stop), _to_meta(v.step))
    return v


def _plain_attr(root: nn.Module, target: str) -> Any:
    """The tensor (or other object) at `target`, read without the tracer's patched Module.__getattr__
    (which would turn a parameter read into a new get_attr proxy, e.g. timm's BatchNormAct2d bias)."""
    obj: Any = root
    for part in target.split("."):
        if isinstance(obj, nn.Module):
            for store in (obj._parameters, obj._buffers, obj._modules):
                if part in store:
                    obj = store[part]
                    break
            else:
                obj = object.__getattribute__(obj, part)
        else:
            obj = getattr(obj, part)
    return obj


class ShapeProxy(fx.Proxy):
    """A proxy whose node carries a meta value: shape queries return concrete values."""

    def _meta(self) -> Any:
        return self.node.meta.get(META, _UNKNOWN)

    def __getattr__(self, k: str) -> Any:
        m = self.node.meta.get(META, _UNKNOWN)
        if isinstance(m, Tensor) and (k in _CONCRETE_ATTRS or k in _CONCRETE_METHODS):
            return getattr(m, k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        m = self._meta()
        if isinstance(m, Tensor):
            return m.shape[0]
        if isinstance(m, (tuple, list, dict)):
            return len(m)
        raise self.tracer.data_dependent(self, "len()")

    def __iter__(self) -> Iterator[fx.Proxy]:
        m = self._meta()
        if isinstance(m, (tuple, list)) or (isinstance(m, Tensor) and m.dim() > 0):
            return (self[i] for i in range(len(m)))
        return super().__iter__()

    def keys(self) -> Any:
        m = self._meta()
        if isinstance(m, dict):
            return m.keys()
        return super().keys()

    def __bool__(self) -> bool:
        m = self._meta()
        if _is_static(m):
            return bool(m)
        raise self.tracer.data_dependent(self, "bool() (an if/while/and/or on a tensor)")

    def __int__(self) -> int:
        m = self._meta()
        if _is_static(m):
            return int(m)
        raise self.tracer.data_dependent(self, "int()")

    def __index__(self) -> int:
        m = self._meta()
        if _is_static(m):
            return int(m)
        raise self.tracer.data_dependent(self, "an index (int)")

    def __float__(self) -> float:
        m = self._meta()
        if _is_static(m):
            return float(m)
        raise self.tracer.data_dependent(self, "float()")


class ShapeTracer(fx.Tracer):
    """torch.fx tracer whose proxies carry meta values computed on the example input's shapes.

    Args:
        example_input: the frame batch the model will see (only its shape, dtype matter).
        leaf_modules: module classes or qualified names to keep as one call (not traced into).
    """

    def __init__(self, example_input: Tensor, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        self.example_meta = example_input.to("meta")
        leaves = list(leaf_modules)
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        bad = [x for x in leaves if not isinstance(x, (type, str))]
        if bad:
            raise TypeError(f"leaf_modules takes module classes or qualified names, got {bad!r}")
        self._computing_meta = False

    # ---- leaves and root signature --------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """Trace only the required positional parameters: *args, **kwargs and defaults stay out."""
        import inspect
        fn = inspect.unwrap(root_fn)
        params = list(inspect.signature(fn).parameters.values())
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        required = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
        if concrete_args is None and len(required) < len(params):
            src = f"def forward({', '.join(required)}):\n    return _fn({', '.join(required)})\n"
            ns: dict[str, Any] = {"_fn": root_fn}
            exec(compile(src, f"<deltacnn root wrapper of {fn.__qualname__}>", "exec"), ns)  # noqa: S102
            root_fn = ns["forward"]
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    # ---- proxies with meta values -------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapeProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._computing_meta:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self._computing_meta:  # running a leaf on meta tensors: no graph nodes
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        src = user_frame()
        if src is not None:
            node.meta[SOURCE] = src
        try:
            meta = self._meta_of(kind, target, args, kwargs)
        except Exception:  # noqa: BLE001 - no meta kernel, unknown input, data-dependent: shape unknown
            meta = _UNKNOWN
        if meta is not _UNKNOWN:
            node.meta[META] = meta
        if kind in ("call_function", "call_method", "call_module") and _is_static(meta) and not node.users:
            self.graph.erase_node(node)  # shape arithmetic: a literal of the stream, not a graph node
            return meta
        return proxy

    def _meta_of(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.example_meta
        if kind == "get_attr":
            return _to_meta(_plain_attr(self.root, target))
        if kind == "output":
            return _UNKNOWN
        a, k = _to_meta(args), _to_meta(kwargs)
        self._computing_meta = True
        try:
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                mod = self.root.get_submodule(target)
                state = {n: _to_meta(t) for n, t in [*mod.named_parameters(), *mod.named_buffers()]}
                return torch.func.functional_call(mod, state, a, k)
        finally:
            self._computing_meta = False
        return _UNKNOWN

    # ---- what cannot be traced ------------------------------------------------------------------
    def data_dependent(self, proxy: fx.Proxy, use: str) -> ConversionError:
        where = user_frame()
        return ConversionError(
            f"torch.fx could not trace the model: {describe_node(proxy.node)} is used in {use}"
            + (f" at {where}" if where else "")
            + ". Its value depends on the input data, so the control flow cannot be recorded in a graph. "
            + WHAT_TO_DO + ".")

    def to_bool(self, obj: fx.Proxy) -> bool:
        raise self.data_dependent(obj, "bool()")

    def iter(self, obj: fx.Proxy) -> Iterator:
        raise self.data_dependent(obj, "iteration (its length is not known while tracing)")


# torch.fx tracing swaps module-level functions for the duration of a trace (a process-wide
# patcher): two traces at once in two threads break each other, so they take turns (re-entrant:
# convert() holds it around the whole conversion, trace() inside it)
TRACE_LOCK = threading.RLock()


def trace(model: nn.Module, example_input: Tensor, leaf_modules: Iterable[type | str] = ()) -> fx.GraphModule:
    """Trace `model` with static shapes of `example_input`; failures raise ConversionError with the source line."""
    tracer = ShapeTracer(example_input, leaf_modules)
    try:
        with TRACE_LOCK:
            graph = tracer.trace(model)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - every tracing failure gets the same advice
        where = _tb_user_frame(e.__traceback__)
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}"
            + (f" (at {where})" if where else "") + ". deltacnn needs a forward() without data-dependent Python "
            "control flow. " + WHAT_TO_DO + ".") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
