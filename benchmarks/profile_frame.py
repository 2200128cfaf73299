"""Where the time of one delta frame goes on the GPU: CUDA kernel time by kernel name.

    python3 benchmarks/profile_frame.py [--model r50] [--density 0.05] [--batch 1] [--dtype float16]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import deltacnn
from common import workload
from gpu_bench import SIZES, make_batch_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="r50")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--frames", type=int, default=5)
    args = ap.parse_args()
    h, w = SIZES[args.model]
    model = workload.backbone(args.model).cuda()
    clip = make_batch_clip(args.density, 6 + args.frames, args.batch, h, w)
    dm = deltacnn.convert(model, clip[0], dtype=getattr(torch, args.dtype), backend="triton")
    for t in range(6):
        dm(clip[t])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in range(6, 6 + args.frames):
            dm(clip[t])
        torch.cuda.synchronize()
    stats: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.split("(")[0][:60]
            s = stats.setdefault(name, [0.0, 0])
            s[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            s[1] += 1
    total = sum(v[0] for v in stats.values()) / args.frames
    print(f"{args.model} batch {args.batch} density {args.density:.0%} {args.dtype}: "
          f"GPU kernel time {total / 1e3:.3f} ms per frame")
    print(f"{'kernel':60s} {'us/frame':>9s} {'calls/frame':>11s} {'share':>6s}")
    for name, (us, n) in sorted(stats.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{name:60s} {us / args.frames:9.1f} {n / args.frames:11.1f} {us / args.frames / total:6.1%}")


if __name__ == "__main__":
    main()
