"""Where a delta frame's time goes by layer kind: each delta layer's exclusive time (its Python and the
backend's, without the C++ kernels), the kernels it calls, and for convs the multiply-adds done and GMAC/s.

cpu_profile.py --stages splits a frame by backend method and kernel; this splits it by what the network
does (convs by shape, cats, slices, upsampling, max pooling, the input layer, the box decode), so that the
per-layer Python (layer forward, backend method, pybind) and each op kind's kernels can be read apart, and
runs at 1 and 2 threads give each kind's scaling. Wrappers cost ~1 us a call (~200 calls a YOLOv8n frame).

    python3 benchmarks/cpu_delta_layers.py --points deltacnn/data/yolov8n_vtest.json --frames 24 --threads 1
    python3 benchmarks/cpu_delta_layers.py --points deltacnn/data/yolov8n_vtest.json --threads 2 --clock wall
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_profile import CLOCK, StageClock, _TimedModule, convert_at, load  # noqa: E402
from deltacnn.backends import cpu_fused  # noqa: E402
from deltacnn.layers import DeltaConv2d  # noqa: E402
from deltacnn.layers.base import DeltaLayer  # noqa: E402


def layer_kind(m: DeltaLayer, channels: bool = False) -> str:
    """A layer's row in the table: convs by window, stride, groups, activation and residual (and with `channels`,
    Cin->Cout: the narrow high-resolution layers apart from the deep ones)."""
    if isinstance(m, DeltaConv2d):
        w = m.window
        s = f"conv {w.kernel[0]}x{w.kernel[1]} s{w.stride[0]}"
        if m.groups > 1:
            s += " dw"
        s += " +act" if m.act is not None else " linear"
        s += " +res" if m.residual else ""
        return s + (f" {m.weight.shape[1] * m.groups}->{m.weight.shape[0]}" if channels else "")
    return type(m).__name__


class _Current:
    """The layer kind running now, for the kernels' rows."""
    kind = "(outside layers)"


def instrument(dm, clock: StageClock, macs: dict[str, list[int]], channels: bool = False) -> int:
    """Time every delta layer (exclusive) and every kernel call (under the running layer's kind); count each
    conv's multiply-adds done (backend.work) into macs[kind]. Returns the number of layers wrapped."""
    backend = dm.rt.backend_on(torch.device("cpu"))
    if isinstance(backend, cpu_fused.FusedCpuBackend):
        k = backend._k

        class _Routed:
            def __getattr__(self, name):
                f = getattr(k, name)
                if name == "DeltaConvPlan":
                    def plan(*a):
                        p = f(*a)

                        class _P:
                            def run(self, *ra):
                                return clock.wrap(_Current.kind + " | k:DeltaConvPlan.run", p.run)(*ra)

                            def run_cat(self, *ra):
                                return clock.wrap(_Current.kind + " | k:DeltaConvPlan.run_cat", p.run_cat)(*ra)
                        return _P()
                    return plan
                if callable(f) and not isinstance(f, type):
                    return lambda *a, **kw: clock.wrap(_Current.kind + " | k:" + name, f)(*a, **kw)
                return f
        backend._k = _Routed()
    count = 0
    for _, m in dm.graph_module.named_modules():
        if not isinstance(m, DeltaLayer):
            continue
        kind = layer_kind(m, channels)
        fwd = m.forward

        def timed(*a, _fwd=fwd, _kind=kind, _conv=isinstance(m, DeltaConv2d), **kw):
            prev, _Current.kind = _Current.kind, _kind
            w0 = backend.work[0] if _conv else 0
            try:
                return clock.wrap(_kind, _fwd)(*a, **kw)
            finally:
                _Current.kind = prev
                if _conv:
                    macs[_kind].append(backend.work[0] - w0)
        m.forward = timed
        count += 1
    return count


def bare(dm, frames, repeats: int) -> None:
    """The frames `repeats` times without wrappers; prints the delta frames' mean time. With PERF_CTL=FIFO (perf
    record --control fifo:FIFO -D -1 ...) perf is enabled only around the frames (not the model's loading)."""
    import os
    ctl = os.environ.get("PERF_CTL")
    if ctl:
        with open(ctl, "w") as f:
            f.write("enable\n")
    ms = []
    with torch.no_grad():
        for _ in range(repeats):
            dm.reset()
            for i, f in enumerate(frames):
                t0 = CLOCK[0]()
                dm(f)
                if i >= 2 and dm.last_mode == "delta":
                    ms.append((CLOCK[0]() - t0) * 1e3)
    if ctl:
        with open(ctl, "w") as f:
            f.write("disable\n")
    print(f"{len(ms)} delta frames: mean {statistics.mean(ms):.2f} ms, median {statistics.median(ms):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov8n", choices=["yolov8n", "centerface"])
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--points", default="deltacnn/data/yolov8n_vtest.json")
    ap.add_argument("--json", help="write the table's numbers here")
    ap.add_argument("--bare", type=int, default=0, metavar="R",
                    help="no wrappers: run the frames R times (a keyframe each time) and print the delta frames' mean, "
                         "e.g. under `perf record -e task-clock` for a per-function profile of the kernels")
    ap.add_argument("--channels", action="store_true", help="conv rows split by Cin->Cout too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "wall":
        CLOCK[0] = time.perf_counter
    model, frames = load(args.model, args.start, args.frames)
    dm = convert_at(model, frames, args.points, 1)
    if args.bare:
        bare(dm, frames, args.bare)
        return
    clock = StageClock()
    macs: dict[str, list[int]] = defaultdict(list)
    wrapped = instrument(dm, clock, macs, args.channels)
    backend = dm.rt.backend_on(torch.device("cpu"))
    rows: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, list[int]] = defaultdict(list)
    frame_ms: list[float] = []
    conv_macs: dict[str, list[int]] = defaultdict(list)
    dense_macs = []
    n_delta = 0
    with torch.no_grad():
        dm.reset()
        for i, f in enumerate(frames):
            backend.work = [0, 0]
            clock.reset()
            macs.clear()
            t0 = CLOCK[0]()
            dm(f)
            dt = CLOCK[0]() - t0
            if i < 2 or dm.last_mode != "delta":
                continue
            n_delta += 1
            frame_ms.append(dt * 1e3)
            dense_macs.append(backend.work[1])
            inside = sum(clock.excl.values())
            for k, v in clock.excl.items():
                rows[k].append(v * 1e3)
                calls[k].append(clock.calls[k])
            rows["(outside layers: graph, model bookkeeping)"].append((dt - inside) * 1e3)
            for k, v in macs.items():
                conv_macs[k].append(sum(v))
    n = n_delta
    mean_frame = statistics.mean(frame_ms)
    frac = sum(statistics.mean(v) for v in conv_macs.values()) / statistics.mean(dense_macs) if dense_macs else 0
    print(f"== {args.model} {args.points}: {n} delta frames, {args.threads} thread(s), {args.clock} clock; "
          f"frame mean {mean_frame:.2f} ms, median {statistics.median(frame_ms):.2f}; conv MACs {frac:.1%}; "
          f"{wrapped} layers wrapped")
    kinds = sorted({k.split(" | ")[0] for k in rows})
    table = []
    for kind in kinds:
        own = sum(rows.get(kind, [0.0])) / n
        kern = {k.split(" | k:")[1]: sum(v) / n for k, v in rows.items() if k.startswith(kind + " | k:")}
        ktot = sum(kern.values())
        c = statistics.mean(calls.get(kind, [0])) if kind in calls else 0
        g = ""
        if kind in conv_macs:
            m = statistics.mean(conv_macs[kind])
            g = f"{m / 1e6:8.1f} MMAC {m / max(1e-9, (own + ktot) * 1e-3) / 1e9:6.1f} GMAC/s"
        table.append((own + ktot, kind, own, ktot, c, kern, g))
    print(f"{'layer kind':34s} {'total':>7s} {'python':>7s} {'kernels':>7s} {'calls':>6s}  MACs / rate; kernels")
    for tot, kind, own, ktot, c, kern, g in sorted(table, key=lambda r: -r[0]):
        ks = ", ".join(f"{k} {v:.2f}" for k, v in sorted(kern.items(), key=lambda kv: -kv[1]))
        print(f"{kind:34s} {tot:7.2f} {own:7.2f} {ktot:7.2f} {c:6.0f}  {g} {ks}")
    py = sum(r[2] for r in table)
    kt = sum(r[3] for r in table)
    print(f"{'sum':34s} {py + kt:7.2f} {py:7.2f} {kt:7.2f}  (frame {mean_frame:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"frame_ms": frame_ms, "rows": {k: sum(v) / n for k, v in rows.items()},
                                               "calls": {k: statistics.mean(v) for k, v in calls.items()},
                                               "conv_macs": {k: statistics.mean(v) for k, v in conv_macs.items()}},
                                              indent=1))


if __name__ == "__main__":
    main()
