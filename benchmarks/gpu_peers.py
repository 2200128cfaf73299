"""GPU: deltacnn against the strongest dense peers on harder workloads, all in one process.

Peers (dense, fp16, channels_last, same weights): cuDNN eager, cuDNN replayed from a CUDA graph,
torch.compile(mode="reduce-overhead") (Inductor + CUDA graphs) and torch.compile(mode="max-autotune")
(Inductor with autotuned Triton/cuDNN convs + CUDA graphs). Each compiled peer is compiled once
per shape; its compile time (first call, autotuning included) is reported. max-autotune takes
minutes per shape, so it runs only for the shapes in --autotune (next to reduce-overhead).

Workloads (`shared/bench/workload.py`; batch N = N streams of one clip at different offsets):
  static       nothing changes (the fixed cost of a delta frame)
  sq<p>        make_clip: one textured square moving, about p of the pixels change
  crowd<p>     make_crowd_clip: 24 discs drifting in different directions, p of the area
  crowd<p>t    the same at tau 0.02 (truncation in every nonlinear layer)
  noise<p>     crowd<p> plus sensor noise (std 0.01) filtered by an input threshold of 0.05, tau 0
  noise<p>t    the same with tau 0.02
Each row prints the multiply-adds done (fraction of dense), the ideal time (that fraction x the
strongest peer's time), deltacnn's time over the ideal, and the speedup over the strongest peer.

    python3 benchmarks/gpu_peers.py [--plan r50:1:static,sq5,crowd5;r18:16:sq5] [--autotune r50:1,r18:1]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import traceback

import torch

import deltacnn
from common import environment, median, print_table, workload, write_json
from gpu_bench import SIZES, cuda_ms, free_memory, rel, steady_macs, time_sequence

# deltacnn variants, timed one after the other per workload: module settings of the Triton conv kernels,
# and deltacnn.compile arguments (keys "compile:<argument>")
# and "torch_report": the compiled runner's per-stream report in PyTorch ops instead of its two kernels
VARIANTS = {"default": {}, "tile lists": {"PIXEL_LISTS": False}, "skip": {"compile:skip_static": True},
            "torch report": {"torch_report": True},
            # sessions 1-12's conv grid: 4 programs per SM asked, 2-3 resident (two waves at zero work)
            "4 programs/SM": {"PROGRAMS_PER_SM": 4},
            # sessions 1-18: a tile-list launch before every gathered-GEMM conv, small maps too
            "list launch": {"DIRECT_TILE_ITEMS": None}}
TAU = 0.02
NOISE, NOISE_INPUT_THRESHOLD = 0.01, 0.05
N_OBJ = 24
DEFAULT_PLAN = ("r50:1:static,sq1,sq5,sq25,sq100,crowd5,crowd5t,crowd25,noise5,noise5t;"
                "r18:1:static,sq5,crowd5,crowd5t,sq100;"
                "r50:8:sq5,crowd5,crowd5t,sq100;"
                "r18:16:sq5,crowd5,crowd5t;"
                "r18:32:sq5")


def parse_workload(name: str) -> dict:
    """'crowd5t' -> {kind: crowd, p: 0.05, tau: 0.02, ...}: the clip and the conversion arguments."""
    tau = TAU if name.endswith("t") and name != "static" else 0.0
    base = name[:-1] if tau else name
    if base == "static":
        return {"name": name, "kind": "static", "p": 0.0, "tau": 0.0, "input_threshold": None}
    for kind in ("sq", "crowd", "noise"):
        if base.startswith(kind):
            p = float(base[len(kind):]) / 100
            return {"name": name, "kind": kind, "p": p, "tau": tau,
                    "input_threshold": NOISE_INPUT_THRESHOLD if kind == "noise" else None}
    raise ValueError(f"unknown workload {name!r}: static, sq<p>, crowd<p>, noise<p>, optional suffix t (tau {TAU})")


def square_frac(p: float) -> float:
    """make_clip's square side (fraction of min(H, W)) that changes about p of a 16:9 frame."""
    return 1.0 if p >= 1 else math.sqrt(p / (9 / 16))


def make_clip(wl: dict, frames: int, batch: int, h: int, w: int, device: str = "cuda", seed: int = 0) -> torch.Tensor:
    """(T, N, 3, H, W) on `device`; stream k sees the clip 3k frames later (independent motion)."""
    total = frames + 3 * (batch - 1)
    if wl["kind"] == "static":
        base = workload.make_clip(0.0, 1, h, w, seed=seed).expand(total, 3, h, w)
    elif wl["kind"] == "sq":
        base = workload.make_clip(square_frac(wl["p"]), total, h, w, seed=seed)
    else:
        base = workload.make_crowd_clip(total, h, w, n_obj=N_OBJ, area=wl["p"],
                                        noise=NOISE if wl["kind"] == "noise" else 0.0, seed=seed)
    base = base.to(device)
    return torch.stack([base[3 * k:3 * k + frames] for k in range(batch)], 1).contiguous()


# ------------------------------------------------------------------------------------------------ peers
def _graph_ms(fn, x: torch.Tensor, iters: int) -> float:
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(static)
    return median(cuda_ms(g.replay, iters))


def compiled_peer(m16, x: torch.Tensor, mode: str):
    """(call, compile s): torch.compile(m16, mode=mode) compiled on x (fp16 channels_last) and warmed up (CUDA-graph
    recording happens on the first calls after compilation); call() runs one frame."""
    torch._dynamo.reset()
    c = torch.compile(m16, mode=mode, fullgraph=True, dynamic=False)
    torch.cuda.synchronize()
    t0 = time.time()
    c(x)
    torch.cuda.synchronize()
    compile_s = time.time() - t0

    def call():
        torch.compiler.cudagraph_mark_step_begin()
        c(x)
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    return call, compile_s


def _compiled_ms(m16, x: torch.Tensor, mode: str, iters: int) -> tuple[float, float]:
    """(ms per call, compile s) of torch.compile(m16, mode=mode) on x (fp16 channels_last)."""
    call, compile_s = compiled_peer(m16, x, mode)
    ms = median(cuda_ms(call, iters))
    del call
    return ms, compile_s


def dense_peers(model32, frame: torch.Tensor, modes: list[str], iters: int = 30) -> dict:
    """Dense peers on one frame batch (N, 3, H, W): {name: {"ms":, "compile_s":}}."""
    out = {}
    with torch.no_grad():
        m16 = copy.deepcopy(model32).half().to(memory_format=torch.channels_last)
        x = frame.half().contiguous(memory_format=torch.channels_last)
        for _ in range(3):
            m16(x)
        out["cudnn"] = {"ms": median(cuda_ms(lambda: m16(x), iters))}
        out["cudnn+graph"] = {"ms": _graph_ms(m16, x, iters)}
        for mode in modes:
            try:
                ms, cs = _compiled_ms(m16, x, mode, iters)
                out[f"compile:{mode}"] = {"ms": ms, "compile_s": cs}
            except Exception as e:  # noqa: BLE001 - report and keep the other peers
                traceback.print_exc()
                out[f"compile:{mode}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
            print(f"    peer compile:{mode}: {out[f'compile:{mode}']}", flush=True)
        del m16
    free_memory()
    return out


# ------------------------------------------------------------------------------------------------ deltacnn
def truth_fp32(model32, clip: torch.Tensor) -> list[torch.Tensor]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        return [model32(clip[t]) for t in range(clip.shape[0])]


def _conv_module():
    from deltacnn.backends.triton_kernels import conv
    return conv


# the library's values of every module setting some variant changes
_DEFAULTS = {k: getattr(_conv_module(), k) for d in VARIANTS.values() for k in d
             if not k.startswith("compile:") and k != "torch_report"}


def torch_report(on: bool) -> None:
    """This benchmark's A/B of the compiled runner's per-stream report: PyTorch ops (on) or its kernels."""
    from deltacnn.compile import StreamGraphedDeltaModel as S
    if not hasattr(S, "_check_streams_kernels"):
        S._check_streams_kernels = S._check_streams
    S._check_streams = S._check_streams_torch if on else S._check_streams_kernels


def set_variant(name: str) -> dict:
    """Apply variant `name`'s module settings (the others back at the library's values); returns its
    deltacnn.compile arguments."""
    for key, value in {**_DEFAULTS, **VARIANTS[name]}.items():
        if not key.startswith("compile:") and key != "torch_report":
            setattr(_conv_module(), key, value)
    torch_report(VARIANTS[name].get("torch_report", False))
    return {k.split(":", 1)[1]: v for k, v in VARIANTS[name].items() if k.startswith("compile:")}


def delta_row(model32, clip: torch.Tensor, wl: dict, warm: int, truth=None, dispatch: bool = True,
              stats: bool = True, compile_kw: dict | None = None) -> dict:
    """deltacnn.compile (Triton, fp16; `compile_kw`: more of its arguments) over the clip: median ms of
    frames >= warm, MACs done (a separate untimed pass with statistics), error against dense fp32."""
    kw = dict(threshold=wl["tau"], input_threshold=wl["input_threshold"], dtype=torch.float16, backend="triton")
    dm = deltacnn.convert(model32, clip[0], **kw)
    ckw = dict(compile_kw or {})
    if not dispatch:
        ckw["dense_above"] = None
    runner = deltacnn.compile(dm, **ckw)
    outs = []
    ms = time_sequence(lambda t: outs.append((t, runner(clip[t]))), clip.shape[0], warm)
    err = max(rel(o, truth[t]) for t, o in outs[1:]) if truth is not None else None
    frames = dict(runner.frames)
    runner = dm = None  # noqa: F841
    outs.clear()
    free_memory()
    if not stats:
        return {"ms": median(ms), "ms_all": ms, "err": err, "frames": frames}
    dm = deltacnn.convert(model32, clip[0], dense_above=None, **kw)
    macs = steady_macs(dm, clip, warm)
    del dm
    free_memory()
    return {"ms": median(ms), "ms_all": ms, "macs": macs, "err": err, "frames": frames}


def kernel_profile_row(model32, clip: torch.Tensor, wl: dict, compile_kw: dict | None = None) -> str:
    """Per-kernel and per-conv-layer GPU time of eager delta frames (profile_frame's tables), then the
    per-kernel time of the same frames replayed by deltacnn.compile (`compile_kw`: its arguments) next to
    their replayed time per frame: the difference is what the graph spends between kernels."""
    from profile_frame import conv_layer_profile, kernel_profile, print_profile, replay_profile
    import contextlib
    import io
    kw = dict(threshold=wl["tau"], input_threshold=wl["input_threshold"], dtype=torch.float16, backend="triton")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dm = deltacnn.convert(model32, clip[0], dense_above=None, **kw)
        total, rows = kernel_profile(dm, clip, warm=4)
        print_profile(f"profile {wl['name']} N={clip.shape[1]} (eager)", total, rows, top=20)
        del dm
        dm = deltacnn.convert(model32, clip[0], dense_above=None, **kw)
        layers = conv_layer_profile(dm, clip, warm=4)
        for r in layers:
            r["macs"] = r["macs"] / 1e9 if r["macs"] is not None else None
        if not layers:
            print("no conv kernel of a known name in the profile (profile_frame.CONV_KERNELS)")
        print_table(layers, ["layer", "conv", "in_hw", "out_rate", "macs", "tiles_us", "conv_us", "nonlinear_us"])
        del dm
        dm = deltacnn.convert(model32, clip[0], **kw)
        runner = deltacnn.compile(dm, dense_above=None, **(compile_kw or {}))
        wall, total, rows = replay_profile(runner, clip, warm=4)
        print_profile(f"profile {wl['name']} N={clip.shape[1]} (graph replay {wall:.3f} ms per frame, "
                      f"{wall - total:.3f} ms of it between kernels)", total, rows, top=20)
        del runner, dm
    free_memory()
    return buf.getvalue()


def table_row(mname: str, batch: int, wl: dict, changed: float, variant: str, r: dict, ok: dict, best: str) -> dict:
    """One printed row: deltacnn against the strongest peer and its ideal (MACs done x peer time)."""
    return {"model": mname, "N": batch, "workload": wl["name"], "changed": f"{changed:.1%}", "variant": variant,
            "cudnn+g": ok["cudnn+graph"], "peer": ok[best], "peer_is": best.replace("compile:", ""),
            "deltacnn": r.get("ms"), "macs": r.get("macs"),
            "ideal": r["macs"] * ok[best] if r.get("macs") is not None else None,
            "x_ideal": r["ms"] / (r["macs"] * ok[best]) if r.get("macs") and "ms" in r else None,
            "vs_peer": ok[best] / r["ms"] if "ms" in r else None,
            "vs_cudnn_g": ok["cudnn+graph"] / r["ms"] if "ms" in r else None,
            "err": r.get("err"), "dense_fr": (r.get("frames") or {}).get("dense"), "note": r.get("error", "")[:50]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=DEFAULT_PLAN, help="model:batch:workload,... groups separated by ';'")
    ap.add_argument("--autotune", default="r50:1,r18:1", help="model:batch shapes that get max-autotune")
    ap.add_argument("--autotune-inline", action=argparse.BooleanOptionalAction, default=True,
                    help="max-autotune also in groups with workloads (off: only in peer-only groups)")
    ap.add_argument("--reduce-overhead", default="all", help="'all', 'none' or model:batch shapes")
    ap.add_argument("--profile", default="r50:1:crowd5t,r50:1:static", help="model:batch:workload profiled per kernel")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip compiled peers once this many seconds have passed")
    ap.add_argument("--variants", default="default", help=f"deltacnn variants, of {list(VARIANTS)}")
    ap.add_argument("--tag", default="")
    ap.add_argument("--dry", action="store_true", help="parse the plan and build small clips on the CPU, then exit")
    args = ap.parse_args()
    groups = [g.split(":") for g in args.plan.split(";") if g]
    # a group without workloads ("r50:1:") measures only the peers (e.g. max-autotune after the A/B)
    plan = [(m, int(b), [parse_workload(w) for w in ws.split(",") if w]) for m, b, ws in groups]
    autotune = set(args.autotune.split(",")) if args.autotune else set()
    profile = set(args.profile.split(",")) if args.profile else set()
    if args.dry:
        for m, b, wls in plan:
            for wl in wls:
                c = make_clip(wl, 6, b, 64, 96, device="cpu")
                ch = float(((c[1:] - c[:-1]).abs().amax(2) > 0).float().mean())
                print(m, b, wl, tuple(c.shape), f"changed {ch:.1%}")
        return
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch._inductor.config.compile_threads = max(1, min(16, os.cpu_count() or 1))
    env = environment()
    rows, results, profiles = [], [], []
    t0 = time.time()
    for mname, batch, wls in plan:
        h, w = SIZES[mname]
        model32 = workload.backbone(mname).cuda()
        shape = f"{mname}:{batch}"
        modes = []
        if time.time() - t0 < args.budget_s:
            if args.reduce_overhead == "all" or shape in args.reduce_overhead.split(","):
                modes.append("reduce-overhead")
            if shape in autotune and (args.autotune_inline or not wls):
                modes.append("max-autotune")  # next to reduce-overhead: either may be the stronger one
        first = make_clip({"kind": "sq", "p": 0.05}, 1, batch, h, w)[0]
        peers = dense_peers(model32, first, modes)
        del first
        ok = {k: v["ms"] for k, v in peers.items() if "ms" in v}
        best = min(ok, key=ok.get)
        print(f"[{time.time() - t0:5.0f}s] {shape} peers {json.dumps(peers)}; strongest {best}", flush=True)
        group = {"model": mname, "size": f"{w}x{h}", "batch": batch, "peers": peers, "strongest": best, "rows": []}
        for wl in wls:
            clip = make_clip(wl, args.frames, batch, h, w)
            changed = float(((clip[1:] - clip[:-1]).abs().amax(2) > 0).float().mean())
            truth = truth_fp32(model32, clip) if batch <= 8 else None
            macs = None
            for vi, variant in enumerate(args.variants.split(",")):
                ckw = set_variant(variant)
                try:
                    r = delta_row(model32, clip, wl, args.warm, truth, stats=vi == 0, compile_kw=ckw)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    r = {"error": f"{type(e).__name__}: {e}"[:200]}
                macs = r.get("macs", macs)
                if macs is not None:
                    r["macs"] = macs  # the same frames: the first variant's statistics
                free_memory()
                r.update(workload=wl["name"], changed=changed, variant=variant)
                group["rows"].append(r)
                rows.append(table_row(mname, batch, wl, changed, variant, r, ok, best))
                print(f"[{time.time() - t0:5.0f}s] " + "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()), flush=True)
            set_variant("default")
            del truth
            if f"{mname}:{batch}:{wl['name']}" in profile:
                try:
                    text = kernel_profile_row(model32, clip, wl)
                except Exception as e:  # noqa: BLE001
                    text = f"profile failed: {type(e).__name__}: {e}"
                print(text, flush=True)
                profiles.append({"case": f"{mname}:{batch}:{wl['name']}", "text": text})
            del clip
            free_memory()
            write_json("gpu_peers" + (f"_{args.tag}" if args.tag else ""),
                       {"env": env, "groups": results + [group], "profiles": profiles})
        results.append(group)
        del model32
        free_memory()
    env["wall_s"] = time.time() - t0
    path = write_json("gpu_peers" + (f"_{args.tag}" if args.tag else ""),
                      {"env": env, "groups": results, "profiles": profiles})
    print(f"\n{env.get('gpu')} torch {env['torch']} commit {env['commit']}; wrote {path}")
    print("peers (ms per frame; compile s):")
    for g in results:
        print(f"  {g['model']} {g['size']} N={g['batch']}: " + ", ".join(
            f"{k} {v['ms']:.3f}" + (f" ({v['compile_s']:.0f} s)" if "compile_s" in v else "") if "ms" in v
            else f"{k} failed" for k, v in g["peers"].items()))
    print_table(rows, ["model", "N", "workload", "changed", "variant", "cudnn+g", "peer", "peer_is", "deltacnn", "macs", "ideal",
                       "x_ideal", "vs_peer", "vs_cudnn_g", "err", "dense_fr", "note"])


if __name__ == "__main__":
    main()
