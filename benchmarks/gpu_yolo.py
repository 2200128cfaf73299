"""GPU: YOLOv8n on a real clip (vtest.avi), deltacnn against the strongest dense peers, one process.

Every frame of the clip (795 for vtest.avi) at batch 1 and as B streams (stream k sees the clip 3k
frames later, wrapping around at the end: each stream then has one scene cut of its own, which
deltacnn.compile's per-stream passes handle in that stream alone). Peers as in gpu_peers.py (cuDNN
eager and + CUDA graph, torch.compile reduce-overhead, max-autotune for the batches in --autotune,
its compile time reported); deltacnn.compile in fp16 at each threshold setting of --thresholds
(a number: one absolute threshold everywhere; a path: a thresholds file such as `deltacnn tune`
writes). Each row: ms per frame as the median over delta frames (every stream ran deltas) and as
the mean over all frames (keyframes, dense and mixed frames included; frames that captured a CUDA
graph left out), MACs done on delta frames and over all frames, the ideal (MACs x the strongest
peer) and time / ideal, speedup, and task agreement against the dense fp32 model on frames
--eval-from.. (F1 at IoU 0.5, same class, conf >= 0.25; ``f1_stable`` leaves out the borderline
objects, see YOLOv8Task.agreement).

    DELTACNN_CLIP=vtest.avi DELTACNN_YOLOV8_PT=yolov8n.pt python3 benchmarks/gpu_yolo.py [--batches 1,16]
        [--frames 0 (all)] [--eval-from 200] [--thresholds 0,path.json] [--autotune 1] [--tag yolo]
"""
from __future__ import annotations

import argparse
import ast
import re
import time

import numpy as np
import torch

import deltacnn
from common import environment, median, print_table, write_json
from gpu_bench import free_memory
from gpu_peers import dense_peers, torch_report

OFFSET = 3  # frames between consecutive streams
DELTA_ONLY = 10 ** 9  # a keyframe interval that never comes: profiles of delta frames alone


def load_frames(task, frames: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(T, 3, H, W) float32 on the GPU, the clip's first `frames` frames (0: all), optionally resized
    (bilinear) to size = (H, W)."""
    from deltacnn import clips
    raw = [task.preprocess(f) for f in clips.read_frames(max_frames=frames or None)]
    base = torch.cat(raw).cuda()
    if size is not None and tuple(base.shape[-2:]) != size:
        base = torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)
    return base.contiguous()


def batch_at(base: torch.Tensor, t: int, batch: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W): stream k at clip frame (t + OFFSET k) mod T."""
    idx = (t + OFFSET * torch.arange(batch, device=base.device)) % base.shape[0]
    return torch.index_select(base, 0, idx, out=out) if out is not None else base.index_select(0, idx)


def detections(task, out, hw: tuple[int, int]) -> list[dict]:
    """Per-stream detections of one batched model output (one device-to-host copy)."""
    y = out[0] if isinstance(out, (tuple, list)) else out
    y = y.float().cpu()
    return [task.postprocess(y[b:b + 1], hw) for b in range(y.shape[0])]


def agreement(task, got: dict[int, list[dict]], truth: dict[int, list[dict]]) -> dict:
    f1, stable = [], []
    for t, dets in got.items():
        for a_, b_ in zip(dets, truth[t]):
            a = task.agreement(a_, b_)
            f1.append(a["f1"])
            stable.append(a["f1_stable"])
    return {"f1_mean": float(np.mean(f1)), "f1_min": float(np.min(f1)), "f1_stable_mean": float(np.mean(stable)),
            "f1_stable_min": float(np.min(stable)), "f1_frames": len(f1)}


def convert(model32, x0, setting: str, **kw):
    """deltacnn.convert fp16 Triton with one threshold setting (a number, or a thresholds file)."""
    try:
        tau = float(setting)
        return deltacnn.convert(model32, x0, threshold=tau, dtype=torch.float16, backend="triton", **kw)
    except ValueError:
        return deltacnn.convert(model32, x0, thresholds_file=setting, dtype=torch.float16, backend="triton", **kw)


def run_delta(task, model32, base, batch: int, setting: str, warm: int, eval_from: int, hw,
              dense_compile: str | None = "inductor") -> dict:
    """Time deltacnn.compile over every frame; detections on frames >= eval_from."""
    x = batch_at(base, 0, batch)
    dm = convert(model32, x, setting)
    g = deltacnn.compile(dm, dense_compile=dense_compile)
    ms, kinds, got = [], [], {}
    for t in range(base.shape[0]):
        batch_at(base, t, batch, out=x)
        n_graphs, n_compiled = len(g._graphs), len(g.dense.compile_s) if g.dense is not None else 0
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        o = g(x)
        b.record()
        b.synchronize()
        kind = g.last_modes
        # frames that captured a graph or compiled a dense pass are left out of the times
        compiled = g.dense is not None and len(g.dense.compile_s) != n_compiled
        if t >= warm and len(g._graphs) == n_graphs and not compiled:
            ms.append(a.elapsed_time(b))
            kinds.append("delta" if set(kind) == {"delta"} else ("mixed" if len(set(kind)) > 1 else kind[0]))
        if t >= eval_from:
            got[t] = detections(task, o, hw)
    delta_ms = [m for m, k in zip(ms, kinds) if k == "delta"]
    res = {"ms_delta": median(delta_ms), "ms_all": float(np.mean(ms)), "n_timed": len(ms),
           "n_delta": len(delta_ms), "frames": dict(g.frames), "stream_frames": dict(g.stream_frames),
           "captures": len(g._graphs), "got": got}
    for kind in ("keyframe", "dense", "mixed"):
        res[f"ms_{kind}"] = median([m for m, k in zip(ms, kinds) if k == kind])
    # what the input layer and the refresh rule ran with (the thresholds file's min_blob / refresh_held)
    res["gate"] = dm.layers["input"].gate.describe() if "input" in dm.layers else "?"
    res["refresh_held"] = dm.rt.refresh_held
    if g.dense is not None:
        res["dense_compile_s"] = {"/".join(map(str, k[:2])): round(v, 1) for k, v in g.dense.compile_s.items()}
        res["dense_failed"] = {str(k): v for k, v in g.dense.failed.items()}
    del g, dm
    free_memory()
    return res


def delta_macs(model32, base, batch: int, setting: str, start: int, frames: int) -> float:
    """Mean fraction of the dense multiply-adds of delta frames (eager, statistics on, no dense
    dispatch), over the delta frames among `frames` frames after a keyframe at `start` - 5 (the file's
    keyframes left out: until session 20 they were averaged in, so macs_d read ~0.24 where delta frames do
    ~0.10-0.13)."""
    x = batch_at(base, start - 5, batch)
    dm = convert(model32, x, setting, dense_above=None)
    dm.enable_stats()
    macs = []
    for t in range(start - 5, min(start + frames, base.shape[0])):
        dm(batch_at(base, t, batch))
        if t >= start and dm.last_mode == "delta":
            macs.append(dm.frame_stats().macs_fraction)
    del dm
    free_memory()
    return float(np.mean(macs))


def profile(model32, base, batch: int, setting: str, start: int = 300, frames: int = 12) -> str:
    """Per-kernel and per-conv GPU time of eager delta frames (profile_frame's tables), then the per-kernel
    time of the same frames replayed by deltacnn.compile next to their replayed time per frame. The thresholds
    file's keyframe schedule is off here, so that every profiled frame is a delta frame."""
    from profile_frame import conv_layer_profile, kernel_profile, print_profile, replay_profile
    import contextlib
    import io
    clip = torch.stack([batch_at(base, t, batch) for t in range(start, start + frames)])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dm = convert(model32, clip[0], setting, dense_above=None, keyframe_interval=DELTA_ONLY)
        total, rows = kernel_profile(dm, clip, warm=4)
        print_profile(f"profile yolov8n N={batch} {setting}", total, rows, top=20)
        del dm
        dm = convert(model32, clip[0], setting, dense_above=None, keyframe_interval=DELTA_ONLY)
        layers = conv_layer_profile(dm, clip, warm=4)
        for r in layers:
            r["macs"] = r["macs"] / 1e9 if r["macs"] is not None else None
        if not layers:
            print("no conv kernel of a known name in the profile (profile_frame.CONV_KERNELS)")
        print_table(layers, ["layer", "conv", "in_hw", "out_rate", "macs", "tiles_us", "conv_us", "nonlinear_us"])
        del dm
        dm = convert(model32, clip[0], setting, keyframe_interval=DELTA_ONLY)
        runner = deltacnn.compile(dm, dense_above=None, dense_compile=None)
        wall, total, rows = replay_profile(runner, clip, warm=4)
        print_profile(f"profile yolov8n N={batch} {setting} (graph replay {wall:.3f} ms per frame, "
                      f"{wall - total:.3f} ms of it between kernels)", total, rows, top=25)
        del runner, dm
    free_memory()
    return buf.getvalue()


def split_settings(setting: str) -> list[str]:
    """'A=1,B=(1,256)' -> ['A=1', 'B=(1,256)']: a comma starts a new setting only before 'NAME='."""
    return re.split(r",(?=\s*[A-Za-z_][\w.]*=)", setting)


def set_conv_setting(setting: str | None):
    """Set triton_kernels.conv.NAME (for 'backend.NAME' the TritonBackend class's switch NAME, for 'common.NAME'
    triton_kernels._common's setting NAME, e.g. PDL) to VALUE for
    each 'NAME=VALUE' of a comma-separated list (None: nothing); returns what restores them. A conversion made
    after this picks its kernel configs under the settings (default_config reads them per layer)."""
    from deltacnn.backends.triton_backend import TritonBackend
    from deltacnn.backends.triton_kernels import _common, conv
    if not setting:
        return lambda: None
    olds = {}
    for item in split_settings(setting):
        name, value = item.split("=", 1)
        owner, attr = (TritonBackend, name[len("backend."):]) if name.startswith("backend.") else \
            (_common, name[len("common."):]) if name.startswith("common.") else (conv, name)
        if not hasattr(owner, attr):
            raise SystemExit(f"--conv-ab: {owner.__name__} has no setting {attr!r}")
        olds.setdefault((owner, attr), getattr(owner, attr))
        setattr(owner, attr, ast.literal_eval(value))

    def restore() -> None:
        for (owner, attr), value in olds.items():
            setattr(owner, attr, value)
    return restore


def conv_variants(conv_ab: str) -> list[str | None]:
    """--conv-ab's variants after the default (None)."""
    return [None] + [v for v in conv_ab.split(";") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--frames", type=int, default=0, help="clip frames to use (0: all)")
    ap.add_argument("--eval-from", type=int, default=200, help="first frame of the agreement")
    ap.add_argument("--warm", type=int, default=6)
    ap.add_argument("--macs-frames", type=int, default=150, help="delta frames of the statistics pass")
    ap.add_argument("--thresholds", default="0", help="comma-separated: numbers or thresholds files")
    ap.add_argument("--autotune", default="1", help="batch sizes that also get torch.compile max-autotune")
    ap.add_argument("--profile", default="", help="batch:threshold setting profiled per kernel (eager delta frames "
                    "from frame 300), e.g. 1:path.json")
    ap.add_argument("--dense-compile", default="inductor", help="comma-separated deltacnn.compile dense_compile "
                    "variants, each timed at every threshold setting ('none': cuDNN + seeding)")
    ap.add_argument("--cat-off", default="", help="batch sizes whose settings are also timed with the delta cats on "
                    "PyTorch (TritonBackend.cat patched to the sync-free backend's PyTorch form: the A/B of sparse_cat)")
    ap.add_argument("--s11-form", default="", help="batch sizes whose settings are also timed with the per-stream "
                    "report in PyTorch ops (gpu_peers.torch_report), as in session 11")
    ap.add_argument("--s11-first", action="store_true", help="time the --s11-form variant first (order A/B)")
    ap.add_argument("--conv-ab", default="", help="NAME=VALUE[,NAME=VALUE...][;...]: every setting also timed with "
                    "triton_kernels.conv.NAME set to VALUE (a Python literal; backend.NAME: the TritonBackend class's "
                    "switch), after the default, one variant per ';'-separated group (the A/B of conv-config "
                    "settings, e.g. LATENCY_BOUND_ITEMS=None or backend.fuse_blobs=False); with "
                    "--profile each variant is profiled too")
    ap.add_argument("--profile-variants", choices=["all", "default"], default="all",
                    help="with --conv-ab and --profile: profile every variant (all) or the default setting only "
                    "(each profile takes ~50 s of device time; the timings come first either way)")
    ap.add_argument("--peers-only", action="store_true", help="time the dense peers only (e.g. max-autotune in "
                    "a process of its own under a time limit)")
    ap.add_argument("--tag", default="yolo")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    from deltacnn.tasks.yolov8 import YOLOv8Task
    task = YOLOv8Task()
    model32 = task.load_model().cuda().eval()
    env = environment()
    base = load_frames(task, args.frames)
    T, hw = base.shape[0], tuple(base.shape[-2:])
    rows, results, t0 = [], [], time.time()
    for batch in (int(b) for b in args.batches.split(",")):
        changed = float(((base[1:] - base[:-1]).abs().amax(1) > 0).float().mean())
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        truth = {}
        with torch.no_grad():
            for t in range(args.eval_from, T if not args.peers_only else 0):
                truth[t] = detections(task, model32(batch_at(base, t, batch)), hw)
        modes = ["reduce-overhead"] + (["max-autotune"] if str(batch) in args.autotune.split(",") else [])
        peers = dense_peers(model32, batch_at(base, 0, batch), modes)
        ok = {k: v["ms"] for k, v in peers.items() if "ms" in v}
        best = min(ok, key=ok.get)
        print(f"[{time.time() - t0:5.0f}s] N={batch} {hw} T={T} changed {changed:.1%} peers {peers}; strongest {best}",
              flush=True)
        group = {"batch": batch, "size": f"{hw[1]}x{hw[0]}", "frames": T, "changed": changed, "peers": peers,
                 "strongest": best, "rows": []}
        cat_ab = [True, False] if str(batch) in args.cat_off.split(",") else [True]
        kernel_report = [True, False] if str(batch) in args.s11_form.split(",") else [True]
        if args.s11_first:
            kernel_report.reverse()
        conv_ab = conv_variants(args.conv_ab)
        variants = [] if args.peers_only else [(s_, dc, fc, sk, ca) for s_ in args.thresholds.split(",")
                                               for dc in args.dense_compile.split(",") for fc in cat_ab
                                               for sk in kernel_report for ca in conv_ab]
        from deltacnn.backends.syncfree import SyncFreeBackend
        from deltacnn.backends.triton_backend import TritonBackend
        fused_cat = TritonBackend.cat
        macs_cache: dict[str, float] = {}
        for setting, dc, fuse_cat, kreport, conv_setting in variants:
            TritonBackend.cat = fused_cat if fuse_cat else SyncFreeBackend.cat  # this benchmark's A/B only
            torch_report(not kreport)
            restore_conv = set_conv_setting(conv_setting)
            try:
                r = run_delta(task, model32, base, batch, setting, args.warm, args.eval_from, hw,
                              None if dc == "none" else dc)
                r.update(agreement(task, r.pop("got"), truth))
                if setting not in macs_cache:  # the same frames and thresholds: one statistics pass per setting
                    macs_cache[setting] = delta_macs(model32, base, batch, setting, args.eval_from, args.macs_frames)
                r["macs_delta"] = macs_cache[setting]
                sf = r["stream_frames"]
                live = sum(v for k, v in sf.items() if k != "idle")
                # keyframes and dense frames do a dense frame's work (or more)
                r["macs_all"] = (sf["delta"] * r["macs_delta"] + live - sf["delta"]) / live
            except Exception as e:  # noqa: BLE001 - report and go on
                import traceback
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}"[:200]}
            TritonBackend.cat = fused_cat
            torch_report(False)
            restore_conv()
            r["thresholds"], r["dense_compile"], r["fuse_cat"], r["kernel_report"] = setting, dc, fuse_cat, kreport
            if not fuse_cat:
                dc = f"{dc}/cat_off"
            if not kreport:
                dc = f"{dc}/s11_form"
            if conv_setting:
                r["conv_setting"] = conv_setting
                dc = f"{dc}/{conv_setting}"
            group["rows"].append(r)
            peer = ok[best]
            row = {"N": batch, "thr": setting.rsplit("/", 1)[-1][:18], "dc": dc, "cudnn+g": ok["cudnn+graph"], "peer": peer,
                   "peer_is": best.replace("compile:", ""), "ms_delta": r.get("ms_delta"), "ms_all": r.get("ms_all"),
                   "macs_d": r.get("macs_delta"), "macs_all": r.get("macs_all"),
                   "ideal": r["macs_delta"] * peer if r.get("macs_delta") else None,
                   "x_ideal": r["ms_delta"] / (r["macs_delta"] * peer) if r.get("macs_delta") else None,
                   "vs_peer_d": peer / r["ms_delta"] if r.get("ms_delta") else None,
                   "vs_peer_all": peer / r["ms_all"] if r.get("ms_all") else None,
                   "f1": r.get("f1_mean"), "f1_min": r.get("f1_min"), "f1_stab": r.get("f1_stable_mean"),
                   "modes": "/".join(f"{r['frames'][k]}" for k in ("delta", "keyframe", "dense", "mixed"))
                   if "frames" in r else "", "ms_key": r.get("ms_keyframe"), "ms_dense": r.get("ms_dense"),
                   "ms_mixed": r.get("ms_mixed"),
                   "stream_key": r["stream_frames"]["keyframe"] if "stream_frames" in r else None,
                   "note": (r.get("error", "") or ("dense compile FAILED " if r.get("dense_failed") else "")
                            + f"{r.get('gate')} held {r.get('refresh_held')}")[:40]}
            rows.append(row)
            print(f"[{time.time() - t0:5.0f}s] {row}", flush=True)
        results.append(group)
        write_json(f"gpu_yolo_{args.tag}", {"env": env, "args": vars(args), "groups": results})
        del truth
        free_memory()
    if args.profile:
        batch, setting = args.profile.split(":", 1)
        for conv_setting in conv_variants(args.conv_ab if args.profile_variants == "all" else ""):
            restore_conv = set_conv_setting(conv_setting)
            try:
                if conv_setting:
                    print(f"profile with {conv_setting}:", flush=True)
                print(profile(model32, base, int(batch), setting), flush=True)
            except Exception:  # noqa: BLE001
                import traceback
                traceback.print_exc()
            restore_conv()
    print(f"\n{env.get('gpu')} torch {env['torch']} commit {env['commit']}; frames {T}, agreement on "
          f"{args.eval_from}..{T - 1}; modes = frames delta/keyframe/dense/mixed")
    for g in results:
        print(f"  N={g['batch']}: " + ", ".join(f"{k} {v['ms']:.3f}" + (f" ({v['compile_s']:.0f} s)" if "compile_s" in v
                                                                      else "") if "ms" in v else f"{k} failed"
                                             for k, v in g["peers"].items()))
    print_table(rows, ["N", "thr", "dc", "cudnn+g", "peer", "peer_is", "ms_delta", "ms_all", "ms_key", "ms_dense",
                       "ms_mixed", "macs_d", "macs_all", "ideal", "x_ideal", "vs_peer_d", "vs_peer_all", "f1", "f1_min",
                       "f1_stab", "modes", "stream_key", "note"])


if __name__ == "__main__":
    main()
