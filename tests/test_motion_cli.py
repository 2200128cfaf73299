"""`deltacnn run --motion`, `convert(..., motion=)` and motion files: a tiny stride-4 net on a lossless
panning clip (an image folder), so that the aligned run can be checked against dense inference."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import deltacnn
from deltacnn import tools
from deltacnn.cli import main
from deltacnn.motion import MotionDeltaModel, MotionFileError, load_motion_file

H, W, T, STEP = 48, 96, 6, 4  # STEP: the pan in px/frame, a multiple of the net's total stride 4


class PanTinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(3, 6, 3, 1, 1)
        self.c2 = nn.Conv2d(6, 6, 3, 2, 1)
        self.c3 = nn.Conv2d(6, 6, 3, 2, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))))


class PanTinyTask:
    """Per-pixel 2-class maps (stride 4); agreement: relative error of the logits and label accuracy."""

    name = "tiny_pan"

    def load_model(self) -> nn.Module:
        return PanTinyNet().eval()

    def preprocess(self, frame_rgb: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(frame_rgb)).permute(2, 0, 1)[None].float() / 255.0

    def postprocess(self, output) -> dict:
        return {"logits": output.float(), "labels": output.argmax(1)}

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray:
        return frame_rgb.copy()

    def agreement(self, result, reference) -> dict[str, float]:
        err = float((result["logits"] - reference["logits"]).norm() / reference["logits"].norm())
        return {"pixel_acc": float((result["labels"] == reference["labels"]).float().mean()), "logit_error": err}


tools.register_task("tiny_pan", PanTinyTask)


def pan_frames() -> list[np.ndarray]:
    """A camera panning right by STEP px/frame over a smooth random scene, with a square moving in it."""
    rng = np.random.default_rng(3)
    scene = cv2.resize(rng.integers(0, 256, (34, 60, 3), dtype=np.uint8), (W + STEP * T + 40, H + 20),
                       interpolation=cv2.INTER_LINEAR)
    frames = []
    for t in range(T):
        s = scene.copy()
        s[20:30, 40 + 2 * t:52 + 2 * t] = (250, 250, 40)
        frames.append(s[10:10 + H, 20 + STEP * t:20 + STEP * t + W].copy())
    return frames


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pan")
    for i, f in enumerate(pan_frames()):
        cv2.imwrite(str(d / f"{i:04d}.png"), f[:, :, ::-1])
    return d


def write(tmp_path: Path, text: str, name: str = "motion.txt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltacnn: error: "), err
    return err[0]


@pytest.mark.parametrize("motion", ["file", "auto"])
def test_run_with_motion_matches_dense_and_stays_sparse(folder, tmp_path, motion):
    arg = str(write(tmp_path, "# dx dy per frame\n" + "\n".join(f"{STEP}, 0" for _ in range(T)) + "\n")) \
        if motion == "file" else "auto"
    out = tmp_path / "o"
    assert main(["run", str(folder), "-m", "tiny_pan", "-t", "0", "--motion", arg, "--check-dense", "-q",
                 "--no-video", "--backend", "reference", "--out", str(out)]) == 0
    rows = json.loads((out / "frames.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["motion"] == (f"{T} given" if motion == "file" else "auto")
    assert len(rows) == T and rows[-1]["view_x"] == STEP * (T - 1)
    for r in rows[1:]:
        assert r["rel_error"] < 1e-5, r
        assert abs(r["motion_dx"] - STEP) < 0.3 and abs(r["motion_dy"]) < 0.3, r
        assert r["update_rate"] < 0.2, r  # aligned: only the square and the uncovered strip changed
        assert r["macs"] >= r["band_macs"] > 0  # the border bands' work is counted
        assert r["motion_translating"] == 1 and 0.0 <= r["motion_unexplained"] <= 1.0, r  # a pan: followed
    # plain delta inference would run every frame densely here (every pixel changes): the aligned run
    # does a fraction of that, band recomputation included
    assert sum(r["macs"] for r in rows[1:]) < 0.6 * sum(r["dense_macs"] for r in rows[1:])


@pytest.mark.parametrize("text, needle", [
    ("4 0\n4 0 1\n", r"motion.txt:2: 3 numbers"),
    ("4 0\n# ok\n4 zero\n", r"motion.txt:3: 'zero' is not a number"),
    ("4 0\n" + " ".join(["1"] * 9) + "\n", r"motion.txt:2: 9 numbers after lines of 2"),
    ("# nothing\n\n", r"no motion lines"),
    ("4 nan\n", r"motion.txt:1: NaN or infinity"),
    ("4 0\n4 0\n", r"the motion sequence has 2 frames; frame 2 has none"),
])
def test_bad_motion_files_are_one_line_errors_naming_the_problem(folder, tmp_path, capsys, text, needle):
    p = write(tmp_path, text)
    assert main(["run", str(folder), "-m", "tiny_pan", "--motion", str(p), "-q", "--no-video", "--backend",
                 "reference", "--out", str(tmp_path / "o")]) == 2
    assert needle in one_line_error(capsys)


def test_missing_motion_file_and_bad_halo(folder, tmp_path, capsys):
    assert main(["run", str(folder), "-m", "tiny_pan", "--motion", "gyro", "-q", "--out", str(tmp_path / "o")]) == 2
    assert "motion file not found: gyro" in one_line_error(capsys)
    assert main(["run", str(folder), "-m", "tiny_pan", "--motion", "auto", "--motion-halo", "-8"]) == 2


def test_motion_file_forms_and_convert_motion(tmp_path):
    t = load_motion_file(write(tmp_path, "0 0\n2.5,-1\t# pan\n"))
    assert t.shape == (2, 2) and t[1].tolist() == [2.5, -1.0]
    hm = load_motion_file(write(tmp_path, "1 0 0 0 1 0 0 0 1\n1 0 -4 0 1 3 0 0 1\n", "h.txt"))
    assert hm.shape == (2, 3, 3) and hm[1, 0, 2] == -4
    net = PanTinyNet().eval()
    x = torch.rand(1, 3, H, W)
    assert not isinstance(deltacnn.convert(net, x, motion="none"), MotionDeltaModel)
    mm = deltacnn.convert(net, x, motion=write(tmp_path, f"0 0\n{STEP} 0\n", "m.txt"), backend="reference")
    assert isinstance(mm, MotionDeltaModel) and mm.mode == "given"
    with pytest.raises(MotionFileError, match="not found"):
        deltacnn.convert(net, x, motion=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="motion sequence must be"):
        MotionDeltaModel(mm.dm, motion=torch.zeros(4, 5))


def test_boxes_are_mapped_back_to_camera_coordinates():
    """A detector's boxes come in view coordinates (the frame moved by the residual): camera_result moves
    them back and clips them to the frame."""
    net = PanTinyNet().eval()
    mm = MotionDeltaModel(deltacnn.convert(net, torch.rand(1, 3, H, W), backend="reference"),
                          motion=torch.tensor([[0.0, 0.0], [3.0, -1.0]]))
    frames = pan_frames()
    for f in frames[:2]:
        mm(PanTinyTask().preprocess(f))
    assert mm.input_shift == [[-1.0, -1.0]]  # camera at (3, -1), view origin at (4, 0): residual (-1, -1)
    res = {"boxes": np.array([[10.0, 10.0, 20.0, 30.0], [0.5, 0.0, 5.0, 47.5]], np.float32), "scores": np.ones(2)}
    cam = mm.camera_result(res)
    assert cam["boxes"].dtype == np.float32
    np.testing.assert_allclose(cam["boxes"], [[11, 11, 21, 31], [1.5, 1, 6, 48]])  # content moved by -1: +1 back
    assert cam["scores"] is res["scores"]
