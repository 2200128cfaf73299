"""Why agreement falls between keyframes: per-frame F1 against the frame's age since its keyframe,
which dense detections the delta model loses, and which layers' error grows.

Every configuration (the keys of `benchmarks/noise_options.py`, e.g. ``file=shipped,kf=12``) runs in
lockstep with the dense model on the same frames. Per frame and configuration it records the age since
the last keyframe, F1 / f1_stable against dense, the dense boxes left unmatched (score, area) and the
delta boxes with no dense partner, and per layer with a fused nonlinearity:

- ``err``: mean |E - D| / mean |D| (E the layer's emitted output, D the dense activation): the whole
  error this layer passes on, its own truncation plus what reached it from upstream;
- ``own``: mean |f(A) - E| / mean |D|, the change the layer itself holds back (its truncation residual);
- ``stuck``: the fraction of pixels whose held-back change (max over channels) exceeds half the layer's
  threshold: how much of the map carries a residual near the bound.

    python3 benchmarks/keyframe_drift.py --start 0 --frames 200 --tag s11_calib 'file=shipped' 'file=shipped,kf=12'
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import noise_options as no  # noqa: E402  (configurations, frames, dense references)
from deltacnn.tasks.base import match_boxes  # noqa: E402


def _act_layers(dm) -> list:
    return [l for l in dm.layers.values() if getattr(l, "act_name", None) and getattr(l, "act", None) is not None]


def _dense_acts(model, names: set[str]):
    """Forward hooks that keep the dense outputs of the modules named `names` (SiLU after each conv)."""
    store: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in model.named_modules():
        if n in names:
            hooks.append(m.register_forward_hook(lambda _m, _i, o, n=n: store.__setitem__(n, o.detach())))
    return store, hooks


def _layer_errors(dm, store: dict, tau_abs: dict) -> dict[str, tuple[float, float, float]]:
    out = {}
    for layer in _act_layers(dm):
        d = store.get(layer.act_name)
        bufs = layer._buffers
        acc, emit = bufs.get("state_acc"), bufs.get("state_emitted")
        if d is None or acc is None or emit is None:
            continue
        scale = float(d.abs().mean()) or 1.0
        own = layer.act(acc) - emit
        held = own.abs().amax(1)
        t = tau_abs.get(layer.act_name, 0.0)
        out[layer.act_name] = (float((emit - d).abs().mean()) / scale, float(own.abs().mean()) / scale,
                               float((held > 0.5 * t).float().mean()) if t > 0 else 0.0)
    return out


def _lost(res: dict, ref: dict) -> tuple[list, list]:
    """Dense boxes (score, area) left unmatched, and delta boxes (score, area) with no dense partner."""
    m, _ = match_boxes(res["boxes"], res["scores"], ref["boxes"], 0.5, res["classes"], ref["classes"])
    hit = set(int(j) for j in m[m >= 0])
    area = lambda b: float((b[2] - b[0]) * (b[3] - b[1]))  # noqa: E731
    lost = [(float(ref["scores"][j]), area(ref["boxes"][j])) for j in range(len(ref["boxes"])) if j not in hit]
    extra = [(float(res["scores"][i]), area(res["boxes"][i])) for i in np.flatnonzero(m < 0)]
    return lost, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer errors (a dense pass per frame)")
    ap.add_argument("--tag", default="drift")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from deltacnn.tasks.yolov8 import YOLOv8Task

    task = YOLOv8Task()
    model = task.load_model().eval()
    xs = no.load_frames(args.start, args.frames, task)
    refs = no.dense_results(model, task, xs, args.start)
    dms = [no.build(model, xs[0], no.parse_config(c)) for c in args.configs]
    names = {l.act_name for l in _act_layers(dms[0])}
    store, hooks = ({}, []) if args.no_layers else _dense_acts(model, names)
    taus = [{n: dm.thresholds.get(n) for n in names} for dm in dms]
    rows = [{"config": c, "age": [], "mode": [], "f1": [], "f1_stable": [], "lost": [], "extra": [], "layers": []}
            for c in args.configs]
    since = [0] * len(dms)
    t0 = time.time()
    with torch.no_grad():
        for i, x in enumerate(xs):
            if not args.no_layers:
                model(x)
            for k, dm in enumerate(dms):
                y = dm(x)
                since[k] = 0 if dm.last_mode != "delta" else since[k] + 1
                if i == 0:
                    continue
                r = rows[k]
                res = task.postprocess(y)
                a = task.agreement(res, refs[i])
                lost, extra = _lost(res, refs[i])
                r["age"].append(since[k]), r["mode"].append(dm.last_mode)
                r["f1"].append(a["f1"]), r["f1_stable"].append(a["f1_stable"])
                r["lost"].append(lost), r["extra"].append(extra)
                errs = {} if args.no_layers else _layer_errors(dm, store, taus[k])
                ref = dm.layers["input"]._buffers.get("state_ref")
                if ref is not None:  # the input change the gate holds back (the model computes on ref, not x)
                    errs["input"] = (float((ref - x).abs().mean() / x.abs().mean()), 0.0, 0.0)
                r["layers"].append(errs)
            if i % 25 == 0:
                print(f"frame {args.start + i} [{time.time() - t0:.0f} s]", flush=True)
    for h in hooks:
        h.remove()
    out = Path(__file__).resolve().parent / "results" / f"keyframe_drift_{args.tag}.json"
    out.write_text(json.dumps({"env": no.environment(), "start": args.start, "frames": args.frames, "rows": rows}) + "\n")
    for r in rows:
        report(r)
    print(f"wrote {out}")


def report(r: dict) -> None:
    """F1 by age; lost boxes by score band and size; the layers whose error grows most with age."""
    print(f"\n## {r['config']}: F1 {statistics.fmean(r['f1']):.4f}, f1_stable {statistics.fmean(r['f1_stable']):.4f}")
    ages = sorted(set(r["age"]))
    print("| age | frames | F1 | f1_stable | dense boxes lost / frame | delta extras / frame |")
    print("|---|---|---|---|---|---|")
    for g in ages:
        idx = [i for i, a in enumerate(r["age"]) if a == g]
        print(f"| {g} | {len(idx)} | {statistics.fmean(r['f1'][i] for i in idx):.4f} | "
              f"{statistics.fmean(r['f1_stable'][i] for i in idx):.4f} | "
              f"{statistics.fmean(len(r['lost'][i]) for i in idx):.3f} | {statistics.fmean(len(r['extra'][i]) for i in idx):.3f} |")
    lost = [b for f in r["lost"] for b in f]
    extra = [b for f in r["extra"] for b in f]
    bands = [(0.25, 0.30), (0.30, 0.40), (0.40, 0.60), (0.60, 1.01)]
    sizes = [(0, 32 ** 2), (32 ** 2, 64 ** 2), (64 ** 2, 128 ** 2), (128 ** 2, 1e12)]
    print("lost dense boxes by score: " + ", ".join(f"[{a:.2f},{b:.2f}): {sum(a <= s < b for s, _ in lost)}" for a, b in bands)
          + "; by area: " + ", ".join(f"<{int(b ** .5) if b < 1e11 else 'inf'}^2: {sum(a <= z < b for _, z in lost)}"
                                      for a, b in sizes))
    print("extra delta boxes by score: " + ", ".join(f"[{a:.2f},{b:.2f}): {sum(a <= s < b for s, _ in extra)}"
                                                     for a, b in bands))
    if not r["layers"] or not r["layers"][-1]:
        return
    names = list(r["layers"][-1])
    groups = {"input": ["input"], "model.0-5": [n for n in names if n != "input" and n.split(".")[1] in ("0", "1", "2", "3", "4", "5")],
              "model.6-12": [n for n in names if n != "input" and n.split(".")[1] in ("6", "7", "8", "9", "12")],
              "model.15-18": [n for n in names if n != "input" and n.split(".")[1] in ("15", "16", "18")],
              "model.19-22": [n for n in names if n != "input" and n.split(".")[1] in ("19", "21", "22")]}
    print("mean err (own) by age and group")
    print("| age | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for g in sorted(set(r["age"])):
        idx = [i for i, a in enumerate(r["age"]) if a == g and r["layers"][i]]
        if not idx:
            continue
        cells = []
        for ns in groups.values():
            e = statistics.fmean(r["layers"][i][n][0] for i in idx for n in ns if n in r["layers"][i])
            o = statistics.fmean(r["layers"][i][n][1] for i in idx for n in ns if n in r["layers"][i])
            cells.append(f"{e:.4f} ({o:.4f})")
        print(f"| {g} | " + " | ".join(cells) + " |")
    young = [i for i, a in enumerate(r["age"]) if 1 <= a <= 3]
    old = [i for i, a in enumerate(r["age"]) if a >= max(r["age"]) - 3]
    if not young or not old:
        return
    print("| layer | err young (age 1-3) | err old | own young | own old | stuck young | stuck old |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        v = [[statistics.fmean(r["layers"][i][n][j] for i in grp if n in r["layers"][i]) for grp in (young, old)]
             for j in range(3)]
        print(f"| {n} | {v[0][0]:.4f} | {v[0][1]:.4f} | {v[1][0]:.4f} | {v[1][1]:.4f} | {v[2][0]:.3f} | {v[2][1]:.3f} |")


if __name__ == "__main__":
    main()
