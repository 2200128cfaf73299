"""Shared benchmark plumbing: the DESIGN.md workload, timing, tables, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

SHARED_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "bench"
# ../shared/bench beside the checkout; on the GPU machine a copy carried in .carry/
for cand in (SHARED_BENCH, Path(__file__).resolve().parents[1] / "shared" / "bench",
             Path(__file__).resolve().parents[1] / ".carry"):
    if cand.is_dir():
        sys.path.insert(0, str(cand))
        break

import workload  # noqa: E402  (the DESIGN.md models and clips)


def commit() -> str:
    """The checkout's commit, "+" when deltacnn/ has uncommitted changes; DELTACNN_COMMIT overrides it where the copy's .git is stale (the GPU machine)."""
    if os.environ.get("DELTACNN_COMMIT"):
        return os.environ["DELTACNN_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                      cwd=root, stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", "deltacnn"], cwd=root,
                                stderr=subprocess.DEVNULL) != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+" if dirty else "")  # "+": the library differs from the commit


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "commit": commit(),
           "date": time.strftime("%Y-%m-%d"), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def time_frames(step: Callable[[int], object], frames: range, cuda: bool = False) -> list[float]:
    """Milliseconds per call of step(t) for t in frames."""
    out = []
    for t in frames:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(t)
        if cuda:
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def dense_peer(model, frames, compile: bool = False):
    """The strongest dense deployment of `model` on its device (deltacnn.peers.strongest_peer), printed
    with every candidate's time: the baseline every benchmark speedup is quoted against."""
    from deltacnn.peers import strongest_peer

    choice = strongest_peer(model, frames, compile=compile)
    print(f"dense peer: {choice.describe()}" + (f"; not candidates: {choice.rejected}" if choice.rejected else ""))
    return choice


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def print_table(rows: list[dict], cols: list[str]) -> None:
    """Rows as right-aligned columns (just the header when there are no rows)."""
    widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_json(name: str, payload: dict) -> Path:
    out_dir = Path(os.environ.get("OUT", Path(__file__).resolve().parents[1] / "benchmarks" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
