"""deltacnn.compile's StaticSkip on the CPU: where the conditional node of a captured delta pass opens and
closes, what its predicate holds, and when it is forced on. The graph is a stand-in that records the
calls (conditional nodes need a CUDA graph; the replayed behaviour: tests/gpu/test_static_skip_gpu.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

import deltacnn
from deltacnn.compile import StaticSkip
from deltacnn.layers.conv import DeltaConv2d


class RecordingGraph:
    """What StaticSkip calls on a CUDA graph, in order, into a log shared with the model's conv hooks."""

    def __init__(self, log: list) -> None:
        self.log = log

    def begin_capture_to_if_node(self, pred: torch.Tensor) -> None:
        self.log.append(("begin", pred.dim(), pred.dtype, bool(pred)))

    def end_capture_to_conditional_node(self) -> None:
        self.log.append(("end",))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()


def _runner(m, x0, log):
    dm = deltacnn.convert(m, x0, backend="reference")
    for mod in dm.modules():
        if isinstance(mod, DeltaConv2d):
            mod.register_forward_hook(lambda *_: log.append(("conv",)))
    return deltacnn.compile(dm, cuda_graphs=False, dense_above=None, dense_compile=None)


def _frames(t: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 3, 16, 16, generator=g)
    clip = base.expand(t, 1, 3, 16, 16).clone()
    clip[3, :, :, 4:8, 4:8] += 0.5  # frames 0-2 and 4-5: nothing changes from one frame to the next but 3-4
    clip[4:] = clip[3]
    return clip


def test_node_wraps_the_network_after_the_input_layer():
    """The node opens after the input layer (before the first conv) and closes after the last conv, once
    per delta pass; its predicate is a 0-d bool: forced on the first run, then any(mask sent)."""
    log: list = []
    clip = _frames()
    g = _runner(_net(), clip[0], log)
    for t in range(3):
        g(clip[t])
    assert ("begin",) not in [e[:1] for e in log]  # eager frames without a capture: no node
    skip = StaticSkip(RecordingGraph(log), torch.device("cpu"))
    g._skip, g._skips[("delta",)] = skip, skip  # what _capture does around a captured delta pass
    preds = []
    for t in range(3, 6):
        log.clear()
        g(clip[t])
        assert [e[0] for e in log] == ["begin", "conv", "conv", "end"], log
        assert log[0][1:3] == (0, torch.bool)
        preds.append(log[0][3])
    # frame 3: forced (the body's first run) and changed; 4: nothing changed since 3; 5: nothing either
    assert preds == [True, False, False]
    assert not bool(skip.force)


def test_keyframe_and_single_stream_passes_force_the_next_body():
    """After another pass wrote state (a keyframe of one stream here), the delta graph's static output is
    stale: the next delta pass must run its body even when nothing is sent."""
    log: list = []
    clip = _frames()
    g = _runner(_net(), clip[0], log)
    for t in range(3):
        g(clip[t])
    skip = StaticSkip(RecordingGraph(log), torch.device("cpu"))
    g._skips[("delta",)] = skip
    skip.force.fill_(False)
    g.reset_stream(0)
    g(clip[3])  # a keyframe pass for stream 0 (the only stream): no delta pass
    assert g.last_modes == ["keyframe"]
    assert bool(skip.force)


def test_eager_runner_never_skips():
    """Without CUDA graphs nothing is captured, so no node opens and skip_static is off."""
    log: list = []
    clip = _frames()
    g = _runner(_net(), clip[0], log)
    assert g.skip_static is False
    for t in range(clip.shape[0]):
        g(clip[t])
    assert all(e == ("conv",) for e in log)
