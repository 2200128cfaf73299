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


def kernel_profile(dm, clip: torch.Tensor, warm: int = 6, keyframes: bool = False
                   ) -> tuple[float, list[tuple[str, float, float]]]:
    """Run `warm` frames, then profile the rest of `clip` on the (eager) delta model `dm`
    (`keyframes`: every frame after a reset(), i.e. a keyframe).

    Returns (GPU kernel ms per frame, [(kernel, us per frame, calls per frame)] by time)."""
    def step(t: int) -> None:
        if keyframes:
            dm.reset()
        dm(clip[t])
    for t in range(warm):
        step(t)
    torch.cuda.synchronize()
    frames = clip.shape[0] - warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in range(warm, clip.shape[0]):
            step(t)
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


def conv_layer_profile(dm, clip: torch.Tensor, warm: int = 6) -> list[dict]:
    """GPU time of each conv layer's kernels in frame `warm` of `clip` (eager delta model `dm`).

    Kernels are matched to layers by launch order: every conv launches exactly one conv kernel,
    preceded by its tile-list kernel (and followed by a nonlinear kernel where not fused)."""
    from deltacnn.layers.conv import DeltaConv2d
    for t in range(warm):
        dm(clip[t])
    convs: list[tuple[str, DeltaConv2d, tuple]] = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: convs.append((mod.name, mod, tuple(inp[0].shape))))
             for mod in dm.modules() if isinstance(mod, DeltaConv2d)]
    dm.enable_stats(True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dm(clip[warm])
        torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    stats = dm.frame_stats()
    dm.enable_stats(False)
    kernels = sorted(((e.time_range.start, e.name.split("(")[0], e.device_time_total if hasattr(e, "device_time_total")
                       else e.cuda_time_total) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    rows, i, pending = [], 0, 0.0
    for _, name, us in kernels:
        if name == "_tiles_kernel":
            pending += us
        elif name in ("_conv_gemm_kernel", "_conv_dw_kernel") and i < len(convs):
            lname, mod, in_shape = convs[i]
            w = mod.weight
            ls = stats.layers.get(lname)
            rows.append({"layer": lname, "conv": f"{w.shape[1]}->{w.shape[0]} k{w.shape[2]} s{mod.window.stride[0]}",
                         "in_hw": f"{in_shape[2]}x{in_shape[3]}", "out_rate": ls.update_rate if ls else None,
                         "macs": ls.macs if ls else None, "tiles_us": pending, "conv_us": us})
            pending, i = 0.0, i + 1
        elif name == "_nonlinear_kernel" and rows:
            rows[-1]["nonlinear_us"] = rows[-1].get("nonlinear_us", 0.0) + us
    return rows


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
