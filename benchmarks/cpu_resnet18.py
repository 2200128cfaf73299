"""CPU: ResNet-18 layout at 640x360 on a static clip with ~5% changed pixels per frame,
the strongest dense peer (the faster of PyTorch channels_last and onnxruntime at the same thread
count, deltacnn.peers) versus deltacnn's CPU backends, in float32: "cpu" (the default on CPU tensors:
the reference with its gather, candidate and nonlinear-update stages fused in C++) and
"reference" (pure PyTorch). Dense and delta passes alternate (A B A B), so that both see the
same drift in machine load.

    python3 benchmarks/cpu_resnet18.py [--frames 24] [--threads 2] [--backends cpu,reference]
"""
from __future__ import annotations

import argparse

import torch

import deltacnn
from common import dense_peer, environment, median, print_table, time_frames, workload, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--frac", type=float, default=0.3, help="moving square side / min(H, W) (0.3: ~5%% changed)")
    ap.add_argument("--thresholds", default="0,0.01,0.03", help="comma-separated taus for the delta runs")
    ap.add_argument("--backends", default="cpu,reference", help="comma-separated deltacnn backends to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    model = workload.backbone("r18")
    clip = workload.make_clip(args.frac, args.frames, h, w)[:, None]  # T, 1, 3, H, W
    changed = float(((clip[1:] - clip[:-1]).abs().amax(2) > 0).float().mean())
    warm = 3
    with torch.no_grad():
        dense_out = [model(clip[t]) for t in range(args.frames)]
    choice = dense_peer(model, [clip[t] for t in range(0, args.frames, max(1, args.frames // 4))])
    peer = choice.peer
    rows = []
    cases = [(b, float(v)) for b in args.backends.split(",") for v in args.thresholds.split(",")]
    for backend, tau in cases:
        dm = deltacnn.convert(model, clip[0], threshold=tau, backend=backend)
        used = dm.rt.backend_for(clip[0]).name  # "cpu" falls back to "reference" if it cannot compile
        errs, rates, macs, dense_ms, ms = [], [], [], [], []
        # this VM's speed drifts by up to 20% over minutes: time dense and delta passes in turn,
        # twice (A B A B), and take medians over both; stats cost a host sync and are collected
        # in a separate, untimed pass
        with torch.no_grad():
            for _ in range(2):
                dense_ms += time_frames(lambda i: peer(clip[i]), range(args.frames))[warm:]
                dm.reset()
                ms += time_frames(lambda i: errs.append(
                    float((dm(clip[i]) - dense_out[i]).norm() / dense_out[i].norm())), range(args.frames))[warm:]
        dm.reset()
        dm.enable_stats(True)
        for t in range(args.frames):
            dm(clip[t])
            if t >= warm:
                s = dm.frame_stats()
                rates.append(s.layers["input"].update_rate)
                macs.append(s.macs_fraction)
        dense_med, delta_med = median(dense_ms), median(ms)
        rows.append({"impl": f"deltacnn {used} fp32", "tau": tau, "peer_ms": dense_med, "ms": delta_med,
                     "speedup_vs_peer": dense_med / delta_med, "input_update": sum(rates) / len(rates),
                     "macs_vs_dense": sum(macs) / len(macs), "max_rel_err": max(errs)})
    print(f"ResNet-18 layout {w}x{h}, {changed:.1%} pixels changed per frame, {args.threads} CPU threads, "
          f"median of 2 x {args.frames - warm} frames per side; dense peer: {peer.name}")
    print_table(rows, ["impl", "tau", "peer_ms", "ms", "speedup_vs_peer", "input_update", "macs_vs_dense",
                       "max_rel_err"])
    path = write_json("cpu_resnet18", {"env": environment(), "size": [w, h], "changed": changed, "rows": rows,
                                       "peer": choice.to_dict()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
