"""Dense peers: the fastest dense deployment of a model on a device, the baseline of every speedup.

A delta model's speedup only means something against the dense model as someone would deploy it,
not against the model as it happened to be loaded (an ONNX import in NCHW runs about 2x slower on
the CPU than the same network in channels_last). So:

- CPU: PyTorch in channels_last (inference_mode, the same thread count) and onnxruntime (when
  installed; exported with torch.onnx.export, one intra-op thread per torch thread), plus the
  model as loaded for reference;
- GPU: fp16 channels_last replayed from a CUDA graph (cuDNN), and on request
  torch.compile(mode="max-autotune") (minutes to compile; its compile time is reported).

`strongest_peer` builds the candidates, checks that each reproduces the model's outputs on a real
frame (a candidate that does not is rejected, with the reason), times them briefly on real frames,
interleaved, and picks the fastest. Every peer takes the input the model takes (float32, NCHW,
on the model's device) and returns the model's output structure in float32.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .timing import sync, timed

# relative L2 error (all outputs together) a peer may have against the model as loaded
FP32_TOLERANCE = 1e-4  # same arithmetic, other kernels and summation orders
FP16_TOLERANCE = 2e-2  # half-precision weights and activations

CPU_PEERS = ("channels_last", "onnxruntime", "as_loaded")
GPU_PEERS = ("cuda_graph_fp16", "compile_max_autotune", "as_loaded")


class PeerError(RuntimeError):
    """A peer cannot be built on this machine, or it does not reproduce the model's outputs."""


@dataclass
class Peer:
    """One dense deployment of the model: `peer(x)` returns the model's outputs (float32)."""

    key: str  # "channels_last", "onnxruntime", "as_loaded", "cuda_graph_fp16", "compile_max_autotune"
    name: str  # for people: "torch channels_last fp32", ...
    device: torch.device
    forward: Callable[[Tensor], Any]
    threads: int | None = None  # CPU thread count it runs with (None: whatever torch has)
    tolerance: float = FP32_TOLERANCE
    prepare_s: float = 0.0  # export / capture / compile time
    ms: float | None = None  # median ms per frame, measured by strongest_peer

    def __call__(self, x: Tensor) -> Any:
        with _torch_threads(self.threads):
            return self.forward(x)


@dataclass
class PeerChoice:
    """The fastest peer, what every candidate measured, and the candidates that were left out (why)."""

    peer: Peer
    candidates: dict[str, Peer]
    rejected: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the peer, its threads, and every candidate's time, e.g. for a summary."""
        p = self.peer
        where = f"{p.threads} threads" if p.device.type == "cpu" and p.threads else str(p.device)
        timed_ = ", ".join(f"{c.name} {c.ms:.1f} ms" for c in self.candidates.values() if c.ms is not None)
        return f"{p.name} on {where} (timed: {timed_})"

    def to_dict(self) -> dict:
        return {"peer": self.peer.name, "key": self.peer.key, "device": str(self.peer.device),
                "threads": self.peer.threads, "ms": self.peer.ms,
                "candidates": {c.name: {"ms": c.ms, "prepare_s": c.prepare_s} for c in self.candidates.values()},
                "rejected": dict(self.rejected)}


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run torch at `n` intra-op threads inside the block (no change when it already does)."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _leaves(out: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]


def outputs_rel_error(a: Any, b: Any) -> float:
    """Relative L2 error of outputs `a` against reference `b`, all output tensors together.

    Infinite when the structures or shapes differ (a peer that returns something else).
    """
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        return math.inf
    if not la:
        return 0.0
    fa = torch.cat([t.detach().float().reshape(-1).cpu() for t in la])
    fb = torch.cat([t.detach().float().reshape(-1).cpu() for t in lb])
    diff, ref = float((fa - fb).norm()), float(fb.norm())
    return diff / ref if ref > 0 else diff


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _to_float32(out: Any) -> Any:
    return pytree.tree_map_only(Tensor, lambda t: t.float() if t.is_floating_point() else t, out)


# ---- CPU peers -----------------------------------------------------------------------------------
def as_loaded_peer(model: nn.Module, threads: int | None = None) -> Peer:
    """The model exactly as it was loaded (layout and dtype untouched): the reference, rarely the fastest."""
    dev = _model_device(model)

    def forward(x: Tensor) -> Any:
        with torch.inference_mode():
            return model(x)

    return Peer("as_loaded", "torch as loaded fp32", dev, forward, threads if dev.type == "cpu" else None)


def channels_last_peer(model: nn.Module, threads: int | None = None) -> Peer:
    """A copy of the model in channels_last, inference_mode: PyTorch's fastest plain CPU path for convs."""
    t0 = time.perf_counter()
    m = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)

    def forward(x: Tensor) -> Any:
        with torch.inference_mode():
            return m(x.contiguous(memory_format=torch.channels_last))

    return Peer("channels_last", "torch channels_last fp32", _model_device(model), forward, threads,
                prepare_s=time.perf_counter() - t0)


def export_onnx(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """torch.onnx.export of the model at the example's shape (legacy TorchScript exporter; the dynamo
    exporter when the legacy one fails and onnxscript is installed)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], opset_version=17)
            return path
        except Exception as legacy:  # noqa: BLE001 - report both exporters' reasons below
            if importlib.util.find_spec("onnxscript") is None:
                raise PeerError(f"torch.onnx.export failed: {type(legacy).__name__}: {legacy}") from None
            try:
                prog = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"])
                prog.save(str(path))
                return path
            except Exception as e:  # noqa: BLE001
                raise PeerError(f"torch.onnx.export failed (legacy: {legacy}; dynamo: {e})") from None


def onnxruntime_peer(model: nn.Module, example: Tensor, threads: int | None = None) -> Peer:
    """The model exported to ONNX and run by onnxruntime on the CPU with `threads` intra-op threads.

    Its worker threads do not spin-wait after a call: in the same process as the delta model they
    would otherwise keep both cores busy into the next (timed) delta frame.
    """
    if importlib.util.find_spec("onnxruntime") is None:
        raise PeerError("onnxruntime is not installed (pip install onnxruntime)")
    import onnxruntime as ort

    if _model_device(model).type != "cpu":
        raise PeerError("the onnxruntime peer runs on the CPU only")
    threads = threads or torch.get_num_threads()
    t0 = time.perf_counter()
    x0 = example.detach().float().cpu().contiguous()
    with torch.no_grad():
        spec = pytree.tree_flatten(model(x0))[1]
    with tempfile.TemporaryDirectory(prefix="deltacnn_onnx_") as d:
        path = export_onnx(model, x0, Path(d) / "model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    n_out = len(sess.get_outputs())
    if n_out != spec.num_leaves:
        raise PeerError(f"the ONNX export has {n_out} outputs, the model {spec.num_leaves}")

    def forward(x: Tensor) -> Any:
        arr = x.detach().float().cpu().contiguous().numpy()
        return pytree.tree_unflatten([torch.from_numpy(o) for o in sess.run(None, {in_name: arr})], spec)

    return Peer("onnxruntime", "onnxruntime fp32", torch.device("cpu"), forward, threads,
                prepare_s=time.perf_counter() - t0)


# ---- GPU peers -----------------------------------------------------------------------------------
def _half_channels_last(model: nn.Module, dtype: torch.dtype) -> Callable[[Tensor], Any]:
    m = copy.deepcopy(model).eval().to(dtype).to(memory_format=torch.channels_last)

    def run(x: Tensor) -> Any:
        return _to_float32(m(x.to(dtype).contiguous(memory_format=torch.channels_last)))

    return run


def _need_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise PeerError(f"{what} needs a CUDA device (the model is on {device})")


def cuda_graph_peer(model: nn.Module, example: Tensor, dtype: torch.dtype = torch.float16) -> Peer:
    """fp16 channels_last (cuDNN) replayed from one CUDA graph: input conversion, network and output
    conversion are all in the graph; a call copies the frame in, replays and clones the outputs."""
    dev = _model_device(model)
    _need_cuda(dev, "the CUDA graph peer")
    t0 = time.perf_counter()
    run = _half_channels_last(model, dtype)
    static = example.detach().float().clone()
    with torch.no_grad():
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(3):  # cuDNN picks its algorithms outside the capture
                run(static)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run(static)
    sync(dev)

    def forward(x: Tensor) -> Any:
        # the graph holds raw pointers to the fp16 copy's weights, which only `run` keeps alive: without
        # this reference they were freed when this function returned, and the replays read whatever
        # the allocator put there next (NaN on the test model, sessions 10-11)
        _ = run
        if x.shape != static.shape:
            raise PeerError(f"the CUDA graph peer was captured for input {tuple(static.shape)}, got {tuple(x.shape)}")
        with torch.no_grad():
            static.copy_(x)
            graph.replay()
            return pytree.tree_map_only(Tensor, torch.clone, static_out)

    return Peer("cuda_graph_fp16", f"cuDNN {str(dtype)[6:]} channels_last + CUDA graph", dev, forward,
                tolerance=FP16_TOLERANCE, prepare_s=time.perf_counter() - t0)


def compiled_peer(model: nn.Module, example: Tensor, dtype: torch.dtype = torch.float16,
                  mode: str = "max-autotune") -> Peer:
    """torch.compile(mode=...) of the fp16 channels_last model (max-autotune: Triton templates
    benchmarked against cuDNN, replayed from CUDA graphs). `prepare_s` is the compile time."""
    dev = _model_device(model)
    _need_cuda(dev, f"the torch.compile({mode}) peer")
    t0 = time.perf_counter()
    compiled = torch.compile(_half_channels_last(model, dtype), mode=mode)
    x0 = example.detach().float().clone()
    with torch.no_grad():
        for _ in range(3):  # compile, autotune, record the CUDA graphs
            torch.compiler.cudagraph_mark_step_begin()
            pytree.tree_map_only(Tensor, torch.clone, compiled(x0))
    sync(dev)

    def forward(x: Tensor) -> Any:
        with torch.no_grad():
            torch.compiler.cudagraph_mark_step_begin()
            return pytree.tree_map_only(Tensor, torch.clone, compiled(x))

    return Peer("compile_max_autotune" if mode == "max-autotune" else f"compile_{mode}",
                f"torch.compile {mode} {str(dtype)[6:]} channels_last", dev, forward,
                tolerance=FP16_TOLERANCE, prepare_s=time.perf_counter() - t0)


# ---- the choice ----------------------------------------------------------------------------------
def build_peers(model: nn.Module, example: Tensor, *, threads: int | None = None, compile: bool = False,
                onnx: bool = True, only: Sequence[str] | None = None) -> tuple[list[Peer], dict[str, str]]:
    """The candidate peers of the model's device, and {key: reason} for those that cannot be built."""
    dev = _model_device(model)
    keys = list(only) if only is not None else list(GPU_PEERS if dev.type == "cuda" else CPU_PEERS)
    if dev.type == "cuda" and not compile and only is None:
        keys.remove("compile_max_autotune")
    if not onnx and "onnxruntime" in keys:
        keys.remove("onnxruntime")
    cpu_threads = (threads or torch.get_num_threads()) if dev.type == "cpu" else None
    builders: dict[str, Callable[[], Peer]] = {
        "as_loaded": lambda: as_loaded_peer(model, cpu_threads),
        "channels_last": lambda: channels_last_peer(model, cpu_threads),
        "onnxruntime": lambda: onnxruntime_peer(model, example, cpu_threads),
        "cuda_graph_fp16": lambda: cuda_graph_peer(model, example),
        "compile_max_autotune": lambda: compiled_peer(model, example),
    }
    peers, rejected = [], {}
    for k in keys:
        if k not in builders:
            raise ValueError(f"unknown peer {k!r}; known: {', '.join(builders)}")
        try:
            peers.append(builders[k]())
        except PeerError as e:
            rejected[k] = str(e)
    return peers, rejected


def strongest_peer(model: nn.Module, frames: Sequence[Tensor] | Tensor, *, threads: int | None = None,
                   compile: bool = False, onnx: bool = True, calls: int = 6,
                   only: Sequence[str] | None = None) -> PeerChoice:
    """Build the device's peers, check them against the model on real frames, time them, pick the fastest.

    `frames`: model inputs from the clip (the first is the correctness check, and the last when it
    differs). Each candidate is timed `calls` times, round-robin over the frames and interleaved
    with the other candidates (so a noisy machine slows all alike); the median decides. `threads`:
    the CPU thread count of the delta model (default: torch's).
    """
    xs = [frames] if isinstance(frames, Tensor) else list(frames)
    if not xs:
        raise ValueError("strongest_peer needs at least one example frame")
    model = model.eval()
    dev = _model_device(model)
    peers, rejected = build_peers(model, xs[0], threads=threads, compile=compile, onnx=onnx, only=only)
    checks = [xs[0]] + ([xs[-1]] if len(xs) > 1 else [])
    with _torch_threads(threads if dev.type == "cpu" else None), torch.no_grad():
        refs = [model(x) for x in checks]
    ok = []
    for p in peers:
        try:
            err = max(outputs_rel_error(p(x), r) for x, r in zip(checks, refs))
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this input is not a peer
            rejected[p.key] = f"failed on the clip's frames: {type(e).__name__}: {e}"
            continue
        if not err <= p.tolerance:
            rejected[p.key] = f"outputs differ from the model's (relative error {err:.2e} > {p.tolerance:g})"
            continue
        ok.append(p)
    if not ok:
        raise PeerError("no dense peer could be built: " + "; ".join(f"{k}: {v}" for k, v in rejected.items()))
    times: dict[str, list[float]] = {p.key: [] for p in ok}
    for r in range(calls):
        x = xs[r % len(xs)]
        for p in ok[r % len(ok):] + ok[:r % len(ok)]:  # rotate who goes first
            times[p.key].append(timed(p, x, dev)[1])
    for p in ok:
        p.ms = statistics.median(times[p.key])
    best = min(ok, key=lambda p: p.ms)
    return PeerChoice(best, {p.key: p for p in ok}, rejected)


__all__ = ["Peer", "PeerChoice", "PeerError", "strongest_peer", "build_peers", "as_loaded_peer", "channels_last_peer",
           "onnxruntime_peer", "cuda_graph_peer", "compiled_peer", "export_onnx", "outputs_rel_error"]
