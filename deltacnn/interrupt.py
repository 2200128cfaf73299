"""Ctrl-C ends a run after the frame in progress, so everything done so far is written.

A live source (camera, stream) has no last frame: Ctrl-C is how a user ends the run, and the
outputs (videos, per-frame records, summary, plot) must come out complete, not cut mid-frame.
"""
from __future__ import annotations

import signal
import sys
import threading


class StopOnInterrupt:
    """Within the block, the first SIGINT only sets `requested` (the loop checks it after each frame);
    a second SIGINT raises KeyboardInterrupt at once. Outside the main thread, where Python cannot
    install signal handlers, it changes nothing (Ctrl-C raises KeyboardInterrupt as usual).
    """

    def __init__(self, message: str = "stopping after this frame (Ctrl-C again to stop at once)") -> None:
        self.message = message
        self.requested = False
        self._old = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message:
            print(f"\ndeltacnn: {self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnInterrupt:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
