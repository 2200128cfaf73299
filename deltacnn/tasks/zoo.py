"""Zoo architectures (`deltacnn.models`) as tasks, with random weights: for timing and update rates, not results."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .base import flat_output, rel_error


class ZooTask:
    """A zoo architecture with random weights (seeded): for timing and update rates, not for results.

    Input: the frame scaled to [0, 1] and ImageNet-normalised. Agreement: relative L2 error of the
    raw output versus dense, and, for class-like outputs, agreement of the arg-max.
    """

    budget_metric = "rel_error"

    def __init__(self, arch: str) -> None:
        self.name = arch

    def load_model(self) -> nn.Module:
        from ..models import build, randomize_bn_

        torch.manual_seed(0)
        return randomize_bn_(build(self.name)).eval()

    def preprocess(self, frame_rgb: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frame_rgb)).permute(2, 0, 1)[None].float() / 255.0
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return (x - mean) / std

    def postprocess(self, output) -> Tensor:
        return flat_output(output)

    def draw(self, frame_rgb: np.ndarray, result) -> np.ndarray:
        return frame_rgb

    def agreement(self, result: Tensor, reference: Tensor) -> dict[str, float]:
        return {"rel_error": rel_error(result, reference)}
