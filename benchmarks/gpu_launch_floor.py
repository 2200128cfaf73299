"""GPU: what one launch costs inside a replayed CUDA graph, by grid size, with and without programmatic
dependent launch (PDL): the lower bound of a delta frame's floor for a given number of launches.

Each case captures `--launches` back-to-back launches of a kernel that does no work (every program
reads one int and exits, as a conv kernel does when its tile list is empty) and replays the graph;
the printed number is replay time / launches. Grid sizes: 1 program, one per SM, the conv kernels'
persistent grid (4 per SM at 4 warps) and a tile-list launch over a 270x480 map (2040 programs of 2 warps).

    python3 benchmarks/gpu_launch_floor.py [--launches 88]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from common import median, print_table
from deltacnn.backends.triton_kernels._common import gdc_start


@triton.jit
def _empty_kernel(count_ptr, out_ptr, GDC: tl.constexpr):
    gdc_start(GDC)
    if tl.load(count_ptr) > tl.program_id(0):  # never true: the count is 0
        tl.store(out_ptr, 1)


def replay_us(grid: int, warps: int, launches: int, pdl: bool, iters: int = 50) -> float:
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    opts = {"GDC": 1, "launch_pdl": True} if pdl else {"GDC": 0}

    def body():
        for _ in range(launches):
            _empty_kernel[(grid,)](count, out, num_warps=warps, **opts)
    body()  # compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / launches)
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", type=int, default=88)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, grid, warps in (("1 program", 1, 4), ("1 per SM", sms, 4), ("conv grid, 4 per SM", 4 * sms, 4),
                              ("tile list 270x480", 34 * 60, 2), ("tile list 540x960 (stem)", 68 * 120, 2)):
        for pdl in (False, True):
            rows.append({"grid": name, "programs": grid, "warps": warps, "pdl": pdl,
                         "us_per_launch": replay_us(grid, warps, args.launches, pdl)})
            print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: {args.launches} launches of an empty kernel per replayed graph")
    print_table(rows, ["grid", "programs", "warps", "pdl", "us_per_launch"])


if __name__ == "__main__":
    main()
