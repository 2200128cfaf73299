"""Frame sources (deltacnn.video.open_source): image folders, network streams served on loopback,
and the errors a user meets (empty folder, missing camera, unreachable stream)."""
from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deltacnn import video
from deltacnn.video import VideoError, open_source

READERS = ["opencv"] + (["pyav"] if video.have_pyav() else [])


def flat_frames(n: int, h: int = 48, w: int = 64) -> list[np.ndarray]:
    """Frames whose mean grey level encodes their index (robust to JPEG), with a little texture."""
    rng = np.random.default_rng(0)
    tex = rng.integers(0, 9, (h, w, 3))
    return [np.clip(20 + 20 * i + tex, 0, 255).astype(np.uint8) for i in range(n)]


def frame_index(f: np.ndarray) -> int:
    return int(round((float(f.mean()) - 24) / 20))


# ---- image folders -------------------------------------------------------------------------------
def test_image_folder_natural_order_exact_pixels(tmp_path: Path) -> None:
    import cv2

    frames = flat_frames(4)
    for name, f in zip(["f1.png", "f2.PNG", "f10.png", "f3.jpg"], frames):
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(tmp_path)
    assert src.kind == "image folder" and not src.live and src.expected_frames == 4 and src.name == tmp_path.name
    got = list(src)
    assert [frame_index(f) for f in got] == [0, 1, 3, 2]  # f1, f2, f3, f10
    assert np.array_equal(got[0], frames[0]) and np.array_equal(got[3], frames[2])  # PNG is lossless, RGB order
    assert len(list(open_source(str(tmp_path), max_frames=2))) == 2


def test_image_folder_errors(tmp_path: Path) -> None:
    import cv2

    with pytest.raises(VideoError, match="no .jpg or .png images in folder"):
        open_source(tmp_path)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((8, 10, 3), np.uint8))
    (tmp_path / "c.png").write_bytes(b"garbage")
    it = iter(open_source(tmp_path))
    next(it)
    with pytest.raises(VideoError, match="b.png is 10x8.*one size"):
        next(it)
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(VideoError, match="cannot decode image"):
        open_source(tmp_path)


# ---- cameras and bad specs ------------------------------------------------------------------------
def test_missing_camera_is_a_clear_error() -> None:
    if Path("/dev/video7").exists():
        pytest.skip("this machine has a camera 7")
    with pytest.raises(VideoError, match="camera 7 not found"):
        open_source("7")
    with pytest.raises(VideoError, match="camera 7 not found"):
        open_source(7)


def test_spec_classification(tmp_path: Path) -> None:
    assert video.is_stream("rtsp://cam.local/live") and video.is_stream("HTTPS://x/y.m3u8")
    assert not video.is_stream("clip.mp4") and not video.is_stream("C:/clip.mp4")
    with pytest.raises(VideoError, match="unsupported URL scheme"):
        open_source("ftp://example.org/clip.mp4")
    with pytest.raises(VideoError, match="unknown reader"):
        open_source("clip.mp4", reader="gstreamer")
    with pytest.raises(VideoError, match="video not found"):
        open_source(tmp_path / "nope.mp4")


# ---- network streams on loopback ------------------------------------------------------------------
class MJPEGServer:
    """Serves `frames` as an MJPEG stream (multipart/x-mixed-replace) on 127.0.0.1, then closes the
    connection: a live stream with no frame count that ends by itself. Stops within `limit_s`."""

    def __init__(self, frames: list[np.ndarray], interval_s: float = 0.01, limit_s: float = 20.0) -> None:
        import cv2

        parts = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                 for f in frames]
        deadline = time.monotonic() + limit_s

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for jpg in parts:
                        if time.monotonic() > deadline:
                            break
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpg) + jpg + b"\r\n")
                        self.wfile.flush()
                        time.sleep(interval_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/live.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self._timer = threading.Timer(limit_s, self.close)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mjpeg():
    srv = MJPEGServer(flat_frames(12))
    yield srv
    srv.close()


@pytest.mark.parametrize("reader", READERS)
def test_loopback_mjpeg_stream(mjpeg: MJPEGServer, reader: str) -> None:
    t0 = time.monotonic()
    src = open_source(mjpeg.url, reader=reader, timeout_s=5)
    assert src.kind == "stream" and src.live and src.expected_frames is None and src.name == "live"
    assert (src.height, src.width) == (48, 64)
    got = list(src)
    assert [frame_index(f) for f in got] == list(range(12))  # every frame, in order, RGB
    assert np.abs(got[5].astype(int) - flat_frames(12)[5].astype(int)).mean() < 4
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("reader", READERS)
def test_stream_max_frames(mjpeg: MJPEGServer, reader: str) -> None:
    src = open_source(mjpeg.url, max_frames=3, reader=reader, timeout_s=5)
    assert src.expected_frames == 3 and len(list(src)) == 3


@pytest.mark.parametrize("reader", READERS)
def test_unreachable_stream_is_a_clear_error(reader: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(VideoError, match=r"cannot open stream http://127\.0\.0\.1"):
        open_source(f"http://127.0.0.1:{port}/live.mjpg", reader=reader, timeout_s=3)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("reader", READERS)
def test_video_file_through_each_reader(tmp_path: Path, reader: str) -> None:
    clip = video.write_video(tmp_path / "c.avi", flat_frames(6), fps=10)
    src = open_source(clip, reader=reader)
    assert src.kind == "video" and not src.live and src.name == "c" and abs(src.fps - 10) < 0.5
    got = list(src)
    assert [frame_index(f) for f in got] == list(range(6))


def test_stop_on_interrupt_first_sigint_asks_second_stops(capsys) -> None:
    import os
    import signal

    from deltacnn.interrupt import StopOnInterrupt

    before = signal.getsignal(signal.SIGINT)
    with StopOnInterrupt() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stop.requested and "stopping after this frame" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before
