"""A two-minute tour: convert a ResNet-18, play a static-camera clip through it, report savings.

    python3 -m deltacnn.demo [--frames 40] [--size 320x180] [--threshold 0.02]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import deltacnn
from deltacnn.models import resnet18
from deltacnn.peers import strongest_peer


def synthetic_clip(frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(T, 1, 3, H, W): a fixed textured background, two textured squares walking across, sensor noise."""
    g = torch.Generator().manual_seed(seed)
    bg = F.interpolate(torch.randn(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear")
    side = max(4, min(h, w) // 6)
    tex = torch.randn(2, 3, side, side, generator=g)
    out = []
    for t in range(frames):
        f = bg.clone()
        for k, (y, speed) in enumerate(((h // 4, 3), (h // 2, -2))):
            x = (w // 3 + speed * t) % (w - side)
            f[0, :, y:y + side, x:x + side] = tex[k]
        out.append(f + 0.002 * torch.randn(1, 3, h, w, generator=g))
    return torch.stack(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--size", default="640x360", help="WxH")
    ap.add_argument("--threshold", type=float, default=0.02)
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    torch.manual_seed(0)
    model = resnet18().eval()
    clip = synthetic_clip(args.frames, h, w)
    print(f"ResNet-18 (random weights), {args.frames} frames of {w}x{h}, threshold {args.threshold}")
    # the dense column is the fastest dense deployment of the same network here, not the model as loaded
    peer = strongest_peer(model, [clip[0], clip[-1]]).peer
    print(f"dense peer: {peer.name}")
    runs = {}
    for tau in (0.0, args.threshold):
        dm = deltacnn.convert(model, clip[0], threshold=tau)
        dm.enable_stats()
        errs, macs, rates, ms, dense_ms = [], [], [], [], []
        for t in range(args.frames):
            with torch.no_grad():
                ref = model(clip[t])
            t0 = time.perf_counter()
            peer(clip[t])
            t1 = time.perf_counter()
            y = dm(clip[t])
            t2 = time.perf_counter()
            s = dm.frame_stats()
            if t:  # frame 0 is the dense keyframe
                errs.append(float((y - ref).norm() / ref.norm()))
                macs.append(s.macs_fraction)
                rates.append(s.layers["input"].update_rate)
                ms.append((t2 - t1) * 1e3)
                dense_ms.append((t1 - t0) * 1e3)
        runs[tau] = (s, errs, macs, rates, ms, dense_ms)
    s, *_ = runs[args.threshold]
    print(f"\nPer-layer update rates on the last frame (threshold {args.threshold}):")
    print(s.table())
    print(f"\n{'threshold':>9} {'input updated':>14} {'MACs saved':>11} {'max rel err':>12} {'ms/frame':>9} {'peer ms':>9}")
    for tau, (_, errs, macs, rates, ms, dense_ms) in runs.items():
        med = sorted(ms)[len(ms) // 2]
        dmed = sorted(dense_ms)[len(dense_ms) // 2]
        print(f"{tau:9.3g} {sum(rates) / len(rates):14.1%} {1 - sum(macs) / len(macs):11.1%} {max(errs):12.2e} "
              f"{med:9.1f} {dmed:9.1f}")


if __name__ == "__main__":
    main()
