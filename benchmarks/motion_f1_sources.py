"""What limits F1 of motion-aligned YOLOv8n against dense on the camera frames: the measurement that
separates the sources (no delta model involved, dense YOLOv8n only, so F1 here is the ceiling that
any scene-aligned state reaches at tau 0 with exact bands).

For each frame of a 640x448 window over vtest.avi and each sub-stride residual t = (tx, ty), dense
YOLOv8n runs on
  * "scene": the window whose origin is moved by -t in the scene (real content everywhere): only the
    network's shift variance (the stride-8/16/32 grids sit at another phase of the content);
  * "replicate": the camera frame translated by t with replicated borders (what MotionDeltaModel
    feeds the network: deltacnn.motion.translate): shift variance plus the |t| px band of made-up
    border content;
and its boxes, moved back by -t and clipped to the frame, are compared with dense on the camera window
(F1, f1_stable: YOLOv8Task.agreement). t = 0 is 1.0 by construction. Also prints the share of the
multiply-adds at each cumulative stride (which layers a finer alignment grid would have to recompute).

    PYTHONPATH=. python3 benchmarks/motion_f1_sources.py --frames 16 --step 3
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deltacnn.clips import read_frames
from deltacnn.motion import translate
from deltacnn.tasks.yolov8 import YOLOv8Task

VTEST = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"
VIEW_H, VIEW_W = 448, 640
RESULTS = Path(__file__).resolve().parent / "results"


def shifted(result: dict, t: tuple[float, float], hw: tuple[int, int]) -> dict:
    """Boxes of a view whose content sits at camera pixel + t, in camera coordinates (clipped)."""
    out = dict(result)
    h, w = hw
    for k in ("boxes", "low_boxes"):
        b = result[k].astype(np.float64) - np.array([t[0], t[1], t[0], t[1]])
        b[:, 0::2] = b[:, 0::2].clip(0, w)
        b[:, 1::2] = b[:, 1::2].clip(0, h)
        out[k] = b.astype(np.float32)
    return out


def macs_by_stride(net: nn.Module, x: torch.Tensor) -> dict[int, float]:
    """Share of the dense multiply-adds done by convolutions at each output stride."""
    acc: dict[int, int] = {}

    def hook(mod, args, out):
        s = x.shape[2] // out.shape[2]
        k = mod.kernel_size[0] * mod.kernel_size[1]
        macs = out.shape[2] * out.shape[3] * out.shape[1] * (mod.in_channels // mod.groups) * k
        acc[s] = acc.get(s, 0) + macs

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(x)
    for h in hs:
        h.remove()
    tot = sum(acc.values())
    return {s: acc[s] / tot for s in sorted(acc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--step", type=int, default=3, help="vtest frames between samples")
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--shifts", default="1:0,2:0,4:0,8:0,12:0,16:0,0:4,0:8,0:16,4:4,8:8,16:16")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = YOLOv8Task()
    net = task.load_model()
    scene = list(read_frames(VTEST, max_frames=a.frames * a.step, start=a.start))[::a.step]
    H, W = scene[0].shape[:2]
    ox, oy = (W - VIEW_W) // 2, (H - VIEW_H) // 2
    shifts = [tuple(int(v) for v in s.split(":")) for s in a.shifts.split(",")]
    res: dict[str, list] = {f"{v}_{tx}_{ty}": [] for tx, ty in shifts for v in ("scene", "replicate")}
    with torch.no_grad():
        for f in scene:
            cam = f[oy:oy + VIEW_H, ox:ox + VIEW_W]
            x = task.preprocess(cam)
            ref = task.postprocess(net(x))
            for tx, ty in shifts:
                crop = f[oy - ty:oy - ty + VIEW_H, ox - tx:ox - tx + VIEW_W]  # content at camera pixel + t
                r_scene = shifted(task.postprocess(net(task.preprocess(crop))), (tx, ty), (VIEW_H, VIEW_W))
                r_rep = shifted(task.postprocess(net(translate(x, [(tx, ty)], "nearest"))), (tx, ty), (VIEW_H, VIEW_W))
                for v, r in (("scene", r_scene), ("replicate", r_rep)):
                    ag = task.agreement(r, ref)
                    res[f"{v}_{tx}_{ty}"].append((ag["f1"], ag["f1_stable"]))
            print("frame done", flush=True)
    summary = {k: {"f1": statistics.mean(a for a, _ in v), "f1_stable": statistics.mean(b for _, b in v)}
               for k, v in res.items()}
    shares = macs_by_stride(net, task.preprocess(scene[0][oy:oy + VIEW_H, ox:ox + VIEW_W]))
    print(json.dumps({"shift_variance": summary, "macs_share_by_stride": shares}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"motion_f1_sources{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps({"settings": vars(a), "summary": summary, "macs_share_by_stride": shares,
                               "frames": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
