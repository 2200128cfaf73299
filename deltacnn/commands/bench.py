"""`deltacnn bench`: time per frame of the delta model against the strongest dense peer of the device,
one row per threshold setting, delta frames and all frames reported separately."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..peers import PeerError, strongest_peer
from ..tasks.base import Task
from .common import (UserError, build_delta, finite_mean, finite_median, get_task, load_model, open_video, progress,
                     resolve_device, resolve_dtype, timed)


def bench(video: str | int | Path | None = None, model: str | Task | None = None, *,
          thresholds: Sequence[float | str | Path] = (0.0,), frames: int = 30, warmup: int = 3,
          device: str | None = None, dtype: str | torch.dtype | None = None, backend: str | None = None,
          quiet: bool = False, reader: str = "auto", compile_peer: bool = False) -> list[dict]:
    """Time per frame of the delta model against the strongest dense peer, one row per threshold setting.

    The peer is the fastest dense deployment of the model on the device (`deltacnn.peers`; on a GPU
    `compile_peer` adds torch.compile max-autotune). Each entry of `thresholds` is a global
    threshold or a thresholds JSON file. Per frame the delta model and the peer run in turn (so
    both see the same machine load); delta frames (mode "delta": not keyframes, not frames run
    densely) get their median and mean, all frames their mean; speedups are peer median / delta-frame
    median and peer mean / all-frame mean. Delta frames are timed without statistics; update
    rate and MACs come from a second, untimed pass.
    """
    if frames < 2:
        raise UserError(f"--frames must be >= 2, got {frames}")
    source = open_video(video, frames, reader=reader)
    task = get_task(model)
    dev = resolve_device(device)
    if compile_peer and dev.type != "cuda":
        raise UserError("--compile-peer is a GPU peer (torch.compile max-autotune); it needs --device cuda")
    torch_dtype = resolve_dtype(dtype)
    dense = load_model(task, dev)
    xs = [task.preprocess(f).to(dev) for f in progress(source, source.expected_frames, "decoding", quiet)]
    if len(xs) < 2:
        raise UserError(f"{source.label} gave {len(xs)} frame(s); bench needs at least 2")
    try:
        choice = strongest_peer(dense, xs, compile=compile_peer, calls=max(6, min(len(xs), 12)))
    except PeerError as e:
        raise UserError(f"no dense peer to compare with: {e}") from None
    peer = choice.peer
    for x in xs[:warmup]:
        timed(peer, x, dev)
    rows = []
    for spec in thresholds:
        tau, tfile = (float(spec), None) if _is_number(spec) else (0.0, Path(spec))
        dm = build_delta(dense, xs[0], threshold=tau, thresholds=tfile, dtype=torch_dtype, backend=backend)
        for x in xs[:max(warmup, 2)]:  # warm-up includes one sparse frame
            dm(x)
        dm.reset()
        delta_ms, peer_ms, modes = [], [], []
        for x in progress(xs, len(xs), f"delta {spec}", quiet):
            delta_ms.append(timed(dm, x, dev)[1])
            modes.append(dm.last_mode)
            peer_ms.append(timed(peer, x, dev)[1])
        dm.enable_stats(True)
        dm.reset()
        recs = []
        for x in xs:
            dm(x)
            fs = dm.frame_stats()
            if not fs.keyframe:
                recs.append((fs.layers["input"].update_rate if "input" in fs.layers else float("nan"),
                             fs.macs, fs.dense_macs))
        d_frames = [t for t, m in zip(delta_ms, modes) if m == "delta"]
        p_med, p_mean = finite_median(peer_ms), finite_mean(peer_ms)
        d_med, d_mean, all_mean = finite_median(d_frames), finite_mean(d_frames), finite_mean(delta_ms)
        rows.append({"model": task.name, "device": str(dev), "dtype": str(torch_dtype or torch.float32)[6:],
                     "backend": dm.rt.backend_for(xs[0]).name,
                     "input": "x".join(str(s) for s in xs[0].shape[-2:][::-1]), "frames": len(xs),
                     "threshold": str(spec), "peer": peer.name, "peer_threads": peer.threads,
                     "peer_candidates": {c.name: c.ms for c in choice.candidates.values()},
                     "peer_rejected": dict(choice.rejected), "peer_ms": p_med, "peer_mean_ms": p_mean,
                     "delta_frames": len(d_frames),
                     "modes": {m: modes.count(m) for m in ("keyframe", "delta", "dense")},
                     "delta_frame_median_ms": d_med, "delta_frame_mean_ms": d_mean, "all_frame_mean_ms": all_mean,
                     "speedup_delta_frames": p_med / d_med if d_med > 0 else float("nan"),
                     "speedup_all_frames": p_mean / all_mean if all_mean > 0 else float("nan"),
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
    """The benchmark as an aligned text table; speedups are against the dense peer named in the header."""
    if not rows:
        return "(no results)"
    r0 = rows[0]
    threads = f", {r0['peer_threads']} threads" if r0.get("peer_threads") else ""
    timed_ = ", ".join(f"{k} {v:.1f} ms" for k, v in r0["peer_candidates"].items())
    head = [f"{r0['model']} on {r0['device']} ({r0['dtype']}, {r0['backend']} backend), input {r0['input']}, "
            f"{r0['frames']} frames",
            f"dense peer: {r0['peer']}{threads} (fastest of: {timed_})",
            "delta frames: neither keyframes nor run densely; speedups against the peer on the same frames"]
    cols = (f"{'threshold':>16} {'peer ms':>8} {'delta-frame ms':>15} {'speedup':>8} {'all-frame ms':>13} "
            f"{'speedup':>8} {'delta fr.':>9} {'input upd.':>10} {'MACs':>7}")
    sub = f"{'':>16} {'median':>8} {'median / mean':>15} {'':>8} {'mean':>13}"
    lines = head + [cols, sub]
    for r in rows:
        th = r["threshold"] if len(r["threshold"]) <= 16 else "..." + r["threshold"][-13:]
        dfm = f"{r['delta_frame_median_ms']:.2f} / {r['delta_frame_mean_ms']:.2f}" if r["delta_frames"] else "none"
        sp = f"{r['speedup_delta_frames']:7.2f}x" if r["delta_frames"] else f"{'-':>8}"
        lines.append(f"{th:>16} {r['peer_ms']:8.2f} {dfm:>15} {sp} {r['all_frame_mean_ms']:13.2f} "
                     f"{r['speedup_all_frames']:7.2f}x {r['delta_frames']:4d}/{r['frames']:<4d} "
                     f"{r['update_rate']:10.1%} {r['macs_fraction']:7.1%}")
    return "\n".join(lines)
