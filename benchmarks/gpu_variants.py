"""GPU A/B of the Triton backend's switches on ResNet-50 @1080p, all in one process, plus keyframe cost.

Variants (same results, different launch structure): `fuse_dilation` (each conv's candidate mask
computed inside its tile-list launch instead of a separate dilation launch) and
`SPLIT_CHANNEL_EMIT` (at tau 0, the nonlinear update fused into convs whose output channels are
split over programs, instead of conv + a separate nonlinear pass). Each variant is timed as
deltacnn.compile replays against cuDNN fp16 + CUDA graph of the same run. Keyframes: the eager
keyframe (DeltaModel call after reset) and the graph-replayed keyframe (keyframe_interval=1).

    python3 benchmarks/gpu_variants.py [--cases b1:5%,b1:25%,b8:5%] [--frames 12] [--profile b1:5%]
"""
from __future__ import annotations

import argparse
import time

import torch

import deltacnn
from deltacnn.backends import triton_kernels as tk
from deltacnn.backends.triton_backend import TritonBackend
from deltacnn.backends.triton_kernels import _common as tk_common
from common import environment, median, print_table, workload, write_json
from gpu_bench import DENSITIES, SIZES, cuda_ms, delta_run, dense_runs, free_memory, make_batch_clip, rel, time_sequence
from profile_frame import conv_layer_profile, kernel_profile, print_profile

# Module and class settings the variants switch, and where they live (the library's defaults are
# whatever those hold at import; a variant overrides some of them). The variants up to "sparsify 64
# px" are the code of earlier sessions, so they also switch off what the fourth session added
# (PREDATES_S4); each later variant is the default of its run with one change (BENCHMARKS.md), and
# every variant of an earlier session also switches off what the fifth added (PREDATES_S5).
SETTINGS = {
    "fuse_dilation": (TritonBackend, "fuse_dilation"),
    "split_channel_emit": (tk.conv, "SPLIT_CHANNEL_EMIT"),
    "big_map_tile": (tk.conv, "BIG_MAP_TILE"),
    "num_stages": (tk.conv, "NUM_STAGES"),
    "pack_k_below": (tk.conv, "PACK_K_BELOW"),
    "split_emit_bn": (tk.conv, "SPLIT_EMIT_BN"),
    "persistent_counter": (TritonBackend, "persistent_counter"),
    "fuse_keyframe_seed": (TritonBackend, "fuse_keyframe_seed"),
    "sparsify_max_pixels": (tk.pointwise, "SPARSIFY_MAX_PIXELS"),
    "pdl": (tk_common, "PDL"),
    "fuse_conv_bias": (TritonBackend, "fuse_conv_bias"),
    "pack_k_bk": (tk.conv, "PACK_K_BK"),
    "pack_k_warps": (tk.conv, "PACK_K_WARPS"),
    "programs_per_sm": (tk.conv, "PROGRAMS_PER_SM"),
    "epilogue_loads_first": (tk.conv, "EPILOGUE_LOADS_FIRST"),
    "reuse_out_mask": (tk.conv, "REUSE_OUT_MASK"),
    "bordered_input": (TritonBackend, "bordered_input"),
    "pool_reads_running_sum": (TritonBackend, "pool_reads_running_sum"),
    "window_tile": (tk.conv, "WINDOW_TILE"),
    "window_warps": (tk.conv, "WINDOW_WARPS"),
    "sparsify_warps": (tk.pointwise, "SPARSIFY_WARPS"),
    "window_bn": (tk.conv, "WINDOW_BN"),
    "small_map_maxnreg": (tk.conv, "SMALL_MAP_MAXNREG"),
    "pixel_lists": (tk.conv, "PIXEL_LISTS"),
    "latency_bound_items": (tk.conv, "LATENCY_BOUND_ITEMS"),
}
LIBRARY_DEFAULTS = {k: getattr(obj, attr) for k, (obj, attr) in SETTINGS.items()}
PREDATES_S4 = dict(pdl="off", fuse_conv_bias=False, pack_k_bk=64, epilogue_loads_first=False, reuse_out_mask=False)
# the fifth session's settings, switched off in every earlier variant
PREDATES_S5 = dict(bordered_input=False, pool_reads_running_sum=False, sparsify_warps=4, small_map_maxnreg=None)
EARLIER_VARIANTS = {
    "before": dict(fuse_dilation=False, split_channel_emit=False, pack_k_below=0, split_emit_bn=None,
        persistent_counter=False, fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "+fused dilation": dict(split_channel_emit=False, pack_k_below=0, split_emit_bn=None, persistent_counter=False,
        fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "+split emit": dict(fuse_dilation=False, pack_k_below=0, split_emit_bn=None, persistent_counter=False,
        fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "both": dict(pack_k_below=0, split_emit_bn=None, persistent_counter=False, fuse_keyframe_seed=False,
        sparsify_max_pixels=32, **PREDATES_S4),
    "both t8x16": dict(big_map_tile=(8, 16), pack_k_below=0, split_emit_bn=None, persistent_counter=False,
        fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "both t16x8": dict(big_map_tile=(16, 8), pack_k_below=0, split_emit_bn=None, persistent_counter=False,
        fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "both s4": dict(num_stages=4, pack_k_below=0, split_emit_bn=None, persistent_counter=False,
        fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "both t8x16 s4": dict(big_map_tile=(8, 16), num_stages=4, pack_k_below=0, split_emit_bn=None,
        persistent_counter=False, fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "both+pack": dict(split_emit_bn=None, persistent_counter=False, fuse_keyframe_seed=False,
        sparsify_max_pixels=32, **PREDATES_S4),
    "both+pack bn128": dict(split_emit_bn=128, persistent_counter=False, fuse_keyframe_seed=False,
        sparsify_max_pixels=32, **PREDATES_S4),
    "both+pack bn64": dict(persistent_counter=False, fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "both+pack bn32": dict(split_emit_bn=32, persistent_counter=False, fuse_keyframe_seed=False,
        sparsify_max_pixels=32, **PREDATES_S4),
    "unfused keyframe seed": dict(fuse_keyframe_seed=False, sparsify_max_pixels=32, **PREDATES_S4),
    "sparsify 64 px": dict(sparsify_max_pixels=32, **PREDATES_S4),
    "no pdl": dict(pdl='off'),
    "pdl exit": dict(pdl='exit'),
    "pdl early": dict(pdl='early'),
    "pdl short": dict(pdl='short'),
    "conv bias unfused": dict(fuse_conv_bias=False),
    "dense epilogue off": dict(fuse_keyframe_seed=False),
    "stem w8 bk32": dict(pack_k_warps=8, pack_k_bk=32),
    "stem w8 bk64": dict(pack_k_warps=8, pack_k_bk=64),
    "stem w4 bk32": dict(pack_k_warps=4, pack_k_bk=32),
    "stem w4 bk64": dict(pack_k_warps=4, pack_k_bk=64),
    "2 programs/SM": dict(programs_per_sm=2),
    "epilogue loads in order": dict(epilogue_loads_first=False),
    "1x1 loads x mask": dict(reuse_out_mask=False),
    "stages 2": dict(num_stages=2),
    "stages 4": dict(num_stages=4),
    "3 programs/SM": dict(programs_per_sm=3),
}
# the sixth session's conv work units of candidate pixels, switched off in every earlier variant
PREDATES_S6 = dict(pixel_lists=False)
VARIANTS = {name: {**PREDATES_S5, **PREDATES_S6, **v} for name, v in EARLIER_VARIANTS.items()}
VARIANTS.update({
    "stem per-tap gathers": dict(bordered_input=False, **PREDATES_S6),
    "pool accumulates its input": dict(pool_reads_running_sum=False, **PREDATES_S6),
    "stem window 8 warps": dict(window_warps=8, **PREDATES_S6),
    "stem window 8x16 tiles": dict(window_tile=(8, 16), **PREDATES_S6),
    "sparsify 4 warps": dict(sparsify_warps=4, **PREDATES_S6),
    "stem window 32 channels/program": dict(window_bn=32, **PREDATES_S6),
    "pdl early (fifth session)": dict(pdl="early", **PREDATES_S6),
    "no register cap": dict(small_map_maxnreg=None, **PREDATES_S6),
    "tile lists": dict(pixel_lists=False),
    "default": dict(),  # the library's defaults
})
DEFAULT = "default"


def set_variant(name: str) -> None:
    values = {**LIBRARY_DEFAULTS, **VARIANTS[name]}
    for key, (obj, attr) in SETTINGS.items():
        setattr(obj, attr, values[key])


def keyframe_times(model32, clip, truth, dtype) -> dict:
    """Eager keyframe (after reset) and graph-replayed keyframe, ms; error of the replayed one."""
    dm = deltacnn.convert(model32, clip[0], dtype=dtype, backend="triton")
    for _ in range(2):
        dm.reset()
        dm(clip[0])

    def eager_kf():
        dm.reset()
        dm(clip[0])
    eager = cuda_ms(eager_kf, 5)
    del dm
    free_memory()
    dm = deltacnn.convert(model32, clip[0], dtype=dtype, backend="triton", keyframe_interval=1)
    g = deltacnn.compile(dm, dense_above=None)
    outs = []
    ms = time_sequence(lambda t: outs.append((t, g(clip[t]))), clip.shape[0], 4)
    err = max(rel(o, truth[t]) for t, o in outs[4:])
    frames = dict(g.frames)
    del g, dm, outs
    free_memory()
    return {"eager_keyframe_ms": median(eager), "graph_keyframe_ms": median(ms), "graph_keyframe_err": err,
            "frames": frames}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="b1:5%,b1:25%,b8:5%")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--first-case-only", default="+", help="variants whose name starts with this run in the first case only")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--keyframes", default="b1:5%,b8:5%", help="cases whose keyframes are timed ('' for none)")
    ap.add_argument("--keyframe-variants", default=DEFAULT, help="variants whose keyframes are timed")
    ap.add_argument("--profile", default="b1:5%,b1:25%", help="cases profiled per kernel with all switches on")
    ap.add_argument("--profile-keyframes", default="", help="cases whose eager keyframes are profiled per kernel")
    ap.add_argument("--profile-variants", default=DEFAULT, help="variants profiled in the --profile cases")
    args = ap.parse_args()
    dtype = torch.float16
    h, w = SIZES["r50"]
    model32 = workload.backbone("r50").cuda()
    rows, t0 = [], time.time()
    for case in args.cases.split(","):
        b, d = case.split(":")
        batch, p = int(b[1:]), DENSITIES[d]
        clip = make_batch_clip(p, args.frames, batch, h, w)
        res = {}
        truth = dense_runs(model32, clip, res)["truth"]
        graph_ms = res["cudnn_fp16_graph_ms"]
        variants = args.variants.split(",")
        if case != args.cases.split(",")[0]:  # e.g. each switch alone only in the first case (device time)
            variants = [v for v in variants if not v.startswith(args.first_case_only)]
        for v in variants:
            set_variant(v)
            r = delta_run(model32, clip, truth, dtype, "triton", True, args.frames, args.warm, stats=False)
            rows.append({"case": case, "variant": v, "ms": r["ms"], "cudnn16+graph": graph_ms,
                         "speedup": graph_ms / r["ms"], "err": r["max_rel_err"]})
            print(f"[{time.time() - t0:5.0f}s] {rows[-1]}", flush=True)
        for v in args.keyframe_variants.split(",") if case in args.keyframes.split(",") else []:
            set_variant(v)
            k = keyframe_times(model32, clip, truth, dtype)
            rows.append({"case": case, "variant": f"keyframe eager ({v})", "ms": k["eager_keyframe_ms"],
                         "cudnn16+graph": graph_ms, "speedup": graph_ms / k["eager_keyframe_ms"]})
            rows.append({"case": case, "variant": f"keyframe graph ({v})", "ms": k["graph_keyframe_ms"],
                         "cudnn16+graph": graph_ms, "speedup": graph_ms / k["graph_keyframe_ms"],
                         "err": k["graph_keyframe_err"]})
            print(f"[{time.time() - t0:5.0f}s] keyframes ({v}) {k}", flush=True)
        set_variant(DEFAULT)
        if case in args.profile_keyframes.split(","):
            dm = deltacnn.convert(model32, clip[0], dtype=dtype, backend="triton")
            total, prof = kernel_profile(dm, clip, keyframes=True)
            print_profile(f"r50 {case} fp16 keyframes (eager)", total, prof, top=20)
            rows.append({"case": case, "variant": "keyframe profile (eager, kernel time)", "ms": total})
            del dm
        for v in args.profile_variants.split(",") if case in args.profile.split(",") else []:
            set_variant(v)
            label = "" if v == DEFAULT else f" {v}"
            dm = deltacnn.convert(model32, clip[0], dtype=dtype, backend="triton")
            total, prof = kernel_profile(dm, clip)
            print_profile(f"r50 {case} fp16, variant {v!r}", total, prof, top=15)
            rows.append({"case": case, "variant": f"profile{label} (eager, kernel time)", "ms": total})
            del dm
            dm = deltacnn.convert(model32, clip[0], dtype=dtype, backend="triton")
            layers = conv_layer_profile(dm, clip)
            print(f"per conv layer, one delta frame of {case}, variant {v!r} (us; macs in GMAC):")
            for r in layers:
                r["macs"] = r["macs"] / 1e9 if r["macs"] is not None else None
            print_table(layers, ["layer", "conv", "in_hw", "out_rate", "macs", "tiles_us", "conv_us", "nonlinear_us"])
            del dm
        set_variant(DEFAULT)
        del clip, truth
        free_memory()
        write_json("gpu_variants", {"env": environment(), "rows": rows})
    env = environment()
    print(f"\n{env.get('gpu')} torch {env['torch']} commit {env['commit']}")
    print_table(rows, ["case", "variant", "ms", "cudnn16+graph", "speedup", "err"])


if __name__ == "__main__":
    main()
