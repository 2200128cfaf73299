"""Per-layer statistics: update rate and multiply-adds done versus dense.

Recording keeps device tensors only (no host sync in the frame); numbers are read on demand.
Nothing is recorded unless enabled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass
class LayerStats:
    name: str
    kind: str
    update_rate: float  # fraction of output pixels updated (emitted)
    macs: int  # multiply-adds done this frame
    dense_macs: int  # multiply-adds a dense pass would do


@dataclass
class FrameStats:
    layers: dict[str, LayerStats]
    keyframe: bool

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.layers.values())

    @property
    def dense_macs(self) -> int:
        return sum(s.dense_macs for s in self.layers.values())

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.dense_macs if self.dense_macs else 0.0

    def table(self) -> str:
        lines = [f"{'layer':40s} {'kind':14s} {'updated':>8s} {'MACs vs dense':>14s}"]
        for s in self.layers.values():
            frac = f"{s.macs / s.dense_macs:8.1%}" if s.dense_macs else " " * 8
            lines.append(f"{s.name:40s} {s.kind:14s} {s.update_rate:8.1%} {frac:>14s}")
        lines.append(f"{'total':40s} {'':14s} {'':8s} {self.macs_fraction:14.1%}")
        return "\n".join(lines)


@dataclass
class StatsRecorder:
    enabled: bool = False
    keep_masks: bool = False
    _rows: list = field(default_factory=list)
    masks: dict[str, Tensor] = field(default_factory=dict)
    # set while a pass over some streams of the batch runs (DeltaModel's per-stream keyframes): its
    # updates add to the rows the frame's first pass recorded, whose totals cover the whole batch
    merging: bool = False

    def start_frame(self) -> None:
        self._rows = []
        self.masks = {}
        self.merging = False

    def record(self, name: str, kind: str, mask: Tensor, macs_per_pixel: int = 0, dense: bool = False) -> None:
        if not self.enabled:
            return
        count = _count(mask) if not dense else mask.numel()
        if self.merging:
            for i, (n, k, c, total, mpp) in enumerate(self._rows):
                if n == name:
                    self._rows[i] = (n, k, _add(c, count), total, mpp)
                    return
        self._rows.append((name, kind, count, mask.numel(), macs_per_pixel))
        if self.keep_masks and not self.merging:
            self.masks[name] = mask

    def record_work(self, name: str, kind: str, macs: int) -> None:
        """A layer that ran densely (dense island or tail): all of its `macs` done, every output updated."""
        if not self.enabled:
            return
        self._rows.append((name, kind, 1, 1, int(macs)))

    def frame(self, keyframe: bool) -> FrameStats:
        if not self.enabled:
            raise RuntimeError("statistics are off: call model.enable_stats() before running frames")
        counts = [c for _, _, c, _, _ in self._rows]
        on_device = [i for i, c in enumerate(counts) if isinstance(c, Tensor)]
        if on_device:  # one copy to the host for the frame's device counts
            for i, v in zip(on_device, torch.stack([counts[i].to("cpu", torch.float64) for i in on_device]).tolist()):
                counts[i] = v
        layers = {}
        for (name, kind, _, total, mpp), cnt in zip(self._rows, counts):
            layers[name] = LayerStats(name, kind, cnt / total if total else 0.0, int(cnt) * mpp, total * mpp)
        return FrameStats(layers, keyframe)


def _count(mask: Tensor) -> "int | Tensor":
    """Updated pixels of a mask: a host int for a CPU mask, by numpy's single-threaded count (a torch reduction goes
    through the dispatcher and the intra-op thread pool: 0.1-0.5 ms of a YOLOv8n delta frame at 2 threads, paired);
    a device tensor elsewhere (no host sync inside the frame; read in `frame`)."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.numpy()))
    return mask.sum()


def _add(a: "int | Tensor", b: "int | Tensor") -> "int | Tensor":
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a + b.to(a.device)
    return b + a if isinstance(b, Tensor) else a + b


def summary_table(layers: dict, layer_macs: dict[str, int], last: FrameStats | None) -> str:
    """One row per layer: name, kind (delta / dense island / dense tail), dense MACs per frame, share of
    the model's MACs, and the update rate of the last frame when statistics are on."""
    total = sum(layer_macs.values())
    lines = [f"{'layer':44s} {'kind':12s} {'MACs/frame':>14s} {'share':>7s} {'updated':>8s}"]
    for name, layer in layers.items():
        # by kind, not class: the converter marks a dense-tail call whose result re-enters the maps as island work
        kind = {"dense-island": "dense island", "dense-tail": "dense tail"}.get(getattr(layer, "kind", ""), "delta")
        macs = layer_macs.get(name, 0)
        share = f"{macs / total:7.1%}" if total else " " * 7
        row = last.layers.get(name) if last is not None else None
        upd = f"{row.update_rate:8.1%}" if row is not None else f"{'-':>8s}"
        lines.append(f"{name[:44]:44s} {kind:12s} {macs:14,d} {share} {upd}")
    lines.append(f"{'total':44s} {'':12s} {total:14,d}")
    return "\n".join(lines)
