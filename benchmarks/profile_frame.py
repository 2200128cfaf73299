"""Where the time of one delta frame goes on the GPU: CUDA kernel time by kernel name.

    python3 benchmarks/profile_frame.py [--model r50] [--density 0.05] [--batch 1] [--dtype float16]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import deltacnn
from common import workload
from gpu_bench import SIZES, make_batch_clip


# kernel names (profiler events) of the Triton backend's convs, their tile lists and nonlinear passes
CONV_KERNELS = ("_conv_gemm_kernel", "_conv_dw_kernel")
TILE_KERNELS = ("_tiles_kernel",)
NONLINEAR_KERNELS = ("_nonlinear_kernel",)


def kernel_name(name: str) -> str:
    """A CUDA kernel's name without its parameter list ("void at::native::(anonymous namespace)::f<..>(..)" keeps
    its namespace: cut at the first "(" it was "void at::native::" for a tenth of YOLOv8n's kernel time)."""
    return name.replace("(anonymous namespace)::", "").split("(")[0]


def _cuda_kernels(prof) -> list[tuple[float, str, float]]:
    """(start, kernel name, device us) of every CUDA kernel event of a finished profile, by start."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            out.append((e.time_range.start, kernel_name(e.name), us))
    return sorted(out, key=lambda k: k[0])


def kernel_table(kernels: list[tuple[float, str, float]], frames: int) -> tuple[float, list[tuple[str, float, float]]]:
    """(GPU kernel ms per frame, [(kernel, us per frame, calls per frame)] by time) of `kernels`
    (as _cuda_kernels returns them) recorded over `frames` frames."""
    stats: dict[str, list[float]] = {}
    for _, name, us in kernels:
        s = stats.setdefault(name[:90], [0.0, 0])
        s[0] += us
        s[1] += 1
    frames = max(1, frames)
    rows = sorted(((k, us / frames, n / frames) for k, (us, n) in stats.items()), key=lambda r: -r[1])
    return sum(r[1] for r in rows) / 1e3, rows


def profile_steps(step: Callable[[int], object], frames: range) -> list[tuple[float, str, float]]:
    """The CUDA kernels that step(t) for t in `frames` runs (eager launches or graph replays alike)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in frames:
            step(t)
        torch.cuda.synchronize()
    return _cuda_kernels(prof)


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
    return kernel_table(profile_steps(step, range(warm, clip.shape[0])), clip.shape[0] - warm)


def replay_profile(runner, clip: torch.Tensor, warm: int = 6) -> tuple[float, float, list[tuple[str, float, float]]]:
    """Kernel time of the frames after `warm` as `runner` (deltacnn.compile's result) replays them, and
    their time per frame measured around the replays without the profiler: (replayed ms per frame,
    GPU kernel ms per frame, per-kernel rows as kernel_profile's). The difference of the two times is
    what the graph spends between kernels (launch latency, dependencies)."""
    for t in range(warm):
        runner(clip[t])
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    frames = range(warm, clip.shape[0])
    start.record()
    for t in frames:
        runner(clip[t])
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / max(1, len(frames))
    kernel_ms, rows = kernel_table(profile_steps(lambda t: runner(clip[t]), frames), len(frames))
    return wall, kernel_ms, rows


def match_conv_kernels(kernels: list[tuple[float, str, float]], convs: list[tuple[str, object, tuple]],
                       stats=None) -> list[dict]:
    """Per-conv-layer rows from one frame's kernels in launch order (`kernels` as _cuda_kernels returns
    them, `convs` the (layer name, DeltaConv2d, input shape) of each conv call in call order, `stats` the
    frame's FrameStats or None). Every conv launches exactly one conv kernel, preceded by its tile-list
    kernel where it has one (not on small maps: conv.direct_tiles; tiles_us is then 0) and followed by a
    nonlinear kernel where not fused; kernels of other names are left out, so
    an empty list means that no conv kernel of a known name ran (see CONV_KERNELS)."""
    rows, i, pending = [], 0, 0.0
    for _, name, us in kernels:
        if name in TILE_KERNELS:
            pending += us
        elif name in CONV_KERNELS and i < len(convs):
            lname, mod, in_shape = convs[i]
            w = mod.weight
            ls = stats.layers.get(lname) if stats is not None else None
            rows.append({"layer": lname, "conv": f"{w.shape[1]}->{w.shape[0]} k{w.shape[2]} s{mod.window.stride[0]}",
                         "in_hw": f"{in_shape[2]}x{in_shape[3]}", "out_rate": ls.update_rate if ls else None,
                         "macs": ls.macs if ls else None, "tiles_us": pending, "conv_us": us})
            pending, i = 0.0, i + 1
        elif name in NONLINEAR_KERNELS and rows:
            rows[-1]["nonlinear_us"] = rows[-1].get("nonlinear_us", 0.0) + us
    return rows


def conv_layer_profile(dm, clip: torch.Tensor, warm: int = 6) -> list[dict]:
    """GPU time of each conv layer's kernels in frame `warm` of `clip` (eager delta model `dm`);
    see match_conv_kernels."""
    from deltacnn.layers.conv import DeltaConv2d
    for t in range(warm):
        dm(clip[t])
    convs: list[tuple[str, DeltaConv2d, tuple]] = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: convs.append((mod.name, mod, tuple(inp[0].shape))))
             for mod in dm.modules() if isinstance(mod, DeltaConv2d)]
    dm.enable_stats(True)
    try:
        kernels = profile_steps(lambda t: dm(clip[t]), range(warm, warm + 1))
    finally:
        for h in hooks:
            h.remove()
    stats = dm.frame_stats()
    dm.enable_stats(False)
    return match_conv_kernels(kernels, convs, stats)


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
