"""Explicit delta layers, for building delta models by hand or inspecting converted ones."""
from .base import DeltaLayer
from .conv import DeltaConv2d, DeltaConvTranspose2d
from .io import DenseIsland, Densify, Sparsify
from .linear import DeltaAdd, DeltaCat, DeltaChannelSlice, DeltaGlobalAvgPool, DeltaLinearMap, DeltaScale
from .nonlinear import DeltaActivation, DeltaMaxPool2d, DeltaMul
from .norm import DeltaLayerNorm

__all__ = ["DeltaLayer", "DeltaConv2d", "DeltaConvTranspose2d", "DenseIsland", "Densify", "Sparsify", "DeltaAdd",
           "DeltaCat", "DeltaChannelSlice", "DeltaGlobalAvgPool", "DeltaLinearMap", "DeltaScale", "DeltaActivation",
           "DeltaMaxPool2d", "DeltaMul", "DeltaLayerNorm"]
