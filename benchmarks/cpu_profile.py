"""Where a delta frame's CPU time goes, by stage: the C++ kernels, GEMMs, dense convs, ATen
activations, the other backend code and what is outside the backend (layer Python, dispatch).

Every backend method and every C++ kernel call is timed with the process CPU clock on a stack, so
each stage's number is its *exclusive* time (a backend method's own Python and small torch ops,
without the kernels it calls); "outside backend" is the frame's time minus all of it. Use with
1 thread (`--threads 1`, default) on a loaded machine; the wrappers cost ~1 us a call, about 0.3
ms of a YOLOv8n frame.

    python3 benchmarks/cpu_profile.py --model yolov8n --start 200 --frames 12 --points 0.08/0.10
    python3 benchmarks/cpu_profile.py --model yolov8n --points r0.64/0 --min-blob 3

A point "r<in>/<layer>" is in relative units (deltacnn.calibration: input a fraction of the frame's
range, layers a fraction of their keyframe scale); "<in>/<layer>" absolute. The first frame
(--start) is the keyframe; the next is left out as warm-up.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn
sys.path.insert(0, str(Path(__file__).resolve().parent))
import deltacnn  # noqa: E402
from deltacnn.backends import cpu_fused, cpu_kernels  # noqa: E402
from deltacnn.backends.reference import ReferenceBackend  # noqa: E402
from deltacnn.tensor import new_cl  # noqa: E402
from cpu_models import convert_at as _convert_at, load_frames  # noqa: E402

CLOCK = [time.process_time]  # --clock wall swaps in perf_counter (quiet machines, several threads)


class StageClock:
    """Exclusive CPU time per stage name, from nested timed calls."""

    def __init__(self) -> None:
        self.excl: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [name, start, child time]

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            self._stack.append([name, CLOCK[0](), 0.0])
            try:
                return fn(*a, **k)
            finally:
                nm, t0, child = self._stack.pop()
                dt = CLOCK[0]() - t0
                self.excl[nm] += dt - child
                self.calls[nm] += 1
                if self._stack:
                    self._stack[-1][2] += dt
        return timed

    def reset(self) -> None:
        self.excl.clear()
        self.calls.clear()


class _TimedModule:
    """The C++ kernel module with each function timed as 'k:<name>' (a DeltaConvPlan's run as
    'k:DeltaConvPlan.run')."""

    def __init__(self, mod, clock: StageClock) -> None:
        for name in dir(mod):
            f = getattr(mod, name)
            if name == "DeltaConvPlan":
                setattr(self, name, lambda *a, _f=f: _TimedPlan(_f(*a), clock))
            elif isinstance(f, type):  # other classes (OutputBuffer) as they are
                setattr(self, name, f)
            elif callable(f) and not name.startswith("_"):
                setattr(self, name, clock.wrap("k:" + name, f))


class _TimedPlan:
    """A DeltaConvPlan whose run and run_cat are timed."""

    def __init__(self, plan, clock: StageClock) -> None:
        self.run = clock.wrap("k:DeltaConvPlan.run", plan.run)
        self.run_cat = clock.wrap("k:DeltaConvPlan.run_cat", plan.run_cat)


def load_base_kernels(source: str):
    """Another build of the C++ kernels (e.g. `git show ed47ec8:deltacnn/backends/cpu_kernels.cpp`), for the
    variant key base_kernels=1: the C++ changes A/B'd in one process against the same Python."""
    from deltacnn.backends.cpu_kernels import _cpp_extension, load as load_kernels
    if load_kernels() is None:  # first (a base build that registers DeltaConvPlan globally must come second)
        raise SystemExit("the library's CPU kernels do not load here")
    return _cpp_extension().load(name="deltacnn_cpu_kernels_base", sources=[source], extra_cflags=["-O3", "-fopenmp"],
                                 extra_ldflags=["-fopenmp"], verbose=False)


BACKEND_METHODS = ["conv_block", "dense_conv", "frame_range", "sparsify_blobs", "conv2d", "add", "cat", "channel_slice", "accumulate", "sparsify", "maxpool", "dense_linear",
                   "pointwise", "scale", "_candidates", "_taps", "_act_rows", "_dense_act_block", "_emit_f",
                   "_pixel_rows"]


def instrument(backend, clock: StageClock) -> None:
    """Time the backend's methods (instance attributes, so only this backend), its kernels, its GEMMs
    (_conv_rows less its tap gather), dense convs and ATen activations."""
    if isinstance(backend, cpu_fused.FusedCpuBackend):
        backend._k = _TimedModule(backend._k, clock)
    for m in BACKEND_METHODS:
        if hasattr(backend, m):  # a variant's earlier timer of the shared backend, else the class's method at each
            # call (a Wrap switch, e.g. pointwise_update, patches the class between the variants' frames)
            inner = backend.__dict__.get(m) or (lambda *a, _m=m, **k: getattr(type(backend), _m)(backend, *a, **k))
            setattr(backend, m, clock.wrap("b:" + m, inner))
    backend._conv_rows = clock.wrap("gemm (_conv_rows less gathers)", backend._conv_rows)
    dense = type(backend)._dense_conv
    backend._dense_conv = clock.wrap("dense conv", dense)


def patch_acts(clock: StageClock) -> None:
    from deltacnn.activations import ActSpec
    ActSpec.apply_ = clock.wrap("aten activation", ActSpec.apply_)


def load(model_name: str, start: int, count: int):
    """The model and `count` frames of vtest.avi from `start` (YOLOv8n: 0-1; CenterFace: 0-255)."""
    from cpu_real import load_model
    model, _, _ = load_model(model_name, [], None)
    return model, load_frames(count, model_name == "yolov8n", start)


def convert_at(model, frames, point: str, min_blob: int):
    if point.endswith(".json"):  # a thresholds file (its min_blob and refresh rule too), as `deltacnn run` loads it
        from deltacnn.commands.common import build_delta
        return build_delta(model, frames[0], thresholds=point, dense_above=None)
    return _convert_at(model, frames[0], point, min_blob)


class Wrap(NamedTuple):
    """A switch's off state that is not a check returning a constant: `make(original)` is what replaces the
    attribute (for fast paths the library has no check for, e.g. a conv's output reuse: the switch's code
    lives here, not in the library)."""

    make: Callable[[Callable], Callable]


def _conv_call_without_reuse(original: Callable) -> Callable:
    """FusedCpuBackend._conv_call whose DeltaConvPlan writes a new output ext every frame (reuse False)."""
    def conv_call(self, d, p, spec):
        k = self._k

        class _NoReuse:  # the kernel module, its DeltaConvPlan made with reuse=False
            def __getattr__(self, name):
                f = getattr(k, name)
                return (lambda *a: f(*a[:-1], False)) if name == "DeltaConvPlan" else f
        self._k = _NoReuse()
        try:
            return original(self, d, p, spec)
        finally:
            self._k = k
    return conv_call


def _conv_block_without_residual_linear(original: Callable) -> Callable:
    """FusedCpuBackend.conv_block that sends a linear conv with a residual to the multi-call path."""
    def conv_block(self, d, p, residual, act):
        if act is None and residual is not None:
            return self._conv_block_calls(d, p, residual, act)
        return original(self, d, p, residual, act)
    return conv_block


def _dense_conv_without_depthwise(original: Callable) -> Callable:
    """FusedCpuBackend._dense_conv_ok that declines a depthwise conv (ATen's grouped conv runs its dense frame)."""
    def dense_conv_ok(self, x, p, bias, residual, act):
        return p.groups == 1 and original(self, x, p, bias, residual, act)
    return dense_conv_ok


def _new_dense_out(original: Callable) -> Callable:
    """FusedCpuBackend._dense_out that makes a new buffer every dense frame (none from the backend's pool)."""
    def dense_out(self, shape):
        return new_cl(*shape, dtype=torch.float32, device="cpu")
    return dense_out


def _pointwise_by_reference(original: Callable) -> Callable:
    """FusedCpuBackend.pointwise that sends a piecewise-linear activation to the reference's ATen ops."""
    def pointwise(self, d, st):
        if cpu_kernels.ACT_CODES.get(st.act.kind) is not None:
            return ReferenceBackend.pointwise(self, d, st)
        return original(self, d, st)
    return pointwise


def _fold_batchnorms_but_transposed(original: Callable) -> Callable:
    """deltacnn.convert.fold_batchnorms that leaves a batch norm after a transposed conv (a DeltaScale then): its
    gate track_running_stats is off while the original folds, so that only the others fold."""
    def fold_batchnorms(gm):
        modules = dict(gm.named_modules())
        kept = [modules[n.target] for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(modules.get(n.target), torch.nn.BatchNorm2d)
                and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_module"
                and isinstance(modules.get(n.args[0].target), torch.nn.ConvTranspose2d)
                and modules[n.target].track_running_stats]
        for bn in kept:
            bn.track_running_stats = False
        try:
            return original(gm)
        finally:
            for bn in kept:
                bn.track_running_stats = True
    return fold_batchnorms


# A/B switches of the cpu backend's fast paths. The library has no switches: each fast path has one
# capability check, and a switch set to 0 patches that check to decline (its value when off), so the
# generic code runs, or (Wrap) replaces a method by one that takes the generic path; 1 restores it. The
# names of the former module constants are accepted too.
SWITCHES = {  # name -> (module, attribute path of the check, what it returns when off, or a Wrap)
    "implicit_gemm": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._implicit_gemm_ok", False),
    "fused_epilogue": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._epilogue_ok", False),
    "one_frame_block": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._one_frame_block_ok", False),
    "plain_conv_delta": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._plain_conv_ok", False),
    "dense_conv": ("deltacnn.backends.cpu_fused", "FusedCpuBackend.fuses_dense_conv", False),
    "fused_blobs": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._blobs_ok", False),
    "fused_range": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._range_ok", False),
    "cpu_decode": ("deltacnn.models.yolov8", "_cpu_decode_ok", None),
    # conversion-time: off, convert writes an open spatial dim of x[:, a:b] as slice(0, H, 1) (session 10)
    "open_slice": ("deltacnn.convert", "_open", False),
    # off: 1x1 convs run the candidates pass too (session 10)
    "pointwise_candidates": ("deltacnn.backends.cpu_fused", "_pointwise", False),
    # off: nearest upsampling runs on the zero-filled delta (dense_linear), as in session 10
    "nearest_upsample": ("deltacnn.backends.cpu_fused", "FusedCpuBackend.upsample_nearest", None),
    # conversion-time: off, the box decode is a Densify per head map + the full decode (DenseCall), as in
    # session 11; on, DeltaBoxDecode reads the head's delta streams (and the Detect cats' parts in place)
    "delta_decode": ("deltacnn.convert", "_delta_tail_of", None),
    # off: DeltaBoxDecode decodes every anchor of its O maps each frame (no re-decode of changed anchors only)
    "decode_at": ("deltacnn.models.yolov8", "_delta_decode_ok", None),
    # conversion-time: off, a cat keeps C2f's y[:, :c], y[:, c:] as two parts (session 11) instead of reading y
    "join_slices": ("deltacnn.convert", "_Converter._channel_range", None),
    # off: a densified output's O += d by the reference's index_select + index_add
    "cpu_accumulate": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._accumulate_ok", False),
    # off: a delta conv takes session 11's calls (candidates, then conv_act_rows / conv_rows_delta / the
    # reference's hooks) instead of one DeltaConvPlan.run
    "one_call": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._one_call_ok", False),
    # off: each delta conv's one call writes a new output ext (plans are made at a model's first delta frame)
    "reuse_output": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._conv_call", Wrap(_conv_call_without_reuse)),
    # off: a linear conv with a residual runs the reference's conv_rows + ATen gather, add, index_copy
    "residual_linear": ("deltacnn.backends.cpu_fused", "FusedCpuBackend.conv_block",
                        Wrap(_conv_block_without_residual_linear)),
    # off: a depthwise conv's dense frame is ATen's grouped conv, then the activation and the state copies
    "dense_depthwise": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._dense_conv_ok",
                        Wrap(_dense_conv_without_depthwise)),
    # off: a dense frame's conv output is a new buffer every frame (fresh pages, a fault each)
    "reuse_dense_out": ("deltacnn.backends.cpu_fused", "FusedCpuBackend._dense_out", Wrap(_new_dense_out)),
    # off: a piecewise-linear activation layer on deltas runs the reference's ATen ops
    "pointwise_update": ("deltacnn.backends.cpu_fused", "FusedCpuBackend.pointwise", Wrap(_pointwise_by_reference)),
    # off: a delta frame's cat that feeds a 1x1 conv alone is written (merge_streams) instead of read in place
    "cat_in_place": ("deltacnn.backends.cpu_fused", "FusedCpuBackend.cat_in_place", None),
    # off: a keyframe's cat that feeds a 1x1 conv alone is written (torch.cat), not read by conv_dense (session 19)
    "keyframe_cats_in_place": ("deltacnn.backends.cpu_fused", "FusedCpuBackend.dense_cat_in_place", None),
    # conversion-time: off, a batch norm after a transposed conv stays a DeltaScale (session 12)
    "fold_deconv_bn": ("deltacnn.convert", "fold_batchnorms", Wrap(_fold_batchnorms_but_transposed)),
}
# the micro-kernels' vector ISA (cpu_kernels.cpp set_cpu_isa): avx512=0 runs the AVX2 kernels on an AVX-512 CPU
ISA_SWITCH = "avx512"
# variant keys applied when a variant's model is built, not switches: base_kernels=1 runs that model on
# the build of --base-kernels (needs one_call=0 when that source has no DeltaConvPlan)
BUILD_KEYS = {"base_kernels"}
FORMER_NAMES = {"cpu_fused.IMPLICIT_GEMM": "implicit_gemm", "cpu_fused.FUSED_EPILOGUE": "fused_epilogue",
                "cpu_fused.DENSE_CONV": "dense_conv", "cpu_fused.FUSED_BLOBS": "fused_blobs",
                "cpu_fused.FUSED_RANGE": "fused_range", "deltacnn.models.yolov8.CPU_DECODE": "cpu_decode"}


def _switch_owner(name: str):
    """(the object holding the check, its attribute name) of switch `name`."""
    import importlib
    mod, path, _ = SWITCHES[name]
    owner = importlib.import_module(mod)
    *parents, attr = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr


_ORIGINAL_CHECKS = {name: getattr(*_switch_owner(name)) for name in SWITCHES}


def _set_switch(name: str, on: bool) -> None:
    owner, attr = _switch_owner(name)
    off = SWITCHES[name][2]
    original = _ORIGINAL_CHECKS[name]
    if on:
        setattr(owner, attr, original)
    else:
        setattr(owner, attr, off.make(original) if isinstance(off, Wrap) else (lambda *a, **k: off))


def parse_variants(spec: str) -> list[tuple[str, dict[str, float]]]:
    """"old:dense_conv=0,cpu_decode=0;new:" -> [(name, {key: value})]: keys are SWITCHES (or their former
    constant names, FORMER_NAMES) or module attributes ("reference.DENSE_SWITCH" under deltacnn.backends,
    or a full "deltacnn.X.Y")."""
    out = []
    for part in spec.split(";"):
        name, _, sets = part.partition(":")
        kv = {}
        for a in filter(None, sets.split(",")):
            k, _, v = a.partition("=")
            k = FORMER_NAMES.get(k, k)
            if k not in SWITCHES and k != ISA_SWITCH and k not in BUILD_KEYS:
                _module_of(k)  # a bad module name fails here, before any frame runs
            kv[k] = float(v)
        out.append((name, kv))
    return out


def _module_of(key: str):
    """The module of a setting: "cpu_fused.X" (under deltacnn.backends) or a full "deltacnn.models.yolov8.X"."""
    import importlib
    mod = key.rsplit(".", 1)[0]
    return importlib.import_module(mod if mod.startswith("deltacnn.") else "deltacnn.backends." + mod)


def set_isa(name: str) -> str:
    """Switch the CPU kernels' micro-kernels to "avx2", "avx512" or "auto"; returns the previous ISA."""
    from deltacnn.backends.cpu_kernels import load
    return load().set_cpu_isa(name)


def apply_settings(kv: dict[str, float], defaults: dict[str, object]) -> None:
    for k, v in {**defaults, **kv}.items():
        if k == ISA_SWITCH:
            set_isa("auto" if v else "avx2")
            continue
        if k in BUILD_KEYS:
            continue
        if k in SWITCHES:
            _set_switch(k, bool(v))
            continue
        attr = k.rsplit(".", 1)[1]
        m = _module_of(k)
        old = getattr(m, attr)
        setattr(m, attr, type(old)(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov8n", choices=["yolov8n", "centerface"])
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process CPU time (1 thread on a loaded machine); wall: for several threads, quiet machine")
    ap.add_argument("--peer", action="store_true",
                    help="also time the CPU peers (torch channels_last, onnxruntime) on the same frames, interleaved")
    ap.add_argument("--points", default="0.08/0.10",
                    help='comma-separated points "<in>/<layer>", "r<in>/<layer>" or a thresholds file (*.json, with '
                         "its min_blob and refresh rule: keyframes then come when the file's rule says)")
    ap.add_argument("--min-blob", type=int, default=1)
    ap.add_argument("--variants", default="default:",
                    help='A/B variants run interleaved frame by frame, e.g. "old:dense_conv=0,cpu_decode=0;new:": '
                         f"switches ({', '.join(SWITCHES)}, {ISA_SWITCH}; 0 turns that fast path off) or module attributes "
                         "(reference.DENSE_SWITCH=0.5 under deltacnn.backends, or full names); unset ones keep their defaults")
    ap.add_argument("--stages", action="store_true", help="per-stage table (wrappers cost ~1 us a call)")
    ap.add_argument("--base-kernels", metavar="SOURCE.cpp",
                    help="another cpu_kernels.cpp, built once as deltacnn_cpu_kernels_base, for variants with base_kernels=1")
    ap.add_argument("--base-source", default="", metavar="SOURCE.cpp",
                    help="a variant 'base' first (base_kernels=1) on a second build of this cpu_kernels.cpp (e.g. the "
                         "previous commit's): a paired two-build A/B in one process (not with --stages)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "wall":
        CLOCK[0] = time.perf_counter
    model, frames = load(args.model, args.start, args.frames)
    variants = parse_variants(args.variants)
    if args.base_source:
        variants = [("base", {"base_kernels": 1.0})] + variants
        args.base_kernels = args.base_source
    defaults = {k: 1.0 if k in SWITCHES or k == ISA_SWITCH else getattr(_module_of(k), k.rsplit(".", 1)[1])
                for _, kv in variants for k in kv if k not in BUILD_KEYS}
    kernels = {}  # variant -> its kernel module, where not the default build (base_kernels=1)
    if any(kv.get("base_kernels") for _, kv in variants):
        if not args.base_kernels:
            raise SystemExit("base_kernels=1 needs --base-kernels SOURCE.cpp")
        base_kernels = load_base_kernels(args.base_kernels)
        kernels = {name: base_kernels for name, kv in variants if kv.get("base_kernels")}
    clocks = {name: StageClock() for name, _ in variants}
    if args.stages:
        patch_acts(_Router(clocks))
    peers = []
    if args.peer:
        from deltacnn.peers import build_peers
        peers, rejected = build_peers(model, frames[0], threads=args.threads, only=["channels_last", "onnxruntime"])
        for k, why in rejected.items():
            print(f"peer {k} left out: {why}")
    for point in args.points.split(","):
        dms = {}
        for name, kv in variants:
            apply_settings(kv, defaults)  # conversion-time switches (open_slice) act here
            dms[name] = convert_at(model, frames, point, args.min_blob)
            if args.stages:
                instrument(dms[name].rt.backend_on(torch.device("cpu")), clocks[name])
        totals = {n: [] for n in dms}
        faults = {n: [] for n in dms}  # minor page faults a frame (fresh pages of new buffers)
        modes = {n: [] for n in dms}
        macs = {n: [] for n in dms}
        agg = {n: defaultdict(lambda: defaultdict(list)) for n in dms}  # variant -> frame mode -> stage -> ms
        outs = {n: None for n in dms}
        peer_ms = {p.name: [] for p in peers}
        with torch.no_grad():
            for dm in dms.values():
                dm.reset()
            for i, f in enumerate(frames):
                for peer in peers:
                    t0 = CLOCK[0]()
                    peer(f)
                    if i >= 2:
                        peer_ms[peer.name].append((CLOCK[0]() - t0) * 1e3)
                for name, kv in variants:
                    apply_settings(kv, defaults)
                    _Router.current = name
                    dm, clock = dms[name], clocks[name]
                    backend = dm.rt.backend_on(torch.device("cpu"))
                    if kernels:  # this variant's build (the backend may be shared by the variants)
                        if not hasattr(backend, "_own_k"):
                            backend._own_k = backend._k
                        backend._k = kernels.get(name, backend._own_k)
                    backend.work = [0, 0]
                    clock.reset()
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = CLOCK[0]()
                    outs[name] = dm(f)
                    dt = CLOCK[0]() - t0
                    if i < 2:
                        continue
                    faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                    totals[name].append(dt * 1e3)
                    modes[name].append(dm.last_mode)
                    macs[name].append(backend.work[0] / max(1, backend.work[1]))
                    if args.stages:
                        inside = sum(clock.excl.values())
                        for k, v in clock.excl.items():
                            agg[name][dm.last_mode][k].append(v * 1e3)
                        agg[name][dm.last_mode]["outside backend (layers, dispatch)"].append((dt - inside) * 1e3)
                first = next(iter(outs.values()))
                for name, o in outs.items():  # every variant computes the same frame
                    err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                              for a, b in zip(_flat(o), _flat(first)))
                    if err > 1e-3:
                        print(f"   frame {i}: variant {name} differs from {next(iter(outs))} by {err:.1e}")
        apply_settings({}, defaults)
        if peer_ms:
            best = min(peer_ms, key=lambda k: statistics.median(peer_ms[k]))
            for k, ms in peer_ms.items():
                print(f"\n== {k}{' (the peer: the faster)' if k == best else ''}, same frames: median "
                      f"{statistics.median(ms):.1f} ms, mean {statistics.mean(ms):.1f}")
        for name in dms:
            n = len(totals[name])
            gate = "the file's gate" if point.endswith(".json") else f"min_blob {args.min_blob}"
            print(f"\n== {args.model} {point} {gate} [{name}]: frame "
                  f"{statistics.median(totals[name]):.1f} ms (median of {n}; mean {statistics.mean(totals[name]):.1f}), "
                  f"conv MACs {statistics.median(macs[name]):.1%}")
            for mode in sorted(set(modes[name])):
                ms = [t for t, m in zip(totals[name], modes[name]) if m == mode]
                fl = [x for x, m in zip(faults[name], modes[name]) if m == mode]
                print(f"   {mode} frames: {len(ms)}, median {statistics.median(ms):.1f} ms, mean {statistics.mean(ms):.1f}; "
                      f"minor page faults {statistics.mean(fl):.0f} a frame")
            if name != next(iter(dms)):  # paired: this variant less the first one, frame by frame
                base = next(iter(dms))
                for mode in sorted(set(modes[name])):
                    diff = [t - tb for t, tb, m, mb in zip(totals[name], totals[base], modes[name], modes[base])
                            if m == mb == mode]
                    if diff:
                        print(f"   paired with [{base}], {mode} frames: {statistics.mean(diff):+.1f} ms mean, "
                              f"{statistics.median(diff):+.1f} median ({len(diff)} frames)")
            if args.stages:
                for mode, stages in sorted(agg[name].items()):
                    n_mode = modes[name].count(mode)
                    print(f"   stages of the {mode} frames (ms a frame, mean of {n_mode}):")
                    for k, v in sorted(stages.items(), key=lambda kv: -sum(kv[1])):
                        print(f"     {k:44s} {sum(v) / n_mode:8.2f} ms/frame   calls {clocks[name].calls.get(k, 0):4d}")


class _Router:
    """Sends the shared ATen-activation wrapper's time to the running variant's clock."""

    current = ""

    def __init__(self, clocks: dict[str, StageClock]) -> None:
        self.clocks = clocks

    def wrap(self, name, fn):
        wrapped = {k: c.wrap(name, fn) for k, c in self.clocks.items()}
        return lambda *a, **k: wrapped[_Router.current](*a, **k)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat(o)]


if __name__ == "__main__":
    main()
