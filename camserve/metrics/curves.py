"""Deletion and insertion (RISE, Petsiuk et al. 2018): the target's probability as the most
relevant pixels are removed from the image (deletion, lower AUC is better) or put back into a
baseline (insertion, higher is better).

* :func:`deletion_curve`, :func:`insertion_curve` — the curves (:class:`Curve`); :func:`deletion`,
  :func:`insertion` — their AUC per image;
* :func:`baseline_image` — the substrate removed pixels get (mean colour, blur, a constant or a
  tensor), :func:`gaussian_blur` — RISE's blur.

Protocols and costs: docs/metrics.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..parsing import short_repr
from .base import (ClassTargets, ModelFn, Reference, check_x, ensure_reference, relevance_rank,
                   resize_maps, target_probs)

Baseline = Union[str, float, torch.Tensor]

DEFAULT_STEPS = 50
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0


def gaussian_blur(x: torch.Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (RISE's insertion substrate:
    kernel 11, sigma 5).

    Example::

        >>> gaussian_blur(torch.ones(1, 3, 8, 8)).allclose(torch.ones(1, 3, 8, 8))
        True
    """
    if kernel < 1 or kernel % 2 == 0 or sigma <= 0:
        raise ValueError(f"invalid blur: kernel {kernel!r} (odd, >= 1), sigma {sigma!r} (> 0)")
    r = kernel // 2
    g = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    b, c, h, w = x.shape
    pad_mode = "reflect" if r < min(h, w) else "replicate"
    y = F.pad(x.reshape(b * c, 1, h, w), (r, r, r, r), mode=pad_mode)
    y = F.conv2d(y, g.view(1, 1, 1, -1))
    y = F.conv2d(y, g.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def baseline_image(x: torch.Tensor, baseline: Baseline = "mean") -> torch.Tensor:
    """The substrate that replaces removed pixels, in ``x``'s (normalised) space:
    ``"mean"``: each image's mean colour (per channel); ``"blur"``: :func:`gaussian_blur` of the
    image; a float: that constant in every channel; a tensor broadcastable to ``x``.

    Example::

        >>> baseline_image(torch.arange(4.).view(1, 1, 2, 2)).flatten().tolist()
        [1.5, 1.5, 1.5, 1.5]
    """
    check_x(x)
    if isinstance(baseline, str):
        if baseline == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        if baseline == "blur":
            return gaussian_blur(x)
        raise ValueError(f"invalid value for baseline: {short_repr(baseline)} "
                         f"(allowed: 'mean', 'blur', a number or a tensor)")
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError as exc:
            raise ValueError(f"invalid value for baseline: shape {tuple(baseline.shape)} does not "
                             f"broadcast to {tuple(x.shape)}") from exc
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool) and math.isfinite(baseline):
        return torch.full_like(x, float(baseline))
    raise ValueError(f"invalid value for baseline: {short_repr(baseline)} "
                     f"(allowed: 'mean', 'blur', a number or a tensor)")


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve: ``fractions`` (S+1,) of pixels changed, ``probs`` (B, S+1)
    probability of the target at each, ``auc`` (B,) trapezoidal area over ``fractions`` in [0, 1]."""

    fractions: torch.Tensor
    probs: torch.Tensor
    auc: torch.Tensor


def curve(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets, *,
          steps: int, baseline: Baseline, insert: bool,
          reference: Optional[Reference]) -> Curve:
    """The deletion (``insert=False``) or insertion curve; see :func:`deletion_curve`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"invalid value for steps: {short_repr(steps)} (an int >= 1)")
    m = resize_maps(maps, x)
    t, p0 = ensure_reference(model_fn, x, targets, reference)
    base = baseline_image(x, baseline)
    rank = relevance_rank(m)[:, None]
    n = rank.shape[-1] * rank.shape[-2]
    counts = [(k * n) // steps for k in range(steps + 1)]
    probs = []
    for k, c in enumerate(counts):
        changed = rank < c
        if not insert and k == 0:
            probs.append(p0)              # nothing removed: the image itself
        elif insert and k == steps:
            probs.append(p0)              # everything inserted: the image itself
        else:
            img = torch.where(changed, x, base) if insert else torch.where(changed, base, x)
            probs.append(target_probs(model_fn, img, t))
    pr = torch.stack(probs, dim=1)
    frac = torch.tensor(counts, dtype=pr.dtype, device=pr.device) / n
    auc = torch.trapezoid(pr, frac, dim=1)
    return Curve(fractions=frac, probs=pr, auc=auc)


def deletion_curve(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None,
                   *, steps: int = DEFAULT_STEPS, baseline: Baseline = "mean",
                   reference: Optional[Reference] = None) -> Curve:
    """Deletion (RISE, Petsiuk et al. 2018): replace the pixels by the baseline in decreasing order
    of the map, ``k * H * W // steps`` of them at step k = 0..steps, and record the target's
    softmax probability; the AUC (trapezoidal over the fraction removed, in [0, 1]) is low when the
    map ranks the decisive pixels first.

    Cost: ``steps + 1`` forward passes per image (``steps`` when ``reference``, the
    ``(targets, p)`` pair of :func:`reference_targets`, is given).

    Example::

        >>> model = lambda t: torch.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], 1)
        >>> x = torch.zeros(1, 3, 4, 4); x[0, :, 0, 0] = 5.0
        >>> good = torch.zeros(1, 4, 4); good[0, 0, 0] = 1.0
        >>> c = deletion_curve(model, x, good, [0], steps=4, baseline=0.0)
        >>> c.probs.shape, round(float(c.auc), 3)
        (torch.Size([1, 5]), 0.562)
    """
    return curve(model_fn, x, maps, targets, steps=steps, baseline=baseline, insert=False,
                 reference=reference)


def insertion_curve(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None,
                    *, steps: int = DEFAULT_STEPS, baseline: Baseline = "mean",
                    reference: Optional[Reference] = None) -> Curve:
    """Insertion (RISE): start from the baseline and put back the image's pixels in decreasing
    order of the map; the AUC is high when the map ranks the decisive pixels first. RISE uses a
    blurred image as the insertion substrate (``baseline="blur"``); the default here is the mean
    colour, the same for both curves.

    Cost: ``steps + 1`` forward passes per image (``steps`` with ``reference``).

    Example::

        >>> model = lambda t: torch.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], 1)
        >>> x = torch.zeros(1, 3, 4, 4); x[0, :, 0, 0] = 5.0
        >>> good = torch.zeros(1, 4, 4); good[0, 0, 0] = 1.0
        >>> round(float(insertion_curve(model, x, good, [0], steps=4, baseline=0.0).auc), 3)
        0.937
    """
    return curve(model_fn, x, maps, targets, steps=steps, baseline=baseline, insert=True,
                 reference=reference)


def deletion(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None,
             **kwargs) -> torch.Tensor:
    """Deletion AUC (B,) of :func:`deletion_curve` (same arguments); lower is better.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> deletion(model, torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), steps=4).shape
        torch.Size([2])
    """
    return deletion_curve(model_fn, x, maps, targets, **kwargs).auc


def insertion(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None,
              **kwargs) -> torch.Tensor:
    """Insertion AUC (B,) of :func:`insertion_curve` (same arguments); higher is better.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> insertion(model, torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), steps=4).shape
        torch.Size([2])
    """
    return insertion_curve(model_fn, x, maps, targets, **kwargs).auc
