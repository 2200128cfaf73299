"""Property tests: the sparse conv of the reference backend equals dense conv on masked deltas."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deltacnn.backends import reference
from deltacnn.backends.base import ConvParams
from deltacnn.geometry import Window, dilate_mask
from deltacnn.tensor import DeltaTensor, to_cl


@st.composite
def conv_configs(draw):
    k = draw(st.sampled_from([1, 2, 3, 5, 7]))
    kw = draw(st.sampled_from([k, 1, 3]))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = tuple(draw(st.integers(0, 3)) for _ in range(4))
    groups = draw(st.sampled_from([1, 2, 4]))
    cin_g = draw(st.integers(1, 3))
    cout_g = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    if depthwise:
        cin_g, cout_g = 1, 1
    n = draw(st.integers(1, 2))
    h = draw(st.integers(max(1, (k - 1) * dil[0] + 1 - pad[0] - pad[1]), 14))
    w = draw(st.integers(max(1, (kw - 1) * dil[1] + 1 - pad[2] - pad[3]), 14))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return dict(k=(k, kw), stride=stride, dil=dil, pad=pad, groups=groups, cin=cin_g * groups,
                cout=cout_g * groups, n=n, h=h, w=w, density=density, seed=seed)


@contextmanager
def dense_switch_at(value: float):
    old = reference.DENSE_SWITCH
    reference.DENSE_SWITCH = value
    try:
        yield
    finally:
        reference.DENSE_SWITCH = old


@pytest.mark.parametrize("dense_switch", [0.0, 2.0], ids=["dense-path", "gather-path"])
@settings(max_examples=120, deadline=None)
@given(cfg=conv_configs())
def test_sparse_conv_matches_dense(cfg, dense_switch):
    with dense_switch_at(dense_switch):
        check_conv(cfg)


def check_conv(cfg: dict) -> None:
    g = torch.Generator().manual_seed(cfg["seed"])
    n, cin, h, w = cfg["n"], cfg["cin"], cfg["h"], cfg["w"]
    vals = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    mask = torch.rand(n, 1, h, w, generator=g) < cfg["density"]
    # garbage (NaN) at inactive pixels must never leak into the result
    poisoned = torch.where(mask, vals, torch.full_like(vals, float("nan")))
    weight = torch.randn(cfg["cout"], cin // cfg["groups"], *cfg["k"], generator=g, dtype=torch.float64)
    win = Window(cfg["k"], cfg["stride"], cfg["pad"], cfg["dil"])
    ho, wo = win.out_size(h, w)
    if ho < 1 or wo < 1:
        return
    t, b, l, r = cfg["pad"]
    expect = F.conv2d(F.pad(torch.where(mask, vals, 0.0), (l, r, t, b)), weight, None, cfg["stride"], 0, cfg["dil"],
                      cfg["groups"])
    # expected mask: output pixels whose receptive field holds an updated input pixel
    ones = torch.ones(1, 1, *cfg["k"], dtype=torch.float64)
    touched = F.conv2d(F.pad(mask.double(), (l, r, t, b)), ones, None, cfg["stride"], 0, cfg["dil"]) > 0
    assert torch.equal(dilate_mask(mask, win, (ho, wo)), touched)
    d = DeltaTensor(to_cl(poisoned), mask)
    out = reference.ReferenceBackend().conv2d(d, ConvParams(weight, win, cfg["groups"]))
    assert out.shape == expect.shape
    assert torch.equal(out.mask, touched)
    got = torch.where(out.mask, out.values, 0.0)
    torch.testing.assert_close(got, torch.where(touched, expect, 0.0), rtol=1e-9, atol=1e-9)
