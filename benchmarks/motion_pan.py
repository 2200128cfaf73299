"""Synthetic pans and tilts over a large real photo with objects moving on it: multiply-adds and CPU time
of dense inference, plain delta inference and motion-aligned delta inference (deltacnn.motion).

    PYTHONPATH=. python3 benchmarks/motion_pan.py [--frames 16] [--model pannet|resnet18s8] [--speeds 2,4,8] [--auto]
        [--clock cpu|wall]

--clock cpu (default): 1 thread, time.process_time, so that a loaded machine slows every variant alike;
--clock wall: perf_counter at torch's thread count (for a quiet machine).

(set TORCH_EXTENSIONS_DIR to a private folder on a machine where several worktrees build the CPU kernels)

The photo is OpenCV's aloeL.jpg (opencv-doc's sample data); the camera views a 384x512 window of it that
moves by `speed` pixels per frame (diagonally for "tilt"); two textured patches move over the scene. Tau 0
everywhere, so delta outputs equal dense ones (motion multiples of the stride) or are the stated
sub-stride approximation; the max error against dense inference on the camera frames is printed.
Random weights (no downloads): the numbers are about the work, not about detections.
"""
from __future__ import annotations

import argparse
import statistics
import time

import cv2
import torch
import torch.nn.functional as F
from torch import nn

import deltacnn
from deltacnn.motion import MotionDeltaModel

IMAGE = "/usr/share/doc/opencv-doc/examples/data/aloeL.jpg"
PATCH = "/usr/share/doc/opencv-doc/examples/data/baboon.jpg"
H, W = 384, 512


class PanNet(nn.Module):
    """Small detector-like net: total stride 8, receptive-field bound R = 24 px."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, c, 3, 1, 1), nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.c3, self.c4 = nn.Conv2d(2 * c, 2 * c, 3, 1, 1), nn.Conv2d(2 * c, 4 * c, 3, 2, 1)
        self.head = nn.Conv2d(4 * c, 5, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.relu(self.c3(x) + x)
        return self.head(F.relu(self.c4(x)))


def resnet18_s8() -> nn.Module:
    """torchvision ResNet-18 up to layer2 (stride 8, random weights) with a 1x1 head."""
    import torchvision
    r = torchvision.models.resnet18(weights=None)
    return nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, nn.Conv2d(128, 5, 1))


def load(path: str) -> torch.Tensor:
    im = cv2.imread(path)
    if im is None:
        raise SystemExit(f"cannot read {path} (install opencv-doc)")
    return torch.from_numpy(im[:, :, ::-1].copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def clip(speed: int, frames: int, axis: str) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    scene, patch = load(IMAGE), load(PATCH)
    patch = F.interpolate(patch, size=(64, 64), mode="bilinear", align_corners=False)
    out, motion, prev = [], [], None
    for t in range(frames):
        cx = 40 + (speed * t if "pan" in axis else 0)
        cy = 40 + (speed * t if "tilt" in axis else 0)
        s = scene.clone()
        s[:, :, 200 + 3 * t:264 + 3 * t, 300 + 5 * t:364 + 5 * t] = patch  # objects moving in the scene
        s[:, :, 380 - 2 * t:444 - 2 * t, 250:314] = patch.flip(3)
        out.append(s[:, :, cy:cy + H, cx:cx + W].contiguous())
        motion.append((0, 0) if prev is None else (cx - prev[0], cy - prev[1]))
        prev = (cx, cy)
    return out, motion


def run(model_name: str, speeds: list[int], frames: int, auto: bool, clock=time.perf_counter) -> None:
    torch.manual_seed(0)
    net = (PanNet() if model_name == "pannet" else resnet18_s8()).eval()
    ex = torch.zeros(1, 3, H, W)
    print(f"model {model_name}, view {H}x{W}, {frames} frames, tau 0, backend cpu, threads {torch.get_num_threads()}")
    print(f"{'motion':>14s} {'variant':>10s} {'MACs/dense':>10s} {'ms/frame':>9s} {'ms mean':>8s} {'recomp':>7s} "
          f"{'max err':>9s}")
    for axis, speed in [("static", 0)] + [(a, v) for a in ("pan", "tilt+pan") for v in speeds]:
        frames_, motion = clip(speed, frames, axis)
        plain = deltacnn.convert(net, ex, backend="cpu")
        mm = MotionDeltaModel(deltacnn.convert(net, ex, backend="cpu"),
                              motion="auto" if auto else torch.tensor(motion, dtype=torch.float64))
        variants = {"dense": None, "delta": plain, "aligned": mm}
        macs = {k: [] for k in variants}
        times = {k: [] for k in variants}
        err = {k: 0.0 for k in variants}
        recomp = []
        with torch.no_grad():
            dense_macs = None
            for rec in (True, False):  # pass 1 counts multiply-adds (stats on), pass 2 times (stats off)
                for m in (plain, mm.dm):
                    m.enable_stats(rec)
                plain.reset()
                mm.reset()
                for t, x in enumerate(frames_):
                    for name, m in variants.items():
                        t0 = clock()
                        y = net(x) if m is None else m(x)
                        dt = clock() - t0
                        if t == 0:
                            if rec and name == "delta":
                                dense_macs = plain.frame_stats().dense_macs  # a keyframe: the dense work
                            continue
                        if rec:
                            ref = net(x)
                            err[name] = max(err[name], float((y - ref).abs().max()))
                            if name == "delta":
                                st = plain.frame_stats()
                                macs[name].append(st.macs if plain.last_mode != "dense" else None)
                            elif name == "aligned":
                                st = mm.dm.frame_stats()
                                macs[name].append(st.macs + mm.aligner.recompute_macs
                                                  if mm.dm.last_mode != "dense" else None)
                                recomp.append(mm.aligner.recomputed_pixels / (H * W))
                        else:
                            times[name].append(dt * 1e3)
        if axis == "static":
            geo = mm.aligner.geo
            print(f"{'':>14s} total stride S = {geo.total_stride}, receptive-field bound R = {geo.halo} px")
        label = f"{axis} {speed}px"
        for name in variants:
            if name == "dense":
                frac = 1.0
            else:
                vals = [dense_macs if v is None else v for v in macs[name]]  # dense frames: a dense frame's work
                frac = sum(vals) / (len(vals) * dense_macs)
            rc = f"{statistics.mean(recomp):7.1%}" if name == "aligned" else ""
            print(f"{label:>14s} {name:>10s} {frac:10.1%} {statistics.median(times[name]):9.1f} "
                  f"{statistics.mean(times[name]):8.1f} {rc:>7s} "
                  f"{err[name]:9.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--model", choices=("pannet", "resnet18s8"), default="pannet")
    ap.add_argument("--speeds", default="2,4,8")
    ap.add_argument("--auto", action="store_true", help="estimate the motion (phase correlation) instead of giving it")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    a = ap.parse_args()
    if a.clock == "cpu":
        torch.set_num_threads(1)
    run(a.model, [int(s) for s in a.speeds.split(",")], a.frames, a.auto,
        time.process_time if a.clock == "cpu" else time.perf_counter)


if __name__ == "__main__":
    main()
