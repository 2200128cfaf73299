"""Automatic conversion of an ordinary nn.Module into a stateful delta model, with torch.fx.

Steps: trace; record shapes on the example input; fold batch norms into their convolutions;
rebuild the graph with a delta layer for every op that carries the video stream (dense
tails such as flatten + Linear stay dense behind a Densify); fuse conv -> add -> activation
chains into one layer so fast backends can run them in one kernel.
"""
from __future__ import annotations

import copy
import operator
import re
import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .activations import ActSpec
from .layers import (DeltaActivation, DeltaAdd, DeltaCat, DeltaChannelSlice, DeltaConv2d, DeltaConvTranspose2d,
                     DeltaGlobalAvgPool, DeltaLayer, DeltaLinearMap, DeltaMaxPool2d, DeltaMul, DeltaScale,
                     DenseIsland, Densify, Sparsify)
from .model import DeltaModel
from .runtime import Runtime
from .tensor import DeltaTensor
from .thresholds import INPUT, Thresholds


class UnsupportedOperationError(NotImplementedError):
    """An op on the video stream has no delta version (and dense fallback is off)."""


class ConversionError(RuntimeError):
    """The model cannot be converted as it is (not traceable, wrong example input, ...)."""


# ---- activation recognition ----------------------------------------------------------------------
def _module_act(m: nn.Module) -> ActSpec | None:
    if isinstance(m, nn.ReLU6):
        return ActSpec("relu6")
    table: list[tuple[type, Callable[[Any], ActSpec]]] = [
        (nn.ReLU, lambda m: ActSpec("relu")),
        (nn.LeakyReLU, lambda m: ActSpec("leaky_relu", slope=float(m.negative_slope))),
        (nn.SiLU, lambda m: ActSpec("silu")),
        (nn.Hardswish, lambda m: ActSpec("hardswish")),
        (nn.Hardsigmoid, lambda m: ActSpec("hardsigmoid")),
        (nn.Sigmoid, lambda m: ActSpec("sigmoid")),
        (nn.Tanh, lambda m: ActSpec("tanh")),
        (nn.GELU, lambda m: ActSpec("gelu", approximate=m.approximate)),
        (nn.ELU, lambda m: ActSpec("elu", alpha=float(m.alpha))),
        (nn.Hardtanh, lambda m: ActSpec("hardtanh", min_val=float(m.min_val), max_val=float(m.max_val))),
        (nn.PReLU, lambda m: ActSpec("prelu", prelu_weight=m.weight.detach().clone())),
    ]
    for cls, make in table:
        if isinstance(m, cls):
            return make(m)
    return None


def _fn_act_table() -> dict[Any, Callable[..., ActSpec]]:
    relu = lambda x, inplace=False: ActSpec("relu")  # noqa: E731
    t = {
        F.relu: relu, torch.relu: relu, torch.relu_: relu, "relu": relu, "relu_": relu,
        F.relu6: lambda x, inplace=False: ActSpec("relu6"),
        F.leaky_relu: lambda x, negative_slope=0.01, inplace=False: ActSpec("leaky_relu", slope=float(negative_slope)),
        F.silu: lambda x, inplace=False: ActSpec("silu"),
        F.hardswish: lambda x, inplace=False: ActSpec("hardswish"),
        F.hardsigmoid: lambda x, inplace=False: ActSpec("hardsigmoid"),
        torch.sigmoid: lambda x: ActSpec("sigmoid"), F.sigmoid: lambda x: ActSpec("sigmoid"),
        "sigmoid": lambda x: ActSpec("sigmoid"), "sigmoid_": lambda x: ActSpec("sigmoid"),
        torch.tanh: lambda x: ActSpec("tanh"), F.tanh: lambda x: ActSpec("tanh"), "tanh": lambda x: ActSpec("tanh"),
        F.gelu: lambda x, approximate="none": ActSpec("gelu", approximate=approximate),
        F.elu: lambda x, alpha=1.0, inplace=False: ActSpec("elu", alpha=float(alpha)),
        F.hardtanh: lambda x, min_val=-1.0, max_val=1.0, inplace=False: ActSpec("hardtanh", min_val=float(min_val),
                                                                                max_val=float(max_val)),
    }
    return t


_FN_ACTS = _fn_act_table()
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div"}
_PASS = {"contiguous", "clone", "detach"}
_SHAPE = {"size", "dim"}


def _values(d: Any) -> Any:
    """For shape queries on a stream: the values tensor has the stream's shape."""
    return d.values if isinstance(d, DeltaTensor) else d


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t if node.op == "call_module" else f".{t}()"
    return getattr(t, "__module__", "") + "." + getattr(t, "__name__", repr(t))


# ---- the converter ---------------------------------------------------------------------------------
class _Converter:
    def __init__(self, traced: fx.GraphModule, allow_dense_fallback: bool, mask_dilation: int) -> None:
        self.src = traced
        self.modules = dict(traced.named_modules())
        self.allow_fallback = allow_dense_fallback
        self.mask_dilation = mask_dilation
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.streams: set[fx.Node] = set()  # new-graph nodes that carry DeltaTensors
        self.densified: dict[fx.Node, fx.Node] = {}
        self.layers: dict[str, DeltaLayer] = {}
        self.holder = nn.Module()
        self.uses: dict[str, int] = {}

    # naming: a module called once keeps its qualified name; later calls get _1, _2 ...
    def _name(self, node: fx.Node) -> str:
        base = node.target if node.op == "call_module" else node.name
        k = self.uses.get(base, 0)
        self.uses[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def _add_layer(self, layer: DeltaLayer, args: tuple, kwargs: dict | None = None, stream: bool = True) -> fx.Node:
        key = re.sub(r"[^0-9a-zA-Z_]", "_", layer.name)
        while hasattr(self.holder, key):
            key += "_"
        self.holder.add_module(key, layer)
        self.layers[layer.name] = layer
        n = self.graph.call_module(f"_delta.{key}", args, kwargs or {})
        if stream:
            self.streams.add(n)
        return n

    def _densify(self, n: fx.Node) -> fx.Node:
        if n not in self.densified:
            self.densified[n] = self._add_layer(Densify(f"{n.name}.densify" if n.name else "densify"), (n,),
                                                stream=False)
        return self.densified[n]

    def _is_stream(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a in self.streams

    def run(self) -> fx.GraphModule:
        placeholders = [n for n in self.src.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ConversionError(f"deltacnn converts models with exactly one input (the frame batch); "
                                  f"this one takes {len(placeholders)}: {[p.name for p in placeholders]}")
        for node in self.src.graph.nodes:
            if node.op == "placeholder":
                x = self.graph.placeholder(node.name)
                self.env[node] = self._add_layer(Sparsify(INPUT, self.mask_dilation), (x,))
            elif node.op == "output":
                out = fx.node.map_arg(node.args[0], self._output_arg)
                self.graph.output(out)
            else:
                self.env[node] = self._convert(node)
        root = self.src
        root.add_module("_delta", self.holder)
        gm = fx.GraphModule(root, self.graph)
        return gm

    def _output_arg(self, n: fx.Node) -> fx.Node:
        m = self.env[n]
        return self._densify(m) if m in self.streams else m

    def _convert(self, node: fx.Node) -> fx.Node:
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        flat: list = []
        fx.node.map_arg((args, kwargs), lambda n: flat.append(n) or n)
        if not any(self._is_stream(a) for a in flat):
            return self.graph.node_copy(node, lambda n: self.env[n])
        made = self._delta_op(node, args, kwargs)
        if made is not None:
            return made
        return self._unsupported(node, args, kwargs)

    # every op that has a delta version
    def _delta_op(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node | None:
        op, t = node.op, node.target
        name = lambda: self._name(node)  # noqa: E731
        if op == "call_module":
            m = self.modules[t]
            if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
                return args[0]
            if isinstance(m, nn.Conv2d):
                return self._add_layer(DeltaConv2d.from_module(m, name()), args[:1])
            if isinstance(m, nn.ConvTranspose2d):
                if kwargs or len(args) > 1:
                    return None  # output_size given at call time: not supported
                return self._add_layer(DeltaConvTranspose2d(m, name()), args[:1])
            if isinstance(m, nn.BatchNorm2d):
                scale = m.weight / torch.sqrt(m.running_var + m.eps) if m.affine else 1 / torch.sqrt(m.running_var + m.eps)
                shift = (m.bias if m.affine else 0) - m.running_mean * scale
                return self._add_layer(DeltaScale(scale.detach(), shift.detach(), name()), args[:1])
            act = _module_act(m)
            if act is not None:
                return self._add_layer(DeltaActivation(act, name()), args[:1])
            if isinstance(m, nn.MaxPool2d):
                if m.return_indices:
                    return None
                return self._add_layer(DeltaMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                                      name()), args[:1])
            if isinstance(m, nn.AvgPool2d):
                return self._linear_map(name(), args[0], _avg_pool(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                                   m.count_include_pad, m.divisor_override))
            if isinstance(m, nn.AdaptiveAvgPool2d):
                return self._adaptive(name(), args[0], m.output_size, node)
            if isinstance(m, nn.Upsample):
                return self._linear_map(name(), args[0], _interp(None, m.scale_factor, m.mode, m.align_corners,
                                                                 size=m.size))
            return None
        key = t if op == "call_function" else (t if op == "call_method" else None)
        if key in _FN_ACTS:
            stream = args[0]
            act = _FN_ACTS[key](*args, **kwargs)
            return self._add_layer(DeltaActivation(act, name()), (stream,))
        if key in _ADD | _SUB:
            return self._add_like(node, args, kwargs, negate=key in _SUB)
        if key in _MUL or key in _DIV:
            return self._mul_like(node, args, kwargs, div=key in _DIV)
        if key in (operator.neg, "neg"):
            return self._add_layer(DeltaScale(-1.0, 0.0, name()), (args[0],))
        if key in _PASS:
            return args[0]
        if key in _SHAPE:
            v = self.graph.call_function(_values, (args[0],))
            return self.graph.call_method(key, (v, *args[1:]), kwargs)
        if op == "call_function" and t is getattr and args[1] in ("shape", "dtype", "device"):
            v = self.graph.call_function(_values, (args[0],))
            return self.graph.call_function(getattr, (v, args[1]))
        if key is torch.cat or key is torch.concat:
            return self._cat(node, args, kwargs)
        if key is F.max_pool2d:
            p = _bind(lambda input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                      return_indices=False: locals(), args, kwargs)
            if p["return_indices"]:
                return None
            return self._add_layer(DeltaMaxPool2d(p["kernel_size"], p["stride"], p["padding"], p["dilation"],
                                                  p["ceil_mode"], name()), (args[0],))
        if key is F.avg_pool2d:
            p = _bind(lambda input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                      divisor_override=None: locals(), args, kwargs)
            return self._linear_map(name(), args[0], _avg_pool(p["kernel_size"], p["stride"], p["padding"],
                                                               p["ceil_mode"], p["count_include_pad"],
                                                               p["divisor_override"]))
        if key is F.adaptive_avg_pool2d:
            p = _bind(lambda input, output_size: locals(), args, kwargs)
            return self._adaptive(name(), args[0], p["output_size"], node)
        if key in (F.interpolate, F.upsample):
            p = _bind(lambda input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                      recompute_scale_factor=None, antialias=False: locals(), args, kwargs)
            if p["antialias"] or not isinstance(p["size"], (type(None), int, tuple, list)):
                return None
            return self._linear_map(name(), args[0], _interp(None, p["scale_factor"], p["mode"], p["align_corners"],
                                                             size=p["size"]))
        if key in (torch.mean, "mean"):
            p = _bind(lambda input, dim=None, keepdim=False, dtype=None: locals(), args, kwargs)
            dims = p["dim"]
            dims = tuple(sorted(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))) \
                if dims is not None else None
            if dims == (2, 3) and p["keepdim"] and p["dtype"] is None:
                return self._add_layer(DeltaGlobalAvgPool(name()), (args[0],))
            return None
        if op == "call_function" and t is operator.getitem and self._is_stream(args[0]):
            return self._channel_slice(node, args)
        return None

    def _linear_map(self, name: str, stream: fx.Node, fns) -> fx.Node:
        fn, mask_fn, what = fns
        return self._add_layer(DeltaLinearMap(fn, mask_fn, name, what), (stream,))

    def _adaptive(self, name: str, stream: fx.Node, output_size, node: fx.Node) -> fx.Node:
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if size == (1, 1):
            return self._add_layer(DeltaGlobalAvgPool(name), (stream,))
        return self._linear_map(name, stream, (lambda x: F.adaptive_avg_pool2d(x, output_size),
                                               lambda m: F.adaptive_max_pool2d(m.float(), output_size) > 0,
                                               f"adaptive_avg_pool2d({output_size})"))

    def _add_like(self, node: fx.Node, args: tuple, kwargs: dict, negate: bool) -> fx.Node | None:
        if kwargs.get("alpha", 1) != 1 or len(args) != 2:
            return None
        a, b = args
        name = self._name(node)
        if self._is_stream(a) and self._is_stream(b):
            if negate:
                b = self._add_layer(DeltaScale(-1.0, 0.0, f"{name}.neg"), (b,))
            return self._add_layer(DeltaAdd(name), (a, b))
        const = _constant(b if self._is_stream(a) else a, self.src)
        if const is None:
            return None
        stream = a if self._is_stream(a) else b
        if self._is_stream(a):  # x + c, x - c
            return self._add_layer(DeltaScale(1.0, -const if negate else const, name), (stream,))
        return self._add_layer(DeltaScale(-1.0 if negate else 1.0, const, name), (stream,))  # c + x, c - x

    def _mul_like(self, node: fx.Node, args: tuple, kwargs: dict, div: bool) -> fx.Node | None:
        if kwargs or len(args) != 2:
            return None
        a, b = args
        name = self._name(node)
        if self._is_stream(a) and self._is_stream(b):
            if div:
                return None
            sa, sb = node.args[0].meta.get("tensor_meta"), node.args[1].meta.get("tensor_meta")
            if sa is not None and sb is not None and tuple(sb.shape) > tuple(sa.shape):
                a, b = b, a  # the broadcast operand goes second
            return self._add_layer(DeltaMul(name), (a, b))
        if div and not self._is_stream(a):
            return None  # c / x is nonlinear
        const = _constant(b if self._is_stream(a) else a, self.src)
        if const is None:
            return None
        if isinstance(const, Tensor) and not (const.numel() == 1 or (const.dim() >= 3 and const.shape[-2:] == (1, 1))
                                              or const.dim() == 1):
            return None
        if isinstance(const, Tensor):
            const = const.reshape(-1)
        scale = 1.0 / const if div else const
        return self._add_layer(DeltaScale(scale, 0.0, name), (a if self._is_stream(a) else b,))

    def _cat(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node | None:
        p = _bind(lambda tensors, dim=0: locals(), args, kwargs)
        parts = list(p["tensors"])
        dim = p["dim"] % 4
        if dim != 1 or not all(self._is_stream(x) for x in parts):
            return None
        return self._add_layer(DeltaCat(self._name(node)), tuple(parts))

    def _channel_slice(self, node: fx.Node, args: tuple) -> fx.Node | None:
        idx = args[1]
        if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], slice)
                and idx[1].step in (None, 1)):
            return None
        c = node.args[0].meta["tensor_meta"].shape[1]
        start, stop, _ = idx[1].indices(c)
        return self._add_layer(DeltaChannelSlice(start, stop, self._name(node)), (args[0],))

    def _unsupported(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        meta = node.meta.get("tensor_meta")
        is_map = meta is not None and hasattr(meta, "shape") and len(meta.shape) == 4 and meta.dtype.is_floating_point
        what = _target_name(node)
        if not is_map:
            # the image stream ends here (flatten, Linear on pooled features, ...): a dense tail
            new_args = fx.node.map_arg(args, lambda n: self._densify(n) if n in self.streams else n)
            new_kwargs = fx.node.map_arg(kwargs, lambda n: self._densify(n) if n in self.streams else n)
            return self.graph.create_node(node.op, node.target, new_args, new_kwargs, node.name)
        if not self.allow_fallback:
            raise UnsupportedOperationError(
                f"graph node {node.name!r} calls {what}, which has no delta version. Either pass "
                "allow_dense_fallback=True to convert() to run it densely between a densify and a sparsify "
                "(correct, but that op costs a dense pass every frame), or replace it in the model with supported "
                "ops (see deltacnn.SUPPORTED_OPS).")
        n_streams = sum(1 for a in _flatten_nodes((args, kwargs)) if a in self.streams)
        island = DenseIsland(self._name(node), _as_callable(node, self.modules), n_streams, reenter=True)
        return self._add_layer(island, args, kwargs)


def _flatten_nodes(x) -> list:
    out: list = []
    fx.node.map_arg(x, lambda n: out.append(n) or n)
    return out


def _as_callable(node: fx.Node, modules: dict) -> Callable:
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_method":
        return _MethodCall(node.target)
    return node.target


class _MethodCall:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, obj, *a, **k):
        return getattr(obj, self.name)(*a, **k)


def _bind(sig_fn: Callable, args: tuple, kwargs: dict) -> dict:
    return sig_fn(*args, **kwargs)


def _constant(a: Any, root: nn.Module) -> Tensor | float | None:
    """A compile-time constant operand: a number or a parameter/buffer of the model."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    if isinstance(a, fx.Node) and a.op == "get_attr":
        obj = root
        for part in a.target.split("."):
            obj = getattr(obj, part)
        return obj.detach().float()
    return None


def _avg_pool(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    stride = kernel if stride is None or stride == [] else stride

    def fn(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    def mask_fn(m: Tensor) -> Tensor:
        return F.max_pool2d(m.float(), kernel, stride, padding, 1, ceil_mode) > 0

    return fn, mask_fn, f"avg_pool2d(kernel={kernel}, stride={stride}, padding={padding})"


def _interp(_unused, scale_factor, mode, align_corners, size=None):
    if mode not in ("nearest", "bilinear"):
        raise UnsupportedOperationError(f"interpolate mode {mode!r} is not supported (use 'nearest' or 'bilinear')")
    ac = align_corners if mode == "bilinear" else None

    def fn(x: Tensor) -> Tensor:
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode, align_corners=ac)

    def mask_fn(m: Tensor) -> Tensor:
        return F.interpolate(m.float(), size=size, scale_factor=scale_factor, mode=mode, align_corners=ac) > 0

    return fn, mask_fn, f"interpolate(size={size}, scale_factor={scale_factor}, mode={mode})"


# ---- graph passes ------------------------------------------------------------------------------------
def fold_batchnorms(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm2d that directly follows a conv used only there into the conv's weights."""
    modules = dict(gm.named_modules())
    conv_calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            conv_calls[n.target] = conv_calls.get(n.target, 0) + 1
    folded = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(modules.get(n.target), nn.BatchNorm2d):
            continue
        prev = n.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                and type(modules.get(prev.target)) is nn.Conv2d and len(prev.users) == 1
                and conv_calls[prev.target] == 1 and modules[n.target].track_running_stats):
            continue
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(modules[prev.target], modules[n.target])
        _set_module(gm, prev.target, fused)
        modules[prev.target] = fused
        n.replace_all_uses_with(prev)
        gm.graph.erase_node(n)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    return folded


def _set_module(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, leaf = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fuse_epilogues(gm: fx.GraphModule) -> int:
    """conv -> [add another stream] -> [activation] becomes one DeltaConv2d when each link has one user."""
    mods = dict(gm.named_modules())
    layer = lambda n: mods.get(n.target) if n.op == "call_module" else None  # noqa: E731
    fused = 0
    for n in list(gm.graph.nodes):
        conv = layer(n)
        if not isinstance(conv, DeltaConv2d) or conv.act is not None or conv.residual:
            continue
        user = next(iter(n.users)) if len(n.users) == 1 else None
        if user is not None and isinstance(layer(user), DeltaAdd) and user.args[0] is not user.args[1]:
            other = user.args[1] if user.args[0] is n else user.args[0]
            user.prepend(n)  # the residual's producer must run first
            n.args = (n.args[0], other)
            user.replace_all_uses_with(n)
            gm.graph.erase_node(user)
            conv.residual = True
            fused += 1
            user = next(iter(n.users)) if len(n.users) == 1 else None
        if user is not None and isinstance(layer(user), DeltaActivation):
            act = layer(user)
            conv.act, conv.act_name = act.act, act.name
            user.replace_all_uses_with(n)
            gm.graph.erase_node(user)
            fused += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return fused


SUPPORTED_OPS = (
    "Conv2d (any kernel/stride/padding incl. 'same'/dilation/groups, bias), ConvTranspose2d, BatchNorm2d (folded or "
    "scale+shift), ReLU, ReLU6, LeakyReLU, PReLU, ELU, Hardtanh, SiLU, Hardswish, Hardsigmoid, Sigmoid, Tanh, GELU "
    "(modules, functions and tensor methods), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Upsample/interpolate "
    "(nearest, bilinear), add/sub of two streams or a constant, mul of two streams (broadcast allowed) or by a "
    "constant, division by a constant, neg, torch.cat on channels, channel slicing x[:, a:b], mean over (2, 3) "
    "with keepdim, Identity/Dropout; anything after the feature map stops being 4-D (flatten, Linear) runs densely."
)


# torch.fx tracing swaps module-level functions for the duration of a trace (a process-wide
# patcher): two traces at once in two threads break each other, so they take turns
TRACE_LOCK = threading.Lock()


def convert(model: nn.Module, example_input: Tensor, *, threshold: float = 0.0, input_threshold: float | None = None,
            score: str = "max", thresholds_file: str | None = None, dtype: torch.dtype | None = None,
            keyframe_interval: int | None = None, mask_dilation: int = 1, allow_dense_fallback: bool = False,
            fuse: bool = True, backend: str | None = None, on_input_change: str = "error",
            dense_above: float | None = 0.5) -> DeltaModel:
    """Turn an ordinary CNN into a stateful delta model for video.

    Args:
        model: an unmodified nn.Module taking one (N, C, H, W) frame batch; traced with torch.fx.
        example_input: a frame batch of the shape you will feed (used to record shapes).
        threshold: default truncation threshold of every nonlinear layer (0 reproduces dense output).
        input_threshold: threshold of the input sparsification (default: `threshold`).
        score: per-pixel truncation score over channels, "max" or "l2".
        thresholds_file: JSON written by `model.thresholds.save()` or `deltacnn tune`.
        dtype: compute dtype (float32, float16, bfloat16); accumulators always stay float32.
        keyframe_interval: run a dense keyframe every N frames (None: only the first / after reset()).
        mask_dilation: dilate the input update mask by a k x k window (odd k) to absorb noise.
        allow_dense_fallback: run ops without a delta version densely instead of raising.
        fuse: fuse conv -> add -> activation chains (identical results; fewer kernels on GPU).
        backend: "reference" (pure PyTorch), "cpu" (reference with fused C++ stages, built on first
            use) or "triton"; default: Triton for CUDA tensors and "cpu" for CPU tensors when they are
            available, else the reference backend.
        on_input_change: "error" (default) or "reset" when shape/dtype/device changes mid-stream.
        dense_above: run a frame densely (exact, and cheaper than sparse work) when more than this
            fraction of its input pixels changed. Busy frames leave the delta state alone (like
            `DeltaModel.dense_frame`) and the first quiet frame after them is a keyframe. Decided
            on the host, so backends that must not synchronise (Triton, CUDA graphs) ignore it:
            there `deltacnn.compile(..., dense_above=)` does the same without waiting. None
            disables it.
    """
    if dense_above is not None and not 0 <= dense_above <= 1:
        raise ValueError(f"dense_above must be in [0, 1] or None, got {dense_above}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() needs an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor) or example_input.dim() != 4 or not example_input.is_floating_point():
        got = tuple(example_input.shape) if isinstance(example_input, Tensor) else type(example_input).__name__
        raise ValueError(f"example_input must be a floating-point (N, C, H, W) tensor, got {got}")
    if mask_dilation < 1 or mask_dilation % 2 == 0:
        raise ValueError(f"mask_dilation must be an odd window size >= 1, got {mask_dilation}")
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    model = copy.deepcopy(model).eval()
    try:
        with TRACE_LOCK:  # torch.fx patches torch functions process-wide while it traces
            traced = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure gets the same advice
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}. deltacnn needs a forward() "
            "without data-dependent Python control flow; move such logic out of the model or mark the offending "
            "function with torch.fx.wrap.") from e
    device = next(model.parameters(), example_input).device
    with torch.no_grad():
        try:
            ShapeProp(traced).propagate(example_input.to(device))
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"running the model on example_input of shape {tuple(example_input.shape)} "
                                  f"failed: {type(e).__name__}: {e}") from e
    fold_batchnorms(traced)
    conv = _Converter(traced, allow_dense_fallback, mask_dilation)
    gm = conv.run()
    if fuse:
        fuse_epilogues(gm)
    gm = gm.to(dtype)
    layers = {m.name: m for m in gm.modules() if isinstance(m, DeltaLayer)}
    names = [INPUT] + sorted({m.act_name if isinstance(m, DeltaConv2d) else m.name
                              for m in layers.values()
                              if isinstance(m, (DeltaActivation, DeltaMaxPool2d, DeltaMul, Sparsify))
                              or (isinstance(m, DeltaConv2d) and m.act is not None)} - {INPUT})
    th = Thresholds(default=threshold, input=input_threshold, score=score, known=tuple(names))
    if thresholds_file is not None:
        th.load(thresholds_file)
    rt = Runtime(th, dtype=dtype, backend_name=backend, dense_above=dense_above)
    if example_input.device.type == "cpu" and backend in (None, "cpu"):
        rt.backend_for(example_input)  # builds the CPU kernels now (once per machine), not in frame 1's time
    for m in gm.modules():
        if isinstance(m, DeltaLayer):
            m.set_runtime(rt)
    return DeltaModel(gm, rt, layers, example_input.shape[1], keyframe_interval, on_input_change)
