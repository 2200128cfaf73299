"""Where conv_dense's time goes on YOLOv8n's keyframe conv shapes: the conv without an activation and without
state (GEMM, bias, the output written), with SiLU, and with SiLU and the keyframe's state A and E, each shape
alone on random inputs (1 thread, process CPU clock, variants interleaved, medians of --reps calls).

With `--base-source old.cpp`, every variant also runs on a second build of the kernels (interleaved, paired):
the per-shape view of a two-build A/B of cpu_keyframe_layers.py --steady.

    PYTHONPATH=. python3 benchmarks/cpu_dense_epilogue.py --reps 20
    git show cfc0593:deltacnn/backends/cpu_kernels.cpp > /tmp/base.cpp
    PYTHONPATH=. python3 benchmarks/cpu_dense_epilogue.py --reps 20 --base-source /tmp/base.cpp
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deltacnn.activations import ActSpec  # noqa: E402
from deltacnn.backends.base import ConvParams  # noqa: E402
from deltacnn.backends.cpu_fused import FusedCpuBackend  # noqa: E402
from deltacnn.backends.cpu_kernels import load  # noqa: E402
from deltacnn.geometry import Window  # noqa: E402

# (Cin, Cout, k, stride, input H, W): YOLOv8n at 768 x 576, the narrow high-resolution layers first
SHAPES = [(3, 16, 3, 2, 576, 768), (16, 32, 3, 2, 288, 384), (32, 32, 1, 1, 144, 192), (16, 16, 3, 1, 144, 192),
          (48, 32, 1, 1, 144, 192), (32, 64, 3, 2, 144, 192), (32, 32, 3, 1, 72, 96), (64, 64, 1, 1, 72, 96),
          (192, 64, 1, 1, 72, 96), (64, 64, 3, 1, 72, 96), (64, 64, 3, 1, 36, 48), (192, 128, 1, 1, 36, 48)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--base-source", default="", help="also run on a build of this cpu_kernels.cpp, paired")
    args = ap.parse_args()
    torch.set_num_threads(1)
    builds = {"new": FusedCpuBackend(load())}
    if args.base_source:
        from cpu_profile import load_base_kernels
        builds = {"base": FusedCpuBackend(load_base_kernels(args.base_source)), **builds}
    silu = ActSpec("silu")
    for cin, cout, k, s, h, w in SHAPES:
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(1, cin, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
        win = Window.make(k, s, k // 2)
        p = ConvParams(torch.randn(cout, cin, k, k, generator=gen) * (cin * k * k) ** -0.5, win, 1)
        bias = torch.randn(cout, generator=gen)
        ho, wo = win.out_size(h, w)
        acc = torch.empty(1, cout, ho, wo).contiguous(memory_format=torch.channels_last)
        em = torch.empty_like(acc)
        runs = {}
        for b, be in builds.items():
            runs[f"{b} id"] = lambda be=be: be.dense_conv(x, p, bias, None, None, None)
            runs[f"{b} silu"] = lambda be=be: be.dense_conv(x, p, bias, None, silu, None)
            runs[f"{b} silu+A+E"] = lambda be=be: be.dense_conv(x, p, bias, None, silu, lambda _s: (acc, em))
        t = {v: [] for v in runs}
        order = list(runs.items())
        for i in range(args.reps + 2):
            for v, f in (order if i % 2 else order[::-1]):  # both orders
                t0 = time.process_time()
                f()
                if i >= 2:
                    t[v].append((time.process_time() - t0) * 1e3)
        mac = ho * wo * k * k * cin * cout / 1e6
        m = {v: statistics.median(a) for v, a in t.items()}
        print(f"{cin:3d}->{cout:3d} k{k} s{s} {h}x{w} ({ho * wo * cout / 1e6:.2f} M outputs, {mac:.0f} MMAC)")
        for b in builds:
            i_, f_, a_ = (m[f"{b} {v}"] for v in ("id", "silu", "silu+A+E"))
            print(f"   {b:4s}: id {i_:.3f} ms ({mac / i_:.0f} GMAC/s), silu {f_:.3f}, silu+A+E {a_:.3f} ms "
                  f"({mac / a_:.0f} GMAC/s): SiLU {f_ - i_:+.3f}, A {a_ - f_:+.3f} ms")
        if "base" in builds:
            d = [x_ - y_ for x_, y_ in zip(t["new silu+A+E"], t["base silu+A+E"])]
            print(f"   new less base, silu+A+E: {statistics.median(d):+.3f} ms median of {len(d)} paired calls")


if __name__ == "__main__":
    main()
