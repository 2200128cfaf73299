"""How much conv work 8x8 tiles waste on a workload: candidate pixels against the tiles holding them.

Runs on the CPU (the reference backend): for every conv of the model, the candidate pixels (the
receptive-field dilation of its input mask) and 64 x the 8x8 output tiles holding any of them, per
frame after the first; printed per layer and weighted by each conv's multiply-adds per pixel. The
weighted ratio is what work units of listed pixels (`triton_kernels.conv.PIXEL_LISTS`) can save
over whole tiles. A touched tile counts its 64 pixels even where it overhangs the map's edge
(the kernel's MMA rows are spent on them), so on small maps the tiles can exceed 100% of the
map. The reference backend is used so that no C++ build is needed. The residual's own mask, which a conv with a residual also computes at, is left out.

    python3 benchmarks/tile_occupancy.py [--model r50] [--workload crowd5t] [--size 1080x1920] [--frames 5]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import deltacnn
from common import workload
from deltacnn.layers.conv import DeltaConv2d
from gpu_peers import make_clip, parse_workload


def occupancy(model: torch.nn.Module, clip: torch.Tensor, tau: float, input_threshold: float | None,
              tile: int = 8) -> list[tuple[str, int, float, float, int]]:
    """[(conv, output pixels, candidate pixels, pixels of touched tiles, MACs per pixel)], means over frames >= 1."""
    dm = deltacnn.convert(model, clip[0], threshold=tau, input_threshold=input_threshold, backend="reference")
    seen: dict[str, list] = {}

    def hook(mod, inp, out):
        d = inp[0]
        if getattr(d, "mask", None) is None:
            return
        k, s = mod.weight.shape[-1], mod.window.stride[0]
        m = d.mask.float()
        cand = F.max_pool2d(m, k, s, k // 2) if k > 1 or s > 1 else m
        tiles = F.max_pool2d(cand, tile, tile, ceil_mode=True)
        seen.setdefault(mod.name, []).append((cand[0, 0].numel() * cand.shape[0], float(cand.sum()),
                                              float(tiles.sum()) * tile * tile, mod.weight[0].numel()))
    hooks = [mod.register_forward_hook(hook) for mod in dm.modules() if isinstance(mod, DeltaConv2d)]
    with torch.no_grad():
        for t in range(clip.shape[0]):
            dm(clip[t])
    for h in hooks:
        h.remove()
    rows = []
    for name, r in seen.items():
        r = r[1:]  # the keyframe has no masks to speak of
        if r:
            rows.append((name, r[0][0], sum(x[1] for x in r) / len(r), sum(x[2] for x in r) / len(r), r[0][3]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r50")
    ap.add_argument("--workload", default="crowd5t", help="a gpu_peers workload name (static, sq5, crowd5t, noise5, ...)")
    ap.add_argument("--size", default="1080x1920", help="HxW")
    ap.add_argument("--frames", type=int, default=5)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    wl = parse_workload(args.workload)
    clip = make_clip(wl, args.frames, 1, h, w, device="cpu")
    rows = occupancy(workload.backbone(args.model), clip, wl["tau"], wl["input_threshold"])
    cand = tiles = dense = 0.0
    print(f"{'conv':20s} {'pixels':>8s} {'cand':>7s} {'tiles':>7s} {'occupancy':>9s}")
    for name, px, c, t, mpp in rows:
        cand, tiles, dense = cand + c * mpp, tiles + t * mpp, dense + px * mpp
        print(f"{name:20s} {px:8d} {c / px:7.1%} {t / px:7.1%} {c / max(t, 1):9.1%}")
    print(f"MAC-weighted: candidates {cand / dense:.1%} of dense, touched tiles {tiles / dense:.1%}, "
          f"occupancy {cand / max(tiles, 1):.1%}")


if __name__ == "__main__":
    main()
