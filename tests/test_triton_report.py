"""The compiled runner's per-stream report kernels (triton_kernels/report.py) against its PyTorch form
(StreamGraphedDeltaModel._check_streams_torch), on random frames with NaN, infinities, values out of
range, left-out streams and frames longer than one chunk (TRITON_INTERPRET=1 on the CPU, or a GPU)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from deltacnn.backends.triton_kernels import report  # noqa: E402
from deltacnn.compile import StreamGraphedDeltaModel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, n: int, shape: tuple[int, int, int], dtype, layout: str):
    """Stream 0: much louder than at its keyframe; 1: NaN; 2: -inf; 3: 1000x louder; the rest as at their
    keyframe. The last stream is left out (keep False) when n > 1; one stream was flagged before."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, *shape, generator=g) * 2).to(dtype)
    scale = x.float().abs().amax(dim=(1, 2, 3))
    scale[0] = 1e-3
    if n > 1:
        x[1, 0, 0, 1] = float("nan")
    if n > 2:
        x[2, -1, -1, -1] = float("-inf")  # at the last element of the stream's block
    if n > 3:
        x[3] *= 1000
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    keep = torch.ones(n, dtype=torch.bool)
    bad = torch.zeros(n, dtype=torch.bool)
    if n > 1:
        keep[-1] = False
    if n > 4:
        bad[4] = True
    bufs = {"scale": scale.to(DEV), "bad": bad.to(DEV), "keep": keep.to(DEV),
            "report": torch.rand(3, n, generator=g).to(DEV)}
    rt = SimpleNamespace(stream_change=torch.rand(n, generator=g).to(DEV),
                         input_held=torch.rand(n, generator=g).to(DEV))
    return x.to(DEV), bufs, rt


def _torch_form(x, bufs, rt, ratio):
    runner = SimpleNamespace(model=SimpleNamespace(rt=rt), _bufs=bufs, range_ratio=ratio,
                             _abs_max=lambda t: StreamGraphedDeltaModel._abs_max(None, t))
    StreamGraphedDeltaModel._check_streams_torch(runner, x)


@pytest.mark.parametrize("n,shape,dtype,layout", [(5, (3, 40, 72), torch.float32, "nchw"),
                                                  (4, (3, 16, 24), torch.float16, "cl"),
                                                  (1, (2, 130, 70), torch.float32, "cl")])
@pytest.mark.parametrize("ratio", [8.0, None])
@pytest.mark.parametrize("held", [True, False])
def test_report_kernels_equal_pytorch_form(n, shape, dtype, layout, ratio, held):
    x, bufs, rt = _case(n, n, shape, dtype, layout)
    want_b = {k: v.clone() for k, v in bufs.items()}
    want_rt = SimpleNamespace(stream_change=rt.stream_change, input_held=rt.input_held if held else None)
    _torch_form(x, want_b, want_rt, ratio)
    got_b = {k: v.clone() for k, v in bufs.items()}
    assert report.report_fits(x)
    report.delta_report_(x, got_b["scale"], got_b["bad"], got_b["keep"], rt.stream_change,
                         rt.input_held if held else None, got_b["report"], ratio)
    assert torch.equal(got_b["bad"], want_b["bad"])
    torch.testing.assert_close(got_b["report"], want_b["report"], rtol=0, atol=0)
    # the cases flag some streams and not others (stream 0 only through the range test)
    assert bool(want_b["bad"][0]) == (ratio is not None)
    assert n == 1 or not bool(want_b["bad"][-1]) or n > 4


def test_report_fits_rejects_strided_frames():
    x = torch.randn(2, 3, 8, 10, device=DEV)
    assert report.report_fits(x) and report.report_fits(x.contiguous(memory_format=torch.channels_last))
    assert not report.report_fits(x[:, :, :, ::2])
    assert not report.report_fits(x.to(torch.int32))
