"""ONNX CNN -> nn.Module: the small op set a plain CNN export uses (Conv, ConvTranspose, BN, ReLU, Add, Sigmoid).

Needs the ``onnx`` package (imported on use) to read the file; the result is an ordinary module
that ``torch.fx.symbolic_trace`` and ``deltacnn.convert`` accept.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["OnnxCNN"]


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _sym_pad(pads: list[int], what: str) -> tuple[int, int]:
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise NotImplementedError(f"asymmetric pads {pads} in {what}")
    return pads[0], pads[1]


class OnnxCNN(nn.Module):
    """A static CNN graph read from an ONNX file: Conv, ConvTranspose, BatchNormalization, Relu,
    Add, Sigmoid. Every layer is a named submodule; ``forward`` replays the fixed node list, so
    ``torch.fx.symbolic_trace`` yields a flat graph of ``call_module`` nodes and ``+``.
    """

    SUPPORTED = ("Conv", "ConvTranspose", "BatchNormalization", "Relu", "Add", "Sigmoid")

    def __init__(self, path: str | os.PathLike, input_name: str | None = None,
                 output_names: list[str] | None = None):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        g = model.graph
        inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in g.initializer}
        self.input_name = input_name or next(i.name for i in g.input if i.name not in inits)
        self.output_names = list(output_names or [o.name for o in g.output])
        self._steps: list[tuple[str, str | None, tuple[str, ...], str]] = []  # (op, module, ins, out)
        used: set[str] = set()
        counts: dict[str, int] = {}

        def new_name(kind: str, weight_name: str | None) -> str:
            if weight_name and "." in weight_name:  # named parameter from the exporter
                base = weight_name.rsplit(".", 1)[0].replace(".", "_")
            else:
                counts[kind] = counts.get(kind, 0) + 1
                base = f"{kind}{counts[kind] - 1:02d}"
            n, k = base, 1
            while n in used:
                n, k = f"{base}_{k}", k + 1
            used.add(n)
            return n

        for node in g.node:
            op, a = node.op_type, _attrs(node)
            ins, out = tuple(node.input), node.output[0]
            if op == "Conv" or op == "ConvTranspose":
                w = inits[ins[1]]
                b = inits[ins[2]] if len(ins) > 2 and ins[2] else None
                k = tuple(a.get("kernel_shape", w.shape[2:]))
                s = tuple(a.get("strides", (1, 1)))
                d = tuple(a.get("dilations", (1, 1)))
                grp = int(a.get("group", 1))
                pad = _sym_pad(list(a.get("pads", (0, 0, 0, 0))), node.name or out)
                if op == "Conv":
                    m = nn.Conv2d(w.shape[1] * grp, w.shape[0], k, s, pad, d, grp, bias=b is not None)
                else:
                    if any(a.get("output_padding", (0, 0))) or "output_shape" in a:
                        raise NotImplementedError("ConvTranspose output_padding/output_shape")
                    m = nn.ConvTranspose2d(w.shape[0], w.shape[1] * grp, k, s, pad, 0, grp,
                                           bias=b is not None, dilation=d)
                with torch.no_grad():
                    m.weight.copy_(w)
                    if b is not None:
                        m.bias.copy_(b)
                name = new_name("deconv" if op == "ConvTranspose" else "conv", ins[1])
                self.add_module(name, m)
                self._steps.append(("module", name, ins[:1], out))
            elif op == "BatchNormalization":
                sc, bi, mean, var = (inits[n] for n in ins[1:5])
                m = nn.BatchNorm2d(sc.numel(), eps=float(a.get("epsilon", 1e-5)))
                with torch.no_grad():
                    m.weight.copy_(sc)
                    m.bias.copy_(bi)
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                name = new_name("bn", ins[1])
                self.add_module(name, m)
                self._steps.append(("module", name, ins[:1], out))
            elif op in ("Relu", "Sigmoid"):
                name = new_name(op.lower(), None)
                self.add_module(name, nn.ReLU() if op == "Relu" else nn.Sigmoid())
                self._steps.append(("module", name, ins[:1], out))
            elif op == "Add":
                self._steps.append(("add", None, ins[:2], out))
            else:
                raise NotImplementedError(f"ONNX op {op} (node {node.name or out}) is not supported; "
                                          f"supported: {self.SUPPORTED}")
        self.eval()

    def forward(self, x: torch.Tensor):
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for kind, name, ins, out in self._steps:
            if kind == "module":
                env[out] = getattr(self, name)(env[ins[0]])
            else:
                env[out] = env[ins[0]] + env[ins[1]]
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs
