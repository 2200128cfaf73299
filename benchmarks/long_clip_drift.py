"""tau-0 error over a very long clip, with and without the work-based refresh (issue 11 item 3).

Every pixel changes every frame (a textured scene plus fresh noise), the worst case for float32
accumulators, whose rounding error otherwise grows like a random walk. The same small model runs
twice, interleaved in chunks of `--chunk` frames so that both see the same machine load: once with
the default refresh (`DeltaModel.rt.refresh_work`), once without. Every chunk records the relative
error of the last frame against dense PyTorch and the time per frame; the table shows the error at
chosen frames and the refresh's share of the time.

    python3 benchmarks/long_clip_drift.py --frames 100000 [--chunk 1000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn
import deltacnn  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--size", type=int, default=12)
    ap.add_argument("--json", default="benchmarks/results/long_clip_drift.json")
    a = ap.parse_args()
    torch.manual_seed(2)
    torch.set_num_threads(1)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 4, 1)).eval()
    g = torch.Generator().manual_seed(8)
    base = torch.rand(1, 3, a.size, a.size, generator=g)
    models = {}
    for name, refresh in (("refresh", "default"), ("no refresh", None)):
        dm = deltacnn.convert(m, base, dense_above=None)
        if refresh is None:
            dm.rt.refresh_work = None
        models[name] = dm
    rows, times = [], {k: 0.0 for k in models}
    keyframes = {k: 0 for k in models}
    done = 0
    while done < a.frames:
        n = min(a.chunk, a.frames - done)
        frames = [base + 0.02 * torch.randn(base.shape, generator=g) for _ in range(n)]
        row = {"frame": done + n}
        for name, dm in models.items():
            t0 = time.perf_counter()
            for x in frames:
                y = dm(x)
                keyframes[name] += dm.last_mode == "keyframe"
            times[name] += time.perf_counter() - t0
            with torch.no_grad():
                row[name] = rel_err(y, m(frames[-1]))
        rows.append(row)
        done += n
        print(f"frame {done:7d}: error with refresh {row['refresh']:.2e}, without {row['no refresh']:.2e}", flush=True)
    ms = {k: 1e3 * v / a.frames for k, v in times.items()}
    print(f"\n| frame | error, refresh every {models['refresh'].rt.refresh_work} dense frames of work | error, no refresh |")
    print("|---|---|---|")
    for r in rows:
        if r["frame"] in (a.chunk, 10 * a.chunk, a.frames // 4, a.frames // 2, a.frames) or r is rows[-1]:
            print(f"| {r['frame']} | {r['refresh']:.2e} | {r['no refresh']:.2e} |")
    late = rows[len(rows) // 2:]
    print(f"\nworst error over the second half: refresh {max(r['refresh'] for r in late):.2e}, "
          f"no refresh {max(r['no refresh'] for r in late):.2e}")
    print(f"time per frame: refresh {ms['refresh']:.3f} ms ({keyframes['refresh']} keyframes), no refresh "
          f"{ms['no refresh']:.3f} ms ({keyframes['no refresh']}); refresh costs "
          f"{ms['refresh'] / ms['no refresh'] - 1:+.2%} of throughput (interleaved chunks, 1 thread)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"frames": a.frames, "chunk": a.chunk, "size": a.size, "rows": rows,
                                        "ms_per_frame": ms, "keyframes": keyframes,
                                        "refresh_work": models["refresh"].rt.refresh_work}, indent=1))


if __name__ == "__main__":
    main()
