"""``aug_smooth``: a method's map averaged over test-time augmentations (every method takes it).

The six augmentations of pytorch-grad-cam (ttach): no flip / horizontal flip, times brightness
factors 0.9, 1 and 1.1. Each augmented batch gets its own forward (and the method's own work) for
the same targets; each map is upsampled to the input's size, min-max normalised, flipped back, and
the six are averaged — so an ``aug_smooth`` map is at the input's resolution, and it costs six times
the method plus six forwards.

Example::

    >>> len(AUGMENTATIONS), AUGMENTATIONS[1]
    (6, (False, 1.0))
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..engine import CamContext

#: (horizontal flip, brightness factor), in ttach's order
AUGMENTATIONS: tuple[tuple[bool, float], ...] = tuple(
    (flip, f) for flip in (False, True) for f in (0.9, 1.0, 1.1))


def aug_smooth(ctx: "CamContext") -> torch.Tensor:
    """(R, K, H, W): the mean of the normalised, de-augmented maps of ``ctx.spec`` without
    ``aug_smooth`` over :data:`AUGMENTATIONS`."""
    from ..engine import _per_target, normalize_maps

    spec = ctx.spec.without("aug_smooth")
    x = ctx.x
    size = tuple(int(s) for s in x.shape[-2:])
    total = None
    for flip, factor in AUGMENTATIONS:
        xa = x.flip(-1) if flip else x
        xa = xa * factor if factor != 1.0 else xa
        cams = _per_target(ctx.explain(xa, spec), ctx.targets.k)
        maps = normalize_maps(cams, size)
        maps = maps.flip(-1) if flip else maps
        total = maps if total is None else total + maps
    assert total is not None
    return total / len(AUGMENTATIONS)
