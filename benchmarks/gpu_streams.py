"""GPU: camera streams per GPU at 30 fps, YOLOv8n, dense peers and deltacnn.compile, and what a scene
cut in one stream costs with per-stream passes (deltacnn.compile's default) against a whole-batch
keyframe (per_stream=False).

The clip (vtest.avi, 768x576) is resized (bilinear) to each --plan size (H x W, multiples of 32:
1280x736 stands in for 720p, 1920x1088 for 1080p); batch N = N streams at offsets of 3 frames.
Streams at 30 fps = N x 1000 / (30 x ms per batched frame). deltacnn: median of delta frames
(every stream on deltas). Scene cut: at frames --cut-at.. one stream per frame is reset
(`reset_stream(k)`), and the table shows the median of those mixed frames (the first two, eager,
left out); the whole-batch model (per_stream=False) pays a keyframe of all N streams for the same
event.

    DELTACNN_CLIP=vtest.avi DELTACNN_YOLOV8_PT=yolov8n.pt python3 benchmarks/gpu_streams.py \
        [--plan '736x1280:16,32;1088x1920:16'] [--thresholds 0,file.json] [--tag streams]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import deltacnn
from common import environment, median, print_table, write_json
from gpu_bench import free_memory
from gpu_peers import dense_peers
from gpu_yolo import batch_at, convert, load_frames

FPS = 30.0


def run(model32, base, batch, setting, frames, warm, per_stream: bool, cuts: list[int]) -> dict:
    x = batch_at(base, 0, batch)
    dm = convert(model32, x, setting)
    g = deltacnn.compile(dm, per_stream=per_stream)
    delta, cut, key = [], [], []
    for t in range(frames):
        batch_at(base, t, batch, out=x)
        if t in cuts:
            if per_stream:
                g.reset_stream(cuts.index(t) % batch)
            else:  # the batch's keyframe (the state is kept, so its graph is replayed, not recaptured)
                dm.frame_index = 0
        n_graphs = len(g._graphs)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g(x)
        b.record()
        b.synchronize()
        if t < warm or len(g._graphs) != n_graphs:
            continue
        modes = set(g.last_modes) if per_stream else {dm.last_mode}
        ms = a.elapsed_time(b)
        if t in cuts:
            if cuts.index(t) >= 2:  # the first two run eagerly (warm-up of the keyframe pass)
                cut.append(ms)
        elif modes == {"delta"}:
            delta.append(ms)
        elif modes == {"keyframe"}:
            key.append(ms)
    out = {"ms_delta": median(delta), "ms_cut": median(cut), "n_cut": len(cut), "ms_keyframe": median(key),
           "frames": dict(g.frames)}
    del g, dm
    free_memory()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="736x1280:16,32;1088x1920:16", help="HxW:batches;HxW:batches")
    ap.add_argument("--whole-batch", default="first", help="also time per_stream=False: 'first' threshold, 'all', 'none'")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--warm", type=int, default=6)
    ap.add_argument("--cut-at", type=int, default=20, help="first frame with a reset stream (then every 3rd)")
    ap.add_argument("--cuts", type=int, default=8)
    ap.add_argument("--thresholds", default="0")
    ap.add_argument("--tag", default="streams")
    args = ap.parse_args()
    from deltacnn.tasks.yolov8 import YOLOv8Task
    task = YOLOv8Task()
    model32 = task.load_model().cuda().eval()
    env = environment()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows, results, t0 = [], [], time.time()
    cuts = [args.cut_at + 3 * i for i in range(args.cuts)]
    for part in args.plan.split(";"):
        size, batches = part.split(":")
        h, w = (int(v) for v in size.split("x"))
        for batch in (int(b) for b in batches.split(",")):
            base = load_frames(task, args.frames + 3 * batch, (h, w))
            peers = dense_peers(model32, batch_at(base, 0, batch), ["reduce-overhead"])
            ok = {k: v["ms"] for k, v in peers.items() if "ms" in v}
            best = min(ok, key=ok.get)
            print(f"[{time.time() - t0:5.0f}s] {w}x{h} N={batch} peers {peers}", flush=True)
            group = {"size": f"{w}x{h}", "batch": batch, "peers": peers, "rows": []}
            for i, setting in enumerate(args.thresholds.split(",")):
                whole = args.whole_batch == "all" or (args.whole_batch == "first" and i == 0)
                for per_stream in (True, False) if whole else (True,):
                    try:
                        r = run(model32, base, batch, setting, args.frames, args.warm, per_stream, cuts)
                    except Exception as e:  # noqa: BLE001
                        import traceback
                        traceback.print_exc()
                        r = {"error": f"{type(e).__name__}: {e}"[:200]}
                    r.update(thresholds=setting, per_stream=per_stream)
                    group["rows"].append(r)
                    peer = ok[best]
                    rows.append({"size": f"{w}x{h}", "N": batch, "thr": setting.rsplit("/", 1)[-1][:18],
                                 "per_stream": per_stream, "cudnn+g": ok["cudnn+graph"], "peer": peer,
                                 "peer_is": best.replace("compile:", ""),
                                 "streams_dense": batch * 1000 / (FPS * peer),
                                 "delta_ms": r.get("ms_delta"),
                                 "streams_delta": batch * 1000 / (FPS * r["ms_delta"]) if r.get("ms_delta") else None,
                                 "cut_ms": r.get("ms_cut"), "keyframe_ms": r.get("ms_keyframe"),
                                 "note": r.get("error", "")[:40]})
                    print(f"[{time.time() - t0:5.0f}s] {rows[-1]}", flush=True)
            results.append(group)
            write_json(f"gpu_streams_{args.tag}", {"env": env, "args": vars(args), "groups": results})
            del base
            free_memory()
    print(f"\n{env.get('gpu')} torch {env['torch']} commit {env['commit']}; streams at {FPS:.0f} fps "
          f"= N x 1000 / (30 x ms); cut = median of frames where one stream was reset")
    print_table(rows, ["size", "N", "thr", "per_stream", "cudnn+g", "peer", "peer_is", "streams_dense", "delta_ms",
                       "streams_delta", "cut_ms", "keyframe_ms", "note"])


if __name__ == "__main__":
    main()
