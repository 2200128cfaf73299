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


def _runner(bufs):
    return SimpleNamespace(_bufs=bufs, _abs_max=lambda t: StreamGraphedDeltaModel._abs_max(None, t))


@pytest.mark.parametrize("seed", [True, False])
@pytest.mark.parametrize("with_change", [True, False])
@pytest.mark.parametrize("rows", [None, 2])
@pytest.mark.parametrize("n,shape,dtype,layout", [(5, (3, 40, 72), torch.float32, "nchw"),
                                                  (4, (3, 16, 24), torch.float16, "cl"),
                                                  (3, (2, 130, 70), torch.float32, "cl")])
def test_pass_report_kernel_equals_pytorch_form(n, shape, dtype, layout, seed, with_change, rows):
    """A keyframe's scale / NaN flag (seed) and a keyframe's or dense pass's report, of the whole batch or of one
    stream's rows (a single-stream pass: x is that stream's frame), against _pass_report_torch. Streams holding
    NaN or infinity: flagged both ways; the torch form keeps a NaN scale where the kernel keeps infinity."""
    x, bufs, rt = _case(n + 7, n, shape, dtype, layout)
    idx = None
    if rows is not None:
        idx = torch.tensor([rows], device=DEV)
        x = x[rows:rows + 1]
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
    change = rt.stream_change[:x.shape[0]] if with_change else None
    report_in = bufs["report"] if rows is None else None
    want = {k: v.clone() for k, v in bufs.items()}
    StreamGraphedDeltaModel._pass_report_torch(_runner(want), x, seed, want["report"] if report_in is not None else None,
                                               change, idx)
    got = {k: v.clone() for k, v in bufs.items()}
    report.pass_report_(x, got["scale"], got["bad"], got["report"] if report_in is not None else None, change, seed,
                        idx)
    assert torch.equal(got["bad"], want["bad"])
    finite = torch.isfinite(want["scale"])
    torch.testing.assert_close(got["scale"][finite], want["scale"][finite], rtol=0, atol=0)
    assert bool((~torch.isfinite(got["scale"]) == ~finite).all())
    torch.testing.assert_close(got["report"], want["report"], rtol=0, atol=0)
    if seed and rows is None:  # the NaN and -inf streams are flagged, the others not
        assert got["bad"].tolist()[:3] == [False, True, True][:n]
    if seed and rows is not None:  # only that stream's row changed
        others = [k for k in range(n) if k != rows]
        assert torch.equal(got["scale"][others], bufs["scale"][others])
        assert bool(got["bad"][rows]) == (rows in (1, 2))


def test_pass_report_rejects_a_part_of_the_batch_without_rows():
    x, bufs, _ = _case(3, 4, (3, 8, 8), torch.float32, "nchw")
    with pytest.raises(ValueError, match="rows"):
        report.pass_report_(x[:2], bufs["scale"], bufs["bad"], None, None, True)
