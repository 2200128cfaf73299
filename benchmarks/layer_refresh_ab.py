"""Keyframe schedules side by side on YOLOv8n / vtest.avi: agreement, multiply-adds and paired CPU time.

Every configuration (the keys of `benchmarks/noise_options.py`, e.g. ``file=shipped``,
``file=shipped,kf=16,layers=flush:8``) gets its own delta model; all of them step through the same
frames in lockstep, each frame's configurations in a rotating order, so that the load of a shared
machine falls on all of them alike (paired A/B). Per configuration: keyframes and layer refreshes
(deltacnn.layer_refresh), the convolutions' multiply-adds of every frame after the first against dense
(the backend's count of computed pixels; keyframes 100%), F1 / f1_stable against the dense model, and
the process CPU clock of dm(x) (1 thread unless --threads) over all frames, delta frames, refresh
frames and keyframes. Time compares only within one run.

    python3 benchmarks/layer_refresh_ab.py --start 0 --frames 200 --tag s12_calib --refs /tmp/refs_0_200.pt \\
        'file=shipped' 'file=shipped,kf=16,layers=flush:8'
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_options as no  # noqa: E402  (configurations, frames, dense references, results folder)


def _mean(v: list[float]) -> float:
    return statistics.fmean(v) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="ab")
    ap.add_argument("--refs", default=None, metavar="FILE", help="noise_options.py --refs")
    args = ap.parse_args()
    for spec in args.configs:
        no.parse_config(spec)
    torch.set_num_threads(args.threads)
    from deltacnn.tasks.yolov8 import YOLOv8Task

    task = YOLOv8Task()
    model = task.load_model().eval()
    xs = no.load_frames(args.start, args.frames, task)
    refs = no.dense_results(model, task, xs, args.start, args.refs)
    env = no.environment()
    print(f"YOLOv8n, vtest.avi frames {args.start}..{args.start + args.frames - 1}, {args.threads} thread(s), "
          f"cpu backend, CPU clock, paired (lockstep, rotating order), commit {env['commit']}", flush=True)
    dms = []
    for spec in args.configs:
        dm = no.build(model, xs[0], no.parse_config(spec))
        dm.enable_stats(True)
        dms.append(dm)
    k = len(dms)
    rec = [{"modes": [], "cpu_ms": [], "macs": [], "f1": [], "f1_stable": [], "touched": []} for _ in range(k)]
    t_start = time.time()
    with torch.no_grad():
        for i, x in enumerate(xs):
            for j in [(i + r) % k for r in range(k)]:
                dm, r = dms[j], rec[j]
                backend = dm.rt.backend_on(torch.device("cpu"))
                t0 = time.process_time()
                y = dm(x)
                dt = (time.process_time() - t0) * 1e3
                if i == 0:
                    continue
                mode = "refresh" if any(dm.last_refreshed) else dm.last_mode
                r["modes"].append(mode)
                r["cpu_ms"].append(dt)
                w = backend.work
                r["macs"].append(w[0] / w[1] if dm.last_mode == "delta" and w[1] else 1.0)
                a = task.agreement(task.postprocess(y), refs[i])
                r["f1"].append(a["f1"])
                r["f1_stable"].append(a["f1_stable"])
                if dm._touched:  # the layer refresh's touched area (configurations with an area trigger)
                    r["touched"].append(dm._touched[0])
            if i and i % 50 == 0:
                print(f"  frame {i}: {time.time() - t_start:.0f} s", flush=True)
    rows = []
    for spec, r in zip(args.configs, rec):
        by = lambda m: [t for t, md in zip(r["cpu_ms"], r["modes"]) if md == m]  # noqa: E731
        rows.append({"config": spec, "frames": len(r["modes"]),
                     "keyframes": sum(m not in ("delta", "refresh") for m in r["modes"]),
                     "refreshes": r["modes"].count("refresh"),
                     "macs": _mean(r["macs"]), "f1": _mean(r["f1"]), "f1_stable": _mean(r["f1_stable"]),
                     "cpu_ms_all": _mean(r["cpu_ms"]), "cpu_ms_delta": _mean(by("delta")),
                     "cpu_ms_refresh": _mean(by("refresh")), "cpu_ms_keyframe": _mean(by("keyframe")),
                     "per_frame": r})
    cols = ["config", "keyframes", "refreshes", "macs", "f1", "f1_stable", "cpu_ms_all", "cpu_ms_delta",
            "cpu_ms_refresh", "cpu_ms_keyframe"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(no._fmt(row[c]) if c != "macs" else f"{row[c]:.1%}" for c in cols) + " |")
    base = rows[0]["cpu_ms_all"]
    print("\nall frames against the first configuration: "
          + ", ".join(f"{r['config']}: {r['cpu_ms_all'] - base:+.1f} ms ({r['cpu_ms_all'] / base - 1:+.1%})"
                      for r in rows[1:]))
    path = no.write_json(f"layer_refresh_ab_{args.tag}", {"env": env, "start": args.start, "frames": args.frames,
                                                          "threads": args.threads, "clock": "process CPU, paired",
                                                          "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
