"""GPU: what deltacnn.compile's keyframes and dense frames cost, on Inductor (dense_compile="inductor",
the default) against the deltacnn backend's own path (dense_compile=None: cuDNN per conv + a seeding
pass), next to the dense peers, in one process (issue 13 item 4).

Per case (model, batch, size) and variant, one compiled model runs four phases of --phase frames
each, and each phase's time is the median of its graph-replayed frames (the eager and capturing
frames left out):
  keyframe: every stream is reset every frame (one whole-batch keyframe pass);
  rows: one stream is reset per frame (the delta pass with that stream left out + its own keyframe);
  delta: no reset (delta frames at tau 0, for scale);
  dense: dense_above 0 (every stream changed: whole-batch stateless dense frames).
It also checks every timed frame's output against the fp32 dense model (relative L2 error) and
reports the first-call times of the compiled passes (compile included). `--profile`: also each variant's
keyframe and dense phases and the reduce-overhead peer kernel by kernel (graph replays, torch.profiler):
where a keyframe's time goes beyond the dense pass it shares its convs with.

    DELTACNN_CLIP=vtest.avi DELTACNN_YOLOV8_PT=yolov8n.pt PYTHONPATH=<workload.py dir> \
        python3 benchmarks/gpu_dense_passes.py [--cases yolo:1,yolo720:16,r50:1] [--tag dense]
"""
from __future__ import annotations

import argparse
import time

import torch

import deltacnn
from common import environment, median, print_table, write_json
from gpu_bench import free_memory, make_batch_clip, rel
from gpu_peers import compiled_peer, dense_peers
from profile_frame import kernel_table, print_profile, profile_steps

PHASES = ("keyframe", "rows", "delta", "dense")


# variant name -> deltacnn.compile's dense_compile
VARIANTS = {"inductor": "inductor", "none": None}


def case_inputs(name: str, batch: int, frames: int):
    """(fp32 model, clip (T, N, 3, H, W) on the GPU, label) of one case."""
    if name.startswith("yolo"):
        from deltacnn.tasks.yolov8 import YOLOv8Task
        from gpu_yolo import batch_at, load_frames
        task = YOLOv8Task()
        model32 = task.load_model().cuda().eval()
        size = (736, 1280) if name == "yolo720" else None
        base = load_frames(task, frames + 3 * batch, size)
        clip = torch.stack([batch_at(base, t, batch) for t in range(frames)])
        return model32, clip, f"yolov8n {clip.shape[-1]}x{clip.shape[-2]}"
    from common import workload
    model32 = workload.backbone(name).cuda().eval()
    clip = make_batch_clip(0.05, frames, batch, 1080, 1920)
    return model32, clip, f"{name}-3stage 1920x1080 (5% square)"


def peer_profile(model32, frame: torch.Tensor, frames: int = 10) -> tuple[float, list]:
    """Per-kernel profile of the reduce-overhead peer (fp16 channels_last, its CUDA graphs replayed) on `frame`."""
    import copy
    with torch.no_grad():
        m16 = copy.deepcopy(model32).half().to(memory_format=torch.channels_last)
        call, _ = compiled_peer(m16, frame.half().contiguous(memory_format=torch.channels_last), "reduce-overhead")
        res = kernel_table(profile_steps(lambda _t: call(), range(frames)), frames)
    del call, m16
    free_memory()
    return res


def phase_profile(g, clip, p: str, start: int, frames: int = 10) -> tuple[float, list]:
    """Per-kernel profile of `frames` replayed frames of phase p ("keyframe": every stream reset each
    frame; "dense": dense_above 0) of the compiled model g, after unprofiled frames of the phase (a dense
    phase starts once a frame's change has reached the host: up to 8 frames)."""
    n = clip.shape[1]
    g.above = 0.0 if p == "dense" else 2.0  # 2.0: no stream's change exceeds it, its dense flag clears
    t = 0

    def step(i: int) -> None:
        if p == "keyframe":
            for k in range(n):
                g.reset_stream(k)
        g(clip[(start + i) % clip.shape[0]])
    for t in range(8):
        step(t)
        if t >= 1 and set(g.last_modes) == {p}:
            break
    if set(g.last_modes) != {p}:
        raise RuntimeError(f"the {p} phase's profile ran {g.last_modes}")
    return kernel_table(profile_steps(step, range(t + 1, t + 1 + frames)), frames)


def run_variant(model32, clip, dense_compile, phase: int, profile: bool = False, phases=PHASES) -> dict:
    dm = deltacnn.convert(model32, clip[0], threshold=0.0, dtype=torch.float16, backend="triton")
    g = deltacnn.compile(dm, dense_above=None, dense_compile=dense_compile)
    n = clip.shape[1]
    times = {p: [] for p in PHASES}
    errs = {p: 0.0 for p in PHASES}
    t_all = 0
    for p in phases:
        if p == "rows" and n == 1:
            continue
        if p == "dense":
            g.above = 0.0
        for i in range(phase):
            x = clip[t_all % clip.shape[0]]
            t_all += 1
            if p == "keyframe" and t_all > 1:  # (frame 0 is the stream's first keyframe)
                for k in range(n):
                    g.reset_stream(k)
            elif p == "rows":
                g.reset_stream(i % n)
            n_graphs = len(g._graphs)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = g(x)
            b.record()
            b.synchronize()
            modes = set(g.last_modes)
            want = {"keyframe": {"keyframe"}, "rows": {"keyframe", "delta"}, "delta": {"delta"}, "dense": {"dense"}}[p]
            if i >= phase // 2 and len(g._graphs) == n_graphs and modes == want:
                times[p].append(a.elapsed_time(b))
                with torch.no_grad():
                    errs[p] = max(errs[p], rel(out, model32(x)))
    res = {p: median(times[p]) if times[p] else None for p in PHASES}
    if profile:
        for p in ("keyframe", "dense"):
            try:
                ms, rows = phase_profile(g, clip, p, t_all)
            except RuntimeError as e:  # reported; the timed phases above stand
                print(f"profile of the {p} phase: {e}")
                continue
            print_profile(f"deltacnn dense_compile={dense_compile} {p} (replayed, N={n})", ms, rows, top=30)
            res[f"profile_{p}"] = {"kernel_ms": ms, "calls": sum(r[2] for r in rows), "rows": rows}
    res.update({f"n_{p}": len(times[p]) for p in PHASES})
    res.update({f"err_{p}": errs[p] for p in PHASES})
    if g.dense is not None:
        res["compile_s"] = {"/".join(map(str, k[:2])): round(v, 1) for k, v in g.dense.compile_s.items()}
        res["failed"] = dict((str(k), v) for k, v in g.dense.failed.items())
    del g, dm
    free_memory()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="yolo:1,yolo720:16,r50:1", help="name:batch,... (yolo, yolo720, r50, r18)")
    ap.add_argument("--phase", type=int, default=14, help="frames per phase")
    ap.add_argument("--variants", default="inductor,none")
    ap.add_argument("--phases", default=",".join(PHASES), help="phases timed, of " + ",".join(PHASES))
    ap.add_argument("--peers", default="reduce-overhead", help="torch.compile modes of the peers ('': none)")
    ap.add_argument("--profile", action="store_true", help="also profile the keyframe / dense phases and the peer")
    ap.add_argument("--tag", default="dense")
    args = ap.parse_args()
    bad = [v for v in args.variants.split(",") if v not in VARIANTS] + \
        [p for p in args.phases.split(",") if p not in PHASES]
    if bad:
        ap.error(f"unknown variant or phase {bad}: variants {sorted(VARIANTS)}, phases {PHASES}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    env = environment()
    rows, out, t0 = [], [], time.time()
    for case in args.cases.split(","):
        name, batch = case.split(":")
        model32, clip, label = case_inputs(name, int(batch), 2 * args.phase)
        peers = dense_peers(model32, clip[0], [m for m in args.peers.split(",") if m])
        ok = {k: v["ms"] for k, v in peers.items() if "ms" in v}
        best = min(ok, key=ok.get)
        print(f"[{time.time() - t0:5.0f}s] {label} N={batch} peers {peers}", flush=True)
        group = {"case": case, "label": label, "peers": peers, "variants": {}}
        if args.profile and "reduce-overhead" in args.peers.split(","):
            ms, prow = peer_profile(model32, clip[0])
            print_profile(f"peer reduce-overhead (replayed, N={batch})", ms, prow, top=30)
            group["peer_profile"] = {"kernel_ms": ms, "calls": sum(r[2] for r in prow), "rows": prow}
        for v in args.variants.split(","):
            try:
                r = run_variant(model32, clip, VARIANTS[v], args.phase, args.profile, args.phases.split(","))
            except Exception as e:  # noqa: BLE001 - report and go on
                import traceback
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}"[:200]}
            group["variants"][v] = r
            print(f"[{time.time() - t0:5.0f}s] {case} {v}: {r}", flush=True)
            rows.append({"case": case, "dense_compile": v, "cudnn+g": ok.get("cudnn+graph"), "peer": ok[best],
                         "peer_is": best.replace("compile:", ""), "keyframe": r.get("keyframe"), "rows": r.get("rows"),
                         "delta": r.get("delta"), "dense": r.get("dense"),
                         "dense_vs_peer": ok[best] / r["dense"] if r.get("dense") else None,
                         "key_vs_peer": ok[best] / r["keyframe"] if r.get("keyframe") else None,
                         "max_err": max((r.get(f"err_{p}", 0.0) for p in PHASES), default=None),
                         "note": r.get("error", "")[:40]})
        out.append(group)
        write_json(f"gpu_dense_passes_{args.tag}", {"env": env, "args": vars(args), "groups": out})
        del model32, clip
        free_memory()
    print(f"\n{env.get('gpu')} torch {env['torch']} commit {env['commit']}; ms = median of graph-replayed frames; "
          "dense/key_vs_peer = peer ms / deltacnn ms")
    print_table(rows, ["case", "dense_compile", "cudnn+g", "peer", "peer_is", "keyframe", "rows", "delta", "dense",
                       "dense_vs_peer", "key_vs_peer", "max_err", "note"])


if __name__ == "__main__":
    main()
