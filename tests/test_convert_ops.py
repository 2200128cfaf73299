"""Every rearrangement and tuple op has a delta form equal to dense PyTorch at tau 0 (moving content, no noise,
so the update masks are local and a wrong mask rule shows); dense islands get all their arguments and
their work is counted; nothing runs dense unseen."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import deltacnn
from conftest import make_video, rel_err
from deltacnn.convert import DenseOpsWarning, check_no_silent_dense

FRAMES = 20
BACKENDS = ["reference", "cpu"]


class Op(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, y, x):
        return self.fn(y, x)


def _focus(y, x):  # YOLOv5 Focus / space-to-depth
    return torch.cat([y[..., ::2, ::2], y[..., 1::2, ::2], y[..., ::2, 1::2], y[..., 1::2, 1::2]], 1)


def _shuffle(y, x):  # ShuffleNet channel shuffle
    n, c, h, w = y.shape
    return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _chunk_unpack(y, x):
    a, b = y.chunk(2, 1)
    return torch.cat([b, a * 2.0], 1)


def _c2f(y, x):  # Ultralytics C2f: list(chunk), then extend
    parts = list(y.chunk(2, 1))
    parts.append(parts[-1] + 1.0)
    return torch.cat(parts, 1)


def _unbind_gray(y, x):  # unbind, elementwise ops on the 3-D parts, back to a map
    parts = y.unbind(1)
    return (parts[0] * 0.5 + torch.relu(parts[1]) - parts[2] / 4.0).unsqueeze(1)


# name -> (op, input channels of the next conv, stride of the first conv, delta layer kind that must appear)
CASES = {
    "chunk_unpack": (_chunk_unpack, 8, 1, "DeltaSlice"),
    "c2f_list_chunk": (_c2f, 12, 1, "DeltaSlice"),
    "split_list": (lambda y, x: torch.cat(y.split([3, 5], 1)[::-1], 1), 8, 1, "DeltaSlice"),
    "torch_split_int": (lambda y, x: sum(torch.split(y, 4, dim=1)), 4, 1, "DeltaSlice"),
    "tensor_split": (lambda y, x: torch.cat(torch.tensor_split(y, 3, dim=1)[:2], 1), 6, 1, "DeltaSlice"),
    "unbind_gray": (_unbind_gray, 1, 1, "DeltaSlice"),
    "unbind_stack": (lambda y, x: torch.stack(y.unbind(1)[::-1], 1), 8, 1, "DeltaCat"),
    "unbind_rows": (lambda y, x: torch.cat([y.unbind(2)[3].unsqueeze(2), y.unbind(-2)[-5].unsqueeze(2)], 1), 16, 1,
                    "DeltaSlice"),
    "select_index": (lambda y, x: torch.cat([y[:, 2:3], y[:, 0].unsqueeze(1), y.select(1, -1).unsqueeze(1)], 1), 3, 1,
                     "DeltaSlice"),
    "index_cols_sliced": (lambda y, x: y[:, 1:5, ..., 4].unsqueeze(-1), 4, 1, "DeltaSlice"),
    "chunk_rows": (lambda y, x: torch.cat(y.chunk(2, 2), 1), 16, 1, "DeltaSlice"),
    "split_cols": (lambda y, x: torch.cat(torch.split(y, 8, dim=-1), 1), 16, 1, "DeltaSlice"),
    "slice_step_shape_bound": (lambda y, x: y[:, 1: y.shape[1]: 2], 4, 1, "DeltaSlice"),
    "slice_half": (lambda y, x: y[:, : y.shape[1] // 2] - y[:, y.size(1) // 2:], 4, 1, "DeltaSlice"),
    "narrow": (lambda y, x: y.narrow(1, 2, 5), 5, 1, "DeltaSlice"),
    "focus": (_focus, 32, 1, "DeltaSlice"),
    "channel_shuffle": (_shuffle, 8, 1, "DeltaSlice"),
    "pixel_shuffle": (lambda y, x: F.pixel_shuffle(y, 2), 2, 2, "DeltaLinearMap"),
    "pixel_unshuffle": (nn.PixelUnshuffle(2), 32, 1, "DeltaLinearMap"),
    "roll": (lambda y, x: torch.roll(y, (2, -3, 1), (2, 3, 1)), 8, 1, "DeltaLinearMap"),
    "flip": (lambda y, x: torch.flip(y, (3,)), 8, 1, "DeltaLinearMap"),
    "pad_constant": (lambda y, x: F.pad(y, (1, 2, 0, 3), value=0.5), 8, 1, "DeltaLinearMap"),
    "pad_crop": (lambda y, x: F.pad(y, (-1, 2, 1, -2)), 8, 1, "DeltaLinearMap"),
    "pad_reflect": (lambda y, x: F.pad(y, (2, 1, 1, 2), mode="reflect"), 8, 1, "DeltaLinearMap"),
    "pad_replicate": (lambda y, x: F.pad(y, (2, 1, 1, 2), mode="replicate"), 8, 1, "DeltaLinearMap"),
    "pad_circular": (lambda y, x: F.pad(y, (2, 1, 1, 2), mode="circular"), 8, 1, "DeltaLinearMap"),
    "reflection_pad_module": (nn.ReflectionPad2d(1), 8, 1, "DeltaLinearMap"),
    "constant_pad_module": (nn.ConstantPad2d((1, 0, 2, 1), -0.25), 8, 1, "DeltaLinearMap"),
    "interp_size_nearest": (lambda y, x: F.interpolate(y, size=x.shape[-2:]), 8, 2, "DeltaLinearMap"),
    "interp_nearest_exact": (lambda y, x: F.interpolate(y, size=x.shape[-2:], mode="nearest-exact"), 8, 2,
                             "DeltaLinearMap"),
    "interp_bilinear": (lambda y, x: F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False), 8, 2,
                        "DeltaLinearMap"),
    "interp_bilinear_ac": (lambda y, x: F.interpolate(y, scale_factor=1.5, mode="bilinear", align_corners=True), 8, 1,
                           "DeltaLinearMap"),
    "interp_bicubic": (lambda y, x: F.interpolate(y, size=(13, 11), mode="bicubic", align_corners=False), 8, 1,
                       "DeltaLinearMap"),
    "interp_area": (lambda y, x: F.interpolate(y, size=(5, 7), mode="area"), 8, 1, "DeltaLinearMap"),
    "upsample_bicubic_module": (nn.Upsample(scale_factor=2, mode="bicubic"), 8, 2, "DeltaLinearMap"),
    "interp_scale_nearest": (lambda y, x: F.interpolate(y, scale_factor=2.0), 8, 2, "DeltaLinearMap"),
    "upsample_nearest_module": (nn.Upsample(scale_factor=(2, 3), mode="nearest"), 8, 1, "DeltaLinearMap"),
}


class _ModuleOp(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, y, x):
        return self.m(y)


class Bank(nn.Module):
    """Cases side by side, each conv -> relu -> op -> conv -> relu (the op between two stateful layers, as in
    real networks) with its own output, so each is checked alone; the first conv is shared (fewer layers)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.names = names
        self.first = nn.ModuleList([nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 3, 2, 1)])
        self.strided = [CASES[n][2] == 2 for n in names]
        self.ops = nn.ModuleList(_ModuleOp(CASES[n][0]) if isinstance(CASES[n][0], nn.Module) else Op(CASES[n][0])
                                 for n in names)
        self.last = nn.ModuleList(nn.Conv2d(CASES[n][1], 4, 3, padding=1) for n in names)

    def forward(self, x):
        y = [torch.relu(self.first[0](x)), torch.relu(self.first[1](x)) if any(self.strided) else None]
        return tuple(torch.relu(last(op(y[s], x))) for op, last, s in zip(self.ops, self.last, self.strided))


def _run(model: nn.Module, backend: str, frames: int = FRAMES, **kw) -> tuple[deltacnn.DeltaModel, list[float]]:
    clip = make_video(frames, h=16, w=16, noise=0.0, seed=3, size=4)  # moving squares only: local updates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DenseOpsWarning)
        dm = deltacnn.convert(model, clip[0], backend=backend, dense_above=None, **kw)
    worst: list[float] = []
    for t in range(frames):
        with torch.no_grad():
            got, want = dm(clip[t]), model(clip[t])
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        worst = [max(w, rel_err(g, r)) for w, g, r in zip(worst or [0.0] * len(want), got, want)]
    return dm, worst


GROUPS = {
    "tuple_ops": [n for n in CASES if any(k in n for k in ("split", "chunk", "c2f", "unbind", "select", "index"))],
    "slices": ["slice_step_shape_bound", "slice_half", "narrow", "focus", "channel_shuffle"],
    "rearrange": ["pixel_shuffle", "pixel_unshuffle", "roll", "flip"],
    "pads": [n for n in CASES if "pad" in n],
    "resample": [n for n in CASES if "interp" in n or "upsample" in n],
}


def test_groups_cover_every_case():
    assert sorted(n for g in GROUPS.values() for n in g) == sorted(CASES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", list(GROUPS))
def test_ops_match_dense_at_tau0(group, backend):
    names = GROUPS[group]
    m = Bank(names).eval()
    dm, worst = _run(m, backend)  # no allow_dense_fallback: an op without a delta form would raise
    kinds = {type(layer).__name__ for layer in dm.layers.values()}
    for n in names:
        assert CASES[n][3] in kinds, f"{n}: no {CASES[n][3]} in {sorted(kinds)}"
    assert not any(isinstance(layer, deltacnn.DenseCall) for layer in dm.layers.values()), f"{group} ran dense"
    assert dm.report.islands == [] and dm.report.tails == []
    bad = {n: f"{w:.2e}" for n, w in zip(names, worst) if not w < 1e-5}
    assert not bad, f"{group} ({backend}): worst relative errors {bad}"


def test_unbind_parts_as_outputs_are_a_listed_tail():
    """Parts of unbind that never come back to a map (a box decode's x, y, w, h) end as a dense tail: exact and listed."""
    class Decode(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            cx, cy, w, h = torch.sigmoid(self.c(x)).unbind(1)
            return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)

    m = Decode().eval()
    dm, worst = _run(m, "reference")
    assert worst[0] < 1e-5
    assert dm.report.islands == [] and dm.report.tails, "the decode should be listed as a dense tail"


def test_mask_rule_matters():
    """A wrong mask rule must fail the comparison: bilinear upsampling with the nearest rule drifts."""
    from deltacnn import linear_maps as lm

    good = lm.interpolate(size=(16, 16), mode="bilinear", align_corners=False)
    bad = lm.interpolate(size=(16, 16), mode="nearest")
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[0, 0, 3, 3] = True
    assert good.mask_fn(m).sum() > bad.mask_fn(m).sum()
    # the rule is exactly "reads an updated pixel": compare with the op applied to a one-hot delta
    d = torch.zeros(1, 1, 8, 8)
    d[0, 0, 3, 3] = 1.0
    assert torch.equal(good.mask_fn(m), good.fn(d) != 0)
    bic = lm.interpolate(size=(13, 11), mode="bicubic", align_corners=False)
    assert bool((bic.mask_fn(m) | ~(bic.fn(d) != 0)).all())  # every pixel the op changes is marked


def test_no_conv_stays_a_plain_call_after_tuple_ops():
    class C2f(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cv1 = nn.Conv2d(3, 8, 1)
            self.m = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
            self.cv2 = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    dm = deltacnn.convert(C2f().eval(), torch.randn(1, 3, 8, 8), backend="reference")
    convs = [n for n in dm.layers.values() if isinstance(n, deltacnn.DeltaConv2d)]
    assert len(convs) == 4
    assert "self.m" not in dm.graph_module.code and "cv2(" not in dm.graph_module.code.replace("_delta.cv2(", "")


def test_self_check_catches_a_plain_conv():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return F.conv2d(x, self.conv.weight) + self.conv(x)

    gm = fx.symbolic_trace(Plain())
    with pytest.raises(deltacnn.ConversionError, match="conv"):
        check_no_silent_dense(gm)


# ---- dense islands --------------------------------------------------------------------------------------
class IslandNet(nn.Module):
    """Ops with no delta form, called with non-tensor args, kwargs and a second tensor (a buffer)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 3, padding=1)
        theta = torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]]])
        self.register_buffer("grid", F.affine_grid(theta, (1, 6, 16, 16), align_corners=False))

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.kind == "roll_flat":
            y = torch.roll(y, 5)  # dims=None: rolls the flattened tensor, no delta form
        elif self.kind == "grid_sample":
            y = F.grid_sample(y, self.grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif self.kind == "cumsum_kw":
            y = torch.cumsum(y, dim=3) * 0.1
        elif self.kind == "pixel_transpose":
            y = y.permute(0, 1, 3, 2).contiguous()  # moves values between pixels
        return torch.relu(self.b(y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["roll_flat", "grid_sample", "cumsum_kw", "pixel_transpose"])
def test_island_gets_all_args_and_is_exact(kind, backend):
    torch.manual_seed(0)
    m = IslandNet(kind).eval()
    x = make_video(1, h=16, w=16)[0]
    with pytest.raises(deltacnn.UnsupportedOperationError, match="allow_dense_fallback") as e:
        deltacnn.convert(m, x)
    assert "test_convert_ops.py" in str(e.value) and "graph node" in str(e.value)  # node and source line
    with pytest.warns(DenseOpsWarning, match="dense island") as w:
        deltacnn.convert(m, x, allow_dense_fallback=True)
    assert len([r for r in w if issubclass(r.category, DenseOpsWarning)]) == 1  # warned once
    dm, (worst,) = _run(m, backend, allow_dense_fallback=True)
    assert len(dm.report.islands) == 1
    assert any(isinstance(layer, deltacnn.DenseIsland) for layer in dm.layers.values())
    assert worst < 1e-5, f"{kind} ({backend}): {worst:.2e}"


def test_island_work_is_counted_dense_in_stats_and_summary():
    class Leafy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else self.conv(-x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.leaf, self.b = nn.Conv2d(3, 6, 3, padding=1), Leafy(), nn.Conv2d(6, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.b(self.leaf(torch.relu(self.a(x))))
            return y, self.fc(torch.flatten(y.mean((2, 3), keepdim=True), 1))

    m = Net().eval()
    clip = make_video(4, h=12, w=12, noise=0.0)
    with pytest.warns(DenseOpsWarning) as w:
        dm = deltacnn.convert(m, clip[0], allow_dense_fallback=True, leaf_modules=[Leafy], backend="reference",
                              dense_above=None)
    msg = str(w[0].message)
    assert "dense island 'leaf'" in msg and "% of the model's MACs" in msg and "fc" in msg
    leaf_macs = 6 * 6 * 9 * 12 * 12
    assert dm.report.layer_macs["leaf"] == leaf_macs
    dm.enable_stats()
    for t in range(4):
        with torch.no_grad():
            out = dm(clip[t])
            want = m(clip[t])
        assert rel_err(out[0], want[0]) < 1e-5 and rel_err(out[1], want[1]) < 1e-5
    st = dm.frame_stats()
    assert st.layers["leaf"].macs == st.layers["leaf"].dense_macs == leaf_macs  # dense: 100% of its work
    assert st.layers["fc"].macs == 4 * 2
    assert st.layers["a"].macs < st.layers["a"].dense_macs  # the delta layers did less
    table = dm.summary(show=False)
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "dense island" in rows["leaf"] and "dense tail" in rows["fc"] and "delta" in rows["a"]
    assert f"{leaf_macs:,d}" in rows["leaf"] and "100.0%" in rows["leaf"]


def test_conv_after_a_pixel_moving_chain_needs_permission_and_names_the_line():
    m = IslandNet("pixel_transpose").eval()
    with pytest.raises(deltacnn.UnsupportedOperationError) as e:
        deltacnn.convert(m, make_video(1, h=16, w=16)[0])
    msg = str(e.value)
    assert "'contiguous'" in msg and "y = y.permute(0, 1, 3, 2).contiguous()" in msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_slice_is_a_channel_slice_at_any_size(backend):
    """y[:, :c] (C2f's split) converts to a channel-only slice: the backend's channel_slice runs on delta frames
    (not a spatial copy of values and mask), and the slice holds at another input size after a reset (the
    traced height and width are not baked in)."""
    m = Bank(["slice_half"]).eval()
    clip = make_video(6, h=16, w=16, noise=0.0, seed=3, size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DenseOpsWarning)
        dm = deltacnn.convert(m, clip[0], backend=backend, dense_above=None, on_input_change="reset")
    slices = [layer for layer in dm.layers.values() if isinstance(layer, deltacnn.layers.DeltaSlice)]
    assert slices and not any(s.spatial for s in slices)
    be = dm.rt.backend_on(torch.device("cpu"))
    calls = []
    real = be.channel_slice
    be.channel_slice = lambda d, a, b: calls.append((a, b)) or real(d, a, b)
    for t in range(clip.shape[0]):
        with torch.no_grad():
            assert rel_err(dm(clip[t])[0], m(clip[t])[0]) < 1e-5
    assert len(calls) == 2 * (clip.shape[0] - 1)  # two slices on every delta frame
    other = make_video(4, h=24, w=20, noise=0.0, seed=4, size=4)
    for t in range(other.shape[0]):
        with torch.no_grad():
            got, want = dm(other[t])[0], m(other[t])[0]
        assert got.shape == want.shape and rel_err(got, want) < 1e-5
