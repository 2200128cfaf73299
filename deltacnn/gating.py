"""Input gates: which changed input pixels are sent, so that sprinkled noise does not densify the network.

A change that passes the input threshold in one isolated pixel still updates every output pixel
whose receptive field holds it: a few hundred noise pixels scattered over a frame make the deep
layers of a detector dense. The gates here decide, from the per-pixel change score of the input
layer (Sparsify), which pixels go out on this frame. Every gate only *holds back* change: a pixel
it rejects keeps its difference to the reference frame (x - ref) and is sent once it passes the
gate on a later frame, or at the next keyframe, so nothing is lost and tau-0 layers still give the
dense output of the transmitted frame.

- ``min_blob`` (k): morphological opening of the changed mask by a k x k square: only changes that
  cover a k x k square somewhere go out.
- ``tile`` / ``tile_min`` (b, m): spatial energy gate: the frame is cut into b x b tiles and a tile's
  changes go out only when at least m of its pixels changed (thin edges survive, which an opening
  erodes; lone pixels in empty tiles do not).
- ``low`` (hysteresis, a fraction of the input threshold): pixels whose change passes the input
  threshold t are *seeds*; pixels above low * t join when they are connected to a seed within
  ``steps`` 3x3 steps (spatial: the faint rim of a moving object goes out with its core) and, with
  ``temporal``, when they were sent on the previous frame (a pixel that was updating keeps updating
  while its change stays above low * t). Seeds are gated first (min_blob, tile), so hysteresis adds
  only pixels next to (or continuing) a real change; isolated faint noise never seeds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

HYSTERESIS_MODES = ("spatial", "temporal", "both")


@dataclass(frozen=True)
class InputGate:
    """What the input layer sends of the pixels whose change passed its threshold (all off by default)."""

    min_blob: int = 1  # odd k: keep changes covering a k x k square (1: off)
    tile: int = 1  # b: tile size of the energy gate (1: off)
    tile_min: int = 1  # m: changed pixels a tile needs for its changes to go out
    low: float | None = None  # hysteresis low threshold as a fraction of the input threshold (None: off)
    steps: int = 2  # spatial hysteresis: 3x3 growth steps from the seeds into the low mask
    hysteresis: str = "spatial"  # "spatial", "temporal" or "both"

    def __post_init__(self) -> None:
        if not isinstance(self.min_blob, int) or self.min_blob < 1 or self.min_blob % 2 == 0:
            raise ValueError(f"min_blob must be an odd window size >= 1 (1: off), got {self.min_blob!r}")
        if not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"tile (the energy gate's tile size) must be an integer >= 1 (1: off), got {self.tile!r}")
        if not isinstance(self.tile_min, int) or not 1 <= self.tile_min <= self.tile * self.tile:
            raise ValueError(f"tile_min must be an integer in [1, tile * tile = {self.tile * self.tile}], "
                             f"got {self.tile_min!r}")
        if self.low is not None and not (isinstance(self.low, (int, float)) and 0 <= self.low <= 1):
            raise ValueError(f"low (hysteresis) must be a fraction of the input threshold in [0, 1] or None, "
                             f"got {self.low!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps (spatial hysteresis) must be an integer >= 0, got {self.steps!r}")
        if self.hysteresis not in HYSTERESIS_MODES:
            raise ValueError(f"hysteresis must be one of {HYSTERESIS_MODES}, got {self.hysteresis!r}")

    @property
    def active(self) -> bool:
        """Whether the gate can hold anything back (otherwise the input layer skips it: exact when off)."""
        return self.min_blob > 1 or (self.tile > 1 and self.tile_min > 1) or self.hysteresis_on

    @property
    def hysteresis_on(self) -> bool:
        return self.low is not None and self.low < 1

    @property
    def temporal(self) -> bool:
        return self.hysteresis_on and self.hysteresis in ("temporal", "both")

    @property
    def spatial(self) -> bool:
        return self.hysteresis_on and self.hysteresis in ("spatial", "both") and self.steps > 0

    def send_threshold(self, tau: float) -> float:
        """The threshold the backend applies to the gated frame: every pixel the gate keeps passes it."""
        return tau * self.low if self.hysteresis_on else tau

    def describe(self) -> str:
        parts = []
        if self.min_blob > 1:
            parts.append(f"min_blob {self.min_blob}")
        if self.tile > 1 and self.tile_min > 1:
            parts.append(f"tile {self.tile}:{self.tile_min}")
        if self.hysteresis_on:
            parts.append(f"hysteresis {self.hysteresis} low {self.low:g}" +
                         (f" steps {self.steps}" if self.spatial else ""))
        return ", ".join(parts) or "off"


def opening(mask: Tensor, k: int) -> Tensor:
    """Morphological opening of a float (N, 1, H, W) 0/1 mask by a k x k square (erosion, then dilation)."""
    return F.max_pool2d(-F.max_pool2d(-mask, k, 1, k // 2), k, 1, k // 2)


def tile_gate(mask: Tensor, b: int, m: int) -> Tensor:
    """`mask` (float 0/1, (N, 1, H, W)) where its b x b tile holds at least m set pixels, else 0."""
    h, w = mask.shape[-2:]
    counts = F.avg_pool2d(mask, b, b, ceil_mode=True, divisor_override=1)
    keep = (counts >= m).float()
    keep = keep.repeat_interleave(b, 2).repeat_interleave(b, 3)[..., :h, :w]
    return mask * keep


def grow(seeds: Tensor, within: Tensor, steps: int) -> Tensor:
    """Geodesic dilation: `seeds` grown by `steps` 3x3 steps, never leaving `within` (float 0/1 masks)."""
    out = seeds
    for _ in range(steps):
        nxt = F.max_pool2d(out, 3, 1, 1) * within
        out = torch.maximum(out, nxt)
    return out


def gated_mask(score: Tensor, tau: float, gate: InputGate, previous: Tensor | None = None) -> Tensor:
    """(N, 1, H, W) bool: the pixels whose change (per-pixel `score`, (N, H, W)) the gate sends.

    `previous`: the pixels sent on the previous frame ((N, 1, H, W) bool; temporal hysteresis only).
    Every pixel returned has score > gate.send_threshold(tau).
    """
    strong = (score > tau).unsqueeze(1).float()
    seeds = strong
    if gate.min_blob > 1:
        seeds = opening(seeds, gate.min_blob)
    if gate.tile > 1 and gate.tile_min > 1:
        seeds = tile_gate(seeds, gate.tile, gate.tile_min)
    if not gate.hysteresis_on:
        return seeds > 0
    weak = (score > gate.send_threshold(tau)).unsqueeze(1).float()
    kept = seeds
    if gate.temporal and previous is not None:
        kept = torch.maximum(kept, previous.float() * weak)
    if gate.spatial:
        kept = grow(kept, weak, gate.steps)
    return kept > 0


def gate_from_options(min_blob: int = 1, input_gate: InputGate | None = None) -> InputGate:
    """One InputGate from convert's `min_blob` shortcut and its `input_gate` (min_blob set in both must agree)."""
    if input_gate is None:
        return InputGate(min_blob=min_blob)
    if not isinstance(input_gate, InputGate):
        raise TypeError(f"input_gate must be a deltacnn.InputGate, got {type(input_gate).__name__}")
    if min_blob != 1 and input_gate.min_blob not in (1, min_blob):
        raise ValueError(f"min_blob={min_blob} and input_gate.min_blob={input_gate.min_blob} disagree; give one")
    if min_blob != 1:
        return replace(input_gate, min_blob=min_blob)
    return input_gate


REFRESH_MODES = ("keyframe", "flush")


@dataclass(frozen=True)
class Refresh:
    """What a stream runs once its input gates hold back changes in more than `refresh_held` of its pixels.

    - ``"keyframe"``: a whole dense keyframe (also resets every layer's truncation residual; the
      cost of a dense frame plus seeding the state).
    - ``"flush"``: a delta frame on which the gate lets the held-back change through: every pixel
      whose change passes the input threshold goes out as a delta at full precision, so the cost
      scales with the held area, not the frame. At threshold 0 the state then equals the dense
      state of that frame (nothing else is pending). Truncation residuals of the layers stay (they
      are bounded by their thresholds and sent when they pass them).
    - ``"flush:B:M"``: as flush, but only in B x B tiles holding at least M held pixels: clustered
      held change (a thin or faint object) goes out, scattered held noise keeps waiting (so this
      variant is not exact at threshold 0; the next whole flush or keyframe sends the rest).
    - a suffix ``"@F"`` (``"flush@0.25"``, ``"flush:16:32@0"``): on a flush frame every layer threshold
      is multiplied by F, so the truncation residuals at the pixels the flush reaches go out too (F 0:
      all of them; a residual is only looked at where a delta arrives). For the whole batch of streams
      on that frame (a lower threshold is never less exact).
    """

    mode: str = "keyframe"
    tile: int = 1
    tile_min: int = 1
    layers: float = 1.0  # layer-threshold factor on flush frames

    def __post_init__(self) -> None:
        if self.mode not in REFRESH_MODES:
            raise ValueError(f"refresh mode must be one of {REFRESH_MODES}, got {self.mode!r}")
        if not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"flush tile must be an integer >= 1 (1: every held pixel), got {self.tile!r}")
        if not isinstance(self.tile_min, int) or not 1 <= self.tile_min <= self.tile * self.tile:
            raise ValueError(f"flush tile minimum must be an integer in [1, tile * tile = {self.tile * self.tile}], "
                             f"got {self.tile_min!r}")
        if self.mode == "keyframe" and ((self.tile, self.tile_min) != (1, 1) or self.layers != 1.0):
            raise ValueError("flush tiles and layer factors are options of refresh 'flush', not of 'keyframe'")
        if not (isinstance(self.layers, (int, float)) and 0 <= self.layers <= 1):
            raise ValueError(f"flush layer factor must be in [0, 1], got {self.layers!r}")

    @classmethod
    def parse(cls, spec: "str | Refresh | None") -> "Refresh":
        """'keyframe', 'flush' or 'flush:B:M' (None: 'keyframe')."""
        if spec is None:
            return cls()
        if isinstance(spec, Refresh):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"refresh must be a string such as 'keyframe', 'flush' or 'flush:16:32', got {spec!r}")
        body, at, factor = spec.strip().partition("@")
        parts = body.split(":")
        try:
            layers = float(factor) if at else 1.0
            if parts[0] == "flush" and len(parts) == 3:
                return cls("flush", int(parts[1]), int(parts[2]), layers)
            if len(parts) == 1:
                return cls(parts[0], layers=layers)
        except ValueError as e:
            if "refresh" in str(e) or "flush" in str(e):
                raise
        raise ValueError(f"cannot parse refresh {spec!r}; use 'keyframe', 'flush' or 'flush:B:M' (B x B tiles "
                         "holding at least M held pixels), optionally with '@F' (layer thresholds x F on flushes)")

    @property
    def flush(self) -> bool:
        return self.mode == "flush"

    @property
    def tiled(self) -> bool:
        """Whether a flush sends held pixels only in tiles holding enough of them (else all held pixels)."""
        return self.tile > 1 and self.tile_min > 1

    def spec(self) -> str:
        """The string `parse` reads back."""
        at = f"@{self.layers:g}" if self.layers != 1.0 else ""
        if self.mode == "flush" and self.tiled:
            return f"flush:{self.tile}:{self.tile_min}{at}"
        return self.mode + at

    def flush_mask(self, held: Tensor) -> Tensor:
        """(N, 1, H, W) bool: the held pixels (`held`, bool, same shape) a flush sends."""
        if self.tiled:
            return tile_gate(held.float(), self.tile, self.tile_min) > 0
        return held
