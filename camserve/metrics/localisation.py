"""Localisation against ground-truth boxes: the share of a map's mass inside the box (the
energy-based pointing game of Score-CAM) and whether its peak falls in the box (pointing game).
No forward pass: the maps and the boxes only.

Protocol: docs/metrics.md.
"""
from __future__ import annotations

import torch

from ..parsing import short_repr


def _boxes(boxes: object, b: int, device: torch.device) -> torch.Tensor:
    """``boxes`` as a (b, 4) tensor of ``[x0, y0, x1, y1]``; a ValueError otherwise."""
    t = torch.as_tensor(boxes, device=device)
    if t.shape != (b, 4) or t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"invalid value for boxes: expected ({b}, 4) [x0, y0, x1, y1] per image, got "
                         f"shape {tuple(t.shape)}")
    return t


def _check_maps(maps: torch.Tensor) -> None:
    if maps.dim() != 3:
        raise ValueError(f"invalid value for maps: expected (B, H, W), got {tuple(maps.shape)}")


def _inside(boxes: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, grow: int = 0) -> torch.Tensor:
    """Whether pixel (``ys``, ``xs``) lies in its box (``boxes[..., 4]``, exclusive ends) grown by
    ``grow`` pixels on every side; the arguments broadcast."""
    return ((xs >= boxes[..., 0] - grow) & (xs < boxes[..., 2] + grow)
            & (ys >= boxes[..., 1] - grow) & (ys < boxes[..., 3] + grow))


def energy_in_box(maps: torch.Tensor, boxes: object) -> torch.Tensor:
    """Share of each map's mass inside its box (the energy-based pointing game of Score-CAM):
    ``sum(map inside) / sum(map)`` with negative values counted as 0. ``boxes`` (B, 4) are
    ``[x0, y0, x1, y1]`` with exclusive ends in the maps' pixel coordinates (resize the maps to the
    image size first, :func:`resize_maps`). A map with no mass counts as uniform (the box's share of
    the area). Higher is better. Cost: no forward pass.

    Example::

        >>> m = torch.zeros(1, 4, 4); m[0, 0, 0] = 3.0; m[0, 3, 3] = 1.0
        >>> energy_in_box(m, [[0, 0, 2, 2]]).tolist()
        [0.75]
    """
    _check_maps(maps)
    b, h, w = maps.shape
    bx = _boxes(boxes, b, maps.device)[:, None, None, :]
    inside = _inside(bx, torch.arange(h, device=maps.device)[None, :, None],
                     torch.arange(w, device=maps.device)[None, None, :])
    m = maps.clamp_min(0)
    total = m.sum(dim=(1, 2))
    m = torch.where((total > 0)[:, None, None], m, torch.ones_like(m))
    return (m * inside).sum(dim=(1, 2)) / m.sum(dim=(1, 2))


def pointing_game(maps: torch.Tensor, boxes: object, tolerance: int = 0) -> torch.Tensor:
    """1.0 where the map's peak (first argmax in raster order) lies in its box grown by
    ``tolerance`` pixels on every side, else 0.0 (B,). ``boxes`` as in :func:`energy_in_box`.
    Higher is better. Cost: no forward pass.

    Example::

        >>> m = torch.zeros(2, 4, 4); m[0, 1, 1] = 1.0; m[1, 3, 3] = 1.0
        >>> pointing_game(m, [[0, 0, 2, 2], [0, 0, 2, 2]]).tolist(), pointing_game(m, [[0, 0, 2, 2]] * 2, 1).tolist()
        ([1.0, 0.0], [1.0, 0.0])
    """
    _check_maps(maps)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"invalid value for tolerance: {short_repr(tolerance)} (an int >= 0)")
    b, h, w = maps.shape
    bx = _boxes(boxes, b, maps.device)
    peak = maps.reshape(b, -1).argmax(dim=1)
    ys, xs = peak // w, peak % w
    hit = _inside(bx, ys, xs, tolerance)
    return hit.to(maps.dtype if maps.is_floating_point() else torch.float32)
