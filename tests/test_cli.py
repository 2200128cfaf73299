"""The `deltacnn` command line and its Python API (deltacnn.tools) end to end, on a tiny synthetic clip.

A tiny fake task (two convolutions) keeps everything fast on a 2-core CPU; the real pretrained
task is exercised by its own tests and by the README command.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deltacnn import tools
from deltacnn.cli import main
from deltacnn.video import VideoError, VideoReader, write_video

H, W, T = 48, 64, 10


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))))


class TinyTask:
    """A segmentation-like fake task: per-pixel arg-max of a 2-channel map; agreement = pixel accuracy."""

    name = "tiny"

    def load_model(self) -> nn.Module:
        """TinyNet with the head's bias set so both labels are equally common (a metric that can fail)."""
        net = TinyNet().eval()
        with torch.no_grad():
            out = net(self.preprocess(synthetic_frames(1)[0]))
            net.head.bias[1] -= float((out[:, 1] - out[:, 0]).median())
        return net

    def preprocess(self, frame_rgb: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frame_rgb).permute(2, 0, 1)[None].float() / 255.0

    def postprocess(self, output) -> dict:
        return {"logits": output.float(), "labels": output.argmax(1)}

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray:
        img = frame_rgb.copy()
        img[result["labels"][0].numpy() == 1, 0] = 255
        return img

    def agreement(self, result, reference) -> dict[str, float]:
        err = float((result["logits"] - reference["logits"]).norm() / reference["logits"].norm())
        acc = float((result["labels"] == reference["labels"]).float().mean())
        return {"pixel_acc": acc, "rel_error": err}


tools.register_task("tiny", TinyTask)


def synthetic_frames(n: int = T, seed: int = 0) -> list[np.ndarray]:
    """A static textured background with one small square moving right."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 256, (H // 4, W // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    frames = []
    for t in range(n):
        f = bg.copy()
        x = 4 + 3 * t
        f[16:28, x:x + 12] = (250, 250, 40)
        frames.append(f)
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("clip") / "static.mp4", synthetic_frames(), fps=10)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("deltacnn: error: ")
    assert "Traceback" not in err[0]
    return err[0]


# ---- video IO ------------------------------------------------------------------------------------
def test_video_roundtrip(clip: Path) -> None:
    r = VideoReader(clip)
    frames = list(r)
    assert len(frames) == T and frames[0].shape == (H, W, 3) and frames[0].dtype == np.uint8
    # lossy codec, but close to what was written
    assert np.abs(frames[3].astype(int) - synthetic_frames()[3].astype(int)).mean() < 12
    assert len(list(VideoReader(clip, max_frames=4))) == 4


def test_writer_falls_back_to_avi(tmp_path: Path, monkeypatch) -> None:
    import deltacnn.video as video

    monkeypatch.setattr(video, "CODECS", (("XXXX", ".mp4"), ("MJPG", ".avi")))
    p = write_video(tmp_path / "x.mp4", synthetic_frames(3))
    assert p.suffix == ".avi" and len(list(VideoReader(p))) == 3


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "directory"])
def test_video_errors(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "v.mp4"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "corrupt":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "directory":
        p.mkdir()
    with pytest.raises(VideoError):
        VideoReader(p)


# ---- run -----------------------------------------------------------------------------------------
def test_run_end_to_end(clip: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["run", str(clip), "--model", "tiny", "--threshold", "0.05", "--check-dense", "--out", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "speedup vs peer" in printed and str(out / "plot.png") in printed
    s = json.loads((out / "summary.json").read_text())
    assert f"dense peer               {s['peer']}" in printed  # the summary names the peer it compares with
    for name in ("frames.csv", "frames.json", "summary.json", "plot.png"):
        assert (out / name).stat().st_size > 0, name
    videos = {p.stem: p for p in out.iterdir() if p.suffix in (".mp4", ".avi")}
    assert set(videos) == {"annotated", "updates"}
    assert len(list(VideoReader(videos["updates"]))) == T
    rows = list(csv.DictReader((out / "frames.csv").open()))
    assert len(rows) == T
    assert rows[0]["keyframe"] == "1" and float(rows[0]["update_rate"]) == 1.0
    data = json.loads((out / "frames.json").read_text())
    assert len(data) == T
    keys = {"frame", "update_rate", "macs_fraction", "delta_ms", "peer_ms", "speedup", "rel_error", "task_pixel_acc"}
    assert keys <= set(data[0])
    later = data[1:]
    assert all(r["keyframe"] == 0 for r in later)
    assert max(r["update_rate"] for r in later) < 0.5  # mostly static clip
    assert all(0 < r["macs_fraction"] < 1 for r in later)
    assert all(r["rel_error"] < 0.2 and r["task_pixel_acc"] > 0.9 for r in later)
    assert s["frames"] == T and 0 < s["macs_saved"] < 1 and s["mean_update_rate"] < 1
    assert {"delta_frame_mean_ms", "delta_frame_median_ms", "all_frame_mean_ms", "speedup_delta_frames",
            "speedup_all_frames", "peer", "peer_candidates", "mean_rel_error", "agreement"} <= set(s)
    assert "speedup" not in s and "mean_dense_ms" not in s  # no speedup against a weaker baseline
    assert s["interrupted"] is False and s["source"] == "video"
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_threshold_zero_matches_dense(clip: Path, tmp_path: Path) -> None:
    res = tools.run(clip, "tiny", threshold=0.0, check_dense=True, out=tmp_path, max_frames=4, device="cpu",
                    quiet=True, write_videos=False)
    assert len(res.rows) == 4 and "annotated" not in res.paths
    assert max(r["rel_error"] for r in res.rows) < 1e-5
    assert res.summary["agreement"]["pixel_acc"] == 1.0


def test_run_dense_dispatch_modes_are_recorded(clip: Path, tmp_path: Path) -> None:
    """With dense_above 0 every frame after the first is busy: dense frames, exact, counted as such."""
    res = tools.run(clip, "tiny", threshold=0.0, check_dense=True, out=tmp_path, max_frames=4, device="cpu",
                    quiet=True, write_videos=False, dense_above=0.0)
    assert [r["mode"] for r in res.rows] == ["keyframe", "dense", "dense", "dense"]
    assert res.summary["modes"] == {"delta": 0, "keyframe": 1, "dense": 3}
    assert max(r["rel_error"] for r in res.rows) < 1e-5
    off = tools.run(clip, "tiny", threshold=0.0, out=tmp_path, max_frames=4, device="cpu", quiet=True,
                    write_videos=False, dense_above=None)
    assert [r["mode"] for r in off.rows] == ["keyframe", "delta", "delta", "delta"]


def test_run_start_frame_runs_only_the_later_segment(clip: Path, tmp_path: Path) -> None:
    """--start-frame 6: frames 6.. of the source, the first of them a keyframe, numbered as in the source."""
    assert main(["run", str(clip), "-m", "tiny", "-t", "0.05", "--start-frame", "6", "--check-dense", "-q",
                 "--no-video", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "frames.json").read_text())
    assert [r["frame"] for r in rows] == list(range(6, T)) and rows[0]["keyframe"] == 1
    assert rows[0]["rel_error"] < 1e-5  # the keyframe is source frame 6 itself, run densely
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["start_frame"] == 6 and s["frames"] == T - 6
    capped = tools.run(clip, "tiny", threshold=0.0, start_frame=3, max_frames=2, out=tmp_path / "b", quiet=True,
                       write_videos=False)
    assert [r["frame"] for r in capped.rows] == [3, 4]
    with pytest.raises(tools.UserError, match="start-frame"):
        tools.run(clip, "tiny", start_frame=-1, out=tmp_path / "c", quiet=True, write_videos=False)


def test_threads_option_is_applied(monkeypatch) -> None:
    """--threads sets torch's intra-op threads for the command (it used to be parsed and ignored)."""
    from deltacnn import cli

    seen = []
    monkeypatch.setitem(cli.COMMANDS, "tune", lambda a: seen.append(torch.get_num_threads()) or 0)
    old = torch.get_num_threads()
    try:
        assert main(["tune", "--budget", "0.9", "--threads", "1"]) == 0 and seen == [1]
    finally:
        torch.set_num_threads(old)


def test_run_default_out_dir(clip: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(clip), "-m", "tiny", "-n", "3", "-q", "--no-video"]) == 0
    assert (tmp_path / "deltacnn_out" / "static" / "frames.csv").is_file()


def test_run_demo_uses_default_clip(clip: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from deltacnn.commands import common

    monkeypatch.setattr(common, "default_clip", lambda: clip)
    monkeypatch.setattr(common, "default_model", lambda: "tiny")
    assert main(["run", "--max-frames", "3", "-q", "--no-video", "--out", str(tmp_path)]) == 0
    assert "tiny on static.mp4: 3 frames" in capsys.readouterr().out


def test_run_summary_separates_delta_and_all_frames(clip: Path, tmp_path: Path) -> None:
    """The summary's rates follow from the per-frame records: delta frames only, and all frames."""
    res = tools.run(clip, "tiny", threshold=0.05, out=tmp_path, device="cpu", quiet=True, write_videos=False)
    rows, s = res.rows, res.summary
    delta = [r for r in rows if r["mode"] == "delta"]
    assert s["delta_frames"] == len(delta) == s["modes"]["delta"] and 0 < len(delta) < len(rows)
    assert s["delta_frame_mean_ms"] == pytest.approx(sum(r["delta_ms"] for r in delta) / len(delta))
    assert s["all_frame_mean_ms"] == pytest.approx(sum(r["delta_ms"] for r in rows) / len(rows))
    peer_d, delta_d = sum(r["peer_ms"] for r in delta), sum(r["delta_ms"] for r in delta)
    assert s["speedup_delta_frames"] == pytest.approx(peer_d / delta_d)
    assert s["speedup_all_frames"] == pytest.approx(sum(r["peer_ms"] for r in rows) / sum(r["delta_ms"] for r in rows))
    assert s["peer_candidates"][s["peer"]] == min(s["peer_candidates"].values())
    table = res.table()
    assert s["peer"] in table and "delta frames ms" in table and "all frames ms" in table


def test_run_image_folder(tmp_path: Path, capsys) -> None:
    import cv2

    folder = tmp_path / "shots"
    folder.mkdir()
    for i, f in enumerate(synthetic_frames(5)):
        cv2.imwrite(str(folder / f"img{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    assert main(["run", str(folder), "-m", "tiny", "--check-dense", "-q", "--no-video", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 5 and s["source"] == "image folder" and s["agreement"]["pixel_acc"] > 0.9


def test_run_reads_a_loopback_stream(tmp_path: Path) -> None:
    """A live MJPEG stream served on 127.0.0.1, read through the same source API as files."""
    from test_sources import MJPEGServer

    srv = MJPEGServer(synthetic_frames(8))
    try:
        res = tools.run(srv.url, "tiny", threshold=0.05, out=tmp_path, device="cpu", quiet=True)
    finally:
        srv.close()
    assert res.summary["source"] == "stream" and res.summary["frames"] == 8 and not res.summary["interrupted"]
    assert len(list(VideoReader(res.paths["annotated"]))) == 8


def test_missing_camera_and_empty_folder_are_one_line_errors(tmp_path: Path, capsys) -> None:
    if not Path("/dev/video7").exists():
        assert main(["run", "7", "-m", "tiny", "--out", str(tmp_path / "o")]) == 2
        assert "camera 7 not found" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / "empty"), "-m", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "no .jpg or .png images" in one_line_error(capsys)


def test_sigint_mid_run_writes_complete_outputs(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) to a `python3 -m deltacnn.cli run` process: it stops after the frame in
    progress and writes every output for the frames done."""
    n = 400
    clip = write_video(tmp_path / "long.avi", synthetic_frames(n), fps=10)
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "deltacnn.cli", "run", str(clip), "-m", "resnet18", "--device",
                             "cpu", "--check-dense", "--out", str(out)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:  # wait for a few frames of progress
            done = [int(m) for m in re.findall(r"(\d+)/%d" % n, "".join(err))]
            if done and max(done) >= 4:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "".join(err)[-2000:]
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    assert proc.returncode == 0, "".join(err)[-2000:]
    assert "stopped by Ctrl-C after" in stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and 4 <= s["frames"] < n
    assert len(list(csv.DictReader((out / "frames.csv").open()))) == s["frames"]
    assert len(json.loads((out / "frames.json").read_text())) == s["frames"]
    videos = {p.stem: p for p in out.iterdir() if p.suffix in (".mp4", ".avi")}
    assert {k: len(list(VideoReader(v))) for k, v in videos.items()} == {"annotated": s["frames"],
                                                                         "updates": s["frames"]}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- bad input -----------------------------------------------------------------------------------
def test_missing_video(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.mp4"), "-m", "tiny"]) == 2
    assert "video not found" in one_line_error(capsys)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100])
def test_empty_or_corrupt_video(tmp_path: Path, capsys, content: bytes) -> None:
    p = tmp_path / "bad.mp4"
    p.write_bytes(content)
    assert main(["run", str(p), "-m", "tiny", "--out", str(tmp_path / "o")]) == 2
    msg = one_line_error(capsys)
    assert "empty" in msg or "cannot decode" in msg


def test_unknown_model(clip: Path, capsys) -> None:
    assert main(["run", str(clip), "--model", "no_such_net"]) == 2
    msg = one_line_error(capsys)
    assert "unknown model 'no_such_net'" in msg and "tiny" in msg


@pytest.mark.parametrize("content, needle", [
    ("{not json", "invalid JSON"),
    ('{"hello": 1}', "not a deltacnn thresholds file"),
    ('{"format": "deltacnn-thresholds/1", "default": 0.1, "layers": {"no.such.layer": 0.2}}', "no.such.layer"),
    ('{"format": "deltacnn-thresholds/1", "default": -3}', "must be finite and >= 0"),
])
def test_bad_thresholds_file(clip: Path, tmp_path: Path, capsys, content: str, needle: str) -> None:
    p = tmp_path / "th.json"
    p.write_text(content)
    assert main(["run", str(clip), "-m", "tiny", "--thresholds", str(p), "-q", "--out", str(tmp_path / "o")]) == 2
    assert needle in one_line_error(capsys)


def test_missing_thresholds_file(clip: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(clip), "-m", "tiny", "--thresholds", str(tmp_path / "x.json")]) == 2
    assert "thresholds file not found" in one_line_error(capsys)
    assert not (tmp_path / "deltacnn_out").exists()  # nothing written for a run that never started


def test_bad_option_value_and_cuda(clip: Path, capsys) -> None:
    assert main(["run", str(clip), "-m", "tiny", "--threshold", "-1"]) == 2
    assert "deltacnn run: error:" in capsys.readouterr().err
    assert main(["run", str(clip), "-m", "tiny", "--dense-above", "1.5"]) == 2
    assert "fraction in [0, 1] or 'off'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", str(clip), "-m", "tiny", "--device", "cuda"]) == 2
        assert "CUDA is not available" in one_line_error(capsys)


def test_internal_error_is_one_line(clip: Path, capsys, monkeypatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("kaput")

    import deltacnn.commands.run

    monkeypatch.setattr(deltacnn.commands.run, "run", boom)
    assert main(["run", str(clip), "-m", "tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deltacnn: error: internal error: RuntimeError: kaput (run with --debug for the traceback)"]
    assert main(["run", str(clip), "-m", "tiny", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_no_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "usage: deltacnn" in capsys.readouterr().err


# ---- tune ----------------------------------------------------------------------------------------
def test_parse_budget() -> None:
    b = tools.parse_budget("pixel_acc>=0.98")
    assert (b.metric, b.op, b.value) == ("pixel_acc", ">=", 0.98)
    assert tools.parse_budget("0.9").metric is None
    with pytest.raises(tools.UserError):
        tools.parse_budget("acc ~ 3")
    assert tools.Budget(None, "", 0.1).resolve({"rel_error": 0.0}, TinyTask()).op == "<="
    assert tools.Budget(None, "", 0.9).resolve({"pixel_acc": 1.0}, TinyTask()).op == ">="


def test_tune_writes_thresholds_that_run_accepts(clip: Path, tmp_path: Path, capsys) -> None:
    th = tmp_path / "th.json"
    rc = main(["tune", str(clip), "-m", "tiny", "--budget", "pixel_acc>=0.97", "--frames", "6", "--max-evals", "14",
               "--out", str(th), "-q"])
    assert rc == 0
    assert str(th) in capsys.readouterr().out
    data = json.loads(th.read_text())
    assert data["format"] == "deltacnn-thresholds/1"
    assert data["default"] > 0 or data["layers"] or (data["input"] or 0) > 0  # something was raised above exact
    # the budget holds on the calibration clip when replayed by `run`
    out = tmp_path / "run"
    assert main(["run", str(clip), "-m", "tiny", "--thresholds", str(th), "--check-dense", "-n", "6", "-q",
                 "--no-video", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["agreement"]["pixel_acc"] >= 0.97 - 1e-9
    assert s["thresholds_file"] == str(th)


def test_tune_api_is_bounded_and_monotone(clip: Path, tmp_path: Path) -> None:
    res = tools.tune(clip, "tiny", budget="rel_error<=0.05", frames=5, max_evals=8, heldout_frames=3,
                     out=tmp_path / "th.json", quiet=True)
    assert res.evals <= 8 and res.budget.holds(res.score)
    assert res.macs_fraction <= res.exact.macs_fraction
    assert all(t.ok == res.budget.holds(t.score) for t in res.history)
    # the answer is the fastest trial within budget (ties within 3%: fewest MACs); the front starts at the fastest
    fastest = min(t.ms for t in res.history if t.ok)
    assert res.best.ok and res.best.ms <= fastest * 1.03
    assert res.best.macs_fraction == min(t.macs_fraction for t in res.history if t.ok and t.ms <= fastest * 1.03)
    front = tools.pareto_front(res.history)
    assert front[0].ms == min(t.ms for t in res.history)
    assert all(a.score < b.score and a.ms <= b.ms for a, b in zip(front, front[1:]))
    # the held-out segment follows the calibration frames and never overlaps them
    assert res.calib_frames == (0, 5) and res.heldout["frames"] == (5, 8)
    assert res.pareto_path.is_file() and res.plot_path.is_file()
    data = json.loads((tmp_path / "th.json").read_text())
    assert data["units"] == "relative" and data["scales"]["input"] > 0


def test_tune_searches_the_frame_schedule_and_the_file_carries_it(clip: Path, tmp_path: Path) -> None:
    """--schedules: the search tries each refresh rule; the file carries the chosen one, and run applies it."""
    th = tmp_path / "th.json"
    res = tools.tune(clip, "tiny", budget="rel_error<=0.05", frames=6, max_evals=12, min_blob=3, refresh_held=0.05,
                     schedules=["refresh=flush", "held=off,kf=3"], out=th, quiet=True)
    tried = {t.schedule for t in res.history}
    assert {s.refresh for s in tried} >= {"keyframe"} and len(tried) >= 2
    assert all(t.ms > 0 for t in res.history) and res.cost.keyframe_ms is not None
    data = json.loads(th.read_text())
    b = res.best.schedule
    assert data.get("refresh_held") == b.refresh_held and data.get("keyframe_interval") == b.keyframe_interval
    assert data.get("refresh", "keyframe") == b.refresh
    dm = tools.build_delta(TinyTask().load_model(), torch.rand(1, 3, H, W), thresholds=th)
    assert dm.rt.refresh.spec() == b.refresh and dm.keyframe_interval == b.keyframe_interval
    assert "schedule" in res.table() and "frames delta/flush/key" in res.pareto_path.read_text()


def test_tune_tries_layer_refresh_and_drift_schedules(clip: Path, tmp_path: Path) -> None:
    """layers= and drift= schedules: tried, their refresh frames counted, the chosen rules in the file, run applies them."""
    th = tmp_path / "th.json"
    res = tools.tune(clip, "tiny", budget="rel_error<=0.05", frames=8, max_evals=10, min_blob=3, keyframe_interval=4,
                     schedules=["kf=8,layers=flush:2:s1", "drift=0.5"], out=th, quiet=True)
    by = {t.schedule: t for t in res.history}
    lay = [t for s, t in by.items() if s.refresh_layers == "flush:2:s1"]
    assert lay and lay[0].schedule.keyframe_interval == 8 and lay[0].modes.get("refresh", 0) >= 2
    assert any(s.refresh_drift == 0.5 for s in by)
    data = json.loads(th.read_text())
    b = res.best.schedule
    assert data.get("refresh_layers") == b.refresh_layers and data.get("refresh_drift") == b.refresh_drift
    dm = tools.build_delta(TinyTask().load_model(), torch.rand(1, 3, H, W), thresholds=th)
    assert (dm.rt.layer_refresh.spec() if dm.rt.layer_refresh else None) == b.refresh_layers
    assert dm.rt.refresh_drift == b.refresh_drift


def test_tune_continues_from_an_init_file(clip: Path, tmp_path: Path) -> None:
    first = tools.tune(clip, "tiny", budget="rel_error<=0.05", frames=5, max_evals=6, refresh_held=0.05, min_blob=3,
                       out=tmp_path / "a.json", quiet=True)
    res = tools.tune(clip, "tiny", budget="rel_error<=0.05", frames=5, max_evals=4, min_blob=3,
                     init=tmp_path / "a.json", schedules=["held=off,kf=2"], out=tmp_path / "b.json", quiet=True)
    t0 = res.history[0]
    assert t0.stage == "init" and t0.input == first.best.input and t0.overrides == first.best.overrides
    assert t0.schedule.refresh_held == first.best.schedule.refresh_held
    assert res.history[1].schedule.keyframe_interval == 2  # the schedules come first from an init file
    assert not any(t.stage == "input" for t in res.history) and res.evals <= 4


def test_tune_rejects_overlapping_heldout(clip: Path) -> None:
    with pytest.raises(tools.UserError, match="overlap"):
        tools.tune(clip, "tiny", budget="rel_error<=0.05", frames=5, heldout_frames=3, heldout_start=2, quiet=True)


def test_tune_impossible_budget(clip: Path, capsys) -> None:
    assert main(["tune", str(clip), "-m", "tiny", "--budget", "rel_error<=-1", "--frames", "3", "-q"]) == 2
    assert "not met even at threshold 0" in one_line_error(capsys)


def test_tune_unknown_metric(clip: Path, capsys) -> None:
    assert main(["tune", str(clip), "-m", "tiny", "--budget", "map>=0.5", "--frames", "3", "-q"]) == 2
    assert "budget metric 'map'" in one_line_error(capsys)


# ---- bench ---------------------------------------------------------------------------------------
def test_bench_table_and_json(clip: Path, tmp_path: Path, capsys) -> None:
    j = tmp_path / "bench.json"
    assert main(["bench", str(clip), "-m", "tiny", "--frames", "5", "--warmup", "1", "-t", "0", "0.05",
                 "--json", str(j), "-q", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(j.read_text())
    assert f"dense peer: {rows[0]['peer']}" in printed and "peer ms" in printed and "speedup" in printed
    assert "dense ms" not in printed
    assert [r["threshold"] for r in rows] == ["0", "0.05"]
    expected = {"torch channels_last fp32", "torch as loaded fp32"} | (
        {"onnxruntime fp32"} if importlib.util.find_spec("onnxruntime") else set())
    for r in rows:
        assert set(r["peer_candidates"]) == expected, r["peer_rejected"]
        assert r["peer_candidates"][r["peer"]] == min(r["peer_candidates"].values()) and r["peer_ms"] > 0
        assert r["delta_frames"] == r["modes"]["delta"] and r["modes"]["keyframe"] == 1
        assert r["delta_frame_median_ms"] > 0 and r["all_frame_mean_ms"] > 0 and 0 <= r["update_rate"] < 1
        assert r["speedup_delta_frames"] == pytest.approx(r["peer_ms"] / r["delta_frame_median_ms"])
        assert r["speedup_all_frames"] == pytest.approx(r["peer_mean_ms"] / r["all_frame_mean_ms"])


def test_models_lists_names(capsys) -> None:
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert names[0] == tools.default_model() == "yolov8n"
    assert {"yolov8n", "centerface", "tiny", "resnet18"} <= set(names)


def test_run_with_the_default_model(clip: Path, tmp_path: Path, capsys) -> None:
    """No --model: YOLOv8n with the official weights (the 48x64 clip is padded to 64x64)."""
    from deltacnn.tasks import yolov8

    try:
        yolov8.yolov8n_checkpoint_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "o"
    assert main(["run", str(clip), "-n", "3", "-q", "--no-video", "--check-dense", "--threshold", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "yolov8n on static.mp4: 3 frames" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "yolov8n" and s["agreement"]["f1"] == 1.0 and s["agreement"]["f1_stable"] == 1.0
    assert s["max_rel_error"] < 1e-4


# ---- pictures ------------------------------------------------------------------------------------
def test_heatmap_overlay_marks_only_recomputed_pixels() -> None:
    from deltacnn import viz

    frame = np.full((120, 240, 3), 128, np.uint8)
    heat = np.zeros((120, 240), np.float32)
    heat[10:30, 10:30] = 1.0
    img = viz.heatmap_overlay(frame, heat, legend=False)
    assert img.shape == frame.shape and img.dtype == np.uint8
    still, hot = img[60, 120], img[20, 20]
    assert still[0] == still[1] == still[2]  # untouched pixels stay grey
    assert int(hot[0]) - int(hot[2]) > 40  # all layers recomputed: red end of the colour map


# ---- the README's first command ------------------------------------------------------------------
def test_readme_first_command_runs_on_the_real_clip(tmp_path: Path) -> None:
    """The README's first command after its install step (which CI runs on a fresh machine), as written
    but for 3 frames instead of 40: the installed console script, the default real clip and model."""
    import shlex
    import shutil

    from deltacnn import clips
    from deltacnn.tasks import yolov8

    block = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("```bash\n", 1)[1]
    install, run = block.splitlines()[0].split(" && ")
    assert install == "bash .ci/install"
    argv = shlex.split(run)
    assert argv[:2] == ["deltacnn", "run"] and "--max-frames" in argv
    argv[argv.index("--max-frames") + 1] = "3"
    try:
        yolov8.yolov8n_checkpoint_path()
        clips.default_clip_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    exe = shutil.which("deltacnn")
    assert exe is not None, "the deltacnn console script is not installed (pip install -e .)"
    out = tmp_path / "o"
    proc = subprocess.run([exe, *argv[1:], "--out", str(out), "--quiet"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "yolov8n" and s["frames"] == 3 and s["peer"], s
    assert "f1" in s["agreement"] and "f1_stable" in s["agreement"]
    assert any(out.glob("annotated.*")) and any(out.glob("updates.*"))
