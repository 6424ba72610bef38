"""Grad-CAM++'s confidence change (Chattopadhyay et al. 2018): the target's probability on the
image dimmed by its min-max normalised map against the intact image's — average drop (percent,
lower is better) and increase in confidence (share of images, higher is better).

Protocol and costs: docs/metrics.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import ClassTargets, ModelFn, Reference, ensure_reference, resize_maps, target_probs


@dataclass(frozen=True)
class ConfidenceChange:
    """Grad-CAM++'s confidence change: ``drop`` (B,) percent ``max(0, Y - O) / Y * 100`` and
    ``increase`` (B,) 1.0 where ``O > Y`` else 0.0 (its mean is the fraction of images)."""

    drop: torch.Tensor
    increase: torch.Tensor


def normalize_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (H, W) map to [0, 1]; a constant map becomes all ones (it rates every
    pixel alike, so the image is kept whole).

    Example::

        >>> normalize_per_image(torch.tensor([[[2., 4.]], [[3., 3.]]])).tolist()
        [[[0.0, 1.0]], [[1.0, 1.0]]]
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    flat = span <= 0
    return torch.where(flat, torch.ones_like(maps), (maps - lo) / torch.where(flat, torch.ones_like(span), span))


def confidence_change(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None,
                      *, reference: Optional[Reference] = None) -> ConfidenceChange:
    """Grad-CAM++ (Chattopadhyay et al. 2018): ``O`` is the target's probability on ``x`` times the
    min-max normalised map (:func:`normalize_per_image`; in normalised input space, so dimmed
    pixels move towards the normalisation mean), ``Y`` on ``x``. Average drop: mean of
    ``max(0, Y - O) / Y`` in percent (lower is better); increase in confidence: share of images
    with ``O > Y`` (higher is better).

    Cost: 2 forward passes per image (1 with ``reference``).

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> cc = confidence_change(model, torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8))
        >>> cc.drop.tolist(), cc.increase.tolist()
        ([0.0, 0.0], [0.0, 0.0])
    """
    m = normalize_per_image(resize_maps(maps, x))
    t, y = ensure_reference(model_fn, x, targets, reference)
    o = target_probs(model_fn, x * m[:, None], t)
    drop = (y - o).clamp_min(0) / y.clamp_min(torch.finfo(y.dtype).tiny) * 100
    return ConfidenceChange(drop=drop, increase=(o > y).to(y.dtype))


def avg_drop(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None,
             **kwargs) -> torch.Tensor:
    """Per-image drop in percent (B,) of :func:`confidence_change`; its mean is the average drop.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> avg_drop(model, torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8)).tolist()
        [0.0, 0.0]
    """
    return confidence_change(model_fn, x, maps, targets, **kwargs).drop


def avg_increase(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None,
                 **kwargs) -> torch.Tensor:
    """Per-image increase indicator (B,) of :func:`confidence_change`; its mean is the fraction.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> avg_increase(model, torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8)).tolist()
        [0.0, 0.0]
    """
    return confidence_change(model_fn, x, maps, targets, **kwargs).increase
