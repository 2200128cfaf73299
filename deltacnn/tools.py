"""The Python API behind the `deltacnn` command line: run a clip, tune thresholds, benchmark.

    from deltacnn import tools
    res = tools.run("clip.mp4", model="centerface", threshold=0.02, check_dense=True, out="out/")
    tun = tools.tune("clip.mp4", budget="f1>=0.95", out="thresholds.json")
    rows = tools.bench("clip.mp4", thresholds=[0.0, 0.02])

The code lives in `deltacnn.commands` (one module per command) and the tasks in `deltacnn.tasks`;
this module gathers their public names in one place. Mistakes a user can make raise `UserError`.
"""
from __future__ import annotations

from .commands.bench import bench, bench_table
from .commands.common import (DTYPES, UserError, available_models, build_delta, default_clip, default_model, get_task,
                              load_model, load_thresholds, open_video, resolve_device, resolve_dtype, save_json)
from .commands.run import RunResult, frame_record, run, spatial_heatmap, summarize, summary_table, write_run_outputs
from .commands.tune import Budget, TuneResult, controlled_macs, parse_budget, tune
from .tasks import register_task
from .tasks.base import Task
from .tasks.zoo import ZooTask
from .video import read_frames

__all__ = ["UserError", "Task", "ZooTask", "register_task", "available_models", "get_task", "run", "tune", "bench",
           "RunResult", "TuneResult", "Budget", "parse_budget", "summary_table", "bench_table", "controlled_macs",
           "read_frames", "DTYPES", "build_delta", "default_clip", "default_model", "load_model", "load_thresholds",
           "open_video", "resolve_device", "resolve_dtype", "save_json", "frame_record", "spatial_heatmap",
           "summarize", "write_run_outputs"]
