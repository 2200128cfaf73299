"""benchmarks/profile_frame.py's conv-layer matching and common.print_table on the data path that broke
`gpu_peers.py --profile` in session 11 (no conv kernel of a known name: an empty table)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:  # common finds shared/bench/workload.py beside the checkout (or on PYTHONPATH)
    from common import print_table
    from profile_frame import match_conv_kernels
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
