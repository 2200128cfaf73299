"""Values the converter computes densely that become feature maps again (issue 11's last gap).

A part of unbind times a tensor constant stays delta end to end. Other dense work that comes back to
a map of the stream (a softmax over the flattened pixels viewed back, a part times a dense value
unsqueezed again, rows stacked back) is a dense island: an error naming node, op and source line
without allow_dense_fallback; with it, listed, exact, counted as island work, and the convs after it
stay delta layers. Box decodes (YOLOv8's DFL: view to (b, 4, 16, a), transpose, softmax, 1x1 conv)
and pooled heads stay dense tails without permission.
"""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
from torch import nn

import deltacnn
from conftest import make_video, rel_err
from deltacnn.convert import DenseOpsWarning
from deltacnn.layers import DeltaConv2d, DeltaLinearMap, DenseIsland
from deltacnn.layers.io import DenseCall

BACKENDS = ["reference", "cpu"]
FRAMES = 8
H = W = 12


def _run(model: nn.Module, backend: str, **kw) -> tuple[deltacnn.DeltaModel, float]:
    """Convert, then the worst relative error against dense PyTorch at tau 0 over FRAMES random frames."""
    clip = make_video(FRAMES, h=H, w=W, noise=0.02, seed=11, size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DenseOpsWarning)
        dm = deltacnn.convert(model, clip[0], backend=backend, dense_above=None, **kw)
    worst = 0.0
    for t in range(FRAMES):
        with torch.no_grad():
            got, want = dm(clip[t]), model(clip[t])
        worst = max([worst] + [rel_err(g, r) for g, r in zip(_leaves(got), _leaves(want), strict=True)])
    return dm, worst


def _leaves(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _leaves(o)]


class Stem(nn.Module):
    def __init__(self, c_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(c_out, 3, 3, padding=1)

    def stem(self, x):
        return torch.relu(self.a(x))


# ---- parts of unbind with tensor constants: delta end to end -------------------------------------------
class PartConstants(Stem):
    """Channel parts times per-pixel weights, plus a per-pixel offset, divided by per-pixel weights; row
    parts times per-row-and-channel weights: each brought back to a map and fed to a conv."""

    def __init__(self) -> None:
        super().__init__(4)
        self.register_buffer("pix", torch.rand(H, W) + 0.5)
        self.register_buffer("off", torch.randn(1, H, W))
        self.row = nn.Parameter(torch.rand(4, W) + 0.5)

    def forward(self, x):
        y = self.stem(x)
        c = y.unbind(1)
        gray = (c[0] * self.pix + self.off - c[1] / self.pix).unsqueeze(1)  # (N, 1, H, W)
        r = y.unbind(2)
        rows = torch.cat([(r[2] * self.row).unsqueeze(2), (self.row - r[5]).unsqueeze(2)], 1)  # (N, 8, 1, W)
        return self.b(torch.cat([gray, y[:, :3]], 1)), rows.sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbind_part_times_tensor_constant_stays_delta(backend):
    m = PartConstants().eval()
    dm, worst = _run(m, backend)  # strict: any dense island would raise
    assert worst < 1e-5, f"{backend}: {worst:.2e}"
    assert dm.report.islands == []
    assert [r.node for r in dm.report.tails] == ["sum_1"], "only the final channel sum of the rows is a tail"
    assert any(isinstance(layer, DeltaLinearMap) for layer in dm.layers.values())
    assert isinstance(dm.layers["b"], DeltaConv2d)
    assert not any(isinstance(layer, DenseCall) for layer in dm.layers.values())


# ---- dense values that come back to a map: dense islands ------------------------------------------------
class SpatialSoftmax(Stem):
    def __init__(self) -> None:
        super().__init__(4)

    def forward(self, x):
        y = self.stem(x)
        n, c, h, w = y.shape
        return self.b(y.flatten(2).softmax(-1).view(n, c, h, w))


class PixelMixer(Stem):
    """A Linear over the flattened pixels (token mixing), viewed back to the map."""

    def __init__(self) -> None:
        super().__init__(4)
        self.mix = nn.Linear(H * W, H * W)

    def forward(self, x):
        y = self.stem(x)
        return self.b(torch.relu(self.mix(y.flatten(2))).view_as(y))


class PartTimesDense(Stem):
    """A part times a value computed densely from another part (a softmax over its pixels), unsqueezed."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x):
        p = self.stem(x).unbind(1)
        att = p[1].flatten(1).softmax(-1).view_as(p[1])
        return self.b((p[0] * att).unsqueeze(1))


class RowsStacked(Stem):
    """Rows of unbind(2), each scaled by a dense per-image value, stacked back along the rows."""

    def __init__(self) -> None:
        super().__init__(4)

    def forward(self, x):
        y = self.stem(x)
        rows = y.unbind(2)
        return self.b(torch.stack([r.softmax(-1) for r in rows], 2))


class ChannelPool(Stem):
    """CBAM's spatial attention: max and mean over the channels, each unsqueezed, a conv over both."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x):
        y = self.stem(x)
        return self.b(torch.cat([torch.max(y, 1)[0].unsqueeze(1), torch.mean(y, 1).unsqueeze(1)], 1))


class ModuleFlattenSoftmax(Stem):
    """SpatialSoftmax written with nn.Flatten(2) and nn.Softmax modules (an nn.Flatten ended the layout
    tracking before, so the conv after it ran as a dense tail without permission)."""

    def __init__(self) -> None:
        super().__init__(4)
        self.flat, self.sm = nn.Flatten(2), nn.Softmax(-1)

    def forward(self, x):
        y = self.stem(x)
        n, c, h, w = y.shape
        return self.b(self.sm(self.flat(y)).view(n, c, h, w))


ISLAND_CASES = {"module_flatten": (ModuleFlattenSoftmax, "flat", "self.sm(self.flat(y))"),
                "spatial_softmax": (SpatialSoftmax, "softmax", "y.flatten(2).softmax(-1)"),
                "pixel_mixer": (PixelMixer, "mix", "self.mix(y.flatten(2))"),
                "part_times_dense": (PartTimesDense, "softmax", "p[1].flatten(1).softmax(-1)"),
                "rows_stacked": (RowsStacked, "softmax", "r.softmax(-1)"),
                "channel_pool": (ChannelPool, "max", "torch.max(y, 1)[0]")}


@pytest.mark.parametrize("case", list(ISLAND_CASES))
def test_dense_value_back_to_a_map_needs_permission(case):
    """Before the fix these converted silently with the convs after them as a dense tail."""
    cls, op, line = ISLAND_CASES[case]
    x = make_video(1, h=H, w=W)[0]
    with pytest.raises(deltacnn.UnsupportedOperationError, match="allow_dense_fallback") as e:
        deltacnn.convert(cls().eval(), x)
    msg = str(e.value)
    assert "graph node" in msg and op in msg and "test_convert_reentry.py" in msg and line in msg, msg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ISLAND_CASES))
def test_dense_island_back_to_a_map_is_exact_and_its_conv_stays_delta(case, backend):
    cls = ISLAND_CASES[case][0]
    m = cls().eval()
    with pytest.warns(DenseOpsWarning, match="dense island") as w:
        deltacnn.convert(m, make_video(1, h=H, w=W)[0], allow_dense_fallback=True, backend=backend)
    assert len([r for r in w if issubclass(r.category, DenseOpsWarning)]) == 1
    dm, worst = _run(m, backend, allow_dense_fallback=True)
    assert worst < 1e-5, f"{case} ({backend}): {worst:.2e}"
    assert dm.report.islands and dm.report.tails == [], "the dense ops before the map are an island, not a tail"
    assert isinstance(dm.layers["b"], DeltaConv2d), "the conv after the island is a delta layer"


def test_island_work_before_a_map_counts_as_island_in_stats_and_summary():
    m = PixelMixer().eval()
    clip = make_video(3, h=H, w=W, noise=0.0)
    with pytest.warns(DenseOpsWarning) as w:
        dm = deltacnn.convert(m, clip[0], allow_dense_fallback=True, backend="reference", dense_above=None)
    mix_macs = (H * W) ** 2 * 4
    assert "dense island 'mix'" in str(w[0].message)
    assert [r.macs for r in dm.report.islands if r.node == "mix"] == [mix_macs]
    assert dm.report.share(mix_macs) > 0.5
    dm.enable_stats()
    for t in range(3):
        with torch.no_grad():
            dm(clip[t])
    st = dm.frame_stats()
    assert st.layers["mix"].kind == "dense-island" and st.layers["mix"].macs == mix_macs
    rows = {line.split()[0]: line for line in dm.summary(show=False).splitlines()[1:]}
    assert "dense island" in rows["mix"] and "delta" in rows["b"]


# ---- dense work whose batch is no longer dim 0: dense islands -------------------------------------------
class MergedBatchConv(Stem):
    """A softmax over each map's pixels, then every channel as an image of its own: (N * C, 1, H, W), a conv
    on that, viewed back to (N, C * k, H, W) and fed to the next conv."""

    def __init__(self) -> None:
        super().__init__(8)
        self.per_channel = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.stem(x)
        n, c, h, w = y.shape
        z = self.per_channel(y.flatten(2).softmax(-1).reshape(n * c, 1, h, w))
        return self.b(z.view(n, c * 2, h, w))


class MovedBatchConv(Stem):
    """The batch moved to dim 1 (C, N, H, W) by a permute of a dense value: a conv that mixes the images."""

    def __init__(self) -> None:
        super().__init__(4)
        self.across = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        y = self.stem(x).flatten(2).softmax(-1)
        n, c, hw = y.shape
        return self.across(y.permute(1, 0, 2).reshape(c, n, H, W))


class MergedBatchLinear(Stem):
    """Each channel's pixels a row of a (N * C, H * W) matrix, then a Linear over the pixels."""

    def __init__(self) -> None:
        super().__init__(4)
        self.mix = nn.Linear(H * W, 5)

    def forward(self, x):
        y = self.stem(x)
        n, c = y.shape[:2]
        return self.mix(torch.sigmoid(y.flatten(2) * 2.0).reshape(n * c, -1))


BATCH_CASES = {"merged_conv": (MergedBatchConv, "per_channel", "self.per_channel(y.flatten(2)"),
               "moved_batch": (MovedBatchConv, "across", "self.across(y.permute(1, 0, 2)"),
               "merged_linear": (MergedBatchLinear, "mix", "self.mix(torch.sigmoid")}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_dense_work_off_the_batch_needs_permission(case):
    """Before the fix these converted strictly, the convs / Linear on the merged batch listed as a dense tail."""
    cls, op, line = BATCH_CASES[case]
    x = make_video(1, n=2, h=H, w=W)[0]
    with pytest.raises(deltacnn.UnsupportedOperationError, match="allow_dense_fallback") as e:
        deltacnn.convert(cls().eval(), x)
    msg = str(e.value)
    assert f"graph node {op!r}" in msg and "test_convert_reentry.py" in msg and line in msg, msg
    assert "batch" in msg, msg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_dense_work_off_the_batch_is_an_exact_listed_island(case, backend):
    cls, op, _ = BATCH_CASES[case]
    m = cls().eval()
    clip = make_video(FRAMES, n=2, h=H, w=W, noise=0.02, seed=11, size=4)
    with pytest.warns(DenseOpsWarning, match=f"dense island {op!r}") as w:
        dm = deltacnn.convert(m, clip[0], allow_dense_fallback=True, backend=backend, dense_above=None)
    assert len([r for r in w if issubclass(r.category, DenseOpsWarning)]) == 1
    worst = 0.0
    dm.enable_stats()
    for t in range(FRAMES):
        with torch.no_grad():
            worst = max(worst, rel_err(dm(clip[t]), m(clip[t])))
    assert worst < 1e-5, f"{case} ({backend}): {worst:.2e}"
    islands = {r.node: r for r in dm.report.islands}
    assert op in islands and islands[op].macs > 0 and op not in [r.node for r in dm.report.tails]
    assert dm.layers[op].kind == "dense-island" and dm.frame_stats().layers[op].kind == "dense-island"
    assert dm.frame_stats().layers[op].macs == islands[op].macs, "island work is counted as done densely"
    if case == "merged_conv":  # the conv after the island runs densely too (its input's layout is unknown)
        assert "b" in islands and dm.report.tails == []


class PooledHeadAndGate(Stem):
    """Squeeze-excitation from Linear layers ((N, C) vectors viewed to (N, C, 1, 1)) and a pooled Linear head:
    the batch stays dim 0, so the Linears are a dense tail (the gate's product with the map is delta)."""

    def __init__(self) -> None:
        super().__init__(4)
        self.fc1, self.fc2, self.head = nn.Linear(4, 2), nn.Linear(2, 4), nn.Linear(3, 5)
        self.pool, self.flat = nn.AdaptiveAvgPool2d(1), nn.Flatten()

    def forward(self, x):
        y = self.stem(x)
        n, c = y.shape[:2]
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))).view(n, c, 1, 1)
        z = self.b(y * gate)
        return self.head(self.flat(self.pool(z))), self.head(torch.sigmoid(z).mean((2, 3)).flatten(1))


def test_se_gate_and_pooled_head_stay_tails_on_a_batch():
    m = PooledHeadAndGate().eval()
    clip = make_video(FRAMES, n=2, h=H, w=W, noise=0.02, seed=11, size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DenseOpsWarning)
        dm = deltacnn.convert(m, clip[0], backend="reference", dense_above=None)  # strict
    for t in range(FRAMES):
        with torch.no_grad():
            assert max(rel_err(g, r) for g, r in zip(dm(clip[t]), m(clip[t]), strict=True)) < 1e-5
    assert dm.report.islands == []
    assert {"fc1", "fc2", "head", "head_1"} <= {r.node for r in dm.report.tails}
    assert isinstance(dm.layers["b"], DeltaConv2d)


class SingleImageHeads(Stem):
    """Heads written for a batch of one: the pooled (1, C) vector squeezed, indexed or viewed to (C,), then
    two Linears. No pixel is left in it, so these are tails, not islands (they converted strictly before the
    batch rule, and must still)."""

    def __init__(self) -> None:
        super().__init__(4)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        v = self.stem(x).mean((2, 3))
        return (self.fc2(torch.relu(self.fc1(v.squeeze()))), self.fc1(v[0]), self.fc1(v.view(-1)),
                self.fc2(self.fc1(v.squeeze(0)) * 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_image_heads_stay_tails(backend):
    m = SingleImageHeads().eval()
    dm, worst = _run(m, backend)  # strict
    assert worst < 1e-5, f"{backend}: {worst:.2e}"
    assert dm.report.islands == []
    assert {"fc1", "fc2"} <= {r.node for r in dm.report.tails}


def test_a_batch_of_one_merged_into_channels_still_needs_permission():
    """x.view(C, 1, H, W) of a batch of one: the pixels are still there, so the conv on it is island work."""
    x = make_video(1, n=1, h=H, w=W)[0]
    with pytest.raises(deltacnn.UnsupportedOperationError, match="allow_dense_fallback"):
        deltacnn.convert(MergedBatchConv().eval(), x)


# ---- what stays a dense tail without permission -------------------------------------------------------
class DFLHead(nn.Module):
    """YOLOv8's decode on two levels: maps flattened and concatenated over the anchors, split into box bins
    and classes, bins viewed to (b, 4, 16, a), transposed, softmaxed, then DFL's fixed 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.p3 = nn.Conv2d(3, 64 + 2, 3, padding=1)
        self.p4 = nn.Conv2d(3, 64 + 2, 3, stride=2, padding=1)
        self.dfl = nn.Conv2d(16, 1, 1, bias=False)

    def forward(self, x):
        feats = [self.p3(x), self.p4(x)]
        b = x.shape[0]
        cat = torch.cat([f.view(b, 66, -1) for f in feats], 2)
        box, cls = cat.split((64, 2), 1)
        a = box.shape[-1]
        dist = self.dfl(box.view(b, 4, 16, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        return torch.cat([dist, cls.sigmoid()], 1), feats


class ReturnedSoftmax(Stem):
    """A softmax over the pixels of the last map, returned: after the last feature map, a tail."""

    def __init__(self) -> None:
        super().__init__(4)

    def forward(self, x):
        y = self.stem(x)
        return y.flatten(2).softmax(-1).view_as(y)


@pytest.mark.parametrize("cls", [DFLHead, ReturnedSoftmax])
def test_box_decode_and_returned_maps_stay_dense_tails(cls):
    m = cls().eval()
    dm, worst = _run(m, "reference")  # strict
    assert worst < 1e-5
    assert dm.report.islands == [] and dm.report.tails
    if cls is DFLHead:
        assert "dfl" in [r.node for r in dm.report.tails]


def _yolo_ultralytics() -> nn.Module:
    pytest.importorskip("ultralytics")
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo_cfg_"))
    from ultralytics import YOLO
    return YOLO("yolov8n.yaml").model.eval()


def _yolo_deltacnn() -> nn.Module:
    from deltacnn.models.yolov8 import yolov8
    torch.manual_seed(0)
    return yolov8("n")


@pytest.mark.parametrize("build", [_yolo_deltacnn, _yolo_ultralytics], ids=["deltacnn", "ultralytics"])
def test_yolov8n_box_decode_is_a_tail_without_permission(build):
    m = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DenseOpsWarning)
        dm = deltacnn.convert(m, torch.rand(1, 3, 64, 64), backend="reference")  # strict
    assert dm.report.islands == [] and dm.report.tails
    assert not any(isinstance(layer, DenseIsland) or getattr(layer, "kind", "") == "dense-island"
                   for layer in dm.layers.values())
    convs = [n for n, layer in dm.layers.items() if isinstance(layer, DeltaConv2d)]
    assert len(convs) >= 63


# ---- the layout rules themselves -------------------------------------------------------------------------
def test_pixel_layout_rules():
    from deltacnn import pixel_layout as pl

    m = pl.of_map((2, 8, 4, 6))
    flat = pl.reshape(m, (2, 8, 4, 6), (2, 8, 24))
    assert pl.is_map(pl.reshape(flat, (2, 8, 24), (2, 8, 4, 6)), (2, 8, 4, 6))  # flatten(2) and back
    assert pl.is_map(pl.permute(m, (0, 1, 3, 2)), (2, 8, 6, 4))  # rows and columns swapped: still pixels
    assert not pl.is_map(pl.reshape(m, (2, 8, 4, 6), (2, 32, 1, 6)), (2, 32, 1, 6))  # rows folded into channels
    assert not pl.is_map(pl.reshape(flat, (2, 8, 24), (2, 4, 2, 24)), (2, 4, 2, 24))  # channels split into rows
    assert pl.reshape(m, (2, 8, 4, 6), (16, 4, 6)) is None  # batch merged
    assert pl.batch_first(m, (2, 8, 4, 6)) and pl.batch_first(flat, (2, 8, 24))
    assert not pl.batch_first(None, (16, 4, 6))  # unknown (here: the batch merged)
    assert not pl.batch_first(pl.permute(m, (1, 0, 2, 3)), (8, 2, 4, 6))  # the batch moved off dim 0
    assert not pl.batch_first(pl.index(m, (2, 8, 4, 6), (0,)), (8, 4, 6))  # one image indexed out
    assert pl.batch_first(pl.of_map((1, 8, 4, 6)), (1, 8, 4, 6))  # a batch of one is still the batch
    # DFL: two grids' anchors concatenated, bins viewed to (b, 4, 16, a) and transposed: not a map
    m2 = pl.of_map((2, 64, 2, 3))
    anchors = pl.cat([pl.reshape(pl.of_map((2, 64, 4, 6)), (2, 64, 4, 6), (2, 64, 24)),
                      pl.reshape(m2, (2, 64, 2, 3), (2, 64, 6))], [(2, 64, 24), (2, 64, 6)], 2)
    bins = pl.permute(pl.reshape(anchors, (2, 64, 30), (2, 4, 16, 30)), (0, 2, 1, 3))
    assert not pl.is_map(bins, (2, 16, 4, 30))
    # a single grid's bins are not a map either: their rows are the 4 box sides
    one = pl.permute(pl.reshape(pl.reshape(pl.of_map((2, 64, 4, 6)), (2, 64, 4, 6), (2, 64, 24)), (2, 64, 24),
                                (2, 4, 16, 24)), (0, 2, 1, 3))
    assert not pl.is_map(one, (2, 16, 4, 24))
    # a pooled map (1x1) viewed to vectors and back: no pixels
    pooled = pl.of_map((2, 8, 1, 1))
    assert not pl.is_map(pl.reshape(pl.reshape(pooled, (2, 8, 1, 1), (2, 8)), (2, 8), (2, 8, 1, 1)), (2, 8, 1, 1))
    # rows indexed away and stacked back; a row part unsqueezed again
    rows = [pl.index(m, (2, 8, 4, 6), (slice(None), slice(None), i)) for i in range(4)]
    assert pl.is_map(pl.stack(rows, 2), (2, 8, 4, 6))
    assert pl.is_map(pl.reshape(rows[1], (2, 8, 6), (2, 8, 1, 6)), (2, 8, 1, 6))
    # a max over channels keeps the pixels
    assert pl.is_map(pl.reshape(pl.reduce(m, (1,), False), (2, 4, 6), (2, 1, 4, 6)), (2, 1, 4, 6))


def test_yolov8_delta_box_decode_is_listed_as_incremental_without_a_dense_warning():
    """deltacnn's YOLOv8 decode has a delta form (DeltaBoxDecode): convert() lists it as an incremental tail and
    does not warn that it runs densely; Ultralytics' own head (no delta form) stays a warned dense tail."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseOpsWarning)
        dm = deltacnn.convert(_yolo_deltacnn(), torch.rand(1, 3, 64, 64), backend="reference")
    assert [(r.op.rsplit(".", 1)[-1], r.incremental) for r in dm.report.tails] == [("decode_boxes", True)]
    assert not dm.report.warns and dm.report.dense_tails == []
    assert "incremental tail" in dm.report.describe() and "0 op(s) in dense tails" in dm.report.describe()
    pytest.importorskip("ultralytics")
    with pytest.warns(DenseOpsWarning, match="dense tail after the last feature maps"):
        deltacnn.convert(_yolo_ultralytics(), torch.rand(1, 3, 64, 64), backend="reference")
