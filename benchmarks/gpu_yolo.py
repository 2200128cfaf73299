"""GPU: YOLOv8n on a real clip (vtest.avi), deltacnn against the strongest dense peers, one process.

Batch 1 and B streams (the clip at offsets of 3 frames each); peers as in gpu_peers.py (cuDNN
eager and + graph, torch.compile reduce-overhead, max-autotune for the batches in --autotune);
deltacnn.compile in fp16 at each tau of --taus. Each row: median ms per frame, MACs done, the ideal
(MACs x the strongest peer), speedup, and task agreement: F1 of the detections (IoU 0.5, same
class) against the dense fp32 model's, mean and worst over streams and frames >= 1, and the same
without borderline objects (``f1_stable``, see YOLOv8Task.agreement).

    DELTACNN_CLIP=vtest.avi DELTACNN_YOLOV8_PT=yolov8n.pt python3 benchmarks/gpu_yolo.py [--batches 1,16]
        [--frames 40] [--taus 0,0.02] [--autotune 1] [--tag yolo]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import deltacnn
from common import environment, median, print_table, write_json
from gpu_bench import free_memory, steady_macs, time_sequence
from gpu_peers import dense_peers


def load_clip(task, frames: int, batch: int) -> torch.Tensor:
    """(T, B, 3, H, W) float32 on the GPU: stream k starts 3k frames into the clip."""
    from deltacnn import clips
    raw = [task.preprocess(f) for f in clips.read_frames(max_frames=frames + 3 * (batch - 1))]
    if len(raw) < frames + 3 * (batch - 1):
        raise ValueError(f"the clip has {len(raw)} frames, {frames + 3 * (batch - 1)} needed")
    base = torch.cat(raw).cuda()
    return torch.stack([base[3 * k:3 * k + frames] for k in range(batch)], 1).contiguous()


def detections(task, out, hw: tuple[int, int]) -> list[dict]:
    """Per-stream detections of one batched model output."""
    y = out[0] if isinstance(out, (tuple, list)) else out
    return [task.postprocess(y[b:b + 1], hw) for b in range(y.shape[0])]


def agreement(task, outs: list, truth: list[list[dict]], hw: tuple[int, int]) -> dict:
    f1, stable = [], []
    for t, out in enumerate(outs):
        if t == 0:
            continue  # the first frame is a dense keyframe
        for got, want in zip(detections(task, out, hw), truth[t]):
            a = task.agreement(got, want)
            f1.append(a["f1"])
            stable.append(a["f1_stable"])
    return {"f1_mean": float(np.mean(f1)), "f1_min": float(np.min(f1)), "f1_stable_mean": float(np.mean(stable)),
            "f1_stable_min": float(np.min(stable))}


def delta_yolo(task, model32, clip: torch.Tensor, tau: float, warm: int, truth, hw) -> dict:
    dm = deltacnn.convert(model32, clip[0], threshold=tau, dtype=torch.float16, backend="triton")
    g = deltacnn.compile(dm)
    outs = []

    def step(t):
        o = g(clip[t])
        outs.append(o.clone() if isinstance(o, torch.Tensor) else o)
    ms = time_sequence(step, clip.shape[0], warm)
    agree = agreement(task, outs, truth, hw)
    frames = dict(g.frames)
    del g, dm, outs
    free_memory()
    dm = deltacnn.convert(model32, clip[0], threshold=tau, dtype=torch.float16, backend="triton", dense_above=None)
    macs = steady_macs(dm, clip, warm)
    del dm
    free_memory()
    return {"ms": median(ms), "macs": macs, "frames": frames, **agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--taus", default="0,0.02")
    ap.add_argument("--autotune", default="1", help="batch sizes that also get torch.compile max-autotune")
    ap.add_argument("--tag", default="yolo")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    from deltacnn.tasks.yolov8 import YOLOv8Task
    task = YOLOv8Task()
    model32 = task.load_model().cuda().eval()
    env = environment()
    rows, results, t0 = [], [], time.time()
    for batch in (int(b) for b in args.batches.split(",")):
        clip = load_clip(task, args.frames, batch)
        hw = tuple(clip.shape[-2:])
        changed = float(((clip[1:] - clip[:-1]).abs().amax(2) > 0).float().mean())
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            truth = [detections(task, model32(clip[t]), hw) for t in range(clip.shape[0])]
        modes = ["reduce-overhead"] + (["max-autotune"] if str(batch) in args.autotune.split(",") else [])
        peers = dense_peers(model32, clip[0], modes)
        ok = {k: v["ms"] for k, v in peers.items() if "ms" in v}
        best = min(ok, key=ok.get)
        print(f"[{time.time() - t0:5.0f}s] N={batch} {hw} changed {changed:.1%} peers {peers}; strongest {best}",
              flush=True)
        group = {"batch": batch, "size": f"{hw[1]}x{hw[0]}", "changed": changed, "peers": peers, "strongest": best,
                 "rows": []}
        for tau in (float(t) for t in args.taus.split(",")):
            try:
                r = delta_yolo(task, model32, clip, tau, args.warm, truth, hw)
            except Exception as e:  # noqa: BLE001 - report and go on
                import traceback
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}"[:200]}
            r["tau"] = tau
            group["rows"].append(r)
            row = {"N": batch, "tau": tau, "changed": f"{changed:.1%}", "cudnn+g": ok["cudnn+graph"], "peer": ok[best],
                   "peer_is": best.replace("compile:", ""), "deltacnn": r.get("ms"), "macs": r.get("macs"),
                   "x_ideal": r["ms"] / (r["macs"] * ok[best]) if r.get("macs") else None,
                   "vs_peer": ok[best] / r["ms"] if "ms" in r else None,
                   "f1": r.get("f1_mean"), "f1_min": r.get("f1_min"), "f1_stable": r.get("f1_stable_mean"),
                   "dense_fr": (r.get("frames") or {}).get("dense"), "note": r.get("error", "")[:40]}
            rows.append(row)
            print(f"[{time.time() - t0:5.0f}s] {row}", flush=True)
        results.append(group)
        write_json(f"gpu_yolo_{args.tag}", {"env": env, "groups": results})
        del clip, truth
        free_memory()
    print(f"\n{env.get('gpu')} torch {env['torch']} commit {env['commit']}")
    for g in results:
        print(f"  N={g['batch']}: " + ", ".join(f"{k} {v['ms']:.3f}" + (f" ({v['compile_s']:.0f} s)" if "compile_s" in v
                                                                      else "") if "ms" in v else f"{k} failed"
                                             for k, v in g["peers"].items()))
    print_table(rows, ["N", "tau", "changed", "cudnn+g", "peer", "peer_is", "deltacnn", "macs", "x_ideal", "vs_peer",
                       "f1", "f1_min", "f1_stable", "dense_fr", "note"])


if __name__ == "__main__":
    main()
