"""Triton GPU kernels for delta tensors (values channels_last + bool mask), all free of host syncs.

Public API:
    dilate_mask, active_tiles                     (masks.py)
    sparse_conv2d, prepare_weight, ConvConfig, window_plan, prepare_window_weight   (conv.py)
    sparse_nonlinear, sparse_add, sparse_cat, sparsify, bordered_like, bordered_fits, accumulate_,
    seed_act_state_, upsample_nearest                                               (pointwise.py)
    maxpool_update                                (pool.py)
    yolo_decode_                                  (decode.py: YOLOv8's box decode, DeltaBoxDecode on a GPU)
    delta_report_, report_fits                    (report.py: deltacnn.compile's per-stream report)
    Act                                           (fused nonlinear epilogue spec)
"""
from ._common import ACT_CODES, Act
from .conv import (ConvConfig, WindowPlan, default_config, prepare_weight, prepare_window_weight, sparse_conv2d,
                   window_plan)
from .masks import active_tiles, dilate_mask, out_size
from .pointwise import (BORDERED_CP, accumulate_, bordered_fits, bordered_like, seed_act_state_, sparse_add,
                        sparse_cat, sparse_nonlinear, sparsify, upsample_nearest)
from .decode import yolo_decode_
from .pool import maxpool_update
from .report import delta_report_, report_fits

__all__ = ["ACT_CODES", "Act", "ConvConfig", "default_config", "prepare_weight", "prepare_window_weight",
           "WindowPlan", "window_plan",
           "sparse_conv2d", "active_tiles", "dilate_mask", "out_size", "accumulate_", "seed_act_state_", "sparse_add", "sparse_cat",
           "sparse_nonlinear", "sparsify", "upsample_nearest", "bordered_like", "bordered_fits", "BORDERED_CP", "maxpool_update",
           "delta_report_", "report_fits", "yolo_decode_"]
