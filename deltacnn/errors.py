"""The converter's exceptions, in their own module so that the tracer and the converter share them."""
from __future__ import annotations


class UnsupportedOperationError(NotImplementedError):
    """An op on the video stream has no delta version (and dense fallback is off)."""


class ConversionError(RuntimeError):
    """The model cannot be converted as it is (not traceable, wrong example input, ...)."""
