"""CPU: ResNet-18 layout at 640x360 on a static clip with ~5% changed pixels per frame,
dense PyTorch versus deltacnn's reference backend (sparse gathers), in float32.

    python3 benchmarks/cpu_resnet18.py [--frames 24] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

import deltacnn
from common import environment, median, print_table, time_frames, workload, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--frac", type=float, default=0.3, help="moving square side / min(H, W) (0.3: ~5%% changed)")
    ap.add_argument("--thresholds", default="0,0.01,0.03", help="comma-separated taus for the delta runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    model = workload.backbone("r18")
    clip = workload.make_clip(args.frac, args.frames, h, w)[:, None]  # T, 1, 3, H, W
    changed = float(((clip[1:] - clip[:-1]).abs().amax(2) > 0).float().mean())
    warm = 3
    with torch.no_grad():
        dense_out = []
        dense_ms = time_frames(lambda t: dense_out.append(model(clip[t])), range(args.frames))
    rows = [{"impl": "dense PyTorch fp32", "tau": None, "ms": median(dense_ms[warm:]), "speedup": 1.0}]
    for tau in (float(v) for v in args.thresholds.split(",")):
        dm = deltacnn.convert(model, clip[0], threshold=tau)
        dm.enable_stats()
        errs, rates, macs = [], [], []

        def step(t: int) -> None:
            out = dm(clip[t])
            errs.append(float((out - dense_out[t]).norm() / dense_out[t].norm()))

        # stats cost a host sync: time a first pass without them, then collect them in a second
        dm.enable_stats(False)
        ms = time_frames(step, range(args.frames))
        dm.reset()
        dm.enable_stats(True)
        for t in range(args.frames):
            dm(clip[t])
            if t >= warm:
                s = dm.frame_stats()
                rates.append(s.layers["input"].update_rate)
                macs.append(s.macs_fraction)
        rows.append({"impl": "deltacnn reference fp32", "tau": tau, "ms": median(ms[warm:]),
                     "speedup": median(dense_ms[warm:]) / median(ms[warm:]), "input_update": sum(rates) / len(rates),
                     "macs_vs_dense": sum(macs) / len(macs), "max_rel_err": max(errs), "keyframe_ms": ms[0]})
    print(f"ResNet-18 layout {w}x{h}, {changed:.1%} pixels changed per frame, {args.threads} CPU threads, "
          f"median of {args.frames - warm} frames")
    print_table(rows, ["impl", "tau", "ms", "speedup", "input_update", "macs_vs_dense", "max_rel_err"])
    path = write_json("cpu_resnet18", {"env": environment(), "size": [w, h], "changed": changed, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
