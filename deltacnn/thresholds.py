"""Truncation thresholds: a global default, per-layer overrides by layer name, JSON on disk.

Names are the converted model's layer names (the original module's qualified name, or the
torch.fx node name for functional calls), never indices, so a file survives re-conversion.

Units. "absolute" thresholds are compared with the truncation score as it is. "relative"
thresholds are fractions of a scale measured once per model on a keyframe
(`deltacnn.calibration.measure_scales`): for a layer, the mean over pixels of its output's score
over channels (its typical activation magnitude); for the input, the frame's value range. A
relative file therefore carries across models and input scalings (0..1 or 0..255 frames), and
one number means the same thing at every depth.

Deep-layer truncation. With `growth` g > 0 every layer's threshold is multiplied by
(s / s0) ** g, s being the layer's output stride (input size over its map's size, recorded by
convert in `strides`) and s0 the smallest stride of a thresholded layer: one knob that truncates
the deep, wide-receptive-field layers harder, where scattered changes have grown dense. The input
threshold is left as it is. 0 (the default) changes nothing.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

INPUT = "input"  # the name of the input sparsification layer
SCORES = ("max", "l2")
UNITS = ("absolute", "relative")


def _check_tau(name: str, tau: float) -> float:
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"threshold for {name!r} must be a number, got {tau!r}") from None
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"threshold for {name!r} must be finite and >= 0, got {tau}")
    return tau


@dataclass
class Thresholds:
    default: float = 0.0
    input: float | None = None  # None: same as default
    score: str = "max"
    overrides: dict[str, float] = field(default_factory=dict)
    known: tuple[str, ...] = ()  # layer names of the model these belong to (set by convert)
    units: str = "absolute"
    scales: dict[str, float] = field(default_factory=dict)  # relative units: the scale of each layer and the input
    # the input's small-blob gate the thresholds were tuned with (None: not part of the file); it decides
    # which input changes count, so a tuned file carries it (`deltacnn.convert` and `run --thresholds` apply it)
    min_blob: int | None = None
    # the keyframe rule for change the input gates hold back (deltacnn.convert's refresh_held) the thresholds
    # were tuned with (None: not part of the file); applied like min_blob
    refresh_held: float | None = None
    # what that refresh runs ("keyframe", "flush" or "flush:B:M", deltacnn.gating.Refresh; None: not in the file)
    refresh: str | None = None
    # the keyframe interval the thresholds were tuned with (None: not part of the file); applied like min_blob
    keyframe_interval: int | None = None
    growth: float = 0.0  # deep-layer truncation: thresholds times (stride / smallest stride) ** growth
    strides: dict[str, float] = field(default_factory=dict)  # each layer's output stride (set by convert)
    # a factor on every layer threshold (not the input's) for the frame being run: set by DeltaModel on
    # flush frames of a refresh "flush@F" (deltacnn.gating.Refresh), 1 otherwise; never saved
    frame_factor: float = field(default=1.0, repr=False, compare=False)
    # a factor on the thresholds of the layers `refresh_names` for the frame being run: set by DeltaModel on
    # the layer-refresh frames of deltacnn.layer_refresh (its `factor`), 1 otherwise; never saved
    refresh_factor: float = field(default=1.0, repr=False, compare=False)
    refresh_names: frozenset = field(default=frozenset(), repr=False, compare=False)
    # the input-drift keyframe rule (Runtime.refresh_drift, in input thresholds) the thresholds were tuned
    # with (None: not part of the file); applied like min_blob
    refresh_drift: float | None = None
    # the layer refresh (deltacnn.layer_refresh.LayerRefresh spec, e.g. "flush:8") the thresholds were tuned
    # with (None: not part of the file); applied like min_blob
    refresh_layers: str | None = None

    def __post_init__(self) -> None:
        if self.units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, got {self.units!r}")
        for k, v in list(self.scales.items()):
            self.scales[k] = _check_tau(f"scale of {k}", v)
        self.default = _check_tau("default", self.default)
        if self.input is not None:
            self.input = _check_tau(INPUT, self.input)
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        for k, v in list(self.overrides.items()):
            self.overrides[k] = _check_tau(k, v)
        if self.min_blob is not None and (not isinstance(self.min_blob, int) or isinstance(self.min_blob, bool)
                                          or self.min_blob < 1 or self.min_blob % 2 == 0):
            raise ValueError(f"min_blob must be an odd integer >= 1, got {self.min_blob!r}")
        if self.refresh_held is not None and not (isinstance(self.refresh_held, (int, float))
                                                  and 0 <= self.refresh_held <= 1):
            raise ValueError(f"refresh_held must be a fraction in [0, 1], got {self.refresh_held!r}")
        if self.keyframe_interval is not None and (not isinstance(self.keyframe_interval, int)
                                                   or isinstance(self.keyframe_interval, bool)
                                                   or self.keyframe_interval < 1):
            raise ValueError(f"keyframe_interval must be an integer >= 1, got {self.keyframe_interval!r}")
        if self.refresh is not None:
            from .gating import Refresh
            self.refresh = Refresh.parse(self.refresh).spec()  # validated, in its canonical spelling
        self.growth = _check_tau("growth", self.growth)
        if self.refresh_drift is not None:
            self.refresh_drift = _check_tau("refresh_drift", self.refresh_drift)
        if self.refresh_layers is not None:
            from .layer_refresh import LayerRefresh
            try:
                lr = LayerRefresh.parse(self.refresh_layers)  # validated, in its canonical spelling
            except TypeError as e:
                raise ValueError(str(e)) from None
            self.refresh_layers = lr.spec() if lr is not None else None

    def get(self, name: str) -> float:
        """The absolute threshold of layer `name` (relative values times the layer's measured scale)."""
        raw = self.raw(name)
        if raw and self.growth and name != INPUT:
            raw *= self.depth_factor(name)
        if raw and self.frame_factor != 1.0 and name != INPUT:
            raw *= self.frame_factor
        if raw and self.refresh_factor != 1.0 and name in self.refresh_names:
            raw *= self.refresh_factor
        if self.units == "absolute" or raw == 0:
            return raw
        scale = self.scales.get(name)
        if scale is None:
            raise RuntimeError(f"relative thresholds need the scale of layer {name!r}, which was not measured: run "
                               "deltacnn.calibration.measure_scales(model, frame) on a representative frame first "
                               "(deltacnn tune and files it writes do this)")
        return raw * scale

    def depth_factor(self, name: str) -> float:
        """(stride of `name` / smallest stride) ** growth: the factor deep-layer truncation applies (1 at growth 0).

        Layers whose stride convert did not record (re-entries after dense islands) keep factor 1.
        """
        if not self.growth or name == INPUT:
            return 1.0
        if not self.strides:
            raise RuntimeError("threshold growth needs each layer's output stride, which deltacnn.convert records; "
                               "thresholds used outside a converted model cannot grow with depth")
        base = min(self.strides.values())
        return (self.strides.get(name, base) / base) ** self.growth

    def raw(self, name: str) -> float:
        """The threshold of layer `name` in this object's units."""
        if name in self.overrides:
            return self.overrides[name]
        if name == INPUT and self.input is not None:
            return self.input
        return self.default

    def set(self, name: str, tau: float) -> None:
        self._check_name(name)
        self.overrides[name] = _check_tau(name, tau)

    def _check_name(self, name: str) -> None:
        if self.known and name not in self.known:
            close = [k for k in self.known if name.split(".")[-1] in k][:5]
            hint = f" Similar: {', '.join(close)}." if close else ""
            raise KeyError(f"no thresholded layer named {name!r} in this model.{hint} "
                           f"See model.thresholds.known for all {len(self.known)} names.")

    def to_dict(self) -> dict:
        d = {"format": "deltacnn-thresholds/1", "default": self.default, "input": self.input,
             "score": self.score, "layers": dict(sorted(self.overrides.items()))}
        if self.units != "absolute":
            d.update(units=self.units, scales=dict(sorted(self.scales.items())))
        if self.min_blob is not None:
            d["min_blob"] = self.min_blob
        if self.refresh_held is not None:
            d["refresh_held"] = self.refresh_held
        if self.refresh is not None:
            d["refresh"] = self.refresh
        if self.keyframe_interval is not None:
            d["keyframe_interval"] = self.keyframe_interval
        if self.refresh_drift is not None:
            d["refresh_drift"] = self.refresh_drift
        if self.refresh_layers is not None:
            d["refresh_layers"] = self.refresh_layers
        if self.growth:
            d["growth"] = self.growth
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def update_from_dict(self, data: dict, source: str = "thresholds") -> None:
        """Replace these thresholds with `data` (validated completely before anything changes)."""
        if not isinstance(data, dict) or data.get("format") != "deltacnn-thresholds/1":
            raise ValueError(f"{source}: not a deltacnn thresholds file (expected \"format\": \"deltacnn-thresholds/1\")")
        layers = data.get("layers", {})
        if not isinstance(layers, dict):
            raise ValueError(f"{source}: \"layers\" must be an object mapping layer names to thresholds")
        scales = data.get("scales", {})
        if not isinstance(scales, dict):
            raise ValueError(f"{source}: \"scales\" must be an object mapping layer names to scales")
        try:
            new = Thresholds(default=data.get("default", 0.0), input=data.get("input"),
                             score=data.get("score", "max"), overrides=dict(layers), known=self.known,
                             units=data.get("units", "absolute"), scales=dict(scales), min_blob=data.get("min_blob"),
                             growth=data.get("growth", 0.0), refresh_held=data.get("refresh_held"),
                             refresh=data.get("refresh"), keyframe_interval=data.get("keyframe_interval"),
                             refresh_drift=data.get("refresh_drift"), refresh_layers=data.get("refresh_layers"))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        for name in new.overrides:
            new._check_name(name)
        if new.units == "relative":
            missing = [n for n in self.known if n not in new.scales]
            if missing:
                raise ValueError(f"{source}: relative thresholds without the scale of {len(missing)} layer(s) of this "
                                 f"model (e.g. {missing[0]!r}); the file was tuned for another model")
        self.default, self.input, self.score, self.overrides = new.default, new.input, new.score, new.overrides
        self.units, self.scales, self.min_blob, self.growth = new.units, new.scales, new.min_blob, new.growth
        self.refresh_held, self.refresh = new.refresh_held, new.refresh
        self.keyframe_interval = new.keyframe_interval
        self.refresh_drift, self.refresh_layers = new.refresh_drift, new.refresh_layers

    def load(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"thresholds file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
        self.update_from_dict(data, source=str(p))
