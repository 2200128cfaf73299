"""Whole-frame CUDA graphs: capture one delta frame per input shape, then replay it.

A delta frame on the Triton backend launches a few kernels per layer and never waits for the
GPU, so the whole frame can be recorded once and replayed with one launch, which removes the
per-kernel launch overhead that otherwise dominates at low update rates.

Frames where most pixels change (scene cuts, camera motion) are cheaper dense: the compiled model
measures the input change of every frame on the GPU, copies it to pinned host memory without
waiting, and when the last completed frame changed more than `dense_above` of its pixels it runs
the next frames as stateless dense frames (cuDNN, also replayed from a graph) until the change
drops again; then a keyframe re-seeds the delta state. The decision lags by about one frame and
never synchronises with the device. Keyframes are replayed from a graph too, once an eager keyframe
of the same shape has allocated the state they write into.

Per-stream modes (the default, `per_stream=True`): each stream (batch row) decides for itself, as it
would alone. A frame in which every stream runs deltas replays the delta graph; a frame in which some
streams need a keyframe (new, reset, `keyframe_interval`, values out of range) or run densely (their
own input change above `dense_above`) replays the same delta graph with those streams left out (a
per-stream flag on the device, so the graph stays the same for every pattern), then one captured
single-stream keyframe or dense graph per such stream, whose stream index is a device scalar: a
scene cut in slot k costs slot k's keyframe, whatever k is, and no recapture. Streams join, leave and
reset with `join(k)`, `leave(k)` and `reset_stream(k)`. Every delta frame also checks each stream's
values on the device: a frame holding NaN or infinity, or whose largest |value| leaves
[1/RANGE_RATIO, RANGE_RATIO] times the stream's value at its keyframe, raises a per-stream flag
that the host reads without waiting (with the input change), and the stream's next frame after the
host has read it is a keyframe. Until then (usually one or two frames) that stream's outputs are
wrong (NaN for a NaN frame); the other streams are never affected.

Dense passes on Inductor (`dense_compile="inductor"`, the default of the per-stream model on CUDA):
the whole-batch keyframe and dense passes run the converted network's keyframe path through the
reference backend's plain PyTorch ops, traced by Dynamo and compiled by Inductor, which fuses the
state writes (the input reference, each nonlinear layer's A and E, the output accumulator) into the
kernels that produce those maps, as extra stores, instead of cuDNN plus a seeding pass per layer.
The compiled function is captured inside the same CUDA graphs; delta frames stay on the deltacnn
backend. The first frame of each such pass compiles (10-30 s for YOLOv8n). The single-stream passes
stay on the backend's path: compiled, their row writes into the whole batch's state measured slower
(H200, YOLOv8n 720p N=16: 14.2 against 13.3 ms for a delta frame plus one stream's keyframe).

Frames that send nothing (`skip_static`, opt-in, not yet run on a GPU): the captured delta pass puts the network after its
input layer into a conditional graph node that runs only when some input pixel is sent (StaticSkip), so
a frame in which no stream changed costs the input layer and the per-stream report, not ~2 launches per
layer. The per-stream report after each delta pass runs in two Triton launches on the GPU
(triton_kernels/report.py) instead of ~20 PyTorch ones.

When `keyframe_batch_at` or more streams need a keyframe or dense pass in the same frame, every
stream runs a keyframe instead (one batched pass, exact like any keyframe): at busy operating points
a batched keyframe costs less than the delta pass plus that many single-stream passes (H200, YOLOv8n
768x576 N=16, tuned thresholds: a batched keyframe 3.2 ms, a frame of deltas plus ~6 single-stream
keyframes 14.1 ms).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch
from torch import Tensor

from .backends.reference import ReferenceBackend
from .model import DeltaModel, _put_rows
from .runtime import DENSE_HYSTERESIS as HYSTERESIS
from .runtime import RANGE_RATIO


class DenseDispatch:
    """When to run dense frames: after a frame whose input change exceeded `above`, and until the
    change drops below HYSTERESIS * `above` (so that a rate hovering at the threshold does not pay
    a keyframe every other frame). Pure host logic; the caller feeds it the changes it has read."""

    def __init__(self, above: float | None) -> None:
        if above is not None and not 0 <= above <= 1:
            raise ValueError(f"dense_above must be in [0, 1] (a fraction of input pixels) or None, got {above}")
        self.above = above
        self.dense = False
        self.last_change = 0.0  # input change of the last frame whose value has arrived

    def observe(self, change: float) -> None:
        self.last_change = change

    def reset(self) -> None:
        self.dense = False
        self.last_change = 0.0

    def next_mode(self, model: DeltaModel) -> str:
        """'dense', 'keyframe' or 'delta' for the model's next frame."""
        if self.above is not None and model._stream is not None:
            self.dense = self.last_change > self.above * (HYSTERESIS if self.dense else 1.0)
            if self.dense:
                return "dense"
        keyframe = model.frame_index == 0 or (model.keyframe_interval is not None
                                              and model.frame_index >= model.keyframe_interval)
        return "keyframe" if keyframe else "delta"


def run_eager(model: DeltaModel, x: Tensor, mode: str):
    """Run one frame of `mode` without a graph (a dense frame is stateless; see next_mode)."""
    return model.dense_frame(x) if mode == "dense" else model(x)


class GraphedDeltaModel:
    """Callable like the DeltaModel it wraps; delta and dense frames replay captured CUDA graphs."""

    def __init__(self, model: DeltaModel, warmup: int = 2, dense_above: float | None = 0.35) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("deltacnn.compile needs a CUDA device; on the CPU call the DeltaModel directly")
        if model.rt.stats.enabled:
            raise ValueError("disable statistics (model.enable_stats(False)) before compiling: they are read on the host")
        self.policy = DenseDispatch(dense_above)
        self.model = model
        self.warmup = warmup
        model.rt.track_change = dense_above is not None
        # (shape, dtype, device, mode) -> (graph, static input, static output, static change fraction)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, object, Tensor | None]] = {}
        self._eager: dict[tuple, int] = {}  # eager frames per graph key since the state was (re)allocated
        self._epoch = model.state_epoch  # the graphs read and write the state tensors of this epoch
        self._change_host = torch.zeros((), dtype=torch.float32, pin_memory=True)
        self._change_event: torch.cuda.Event | None = None
        self.frames = {"keyframe": 0, "delta": 0, "dense": 0}  # how each frame ran

    @property
    def last_change(self) -> float:
        """Input change of the last frame whose value has reached the host."""
        return self.policy.last_change

    def reset(self) -> None:
        self.model.reset()
        self.policy.reset()
        self._change_event = None

    def _poll_change(self) -> None:
        """Hand the policy the newest input change that has arrived (never waits for the GPU)."""
        ev = self._change_event
        if ev is not None and ev.query():
            self.policy.observe(float(self._change_host))
            self._change_event = None

    def __call__(self, x: Tensor):
        m = self.model
        if x.device.type != "cuda":
            raise ValueError(f"compiled delta models run on CUDA frames, got a tensor on {x.device}")
        m._check_input(x)  # first: it may start a new stream (on_input_change="reset")
        if m.state_epoch != self._epoch:
            # reset, moved or cast: the state the graphs point at is gone; capture again
            self._graphs.clear()
            self._eager.clear()
            self._epoch = m.state_epoch
        self._poll_change()
        mode = self.policy.next_mode(m)
        key = (tuple(x.shape), x.dtype, x.device, mode)
        change = None
        # the first frames of each kind run eagerly (Triton autotuning, cuDNN heuristics, lazy
        # allocations; the first keyframe allocates the state that later graphs read and write)
        n_eager = self._eager.get(key, 0)
        if n_eager < self.warmup:
            out = run_eager(m, x, mode)
            self._eager[key] = n_eager + 1
            change = m.rt.input_change
        else:
            if key not in self._graphs:
                self._graphs[key] = self._capture(x, mode)
            graph, static_in, static_out, change = self._graphs[key]
            static_in.copy_(x)
            graph.replay()
            m._end_frame(mode, x)
            out = _clone(static_out)
        self.frames[mode] += 1
        if self.policy.above is not None and change is not None:
            self._change_host.copy_(change, non_blocking=True)
            self._change_event = torch.cuda.Event()
            self._change_event.record()
        return out

    def _capture(self, x: Tensor, mode: str):
        m = self.model
        static_in = x.clone()
        m.rt.keyframe = mode != "delta"
        m.rt.stateless = mode == "dense"
        graph = torch.cuda.CUDAGraph()
        # the frame recorded during capture is not executed: the state stays as it was
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                with torch.no_grad():
                    static_out = m.graph_module(static_in)
        except RuntimeError as e:
            raise RuntimeError(
                "could not capture a delta frame in a CUDA graph: some layer synchronises with the host "
                f"(probably one that runs on the reference backend on this GPU): {e}") from e
        finally:
            m.rt.stateless = False
        return graph, static_in, static_out, m.rt.input_change if m.rt.track_change else None

# torch.compile backends for the dense passes ("inductor" on the GPU; "aot_eager" and "eager" trace the
# same graphs without generating code, for tests on the CPU); None: the deltacnn backend's own path
DENSE_COMPILERS = ("inductor", "aot_eager", "eager")
# Dynamo keeps one compiled entry per pass kind, shape and model; a process that runs several models
# (benchmarks, tests) needs more than Dynamo's default of 8 per code object
_RECOMPILE_LIMIT = 256


@contextlib.contextmanager
def _plain_torch_backend(model: DeltaModel, device: torch.device):
    """Layers of `model` on `device` use the reference backend (plain PyTorch ops, traceable) inside."""
    backends = model.rt._backends
    had = backends.get(device.type)
    backends[device.type] = _REFERENCE
    try:
        yield
    finally:
        if had is None:
            backends.pop(device.type, None)
        else:
            backends[device.type] = had


_REFERENCE = ReferenceBackend()


def _dynamo_limits():
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), _RECOMPILE_LIMIT)})


class CompiledDensePasses:
    """The converted network's keyframe and dense passes compiled by torch.compile (module docstring).

    One compiled function for every pass: Dynamo specialises it on the runtime's flags (keyframe,
    stateless) and the input shape. A pass whose first call fails to compile (a layer Dynamo cannot
    trace) warns once and runs the deltacnn backend's path from then on.
    """

    def __init__(self, model: DeltaModel, compiler: str = "inductor", mode: str | None = None) -> None:
        if compiler not in DENSE_COMPILERS:
            raise ValueError(f"dense_compile must be one of {DENSE_COMPILERS}, 'auto' or None, got {compiler!r}")
        self.model = model
        self.compiler = compiler
        self.failed: dict[tuple, str] = {}  # pass key -> why it runs the backend path
        self.compile_s: dict[tuple, float] = {}  # pass key -> seconds its first call took (compile included)
        gm = model.graph_module
        self._fn = torch.compile(lambda x: gm(x), backend=compiler, mode=mode, dynamic=False, fullgraph=True)

    def __call__(self, x: Tensor, key: tuple):
        """Run the pass the runtime's flags describe on x (its kind named by `key`, for reports)."""
        m = self.model
        if key in self.failed:
            return m.graph_module(x)
        first = key not in self.compile_s
        t0 = time.perf_counter() if first else 0.0
        try:
            with _plain_torch_backend(m, x.device), _dynamo_limits():
                out = self._fn(x)
        except Exception as e:  # noqa: BLE001 - reported, then the backend path runs the same frame
            if not first:
                raise
            self.failed[key] = f"{type(e).__name__}: {e}"[:300]
            warnings.warn(f"deltacnn.compile: the {key[0]} pass could not be compiled by torch.compile "
                          f"({self.failed[key]}); it runs on the deltacnn backend (cuDNN + seeding) instead; "
                          "pass dense_compile=None to silence this", RuntimeWarning, stacklevel=3)
            return m.graph_module(x)
        if first:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            self.compile_s[key] = time.perf_counter() - t0
        return out


def conditional_nodes_supported() -> bool:
    """Whether this torch can capture conditional CUDA-graph nodes from Python (CUDAGraph.begin_capture_to_if_node;
    torch 2.11, the H200's, has no such binding)."""
    return hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node") and \
        hasattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph")


class StaticSkip:
    """A delta pass whose work after the input layer runs only when some input pixel is sent.

    While deltacnn.compile captures a delta pass, the input layer calls `begin(mask)` with the mask it
    sends: the rest of the network is captured into the body of a conditional node of the CUDA graph
    (torch's `begin_capture_to_if_node`), predicated on any(mask) on the device; `end()` closes it after
    the network, before the per-stream report, which runs on every frame. A frame that sends nothing
    leaves every later layer's state as it is (a delta layer only touches the pixels its input sends,
    and the converter feeds the frame to the input layer only), so its outputs equal those of the last
    frame that ran the body, which the graph's static output still holds; such a frame then costs the input layer and the report instead of ~2 launches per
    layer. Until the body has run once the static output holds nothing, and after a keyframe, dense or
    single-stream pass (another graph, which wrote state or outputs) it is stale: `force` (set by the
    caller then) makes the next replay run the body, which clears it."""

    def __init__(self, graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
        self.graph = graph
        self.force = torch.ones((), dtype=torch.bool, device=device)  # cleared by the body's first run
        self.pred: Tensor | None = None  # read by the graph on every replay: kept alive with the graph
        self.open = False
        self.used = False

    def begin(self, mask: Tensor) -> None:
        self.pred = torch.logical_or(mask.any(), self.force)
        self.graph.begin_capture_to_if_node(self.pred)
        self.open = self.used = True

    def end(self) -> None:
        if self.open:
            self.force.fill_(False)
            self.graph.end_capture_to_conditional_node()
            self.open = False


class StreamGraphedDeltaModel:
    """Callable like the DeltaModel it wraps; every stream of the batch runs delta, keyframe or dense
    frames for itself, and every pass replays a CUDA graph captured once per input shape (module
    docstring). `cuda_graphs=False` runs the same passes eagerly (CPU tests, TRITON_INTERPRET)."""

    def __init__(self, model: DeltaModel, warmup: int = 2, dense_above: float | None = 0.35,
                 cuda_graphs: bool = True, range_ratio: float | None = RANGE_RATIO,
                 dense_compile: str | None = "auto", dense_compile_mode: str | None = None,
                 keyframe_batch_at: int | str | None = "auto", skip_static: bool = False) -> None:
        if cuda_graphs and not torch.cuda.is_available():
            raise RuntimeError("deltacnn.compile needs a CUDA device; on the CPU call the DeltaModel directly "
                               "(or pass cuda_graphs=False)")
        if model.rt.stats.enabled:
            raise ValueError("disable statistics (model.enable_stats(False)) before compiling: they are read on the host")
        if dense_above is not None and not 0 <= dense_above <= 1:
            raise ValueError(f"dense_above must be in [0, 1] (a fraction of input pixels) or None, got {dense_above}")
        if range_ratio is not None and not range_ratio > 1:
            raise ValueError(f"range_ratio must be > 1 or None, got {range_ratio}")
        if keyframe_batch_at != "auto" and keyframe_batch_at is not None and \
                (not isinstance(keyframe_batch_at, int) or keyframe_batch_at < 1):
            raise ValueError(f"keyframe_batch_at must be an int >= 1, 'auto' or None, got {keyframe_batch_at!r}")
        self.keyframe_batch_at = keyframe_batch_at
        self.model = model
        self.warmup = warmup
        self.above = dense_above
        self.range_ratio = range_ratio
        self.cuda_graphs = cuda_graphs
        # the captured delta pass skips the network after its input layer when nothing is sent (StaticSkip)
        if skip_static and cuda_graphs and not conditional_nodes_supported():
            warnings.warn(f"deltacnn.compile(skip_static=True): torch {torch.__version__} cannot capture conditional "
                          "graph nodes from Python; static frames run the whole network", RuntimeWarning, stacklevel=3)
        self.skip_static = skip_static and cuda_graphs and conditional_nodes_supported()
        self._skip: StaticSkip | None = None  # the one of the delta pass being captured
        self._skips: dict[tuple, StaticSkip] = {}  # graph key -> its StaticSkip (the graph reads its tensors)
        # keyframe and dense passes compiled by torch.compile (None: the deltacnn backend's path)
        if dense_compile == "auto":
            dense_compile = "inductor" if cuda_graphs else None
        self.dense = CompiledDensePasses(model, dense_compile, dense_compile_mode) if dense_compile else None
        model.rt.track_change = False
        model.rt.track_streams = True
        self._graphs: dict[tuple, tuple] = {}  # (pass, shape, dtype, device) -> (graph, static input, static output)
        self._eager: dict[tuple, int] = {}
        self._epoch = model.state_epoch
        self._bufs: dict | None = None  # per-stream device buffers of the current batch shape
        self._dense: list[bool] = []  # per stream: in dense mode (hysteresis)
        self._change: list[float] = []  # per stream: input change of the last frame whose value arrived
        self._flagged: list[bool] = []  # per stream: a frame left its range or held NaN/inf (device check)
        self._active: list[bool] = []  # per stream: a camera is in this slot (leave/join)
        self._asked: set[int] = set()  # streams whose next frame is a keyframe (reset_stream, join)
        self._last_key: list[int] = []  # per stream: the frame number of its last keyframe
        self._pending: list[tuple[int, torch.cuda.Event | None]] = []  # (frame number, event) of reports in flight
        self._frame_no = 0
        self.frames = {"keyframe": 0, "delta": 0, "dense": 0, "mixed": 0}  # how each frame ran (all streams)
        self.stream_frames = {"keyframe": 0, "delta": 0, "dense": 0, "idle": 0}  # ... per stream and frame
        self.flagged_frames: list[tuple[int, int]] = []  # (frame number, stream) of range / NaN flags seen
        self.last_modes: list[str] = []

    # ---- streams ---------------------------------------------------------------------------
    @property
    def last_change(self) -> float:
        """Mean input change over the streams, of the last frame whose values reached the host."""
        return sum(self._change) / len(self._change) if self._change else 0.0

    def reset(self) -> None:
        self.model.reset()
        self._sized(0)
        self._pending.clear()

    def reset_stream(self, k: int) -> None:
        """Slot k's next frame is a keyframe (a scene cut, or another camera in the slot); the others go on."""
        self._asked.add(self._slot(k))

    def leave(self, k: int) -> None:
        """Slot k has no camera: its frames are left out of every pass (its output rows repeat its last
        output) until join(k)."""
        self._active[self._slot(k)] = False

    def join(self, k: int) -> None:
        """A camera takes slot k: its next frame is a keyframe."""
        k = self._slot(k)
        self._active[k] = True
        self._asked.add(k)

    def _slot(self, k: int) -> int:
        if not 0 <= k < len(self._active):
            raise IndexError(f"stream slot {k} does not exist: the model has run a batch of {len(self._active)} "
                             "streams (run a first frame of the full batch before joining, leaving or resetting slots)")
        return k

    def _sized(self, n: int) -> None:
        self._dense, self._change, self._flagged = [False] * n, [0.0] * n, [False] * n
        self._active, self._last_key = [True] * n, [-1] * n
        self._asked = set()
        self._bufs = None
        m = self.model
        if len(m._since) != n:
            m._since, m._scale, m._work = [0] * n, [None] * n, [0.0] * n
        if len(m._held) != n:
            m._held = [0.0] * n  # refresh_held: the gates' held-back fraction, read from the device reports

    def _buffers(self, x: Tensor) -> dict:
        n = x.shape[0]
        b = self._bufs
        if b is None or b["n"] != n or b["device"] != x.device:
            dev = x.device
            b = self._bufs = {
                "n": n, "device": dev,
                "keep": torch.ones(n, dtype=torch.bool, device=dev), "keep_host": [True] * n,
                "idx": torch.zeros(1, dtype=torch.long, device=dev),
                "scale": torch.zeros(n, dtype=torch.float32, device=dev),  # |x| max at each stream's keyframe
                "bad": torch.zeros(n, dtype=torch.bool, device=dev),  # range / NaN flag since its keyframe
                "report": torch.zeros(3, n, dtype=torch.float32, device=dev),  # change, bad, held back
                "host": [torch.zeros(3, n, dtype=torch.float32, pin_memory=dev.type == "cuda") for _ in range(4)],
            }
        return b

    # ---- host decisions (wait for the device only when the host runs 3 frames ahead) -----------
    def _poll(self) -> None:
        """Take the newest per-stream report that has arrived; older ones are dropped."""
        done = None
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            done = self._pending.pop(0)
        if done is None:
            return
        if self._bufs is None:
            return
        frame_no = done[0]
        host = self._bufs["host"][frame_no % 4]
        change, bad, held = host[0].tolist(), host[1].tolist(), host[2].tolist()
        m = self.model
        for k, c in enumerate(change):
            # a keyframe at or after that frame re-seeded the stream: its change then says nothing
            fresh = frame_no > self._last_key[k]
            self._change[k] = c if fresh else 0.0
            if k < len(m._held):  # the model's refresh_held rule (DeltaModel._due) reads it
                m._held[k] = held[k] if fresh else 0.0
        for k, flag in enumerate(bad):
            # a flag from a frame before the stream's last keyframe was already dealt with by it
            if flag and frame_no > self._last_key[k] and not self._flagged[k]:
                self._flagged[k] = True
                self.flagged_frames.append((frame_no, k))

    def _modes(self, n: int) -> list[str]:
        m = self.model
        modes = []
        for k in range(n):
            if not self._active[k]:
                modes.append("idle")
                continue
            if self.above is not None and m._stream is not None:
                self._dense[k] = self._change[k] > self.above * (HYSTERESIS if self._dense[k] else 1.0)
            due = m._due(k) or k in self._asked or self._flagged[k]
            modes.append("dense" if self._dense[k] and not self._flagged[k] else ("keyframe" if due else "delta"))
        return modes

    # ---- frames ----------------------------------------------------------------------------
    def __call__(self, x: Tensor):
        m = self.model
        if self.cuda_graphs and x.device.type != "cuda":
            raise ValueError(f"compiled delta models run on CUDA frames, got a tensor on {x.device}")
        m._check_input(x)  # first: it may start a new stream (on_input_change="reset")
        n = x.shape[0]
        if m.state_epoch != self._epoch or len(self._active) != n:
            # reset, moved or cast: the state the graphs point at is gone; capture again
            self._graphs.clear()
            self._skips.clear()
            self._eager.clear()
            self._epoch = m.state_epoch
            self._pending.clear()
            if len(self._active) != n or m._stream is None:
                self._sized(n)
        b = self._buffers(x)
        self._poll()
        modes = self._modes(n)
        due = sum(mo in ("keyframe", "dense") for mo in modes)
        if due and "delta" in modes and due >= self._batch_at(n):
            # that many single-stream passes cost more than one batched keyframe: every stream keyframes
            modes = ["keyframe" if mo != "idle" else mo for mo in modes]
        live = [mo for mo in modes if mo != "idle"]
        if live and "delta" not in live and "idle" not in modes:
            # no stream runs deltas: one batched pass (busy streams due a keyframe are seeded too)
            mode = "dense" if set(live) == {"dense"} else "keyframe"
            modes = [mode] * n
            # a copy: the graph writes the same static output on every replay
            out = _clone(self._replay(("batch", mode), x, lambda t, first: self._batch_pass(t, mode, first)))
        else:
            keep = [mo == "delta" for mo in modes]
            if keep != b["keep_host"]:
                b["keep"].fill_(True)
                for k, kept in enumerate(keep):
                    if not kept:
                        b["keep"][k:k + 1].fill_(False)
                b["keep_host"] = keep
            out = _clone(self._replay(("delta",), x, lambda t, first: self._delta_pass(t)))
            for k, mo in enumerate(modes):
                if mo in ("keyframe", "dense"):
                    b["idx"].fill_(k)
                    rows = self._replay(("rows", mo), x, lambda t, first, mo=mo: self._rows_pass(t, mo))
                    out = _put_rows(out, b["idx"], rows, n)
        if any(mo in ("keyframe", "dense") for mo in modes):
            # another pass wrote state (or the output) after the delta graph last ran its body: the delta
            # graph's static output is stale until the body runs again (StaticSkip)
            for skip in self._skips.values():
                skip.force.fill_(True)
        self._report(b)
        for k, mo in enumerate(modes):
            self.stream_frames[mo] += 1
            if mo == "keyframe":
                self._last_key[k] = self._frame_no
                self._flagged[k] = self._dense[k] = False
                self._change[k] = 0.0
                self._asked.discard(k)
        uniform = len(set(modes)) == 1 and modes[0] != "idle"
        self.frames[modes[0] if uniform else "mixed"] += 1
        self.last_modes = modes
        m._end_streams(["dense" if mo == "idle" else mo for mo in modes], x)
        self._frame_no += 1
        return out

    def _batch_at(self, n: int) -> float:
        """How many streams due a keyframe or dense pass make the whole batch keyframe instead."""
        at = self.keyframe_batch_at
        if at == "auto":
            return max(2, math.ceil(n / 6))
        return math.inf if at is None else at

    def _report(self, b: dict) -> None:
        """Copy the frame's per-stream change and flags towards the host without waiting."""
        host = b["host"][self._frame_no % 4]
        if len(self._pending) >= 3:
            # the host is 3 frames ahead of the device: wait for the oldest report rather than drop it
            # (a host that always runs ahead would otherwise never read a change or a flag); the device
            # still has two frames queued, so this costs no throughput
            ev = self._pending[0][1]
            if ev is not None:
                ev.synchronize()
            self._poll()
        host.copy_(b["report"], non_blocking=self.cuda_graphs)
        ev = None
        if self.cuda_graphs:
            ev = torch.cuda.Event()
            ev.record()
        self._pending.append((self._frame_no, ev))

    # ---- passes (each run eagerly `warmup` times, then captured once and replayed) ---------------
    def _replay(self, kind: tuple, x: Tensor, fn):
        """fn(x, first) (first: the pass's first run since the state was allocated), eagerly for the
        first `warmup` frames, then replayed from a graph captured once."""
        key = kind + (tuple(x.shape), x.dtype, x.device)
        n_eager = self._eager.get(key, 0)
        if not self.cuda_graphs or n_eager < self.warmup:
            self._eager[key] = n_eager + 1
            with torch.no_grad():
                return fn(x, n_eager == 0)
        if key not in self._graphs:
            static_in = x.clone()
            skip = self.skip_static and kind == ("delta",)
            try:
                graph, static_out = self._capture(fn, static_in, key, skip)
            except (RuntimeError, AttributeError, TypeError) as e:
                if not skip:
                    raise
                # conditional nodes unavailable here (old CUDA, or a kernel that cannot be captured into
                # one): capture the plain pass, and stop trying
                warnings.warn(f"deltacnn.compile: delta pass captured without skipping static frames ({e})",
                              RuntimeWarning, stacklevel=3)
                self.skip_static = False
                graph, static_out = self._capture(fn, static_in, key, False)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, fn, static_in: Tensor, key: tuple, skip: bool):
        """(graph, static output) of fn(static_in, False) captured once (`skip`: as a StaticSkip)."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()  # the frame recorded during capture is not executed
        self._skip = StaticSkip(graph, static_in.device) if skip else None
        try:
            with torch.cuda.graph(graph), torch.no_grad():
                static_out = fn(static_in, False)
        except RuntimeError as e:
            raise RuntimeError(
                "could not capture a delta frame in a CUDA graph: some layer synchronises with the host "
                f"(probably one that runs on the reference backend on this GPU): {e}") from e
        finally:
            done, self._skip = self._skip, None
        if done is not None and done.used:
            self._skips[key] = done
        return graph, static_out

    def _abs_max(self, x: Tensor) -> Tensor:
        """(N,) largest |value| per stream (NaN where a stream holds NaN)."""
        return torch.maximum(x.amax(dim=(1, 2, 3)), -x.amin(dim=(1, 2, 3))).float()

    def _delta_pass(self, x: Tensor):
        rt, b = self.model.rt, self._bufs
        rt.keyframe, rt.stateless, rt.keep = False, False, b["keep"]
        rt.skip = self._skip  # while capturing (StaticSkip): the input layer opens the conditional node
        try:
            out = self.model.graph_module(x)
            if rt.skip is not None:
                rt.skip.end()
        finally:
            rt.keep = rt.skip = None
        self._check_streams(x)
        return out

    def _check_streams(self, x: Tensor) -> None:
        """After a delta pass: raise the range / NaN flag of the kept streams whose frame left its range, and
        write the per-stream report (change, flag, held-back change); in two launches on the GPU."""
        rt, b = self.model.rt, self._bufs
        if not x.is_cuda:
            self._check_streams_torch(x)
            return
        from .backends.triton_kernels.report import delta_report_, report_fits
        if not report_fits(x):
            self._check_streams_torch(x)
            return
        delta_report_(x, b["scale"], b["bad"], b["keep"], rt.stream_change, rt.input_held, b["report"],
                      self.range_ratio)
        rt.input_held = None

    def _check_streams_torch(self, x: Tensor) -> None:
        """_check_streams in PyTorch ops (~20 launches)."""
        rt, b = self.model.rt, self._bufs
        a, scale = self._abs_max(x), b["scale"]
        bad = ~torch.isfinite(a)
        if self.range_ratio is not None:
            bad |= (a > self.range_ratio * scale) | (scale > self.range_ratio * a)
        b["bad"].logical_or_(bad & b["keep"])
        b["report"][0].copy_(rt.stream_change)
        b["report"][1].copy_(b["bad"])
        if rt.input_held is not None:  # the input gates held back this much of each stream's change
            b["report"][2].copy_(rt.input_held)
            rt.input_held = None

    def _network(self, x: Tensor, key: tuple, first: bool):
        """One keyframe or dense pass of the network as the runtime's flags say: compiled (dense_compile)
        once a first eager pass of the same kind has allocated whatever state it writes."""
        if self.dense is None or first:
            return self.model.graph_module(x)
        return self.dense(x, key)

    def _batch_pass(self, x: Tensor, mode: str, first: bool = True):
        rt, b = self.model.rt, self._bufs
        keyframe = mode == "keyframe"
        # a keyframe's own input change is never read (_poll: the report of a stream's keyframe frame is not
        # fresh), so its input layer does not measure it (a pass over the frame: ~0.12 ms at 16 streams)
        track = rt.track_streams
        rt.keyframe, rt.stateless, rt.track_streams = True, not keyframe, track and not keyframe
        try:
            out = self._network(x, ("batch", mode, tuple(x.shape)), first)
        finally:
            rt.stateless, rt.track_streams = False, track
        change = None if keyframe else rt.stream_change
        self._pass_report(x, seed=keyframe, report=b["report"], change=change)
        return out

    def _pass_report(self, x: Tensor, seed: bool, report: Tensor | None, change: Tensor | None,
                     rows: Tensor | None = None) -> None:
        """After a keyframe (seed) or dense pass over streams `rows` (None: all): each keyframe stream's scale
        and NaN flag, and where `report` is given its report (change, flag, no held-back change); one or two
        launches on the GPU (triton_kernels.report.pass_report_) instead of ~10."""
        if x.is_cuda:
            from .backends.triton_kernels.report import pass_report_, report_fits
            if report_fits(x) or not seed:
                pass_report_(x, self._bufs["scale"], self._bufs["bad"], report, change, seed, rows)
                return
        self._pass_report_torch(x, seed, report, change, rows)

    def _pass_report_torch(self, x: Tensor, seed: bool, report: Tensor | None, change: Tensor | None,
                           rows: Tensor | None = None) -> None:
        """_pass_report in PyTorch ops (a stream holding NaN keeps a NaN scale, the kernel an infinite one:
        both flag it)."""
        b = self._bufs
        if seed:
            a = self._abs_max(x)
            if rows is None:
                b["scale"].copy_(a)
                b["bad"].copy_(~torch.isfinite(a))
            else:
                b["scale"].index_copy_(0, rows, a)
                b["bad"].index_copy_(0, rows, ~torch.isfinite(a))
        if report is not None:
            if change is None:
                report[0].zero_()
            else:
                report[0].copy_(change)
            report[1].copy_(b["bad"])
            report[2].zero_()

    def _rows_pass(self, x: Tensor, mode: str):
        """A keyframe (or stateless dense frame) of the one stream b["idx"], writing only its state rows."""
        rt, b = self.model.rt, self._bufs
        idx = b["idx"]
        sub = x.index_select(0, idx)
        rt.streams, rt.keyframe, rt.stateless = idx, True, mode == "dense"
        rt.stats.merging = True
        try:
            out = self.model.graph_module(sub)  # the backend's path (module docstring)
        finally:
            rt.streams, rt.stateless = None, False
            rt.stats.merging = False
        if mode == "keyframe":
            self._pass_report(sub, seed=True, report=None, change=None, rows=idx)
        return out


def _clone(out):
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


def compile(model: DeltaModel, warmup: int = 2, dense_above: float | None = 0.35,  # noqa: A001
            per_stream: bool = True, cuda_graphs: bool = True, dense_compile: str | None = "auto",
            dense_compile_mode: str | None = None, keyframe_batch_at: int | str | None = "auto",
            skip_static: bool = False):
    """Wrap a converted model so that frames replay CUDA graphs captured per input shape.

    dense_above: when more than this fraction of a stream's input pixels changed in its last
    completed frame, run its frames densely (stateless, at cuDNN speed) until the change drops below
    3/4 of it; None always runs delta frames. The best value depends on the model and GPU
    (`deltacnn bench`).
    per_stream: every stream decides delta / keyframe / dense for itself and is range- and NaN-checked
    on the device (StreamGraphedDeltaModel: `reset_stream(k)`, `join(k)`, `leave(k)`); False: one
    decision for the whole batch (GraphedDeltaModel, the earlier behaviour).
    cuda_graphs: False runs the per-stream passes eagerly (for tests on the CPU; per_stream only).
    dense_compile: the torch.compile backend of the whole-batch keyframe and dense passes ("inductor": Inductor's
    fused kernels write the delta state as they produce each map; "aot_eager" / "eager": traced, not
    compiled, for CPU tests); None: the deltacnn backend's path (cuDNN per conv + a seeding pass);
    "auto" (default): "inductor" with CUDA graphs, None without.
    Each kind of pass compiles on its first frames (seconds to a minute). per_stream only.
    dense_compile_mode: torch.compile's mode for them (None: default; "max-autotune-no-cudagraphs" also
    tunes the convs, minutes per pass).
    keyframe_batch_at: when this many streams need a keyframe or dense pass in one frame, every stream
    keyframes in one batched pass instead ("auto": max(2, N / 6) of N streams; None: never). per_stream only.
    skip_static: the captured delta pass runs the network after its input layer only when some input pixel
    is sent (a conditional graph node, StaticSkip): a frame in which nothing changed costs the input
    layer instead of the whole floor. Same outputs. Needs a torch that captures conditional nodes from
    Python (conditional_nodes_supported; not torch 2.11) and is off by default until it has run on a GPU.
    per_stream only.
    """
    if not isinstance(model, DeltaModel):
        hint = (": moving-camera models (convert(..., motion=)) do not run inside CUDA graphs yet; run the "
                "MotionDeltaModel eagerly (backend='triton' on the GPU)") if type(model).__name__ == "MotionDeltaModel" else ""
        raise TypeError(f"deltacnn.compile takes the result of deltacnn.convert, got {type(model).__name__}{hint}")
    if model.rt.refresh.flush:
        raise ValueError("deltacnn.compile does not run the refresh 'flush' rule (the held-back input is not "
                         "flushed inside the graphs); convert with refresh='keyframe' (the default) to compile")
    if model.rt.layer_refresh is not None:
        raise ValueError("deltacnn.compile does not run a layer refresh (deltacnn.layer_refresh: its bookkeeping and "
                         "triggers run on the host); convert with refresh_layers=None (the default) to compile")
    if per_stream:
        return StreamGraphedDeltaModel(model, warmup, dense_above, cuda_graphs, dense_compile=dense_compile,
                                       dense_compile_mode=dense_compile_mode, keyframe_batch_at=keyframe_batch_at,
                                       skip_static=skip_static)
    if not cuda_graphs:
        raise ValueError("cuda_graphs=False needs per_stream=True")
    return GraphedDeltaModel(model, warmup, dense_above)
