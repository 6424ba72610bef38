"""What every faithfulness metric shares: the inputs, the one reference pass, pixel ranks and the
reference maps of a comparison.

* :func:`check_x`, :func:`resize_maps` — the images and the saliency maps, checked, the maps
  resized to the images;
* :func:`reference_targets` — the classes explained and their probability on the intact images
  (one forward, shared by every model-based metric of :func:`camserve.metrics.compute_metrics`);
  :func:`target_probs` — one forward of perturbed images;
* :func:`relevance_rank` — each pixel's rank in a map (the order deletion, insertion and ROAD
  perturb in);
* :func:`random_map`, :func:`center_map` — the ``random`` and ``center`` baselines of a comparison.

Arguments and protocols: docs/metrics.md.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..parsing import short_repr

#: ``x (B, 3, H, W) -> logits (B, C)``: an ``nn.Module`` or any callable (e.g. an onnxruntime run).
ModelFn = Callable[[torch.Tensor], torch.Tensor]
#: The classes to score: one per image (B,), one for all (int), or None for the predicted ones.
ClassTargets = Union[None, int, Sequence[int], torch.Tensor]
#: What :func:`reference_targets` returns: targets (B,) long and their probabilities (B,) on ``x``.
Reference = tuple[torch.Tensor, torch.Tensor]


def check_x(x: torch.Tensor) -> None:
    """``x`` must be a floating (B, C, H, W) tensor; a ValueError saying what it is otherwise."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"invalid value for x: expected a floating (B, C, H, W) tensor, got {got}")


def resize_maps(maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``maps`` (B, h, w) checked against ``x`` (B, C, H, W), on ``x``'s device and dtype, resized
    bilinearly (``align_corners=False``) to (H, W) when the size differs.

    Example::

        >>> resize_maps(torch.ones(2, 3, 3), torch.zeros(2, 3, 12, 12)).shape
        torch.Size([2, 12, 12])
    """
    check_x(x)
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or maps.shape[0] != x.shape[0]:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"invalid value for maps: expected a (B, h, w) tensor with B = {x.shape[0]}, "
                         f"got {got}")
    m = maps.detach().to(device=x.device, dtype=x.dtype)
    if not torch.isfinite(m).all():
        raise ValueError("invalid value for maps: they contain NaN or infinite values")
    if tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
        m = F.interpolate(m[:, None], size=tuple(x.shape[-2:]), mode="bilinear",
                          align_corners=False)[:, 0]
    return m


def reference_targets(model_fn: ModelFn, x: torch.Tensor, targets: ClassTargets = None) -> Reference:
    """The reference pass every model-based metric starts from: ``(targets (B,) long, p (B,)
    softmax probability of each target on the intact ``x``)`` with one forward. ``targets=None``
    picks the predicted classes; an int applies to every image.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> reference_targets(model, torch.ones(2, 3, 4, 4))[0].tolist()
        [0, 0]
    """
    check_x(x)
    logits = model_logits(model_fn, x)
    b, c = logits.shape
    if targets is None:
        t = logits.argmax(1)
    else:
        t = torch.as_tensor(targets, device=logits.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,) or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"invalid value for targets: expected {b} class indices, got "
                             f"{short_repr(targets)}")
        t = t.long()
        if bool(((t < 0) | (t >= c)).any()):
            raise ValueError(f"invalid value for targets: {short_repr(t.tolist())} (class indices 0..{c - 1})")
    return t, target_prob(logits, t)


def model_logits(model_fn: ModelFn, x: torch.Tensor) -> torch.Tensor:
    """``model_fn(x)`` under ``torch.no_grad()``, checked to be (B, C) logits."""
    with torch.no_grad():
        out = model_fn(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"invalid value for model_fn: expected logits of shape ({x.shape[0]}, C), "
                         f"got {got}")
    return out


def target_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax probability (B,) of each row's target class (half precisions computed in float32)."""
    p = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, 1)
    return p.gather(1, targets.to(p.device)[:, None])[:, 0]


def target_probs(model_fn: ModelFn, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One forward of (perturbed) ``x``: the probability (B,) of each row's target."""
    return target_prob(model_logits(model_fn, x), targets)


def ensure_reference(model_fn: ModelFn, x: torch.Tensor, targets: ClassTargets,
                     reference: Optional[Reference]) -> Reference:
    """``reference`` when given (a front door shares one pass), else :func:`reference_targets`."""
    return reference if reference is not None else reference_targets(model_fn, x, targets)


def relevance_rank(maps: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel of (B, H, W) maps, 0 = most relevant; ties in raster order.

    Example::

        >>> relevance_rank(torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])).tolist()
        [[[3, 0], [1, 2]]]
    """
    b, h, w = maps.shape
    order = torch.sort(maps.reshape(b, -1), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=maps.device).expand(b, -1))
    return rank.view(b, h, w)


def random_map(shape: Sequence[int], generator: Optional[torch.Generator] = None, *,
               device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform random maps of ``shape`` (B, H, W): the ``random`` baseline of a comparison.

    Example::

        >>> random_map((2, 4, 4), torch.Generator().manual_seed(0)).shape
        torch.Size([2, 4, 4])
    """
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def center_map(shape: Sequence[int], sigma: float = 0.25, *, device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A centred Gaussian, ``exp(-d^2 / (2 (sigma * size)^2))`` per axis, repeated to ``shape``
    (B, H, W): the ``center`` baseline (the centre bias of most datasets).

    Example::

        >>> m = center_map((1, 5, 5))
        >>> divmod(int(m[0].argmax()), 5)
        (2, 2)
    """
    b, h, w = (int(s) for s in shape)
    ys = (torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2) / (sigma * h)
    xs = (torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2) / (sigma * w)
    g = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return g.expand(b, h, w).clone()
