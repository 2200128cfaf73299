"""GPU-only: the dense GPU peers (fp16 channels_last + CUDA graph, torch.compile max-autotune)
reproduce the model. Run on the device machine: python3 -m pytest tests/gpu/test_peers_gpu.py -q
(the torch.compile test takes minutes; set DELTACNN_TEST_COMPILE=1 to run it)."""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from deltacnn import peers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_peers import TwoHeads, frames  # noqa: E402


def _cuda(xs):
    return [x.cuda() for x in xs]


def _fill_freed_memory_with_nan() -> list[torch.Tensor]:
    """Collect garbage, then take the allocator's free blocks back, filled with NaN: a graph that
    replays over freed memory (the peer's weights once were) then reads NaN instead of stale values."""
    gc.collect()
    junk = [torch.full((n,), float("nan"), device="cuda", dtype=dt)
            for n in (64, 256, 1024, 4096, 16384, 65536) for dt in (torch.float16, torch.float32) for _ in range(8)]
    torch.cuda.synchronize()
    return junk


def test_cuda_graph_peer_matches_and_follows_its_input() -> None:
    model = TwoHeads().eval().cuda()
    xs = _cuda(frames(3))
    p = peers.cuda_graph_peer(model, xs[0])
    junk = _fill_freed_memory_with_nan()  # noqa: F841 - held while the peer replays
    for x in xs:  # each replay sees the new frame
        with torch.no_grad():
            ref = model(x)
        assert peers.outputs_rel_error(p(x), ref) < peers.FP16_TOLERANCE
    a, b = p(xs[0]), p(xs[1])
    assert peers.outputs_rel_error(a, b) > 1e-2  # outputs are copies, not the graph's buffers
    with pytest.raises(peers.PeerError, match="captured for input"):
        p(torch.rand(1, 3, 24, 24, device="cuda"))


def test_strongest_gpu_peer() -> None:
    model = TwoHeads().eval().cuda()
    choice = peers.strongest_peer(model, _cuda(frames(3)), calls=6)
    assert {"cuda_graph_fp16", "as_loaded"} <= set(choice.candidates), choice.rejected
    assert choice.peer.ms == min(p.ms for p in choice.candidates.values())


@pytest.mark.skipif(os.environ.get("DELTACNN_TEST_COMPILE") != "1", reason="minutes of compiling; DELTACNN_TEST_COMPILE=1")
def test_compiled_peer_matches() -> None:
    model = TwoHeads().eval().cuda()
    xs = _cuda(frames(2))
    p = peers.compiled_peer(model, xs[0])
    assert p.prepare_s > 0
    for x in xs:
        with torch.no_grad():
            ref = model(x)
        assert peers.outputs_rel_error(p(x), ref) < peers.FP16_TOLERANCE
    choice = peers.strongest_peer(model, xs, compile=True, calls=4)
    assert "compile_max_autotune" in choice.candidates, choice.rejected
