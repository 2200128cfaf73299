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


def kernel_profile(dm, clip: torch.Tensor, warm: int = 6) -> tuple[float, list[tuple[str, float, float]]]:
    """Run `warm` frames, then profile the rest of `clip` on the (eager) delta model `dm`.

    Returns (GPU kernel ms per frame, [(kernel, us per frame, calls per frame)] by time)."""
    for t in range(warm):
        dm(clip[t])
    torch.cuda.synchronize()
    frames = clip.shape[0] - warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in range(warm, clip.shape[0]):
            dm(clip[t])
        torch.cuda.synchronize()
    stats: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.split("(")[0][:60]
            s = stats.setdefault(name, [0.0, 0])
            s[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            s[1] += 1
    rows = sorted(((k, us / frames, n / frames) for k, (us, n) in stats.items()), key=lambda r: -r[1])
    return sum(r[1] for r in rows) / 1e3, rows


def print_profile(title: str, total_ms: float, rows, top: int = 25) -> None:
    print(f"{title}: GPU kernel time {total_ms:.3f} ms per frame")
    print(f"{'kernel':60s} {'us/frame':>9s} {'calls/frame':>11s} {'share':>6s}")
    for name, us, n in rows[:top]:
        print(f"{name:60s} {us:9.1f} {n:11.1f} {us / 1e3 / total_ms:6.1%}")


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
    total, rows = kernel_profile(dm, clip)
    print_profile(f"{args.model} batch {args.batch} density {args.density:.0%} {args.dtype}", total, rows)


if __name__ == "__main__":
    main()
