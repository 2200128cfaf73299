"""`deltacnn bench`: median time per frame of the dense and the delta model, one row per threshold setting."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..tasks.base import Task
from .common import (UserError, build_delta, finite_mean, finite_median, get_task, load_model, open_video, progress,
                     resolve_device, resolve_dtype, timed)


def bench(video: str | Path | None = None, model: str | Task | None = None, *,
          thresholds: Sequence[float | str | Path] = (0.0,), frames: int = 30, warmup: int = 3,
          device: str | None = None, dtype: str | torch.dtype | None = None, backend: str | None = None,
          quiet: bool = False) -> list[dict]:
    """Median time per frame of the dense model and of the delta model (one row per threshold setting).

    Each entry of `thresholds` is a global threshold or a thresholds JSON file. Delta frames are
    timed without statistics; update rate and MACs come from a second, untimed pass. The dense
    keyframe is excluded from the delta median (it is steady-state cost that matters on video).
    """
    if frames < 2:
        raise UserError(f"--frames must be >= 2, got {frames}")
    reader = open_video(video, frames)
    task = get_task(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    dense = load_model(task, dev)
    xs = [task.preprocess(f).to(dev) for f in progress(reader, reader.expected_frames, "decoding", quiet)]
    for x in xs[:warmup]:
        timed(dense, x, dev)
    dense_ms = [timed(dense, x, dev)[1] for x in progress(xs, len(xs), "dense", quiet)]
    rows = []
    for spec in thresholds:
        tau, tfile = (float(spec), None) if _is_number(spec) else (0.0, Path(spec))
        dm = build_delta(dense, xs[0], threshold=tau, thresholds=tfile, dtype=torch_dtype, backend=backend)
        for x in xs[:max(warmup, 2)]:  # warm-up includes one sparse frame
            dm(x)
        dm.reset()
        delta_ms = [timed(dm, x, dev)[1] for x in progress(xs, len(xs), f"delta {spec}", quiet)]
        dm.enable_stats(True)
        dm.reset()
        recs = []
        for x in xs:
            dm(x)
            fs = dm.frame_stats()
            if not fs.keyframe:
                recs.append((fs.layers["input"].update_rate if "input" in fs.layers else float("nan"),
                             fs.macs, fs.dense_macs))
        d, t = finite_median(dense_ms), finite_median(delta_ms[1:])
        rows.append({"model": task.name, "device": str(dev), "dtype": str(torch_dtype or torch.float32)[6:],
                     "backend": dm.rt.backend_for(xs[0]).name,
                     "input": "x".join(str(s) for s in xs[0].shape[-2:][::-1]), "frames": len(xs),
                     "threshold": str(spec), "dense_ms": d, "delta_ms": t, "speedup": d / t if t > 0 else float("nan"),
                     "update_rate": finite_mean([r[0] for r in recs]),
                     "macs_fraction": sum(r[1] for r in recs) / max(1, sum(r[2] for r in recs))})
    return rows


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def bench_table(rows: list[dict]) -> str:
    """The benchmark as an aligned text table."""
    if not rows:
        return "(no results)"
    r0 = rows[0]
    head = (f"{r0['model']} on {r0['device']} ({r0['dtype']}, {r0['backend']} backend), input {r0['input']}, "
            f"{r0['frames']} frames; "
            "median ms per frame (delta: non-keyframes)")
    cols = f"{'threshold':>16} {'dense ms':>9} {'delta ms':>9} {'speedup':>8} {'input upd.':>10} {'MACs':>7}"
    lines = [head, cols]
    for r in rows:
        th = r["threshold"] if len(r["threshold"]) <= 16 else "..." + r["threshold"][-13:]
        lines.append(f"{th:>16} {r['dense_ms']:9.2f} {r['delta_ms']:9.2f} {r['speedup']:7.2f}x "
                     f"{r['update_rate']:10.1%} {r['macs_fraction']:7.1%}")
    return "\n".join(lines)
