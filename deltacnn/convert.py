"""Automatic conversion of an ordinary nn.Module into a stateful delta model, with torch.fx.

Steps: trace; record shapes on the example input; fold batch norms into their convolutions;
rebuild the graph with a delta layer for every op that carries the video stream (dense
tails such as flatten + Linear stay dense behind a Densify); fuse conv -> add -> activation
chains into one layer so fast backends can run them in one kernel.

What runs densely, and who allows it: an op on the stream with no delta form whose result is a
4-D map is a dense island (needs allow_dense_fallback=True); one whose result is not a map
starts a dense tail (allowed). Dense values are followed by their pixel layout
(deltacnn/pixel_layout.py): a dense value that is a feature map of the stream's pixels again
ends a dense island instead (_Converter._reenter has the rule).
"""
from __future__ import annotations

import copy
import math
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from .activations import ActSpec
from .gating import InputGate, gate_from_options, Refresh
from .layer_refresh import LayerRefresh
from .layers.io import check_min_blob
from .errors import ConversionError, UnsupportedOperationError
from . import linear_maps as lm
from . import pixel_layout as pl
from .geometry import Window
from .layers import (DeltaActivation, DeltaAdd, DeltaCat, DeltaConv2d, DeltaConvTranspose2d, DeltaGlobalAvgPool,
                     DeltaLayer, DeltaLayerNorm, DeltaLinearMap, DeltaMaxPool2d, DeltaMul, DeltaScale, DeltaSlice,
                     DenseCall, DenseIsland, Densify, Sparsify)
from .layers.io import Slot
from .model import DeltaModel
from .runtime import Runtime
from .tensor import DeltaTensor
from .thresholds import INPUT, Thresholds
from .tracing import META, SOURCE, TRACE_LOCK, describe_node, trace




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
_PASS = {"clone", "detach"}
# ops that only re-index a tensor: a chain of them from a feature map back to one is a channel permutation
_VIEWS = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "swapaxes", "swapdims", "contiguous",
          "squeeze", "unsqueeze", torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.swapaxes,
          torch.swapdims, torch.squeeze, torch.unsqueeze, torch.unflatten}
_SPLITS = {"chunk", "split", "tensor_split", torch.chunk, torch.split, torch.tensor_split}
_UNBIND = {"unbind", torch.unbind}
_SELECT = {"select", torch.select}
_STACK = {"stack", torch.stack}
_DENSE_WORK = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
_DENSE_FNS = {F.conv2d, F.conv_transpose2d, F.linear, torch.conv2d, torch.conv_transpose2d}
_SHAPE = {"size", "dim"}
_OTHER_CONV_FNS = {F.conv1d, F.conv3d, torch.conv1d, torch.conv3d}
_MATMUL = {torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm"}


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
        self.islands: list[DenseReport] = []  # ops run densely between a densify and a sparsify
        self.tails: list[DenseReport] = []  # ops after the last feature maps (dense, no permission needed)
        self.macs: dict[str, int] = {}  # layer name -> multiply-adds of a dense frame
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
        # source-graph nodes whose stream is a channels-last view x.permute(0, 2, 3, 1) of a map: the
        # DeltaTensor keeps its (N, C, H, W) layout and ops on the view act on its channels
        self.nhwc: set[fx.Node] = set()
        self.dense_derived: set[fx.Node] = set()  # new-graph nodes computed from densified streams
        # new-graph node -> where its elements sit on a stream's pixel grid (pixel_layout.Layout; a tuple of
        # them for tuple values): streams, and dense values computed from streams while it is known
        self.layouts: dict[fx.Node, Any] = {}
        self.reports_at: dict[fx.Node, DenseReport] = {}  # new-graph node -> its dense tail / island report
        self._node_macs = 0
        self._node: fx.Node | None = None  # the source node being converted
        self.out_hw: dict[str, tuple[int, int]] = {}  # layer name -> its output map's (H, W) (threshold growth)

    # naming: a module called once keeps its qualified name; later calls get _1, _2 ...
    def _name(self, node: fx.Node) -> str:
        base = node.target if node.op == "call_module" else node.name
        k = self.uses.get(base, 0)
        self.uses[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def _add_layer(self, layer: DeltaLayer, args: tuple, kwargs: dict | None = None, stream: bool = True,
                   macs: int | None = None) -> fx.Node:
        key = re.sub(r"[^0-9a-zA-Z_]", "_", layer.name)
        while hasattr(self.holder, key):
            key += "_"
        self.holder.add_module(key, layer)
        self.layers[layer.name] = layer
        self.macs[layer.name] = self._node_macs if macs is None else macs
        shape = _shape(self._node)
        if shape is not None and len(shape) == 4 and layer.name not in self.out_hw:
            self.out_hw[layer.name] = (int(shape[2]), int(shape[3]))
        self._node_macs = 0  # a node's work goes to the first layer made for it
        n = self.graph.call_module(f"_delta.{key}", args, kwargs or {})
        if stream:
            self.streams.add(n)
            if shape is not None and len(shape) == 4:
                self.layouts[n] = pl.of_map(shape)  # callers whose node is not the map (parts) set their own
        return n

    def _densify(self, n: fx.Node) -> fx.Node:
        if n not in self.densified:
            self.densified[n] = self._add_layer(Densify(f"{n.name}.densify" if n.name else "densify"), (n,),
                                                stream=False, macs=0)
            self.dense_derived.add(self.densified[n])
            if n in self.layouts:
                self.layouts[self.densified[n]] = self.layouts[n]
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

    def _output_arg(self, n: fx.Node) -> Any:
        m = self._get(n)
        return fx.node.map_arg(m, lambda x: self._densify(x) if x in self.streams else x)

    def _get(self, n: fx.Node) -> Any:
        """The new-graph value of old node n; a pending view chain is materialised first (also the chains
        inside a tuple, such as the parts of unbind passed on as a whole)."""
        v = self.env[n]
        if isinstance(v, _Chain):
            v = self.env[n] = self._materialize(v)
        elif isinstance(v, (tuple, list)) and any(isinstance(e, _Chain) for e in v):
            v = self.env[n] = type(v)(self._materialize(e) if isinstance(e, _Chain) else e for e in v)
        return v

    def _convert(self, node: fx.Node) -> Any:
        self._node_macs = int(node.meta.get("macs", 0))
        self._node = node
        if any(a in self.nhwc for a in _flatten_nodes((node.args, node.kwargs))):
            return self._convert_nhwc(node)
        if _permute_dims(node) == (0, 2, 3, 1) and self._is_stream(self.env.get(node.args[0])) \
                and _ndim(node.args[0]) == 4:
            self.nhwc.add(node)  # a channels-last view: the stream itself, ops on it see channels last
            return self.env[node.args[0]]
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and isinstance(self.env.get(node.args[0]), tuple) and isinstance(node.args[1], (int, slice)):
            return self.env[node.args[0]][node.args[1]]  # a part of chunk/split/unbind: kept as it is (even a chain)
        if _key(node) in _VIEWS and node.args and isinstance(node.args[0], fx.Node):
            chained = self._view(node)
            if chained is not None:
                return chained
        squeezed = self._squeezed(node)
        if squeezed is not None:
            return squeezed
        args = fx.node.map_arg(node.args, self._get)
        kwargs = fx.node.map_arg(node.kwargs, self._get)
        flat = _flatten_nodes((args, kwargs))
        self._node_macs = int(node.meta.get("macs", 0))  # materialising an argument's view chain reset it
        if not any(self._is_stream(a) for a in flat):
            return self._dense_node(node, args, kwargs, flat)
        made = self._delta_op(node, args, kwargs)
        if made is not None:
            return made
        return self._unsupported(node, args, kwargs)

    def _dense_node(self, node: fx.Node, args: tuple, kwargs: dict, flat: list) -> fx.Node:
        """A node off the stream: a copy, or (when it does multiply-adds) a DenseCall that records them.
        Computed from the stream, it is a dense tail, unless its result is a feature map again (_reenter)."""
        derived = any(a in self.dense_derived for a in flat)
        macs = int(node.meta.get("macs", 0))  # not _node_macs: densifying the inputs may have used it
        report = self._tail(node, macs) if derived else None
        if macs > 0 and node.op in ("call_module", "call_function", "call_method"):
            n = self._dense_call(node, args, kwargs, flat, macs)
        else:
            n = self.graph.create_node(node.op, node.target, args, kwargs, node.name)
            n.meta = dict(node.meta)
        if not derived:
            return n
        self.dense_derived.add(n)
        self.reports_at[n] = report
        if macs > 0:
            lost = self._batch_lost(node)
            if lost is not None:
                self._island_off_the_batch(node, n, lost)
        try:
            layout = self._dense_layout(node)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError):
            layout = None  # arguments the rules do not know (not static): unknown, as for any other op
        if layout is not None:
            self.layouts[n] = layout
        if isinstance(layout, pl.Layout) and pl.is_map(layout, _shape(node)) and _is_float(node) \
                and not all(u.op == "output" for u in node.users):
            return self._reenter(node, n)
        return n

    def _batch_lost(self, node: fx.Node) -> fx.Node | None:
        """The first input of dense op `node` computed from the stream whose layout no longer has the whole
        batch, alone, as dim 0 (merged with channels as in x.view(N * C, 1, H, W), moved by a permute, or
        laid out in a way pixel_layout cannot follow); None when every such input keeps it."""
        for a in _flatten_nodes((node.args, node.kwargs)):
            new, shape = self.env.get(a), _shape(a)
            if not (isinstance(new, fx.Node) and new in self.dense_derived) or not shape:
                continue
            lay = self._layout_of(a)
            if not pl.batch_first(lay, shape) and (not isinstance(lay, pl.Layout) or pl.has_pixels(lay)):
                return a  # a pixel-free value (a pooled vector of a batch of one, squeezed) is a tail's
        return None

    def _island_off_the_batch(self, node: fx.Node, dense: fx.Node, lost: fx.Node) -> None:
        """Multiply-adds on a value computed densely from the feature maps whose batch is no longer dim 0
        (or whose layout is unknown): work that may be on the stream's pixels, e.g. a conv over
        x.view(N * C, 1, H, W). Nothing proves it comes after the last feature maps, so it is a dense
        island, not a tail: allowed only with allow_dense_fallback=True, then listed with the dense ops
        before it. Its result stays dense (its layout is unknown, so it cannot re-enter the stream).
        Tails keep the batch first: pooled vectors and SE gates (N, C), (N, C, 1, 1), a box decode's
        (N, 16, 4, anchors) bins."""
        if not self.allow_fallback:
            raise UnsupportedOperationError(
                f"{describe_node(node)} does multiply-adds ({_target_name(node)}) on {describe_node(lost)}, a value "
                f"computed densely from the feature maps, of shape {_shape(lost)}, whose dim 0 is no longer the "
                "frame batch (the batch merged with another dim, as in x.view(N * C, 1, H, W), or moved): such work "
                "may be on the stream's pixels and must not run densely unasked. Pass allow_dense_fallback=True to "
                "run it as a dense island (exact, but a dense pass every frame), or keep the batch as dim 0 "
                "(e.g. a grouped conv, groups=C, on the (N, C, H, W) map instead of folding the channels into the "
                "batch; see deltacnn.SUPPORTED_OPS).")
        self._mark_island(self._dense_region(dense))

    def _mark_island(self, region: list[fx.Node]) -> None:
        """The dense ops of `region` become a dense island: their reports move from the tails to the islands,
        and their DenseCalls count their work as island work (stats rows, dm.summary())."""
        for n in region:
            report = self.reports_at.get(n)
            if report is not None and report in self.tails:
                self.tails.remove(report)
                self.islands.append(report)
            if n.op == "call_module" and n.target.startswith("_delta.") \
                    and isinstance(layer := self.holder.get_submodule(n.target[len("_delta."):]), DenseCall):
                layer.kind = DenseIsland.kind

    def _tail(self, node: fx.Node, macs: int, incremental: bool = False) -> DenseReport:
        """Record an op of a dense tail (after the last feature maps): allowed, but listed by convert()."""
        report = DenseReport(node.name, _target_name(node), macs, node.meta.get(SOURCE), incremental)
        self.tails.append(report)
        return report

    # ---- dense values that are feature maps again: the end of a dense island -------------------------
    def _reenter(self, node: fx.Node, dense: fx.Node) -> fx.Node:
        """A value computed densely from the stream that is a feature map again goes back into the stream.

        The rule: a dense value is a *feature map of the stream* when pixel_layout.is_map holds for it
        (4-D, the whole batch first, its last two dims rows and columns of one stream grid with more
        than one pixel): a squeezed part unsqueezed again, a view chain back to a grid, elementwise ops
        and shape-keeping ops (softmax, cumsum) on such values. Such a value that anything but the
        model's output uses is sparsified back into a stream here (so the convs after it stay delta
        layers), and every dense op between the stream and it is a dense island: allowed only with
        allow_dense_fallback=True, then listed with its share of MACs and counted as dense-island
        work. Dense values that never become such a map (a box decode's bins and anchors, pooled
        vectors, squeeze-excitation gates of shape (N, C, 1, 1)) stay dense tails, needing no permission.
        """
        region = self._dense_region(dense)
        reports = [self.reports_at[n] for n in region if self.reports_at.get(n) is not None]
        if not self.allow_fallback:
            ops = ", ".join(dict.fromkeys(r.op for r in reports)) or _target_name(node)
            first = reports[0] if reports else None
            where = f" (the first, {first.node!r}, made at {first.source})" if first is not None and first.source \
                else ""
            raise UnsupportedOperationError(
                f"{describe_node(node)} turns values computed densely from the feature maps (by {ops}{where}) back "
                f"into a feature map of shape {_shape(node)} on the stream's pixels, which later layers use. Work on "
                "feature maps must not run densely unasked: pass allow_dense_fallback=True to run those ops as a "
                "dense island (exact, but a dense pass every frame; the map re-enters the delta stream after them), "
                "or replace them with supported ops (see deltacnn.SUPPORTED_OPS).")
        self._mark_island(region)
        layout = self.layouts.get(dense)
        stream = self._add_layer(Sparsify(f"{self._name(node)}.reenter"), (dense,), macs=0)
        self.layouts[stream] = layout
        return stream

    def _dense_region(self, dense: fx.Node) -> list[fx.Node]:
        """The dense-derived new-graph nodes `dense` is computed from (back to the densified streams), in
        graph order."""
        seen, todo = set(), [dense]
        while todo:
            n = todo.pop()
            if n in seen or n not in self.dense_derived:
                continue
            seen.add(n)
            todo.extend(n.all_input_nodes)
        return [n for n in self.graph.nodes if n in seen]

    def _dense_call(self, node: fx.Node, args: tuple, kwargs: dict, flat: list, macs: int) -> fx.Node:
        template, inputs = _template(args, kwargs, flat)
        layer = DenseCall(self._name(node), _as_callable(node, self.modules), template, macs, _target_name(node))
        return self._add_layer(layer, inputs, stream=False, macs=macs)

    # ---- pixel layouts of dense values (deltacnn/pixel_layout.py) ------------------------------------
    def _layout_of(self, old: Any) -> Any:
        """The layout of old node `old`'s new-graph value (a channels-last view's: its map's, permuted)."""
        new = self.env.get(old) if isinstance(old, fx.Node) else None
        layout = self.layouts.get(new) if isinstance(new, fx.Node) else None
        if old in self.nhwc and isinstance(layout, pl.Layout):
            return pl.permute(layout, (0, 2, 3, 1))
        return layout

    def _dense_layout(self, node: fx.Node) -> Any:
        """Where the elements of dense op `node`'s result sit on a stream grid, from its inputs' layouts:
        views, indexing, parts, cat/stack and elementwise ops follow pixel_layout's rules; any other op
        keeps the layout of an input of its output's shape (softmax, cumsum); else None (unknown)."""
        key, out = _key(node), _shape(node)
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        layout, shape = self._layout_of(src), _shape(src)
        if node.op == "call_function" and node.target is operator.getitem and src is not None:
            if isinstance(layout, tuple):
                return layout[node.args[1]] if isinstance(node.args[1], int) else None
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            ok = isinstance(layout, pl.Layout) and shape is not None and not _flatten_nodes(idx)
            return pl.index(layout, shape, idx) if ok else None
        if key in _CAT | _STACK:
            p = _bind(lambda tensors, dim=0: locals(), node.args, node.kwargs)
            parts = p["tensors"]
            if isinstance(parts, fx.Node) or not isinstance(p["dim"], int):
                return None  # a tuple value as a whole: its parts' layouts are not followed
            layouts = [self._layout_of(t) for t in parts]
            if key in _STACK:
                return pl.stack(layouts, p["dim"])
            return pl.cat(layouts, [_shape(t) or () for t in parts], p["dim"])
        if not isinstance(layout, pl.Layout) or shape is None:
            layout = None
        if key in _SHAPE_ONLY | {"expand"}:  # the other operand gives only a shape
            if layout is None or out is None:
                return None
            return pl.broadcast(layout, shape, out) if key in ("expand", "expand_as") else \
                layout if key == "type_as" else pl.reshape(layout, shape, out)
        if layout is not None and key in _VIEWS and out is not None:
            return _view_layout(layout, key, node.args[1:], node.kwargs, shape, out)
        if layout is not None and out is not None and node.op == "call_module" \
                and isinstance(self.modules.get(node.target), (nn.Flatten, nn.Unflatten)):
            return pl.reshape(layout, shape, out)  # a classifier's nn.Flatten: the same elements, regrouped
        if layout is not None and key in _PARTS:
            return _part_layouts(node, layout, shape)
        if layout is not None and key in _REDUCE:
            return _reduced_layout(node, layout)
        if out is None:
            return None
        ins = [a for a in _flatten_nodes((node.args, node.kwargs))
               if isinstance(self._layout_of(a), pl.Layout) and _shape(a) is not None]
        if _elementwise(node, self.modules) or key in _BROADCASTING:
            return next((b for a in ins if (b := pl.broadcast(self._layout_of(a), _shape(a), out)) is not None), None)
        same = next((self._layout_of(a) for a in ins if _shape(a) == out), None)
        return same if same is not None else self._per_image_layout(node, out)

    def _per_image_layout(self, node: fx.Node, out: tuple) -> pl.Layout | None:
        """A Linear, conv or batched matmul applied to each image on its own (every input computed from the
        stream has the whole batch as dim 0; a matmul's second such operand has its own batch dims): the
        output keeps the batch as dim 0, its other dims unlabelled (pixel_layout.per_image). Any op on inputs
        that hold no pixel (pixel_layout.has_pixels false: a squeezed pooled vector) holds none either
        (pixel_layout.pixel_free). Else None."""
        ins = [a for a in _flatten_nodes((node.args, node.kwargs))
               if isinstance(self.env.get(a), fx.Node) and self.env[a] in self.dense_derived]
        if ins and all(isinstance(lay := self._layout_of(a), pl.Layout) and not pl.has_pixels(lay) for a in ins):
            return pl.pixel_free(out)  # e.g. a Linear on a squeezed pooled vector, and the Linear after it
        if not ins or not all(pl.batch_first(self._layout_of(a), _shape(a) or ()) for a in ins):
            return None
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        key = _key(node)
        if isinstance(mod, _DENSE_WORK) or key in _DENSE_FNS or key in _OTHER_CONV_FNS:
            ok = ins == [node.args[0]]  # the weights are parameters, not values of the stream
        elif key in _MATMUL:
            ok = all(a is node.args[0] or len(_shape(a) or ()) >= 3 for a in ins)
        else:
            ok = False
        return pl.per_image(int(_shape(ins[0])[0]), out) if ok else None

    # ---- view chains: reshape/permute sequences that may come back to a feature map ------------------
    def _view(self, node: fx.Node) -> Any:
        src = self.env[node.args[0]]
        rest, kw = node.args[1:], node.kwargs
        if _flatten_nodes((rest, kw)):
            return None  # a shape given by a graph value: not static
        op = (node.op, node.target, rest, dict(kw))
        if isinstance(src, _Chain):
            chain = _Chain(src.src, src.shape, [*src.ops, op], node)
        elif self._is_stream(src):
            chain = _Chain(src, _shape(node.args[0]), [op], node)
        else:
            return None
        out = _shape(node)
        if all(o[1] == "contiguous" for o in chain.ops):
            return chain.src  # contiguous() on a map: a no-op on deltas
        if chain.shape is not None and out is not None and len(out) == 4 and out[0] == chain.shape[0] \
                and tuple(out[2:]) == tuple(chain.shape[2:]):
            perm = chain.channel_permutation()
            if perm is not None:
                if perm == list(range(chain.shape[1])):
                    return chain.src
                return self._add_layer(DeltaSlice(perm, name=self._name(node)), (chain.src,))
        return chain

    def _materialize(self, chain: "_Chain") -> fx.Node:
        """A view chain used by something else than a view: run it densely (a tail, or an island if it is a map)."""
        node = chain.last
        out = _shape(node)
        is_map = out is not None and len(out) == 4 and _is_float(node)
        if is_map:
            self._node_macs = 0
            if not self.allow_fallback:
                raise UnsupportedOperationError(
                    f"{describe_node(node)} ends a chain of view/reshape/permute ops that moves values between "
                    "pixels, which has no delta version. Pass allow_dense_fallback=True to run it as a dense island "
                    "(correct, but a dense pass every frame), or rearrange only channels (see deltacnn.SUPPORTED_OPS).")
            island = DenseIsland(self._name(node), chain.replay, 0, reenter=True, template=((Slot(0),), {}),
                                 streams=[True], macs=0, what=chain.describe())
            self.islands.append(DenseReport(node.name, chain.describe(), 0, node.meta.get(SOURCE)))
            return self._add_layer(island, (chain.src,), macs=0)
        n = self._densify(chain.src)
        layout, probe = self.layouts.get(chain.src), torch.empty(chain.shape or (), device="meta")
        for op, target, rest, kw in chain.ops:
            n = self.graph.create_node(op, target, (n, *rest), kw)
            self.dense_derived.add(n)
            if isinstance(layout, pl.Layout) and chain.shape is not None:
                out = _Chain.apply(probe, op, target, rest, kw)
                layout, probe = _view_layout(layout, target, rest, kw, tuple(probe.shape), tuple(out.shape)), out
        if layout is not None and chain.shape is not None:
            self.layouts[n] = layout
        self.tails.append(DenseReport(node.name, chain.describe(), 0, node.meta.get(SOURCE)))
        self.reports_at[n] = self.tails[-1]
        return n

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
                return self._linear_map(name(), args[0], lm.avg_pool(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                                     m.count_include_pad, m.divisor_override))
            if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
                              nn.CircularPad2d)):
                mode = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate",
                        nn.CircularPad2d: "circular"}.get(type(m), "constant")
                return self._linear_map(name(), args[0], lm.pad(m.padding, mode, getattr(m, "value", 0.0)))
            if isinstance(m, nn.PixelShuffle):
                return self._linear_map(name(), args[0], lm.pixel_shuffle(m.upscale_factor))
            if isinstance(m, nn.PixelUnshuffle):
                return self._linear_map(name(), args[0], lm.pixel_unshuffle(m.downscale_factor))
            if isinstance(m, nn.AdaptiveAvgPool2d):
                return self._adaptive(name(), args[0], m.output_size, node)
            if isinstance(m, nn.Upsample):
                return self._linear_map(name(), args[0], lm.interpolate(m.size, m.scale_factor, m.mode,
                                                                        m.align_corners,
                                                                        getattr(m, "recompute_scale_factor", None)))
            return None
        key = t if op == "call_function" else (t if op == "call_method" else None)
        if op == "call_function" and _identity_in_eval(t, args, kwargs):
            return args[0] if args else kwargs.get("input")
        if key in _SHAPE_ONLY and len(args) == 2 and self._is_stream(args[1]) and not self._is_stream(args[0]):
            # s.expand_as(x) and friends read only x's shape: take it from the stream's values
            v = self.graph.call_function(_values, (args[1],))
            return self._dense_node(node, (args[0], v), kwargs, [args[0], v])
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
            return self._linear_map(name(), args[0], lm.avg_pool(p["kernel_size"], p["stride"], p["padding"],
                                                                 p["ceil_mode"], p["count_include_pad"],
                                                                 p["divisor_override"]))
        if key is F.adaptive_avg_pool2d:
            p = _bind(lambda input, output_size: locals(), args, kwargs)
            return self._adaptive(name(), args[0], p["output_size"], node)
        if key in (F.interpolate, F.upsample):
            p = _bind(lambda input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                      recompute_scale_factor=None, antialias=False: locals(), args, kwargs)
            if _flatten_nodes({k: v for k, v in p.items() if k != "input"}):
                return None  # a size computed in the graph: not static
            return self._linear_map(name(), args[0], lm.interpolate(p["size"], p["scale_factor"], p["mode"],
                                                                    p["align_corners"], p["recompute_scale_factor"],
                                                                    p["antialias"]))
        if key is F.pad:
            p = _bind(lambda input, pad, mode="constant", value=None: locals(), args, kwargs)
            if _flatten_nodes((p["pad"], p["value"])):
                return None
            return self._linear_map(name(), args[0], lm.pad(p["pad"], p["mode"], p["value"]))
        if key in (torch.roll, "roll"):
            p = _bind(lambda input, shifts, dims=None: locals(), args, kwargs)
            return self._linear_map(name(), args[0], lm.roll(p["shifts"], p["dims"]))
        if key in (torch.flip, "flip"):
            p = _bind(lambda input, *dims: locals(), args, kwargs)
            dims = p["dims"][0] if len(p["dims"]) == 1 and isinstance(p["dims"][0], (tuple, list)) else p["dims"]
            return self._linear_map(name(), args[0], lm.flip(dims))
        if key is F.pixel_shuffle:
            return self._linear_map(name(), args[0], lm.pixel_shuffle(_bind(lambda input, upscale_factor: upscale_factor,
                                                                            args, kwargs)))
        if key is F.pixel_unshuffle:
            return self._linear_map(name(), args[0], lm.pixel_unshuffle(
                _bind(lambda input, downscale_factor: downscale_factor, args, kwargs)))
        if key in _SPLITS:
            return self._split(node, args, kwargs)
        if key in _UNBIND:
            return self._unbind(node, args, kwargs)
        if key in _SELECT:
            p = _bind(lambda input, dim, index: locals(), args, kwargs)
            return self._index_parts(node, args[0], {p["dim"]: p["index"]})
        if key in ("narrow", torch.narrow):
            p = _bind(lambda input, dim, start, length: locals(), args, kwargs)
            return self._slice_dim(node, args[0], p["dim"], slice(p["start"], p["start"] + p["length"]))
        if key in (torch.mean, "mean"):
            p = _bind(lambda input, dim=None, keepdim=False, dtype=None: locals(), args, kwargs)
            dims = p["dim"]
            dims = tuple(sorted(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))) \
                if dims is not None else None
            if dims == (2, 3) and p["keepdim"] and p["dtype"] is None:
                return self._add_layer(DeltaGlobalAvgPool(name()), (args[0],))
            return None
        if op == "call_function" and t is operator.getitem:
            if isinstance(args[0], (tuple, list)):  # a part of chunk/split outputs (or any tuple of streams)
                return args[0][args[1]]
            if self._is_stream(args[0]):
                return self._getitem(node, args)
        return None

    def _linear_map(self, name: str, stream: fx.Node, spec: lm.LinearMapSpec | None) -> fx.Node | None:
        if spec is None:
            return None
        return self._add_layer(DeltaLinearMap(spec.fn, spec.mask_fn, name, spec.what, spec.key_fn, spec.nearest),
                               (stream,))

    def _adaptive(self, name: str, stream: fx.Node, output_size, node: fx.Node) -> fx.Node:
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if size == (1, 1):
            return self._add_layer(DeltaGlobalAvgPool(name), (stream,))
        return self._linear_map(name, stream, lm.adaptive_avg_pool(output_size))

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
            return self._add_dense_operand(node, a, b, negate, name)
        first = self._is_stream(a)
        return self._constant_op(name, a if first else b, const, "sub" if negate else "add", first,
                                 _shape(node.args[0] if first else node.args[1]), _shape(node))

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
            return self._mul_dense_operand(node, a, b, div, name)
        first = self._is_stream(a)
        return self._constant_op(name, a if first else b, const, "div" if div else "mul", first,
                                 _shape(node.args[0] if first else node.args[1]), _shape(node))

    def _constant_op(self, name: str, stream: fx.Node, const: Tensor | float, op: str, stream_first: bool,
                     shape: tuple | None, out: tuple | None = None) -> fx.Node | None:
        """`stream op const` (or `const op stream` when not stream_first) for op in add/sub/mul/div and a
        compile-time constant: a number, or a tensor that broadcasts against the stream's 4-D `shape`
        without enlarging it (`out`: the op's result shape, when known). A scalar or per-channel constant
        is a DeltaScale; one that varies over space or batch is a DeltaScale shift when added (constants
        enter on keyframes only) and a linear map when it multiplies. None: no delta form (c / x)."""
        if op == "div" and not stream_first:
            return None
        if isinstance(const, Tensor):
            if shape is None or len(shape) != 4 or const.dim() > 4 or (out is not None and tuple(out) != tuple(shape)):
                return None
            const = const.reshape((1,) * (4 - const.dim()) + tuple(const.shape))  # PyTorch broadcasts from the right
            try:
                if tuple(torch.broadcast_shapes(tuple(const.shape), tuple(shape))) != tuple(shape):
                    return None
            except RuntimeError:
                return None
        per_channel = _channel_constant(const, channels_last=False)
        if op in ("add", "sub"):
            shift = const if per_channel is None else per_channel
            if stream_first:  # x + c, x - c
                return self._add_layer(DeltaScale(1.0, -shift if op == "sub" else shift, name), (stream,))
            return self._add_layer(DeltaScale(-1.0 if op == "sub" else 1.0, shift, name), (stream,))  # c + x, c - x
        if per_channel is not None:
            return self._add_layer(DeltaScale(1.0 / per_channel if op == "div" else per_channel, 0.0, name), (stream,))
        c = (1.0 / const if op == "div" else const).clone()
        return self._add_layer(DeltaLinearMap(lambda v: v * c.to(v.device, v.dtype), lambda m: m, name,
                                              f"mul by a constant of shape {tuple(c.shape)}"), (stream,))

    # ---- a stream combined with a tensor computed densely (SE gates from Linear layers, attention) ----
    def _dense_tensor(self, new: Any, old: Any) -> bool:
        """Whether `new` is a non-stream floating-point tensor of a 4-D (or broadcastable) shape."""
        return (isinstance(new, fx.Node) and not self._is_stream(new) and _ndim(old) == 4 and _is_float(old))

    def _as_stream(self, dense: fx.Node, name: str) -> fx.Node:
        """Sparsify a densely computed tensor into a second stream: its deltas are exact at tau 0, and
        where it changes (a per-image gate changes everywhere) every pixel it touches is updated."""
        return self._add_layer(Sparsify(f"{name}.operand"), (dense,))

    def _unexpanded(self, old: fx.Node) -> fx.Node:
        """`old` without a trailing expand/expand_as (the product broadcasts by itself)."""
        if old.op == "call_method" and old.target in ("expand", "expand_as") and _ndim(old.args[0]) == 4:
            return self._get(old.args[0])
        return self._get(old)

    def _mul_dense_operand(self, node: fx.Node, a: Any, b: Any, div: bool, name: str) -> fx.Node | None:
        sa = self._is_stream(a)
        dense_new, dense_old = (b, node.args[1]) if sa else (a, node.args[0])
        if not self._dense_tensor(dense_new, dense_old):
            return None
        stream, stream_old = (a, node.args[0]) if sa else (b, node.args[1])
        if _shape(node) is None or _shape(node) != _shape(stream_old):
            return None  # the dense operand is the larger one: not a gate on the stream
        gate = self._unexpanded(dense_old)
        if div:
            gate = self.graph.call_function(torch.reciprocal, (gate,))
        return self._add_layer(DeltaMul(name), (stream, self._as_stream(gate, name)))

    def _add_dense_operand(self, node: fx.Node, a: Any, b: Any, negate: bool, name: str) -> fx.Node | None:
        sa = self._is_stream(a)
        dense_new, dense_old = (b, node.args[1]) if sa else (a, node.args[0])
        if not self._dense_tensor(dense_new, dense_old):
            return None
        stream, stream_old = (a, node.args[0]) if sa else (b, node.args[1])
        shape = _shape(stream_old)
        if shape is None or _shape(node) != shape:
            return None
        other = dense_new
        if _shape(dense_old) != shape:  # broadcast: DeltaAdd adds equal shapes
            other = self.graph.call_method("contiguous", (self.graph.call_method("expand", (other, shape)),))
        if negate and sa:
            other = self.graph.call_function(operator.neg, (other,))
        other = self._as_stream(other, name)
        if negate and not sa:
            stream = self._add_layer(DeltaScale(-1.0, 0.0, f"{name}.neg"), (stream,))
        return self._add_layer(DeltaAdd(name), (stream, other))

    # ---- channels-last views (ConvNeXt: permute -> LayerNorm -> Linear -> GELU -> Linear -> permute) ----
    def _convert_nhwc(self, node: fx.Node) -> fx.Node:
        """An op reading a channels-last view of a stream: LayerNorm and Linear over channels, pointwise
        functions and channel constants have delta forms; permute(0, 3, 1, 2) returns to the map."""
        args = fx.node.map_arg(node.args, self._get)
        kwargs = fx.node.map_arg(node.kwargs, self._get)
        made = self._nhwc_op(node, args, kwargs)
        if made is not None:
            return made
        if _permute_dims(node) == (0, 3, 1, 2) and node.args[0] in self.nhwc:
            return args[0]  # back to (N, C, H, W): the stream as it is
        if _ndim(node) == 4:
            raise UnsupportedOperationError(
                f"{describe_node(node)} calls {_target_name(node)} on a channels-last view of a feature map "
                "(x.permute(0, 2, 3, 1)); there deltacnn supports LayerNorm and Linear over the channels, pointwise "
                "activations, dropout/identity, add/mul of two such views or by a per-channel constant, and "
                "permute(0, 3, 1, 2) back. Rewrite the op on the (N, C, H, W) map.")
        # the view leaves the image stream (flatten, pooling to vectors): a dense tail of the real view
        args = fx.node.map_arg(node.args, lambda n: self._materialise_nhwc(n) if n in self.nhwc else self._get(n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._materialise_nhwc(n) if n in self.nhwc else self._get(n))
        flat = _flatten_nodes((args, kwargs))
        if any(self._is_stream(a) for a in flat):
            return self._unsupported(node, args, kwargs)
        return self._dense_node(node, args, kwargs, flat)

    def _materialise_nhwc(self, old: fx.Node) -> fx.Node:
        n = self.graph.call_method("permute", (self._densify(self._get(old)), (0, 2, 3, 1)))
        self.dense_derived.add(n)
        return n

    def _nhwc_op(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node | None:
        op, t = node.op, node.target
        x_old = next((a for a in node.args if isinstance(a, fx.Node) and a in self.nhwc), None)
        if x_old is None:
            return None
        c = _shape(x_old)[-1]
        made = None
        if op == "call_module":
            m = self.modules[t]
            if isinstance(m, (nn.Identity, nn.Dropout)):
                made = args[0]
            elif isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (c,):
                made = self._add_layer(DeltaLayerNorm(c, m.weight, m.bias, m.eps, self._name(node)), args[:1])
            elif isinstance(m, nn.Linear) and m.in_features == c:
                w = m.weight.detach().reshape(m.out_features, c, 1, 1)
                made = self._add_layer(DeltaConv2d(w, m.bias, Window((1, 1)), 1, self._name(node)), args[:1])
            elif _module_act(m) is not None:
                made = self._add_layer(DeltaActivation(_module_act(m), self._name(node)), args[:1])
        else:
            key = t
            if op == "call_function" and _identity_in_eval(t, args, kwargs):
                made = args[0]
            elif key is F.layer_norm:
                p = _bind(lambda input, normalized_shape, weight=None, bias=None, eps=1e-5: locals(), args, kwargs)
                w, b = _constant(p["weight"], self.src), _constant(p["bias"], self.src)
                if (tuple(p["normalized_shape"]) == (c,) and (p["weight"] is None or isinstance(w, Tensor))
                        and (p["bias"] is None or isinstance(b, Tensor))):
                    made = self._add_layer(DeltaLayerNorm(c, w, b, p["eps"], self._name(node)), (args[0],))
            elif key in _FN_ACTS:
                made = self._add_layer(DeltaActivation(_FN_ACTS[key](*args, **kwargs), self._name(node)), (args[0],))
            elif key in _PASS:
                made = args[0]
            elif (key in _ADD | _SUB | _MUL | _DIV) and len(args) == 2 and not kwargs:
                made = self._nhwc_arith(node, args, key)
        if made is not None:
            self.nhwc.add(node)
        return made

    def _nhwc_arith(self, node: fx.Node, args: tuple, key: Any) -> fx.Node | None:
        a, b = args
        oa, ob = node.args
        name = self._name(node)
        if self._is_stream(a) and self._is_stream(b):
            if not (oa in self.nhwc and ob in self.nhwc) or _shape(oa) != _shape(ob):
                return None
            if key in _ADD:
                return self._add_layer(DeltaAdd(name), (a, b))
            if key in _SUB:
                return self._add_layer(DeltaAdd(name), (a, self._add_layer(DeltaScale(-1.0, 0.0, f"{name}.neg"), (b,))))
            if key in _MUL:
                return self._add_layer(DeltaMul(name), (a, b))
            return None
        if not self._is_stream(a) and key in _DIV:
            return None
        const = _constant(b if self._is_stream(a) else a, self.src)
        const = _channel_constant(const, channels_last=True) if const is not None else None
        if const is None:
            return None
        stream = a if self._is_stream(a) else b
        if key in _MUL:
            return self._add_layer(DeltaScale(const, 0.0, name), (stream,))
        if key in _DIV:
            return self._add_layer(DeltaScale(1.0 / const, 0.0, name), (stream,))
        if key in _ADD:
            return self._add_layer(DeltaScale(1.0, const, name), (stream,))
        if self._is_stream(a):
            return self._add_layer(DeltaScale(1.0, -const, name), (stream,))
        return self._add_layer(DeltaScale(-1.0, const, name), (stream,))

    def _cat(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node | None:
        p = _bind(lambda tensors, dim=0: locals(), args, kwargs)
        parts = list(p["tensors"])
        dim = p["dim"] % 4
        if dim != 1 or not all(self._is_stream(x) for x in parts):
            return None
        return self._add_layer(DeltaCat(self._name(node)), tuple(self._joined_slices(parts)))

    def _joined_slices(self, parts: list) -> list:
        """The parts of a cat with each run of adjacent channel slices that together are their whole source
        (C2f's y[:, :c], y[:, c:]) replaced by the source: the cat reads the source's rows once, and a slice
        that only the cat used is left without users (no copy of its rows on delta frames)."""
        out, i = [], 0
        while i < len(parts):
            r = self._channel_range(parts[i])
            if r is not None and r[1] == 0:
                src, j, stop = r[0], i + 1, r[2]
                while j < len(parts) and (q := self._channel_range(parts[j])) is not None and q[0] is src \
                        and q[1] == stop:
                    stop, j = q[2], j + 1
                if j > i + 1 and stop == self._channels(src):
                    out.append(src)
                    i = j
                    continue
            out.append(parts[i])
            i += 1
        return out

    def _channel_range(self, n: Any) -> tuple[fx.Node, int, int] | None:
        """(source, start, stop) of a new-graph node that is a contiguous channel slice a:b of a stream at
        every pixel (a DeltaSlice), else None (benchmarks/cpu_profile.py's "join_slices" switch patches this
        method to None: cats then keep the slices as parts)."""
        if not isinstance(n, fx.Node) or n.op != "call_module" or len(n.args) != 1:
            return None
        layer = self.holder.get_submodule(n.target[len("_delta."):])
        ch = getattr(layer, "channels", None)
        if not isinstance(layer, DeltaSlice) or layer.spatial or not isinstance(ch, slice) \
                or ch.step not in (None, 1) or ch.start is None or ch.stop is None:
            return None
        return n.args[0], ch.start, ch.stop

    def _channels(self, new: fx.Node) -> int | None:
        """The channel count of a new-graph stream node, from the example run (None: unknown)."""
        for old, v in self.env.items():
            if v is new:
                shape = _shape(old)
                return int(shape[1]) if shape is not None and len(shape) == 4 else None
        return None

    def _getitem(self, node: fx.Node, args: tuple) -> fx.Node | None:
        """x[...] with static slices only (any step): channels and/or a strided pixel window."""
        shape = _shape(node.args[0])
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        if shape is not None and idx.count(Ellipsis) <= 1 and any(isinstance(i, int) for i in idx) \
                and all(isinstance(i, (int, slice)) or i is Ellipsis for i in idx):
            return self._int_getitem(node, args, shape, idx)
        if shape is None or any(not (isinstance(i, slice) or i is Ellipsis) for i in idx) or idx.count(Ellipsis) > 1:
            return None
        idx = _index_4d(idx, shape)
        if idx is None:
            return None
        full = [slice(*i.indices(n)) == slice(0, n, 1) for i, n in zip(idx, shape)]
        if all(full):
            return args[0]
        # an open dim (`:`) stays slice(None): valid at any input size, and a channel-only slice then takes
        # the backends' channel_slice (C2f's y[:, :c]) instead of a spatial copy of values and mask
        c, h, w = (slice(None) if _open(i) else slice(*i.indices(n)) for i, n in zip(idx[1:], shape[1:]))
        return self._add_layer(DeltaSlice(c, h, w, self._name(node)), (args[0],))

    def _slice_dim(self, node: fx.Node, stream: fx.Node, dim: int, sl: slice, name: str | None = None) -> fx.Node | None:
        d = dim % 4
        if d == 0:
            return None
        parts = [slice(None)] * 3
        parts[d - 1] = sl
        return self._add_layer(DeltaSlice(*parts, name=name or self._name(node)), (stream,))

    def _split(self, node: fx.Node, args: tuple, kwargs: dict) -> tuple | None:
        """chunk / split / tensor_split on a stream: one slice per part, sizes as the example run made them."""
        key = _key(node)
        name = key if isinstance(key, str) else key.__name__
        sig = {"chunk": lambda input, chunks, dim=0: dim, "split": lambda tensor, split_size_or_sections, dim=0: dim,
               "tensor_split": lambda input, indices_or_sections, dim=0: dim}[name]
        dim = _bind(sig, args, kwargs)
        metas = node.meta.get("tensor_meta")
        if not isinstance(dim, int) or not isinstance(metas, (tuple, list)) or dim % 4 == 0:
            return None
        base, start, parts = self._name(node), 0, []
        layout, shape = self.layouts.get(args[0]), _shape(node.args[0])
        for i, m in enumerate(metas):
            size = m.shape[dim]
            parts.append(self._slice_dim(node, args[0], dim, slice(start, start + size), f"{base}.{i}"))
            if isinstance(layout, pl.Layout) and shape is not None:
                part_index = (slice(None),) * (dim % 4) + (slice(start, start + size),)
                self.layouts[parts[-1]] = pl.index(layout, shape, part_index)
            start += size
        return tuple(parts)

    # ---- parts with a dim indexed away (unbind, select, x[:, i]): 3-D, but still a stream's pixels ----------
    def _unbind(self, node: fx.Node, args: tuple, kwargs: dict) -> tuple | None:
        """unbind on a stream: one squeezed part per index (see _index_parts)."""
        p = _bind(lambda input, dim=0: locals(), args, kwargs)
        shape = _shape(node.args[0])
        if shape is None or len(shape) != 4 or not isinstance(p["dim"], int) or p["dim"] % 4 == 0:
            return None
        d = p["dim"] % 4
        return tuple(self._index_parts(node, args[0], {d: i}, f"{self._name(node)}.{i}") for i in range(shape[d]))

    def _int_getitem(self, node: fx.Node, args: tuple, shape: tuple, idx: tuple) -> "_Chain | None":
        """x[..., i, ...] with static integer indices (and slices): a slice, then the indexed dims squeezed."""
        idx = _index_4d(idx, shape)
        if idx is None:
            return None
        stream = args[0]
        slices = [i for i in idx[1:]]
        if any(isinstance(i, slice) and slice(*i.indices(n)) != slice(0, n, 1) for i, n in zip(slices, shape[1:])):
            c, h, w = (i if isinstance(i, slice) else slice(None) for i in slices)
            stream = self._add_layer(DeltaSlice(c, h, w, f"{self._name(node)}.slice"), (stream,))
            shape = (shape[0], *(len(range(*s.indices(n))) if isinstance(s, slice) else n
                                 for s, n in zip(slices, shape[1:])))
        return self._index_parts(node, stream, {d: i for d, i in enumerate(idx) if isinstance(i, int)},
                                 shape=shape)

    def _index_parts(self, node: fx.Node, stream: fx.Node, index: dict, name: str | None = None,
                     shape: tuple | None = None) -> "_Chain | None":
        """The stream at static integer `index` ({dim: i}) of some of dims 1-3: a size-1 slice kept as a stream,
        with the squeeze of those dims pending. The part is 3-D (no feature map), but its deltas are the
        stream's, so ops on it and its way back to a map (unsqueeze, stack) stay delta; anything else
        materialises it densely as the model would have it."""
        shape = tuple(shape or _shape(node.args[0]) or ())
        if len(shape) != 4 or not index or any(not isinstance(i, int) or isinstance(i, bool) for i in index.values()):
            return None
        dims = sorted({d % 4 for d in index})
        if 0 in dims:
            return None
        parts, sub = [slice(None)] * 3, list(shape)
        for d, i in index.items():
            d = d % 4
            if not -shape[d] <= i < shape[d]:
                return None
            i %= shape[d]
            parts[d - 1], sub[d] = slice(i, i + 1), 1
        part = self._add_layer(DeltaSlice(*parts, name=name or self._name(node)), (stream,))
        source = self.layouts.get(stream) or pl.of_map(shape)
        self.layouts[part] = pl.index(source, shape, (slice(None), *parts))  # a size-1 slice: the row is "lost"
        ops = [("call_method", "squeeze", (d,), {}) for d in reversed(dims)]
        return _Chain(part, tuple(sub), ops, node)

    def _squeezed(self, node: fx.Node) -> Any:
        """Ops whose stream inputs are all squeezed parts (see _index_parts) of the same dims and shape:
        elementwise ops run on the 4-D parts (the result squeezed alike), stack along the squeezed
        channel dim is a channel concatenation. None: not such an op, handled as usual."""
        if _key(node) in _STACK:
            return self._stack(node)
        ins = _flatten_nodes((node.args, node.kwargs))
        vals = {a: self.env.get(a) for a in ins}
        chains = [v for v in vals.values() if isinstance(v, _Chain)]
        others = [a for a, v in vals.items() if not isinstance(v, _Chain)]
        if not chains or not all(v.squeezed() is not None for v in chains):
            return None
        first = chains[0]
        if any(v.squeezed() != first.squeezed() or v.shape != first.shape for v in chains):
            return None
        if not _elementwise(node, self.modules):
            return None
        self._node_macs = int(node.meta.get("macs", 0))
        if others:
            made = self._part_constant_op(node, first, others)
        else:
            args = fx.node.map_arg(node.args, lambda n: vals[n].src)
            kwargs = fx.node.map_arg(node.kwargs, lambda n: vals[n].src)
            made = self._delta_op(node, args, kwargs)
        if not self._is_stream(made):
            return None  # no delta form on the 4-D parts (nothing was added): the usual path decides
        self.layouts[made] = self.layouts.get(first.src)
        return _Chain(made, first.shape, list(first.ops), node)

    def _part_constant_op(self, node: fx.Node, part: "_Chain", others: list) -> fx.Node | None:
        """`part op c` or `c op part` (add/sub/mul/div) with a tensor constant c (a parameter or buffer, such
        as per-pixel or per-row weights): c broadcasts against the squeezed part, so with the squeezed dims
        put back it broadcasts the same way against the 4-D part, where _constant_op makes the layer."""
        op = _ARITH.get(_key(node))
        if op is None or len(node.args) != 2 or node.kwargs or len(others) != 1:
            return None
        const = _constant(self.env.get(others[0]), self.src)
        const = _unsqueezed_constant(const, part) if isinstance(const, Tensor) else None
        if const is None:
            return None
        return self._constant_op(self._name(node), part.src, const, op, node.args[1] is others[0], part.shape)

    def _stack(self, node: fx.Node) -> fx.Node | None:
        p = _bind(lambda tensors, dim=0: locals(), node.args, node.kwargs)
        tensors, dim = p["tensors"], p["dim"]
        if isinstance(tensors, fx.Node):
            parts = self.env.get(tensors)
            parts = list(parts) if isinstance(parts, tuple) else None
        else:
            parts = [self.env.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if not parts or not isinstance(dim, int) or not all(isinstance(v, _Chain) for v in parts):
            return None
        if any(v.squeezed() != (1,) for v in parts) or dim % 4 != 1:
            return None  # only a stack along channels is a concatenation of the 4-D parts
        if len({v.shape[2:] for v in parts}) != 1:
            return None
        return self._add_layer(DeltaCat(self._name(node)), tuple(v.src for v in parts))

    def _delta_tail(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node | None:
        """A dense tail whose function has a delta form (`fn.delta_tail`: a DenseCall subclass made as
        DenseCall is, whose stream arguments arrive as DeltaTensors; YOLOv8's box decode) takes the streams
        themselves, not densified copies; a channel concatenation that only this call uses arrives as the
        tuple of its parts (the call reads them in place, and the cat is not run). None: no such form."""
        make = _delta_tail_of(node)
        if make is None:
            return None
        old_of = {v: k for k, v in self.env.items() if isinstance(v, fx.Node)}

        def parts(a: Any) -> Any:
            old = old_of.get(a)
            if a in self.streams and a.op == "call_module" and old is not None and len(old.users) == 1 \
                    and isinstance(self.holder.get_submodule(a.target[len("_delta."):]), DeltaCat):
                return tuple(a.args)
            return a

        args, kwargs = fx.node.map_aggregate((args, kwargs), lambda a: parts(a) if isinstance(a, fx.Node) else a)
        flat = _flatten_nodes((args, kwargs))
        template, inputs = _template(args, kwargs, flat)
        macs = int(node.meta.get("macs", 0))
        n = self._add_layer(make(self._name(node), template, macs, _target_name(node)), inputs, stream=False,
                            macs=macs)
        self.dense_derived.add(n)
        self.reports_at[n] = self._tail(node, macs, incremental=True)
        return n

    def _unsupported(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        meta = _shape(node)
        is_map = meta is not None and len(meta) == 4 and _is_float(node)
        what = _target_name(node)
        if not is_map and (tail := self._delta_tail(node, args, kwargs)) is not None:
            return tail
        if not is_map:
            # the image stream ends here (flatten, Linear on pooled features, a box decode): a dense tail
            new_args = fx.node.map_arg(args, lambda n: self._densify(n) if n in self.streams else n)
            new_kwargs = fx.node.map_arg(kwargs, lambda n: self._densify(n) if n in self.streams else n)
            return self._dense_node(node, new_args, new_kwargs, _flatten_nodes((new_args, new_kwargs)))
        if not self.allow_fallback:
            raise UnsupportedOperationError(
                f"{describe_node(node)} calls {what}, which has no delta version. Either pass "
                "allow_dense_fallback=True to convert() to run it densely between a densify and a sparsify "
                "(correct, but that op costs a dense pass every frame), or replace it in the model with supported "
                "ops (see deltacnn.SUPPORTED_OPS).")
        flat = _flatten_nodes((args, kwargs))
        template, inputs = _template(args, kwargs, flat)
        macs = int(node.meta.get("macs", 0))
        island = DenseIsland(self._name(node), _as_callable(node, self.modules), 0, reenter=True, template=template,
                             streams=[a in self.streams for a in inputs], macs=macs, what=what)
        self.islands.append(DenseReport(node.name, what, macs, node.meta.get(SOURCE)))
        return self._add_layer(island, inputs, macs=macs)


_SHAPE_ONLY = {"expand_as", "view_as", "reshape_as", "type_as"}


def _ndim(n: Any) -> int | None:
    s = _shape(n)
    return len(s) if s is not None else None


def _permute_dims(node: fx.Node) -> tuple | None:
    """The dims of a permute call (method or function, dims as varargs or one sequence), else None."""
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1:] or (node.kwargs.get("dims"),)
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    try:
        return tuple(int(d) % 4 for d in dims) if len(dims) == 4 else None
    except TypeError:
        return None


def _channel_constant(const: Tensor | float, channels_last: bool) -> Tensor | float | None:
    """A constant operand of an elementwise op on a stream as a scalar or a (C,) per-channel tensor,
    or None when it varies over space or batch (then it is not a per-channel scale).

    On an (N, C, H, W) map a per-channel constant has shape (C, 1, 1) or (1, C, 1, 1); a 1-D
    tensor would broadcast over W, not C. On a channels-last view it has shape (C,) or (1, 1, 1, C).
    """
    if not isinstance(const, Tensor):
        return const
    if const.numel() == 1:
        return const.reshape(())
    shape = list(const.shape)
    if channels_last:
        return const.reshape(-1) if all(s == 1 for s in shape[:-1]) else None
    if len(shape) >= 3 and shape[-2:] == [1, 1] and all(s == 1 for s in shape[:-3]):
        return const.reshape(-1)
    return None


def _eval_identities() -> dict[Any, Callable[..., bool]]:
    """Functions that return their input unchanged in eval mode, each with a test of its arguments."""
    drop = lambda input, p=0.5, training=True, inplace=False: training is False or p == 0  # noqa: E731
    table: dict[Any, Callable[..., bool]] = {f: drop for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                                              F.alpha_dropout, F.feature_alpha_dropout)}
    try:
        from torchvision.ops import stochastic_depth  # traced as one call (torchvision fx-wraps it)
        table[stochastic_depth] = lambda input, p, mode, training=True: training is False or p == 0
    except Exception:  # noqa: BLE001 - torchvision is optional
        pass
    return table


_EVAL_IDENTITIES: dict | None = None


def _identity_in_eval(target: Any, args: tuple, kwargs: dict) -> bool:
    """True if calling `target` with these (constant) arguments returns its input: dropout with
    training=False, torchvision's stochastic_depth in eval (timm's drop_path traces away by itself)."""
    global _EVAL_IDENTITIES
    if _EVAL_IDENTITIES is None:
        _EVAL_IDENTITIES = _eval_identities()
    test = _EVAL_IDENTITIES.get(target) if not isinstance(target, str) else None
    if test is None:
        return False
    try:
        return bool(test(*args, **kwargs))
    except TypeError:
        return False


def _flatten_nodes(x) -> list:
    """The distinct graph nodes inside x, in order of first appearance."""
    out: list = []
    fx.node.map_arg(x, lambda n: out.append(n) if n not in out else None)
    return out


def _template(args: tuple, kwargs: dict, nodes: list) -> tuple[tuple, tuple]:
    """(args, kwargs) with Slot(i) for nodes[i]; and the nodes as the layer's inputs."""
    slots = {n: Slot(i) for i, n in enumerate(nodes)}
    return fx.node.map_aggregate((args, kwargs), lambda a: slots[a] if isinstance(a, fx.Node) else a), tuple(nodes)


def _delta_tail_of(node: fx.Node) -> Callable | None:
    """The delta form of a dense-tail function (its `delta_tail` attribute: deltacnn.models.yolov8's
    decode_boxes), or None (benchmarks/cpu_profile.py's "delta_decode" switch patches this check)."""
    return getattr(node.target, "delta_tail", None) if node.op == "call_function" else None


def _key(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _open(i: slice) -> bool:
    """Whether slice i is `:` (all of a dim at any size: no start, stop or step other than 0 / None / 1)."""
    return i.start in (None, 0) and i.stop is None and i.step in (None, 1)


def _index_4d(idx: tuple, shape: tuple) -> tuple | None:
    """A static index of a 4-D map written out to four entries (Ellipsis and missing trailing dims as
    full slices); None for graph values in it, batch indexing or too many indices."""
    if _flatten_nodes(idx):
        return None
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (4 - len(idx) + 1) + idx[k + 1:]
    idx = idx + (slice(None),) * (4 - len(idx))
    if len(idx) != 4 or not isinstance(idx[0], slice) or slice(*idx[0].indices(shape[0])) != slice(0, shape[0], 1):
        return None
    return idx


def _elementwise(node: fx.Node, modules: dict) -> bool:
    """Whether the op acts on each element alone (or adds/multiplies two of the same shape): such an op
    commutes with indexing a dim away, so it can run on the 4-D part before the squeeze."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, (nn.Identity, nn.Dropout)) or _module_act(m) is not None
    key = _key(node)
    return key in _ADD | _SUB | _MUL | _DIV | _PASS | set(_FN_ACTS) | {operator.neg, "neg"}


_CAT = {torch.cat, torch.concat}
_ARITH = {**{k: "add" for k in _ADD}, **{k: "sub" for k in _SUB}, **{k: "mul" for k in _MUL},
          **{k: "div" for k in _DIV}}


def _unsqueezed_constant(const: Tensor, part: "_Chain") -> Tensor | None:
    """A constant that broadcasts against a squeezed part (the part's 4-D shape without its squeezed dims),
    reshaped to broadcast the same way against the 4-D part; None if it would enlarge the part."""
    dims = part.squeezed() or ()
    out = tuple(s for i, s in enumerate(part.shape) if i not in dims)
    try:
        if tuple(torch.broadcast_shapes(tuple(const.shape), out)) != out:
            return None
    except RuntimeError:
        return None
    c = const.reshape((1,) * (len(out) - const.dim()) + tuple(const.shape))
    for d in sorted(dims):
        c = c.unsqueeze(d)
    return c


_PARTS = _SPLITS | _UNBIND | _SELECT | {"narrow", torch.narrow}
# elementwise ops with broadcasting besides those _elementwise knows (for pixel layouts only)
_BROADCASTING = {torch.where, "where", torch.maximum, "maximum", torch.minimum, "minimum", torch.pow, "pow",
                 operator.pow}
_REORDER = {"permute", torch.permute, "transpose", torch.transpose, "swapaxes", torch.swapaxes, "swapdims",
            torch.swapdims}


def _reorder(target: Any, rest: tuple, kw: dict, ndim: int) -> list[int] | None:
    """The dim order of a permute / transpose / swapaxes call on an ndim-D tensor (None if not static)."""
    try:
        if target in ("permute", torch.permute):
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or kw.get("dims")
            return [int(d) % ndim for d in dims]
        d0, d1 = rest[:2] if len(rest) >= 2 else (kw["dim0"], kw["dim1"])
        order = list(range(ndim))
        order[int(d0) % ndim], order[int(d1) % ndim] = order[int(d1) % ndim], order[int(d0) % ndim]
        return order
    except (TypeError, ValueError, KeyError):
        return None


# reductions called as (input, dim, keepdim): a reduced channel dim leaves a map of the stream's pixels
_REDUCE = {"sum", torch.sum, "mean", torch.mean, "amax", torch.amax, "amin", torch.amin, "max", torch.max, "min",
           torch.min, "logsumexp", torch.logsumexp, "prod", torch.prod, "median", torch.median, "argmax", torch.argmax,
           "argmin", torch.argmin}


def _reduced_layout(node: fx.Node, layout: pl.Layout) -> Any:
    """The layout of a reduction over static dims (a tuple of two for max/min/median's values and indices)."""
    p = _bind(lambda input, dim=None, keepdim=False, *a, **k: (dim, keepdim), node.args, node.kwargs)
    dims = p[0] if isinstance(p[0], (tuple, list)) else (p[0],)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims) or not isinstance(p[1], bool):
        return None  # dim=None (everything) or not static
    out = pl.reduce(layout, dims, p[1])
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # (values, indices), not one TensorMetadata
        return (out, out) if len(meta) == 2 and len(meta[0].shape) == len(out.dims) else None
    return out if _shape(node) is not None and len(_shape(node)) == len(out.dims) else None


def _view_layout(layout: pl.Layout, target: Any, rest: tuple, kw: dict, in_shape: tuple,
                 out_shape: tuple) -> pl.Layout | None:
    """The layout after one view-like op: permutes reorder the dims, all others regroup them."""
    if target in _REORDER:
        order = _reorder(target, rest, kw, len(in_shape))
        return pl.permute(layout, order) if order is not None else None
    if target == "contiguous":
        return layout
    return pl.reshape(layout, in_shape, out_shape)


def _part_layouts(node: fx.Node, layout: pl.Layout, shape: tuple) -> Any:
    """The layouts of select / narrow (one) and unbind / chunk / split / tensor_split (a tuple) on a dense value."""
    key, nd = _key(node), len(shape)
    try:
        if key in _SELECT:
            p = _bind(lambda input, dim, index: locals(), node.args, node.kwargs)
            return pl.index(layout, shape, (slice(None),) * (p["dim"] % nd) + (int(p["index"]),))
        if key in ("narrow", torch.narrow):
            p = _bind(lambda input, dim, start, length: locals(), node.args, node.kwargs)
            sl = slice(int(p["start"]), int(p["start"]) + int(p["length"]))
            return pl.index(layout, shape, (slice(None),) * (p["dim"] % nd) + (sl,))
        if key in _UNBIND:
            d = _bind(lambda input, dim=0: dim, node.args, node.kwargs) % nd
            return tuple(pl.index(layout, shape, (slice(None),) * d + (i,)) for i in range(shape[d]))
        metas = node.meta.get("tensor_meta")
        name = key if isinstance(key, str) else key.__name__
        sig = {"chunk": lambda input, chunks, dim=0: dim, "split": lambda tensor, split_size_or_sections, dim=0: dim,
               "tensor_split": lambda input, indices_or_sections, dim=0: dim}[name]
        d = _bind(sig, node.args, node.kwargs) % nd
        parts, start = [], 0
        for m in metas:
            parts.append(pl.index(layout, shape, (slice(None),) * d + (slice(start, start + m.shape[d]),)))
            start += m.shape[d]
        return tuple(parts)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def _shape(node: Any) -> tuple | None:
    """The static shape of a node's tensor result (from the example run, else from tracing)."""
    if not isinstance(node, fx.Node):
        return None
    m = node.meta.get("tensor_meta")
    if m is not None and hasattr(m, "shape"):
        return tuple(m.shape)
    m = node.meta.get(META)
    return tuple(m.shape) if isinstance(m, Tensor) else None


def _is_float(node: fx.Node) -> bool:
    m = node.meta.get("tensor_meta")
    if m is not None and hasattr(m, "dtype"):
        return m.dtype.is_floating_point
    m = node.meta.get(META)
    return isinstance(m, Tensor) and m.is_floating_point()


@dataclass
class DenseReport:
    """An op that runs densely: graph node, op, dense multiply-adds per frame, the user's source line.

    `incremental`: a tail with a delta form (`fn.delta_tail`, YOLOv8's box decode) that reads the streams
    and, where its backend allows, recomputes only the outputs whose inputs changed: listed, not warned about."""

    node: str
    op: str
    macs: int
    source: str | None = None
    incremental: bool = False


class _Chain:
    """View-like ops (view/reshape/permute/transpose/flatten) applied to a stream, not yet back at a map."""

    def __init__(self, src: fx.Node, shape: tuple | None, ops: list, last: fx.Node) -> None:
        self.src, self.shape, self.ops, self.last = src, shape, ops, last

    def replay(self, x: Tensor) -> Tensor:
        x = x.contiguous()  # densified streams are channels_last; view() in the chain expects the model's layout
        for op, target, rest, kw in self.ops:
            x = self.apply(x, op, target, rest, kw)
        return x

    @staticmethod
    def apply(x: Tensor, op: str, target: Any, rest: tuple, kw: dict) -> Tensor:
        """One op of a chain on x."""
        return getattr(x, target)(*rest, **kw) if op == "call_method" else target(x, *rest, **kw)

    def describe(self) -> str:
        return " -> ".join(t if isinstance(t, str) else t.__name__ for _, t, _, _ in self.ops)

    def squeezed(self) -> tuple[int, ...] | None:
        """The dims a chain of squeezes only removes (the parts of unbind / select), else None."""
        if not self.ops or any(op != "call_method" or t != "squeeze" or len(r) != 1 or kw for op, t, r, kw in self.ops):
            return None
        return tuple(sorted(r[0] for _, _, r, _ in self.ops))

    def channel_permutation(self) -> list[int] | None:
        """Source channel of each output channel when the chain maps every pixel to itself, else None.

        Found by running the chain on a tensor holding each element's own index (float64: exact)."""
        n, c, h, w = self.shape
        if n * c * h * w > 2 ** 24:  # the probe is float64: at most 128 MB
            return None
        probe = torch.arange(n * c * h * w, dtype=torch.float64).view(n, c, h, w)
        try:
            out = self.replay(probe)
        except Exception:  # noqa: BLE001 - the shapes were right when traced; be safe anyway
            return None
        if out.dim() != 4 or out.shape[0] != n or tuple(out.shape[2:]) != (h, w):
            return None
        src = out.long()
        pix = torch.arange(h * w).view(1, 1, h, w)
        batch = torch.arange(n).view(n, 1, 1, 1)
        chan = (src - batch * (c * h * w) - pix)
        if bool((chan % (h * w)).ne(0).any()):
            return None
        chan = chan // (h * w)
        if bool((chan != chan[:1, :, :1, :1]).any()) or bool(((chan < 0) | (chan >= c)).any()):
            return None
        return chan[0, :, 0, 0].tolist()


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


# ---- graph passes ------------------------------------------------------------------------------------
def _get_attr(root: nn.Module, a: Any) -> Tensor | None:
    """The tensor behind a get_attr node (a parameter or buffer), else None."""
    if not (isinstance(a, fx.Node) and a.op == "get_attr"):
        return None
    obj: Any = root
    for part in a.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, Tensor) else None


def functional_batchnorms_to_modules(gm: fx.GraphModule) -> int:
    """Turn each eval-mode `F.batch_norm` on a 4-D map (timm's BatchNormAct2d calls it) into a
    BatchNorm2d module call, so that `fold_batchnorms` folds it and the converter knows it.

    Only calls with constant running statistics and training=False: that is a fixed per-channel
    scale and shift. Returns how many were replaced.
    """
    done = 0
    for n in list(gm.graph.nodes):
        if not (n.op == "call_function" and n.target is F.batch_norm):
            continue
        p = _bind(lambda input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                  eps=1e-5: locals(), n.args, n.kwargs)
        meta = n.meta.get("tensor_meta")
        mean, var = _get_attr(gm, p["running_mean"]), _get_attr(gm, p["running_var"])
        weight, bias = _get_attr(gm, p["weight"]), _get_attr(gm, p["bias"])
        if (p["training"] is not False or mean is None or var is None or meta is None or len(meta.shape) != 4
                or (p["weight"] is not None and weight is None) or (p["bias"] is not None and bias is None)):
            continue
        c = mean.numel()
        bn = nn.BatchNorm2d(c, eps=float(p["eps"]), affine=True).to(mean.device)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(weight if weight is not None else torch.ones(c))
            bn.bias.copy_(bias if bias is not None else torch.zeros(c))
        bn.eval()
        qual = re.sub(r"\.?running_mean$", "", p["running_mean"].target) or "bn"
        key = qual.replace(".", "_") + "_bn"
        while hasattr(gm, key):
            key += "_"
        gm.add_module(key, bn)
        with gm.graph.inserting_before(n):
            m = gm.graph.call_module(key, (p["input"],))
        m.meta = dict(n.meta)
        n.replace_all_uses_with(m)
        gm.graph.erase_node(n)
        done += 1
    gm.graph.lint()
    gm.recompile()
    return done


def fold_batchnorms(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm2d that directly follows a conv (or transposed conv) used only there into its weights."""
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
        kind = type(modules.get(prev.target)) if isinstance(prev, fx.Node) and prev.op == "call_module" else None
        # a transposed conv too (CenterFace's neck: ConvTranspose, BN, ReLU), so that no DeltaScale pass over the map
        # is left between them (a grouped one's weight is (Cin, Cout / groups, k, k): fuse_conv_bn_eval scales dim 1
        # by Cout)
        transposed = kind is nn.ConvTranspose2d and modules[prev.target].groups == 1
        if not ((kind is nn.Conv2d or transposed) and len(prev.users) == 1
                and conv_calls[prev.target] == 1 and modules[n.target].track_running_stats):
            continue
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(modules[prev.target], modules[n.target], transpose=transposed)
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


def fold_scales(gm: fx.GraphModule) -> int:
    """conv -> DeltaScale (an unfolded batch norm, `x * c + b`) becomes one conv with scaled weights and
    bias, when the conv has no other user and the scale and shift are scalars or per output channel."""
    mods = dict(gm.named_modules())
    folded = 0
    for n in list(gm.graph.nodes):
        conv = mods.get(n.target) if n.op == "call_module" else None
        if not isinstance(conv, DeltaConv2d) or conv.act is not None or conv.residual:
            continue
        while len(n.users) == 1:  # conv -> scale -> scale ...: fold them one after another
            user = next(iter(n.users))
            sc = mods.get(user.target) if user.op == "call_module" else None
            if not isinstance(sc, DeltaScale) or user.args[0] is not n:
                break
            if not _fold_scale(conv, sc):
                break
            user.replace_all_uses_with(n)
            gm.graph.erase_node(user)
            folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def mark_cats_read_in_place(gm: fx.GraphModule) -> int:
    """Set DeltaCat.read_in_place on each cat whose one user is a 1x1 conv with an activation (stride 1, no
    padding, groups 1) that takes it as its input: the conv may read the cat's parts in place (Backend.cat_in_place
    on delta frames, Backend.dense_cat_in_place on keyframes). Returns how many were marked."""
    mods = dict(gm.named_modules())
    marked = 0
    for n in gm.graph.nodes:
        cat = mods.get(n.target) if n.op == "call_module" else None
        if not isinstance(cat, DeltaCat) or len(n.users) != 1:
            continue
        user = next(iter(n.users))
        conv = mods.get(user.target) if user.op == "call_module" else None
        w = conv.window if isinstance(conv, DeltaConv2d) else None
        if w is None or conv.act is None or conv.groups != 1 or user.args[:1] != (n,) or n in user.args[1:] \
                or n in user.kwargs.values() \
                or w.kernel != (1, 1) or w.stride != (1, 1) or any(w.padding):
            continue
        cat.read_in_place = True
        marked += 1
    return marked


def _fold_scale(conv: DeltaConv2d, sc: DeltaScale) -> bool:
    """conv.weight *= scale, conv.bias = bias * scale + shift (per output channel); False if it cannot."""
    cout = conv.weight.shape[0]
    if sc.scale.dim() > 1 or sc.shift.dim() > 1:
        return False  # a spatially varying shift: not a per-channel bias
    scale, shift = sc.scale.reshape(-1), sc.shift.reshape(-1)
    if scale.numel() not in (1, cout) or shift.numel() not in (1, cout):
        return False
    with torch.no_grad():
        w = conv.weight.float() * scale.reshape(-1, 1, 1, 1)
        b = (conv.bias.float() if conv.bias is not None else torch.zeros(cout, device=w.device)) * scale + shift
        conv.weight.copy_(w.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(b.to(conv.bias.dtype))
    return True


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
    "Conv2d (any kernel/stride/padding incl. 'same'/dilation/groups, bias), ConvTranspose2d, BatchNorm2d and "
    "eval-mode F.batch_norm (folded into the conv, else scale+shift; constant scales after a conv fold too), ReLU, "
    "ReLU6, LeakyReLU, PReLU, ELU, Hardtanh, SiLU, Hardswish, Hardsigmoid, Sigmoid, Tanh, GELU "
    "(modules, functions and tensor methods), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Upsample/interpolate "
    "(nearest, nearest-exact, bilinear, bicubic, area; static size or scale_factor, also from x.shape), add/sub of "
    "two streams or a constant, mul of two streams (broadcast allowed) or by a constant, division by a constant, neg, "
    "torch.cat on channels, chunk/split/tensor_split along channels, rows or columns (and getitem/unpacking of "
    "their parts), unbind / select / integer indexing x[:, i] along channels, rows or columns (the 3-D parts stay "
    "delta through elementwise ops, also with tensor constants such as per-pixel or per-row weights, and come back "
    "to a map by unsqueeze or stack along channels; used otherwise, e.g. in a box decode, they end as a listed "
    "dense tail), slicing x[:, a:b:s, ..., ::2, ::2] (bounds may come "
    "from x.shape), narrow, view/reshape/permute/"
    "transpose/flatten chains that come back to a map as a channel permutation (channel shuffle), pixel_shuffle, "
    "pixel_unshuffle, roll, flip, F.pad / nn.*Pad2d (constant, reflect, replicate, circular), mean over (2, 3) with "
    "keepdim, Identity/Dropout (also F.dropout*, torchvision stochastic_depth in eval); a stream times, plus or "
    "divided by a tensor computed densely (a squeeze-excitation gate from Linear layers: sparsified as a second "
    "stream, exact); on a channels-last view x.permute(0, 2, 3, 1) (ConvNeXt): LayerNorm over channels (a per-pixel "
    "nonlinear delta layer), Linear over channels (a 1x1 delta conv), activations, per-channel constants, permute "
    "back; anything after the feature map stops being 4-D (flatten, Linear, box decodes) runs densely as a reported "
    "dense tail, unless it becomes a feature map of the stream's pixels again (a softmax over the flattened pixels "
    "viewed back, a max over channels unsqueezed; deltacnn/pixel_layout.py): then those dense ops are a dense "
    "island (allow_dense_fallback=True) and the map re-enters the delta stream; so is multiply-add work (a conv, "
    "Linear, matmul) on a dense value whose dim 0 is no longer the frame batch (x.view(N * C, 1, H, W), a permute "
    "that moves the batch) or whose layout the converter cannot follow."
)


def convert(model: nn.Module, example_input: Tensor, *, threshold: float = 0.0, input_threshold: float | None = None,
            score: str = "max", thresholds_file: str | None = None, dtype: torch.dtype | None = None,
            keyframe_interval: int | None = None, mask_dilation: int = 1, allow_dense_fallback: bool = False,
            fuse: bool = True, backend: str | None = None, on_input_change: str = "error",
            dense_above: float | None = 0.5, leaf_modules: Iterable[type | str] = (),
            min_blob: int = 1, input_gate: InputGate | None = None,
            threshold_growth: float = 0.0, refresh_held: float | None = None, refresh: "str | Refresh | None" = None,
            refresh_drift: float | None = None, refresh_layers: "str | LayerRefresh | None" = None,
            motion=None) -> DeltaModel:
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
        min_blob: send input changes only where they cover a k x k square (odd k; 1: off): isolated
            noise pixels are held back instead of densifying the network (a shortcut for
            `input_gate=InputGate(min_blob=k)`).
        input_gate: a deltacnn.InputGate: which changed input pixels are sent (small-blob opening, tile
            energy gate, spatial/temporal hysteresis; deltacnn.gating). Held-back change is never lost.
        threshold_growth: deep-layer truncation: every layer threshold times (its output stride / the
            smallest stride) ** growth (Thresholds.growth; 0: off, saved with the thresholds file).
        refresh_held: a stream runs a keyframe once the input gates hold back changes above the input
            threshold in more than this fraction of its pixels (changes a gate never lets through, such as
            a small object that stays, are then sent within a frame; None: off; host backends).
        refresh: what that refresh runs (deltacnn.gating.Refresh): "keyframe" (default), "flush" (a delta
            frame that sends the held-back input change, costing what the held area costs) or
            "flush:B:M" (only in B x B tiles holding at least M held pixels), with "@F" layer thresholds x F
            on flush frames; a deltacnn.Refresh is accepted too.
        refresh_drift: a stream runs a keyframe once its input's unsent change, mean |x - ref| over its pixels
            and channels, exceeds this multiple of the input threshold (None: off; host backends).
        refresh_layers: re-send the deep layers' held-back truncation residuals without a keyframe, or run a
            keyframe when their touched area passes a level (deltacnn.layer_refresh.LayerRefresh spec: "flush:8"
            every 8 frames, "flush:a0.3" once the touched area passes 0.3, "keyframe:a0.3", with ":sS" for the
            layers of output stride >= S (default 16) and "@F" for their threshold factor (default 0); None:
            off; host backends). Like refresh_held, refresh and keyframe_interval, a thresholds file's rule
            applies unless one is given here.
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
        leaf_modules: module classes or qualified names that tracing keeps as one call instead of
            tracing into (for modules with data-dependent control flow); without a delta version
            they run as dense islands (needs allow_dense_fallback=True).
        motion: None or "none": a static camera. "auto", a motion file or a (T, [N,] 2) / (T, [N,] 3, 3)
            sequence: returns a deltacnn.motion.MotionDeltaModel around the delta model, whose state
            follows the camera (see deltacnn/motion; construct it yourself for its other options).
    """
    if motion is not None:  # a bad motion file fails before the conversion's work
        from .motion import resolve_motion
        motion = resolve_motion(motion)
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
    # tracing, shape propagation and the graph passes patch or cache process-wide state in torch.fx and
    # in the dispatcher: conversions in two threads take turns (a second thread's ShapeProp failed)
    with TRACE_LOCK:
        traced = trace(model, example_input, leaf_modules)
        device = next(model.parameters(), example_input).device
        with torch.no_grad():
            try:
                _Profile(traced).propagate(example_input.to(device))
            except Exception as e:  # noqa: BLE001
                raise ConversionError(f"running the model on example_input of shape {tuple(example_input.shape)} "
                                      f"failed: {type(e).__name__}: {e}") from e
        functional_batchnorms_to_modules(traced)
        fold_batchnorms(traced)
        conv = _Converter(traced, allow_dense_fallback, mask_dilation)
        gm = conv.run()
        if fuse:
            fold_scales(gm)
            fuse_epilogues(gm)
            mark_cats_read_in_place(gm)
        else:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
            gm.recompile()
        check_no_silent_dense(gm)
    gm = gm.to(dtype)
    layers = {m.name: m for m in gm.modules() if isinstance(m, DeltaLayer)}
    names = [INPUT] + sorted({m.act_name if isinstance(m, DeltaConv2d) else m.name
                              for m in layers.values()
                              if isinstance(m, (DeltaActivation, DeltaMaxPool2d, DeltaMul, DeltaLayerNorm, Sparsify))
                              or (isinstance(m, DeltaConv2d) and m.act is not None)} - {INPUT})
    gate = gate_from_options(check_min_blob(min_blob), input_gate)
    h_in = example_input.shape[2]
    strides = {n: h_in / conv.out_hw[n][0] for n in names if n != INPUT and n in conv.out_hw and conv.out_hw[n][0]}
    th = Thresholds(default=threshold, input=input_threshold, score=score, known=tuple(names),
                    growth=threshold_growth, strides=strides)
    if thresholds_file is not None:
        th.load(thresholds_file)
        if threshold_growth and th.growth != threshold_growth:
            if th.growth:
                raise ValueError(f"threshold_growth={threshold_growth} and the thresholds file's growth {th.growth} "
                                 "disagree; give one")
            th.growth = threshold_growth
    if refresh_held is not None and not 0 <= refresh_held <= 1:
        raise ValueError(f"refresh_held must be a fraction in [0, 1] or None, got {refresh_held}")
    if refresh_held is None and th.refresh_held is not None:  # a tuned file's refresh rule unless one is asked for
        refresh_held = th.refresh_held
    if refresh is None and th.refresh is not None:  # the tuned file's refresh unless one is asked for
        refresh = th.refresh
    if refresh_drift is not None and not (math.isfinite(refresh_drift) and refresh_drift >= 0):
        raise ValueError(f"refresh_drift must be a finite number >= 0 or None, got {refresh_drift}")
    if refresh_drift is None and th.refresh_drift is not None:  # the tuned file's rules unless asked for
        refresh_drift = th.refresh_drift
    if refresh_layers is None and th.refresh_layers is not None:
        refresh_layers = th.refresh_layers
    rt = Runtime(th, dtype=dtype, backend_name=backend, dense_above=dense_above, refresh_held=refresh_held,
                 refresh=Refresh.parse(refresh), refresh_drift=refresh_drift,
                 layer_refresh=LayerRefresh.parse(refresh_layers))
    if example_input.device.type == "cpu" and backend in (None, "cpu"):
        rt.backend_for(example_input)  # builds the CPU kernels now (once per machine), not in frame 1's time
    for m in gm.modules():
        if isinstance(m, DeltaLayer):
            m.set_runtime(rt)
        if isinstance(m, Sparsify) and m.name == INPUT:
            m.gate = gate
            if min_blob == 1 and gate.min_blob == 1 and th.min_blob:  # a tuned file's gate unless one is asked for
                m.min_blob = th.min_blob
    if keyframe_interval is None and th.keyframe_interval is not None:  # the tuned file's interval
        keyframe_interval = th.keyframe_interval
    dm = DeltaModel(gm, rt, layers, example_input.shape[1], keyframe_interval, on_input_change)
    total = sum(int(n.meta.get("macs", 0)) for n in traced.graph.nodes)
    dm.report = ConversionReport(islands=conv.islands, tails=conv.tails, total_macs=total,
                                 layer_macs={k: conv.macs.get(k, 0) for k in layers})
    if dm.report.warns:
        warnings.warn(dm.report.describe(), DenseOpsWarning, stacklevel=2)
    if motion is not None and not (isinstance(motion, str) and motion == "none"):
        from .motion import MotionDeltaModel
        return MotionDeltaModel(dm, motion)
    return dm


class DenseOpsWarning(UserWarning):
    """convert() lists the ops that run densely: dense islands (allowed by the user) and dense tails."""


@dataclass
class ConversionReport:
    """What convert() made dense, with each op's share of a dense frame's multiply-adds."""

    islands: list[DenseReport]
    tails: list[DenseReport]
    total_macs: int
    layer_macs: dict[str, int]

    def share(self, macs: int) -> float:
        return macs / self.total_macs if self.total_macs else 0.0

    @property
    def dense_tails(self) -> list[DenseReport]:
        """The tails that run densely on every frame (not the incremental ones)."""
        return [r for r in self.tails if not r.incremental]

    @property
    def warns(self) -> bool:
        """Whether convert() warns: a dense island or a tail that runs densely on every frame."""
        return bool(self.islands or self.dense_tails)

    def describe(self) -> str:
        dense = self.dense_tails
        lines = [f"deltacnn.convert: {len(self.islands)} dense island(s) (allow_dense_fallback=True) and "
                 f"{len(dense)} op(s) in dense tails run densely on every frame:"]
        for r in self.islands:
            lines.append(f"  dense island {r.node!r}: {r.op}, {self.share(r.macs):.1%} of the model's MACs"
                         + (f" (at {r.source})" if r.source else ""))
        for title, tails in (("dense tail after the last feature maps", dense),
                             ("incremental tail (reads the delta streams; on the cpu backend recomputes only "
                              "what changed)", [r for r in self.tails if r.incremental])):
            if tails:
                macs = sum(r.macs for r in tails)
                names = ", ".join(f"{r.node} ({r.op})" for r in tails[:8]) + (", ..." if len(tails) > 8 else "")
                lines.append(f"  {title}: {names}; {self.share(macs):.1%} of the MACs")
        return "\n".join(lines)


class _Profile(ShapeProp):
    """ShapeProp that also records each node's multiply-adds on the example input (node.meta['macs'])."""

    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as fc:
            out = super().run_node(n)
        n.meta["macs"] = fc.get_total_flops() // 2
        return out


def check_no_silent_dense(gm: fx.GraphModule) -> None:
    """Raise if a convolution or Linear is called by the converted graph outside a delta or dense layer.

    Every such call must be a delta layer, a reported dense island or a reported dense tail
    (DenseCall); anything else is a converter bug that would run densely on every frame unseen.
    """
    mods = dict(gm.named_modules())
    for n in gm.graph.nodes:
        bad = (n.op == "call_module" and isinstance(mods.get(n.target), _DENSE_WORK)) or \
            (n.op == "call_function" and n.target in _DENSE_FNS)
        if bad:
            raise ConversionError(
                f"internal converter error: graph node {n.name!r} ({n.target}) calls a convolution/Linear outside "
                "every delta layer and every reported dense island or tail, so it would run densely on every frame "
                "without being reported. Please report this model; allow_dense_fallback does not change it.")
