"""Pictures of a delta run: update heat-map frames, a text overlay, and the per-clip plot.

Everything here works on RGB uint8 numpy frames and plain per-frame records (dicts), so it can
be used on results loaded back from `frames.json` too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _colormap(name: str = "inferno") -> np.ndarray:
    """(256, 3) uint8 lookup table from matplotlib (imported lazily: it is slow to import)."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


_LUT: dict[str, np.ndarray] = {}


def heatmap_overlay(frame_rgb: np.ndarray, heat: np.ndarray, cmap: str = "turbo", legend: bool = True) -> np.ndarray:
    """Blend a colour-mapped update heat map (H, W) in [0, 1] over the frame in grey.

    Pixels no layer recomputed show the dimmed grey frame; recomputed pixels are tinted by the
    fraction of layers that recomputed them (blue: few, red: all), more opaque the more layers.
    The tint never covers the frame completely, so the scene stays recognisable.
    """
    if cmap not in _LUT:
        _LUT[cmap] = _colormap(cmap)
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    if heat.shape != frame_rgb.shape[:2]:
        raise ValueError(f"heat map {heat.shape} and frame {frame_rgb.shape[:2]} differ in size")
    grey = frame_rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    base = np.repeat((0.55 * grey)[..., None], 3, axis=2)
    # the colour map starts at 0.15: its darkest blue would vanish on a dim frame
    colour = _LUT[cmap][np.round((0.15 + 0.85 * heat) * 255).astype(np.int64)].astype(np.float32)
    alpha = np.where(heat > 0, 0.3 + 0.4 * heat, 0.0)[..., None].astype(np.float32)
    lit = base * (1 - alpha) + colour * alpha * (0.6 + 0.4 * grey[..., None] / 255)
    out = lit.clip(0, 255).astype(np.uint8)
    return _legend(out, _LUT[cmap]) if legend else out


def _legend(img: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """A small colour bar at the bottom right: which colour means what fraction of layers."""
    import cv2

    h, w = img.shape[:2]
    if w < 240 or h < 120:
        return img
    bw, bh, pad = min(160, w // 4), 10, 6
    x0, y0 = w - bw - pad, h - bh - pad - 16
    img[y0 - 4:h - 2, x0 - 8:w - 2] = (img[y0 - 4:h - 2, x0 - 8:w - 2].astype(np.float32) * 0.35).astype(np.uint8)
    img[y0:y0 + bh, x0:x0 + bw] = lut[np.linspace(0.15 * 255, 255, bw).astype(np.int64)][None]
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.35
    cv2.putText(img, "few layers", (x0, h - pad - 2), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize("all layers", font, scale, 1)
    cv2.putText(img, "all layers", (x0 + bw - tw, h - pad - 2), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def put_text(frame_rgb: np.ndarray, lines: Sequence[str], corner: str = "top") -> np.ndarray:
    """Write a few lines of white text on a dark translucent box at the top (or bottom) left."""
    import cv2

    out = np.ascontiguousarray(frame_rgb).copy()
    h, w = out.shape[:2]
    if w < 240 or h < 120:  # the text would cover a tiny frame
        return out
    scale = max(0.35, min(0.55, w / 1400))
    sizes = [cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0] for t in lines]
    step = max(s[1] for s in sizes) + 7
    box_w, box_h = max(s[0] for s in sizes) + 10, step * len(lines) + 4
    y_top = 0 if corner == "top" else h - box_h
    region = out[y_top:y_top + box_h, :box_w]
    region[:] = (region.astype(np.float32) * 0.35).astype(np.uint8)
    for i, line in enumerate(lines):
        y = y_top + step * (i + 1) - 2
        cv2.putText(out, line, (5, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _col(rows: Sequence[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)


def plot_run(rows: Sequence[dict], path: str | Path, title: str = "", error_key: str | None = None,
             agreement_keys: Sequence[str] = (), peer: str | None = None) -> Path:
    """Three stacked panels over the clip: work done, time per frame, error versus dense.

    rows: the per-frame records written to frames.json (keys `update_rate`, `macs_fraction`,
    `delta_ms`, `peer_ms` (the strongest dense peer), and optionally `rel_error` and task agreement metrics).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    f = _col(rows, "frame")
    fig, axes = plt.subplots(3, 1, figsize=(9, 8.5), sharex=True, constrained_layout=True)
    ax = axes[0]
    ax.plot(f, 100 * _col(rows, "update_rate"), label="input pixels updated", color="tab:blue")
    ax.plot(f, 100 * _col(rows, "layer_update_rate"), label="mean layer update rate", color="tab:cyan", lw=1)
    ax.plot(f, 100 * _col(rows, "macs_fraction"), label="multiply-adds vs dense", color="tab:orange")
    dense_frame = np.array([r.get("mode") == "dense" for r in rows], dtype=bool)
    key = (_col(rows, "keyframe") > 0) & ~dense_frame
    for x in f[key]:
        ax.axvline(x, color="grey", lw=0.6, ls=":")
    for x in f[dense_frame]:  # frames too busy for deltas, run densely
        ax.axvspan(x - 0.5, x + 0.5, color="tab:grey", alpha=0.15, lw=0)
    ax.set_ylabel("% of dense")
    ax.set_ylim(0, 105)
    notes = (["dotted: keyframes"] if key.any() else []) + (["shaded: dense frames"] if dense_frame.any() else [])
    if any("motion_dx" in r for r in rows):  # --motion: the camera motion used, and where it was held
        axm = ax.twinx()
        axm.plot(f, _col(rows, "motion_dx"), color="tab:olive", lw=0.8, label="camera dx (px/frame, right)")
        axm.plot(f, _col(rows, "motion_dy"), color="tab:brown", lw=0.8, label="camera dy (px/frame, right)")
        axm.set_ylabel("camera motion (px/frame)")
        held = _col(rows, "motion_translating") == 0
        for x in f[held]:  # not a translation: camera held, plain delta inference
            ax.axvspan(x - 0.5, x + 0.5, color="tab:red", alpha=0.12, lw=0)
        if held.any():
            notes.append("red: motion no translation, camera held")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = axm.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
    else:
        ax.legend(loc="best", fontsize=8)
    ax.set_title("Work done by the delta model" + (f" ({'; '.join(notes)})" if notes else ""))

    ax = axes[1]
    dense, delta = _col(rows, "peer_ms"), _col(rows, "delta_ms")
    ax.plot(f, dense, label=f"dense peer{f' ({peer})' if peer else ''}", color="tab:grey")
    ax.plot(f, delta, label="delta", color="tab:green")
    ax.set_ylabel("time per frame (ms)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(f, dense / delta, color="tab:red", lw=1, ls="--", label="speedup (peer / delta)")
    ax2.axhline(1.0, color="tab:red", lw=0.5, alpha=0.5)
    ax2.set_ylabel("speedup (x)", color="tab:red")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
    ax.set_title("Time per frame")

    ax = axes[2]
    err = _col(rows, error_key) if error_key else np.full(len(rows), np.nan)
    if np.isfinite(err).any():
        ax.plot(f, err, label="relative L2 error of model output", color="tab:purple")
        ax.set_ylabel("relative error vs dense")
        ax.set_yscale("symlog", linthresh=1e-4)
        handles, labels = ax.get_legend_handles_labels()
        if agreement_keys:
            ax3 = ax.twinx()
            for k, c in zip(agreement_keys, ("tab:brown", "tab:olive", "tab:pink", "tab:blue")):
                label = f"task: {k.removeprefix('task_')} (right axis)"
                ax3.plot(f, _col(rows, k), label=label, color=c, lw=1, ls="--")
            ax3.set_ylabel("task metric vs dense")
            h3, l3 = ax3.get_legend_handles_labels()
            handles, labels = handles + h3, labels + l3
        ax.legend(handles, labels, loc="best", fontsize=8)
        ax.set_title("Error versus dense inference")
    else:
        ax.text(0.5, 0.5, "error versus dense not measured (run with --check-dense)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
        ax.set_yticks([])
        ax.set_title("Error versus dense inference")
    ax.set_xlabel("frame")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pareto_plot(trials: Sequence[tuple[float, float, bool]], front: Sequence[tuple[float, float]],
                chosen: tuple[float, float], metric: str, budget: float, path: str | Path,
                xlabel: str = "median delta-frame time (ms)") -> Path:
    """Delta-frame time against task agreement for every tuning trial, the Pareto front and the choice.

    A person picks an operating point from this faster than from a table: how much agreement each
    millisecond costs, and where the budget line cuts the front.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    ok = [(ms, s) for ms, s, good in trials if good]
    bad = [(ms, s) for ms, s, good in trials if not good]
    if ok:
        ax.scatter(*zip(*ok), s=14, color="tab:blue", alpha=0.6, label="trial within budget")
    if bad:
        ax.scatter(*zip(*bad), s=14, color="tab:grey", alpha=0.5, marker="x", label="trial over budget")
    if front:
        ax.plot(*zip(*front), color="tab:orange", lw=1.5, drawstyle="steps-post", label="Pareto front")
    ax.scatter([chosen[0]], [chosen[1]], s=80, facecolors="none", edgecolors="tab:red", lw=2, label="chosen")
    ax.axhline(budget, color="tab:red", lw=0.8, ls="--", label=f"budget {metric} = {budget:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} against dense")
    ax.set_title("Threshold tuning: speed against task agreement")
    ax.legend(loc="lower right", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
