"""GPU: deltacnn versus cuDNN on the DESIGN.md workload, all in one process (one device call).

ResNet-50 stem + 3 stages at 1920x1080 and the ResNet-18 layout at 1280x720, batch 1 and 8
(independent streams: the same clip at 8 different time offsets), static clips with about
100/25/10/5/1 % changed pixels, and the real clip (CenterFace on OpenCV's vtest.avi, batch 1)
when its files are found. Implementations: cuDNN fp16 channels_last eager and replayed
from a CUDA graph, deltacnn (Triton backend, eager and deltacnn.compile) in fp16/bf16, and the
reference backend. Prints median ms per frame, speedup over cuDNN fp16 + graph, update rates
and relative error versus dense float32 (no TF32); writes JSON to $OUT (or benchmarks/results).

    python3 benchmarks/gpu_bench.py [--models r50,r18] [--batches 1,8] [--densities 100%,5%]
                                    [--real-frames 40] [--no-eager] [--no-reference]

`deltacnn + graph` is deltacnn.compile with its default dense dispatch (frames after one whose
input changed more than 35% run densely); at 100% a `/no-dispatch` row shows the sparse kernels.
"""
from __future__ import annotations

import argparse
import gc
import copy
import math
import time
import traceback

import torch

import deltacnn
from common import environment, median, print_table, workload, write_json

DENSITIES = {"100%": 1.0, "25%": 0.25, "10%": 0.10, "5%": 0.05, "1%": 0.01}
SIZES = {"r50": (1080, 1920), "r18": (720, 1280)}


def square_frac(p: float) -> float:
    """make_clip's square side (fraction of min(H, W)) that changes about p of a 16:9 frame."""
    return 1.0 if p >= 1 else math.sqrt(p / (9 / 16))


def make_batch_clip(p: float, frames: int, batch: int, h: int, w: int) -> torch.Tensor:
    """(T, N, 3, H, W) on the GPU: stream k sees the clip k*3 frames later (independent motion)."""
    base = workload.make_clip(square_frac(p), frames + 3 * (batch - 1), h, w).cuda()
    return torch.stack([base[3 * k:3 * k + frames] for k in range(batch)], 1)


def cuda_ms(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def time_sequence(step, frames: int, warm: int) -> list[float]:
    """Per-frame ms of step(t) over t = 0..frames-1 (state advances), keeping frames >= warm."""
    ms = []
    for t in range(frames):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(t)
        b.record()
        b.synchronize()
        if t >= warm:
            ms.append(a.elapsed_time(b))
    return ms


def dense_runs(model32, clip, res: dict) -> dict:
    """cuDNN fp16 channels_last eager and CUDA graph; fp32 (no TF32) reference outputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        truth = [model32(clip[t]) for t in range(clip.shape[0])]
        m16 = copy.deepcopy(model32).half().to(memory_format=torch.channels_last)
        frames16 = [clip[t].half().contiguous(memory_format=torch.channels_last) for t in range(clip.shape[0])]
        for _ in range(3):
            m16(frames16[0])
        eager = cuda_ms(lambda: m16(frames16[1]), 20)
        static = frames16[0].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                m16(static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            m16(static)
        graph = cuda_ms(g.replay, 30)
        err16 = max(rel(m16(frames16[t]), truth[t]) for t in range(clip.shape[0]))
    res["cudnn_fp16_eager_ms"] = median(eager)
    res["cudnn_fp16_graph_ms"] = median(graph)
    res["cudnn_fp16_err"] = err16
    return {"truth": truth}


def free_memory() -> None:
    """Delta models hold float32 state for every layer (GBs at batch 8, 1080p): drop them now."""
    gc.collect()
    torch.cuda.empty_cache()


def rel(a, b) -> float:
    """Relative L2 error; tuples of outputs (multi-head models) count as one concatenated vector."""
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    num = sum(float((x.float() - y.float()).norm()) ** 2 for x, y in zip(a, b))
    den = sum(float(y.float().norm()) ** 2 for y in b)
    return math.sqrt(num / den)


def delta_run(model32, clip, truth, dtype, backend: str, graphed: bool, frames: int, warm: int,
              stats: bool = True, dispatch: bool = True, thresholds_file: str | None = None) -> dict:
    dm = deltacnn.convert(model32, clip[0], dtype=dtype, backend=backend, thresholds_file=thresholds_file)
    runner = (deltacnn.compile(dm) if dispatch else deltacnn.compile(dm, dense_above=None)) if graphed else dm
    errs = []

    def step(t: int) -> None:
        out = runner(clip[t])
        errs.append((t, out))

    ms = time_sequence(step, frames, warm)
    err = max(rel(o, truth[t]) for t, o in errs[1:])
    modes = dict(runner.frames) if graphed else None
    runner = dm = None  # noqa: F841 - drop the state before the next variant
    errs.clear()
    free_memory()
    if not stats:
        return {"ms": median(ms), "max_rel_err": err, "frames": modes}
    # statistics in a separate, untimed pass of delta frames only (they read counters on the host)
    dm2 = deltacnn.convert(model32, clip[0], dtype=dtype, backend=backend, thresholds_file=thresholds_file,
                           dense_above=None)
    dm2.enable_stats()
    rates = {}
    macs = []
    for t in range(frames):
        dm2(clip[t])
        if t >= warm:
            s = dm2.frame_stats()
            macs.append(s.macs_fraction)
            for k, v in s.layers.items():
                rates.setdefault(k, []).append(v.update_rate)
    del dm2
    free_memory()
    return {"ms": median(ms), "max_rel_err": err, "macs_fraction": sum(macs) / max(1, len(macs)),
            "update_rate": {k: sum(v) / len(v) for k, v in rates.items()}, "frames": modes}


def real_clip(frames: int) -> tuple[torch.nn.Module, torch.Tensor, str | None] | None:
    """CenterFace and the first `frames` frames of vtest.avi as (T, 1, 3, H, W), or None if absent."""
    from deltacnn import pretrained
    try:
        task = pretrained.get_task("centerface")
        model = task.load_model().cuda()
        clip = torch.stack([task.preprocess(f) for f in pretrained.read_frames(max_frames=frames)]).cuda()
    except (FileNotFoundError, ImportError, OSError) as e:
        print(f"real clip skipped: {e}")
        return None
    tuned = task.default_thresholds
    return model, clip, str(tuned) if tuned is not None else None


def bench_variants(mname: str, model32, clip, res: dict, impls, args, dtype, rows: list,
                   thresholds_file: str | None = None) -> None:
    """Time each (key, backend, graphed, dispatch) variant against the dense runs in `res`."""
    dense = dense_runs(model32, clip, res)
    for key, backend, graphed, dispatch in impls:
        try:
            r = delta_run(model32, clip, dense["truth"], dtype, backend, graphed, clip.shape[0], args.warm,
                          stats=not (backend == "triton" and not graphed), dispatch=dispatch,
                          thresholds_file=thresholds_file)
        except Exception as e:  # noqa: BLE001 - report and continue with the other variants
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"}
        res[key] = r
        row = {"model": mname, "N": clip.shape[1], "changed": f"{res['changed']:.1%}", "impl": key,
               "ms": r.get("ms"), "cudnn16": res["cudnn_fp16_eager_ms"], "cudnn16+graph": res["cudnn_fp16_graph_ms"],
               "speedup_vs_graph": (res["cudnn_fp16_graph_ms"] / r["ms"]) if "ms" in r else None,
               "macs": r.get("macs_fraction"), "err": r.get("max_rel_err"),
               "dense_frames": (r.get("frames") or {}).get("dense"), "note": r.get("error", "")[:60]}
        rows.append(row)
        print("  " + "  ".join(f"{k}={row[k] if not isinstance(row[k], float) else f'{row[k]:.3g}'}"
                               for k in row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="r50,r18")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--densities", default=",".join(DENSITIES))
    ap.add_argument("--frames", type=int, default=14)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (several runs in one call)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="delta compute dtype (float32 runs without TF32, to check exactness)")
    ap.add_argument("--reference-batch1-only", action="store_true", default=True)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (ungraphed) Triton runs")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference backend runs")
    ap.add_argument("--real-frames", type=int, default=40, help="frames of the real clip (0: skip it)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    dtype = getattr(torch, args.dtype)
    ok, why = deltacnn.backends.triton_available()
    rows, results = [], []
    t_start = time.time()
    for mname in [m for m in args.models.split(",") if m]:
        h, w = SIZES[mname]
        model32 = workload.backbone(mname).cuda()
        for batch in (int(b) for b in args.batches.split(",")):
            for dname in args.densities.split(","):
                p = DENSITIES[dname]
                clip = make_batch_clip(p, args.frames, batch, h, w)
                changed = float(((clip[1:] - clip[:-1]).abs().amax(2) > 0).float().mean())
                res = {"model": mname, "size": f"{w}x{h}", "batch": batch, "density": dname, "changed": changed}
                impls = []
                if ok:
                    impls.append(("triton+graph", "triton", True, True))
                    if p >= 1:
                        impls.append(("triton+graph/no-dispatch", "triton", True, False))
                    if not args.no_eager:
                        impls.append(("triton", "triton", False, True))
                if not args.no_reference and (batch == 1 or not args.reference_batch1_only):
                    impls.append(("reference", "reference", False, True))
                bench_variants(mname, model32, clip, res, impls, args, dtype, rows)
                results.append(res)
                del clip
                free_memory()
                print(f"[{time.time() - t_start:6.0f}s] {mname} N={batch} {dname} done", flush=True)
        del model32
        free_memory()
    if args.real_frames > 0 and ok:
        real = real_clip(args.real_frames)
        if real is not None:
            model32, clip, tuned = real
            changed = float(((clip[1:] - clip[:-1]).abs().amax(2) > 0).float().mean())
            h, w = clip.shape[-2:]
            for label, tfile in (("tau 0", None), ("tuned f1>=0.95", tuned)):
                if label != "tau 0" and tfile is None:
                    continue
                res = {"model": "centerface (vtest.avi)", "size": f"{w}x{h}", "batch": 1, "density": "real",
                       "changed": changed, "thresholds": label}
                impls = [(f"triton+graph {label}", "triton", True, True)]
                if tfile is None:
                    impls.append((f"triton+graph/no-dispatch {label}", "triton", True, False))
                bench_variants("centerface", model32, clip, res, impls, args, dtype, rows, tfile)
                results.append(res)
                free_memory()
            print(f"[{time.time() - t_start:6.0f}s] real clip done", flush=True)
    env = environment()
    env["triton_backend"] = ok or why
    path = write_json("gpu_bench" + (f"_{args.tag}" if args.tag else ""), {"env": env, "dtype": args.dtype, "results": results})
    print(f"\n{env.get('gpu')} torch {env['torch']} commit {env['commit']} dtype {args.dtype}; wrote {path}")
    print_table(rows, ["model", "N", "changed", "impl", "ms", "cudnn16", "cudnn16+graph", "speedup_vs_graph", "macs",
                       "err", "dense_frames", "note"])


if __name__ == "__main__":
    main()


def steady_macs(dm, clip, warm: int) -> float:
    """Mean fraction of the dense multiply-adds a converted model does over clip[warm:] (stats on)."""
    dm.enable_stats()
    macs = []
    for t in range(clip.shape[0]):
        dm(clip[t])
        if t >= warm:
            macs.append(dm.frame_stats().macs_fraction)
    return sum(macs) / len(macs)
