"""Where a keyframe's CPU time goes, conv by conv, against onnxruntime's own per-node time.

Each keyframe conv of the cpu backend is one C++ pass (conv_dense); this times every call with the
process CPU clock (1 thread: meaningful on a loaded machine) and prints, per conv shape, its time,
GMAC/s and onnxruntime's time for its Conv nodes of the same shape (from onnxruntime's profiler, by
input, weight and output shape), plus the keyframe's time outside conv_dense. onnxruntime's profiler
measures wall clock: on a loaded machine its per-shape times are inflated (compare them on a quiet one).

    PYTHONPATH=/work/shared/bench python3 benchmarks/cpu_keyframe_layers.py --repeats 4

`--isa avx2,avx512` runs each keyframe once per micro-kernel ISA, interleaved (cpu_kernels set_cpu_isa);
with `--steady`, `--base-source old.cpp` also runs each on a second build of the kernels (two-build A/B).

`--steady N` instead runs N consecutive frames as keyframes of one stream (keyframe interval 1: the
state buffers are reused, as on the keyframes of a real run, where the per-conv mode resets the model
and allocates them again) and prints each frame's time, the conv_dense part and the rest; with
`--peer`, onnxruntime on the same frames, interleaved (`--threads 2 --clock wall` on a quiet machine):

    PYTHONPATH=/work/shared/bench python3 benchmarks/cpu_keyframe_layers.py --steady 24 --threads 2 --clock wall --peer

`--layers` times every delta layer of a keyframe (forward hooks, exclusive CPU time: depthwise convs,
transposed convs, adds and the rest, not only conv_dense) and puts onnxruntime's per-node time of the
same layer shape beside it (its Conv / FusedConv nodes by shape; its other nodes summed by op); with
`--stateless`, the frame runs as a dense frame (no state written), as a densified delta frame does:

    python3 benchmarks/cpu_keyframe_layers.py --model centerface --layers --repeats 4
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_profile import _TimedModule, StageClock, _flat, convert_at, load, set_isa  # noqa: E402


SHIPPED = {"yolov8n": "deltacnn/data/yolov8n_vtest.json", "centerface": "deltacnn/data/centerface_f1_95.json"}


def _shape_key(cin: int, cout: int, kh: int, kw: int, stride: int, h: int, w: int) -> str:
    return f"{cin:3d}->{cout:3d} k{kh}x{kw} s{stride} {h}x{w}"


def _ort_profile(model, x: torch.Tensor, repeats: int) -> tuple[list[list[dict]], float]:
    """onnxruntime's profiled node events of `repeats` runs of model on x (1 thread per torch thread; the
    first run, a warm-up, left out), one list per run, and its median frame time (process CPU clock)."""
    import onnxruntime as ort
    from deltacnn.peers import export_onnx
    with tempfile.TemporaryDirectory(prefix="deltacnn_onnx_") as d:
        path = export_onnx(model, x, Path(d) / "model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(d) / "prof")
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        arr = x.numpy()
        name = sess.get_inputs()[0].name
        frame = []
        for _ in range(repeats + 1):
            t0 = time.process_time()
            sess.run(None, {name: arr})
            frame.append((time.process_time() - t0) * 1e3)
        events = json.loads(Path(sess.end_profiling()).read_text())
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs: list[list[dict]] = [[] for _ in spans]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        for i, (a, b) in enumerate(spans):  # the run whose span holds this node
            if a <= e["ts"] <= b:
                runs[i].append(e)
                break
    return runs[1:], statistics.median(frame[1:])


def _ort_times(runs: list[list[dict]], key_of) -> dict[str, float]:
    """Per key (key_of(node event), None: left out): the sum over a run's nodes, median over the runs (ms)."""
    per_run: list[dict[str, float]] = []
    for events in runs:
        r: dict[str, float] = defaultdict(float)
        for e in events:
            k = key_of(e)
            if k is not None:
                r[k] += e["dur"] / 1e3
        per_run.append(r)
    keys = set().union(*per_run)
    return {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in keys}


def _ort_conv_key(e: dict) -> str | None:
    args = e.get("args", {})
    if "Conv" not in args.get("op_name", "") or "Transpose" in args["op_name"]:
        return None
    (xs,), (ws,) = args["input_type_shape"][0].values(), args["input_type_shape"][1].values()
    (os,) = args["output_type_shape"][0].values()
    return _shape_key(ws[1], ws[0], ws[2], ws[3], xs[2] // os[2], xs[2], xs[3])


def ort_conv_times(model, x: torch.Tensor, repeats: int) -> tuple[dict[str, float], float]:
    """onnxruntime's time per groups-1 conv shape (ms: the sum over its Conv nodes of that shape, median over
    `repeats` runs; shapes from the profiler's input/weight/output shapes) and its frame time."""
    runs, frame = _ort_profile(model, x, repeats)
    return _ort_times(runs, _ort_conv_key), frame


def _layer_key(kind: str, cin: int, cout: int, kh: int, kw: int, stride: int, h: int, w: int) -> str:
    """Channels rounded up to 16: onnxruntime's profiler shows the blocked (NCHWc) layout's padded counts."""
    return f"{kind:6s} {-(-cin // 16) * 16:3d}->{-(-cout // 16) * 16:3d} k{kh}x{kw} s{stride} {h}x{w}"


def _ort_layer_key(e: dict) -> str:
    """A node's --layers key: a conv's (depthwise "dw", transposed "deconv") by shape, else "ort <op>"."""
    args = e.get("args", {})
    op = args.get("op_name", "?")
    if "Conv" not in op:
        return f"(onnxruntime {op})"
    (xs,), (ws,) = args["input_type_shape"][0].values(), args["input_type_shape"][1].values()
    (os,) = args["output_type_shape"][0].values()
    if len(ws) != 4 or len(xs) != 4:
        return f"(onnxruntime {op} {xs} {ws})"
    if "Transpose" in op:  # weight (Cin, Cout / groups, kh, kw)
        return _layer_key("deconv", xs[1], ws[1], ws[2], ws[3], os[2] // xs[2], xs[2], xs[3])
    kind = "dw" if ws[1] == 1 and ws[0] == xs[1] > 1 else "conv"
    return _layer_key(kind, xs[1], ws[0], ws[2], ws[3], xs[2] // os[2], xs[2], xs[3])


def _delta_layer_key(layer, inputs) -> tuple[str, float]:
    """A delta layer's --layers key (a conv's as _ort_layer_key's) and its multiply-adds (MMAC) for input shape."""
    from deltacnn.layers.conv import DeltaConv2d, DeltaConvTranspose2d
    n, c, h, w = inputs[0].shape
    if isinstance(layer, DeltaConv2d):
        kh, kw = layer.window.kernel
        ho, wo = layer.window.out_size(h, w)
        kind = "dw" if layer.groups > 1 and layer.groups == c else "conv"
        return (_layer_key(kind, c, layer.weight.shape[0], kh, kw, layer.window.stride[0], h, w),
                n * ho * wo * layer.macs_per_pixel / 1e6)
    if isinstance(layer, DeltaConvTranspose2d):
        cin, cout_g, kh, kw = layer.weight.shape
        return (_layer_key("deconv", cin, cout_g * layer.groups, kh, kw, layer.stride[0], h, w),
                n * h * w * cin // layer.groups * cout_g * layer.groups * kh * kw / 1e6)
    return f"{layer.kind} {c} {h}x{w}", 0.0


def _candidate_rate(mod, inputs) -> float:
    """The fraction of a delta conv's output pixels whose window reads an updated input pixel (its candidates,
    without a residual's), or of a layer's updated input pixels."""
    from deltacnn.layers.conv import DeltaConv2d
    d = inputs[0]
    m = d.mask.float()
    if isinstance(mod, DeltaConv2d):
        t, b, l, r = mod.window.padding
        m = torch.nn.functional.max_pool2d(torch.nn.functional.pad(m, (l, r, t, b)), mod.window.kernel,
                                           mod.window.stride, 0, mod.window.dilation)
    return float(m.mean())


def delta_layers(args) -> None:
    """--layers --delta-frames N: every delta layer's exclusive CPU time on N delta frames at --points (1 thread),
    its candidate rate, and its time on a stateless dense frame of the same model: x ideal = delta time / (dense
    time x candidate rate), by layer shape."""
    from deltacnn.layers.base import DeltaLayer
    torch.set_num_threads(1)
    model, frames = load(args.model, args.start, args.delta_frames + 2)
    stack: list[list] = []
    spent: dict[str, float] = defaultdict(float)
    rate: dict[str, list[float]] = defaultdict(list)
    count: dict[str, int] = defaultdict(int)
    measure = [False]

    def pre(mod, inputs):
        stack.append([time.process_time(), 0.0])

    def post(mod, inputs, output):
        t0, child = stack.pop()
        dt = time.process_time() - t0
        key, _ = _delta_layer_key(mod, inputs) if not isinstance(inputs[0], torch.Tensor) else (mod.kind, 0.0)
        spent[key] += dt - child
        count[key] += 1
        if measure[0] and not isinstance(inputs[0], torch.Tensor) and not inputs[0].dense:
            rate[key].append(_candidate_rate(mod, inputs))
        if stack:
            stack[-1][1] += dt

    def run(dm, fn, frame_list) -> tuple[dict[str, float], float]:
        mods = [m for m in dm.modules() if isinstance(m, DeltaLayer)]
        hooks = [m.register_forward_pre_hook(pre) for m in mods] + [m.register_forward_hook(post) for m in mods]
        spent.clear()
        count.clear()
        t0 = time.process_time()
        for f in frame_list:
            fn(f)
        total = (time.process_time() - t0) * 1e3 / len(frame_list)
        for h in hooks:
            h.remove()
        return {k: v * 1e3 / len(frame_list) for k, v in spent.items()}, total

    with torch.no_grad():
        dense_dm = convert_at(model, frames, args.points, 1)
        dense_dm(frames[0])
        dense_dm.dense_frame(frames[1])  # warm-up (buffers)
        dense, dense_total = run(dense_dm, dense_dm.dense_frame, frames[1:4])
        dm = convert_at(model, frames, args.points, 1)
        dm(frames[0])
        dm(frames[1])  # warm-up
        measure[0] = True
        delta, delta_total = run(dm, dm, frames[2:])
        n_key = dict(count)
    macs = dm.rt.backend_on(torch.device("cpu")).work
    print(f"{args.model} {args.points}: {args.delta_frames} delta frames, 1 thread, CPU clock: {delta_total:.1f} ms a "
          f"frame (in layers {sum(delta.values()):.1f}); a stateless dense frame {dense_total:.1f} ms (in layers "
          f"{sum(dense.values()):.1f}); last frame's conv MACs {macs[0] / max(1, macs[1]):.1%}")
    print(f"{'layer (kind Cin->Cout kernel stride input)':44s} {'n':>3s} {'delta ms':>8s} {'cand':>6s} {'dense ms':>8s} "
          f"{'ideal':>6s} {'x ideal':>7s}")
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for key in sorted(delta, key=lambda k: -delta[k]):
        t, dn = delta[key], dense.get(key, float("nan"))
        cr = statistics.mean(rate[key]) if rate.get(key) else float("nan")
        ideal = dn * cr
        print(f"{key:44s} {n_key.get(key, 0) // args.delta_frames:3d} {t:8.2f} {cr:6.1%} {dn:8.2f} {ideal:6.2f} "
              f"{t / ideal if ideal > 0 else float('nan'):7.2f}")
        g = key.split()[0] if key.split()[0] in ("conv", "dw", "deconv") else "other"
        if g == "conv":
            g = "conv 1x1" if " k1x1 " in key else "conv kxk"
        groups[g][0] += t
        groups[g][1] += ideal if ideal == ideal else 0.0
    print("by kind (ms a delta frame / ideal):")
    for g, (t, i) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"   {g:10s} {t:7.2f} {i:7.2f}")


def layers(args) -> None:
    """--layers: every delta layer of a keyframe (or a stateless dense frame), exclusive CPU time by layer
    shape, against onnxruntime's nodes of that shape (1 thread)."""
    from cpu_profile import ISA_SWITCH, SWITCHES, _module_of, apply_settings, parse_variants
    from deltacnn.layers.base import DeltaLayer
    torch.set_num_threads(1)
    (name, kv), = parse_variants(args.variants)[:1]  # --variants "old:dense_depthwise=0": one variant's settings
    apply_settings(kv, {})
    if kv:
        print(f"[{name}] {kv}")
    model, frames = load(args.model, args.start, 1)
    dm = convert_at(model, frames, args.points, 1)
    stack: list[list] = []  # [start, child time]
    spent: dict[str, float] = defaultdict(float)
    macs: dict[str, float] = {}
    count: dict[str, int] = defaultdict(int)

    def pre(mod, inputs):
        stack.append([time.process_time(), 0.0])

    def post(mod, inputs, output):
        t0, child = stack.pop()
        dt = time.process_time() - t0
        key, mmac = _delta_layer_key(mod, inputs) if not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 4 \
            else (mod.kind, 0.0)
        spent[key] += dt - child
        macs[key] = macs.get(key, 0.0) + mmac
        count[key] += 1
        if stack:
            stack[-1][1] += dt

    mods = [m for m in dm.modules() if isinstance(m, DeltaLayer)]
    frame_ms, per_key, faults = [], defaultdict(list), []
    with torch.no_grad():
        for r in range(args.repeats + 1):
            dm.reset()
            if args.stateless:
                dm(frames[0])  # the state a dense frame of a running stream leaves alone
            hooks = [m.register_forward_pre_hook(pre) for m in mods] + [m.register_forward_hook(post) for m in mods]
            spent.clear()
            macs.clear()
            count.clear()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.process_time()
            dm.dense_frame(frames[0]) if args.stateless else dm(frames[0])
            dt = (time.process_time() - t0) * 1e3
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            for h in hooks:
                h.remove()
            if r == 0:
                continue
            frame_ms.append(dt)
            for k, v in spent.items():
                per_key[k].append(v * 1e3)
    med = statistics.median
    ms = {k: med(v) for k, v in per_key.items()}
    runs, ort_frame = ({}, float("nan")) if args.no_peer else _ort_profile(model, frames[0], args.repeats)
    ort = _ort_times(runs, _ort_layer_key) if runs else {}
    fm = med(frame_ms)
    what = "dense frame (stateless)" if args.stateless else "keyframe"
    print(f"{args.model} {what}, 1 thread, CPU clock, median of {len(frame_ms)}: {fm:.1f} ms, in layers "
          f"{sum(ms.values()):.1f} ms ({sum(macs.values()) / 1e3:.2f} GMAC), outside layers {fm - sum(ms.values()):.1f}; "
          f"minor page faults {statistics.median(faults[1:]):.0f} a frame")
    print(f"onnxruntime frame {ort_frame:.1f} ms (its profiled nodes {sum(ort.values()):.1f} ms)")
    print(f"{'layer (kind Cin->Cout kernel stride input)':44s} {'n':>3s} {'ms':>7s} {'GMAC/s':>7s} {'ort ms':>7s} "
          f"{'ort GMAC/s':>10s} {'x ort':>6s}")
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for key in sorted(set(ms) | set(ort), key=lambda k: -max(ms.get(k, 0.0), ort.get(k, 0.0))):
        t, o, mm = ms.get(key, float("nan")), ort.get(key, float("nan")), macs.get(key, 0.0)
        rate = f"{mm / t:7.1f}" if mm and t == t else f"{'':7s}"
        orate = f"{mm / o:10.1f}" if mm and o == o else f"{'':10s}"
        ratio = f"{t / o:6.2f}" if t == t and o == o and o > 0 else f"{'':6s}"
        print(f"{key:44s} {count.get(key, 0):3d} {t:7.2f} {rate} {o:7.2f} {orate} {ratio}")
        g = key.split()[0] if key.split()[0] in ("conv", "dw", "deconv") else "other"
        if g == "conv":
            g = "conv 1x1" if " k1x1 " in key else "conv kxk"
        groups[g][0] += t if t == t else 0.0
        groups[g][1] += o if o == o else 0.0
    print("by kind (ms: deltacnn / onnxruntime; onnxruntime's non-conv nodes under other):")
    for g, (t, o) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"   {g:10s} {t:7.2f} {o:7.2f}")


def steady(args) -> None:
    """--steady: consecutive frames as keyframes (state buffers reused), conv_dense timed apart; with
    --variants, one model per variant (cpu_profile.py's switches), interleaved frame by frame, paired."""
    from cpu_profile import ISA_SWITCH, SWITCHES, _module_of, apply_settings, load_base_kernels, parse_variants
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    model, frames = load(args.model, args.start, args.steady + 2)
    variants = parse_variants(args.variants)
    if args.isa:  # --isa avx2,avx512: one variant per micro-kernel ISA (cpu_profile's avx512 switch)
        variants = [(f"{name} {isa}" if name != "default" else isa, {**kv, ISA_SWITCH: float(isa != "avx2")})
                    for name, kv in variants for isa in args.isa.split(",")]
    if args.base_source and all(n != "base" for n, _ in variants):  # a second build of the kernels, first: the
        variants = [("base", {})] + variants  # two-build A/B (a variant named base: that build with its settings)
    defaults = {k: 1.0 if k in SWITCHES or k == ISA_SWITCH else getattr(_module_of(k), k.rsplit(".", 1)[1])
                for _, kv in variants for k in kv}
    spent = [0.0]

    class _Timed:  # the kernel module with conv_dense timed
        def __init__(self, real) -> None:
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def conv_dense(self, *a):
            t0 = clock()
            try:
                return self.real.conv_dense(*a)
            finally:
                spent[0] += clock() - t0

    dms = {}
    for name, kv in variants:
        apply_settings(kv, defaults)  # conversion-time switches act here
        dm = dms[name] = convert_at(model, frames, args.points, 1)
        dm.keyframe_interval = 1
        backend = dm.rt.backend_on(torch.device("cpu"))
        real = load_base_kernels(args.base_source) if name == "base" else backend._k
        backend._k = _Timed(real)
    peer = None
    if args.peer:
        from deltacnn.peers import onnxruntime_peer
        peer = onnxruntime_peer(model, frames[0], threads=args.threads)
    total = {n: [] for n in dms}
    conv = {n: [] for n in dms}
    peer_ms = []
    with torch.no_grad():
        for i, f in enumerate(frames):
            if peer is not None:
                t0 = clock()
                peer(f)
                if i >= 2:
                    peer_ms.append((clock() - t0) * 1e3)
            outs = {}
            for name, kv in variants:
                apply_settings(kv, defaults)
                dm = dms[name]
                spent[0] = 0.0
                t0 = clock()
                outs[name] = dm.dense_frame(f) if args.dense and i else dm(f)
                dt = clock() - t0
                if dm.last_mode != ("dense" if args.dense and i else "keyframe"):
                    raise RuntimeError(f"frame {i} ran as {dm.last_mode}")
                if i >= 2:  # the first two warm up
                    total[name].append(dt * 1e3)
                    conv[name].append(spent[0] * 1e3)
            first = next(iter(outs.values()))
            for name, o in outs.items():
                err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                          for a, b in zip(_flat(o), _flat(first)))
                if err > 1e-3:
                    print(f"   frame {i}: variant {name} differs from {next(iter(outs))} by {err:.1e}")
    apply_settings({}, defaults)
    med = statistics.median
    base = next(iter(dms))
    for name in dms:
        t, c = total[name], conv[name]
        print(f"[{name}] {len(t)} {'dense frames' if args.dense else 'keyframes'} ({args.threads} thread(s), "
              f"{args.clock} clock): median {med(t):.1f} ms "
              f"(mean {statistics.mean(t):.1f}), conv_dense {med(c):.1f} ms, outside conv_dense "
              f"{med([a - b for a, b in zip(t, c)]):.1f} ms")
        if name != base:
            d = [a - b for a, b in zip(t, total[base])]
            o = [(a - ca) - (b - cb) for a, ca, b, cb in zip(t, c, total[base], conv[base])]
            print(f"   paired with [{base}]: {statistics.mean(d):+.1f} ms mean, {med(d):+.1f} median; outside "
                  f"conv_dense {statistics.mean(o):+.1f} mean, {med(o):+.1f} median ({len(d)} keyframes)")
    if peer_ms:
        print(f"onnxruntime, same frames: median {med(peer_ms):.1f} ms (mean {statistics.mean(peer_ms):.1f}); "
              f"keyframe [{base}] / peer {med(total[base]) / med(peer_ms):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov8n", choices=["yolov8n", "centerface"])
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--points", default="", help="thresholds (keyframes do not read them); default: the "
                    "model's shipped file")
    ap.add_argument("--layers", action="store_true", help="per delta layer, against onnxruntime's nodes (above)")
    ap.add_argument("--delta-frames", type=int, default=0, help="--layers: N delta frames at --points instead, each "
                    "layer against its own dense-frame time x its candidate rate")
    ap.add_argument("--stateless", action="store_true", help="--layers: a dense frame (no state), not a keyframe")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--steady", type=int, default=0, help="time N consecutive keyframes instead (see above)")
    ap.add_argument("--peer", action="store_true", help="--steady: onnxruntime on the same frames, interleaved")
    ap.add_argument("--dense", action="store_true", help="--steady: the frames after the first run as stateless dense "
                    "frames (DeltaModel.dense_frame: what the dense fallback runs), not keyframes")
    ap.add_argument("--threads", type=int, default=1, help="--steady only (the per-conv table runs at 1)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="--steady only")
    ap.add_argument("--base-source", default="", help="--steady: also run every frame on a build of this "
                    "cpu_kernels.cpp (the variant ' base'), interleaved: a paired two-build A/B")
    ap.add_argument("--isa", default="", help='micro-kernel ISAs run interleaved, e.g. "avx2,avx512" (paired: the '
                    "last less the first); default: the CPU's best")
    ap.add_argument("--variants", default="default:", help="--steady: A/B variants as cpu_profile.py's, "
                    'e.g. "old:delta_decode=0;new:" (interleaved frame by frame, paired with the first); --layers: '
                    "the first variant's settings")
    args = ap.parse_args()
    if not args.points:
        args.points = SHIPPED[args.model]
    if args.steady:
        return steady(args)
    if args.layers:
        return delta_layers(args) if args.delta_frames else layers(args)
    torch.set_num_threads(1)
    model, frames = load(args.model, args.start, 1)
    dm = convert_at(model, frames, args.points, 1)
    backend = dm.rt.backend_on(torch.device("cpu"))
    calls: list[tuple[str, float, float]] = []  # (shape, ms, MMAC) of each conv_dense call, in order
    real = backend._k.conv_dense

    def timed(x, packed, bias, geo, *rest):
        n, h, w, ho, wo, kh, kw = geo[:7]
        cout = packed.shape[0] * 16
        t0 = time.process_time()
        out = real(x, packed, bias, geo, *rest)
        dt = (time.process_time() - t0) * 1e3
        cin = x.shape[1]
        calls.append((_shape_key(cin, rest[1].shape[1], kh, kw, geo[7], h, w), dt,
                      n * ho * wo * kh * kw * cin * rest[1].shape[1] / 1e6))
        return out

    backend._k = _TimedModule(backend._k, StageClock())
    backend._k.conv_dense = timed
    isas = args.isa.split(",") if args.isa else [backend._k.cpu_isa()]
    frame_ms = {isa: [] for isa in isas}
    per_call = {isa: defaultdict(list) for isa in isas}
    with torch.no_grad():
        for r in range(args.repeats + 1):
            for isa in isas:  # interleaved, so that the load on the machine cancels in the paired numbers
                set_isa(isa)
                calls.clear()
                dm.reset()
                t0 = time.process_time()
                dm(frames[0])
                dt = (time.process_time() - t0) * 1e3
                if r == 0:
                    continue
                frame_ms[isa].append(dt)
                for i, c in enumerate(calls):
                    per_call[isa][i].append(c)
    set_isa("auto")
    order = [per_call[isas[0]][i][0] for i in sorted(per_call[isas[0]])]
    ms = {isa: [statistics.median(c[1] for c in per_call[isa][i]) for i in sorted(per_call[isa])] for isa in isas}
    ort, ort_frame = ({}, float("nan")) if args.no_peer else ort_conv_times(model, frames[0], args.repeats)
    for isa in isas:
        fm = statistics.median(frame_ms[isa])
        print(f"keyframe [{isa}]: median {fm:.1f} ms, conv_dense {sum(ms[isa]):.1f} ms "
              f"({sum(c[2] for c in order) / 1e3:.2f} GMAC), outside conv_dense {fm - sum(ms[isa]):.1f} ms")
    if len(isas) > 1:
        d = [b - a for a, b in zip(frame_ms[isas[0]], frame_ms[isas[-1]])]
        print(f"paired [{isas[-1]}] less [{isas[0]}]: {statistics.median(d):+.1f} ms median, "
              f"{statistics.mean(d):+.1f} mean ({len(d)} keyframes)")
    print(f"onnxruntime frame {ort_frame:.1f} ms, its convs {sum(ort.values()):.1f} ms")
    by_shape: dict[str, list] = defaultdict(lambda: [{isa: 0.0 for isa in isas}, 0.0, 0])
    for i, (shape, _, mmac) in enumerate(order):
        row = by_shape[shape]
        for isa in isas:
            row[0][isa] += ms[isa][i]
        row[1] += mmac
        row[2] += 1
    missing = set(ort) - set(by_shape)
    if missing:
        print(f"(onnxruntime conv shapes deltacnn does not run: {sorted(missing)})")
    head = "".join(f" {'ms ' + isa:>11s} {'GMAC/s':>7s}" for isa in isas)
    print(f"{'conv (Cin->Cout kernel stride input)':40s} {'n':>3s}{head} {'ort ms':>7s} {'ort GMAC/s':>10s}")
    for shape, (t, mmac, k) in sorted(by_shape.items(), key=lambda kv: -kv[1][0][isas[0]]):
        o = ort.get(shape, float("nan"))
        cols = "".join(f" {t[isa]:11.2f} {mmac / t[isa]:7.1f}" for isa in isas)
        print(f"{shape:40s} {k:3d}{cols} {o:7.2f} {mmac / o:10.1f}")

if __name__ == "__main__":
    main()
