"""Explicit delta layers, for building delta models by hand or inspecting converted ones."""
from .base import DeltaLayer
from .conv import DeltaConv2d, DeltaConvTranspose2d
from .io import DenseCall, DenseIsland, Densify, Sparsify
from .linear import (DeltaAdd, DeltaCat, DeltaChannelSlice, DeltaGlobalAvgPool, DeltaLinearMap, DeltaScale,
                     DeltaSlice)
from .nonlinear import DeltaActivation, DeltaMaxPool2d, DeltaMul
from .norm import DeltaLayerNorm

__all__ = ["DeltaLayer", "DeltaConv2d", "DeltaConvTranspose2d", "DenseCall", "DenseIsland", "Densify", "Sparsify", "DeltaAdd",
           "DeltaCat", "DeltaChannelSlice", "DeltaGlobalAvgPool", "DeltaLinearMap", "DeltaScale", "DeltaSlice", "DeltaActivation",
           "DeltaMaxPool2d", "DeltaMul", "DeltaLayerNorm"]
