"""The self-scanning conv (one launch, no tile-list launch) against float64 references and against the
two-launch form, twice in a row on the same persistent buffers (they must be left zeroed).

TRITON_INTERPRET=1 on the CPU (small shapes), or on a GPU. Inputs random, inactive values NaN,
outputs poisoned with NaN (see test_triton_kernels).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_triton_kernels import (DEV, TOL, _conv_inputs, check_nonlinear, cl, rand_delta, ref_act,  # noqa: E402
                                 ref_conv, ref_nonlinear, rel, tk)

pytestmark = pytest.mark.usefixtures("no_tf32")

CASES = {  # (cin, cout, kernel, stride, pad4, dilation, groups), split-K, act, tau, residual, input density
    "fixup+res+relu tau>0": ((24, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), 3, "relu", 0.3, True, 0.04),
    "split emit tau 0 + res": ((8, 40, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1), 1, "relu", 0.0, True, 0.3),
    "split emit tau 0, fixup": ((24, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), 2, "relu", 0.0, False, 0.1),
    "two-pass tau>0, 1x1": ((8, 40, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1), 2, "silu", 0.2, True, 0.3),
    "packed stem, linear + res": ((3, 16, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1), 2, None, 0.0, True, 0.04),
    "grouped 1x1 s2, linear": ((8, 16, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 2), 1, None, 0.0, False, 0.3),
}


def _run(name, scan: bool, seed: int, state: dict | None, given_mask: bool = False):
    case, split, fn, tau, with_res, p = CASES[name]
    dtype = torch.float16
    cout = case[1]
    g, x, xm, wt, om = _conv_inputs(seed, case, dtype, h=23, w=19, p=p)
    n, _, ho, wo = om.shape
    if with_res:
        res, rm = rand_delta(g, n, cout, ho, wo, dtype, 0.05)
        kw = dict(residual=res, residual_mask=rm)
    else:
        rm = torch.zeros_like(om)
        kw = {}
    y = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
    if with_res:
        y = y + torch.where(rm, res.double(), torch.zeros((), dtype=torch.float64, device=DEV))
    cfg = tk.ConvConfig(th=8, tw=8, bn=16, bk=16, split_k=split)
    out_mask = om if given_mask else None
    args = (x, xm, wt, out_mask, case[3], case[4], case[5], case[6])
    extra = dict(config=cfg, scan_state=state if scan else None, input_precision="ieee")
    if fn is None:
        out = cl(torch.full(y.shape, float("nan"), dtype=torch.float32, device=DEV))
        o, fm = tk.sparse_conv2d(*args, out, **kw, **extra)
        assert torch.equal(fm, om | rm)
        sel = fm.expand_as(y)
        assert rel(o[sel], y[sel]) < 1e-6
        return fm, o[sel]
    A = cl(torch.randn(n, cout, ho, wo, generator=g).to(DEV))
    E = cl(ref_act(fn, A.double()).float() + 0.05 * torch.randn(n, cout, ho, wo, generator=g).to(DEV))
    ref = ref_nonlinear(y, om | rm, A, E, fn, tau, "max", dtype)
    out = cl(torch.full(y.shape, float("nan"), dtype=dtype, device=DEV))
    o, fm = tk.sparse_conv2d(*args, out, **kw, act=tk.Act(fn, A, E, tau), **extra)
    check_nonlinear(o, fm, A, E, ref, TOL[dtype] * 2, tau, 0.02)
    if tau <= 0:
        assert torch.equal(fm, ref[3]), "at tau 0 the emit mask is exact"
    return fm, A


def _left_clean(state: dict) -> None:
    """Every persistent buffer is back at zero (the epoch advanced instead), ready for the next call."""
    assert state, "the self-scanning conv did not run"
    for buf in state.values():
        s = buf["state"].tolist()
        assert s[0] == 0 and s[1] == 0 and s[3] == 0 and s[2] > 0, s
        assert int(buf["ctr"].abs().sum()) == 0
        if buf["ws"] is not None:
            assert float(buf["ws"].abs().sum()) == 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_self_scan_matches_reference_and_two_launch_form(name, monkeypatch):
    monkeypatch.setattr(tk.conv, "SELF_SCAN", True)
    state: dict = {}
    first = _run(name, True, 41, state)
    _left_clean(state)
    again = _run(name, True, 42, state)  # other data through the same buffers
    _left_clean(state)
    assert next(iter(state.values()))["state"][2].item() == 2
    two = _run(name, False, 42, None)
    assert torch.equal(again[0], two[0])
    assert rel(again[1], two[1]) < 1e-6
    assert first[0].any()


def test_self_scan_with_a_given_candidate_mask(monkeypatch):
    monkeypatch.setattr(tk.conv, "SELF_SCAN", True)
    state: dict = {}
    fm, _ = _run("split emit tau 0 + res", True, 7, state, given_mask=True)
    _left_clean(state)
    fm2, _ = _run("split emit tau 0 + res", False, 7, None, given_mask=True)
    assert torch.equal(fm, fm2)


@pytest.mark.parametrize("case", [(3, 16, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1), (3, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)],
                         ids=["stem7x7s2", "3x3"])
def test_self_scan_window_rows(case, monkeypatch):
    """Window rows of the bordered copy (whose padded size is not the mask's): the candidates are the
    dilation of x's own mask."""
    from test_triton_kernels import bordered_of
    monkeypatch.setattr(tk.conv, "SELF_SCAN", True)
    g, x, xm, wt, om = _conv_inputs(31, case, torch.float16, h=13, w=21)
    ref = ref_conv(x, xm, wt, case[3], case[4], case[5], case[6])
    state: dict = {}
    out = cl(torch.full(ref.shape, float("nan"), dtype=torch.float32, device=DEV))
    y, ym = tk.sparse_conv2d(x, xm, wt, None, case[3], case[4], case[5], case[6], out, input_precision="ieee",
                             config=tk.ConvConfig(th=8, tw=8, bn=16, bk=16), bordered=bordered_of(x, xm),
                             scan_state=state)
    assert torch.equal(ym, om)
    sel = om.expand_as(ref)
    assert rel(y[sel], ref[sel]) < 1e-6
    _left_clean(state)
