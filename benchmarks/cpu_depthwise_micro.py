"""CenterFace's depthwise conv shapes alone, 1 thread, process CPU clock, medians of interleaved repeats.

Dense (keyframes, dense frames): the cpu backend's depthwise_dense (conv, bias, ReLU in one pass) against ATen's
grouped conv + ReLU. Delta (8x8 blobs of updated pixels at about CenterFace 8/0.2's rates): depthwise_rows with the
update fused into its channel loop against depthwise_row then update_row (set_dw_fused_update).

    python3 benchmarks/cpu_depthwise_micro.py --repeats 24
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn
from deltacnn.activations import ActSpec  # noqa: E402
from deltacnn.backends import get_backend  # noqa: E402
from deltacnn.backends.base import ConvParams, PointwiseState  # noqa: E402
from deltacnn.backends.reference import _scatter_rows  # noqa: E402
from deltacnn.geometry import Window  # noqa: E402

# (channels, height, width, stride, delta input rate) of CenterFace's depthwise convs at 576 x 768
SHAPES = [(32, 288, 384, 1, 0.10), (96, 288, 384, 2, 0.12), (144, 144, 192, 1, 0.13), (192, 72, 96, 1, 0.15),
          (384, 36, 48, 1, 0.2), (576, 36, 48, 1, 0.25), (960, 18, 24, 1, 0.4)]


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each fn, the fns alternating call by call (two warm-up rounds)."""
    ts = {k: [] for k in fns}
    for r in range(repeats + 2):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            if r >= 2:
                ts[k].append((time.process_time() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    be = get_backend(torch.device("cpu"))
    k = be._k
    g = torch.Generator().manual_seed(0)
    act = ActSpec("relu")
    print(f"{'depthwise 3x3':26s} {'dense: ours':>11s} {'ATen':>7s} {'GMAC/s':>13s} | {'delta: fused':>12s} {'unfused':>8s}")
    for c, h, w, s, rate in SHAPES:
        win = Window.make(3, s, 1)
        p = ConvParams(torch.randn(c, 1, 3, 3, generator=g), win, c)
        bias = torch.randn(c, generator=g)
        x = torch.randn(1, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
        dense = _interleaved({"ours": lambda: be.dense_conv(x, p, bias, None, act, None),
                              "aten": lambda: F.relu_(F.conv2d(x, p.weight, bias, s, 1, 1, c))}, args.repeats)
        ho, wo = win.out_size(h, w)
        mac = ho * wo * c * 9 / 1e6
        mask = (torch.rand(1, 1, h // 8, w // 8, generator=g) < rate).repeat_interleave(8, 2).repeat_interleave(8, 3)
        idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
        d = _scatter_rows(1, c, h, w, idx, torch.randn(idx.numel(), c, generator=g), torch.empty(1, c, h, w))
        acc = torch.randn(1, c, ho, wo, generator=g).contiguous(memory_format=torch.channels_last)
        em = act(acc).contiguous(memory_format=torch.channels_last)

        def delta(fused: bool):
            old = k.set_dw_fused_update(fused)
            try:
                be.conv_block(d, p, None, PointwiseState(act, acc, em, 0.05, "max"))
            finally:
                k.set_dw_fused_update(old)
        dl = _interleaved({"fused": lambda: delta(True), "unfused": lambda: delta(False)}, args.repeats)
        print(f"{c:4d} ch {h:3d}x{w:3d} s{s} in {mask.float().mean():4.0%} {dense['ours']:11.3f} {dense['aten']:7.3f} "
              f"{mac / dense['ours']:6.1f}/{mac / dense['aten']:<6.1f} | {dl['fused']:12.3f} {dl['unfused']:8.3f}")


if __name__ == "__main__":
    main()
