"""`deltacnn` command line: run a video through a delta model, tune thresholds, benchmark.

    deltacnn run [SOURCE] [--model NAME] [--threshold T | --thresholds FILE] [--check-dense] [--out DIR]
    deltacnn tune [VIDEO] --budget 'f1>=0.95' [--frames 30] [--max-evals 40] [--out FILE]
    deltacnn bench [VIDEO] [--threshold 0 0.02 FILE ...] [--json FILE]
    deltacnn models

SOURCE: a video file, an image folder, a camera index (`0`) or a stream URL (`rtsp://`, `http://`).
Without it the real demo clip and the default pretrained model are used. Speedups are against the
strongest dense peer of the device (deltacnn.peers), named in every summary. Problems with the
input print one line `deltacnn: error: ...` and exit with status 2; `--debug` shows tracebacks.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from .video import VideoError

EXIT_USER = 2
EXIT_INTERNAL = 1


def _common(p: argparse.ArgumentParser, video_help: str) -> None:
    p.add_argument("video", nargs="?", metavar="VIDEO", help=video_help)
    p.add_argument("--model", "-m", default=None,
                   help="task or architecture name (see `deltacnn models`); default: the pretrained default")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="delta model compute dtype (default float32)")
    p.add_argument("--backend", choices=["reference", "cpu", "triton"], default=None,
                   help="delta kernels (default: triton on CUDA when installed, the fused cpu kernels on the "
                        "CPU when they compile, else reference)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for the delta model and its dense peer alike (default: torch's default)")
    p.add_argument("--reader", choices=["auto", "opencv", "pyav"], default="auto",
                   help="how to read VIDEO: OpenCV or PyAV (auto: PyAV for streams when installed, else OpenCV)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


SOURCE_HELP = ("a video file, a folder of .jpg/.png images (name order), a camera index (0, 1, ...) or a stream URL "
               "(rtsp://, http://, https://)")
COMPILE_HELP = ("on a GPU, also try torch.compile(mode='max-autotune') as the dense peer (minutes of compiling; "
                "its compile time is reported)")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v


def _fraction_or_off(s: str) -> float | None:
    if s.lower() == "off":
        return None
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'off', got {s!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'off', got {s}")
    return v


def _tile_gate(s: str) -> tuple[int, int]:
    try:
        b, m = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TILE:MIN (e.g. 8:4), got {s!r}") from None
    if b < 1 or not 1 <= m <= b * b:
        raise argparse.ArgumentTypeError(f"expected a tile size >= 1 and 1 <= MIN <= tile*tile, got {s}")
    return b, m


def _noise_options(p: argparse.ArgumentParser, min_blob: bool) -> None:
    """The input gates and deep-layer truncation (deltacnn.gating.InputGate, Thresholds.growth)."""
    if min_blob:
        p.add_argument("--min-blob", type=_positive_int, default=1,
                       help="send input changes only where they cover a k x k square (odd k; 1: off)")
    p.add_argument("--tile-gate", type=_tile_gate, default=None, metavar="TILE:MIN",
                   help="send a TILE x TILE tile's input changes only when at least MIN of its pixels changed")
    p.add_argument("--input-low", type=_nonneg_float, default=None, metavar="FRAC",
                   help="hysteresis: pixels above FRAC x the input threshold join the changes they touch "
                        "(spatial) or continue (temporal); see --hysteresis")
    p.add_argument("--hysteresis", choices=["spatial", "temporal", "both"], default="spatial",
                   help="which hysteresis --input-low applies (default spatial)")
    p.add_argument("--threshold-growth", type=_nonneg_float, default=0.0, metavar="G",
                   help="deep-layer truncation: layer thresholds times (output stride / smallest stride) ** G")
    p.add_argument("--refresh-held", type=_fraction_or_off, default=None, metavar="FRAC|off",
                   help="refresh once the input gates hold back changes in more than FRAC of the pixels "
                        "(default off; what runs: --refresh)")
    p.add_argument("--refresh", default=None, metavar="keyframe|flush|flush:B:M",
                   help="what --refresh-held runs: a whole keyframe (default), or a delta frame that flushes the "
                        "held-back input change (all of it, or in B x B tiles holding at least M held pixels)")
    p.add_argument("--refresh-drift", type=_nonneg_float, default=None, metavar="LEVEL",
                   help="keyframe once the input's unsent change, mean |x - ref|, exceeds LEVEL input thresholds "
                        "(default: the thresholds file's, else off)")
    p.add_argument("--refresh-layers", default=None, metavar="SPEC|off",
                   help="re-send the deep layers' held-back residuals without a keyframe: 'flush:N' every N frames, "
                        "'flush:aA' once their touched area passes A, or 'keyframe:aA' (a keyframe then); ':sS' "
                        "layers of output stride >= S (default 16), '@F' their threshold factor (default 0) "
                        "(default: the thresholds file's, else off; deltacnn.layer_refresh)")


def _gate(a: argparse.Namespace):
    """The InputGate of the parsed flags (None: no gate beyond --min-blob)."""
    from .commands.common import UserError
    from .gating import InputGate

    tile, tile_min = a.tile_gate or (1, 1)
    try:
        return InputGate(min_blob=a.min_blob, tile=tile, tile_min=tile_min, low=a.input_low, hysteresis=a.hysteresis)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="deltacnn", description="Sparse delta inference for CNNs on video.",
                                 epilog="`deltacnn COMMAND --help` for the options of each command.")
    ap.add_argument("--version", action="version", version=f"deltacnn {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a video through the delta model; write videos, per-frame stats, plot",
                       description="Run a video through the delta model and the dense model; write the task output "
                                   "drawn on the frames, an update heat-map video, per-frame CSV/JSON, summary.json "
                                   "and plot.png.")
    _common(r, SOURCE_HELP + " (default: the demo clip); Ctrl-C ends the run with its outputs written")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--threshold", "-t", type=_nonneg_float, default=None,
                   help="global truncation threshold (default: the task's default_threshold, else 0 = "
                        "dense-equivalent output)")
    g.add_argument("--thresholds", metavar="FILE", default=None, help="thresholds JSON written by `deltacnn tune`")
    r.add_argument("--input-threshold", type=_nonneg_float, default=None,
                   help="threshold of the input pixels, in the model's input units (default: --threshold)")
    r.add_argument("--demo", action="store_true", help="use the demo clip (same as giving no VIDEO)")
    r.add_argument("--max-frames", "-n", type=_positive_int, default=None, help="stop after N frames")
    r.add_argument("--start-frame", type=int, default=0,
                   help="skip the frames before this one (e.g. a tune's held-out segment; default 0)")
    r.add_argument("--keyframe-interval", type=_positive_int, default=None, help="dense keyframe every N frames")
    r.add_argument("--dense-above", type=_fraction_or_off, default=0.5, metavar="FRAC|off",
                   help="run a frame densely (no state update) when more than this fraction of its input pixels "
                        "changed, or when the last delta frame did most of a dense frame's work; the next quiet "
                        "frame is a keyframe (default 0.5; off: always delta frames)")
    _noise_options(r, min_blob=True)
    r.add_argument("--check-dense", action="store_true", help="measure the error versus dense inference per frame")
    r.add_argument("--no-video", action="store_true", help="skip the annotated and heat-map videos")
    r.add_argument("--compile-peer", action="store_true", help=COMPILE_HELP)
    r.add_argument("--out", "-o", default=None, help="output directory (default ./deltacnn_out/<clip name>)")
    r.add_argument("--motion", default="none", metavar="auto|none|FILE",
                   help="moving camera: keep the delta state aligned to the scene; auto: estimate the motion "
                        "(phase correlation), FILE: one 'dx dy' (or 9-number homography) line per frame "
                        "(default none: static camera)")
    r.add_argument("--motion-halo", type=_positive_int, default=None, metavar="PX",
                   help="border bands recomputed when the view moves, in pixels (default: the exact receptive-"
                        "field bound; smaller is cheaper and approximate)")

    t = sub.add_parser("tune", help="find input and per-layer thresholds within an accuracy budget versus dense",
                       description="Search the thresholds with the lowest frame time (a cost model fitted to CPU-clock "
                                   "timings on this device) whose task output stays within the budget of the dense "
                                   "output on calibration frames: the input threshold first, then contiguous layer "
                                   "groups, then single layers, largest downstream multiply-adds first. Thresholds are "
                                   "relative (input: fraction of the frame's value range; layers: fraction of their "
                                   "activation scale). Writes "
                                   "the JSON `run --thresholds` reads, a Pareto table and plot of time against "
                                   "agreement, and with --heldout-frames reports frames tuning never saw.")
    _common(t, "calibration source: " + SOURCE_HELP + " (default: the demo clip)")
    t.add_argument("--budget", "-b", required=True,
                   help="e.g. 'f1>=0.95', 'rel_error<=0.01', or a number for the task's main metric")
    t.add_argument("--aggregate", choices=["mean", "worst"], default="mean",
                   help="budget over the clip's frames: mean (default) or worst frame")
    t.add_argument("--frames", type=_positive_int, default=30, help="calibration frames (default 30)")
    t.add_argument("--start-frame", type=int, default=0, help="first calibration frame (default 0)")
    t.add_argument("--heldout-frames", type=int, default=0,
                   help="also report the tuned thresholds on this many frames after the calibration segment")
    t.add_argument("--heldout-start", type=int, default=None, help="first held-out frame (default: after calibration)")
    t.add_argument("--min-blob", type=_positive_int, default=1,
                   help="send input changes only where they cover a k x k square (odd k; 1: off)")
    _noise_options(t, min_blob=False)
    t.add_argument("--max-evals", type=_positive_int, default=40, help="passes over the clip at most (default 40)")
    t.add_argument("--margin", type=_nonneg_float, default=0.0,
                   help="calibration frames must beat the budget by this much, so frames tuning never saw keep it "
                        "(default 0)")
    t.add_argument("--groups", type=_positive_int, default=4,
                   help="contiguous layer groups tuned as one lever each before single layers (default 4)")
    t.add_argument("--keyframe-interval", type=_positive_int, default=None, help="dense keyframe every N frames")
    t.add_argument("--schedules", nargs="*", default=None, metavar="SPEC",
                   help="frame schedules to try besides the given one, each 'held=F|off,refresh=keyframe|flush|"
                        "flush:B:M,kf=N|off,growth=G,drift=L|off,layers=SPEC|off' (keys left out keep the given "
                        "value; default: a flush and keyframes at 2x and 4x --refresh-held, growth 0.25, and with a "
                        "keyframe interval N keyframes every 2N with a layer refresh every N; no SPEC: none)")
    t.add_argument("--init", default=None, metavar="FILE",
                   help="continue from this thresholds file (an earlier tune's): its thresholds and schedule are "
                        "the first trial, then the schedules and the layer groups from there")
    t.add_argument("--no-ref-cache", action="store_true",
                   help="compute the dense reference outputs even when an earlier tune cached them for the same "
                        "model, weights, clip, frames and input size (cache: $DELTACNN_CACHE_DIR/refs, default "
                        "~/.cache/deltacnn/refs)")
    t.add_argument("--out", "-o", default=None,
                   help="thresholds JSON to write (default ./deltacnn_out/<clip name>/thresholds.json)")

    b = sub.add_parser("bench", help="dense versus delta timing on this device, as a table",
                       description="Median time per frame of the dense and the delta model on the current device.")
    _common(b, SOURCE_HELP + " (default: the demo clip)")
    b.add_argument("--threshold", "-t", nargs="+", default=["0"], metavar="T|FILE",
                   help="global thresholds and/or thresholds JSON files, one table row each (default 0)")
    b.add_argument("--frames", type=_positive_int, default=30, help="frames to time (default 30)")
    b.add_argument("--warmup", type=int, default=3, help="untimed warm-up frames (default 3)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    b.add_argument("--compile-peer", action="store_true", help=COMPILE_HELP)

    sub.add_parser("models", help="list the model names --model accepts")
    return ap


def _version() -> str:
    from . import __version__

    return __version__


def cmd_run(a: argparse.Namespace) -> int:
    from .commands.common import UserError
    from .commands.run import run

    if a.demo and a.video:
        raise UserError("give either VIDEO or --demo, not both")
    video = None if a.demo else a.video
    res = run(video, a.model, threshold=a.threshold, input_threshold=a.input_threshold, thresholds=a.thresholds,
              device=a.device, out=a.out, max_frames=a.max_frames, dtype=a.dtype,
              keyframe_interval=a.keyframe_interval, check_dense=a.check_dense, backend=a.backend, quiet=a.quiet,
              write_videos=not a.no_video, dense_above=a.dense_above, reader=a.reader, compile_peer=a.compile_peer,
              motion=a.motion, motion_halo=a.motion_halo, start_frame=a.start_frame,
              input_gate=_gate(a), threshold_growth=a.threshold_growth, refresh_held=a.refresh_held,
              refresh=a.refresh, refresh_drift=a.refresh_drift, refresh_layers=a.refresh_layers)
    print(res.table())
    if res.summary.get("interrupted"):
        print(f"stopped by Ctrl-C after {res.summary['frames']} frames; the outputs cover those frames")
    print("outputs:")
    for k, p in res.paths.items():
        print(f"  {k:12s} {p}")
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from .commands.common import default_clip
    from .commands.tune import tune

    out = a.out
    if out is None:
        stem = Path(a.video).stem if a.video else default_clip().stem
        out = Path("deltacnn_out") / stem / "thresholds.json"
    res = tune(a.video, a.model, budget=a.budget, aggregate=a.aggregate, frames=a.frames, max_evals=a.max_evals,
               start_frame=a.start_frame, heldout_frames=a.heldout_frames, heldout_start=a.heldout_start,
               min_blob=a.min_blob, device=a.device, dtype=a.dtype, keyframe_interval=a.keyframe_interval,
               backend=a.backend, out=out, quiet=a.quiet, reader=a.reader, margin=a.margin, groups=a.groups,
               input_gate=_gate(a), threshold_growth=a.threshold_growth, refresh_held=a.refresh_held,
               refresh=a.refresh, refresh_drift=a.refresh_drift, refresh_layers=a.refresh_layers,
               schedules=a.schedules, init=a.init, ref_cache=not a.no_ref_cache)
    print(res.table())
    print(f"use it with:  deltacnn run {a.video or ''} --thresholds {res.path}".replace("  --", " --"))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .commands.bench import bench, bench_table
    from .commands.common import save_json

    rows = bench(a.video, a.model, thresholds=a.threshold, frames=a.frames, warmup=a.warmup, device=a.device,
                 dtype=a.dtype, backend=a.backend, quiet=a.quiet, reader=a.reader, compile_peer=a.compile_peer)
    print(bench_table(rows))
    if a.json:
        print(f"written: {save_json(rows, a.json)}")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .commands.common import available_models

    for name in available_models():
        print(name)
    return 0


COMMANDS = {"run": cmd_run, "tune": cmd_tune, "bench": cmd_bench, "models": cmd_models}


def _error(msg: str) -> None:
    print(f"deltacnn: error: {' '.join(str(msg).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deltacnn` script; returns the exit status (0 ok, 2 bad input, 1 internal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and `deltacnn: error: ...` (or --help)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER
    from .commands.common import UserError

    if getattr(args, "threads", None):  # parsed by every command, applied by none before
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (UserError, VideoError) as e:
        if debug:
            traceback.print_exc()
        _error(e)
        return EXIT_USER
    except KeyboardInterrupt:
        print("deltacnn: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users; --debug for the traceback
        if debug:
            traceback.print_exc()
        _error(f"internal error: {type(e).__name__}: {e}" + ("" if debug else " (run with --debug for the traceback)"))
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
