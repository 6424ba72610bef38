"""Constructed models and maps with known answers, shared by the metrics tests."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from camserve import CamEngine

H = W = 12
PIXEL = (4, 7)


class OnePixel(nn.Module):
    """Logits depend only on pixel PIXEL (mean over channels): class 0 is sure when it is near 4,
    class 1 when it is near 0 (logit 0 = 3 (v - 2))."""

    def __init__(self, i: int = PIXEL[0], j: int = PIXEL[1]) -> None:
        super().__init__()
        self.i, self.j = i, j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :, self.i, self.j].mean(1)
        return torch.stack([3 * (v - 2), -3 * (v - 2)], dim=1)


def pixel_images(b: int = 3, dtype=torch.float32) -> torch.Tensor:
    """Small noise with PIXEL at 4.0 in every channel: OnePixel is sure of class 0."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(b, 3, H, W, generator=g, dtype=torch.float64) - 0.5) * 0.2
    x[:, :, PIXEL[0], PIXEL[1]] = 4.0
    return x.to(dtype)


def perfect_map(b: int = 3) -> torch.Tensor:
    """Ranks PIXEL first, the rest in a fixed random order."""
    g = torch.Generator().manual_seed(1)
    m = torch.rand(b, H, W, generator=g) * 0.5
    m[:, PIXEL[0], PIXEL[1]] = 1.0
    return m


def small_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    """Three convolutions (parameterised layers 0, 2, 4; the Grad-CAM target "4") and a linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    ).eval()


def trapz(values: list[float], steps: int) -> float:
    """The trapezoidal AUC of ``values`` over ``steps`` equal steps of [0, 1]."""
    return float(np.trapezoid(values, np.linspace(0, 1, steps + 1)))


def gradcam(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of :func:`small_cnn`'s last convolution: the ``explain`` of the sanity check."""
    return CamEngine(model, "4")(x, targets).cams
