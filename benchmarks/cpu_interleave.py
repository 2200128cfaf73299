"""CPU, real footage: what timing both sides frame by frame costs each of them.

`deltacnn run` times every frame twice, the delta model and then the strongest dense peer on the same frame
(interleaved), so that both see the same machine. Each model then starts its frame with caches the other one
filled. A deployment runs one of them. This program times, on the same frames and in one process, in phases that
rotate (A B C A B C ...): the delta model alone (frame after frame, statistics on as `run` has them), both
interleaved (as `run` does), and the peer alone; and prints the speedup over delta frames and over all frames
both ways.

    python3 benchmarks/cpu_interleave.py [--start 200] [--frames 595] [--reps 2] [--threads 2]

The delta model is the shipped task's, with its tuned thresholds file (keyframes as the file says); the peer is
deltacnn.peers.strongest_peer's choice at the same threads.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deltacnn, not an installed one
from common import environment, print_table, write_json  # noqa: E402
from deltacnn.clips import default_clip_path  # noqa: E402
from deltacnn.commands.common import build_delta, get_task, load_model, open_video  # noqa: E402
from deltacnn.peers import strongest_peer  # noqa: E402

PHASES = ("delta alone", "interleaved", "peer alone")


def _ms(fn, x: torch.Tensor) -> float:
    t = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t) * 1e3


def run_phase(phase: str, frames: list[torch.Tensor], dense, peer, thresholds) -> dict:
    """One pass over the frames: delta frame, keyframe and peer times (ms) of this phase."""
    delta, key, peer_ms = [], [], []
    dm = build_delta(dense, frames[0], thresholds=thresholds) if phase != "peer alone" else None
    if dm is not None:
        dm.enable_stats(True)
    for i, x in enumerate(frames):
        if dm is not None:
            t = _ms(dm, x)
            dm.frame_stats()
            if i > 0:  # the first frame builds the state
                (delta if dm.last_mode == "delta" else key).append(t)
        if peer is not None and phase != "delta alone":
            peer_ms.append(_ms(peer, x))
    return {"delta": delta, "key": key, "peer": peer_ms}


def summarise(phase: str, rep: int, r: dict) -> dict:
    def mean(xs):
        return statistics.mean(xs) if xs else float("nan")
    every = r["delta"] + r["key"]
    return {"rep": rep, "phase": phase, "n_delta": len(r["delta"]), "n_key": len(r["key"]),
            "delta_ms": mean(r["delta"]), "delta_median": statistics.median(r["delta"]) if r["delta"] else float("nan"),
            "key_ms": mean(r["key"]), "all_ms": mean(every), "peer_ms": mean(r["peer"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", default=None, help="clip (default: vtest.avi, $DELTACNN_CLIP)")
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--frames", type=int, default=595)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="cpu_interleave")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task(None)
    dense = load_model(task, torch.device("cpu"))
    video = args.video or str(default_clip_path())
    frames = [task.preprocess(f) for f in itertools.islice(open_video(video, args.start + args.frames),
                                                             args.start, args.start + args.frames)]
    choice = strongest_peer(dense, frames[:2], threads=args.threads)
    print(f"{len(frames)} frames from {args.start}, {args.threads} threads, peer {choice.describe()}", flush=True)
    rows = []
    for rep in range(args.reps):
        for phase in PHASES:
            rows.append(summarise(phase, rep, run_phase(phase, frames, dense, choice.peer, task.default_thresholds)))
            print(f"  rep {rep} {phase}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()
                                                       if isinstance(v, float)), flush=True)
    out = []
    for how, dphase, pphase in (("alone", "delta alone", "peer alone"), ("interleaved", "interleaved", "interleaved")):
        d = [r for r in rows if r["phase"] == dphase]
        p = [r for r in rows if r["phase"] == pphase]
        peer = statistics.mean(r["peer_ms"] for r in p)
        dm, am = statistics.mean(r["delta_ms"] for r in d), statistics.mean(r["all_ms"] for r in d)
        out.append({"timed": how, "peer_ms": peer, "delta_ms": dm, "key_ms": statistics.mean(r["key_ms"] for r in d),
                    "all_ms": am, "x_delta": peer / dm, "x_all": peer / am})
    print_table(out, ["timed", "peer_ms", "delta_ms", "key_ms", "all_ms", "x_delta", "x_all"])
    path = write_json(args.tag, {"env": environment(), "args": vars(args), "peer": choice.to_dict(), "phases": rows,
                                 "summary": out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
