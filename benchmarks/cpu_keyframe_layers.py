"""Where a keyframe's CPU time goes, conv by conv, against onnxruntime's own per-node time.

Each keyframe conv of the cpu backend is one C++ pass (conv_dense); this times every call with the
process CPU clock (1 thread: meaningful on a loaded machine) and prints, per conv shape, its time,
GMAC/s and onnxruntime's time for its Conv nodes of the same shape (from onnxruntime's profiler, by
input, weight and output shape), plus the keyframe's time outside conv_dense. onnxruntime's profiler
measures wall clock: on a loaded machine its per-shape times are inflated (compare them on a quiet one).

    PYTHONPATH=/work/shared/bench python3 benchmarks/cpu_keyframe_layers.py --repeats 4

`--isa avx2,avx512` runs each keyframe once per micro-kernel ISA, interleaved (cpu_kernels set_cpu_isa);
with `--steady`, `--base-source old.cpp` also runs each on a second build of the kernels (two-build A/B).

`--reuse-state` times the per-conv table on keyframes of one stream whose state buffers are reused (without it the
model is reset before each keyframe, so the table also pays the state allocations and their page faults);
`--threads` / `--clock wall` run it at another thread count (onnxruntime's per-node times at the same count).

`--steady N` instead runs N consecutive frames as keyframes of one stream (keyframe interval 1: the
state buffers are reused, as on the keyframes of a real run, where the per-conv mode resets the model
and allocates them again) and prints each frame's time, the conv_dense part and the rest; with
`--peer`, onnxruntime on the same frames, interleaved (`--threads 2 --clock wall` on a quiet machine):

    PYTHONPATH=/work/shared/bench python3 benchmarks/cpu_keyframe_layers.py --steady 24 --threads 2 --clock wall --peer

With `--steady`, `--dense` also runs the same frames as stateless dense frames (what the keyframe's state costs) and
`--parts` prints the time per layer kind.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_profile import _TimedModule, StageClock, convert_at, load, set_isa  # noqa: E402


def _shape_key(cin: int, cout: int, kh: int, kw: int, stride: int, h: int, w: int) -> str:
    return f"{cin:3d}->{cout:3d} k{kh}x{kw} s{stride} {h}x{w}"


def ort_conv_times(model, x: torch.Tensor, repeats: int, clock=time.process_time) -> tuple[dict[str, float], float]:
    """onnxruntime's time per conv shape (ms: the sum over its Conv nodes of that shape, median over
    `repeats` runs; shapes from the profiler's input/weight/output shapes) and its frame time."""
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
            t0 = clock()
            sess.run(None, {name: arr})
            frame.append((clock() - t0) * 1e3)
        events = json.loads(Path(sess.end_profiling()).read_text())
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs: list[dict[str, float]] = [defaultdict(float) for _ in spans]
    ops: list[dict[str, float]] = [defaultdict(float) for _ in spans]  # per op type (Sigmoid, Mul, Concat, ...)
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            for i, (a, b) in enumerate(spans):
                if a <= e["ts"] <= b:
                    ops[i][args.get("op_name", "?")] += e["dur"] / 1e3
                    break
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or "Conv" not in args.get("op_name", ""):
            continue
        (xs,), (ws,) = args["input_type_shape"][0].values(), args["input_type_shape"][1].values()
        (os,) = args["output_type_shape"][0].values()
        key = _shape_key(ws[1], ws[0], ws[2], ws[3], xs[2] // os[2], xs[2], xs[3])
        for i, (a, b) in enumerate(spans):  # the run whose span holds this node
            if a <= e["ts"] <= b:
                runs[i][key] += e["dur"] / 1e3
                break
    runs, ops = runs[1:], ops[1:]  # the first run warms up
    keys = set().union(*runs)
    op_ms = {k: statistics.median(r.get(k, 0.0) for r in ops) for k in set().union(*ops)}
    print("onnxruntime per op type (profiler, wall clock, median of runs): " +
          ", ".join(f"{k} {v:.2f}" for k, v in sorted(op_ms.items(), key=lambda kv: -kv[1])))
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}, statistics.median(frame[1:])


class _LayerParts:
    """--parts: each leaf delta layer's time on the counted frames of the first variant, by layer kind (a conv's
    conv_dense apart; the hooks' own cost, ~2 us a layer, lands in the layers' rows)."""

    def __init__(self, dm, clock, spent: list[float]) -> None:
        self.clock, self.spent, self.frame = clock, spent, False
        self.ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._t: dict[int, tuple[float, float]] = {}
        from deltacnn.layers.base import DeltaLayer
        for m in dm.modules():
            if isinstance(m, DeltaLayer) and not any(isinstance(c, DeltaLayer) for c in m.children()):
                m.register_forward_pre_hook(self._pre)
                m.register_forward_hook(self._post)

    def _pre(self, m, _args) -> None:
        if self.frame:
            self._t[id(m)] = (self.clock(), self.spent[0])

    def _post(self, m, _args, _out) -> None:
        if not self.frame or id(m) not in self._t:
            return
        t0, s0 = self._t.pop(id(m))
        dt, ds = self.clock() - t0, self.spent[0] - s0
        key = m.kind
        if m.kind == "conv":
            self.ms["conv: conv_dense"] += ds * 1e3
            key = "conv: the rest (Python, dispatch)"
        self.ms[key] += (dt - ds) * 1e3
        self.calls[key] += 1

    def report(self, frames: int) -> None:
        print(f"per layer kind, ms a keyframe (mean of {frames} frames):")
        for k, v in sorted(self.ms.items(), key=lambda kv: -kv[1]):
            print(f"   {k:36s} {v / frames:7.2f}  ({self.calls.get(k, 0) // max(frames, 1)} calls)")
        print(f"   {'sum over layers':36s} {sum(self.ms.values()) / frames:7.2f}")


def steady(args) -> None:
    """--steady: consecutive frames as keyframes (state buffers reused), conv_dense timed apart; with
    --variants, one model per variant (cpu_profile.py's switches), interleaved frame by frame, paired."""
    from cpu_profile import ISA_SWITCH, SWITCHES, _module_of, apply_settings, load_base_kernels, parse_variants
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    model, frames = load("yolov8n", args.start, args.steady + 2)
    variants = parse_variants(args.variants)
    if args.isa:  # --isa avx2,avx512: one variant per micro-kernel ISA (cpu_profile's avx512 switch)
        variants = [(f"{name} {isa}" if name != "default" else isa, {**kv, ISA_SWITCH: float(isa != "avx2")})
                    for name, kv in variants for isa in args.isa.split(",")]
    if args.base_source:  # a second build of the kernels, first: the two-build A/B
        variants = [("base", {})] + variants
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

    if args.dense:  # the same frames as stateless dense frames (DeltaModel.dense_frame): no state written
        variants = variants + [("dense", {})]
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
    base = next(iter(dms))
    parts = _LayerParts(dms[base], clock, spent) if args.parts else None
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
                if parts is not None and name == base:
                    parts.frame = i >= 2
                t0 = clock()
                outs[name] = dm.dense_frame(f) if name == "dense" else dm(f)
                dt = clock() - t0
                if parts is not None:
                    parts.frame = False
                if dm.last_mode != ("dense" if name == "dense" else "keyframe"):
                    raise RuntimeError(f"frame {i} of {name} ran as {dm.last_mode}")
                if i >= 2:  # the first two warm up
                    total[name].append(dt * 1e3)
                    conv[name].append(spent[0] * 1e3)
            first = next(iter(outs.values()))
            for name, o in outs.items():
                err = float((o - first).abs().max() / first.abs().max().clamp_min(1e-12))
                if err > 1e-3:
                    print(f"   frame {i}: variant {name} differs from {next(iter(outs))} by {err:.1e}")
    apply_settings({}, defaults)
    med = statistics.median
    for name in dms:
        t, c = total[name], conv[name]
        print(f"[{name}] {len(t)} keyframes ({args.threads} thread(s), {args.clock} clock): median {med(t):.1f} ms "
              f"(mean {statistics.mean(t):.1f}), conv_dense {med(c):.1f} ms, outside conv_dense "
              f"{med([a - b for a, b in zip(t, c)]):.1f} ms")
        if name != base:
            d = [a - b for a, b in zip(t, total[base])]
            o = [(a - ca) - (b - cb) for a, ca, b, cb in zip(t, c, total[base], conv[base])]
            print(f"   paired with [{base}]: {statistics.mean(d):+.1f} ms mean, {med(d):+.1f} median; outside "
                  f"conv_dense {statistics.mean(o):+.1f} mean, {med(o):+.1f} median ({len(d)} keyframes)")
    if parts is not None:
        parts.report(len(total[base]))
    if peer_ms:
        print(f"onnxruntime, same frames: median {med(peer_ms):.1f} ms (mean {statistics.mean(peer_ms):.1f}); "
              f"keyframe [{base}] / peer {med(total[base]) / med(peer_ms):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--points", default="deltacnn/data/yolov8n_vtest.json")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--steady", type=int, default=0, help="time N consecutive keyframes instead (see above)")
    ap.add_argument("--peer", action="store_true", help="--steady: onnxruntime on the same frames, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="(onnxruntime's per-node times at the same count)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--reuse-state", action="store_true", help="per-conv table: keyframes of one stream with their "
                    "state buffers reused (as --steady), instead of a reset (and new buffers) before each")
    ap.add_argument("--dense", action="store_true", help="--steady: also the same frames as stateless dense frames "
                    "(DeltaModel.dense_frame, the variant 'dense'): what the keyframe's state costs")
    ap.add_argument("--parts", action="store_true", help="--steady: the first variant's time per layer kind")
    ap.add_argument("--base-source", default="", help="--steady: also run every frame on a build of this "
                    "cpu_kernels.cpp (the variant ' base'), interleaved: a paired two-build A/B")
    ap.add_argument("--isa", default="", help='micro-kernel ISAs run interleaved, e.g. "avx2,avx512" (paired: the '
                    "last less the first); default: the CPU's best")
    ap.add_argument("--variants", default="default:", help="--steady only: A/B variants as cpu_profile.py's, "
                    'e.g. "old:delta_decode=0;new:" (interleaved frame by frame, paired with the first)')
    args = ap.parse_args()
    if args.steady:
        return steady(args)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    model, frames = load("yolov8n", args.start, 1)
    dm = convert_at(model, frames, args.points, 1)
    if args.reuse_state:  # every run a keyframe of one stream, its state buffers reused (no reset, no allocation)
        dm.keyframe_interval = 1
    backend = dm.rt.backend_on(torch.device("cpu"))
    calls: list[tuple[str, float, float]] = []  # (shape, ms, MMAC) of each conv_dense call, in order
    real = backend._k.conv_dense

    def timed(x, packed, bias, geo, *rest):
        n, h, w, ho, wo, kh, kw = geo[:7]
        cout = packed.shape[0] * 16
        t0 = clock()
        out = real(x, packed, bias, geo, *rest)
        dt = (clock() - t0) * 1e3
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
                if not args.reuse_state:
                    dm.reset()
                t0 = clock()
                dm(frames[0])
                dt = (clock() - t0) * 1e3
                if r == 0:
                    continue
                frame_ms[isa].append(dt)
                for i, c in enumerate(calls):
                    per_call[isa][i].append(c)
    set_isa("auto")
    order = [per_call[isas[0]][i][0] for i in sorted(per_call[isas[0]])]
    ms = {isa: [statistics.median(c[1] for c in per_call[isa][i]) for i in sorted(per_call[isa])] for isa in isas}
    ort, ort_frame = ({}, float("nan")) if args.no_peer else ort_conv_times(model, frames[0], args.repeats, clock)
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
