"""Dense peers (deltacnn.peers): every candidate reproduces the model, the fastest one is chosen.

CPU only here; the GPU peers (CUDA graph, torch.compile) are in tests/gpu/test_peers_gpu.py.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from deltacnn import peers

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None


class TwoHeads(nn.Module):
    """Conv-BN-ReLU body, a stride-2 conv and two heads returned as a dict holding a tuple: the
    output structure must survive onnxruntime's flat output list."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.h1 = nn.Conv2d(16, 4, 1)
        self.h2 = nn.Conv2d(16, 2, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return {"boxes": self.h1(y), "extra": (torch.sigmoid(self.h2(y)), y.mean((2, 3)))}


def frames(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, 40, 56, generator=g) for _ in range(n)]


def test_cpu_candidates_reproduce_the_model_and_the_fastest_wins() -> None:
    model = TwoHeads().eval()
    xs = frames()
    choice = peers.strongest_peer(model, xs, threads=2, calls=4)
    expected = {"channels_last", "as_loaded"} | ({"onnxruntime"} if HAVE_ORT else set())
    assert set(choice.candidates) == expected, choice.rejected
    assert choice.peer.ms == min(p.ms for p in choice.candidates.values())
    assert choice.peer.key in expected and choice.peer.threads == 2
    probe = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(7))  # not one of the timed frames
    with torch.no_grad():
        ref = model(probe)
    for p in choice.candidates.values():
        out = p(probe)
        assert set(out) == {"boxes", "extra"} and isinstance(out["extra"], tuple)
        err = peers.outputs_rel_error(out, ref)
        assert err <= p.tolerance, (p.key, err)
        assert out["boxes"].dtype == torch.float32
    line = choice.describe()
    assert choice.peer.name in line and "2 threads" in line
    d = choice.to_dict()
    assert d["peer"] == choice.peer.name and set(d["candidates"]) == {p.name for p in choice.candidates.values()}


def test_channels_last_peer_keeps_the_model_untouched() -> None:
    model = TwoHeads().eval()
    peers.channels_last_peer(model)(frames(1)[0])
    assert model.c1.weight.is_contiguous()  # the peer works on a copy


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime not installed")
def test_onnxruntime_peer_uses_the_thread_count_and_matches() -> None:
    model = TwoHeads().eval()
    x = frames(1)[0]
    p = peers.onnxruntime_peer(model, x, threads=1)
    assert p.threads == 1 and p.prepare_s > 0
    with torch.no_grad():
        ref = model(x)
    assert peers.outputs_rel_error(p(x), ref) < peers.FP32_TOLERANCE
    # a genuinely different input gives a genuinely different output (no cached result)
    y = frames(1, seed=5)[0]
    assert peers.outputs_rel_error(p(y), ref) > 1e-2


def test_a_peer_with_wrong_outputs_is_rejected(monkeypatch) -> None:
    model = TwoHeads().eval()
    as_loaded = peers.as_loaded_peer

    def wrong(key):
        def build(m, threads=None):
            p = as_loaded(m, threads)
            good = p.forward
            p.forward, p.key = (lambda x: good(x * 1.5)), key
            return p
        return build

    monkeypatch.setattr(peers, "channels_last_peer", wrong("channels_last"))
    choice = peers.strongest_peer(model, frames(2), calls=2, onnx=False)
    assert "channels_last" in choice.rejected and "relative error" in choice.rejected["channels_last"]
    assert set(choice.candidates) == {"as_loaded"}
    monkeypatch.setattr(peers, "as_loaded_peer", wrong("as_loaded"))
    with pytest.raises(peers.PeerError, match="no dense peer"):
        peers.strongest_peer(model, frames(1), calls=1, onnx=False)


def test_outputs_rel_error_structure_mismatch() -> None:
    a = (torch.ones(2, 3), torch.ones(4))
    assert peers.outputs_rel_error(a, a) == 0.0
    assert peers.outputs_rel_error(a, (torch.ones(2, 3),)) == float("inf")
    assert peers.outputs_rel_error(a, (torch.ones(3, 2), torch.ones(4))) == float("inf")
    assert abs(peers.outputs_rel_error((torch.full((4,), 2.0),), (torch.ones(4),)) - 1.0) < 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only guard")
def test_gpu_peers_refuse_cpu_models_clearly() -> None:
    model = TwoHeads().eval()
    x = frames(1)[0]
    with pytest.raises(peers.PeerError, match="needs a CUDA device"):
        peers.cuda_graph_peer(model, x)
    with pytest.raises(peers.PeerError, match="needs a CUDA device"):
        peers.compiled_peer(model, x)
