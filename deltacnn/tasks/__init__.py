"""Tasks: a network adapted to video (load, preprocess, decode, draw, agreement with dense), by name.

One module per task; `TASKS` is the registry `--model` reads (`deltacnn models` lists it, then the
zoo architectures of `deltacnn.models`, which run as `ZooTask` with random weights).

    from deltacnn import tasks
    task = tasks.get_task("centerface")
    tasks.register_task("mine", MyTask)      # any object following `tasks.base.Task`
"""
from __future__ import annotations

from typing import Callable

from .base import Task, box_f1, iou_matrix, nms
from .centerface import CenterFaceTask, centerface_x2
from .yolov8 import YOLOv8Task
from .zoo import ZooTask

# name -> factory(**kwargs) -> Task.  "yolov8n": COCO detection, the default; "centerface": native 768x576 input (cheap, misses some of the
# 8-20 px faces); "centerface_x2": frame upscaled 2x to 1536x1152 (better recall, 4x the MACs).
TASKS: dict[str, Callable[..., Task]] = {"yolov8n": YOLOv8Task, "centerface": CenterFaceTask,
                                         "centerface_x2": centerface_x2}
DEFAULT_TASK = "yolov8n"


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make `factory()` available as `--model name` (e.g. your own task, or a test's)."""
    TASKS[name] = factory


def get_task(name: str, **kwargs) -> Task:
    """The task registered as `name`, built with `kwargs`."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; available: {sorted(TASKS)}") from None
    return factory(**kwargs)


__all__ = ["Task", "TASKS", "DEFAULT_TASK", "register_task", "get_task", "CenterFaceTask", "YOLOv8Task", "ZooTask", "box_f1",
           "iou_matrix", "nms"]
