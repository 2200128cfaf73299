"""benchmarks/profile_frame.py's conv-layer matching and common.print_table on the data path that broke
`gpu_peers.py --profile` in session 11 (no conv kernel of a known name: an empty table); cpu_profile.py's Wrap
switches of fast paths the library has no switch for (off: the generic path runs, the numbers stay)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:  # common finds shared/bench/workload.py beside the checkout (or on PYTHONPATH)
    from common import print_table
    from profile_frame import match_conv_kernels
    import cpu_profile
except ImportError as e:
    pytest.skip(f"benchmarks not importable here: {e}", allow_module_level=True)


def _conv(cin: int, cout: int, k: int):
    return SimpleNamespace(weight=SimpleNamespace(shape=(cout, cin, k, k)), window=SimpleNamespace(stride=(1, 1)))


def test_kernels_match_convs_in_launch_order():
    convs = [("a", _conv(3, 8, 3), (1, 3, 16, 16)), ("b", _conv(8, 8, 1), (1, 8, 16, 16))]
    kernels = [(0, "_tiles_kernel", 2.0), (1, "_conv_gemm_kernel", 3.0), (2, "_nonlinear_kernel", 1.5),
               (3, "vectorized_elementwise", 9.0), (4, "_tiles_kernel", 1.0), (5, "_conv_gemm_kernel", 4.0)]
    rows = match_conv_kernels(kernels, convs)
    assert [(r["layer"], r["tiles_us"], r["conv_us"], r.get("nonlinear_us")) for r in rows] == \
        [("a", 2.0, 3.0, 1.5), ("b", 1.0, 4.0, None)]
    assert rows[0]["conv"] == "3->8 k3 s1" and rows[0]["in_hw"] == "16x16"


def test_unknown_conv_kernel_gives_an_empty_table_not_an_error(capsys):
    rows = match_conv_kernels([(0, "_conv_scan_kernel", 3.0)], [("a", _conv(3, 8, 3), (1, 3, 16, 16))])
    assert rows == []
    print_table(rows, ["layer", "conv_us"])  # session 11: TypeError 'int' object is not iterable
    assert capsys.readouterr().out.split() == ["layer", "conv_us"]


def _switched(name: str, on: bool):
    """A context that sets cpu_profile switch `name` and restores it on after."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        cpu_profile._set_switch(name, on)
        try:
            yield
        finally:
            cpu_profile._set_switch(name, True)
    return ctx()


def test_wrap_switches_take_the_generic_path_and_keep_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """dense_depthwise, reuse_dense_out, pointwise_update and fold_deconv_bn off: a depthwise conv's dense frame is
    declined by the fused pass, a dense output is a new buffer each call, a ReLU layer on deltas runs the
    reference's pointwise, a batch norm after a transposed conv stays a DeltaScale; on (restored), each fast path
    is back; a CenterFace-like net's frames at tau 0 equal dense PyTorch either way."""
    from deltacnn.activations import ActSpec
    from deltacnn.backends import cpu_fused, get_backend
    from deltacnn.backends.base import ConvParams
    from deltacnn.backends.cpu_kernels import load
    from deltacnn.backends.reference import ReferenceBackend
    from deltacnn.geometry import Window
    from deltacnn.layers.linear import DeltaScale
    import deltacnn
    if load() is None:
        pytest.skip("CPU kernels do not build here")
    fused = get_backend(torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    dw = ConvParams(torch.randn(8, 1, 3, 3, generator=gen), Window.make(3, 1, 1), 8)
    with _switched("dense_depthwise", False):
        assert fused.dense_conv(x, dw, None, None, ActSpec("relu"), None) is None
    assert fused.dense_conv(x, dw, None, None, ActSpec("relu"), None) is not None

    monkeypatch.setattr(cpu_fused, "DENSE_OUT_KEEP", 0)
    shape = (1, 8, 6, 6)
    with _switched("reuse_dense_out", False):
        outs = [fused._dense_out(shape) for _ in range(3)]  # held: the pool would hand out three of its own
    assert not any(o is b for o in outs for b in fused._pool.get(shape, []))
    ptrs = {fused._dense_out(shape).data_ptr() for _ in range(3)}  # on: each dropped at once, the same one back
    assert len(ptrs) == 1 and ptrs <= {b.data_ptr() for b in fused._pool[shape]}

    calls = [0]
    real = ReferenceBackend.pointwise

    def counted(self, d, st):
        calls[0] += 1
        return real(self, d, st)
    monkeypatch.setattr(ReferenceBackend, "pointwise", counted)
    torch.manual_seed(13)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU(),
                        nn.ConvTranspose2d(8, 6, 2, 2), bn, nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    frames = torch.rand(1, 3, 24, 32).repeat(4, 1, 1, 1)
    for k in range(1, 4):
        frames[k:, :, 2 + 3 * k:10 + 3 * k, 4 + 4 * k:12 + 4 * k] = torch.rand(3, 8, 8)
    for on in (False, True):
        calls[0] = 0
        with _switched("fold_deconv_bn", on), _switched("pointwise_update", on):
            dm = deltacnn.convert(net, frames[:1], threshold=0.0, backend="cpu")
            assert any(isinstance(m, DeltaScale) for m in dm.modules()) == (not on)
            with torch.no_grad():
                for t in range(4):
                    torch.testing.assert_close(dm(frames[t:t + 1]), net(frames[t:t + 1]), rtol=1e-4, atol=1e-4)
        assert (calls[0] > 0) == (not on)


def test_conv_settings_split_on_commas_before_a_name_only() -> None:
    """Session 18: 'LATENCY_BOUND_COUT=(1,256)' was split at its tuple's comma (a SyntaxError on the device)."""
    try:
        from gpu_yolo import split_settings
    except ImportError as e:
        pytest.skip(f"gpu_yolo not importable here: {e}")
    assert split_settings("A=1,B=(1,256),C=None") == ["A=1", "B=(1,256)", "C=None"]
    assert split_settings("LATENCY_BOUND_COUT=(1, 64)") == ["LATENCY_BOUND_COUT=(1, 64)"]


def test_conv_settings_set_backend_switches_and_restore_them() -> None:
    """--conv-ab 'backend.NAME=VALUE' sets the TritonBackend class's switch (the A/B of fuse_blobs,
    kernel_upsample), 'common.NAME' triton_kernels._common's (PDL), plain names triton_kernels.conv's; all come
    back, and an unknown name stops the run."""
    try:
        from gpu_yolo import set_conv_setting
        from deltacnn.backends.triton_backend import TritonBackend
        from deltacnn.backends.triton_kernels import conv
    except ImportError as e:
        pytest.skip(f"gpu_yolo not importable here: {e}")
    from deltacnn.backends.triton_kernels import _common
    before = (TritonBackend.fuse_blobs, TritonBackend.kernel_upsample, conv.DIRECT_TILE_ITEMS, _common.PDL)
    restore = set_conv_setting("backend.fuse_blobs=False,backend.kernel_upsample=False,DIRECT_TILE_ITEMS=None,"
                               "common.PDL='early'")
    try:
        assert (TritonBackend.fuse_blobs, TritonBackend.kernel_upsample, conv.DIRECT_TILE_ITEMS, _common.PDL) == \
            (False, False, None, "early")
    finally:
        restore()
    assert (TritonBackend.fuse_blobs, TritonBackend.kernel_upsample, conv.DIRECT_TILE_ITEMS, _common.PDL) == before
    with pytest.raises(SystemExit, match="no setting"):
        set_conv_setting("backend.no_such_switch=1")


def test_kernel_names_keep_anonymous_namespaces() -> None:
    from profile_frame import kernel_name
    assert kernel_name("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>(float*, int)") == \
        "void at::native::CatArrayBatchedCopy<float>"
    assert kernel_name("_conv_gemm_kernel") == "_conv_gemm_kernel"
    assert kernel_name("void at::native::elementwise_kernel<128, 4>(int, F)") == "void at::native::elementwise_kernel<128, 4>"
