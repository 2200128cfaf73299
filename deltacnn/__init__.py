"""deltacnn: CNN inference on video that computes only what changed.

    model = deltacnn.convert(cnn, example_frame)      # torch.fx conversion, BN folded
    for frame in video:
        out = model(frame)                              # dense-equivalent output, sparse work
"""
from .activations import ActSpec
from .backends import BACKENDS, get_backend
from .compile import compile
from .gating import InputGate, Refresh
from .layer_refresh import LayerRefresh
from .convert import SUPPORTED_OPS, ConversionError, UnsupportedOperationError, convert
from .layers import *  # noqa: F401,F403 - the explicit layer classes are public API
from .layers import __all__ as _layer_names
from .model import DeltaModel, InputChangedError
from .stats import FrameStats, LayerStats
from .tensor import DeltaTensor
from .thresholds import Thresholds

__version__ = "0.1.0"

__all__ = ["convert", "compile", "DeltaModel", "DeltaTensor", "Thresholds", "InputGate", "Refresh", "LayerRefresh", "FrameStats", "LayerStats", "ActSpec",
           "ConversionError", "UnsupportedOperationError", "InputChangedError", "SUPPORTED_OPS", "BACKENDS",
           "get_backend", *_layer_names]
