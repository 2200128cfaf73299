"""View steps inside the delta pass ("padded convolutions"): no keyframe, no receptive-field bands.

When the view origin steps by D (a multiple of the total stride S), StateAligner rolls every buffer
by D / s (aligned.py). What is then wrong in a layer's state is (a) the uncovered strip (no state:
zero-filled by the roll) and (b) a thin band at each view border whose taps read the border: at the
old border (now inside the view) the old padding, at the new border the departed content. Instead of
recomputing everything within the receptive-field bound R of both borders (YOLOv8n: R = 832 px, so
every view step was a keyframe), each layer fixes only its own strip and bands, from its own current
input, while the frame's ordinary delta pass runs:

* a forward pre-hook snapshots the layer's emitted state E at its fix windows (what its consumers
  accumulated there; 0 in the strip, which is what they saw as padding);
* the layer's delta step runs as always;
* a forward hook recomputes the layer's state at its fix windows: a keyframe of this one layer on a
  crop of its inputs' *current values* (strip + band + one reach of context), the crop's state pasted
  at the windows; then the layer's output delta there becomes E_new - E_snapshot (mask set), so every
  consumer sees the strip enter as values (new value - 0) and the bands as corrections (new - old).

The current values of a layer's inputs over the crops are what its producers hold: a stateful layer's
emitted state E (exact after its own fix), the input reference for the input layer; stateless layers
(add, cat, slices, parameter-free maps, convs without a nonlinearity) pass values on by running their
keyframe function on their inputs' crops. A fix window is wide enough (the layer's reach plus the reach
of the stateless layers before it) that every pixel outside it reads only pixels whose old state was
consistent with the new view; those are exact by the delta step itself. So at tau 0 the result equals
dense inference on the new view everywhere, at the cost of per-layer crops of width |D| + 2-3 reaches
(YOLOv8n at 640x448: 13% of a keyframe's multiply-adds) plus the step's change in the delta pass. With
thresholds the fix windows' corrections are emitted where they pass the layer's threshold, like any change.

Measured (motion6, BENCHMARKS.md): exact, and fewer multiply-adds than the band keyframes, but on YOLOv8n
the step's change still reaches most of the neck and head (the delta pass of a step frame does ~0.5 of
dense MACs), so on the cpu backend a padded step frame costs more than the keyframe it replaces: that is
why MotionDeltaModel's default stays view_step="bands".

Hooks only: no layer or backend code changes (any backend whose layers run as modules works). A
converted model whose graph passes delta tensors through something that is not a DeltaLayer is refused
(MotionNotSupportedError) on the first view step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..activations import truncation_score
from ..layers import DeltaConv2d, Densify, DeltaLayer, Sparsify
from ..stats import StatsRecorder
from ..tensor import DeltaTensor
from .aligned import MotionNotSupportedError, round_up as _up


@dataclass(frozen=True)
class Region:
    """One end of one axis of a stream's view that a view step changed.

    `axis` 2 (rows) or 3 (columns); `low`: the region touches the view's low end (index 0) rather
    than its high end; `strip`: width (frame px) of the uncovered strip there (0 at the departed end);
    `width`: width of the value crops kept for the layers' inputs (strip + the widest fix + context).
    """

    axis: int
    low: bool
    strip: int
    width: int

    def interval(self, size: int, w: int) -> tuple[int, int]:
        """The `w` frame pixels at this region's end of an axis of `size` pixels."""
        return (0, w) if self.low else (size - w, size)


def _deltas(args: tuple, kwargs: dict) -> list[DeltaTensor]:
    return [a for a in list(args) + list(kwargs.values()) if isinstance(a, DeltaTensor)]


def _tau(m: DeltaLayer) -> float:
    """The threshold the layer truncates what it sends with (0 for the model's output: exact)."""
    if isinstance(m, Densify):
        return 0.0
    name = getattr(m, "act_name", None) if isinstance(m, DeltaConv2d) else m.name
    return float(m.rt.thresholds.get(name)) if name is not None else 0.0


def _sums_input_deltas(m: DeltaLayer) -> bool:
    """Whether the layer's state is only the sum of its input deltas and its output no feature map
    (`summed_inputs`: YOLOv8's DeltaBoxDecode); see PaddedStep._fix_sums."""
    return callable(getattr(m, "summed_inputs", None))


def _out_key(m: DeltaLayer, keys: list[str]) -> str | None:
    """The state holding what the layer sent its consumers (its output's value)."""
    if isinstance(m, Sparsify):
        return "state_ref"
    if isinstance(m, Densify):
        return "state_out"
    return "state_emitted" if "state_emitted" in keys else None


class PaddedStep:
    """The hooks of one delta pass that carries view steps (see the module docstring).

    steps: per moved stream i, its regions. reach: per layer id, how far (frame px) its output pixels
    read beyond their own block. frame_hw: the view size.
    """

    def __init__(self, dm, layers: list[DeltaLayer], steps: dict[int, list[Region]], reach: dict[int, float],
                 frame_hw: tuple[int, int]) -> None:
        self.dm, self.rt = dm, dm.rt
        self.layers, self.steps, self.reach, self.hw = layers, steps, reach, frame_hw
        self.vals: dict[int, tuple[object, dict[int, list[Tensor]]]] = {}  # id(output) -> (it, per stream crops)
        self.chain: dict[int, float] = {}  # id(output) -> reach of the stateless layers since the last state
        self.pending: dict[int, dict] = {}  # id(layer) -> the pre-hook's windows and snapshots
        self.off = False  # the pass turned out to be a keyframe (dense dispatch): nothing to fix
        self.macs = 0  # multiply-adds of the layer crops (counted while the model records statistics)
        self._handles: list = []

    # ---- installation ------------------------------------------------------------------------------
    def __enter__(self) -> "PaddedStep":
        self._cats_in_place, self.rt.cats_in_place = self.rt.cats_in_place, False  # the hooks read every output
        for m in self.layers:
            self._handles.append(m.register_forward_pre_hook(self._before, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._after, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        self.rt.cats_in_place = self._cats_in_place
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.vals.clear()
        self.pending.clear()

    # ---- geometry of one layer's fix ---------------------------------------------------------------
    def _stride(self, t: Tensor) -> int:
        H = self.hw[0]
        if H % t.shape[2]:
            raise ValueError(f"map of height {t.shape[2]} is not the {H}-row view divided by a stride")
        return H // t.shape[2]

    def _windows(self, m: DeltaLayer, ins: list[DeltaTensor], s_out: int) -> tuple[int, int, int]:
        """(q, b, c): the grid every window of this layer lies on, its fix band and its context (frame px)."""
        q = s_out
        for t in ins:
            q = math.lcm(q, self._stride(t.values))
        chain = max((self.chain.get(id(t), 0.0) for t in ins), default=0.0)
        r = self.reach.get(id(m), 0.0)
        return q, _up(r + chain, q), _up(r, q)

    def _crop_of(self, t: DeltaTensor, i: int, reg_idx: int, reg: Region, lo: int, hi: int) -> Tensor:
        """Current values of delta tensor t (stream i) over frame px [lo, hi) of region reg."""
        got = self.vals.get(id(t))
        if got is None:
            raise MotionNotSupportedError(
                "a delta tensor reached a layer without passing through a DeltaLayer (an op outside the converted "
                "layers): view steps inside the delta pass cannot follow it; use MotionDeltaModel(view_step='bands')")
        s = self._stride(t.values)
        size = self.hw[reg.axis - 2]
        u0, u1 = reg.interval(size, reg.width)
        if lo < u0 or hi > u1:
            raise RuntimeError(f"padded view step: crop [{lo}, {hi}) outside the kept values [{u0}, {u1})")
        crop = got[1][i][reg_idx]
        return crop.narrow(reg.axis, (lo - u0) // s, (hi - lo) // s)

    def _keep(self, out, i: int, crops: list[Tensor], chain: float) -> None:
        entry = self.vals.setdefault(id(out), (out, {}))
        entry[1][i] = crops
        self.chain[id(out)] = chain

    # ---- hooks -----------------------------------------------------------------------------------
    def _before(self, m: DeltaLayer, args: tuple, kwargs: dict) -> None:
        if self.off or self.rt.streams is not None:
            return
        ins = _deltas(args, kwargs)
        if isinstance(m, Sparsify) or not ins or any(t.dense for t in ins):
            return
        if _sums_input_deltas(m):
            self._fix_sums(m, args, kwargs)
            return
        keys = [k for k, v in m._buffers.items() if k.startswith("state_") and v is not None]
        key = _out_key(m, keys)
        if not keys:
            return
        if key is None:
            raise MotionNotSupportedError(f"layer {m.name!r} keeps state but no emitted values: padded view steps "
                                          "cannot correct what it sends; use MotionDeltaModel(view_step='bands')")
        E = m._buffers[key]
        s_out = self._stride(E)
        q, b, c = self._windows(m, ins, s_out)
        snaps = {}
        for i, regs in self.steps.items():
            for j, reg in enumerate(regs):
                size = self.hw[reg.axis - 2]
                f0, f1 = reg.interval(size, reg.strip + b)
                if f1 > f0:
                    snaps[(i, j)] = E[i].narrow(reg.axis - 1, f0 // s_out, (f1 - f0) // s_out).clone()
        self.pending[id(m)] = {"q": q, "b": b, "c": c, "snaps": snaps, "key": key, "s_out": s_out, "tau": _tau(m)}

    def _after(self, m: DeltaLayer, args: tuple, kwargs: dict, out):
        rt = self.rt
        if self.off or rt.streams is not None:
            return out
        ins = _deltas(args, kwargs)
        if isinstance(m, Sparsify):
            if not isinstance(out, DeltaTensor) or out.dense:
                self.off = True  # the input layer turned the frame into a keyframe: every state is rebuilt
                return out
            return self._after_input(m, out, [a for a in args if isinstance(a, Tensor)])
        if not ins or _sums_input_deltas(m):
            return out  # a dense tail op (Tensors in, not a feature map of the view), or fixed before (_fix_sums)
        if any(t.dense for t in ins) or (isinstance(out, DeltaTensor) and out.dense):
            return out
        plan = self.pending.pop(id(m), None)
        if plan is None:  # stateless: pass values on over the value crops
            chain = max(self.chain.get(id(t), 0.0) for t in ins) + self.reach.get(id(m), 0.0)
            for i, regs in self.steps.items():
                crops = []
                for j, reg in enumerate(regs):
                    lo, hi = reg.interval(self.hw[reg.axis - 2], reg.width)
                    y, _ = self._layer_keyframe(m, args, kwargs, i, j, reg, lo, hi)
                    crops.append(y)
                self._keep(out, i, crops, chain)
            return out
        return self._after_stateful(m, args, kwargs, out, plan)

    def _fix_sums(self, m: DeltaLayer, args: tuple, kwargs: dict) -> None:
        """A layer whose state is only the sum of its input deltas and whose output is no feature map
        (DeltaBoxDecode): before it runs, each sum at each fix window becomes its input's current values
        there less what this pass adds (O += d), so that the layer's own update leaves O = the values."""
        for t, key in m.summed_inputs(*args, **kwargs):
            O = m._buffers.get(key)
            if O is None or not isinstance(t, DeltaTensor) or t.dense:
                continue
            s = self._stride(O)
            _, b, _ = self._windows(m, [t], s)
            for i, regs in self.steps.items():
                for j, reg in enumerate(regs):
                    fw = reg.strip + b
                    if fw == 0:
                        continue
                    f0, f1 = reg.interval(self.hw[reg.axis - 2], fw)

                    def win(x: Tensor) -> Tensor:
                        return x.narrow(reg.axis - 1, f0 // s, (f1 - f0) // s)

                    sent = torch.where(win(t.mask[i]), win(t.values[i]), 0)
                    win(O[i]).copy_(self._crop_of(t, i, j, reg, f0, f1)[0] - sent)

    def _after_input(self, m: Sparsify, out: DeltaTensor, frames: list[Tensor]) -> DeltaTensor:
        """The input layer: the strip enters as its values (its reference there holds the new frame)."""
        ref = m._buffers["state_ref"]
        values, mask = self._writable(out, frames)
        for i, regs in self.steps.items():
            crops = []
            for reg in regs:
                lo, hi = reg.interval(self.hw[reg.axis - 2], reg.width)
                crops.append(ref[i:i + 1].narrow(reg.axis, lo, hi - lo).to(self.rt.dtype))
                if reg.strip:
                    s0, s1 = reg.interval(self.hw[reg.axis - 2], reg.strip)
                    values[i].narrow(reg.axis - 1, s0, s1 - s0).copy_(ref[i].narrow(reg.axis - 1, s0, s1 - s0))
                    mask[i].narrow(reg.axis - 1, s0, s1 - s0).fill_(True)
            self._keep(out, i, crops, 0.0)
        new = self._rebuilt(out, values, mask)
        if self.rt.input_mask is out.mask:  # what the records and heat maps read as the input's update
            self.rt.input_mask = new.mask
        self.vals[id(new)] = (new, self.vals.pop(id(out))[1])
        self.chain[id(new)] = 0.0
        return new

    def _after_stateful(self, m: DeltaLayer, args: tuple, kwargs: dict, out, plan: dict):
        key, s_out, b, c = plan["key"], plan["s_out"], plan["b"], plan["c"]
        E = m._buffers[key]
        dense_out = not isinstance(out, DeltaTensor)  # the model's output (Densify): a copy of its state
        if dense_out:
            values, mask = out, None
        else:
            values, mask = self._writable(out, _deltas(args, kwargs))
        for i, regs in self.steps.items():
            for j, reg in enumerate(regs):
                size = self.hw[reg.axis - 2]
                fw = reg.strip + b
                if fw == 0:
                    continue
                f0, f1 = reg.interval(size, fw)
                lo, hi = reg.interval(size, min(fw + c, size))
                _, states = self._layer_keyframe(m, args, kwargs, i, j, reg, lo, hi)
                for k, st in states.items():  # paste the crop's state at the fix window
                    s = self._stride(m._buffers[k])
                    m._buffers[k][i].narrow(reg.axis - 1, f0 // s, (f1 - f0) // s).copy_(
                        st[0].narrow(reg.axis - 1, (f0 - lo) // s, (f1 - f0) // s))
                win = E[i].narrow(reg.axis - 1, f0 // s_out, (f1 - f0) // s_out)
                if dense_out:
                    values[i].narrow(reg.axis - 1, f0 // s_out, (f1 - f0) // s_out).copy_(win)
                else:  # what the consumers accumulated there was the snapshot: they get the difference, truncated
                    # like any change of this layer (E keeps exactly what was sent; the rest stays in f(A) - E)
                    snap = plan["snaps"][(i, j)]
                    diff = win - snap
                    sent = mask[i].narrow(reg.axis - 1, f0 // s_out, (f1 - f0) // s_out)
                    if plan["tau"] > 0:
                        emit = truncation_score(diff.unsqueeze(0), self.rt.thresholds.score) > plan["tau"]
                        diff.mul_(emit)
                        win.copy_(snap + diff)
                        sent.copy_(emit)
                    else:
                        sent.fill_(True)
                    values[i].narrow(reg.axis - 1, f0 // s_out, (f1 - f0) // s_out).copy_(diff)
            if not dense_out:
                crops = []
                for reg in regs:
                    lo, hi = reg.interval(self.hw[reg.axis - 2], reg.width)
                    crops.append(E[i:i + 1].narrow(reg.axis, lo // s_out, (hi - lo) // s_out).to(self.rt.dtype))
                self._keep(out, i, crops, 0.0)
        if dense_out:
            return out
        new = self._rebuilt(out, values, mask)
        self.vals[id(new)] = (new, self.vals.pop(id(out))[1])
        self.chain[id(new)] = 0.0
        return new

    # ---- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _writable(out: DeltaTensor, ins: list) -> tuple[Tensor, Tensor]:
        """Values to write the fix into (the delta's own, in place: a tensor of this pass; a copy where it
        shares memory with an input's) and a copy of its mask (masks may be shared)."""
        v = out.values
        ptr = v.untyped_storage().data_ptr()
        if any((t.values if isinstance(t, DeltaTensor) else t).untyped_storage().data_ptr() == ptr for t in ins):
            v = v.clone(memory_format=torch.channels_last)
        return v, out.mask.clone()

    @staticmethod
    def _rebuilt(out: DeltaTensor, values: Tensor, mask: Tensor) -> DeltaTensor:
        # the active list and the bordered copy describe the old mask: dropped; ext shares values' memory
        ext = out.ext if values is out.values else None
        return DeltaTensor(values, mask, ext=ext, running_sum=out.running_sum)

    def _layer_keyframe(self, m: DeltaLayer, args: tuple, kwargs: dict, i: int, j: int, reg: Region, lo: int,
                        hi: int) -> tuple[Tensor, dict[str, Tensor]]:
        """A keyframe of layer m alone on its inputs' current values over frame px [lo, hi) of region j of
        stream i (the other axis whole): its output values and the state it seeds, leaving m's own state,
        the runtime flags and the statistics as they were."""
        rt = self.rt

        def crop(a):
            return DeltaTensor.keyframe(self._crop_of(a, i, j, reg, lo, hi)) if isinstance(a, DeltaTensor) else a

        cargs = tuple(crop(a) for a in args)
        ckw = {k: crop(v) for k, v in kwargs.items()}
        keys = [k for k, v in m._buffers.items() if k.startswith("state_") and v is not None]
        saved = {k: m._buffers[k] for k in keys}
        flags = (rt.keyframe, rt.stateless, rt.stats)
        try:
            for k in keys:
                m._buffers[k] = None  # the keyframe allocates crop-sized state instead of writing these
            rt.keyframe, rt.stateless = True, False
            rt.stats = StatsRecorder(enabled=flags[2].enabled)
            rt.stats.start_frame()
            y = m.forward(*cargs, **ckw)  # not m(...): no hooks
            if rt.stats.enabled:
                self.macs += int(sum(float(c) * mpp for _, _, c, _, mpp in rt.stats._rows))
            states = {k: m._buffers[k] for k in keys}
        finally:
            for k, v in saved.items():
                m._buffers[k] = v
            rt.keyframe, rt.stateless, rt.stats = flags
        v = y.values if isinstance(y, DeltaTensor) else y
        return v, states

