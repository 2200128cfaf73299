"""Former home of the real pretrained tasks and the demo clip; kept so existing imports work.

The tasks now live in `deltacnn.tasks` (one module per task), the ONNX importer in
`deltacnn.onnx_import` and the clip helpers in `deltacnn.clips`. See docs/ASSETS.md for where every
file comes from and its licence.
"""
from __future__ import annotations

from .clips import CLIP_ENV, CLIP_INSTALL_HINT, clip_info, default_clip_path, read_frames
from .onnx_import import OnnxCNN
from .tasks import DEFAULT_TASK, TASKS, get_task
from .tasks.base import Task, box_f1
from .tasks.centerface import (CENTERFACE_ENV, CENTERFACE_FILE, CENTERFACE_INSTALL_HINT, CENTERFACE_PACKAGE,
                               CENTERFACE_VERSION, CenterFaceTask, centerface_onnx_path)

__all__ = ["Task", "CenterFaceTask", "TASKS", "DEFAULT_TASK", "get_task", "default_clip_path", "read_frames",
           "clip_info", "OnnxCNN", "box_f1", "CLIP_ENV", "CLIP_INSTALL_HINT", "CENTERFACE_INSTALL_HINT",
           "CENTERFACE_ENV", "CENTERFACE_FILE", "CENTERFACE_PACKAGE", "CENTERFACE_VERSION", "centerface_onnx_path"]
