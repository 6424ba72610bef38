"""Faithfulness metrics: how well a saliency map explains a classifier's decision.

Every metric takes a batch and spends at most one forward pass of the whole batch per perturbation
step, on the device of the input ``x``. The common arguments:

- ``model_fn``: any callable ``x (B, 3, H, W) -> logits (B, C)``; an ``nn.Module`` (in the mode the
  caller chose — these functions never change it) or a plain function, for instance one that runs
  an onnxruntime session. It is called under ``torch.no_grad()``; only
  :func:`randomization_rank_corr` needs autograd (through the caller's ``explain``).
- ``x``: the model inputs, already preprocessed (normalised). Perturbation baselines are computed in
  that same space: the ``"mean"`` baseline is each image's mean per channel of ``x``, a constant
  ``0.0`` is the normalisation mean colour.
- ``maps``: (B, h, w) saliency maps, higher = more relevant; resized bilinearly to (H, W) when their
  size differs (:func:`resize_maps`). Any real scale: only their order matters, except for
  ``avg_drop`` / ``avg_increase`` (min-max normalised per image) and ``energy_in_box`` (negative
  values count as 0).
- ``targets``: class per image, (B,) ints; ``None`` takes the model's prediction on ``x``.
- scores are softmax probabilities of the target class.

The keys of :func:`compute_metrics` (the front door for the evaluation table and the batch job),
with the direction that is better:

============================ =========================================================== ========
key                          meaning                                                     better
============================ =========================================================== ========
``deletion``                 AUC of p(target) as the most relevant pixels are removed    lower
``insertion``                AUC of p(target) as the most relevant pixels are inserted   higher
``road_morf``                ROAD, most relevant removed first: mean p(after) - p(x)     lower
``road_lerf``                ROAD, least relevant removed first: mean p(after) - p(x)    higher
``avg_drop``                 Grad-CAM++ average drop, percent ``max(0, Y - O) / Y * 100`` lower
``avg_increase``             Grad-CAM++ increase in confidence, ``O > Y`` as 0/1         higher
``energy_in_box``            share of the map's mass inside the ground-truth box         higher
``pointing_game``            map's peak inside the box (0/1)                             higher
``randomization_rank_corr``  Spearman correlation of maps before/after randomising       lower
============================ =========================================================== ========

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    >>> x = torch.randn(2, 3, 16, 16)
    >>> maps = center_map((2, 16, 16))
    >>> out = compute_metrics(model, x, maps, keys=("deletion", "insertion", "avg_drop"), steps=8)
    >>> sorted(out), out["deletion"].shape
    (['avg_drop', 'deletion', 'insertion'], torch.Size([2]))
    >>> cost(("deletion", "insertion", "avg_drop"), steps=8)
    {'reference': 1, 'deletion': 8, 'insertion': 8, 'avg_drop': 1}
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from .parsing import parse_choices, short_repr

from torch import nn

log = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor], torch.Tensor]
ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Baseline = Union[str, float, torch.Tensor]
TargetsArg = Union[None, int, Sequence[int], torch.Tensor]

#: Every metric key, in table order.
METRIC_KEYS = ("deletion", "insertion", "road_morf", "road_lerf", "avg_drop", "avg_increase",
               "energy_in_box", "pointing_game", "randomization_rank_corr")
#: Keys that need nothing but the model, the images and the maps (the batch job's per-image keys).
PER_IMAGE_KEYS = ("deletion", "insertion", "road_morf", "road_lerf", "avg_drop", "avg_increase")
#: Keys that need ground-truth boxes.
BOX_KEYS = ("energy_in_box", "pointing_game")
_REFERENCE_KEYS = PER_IMAGE_KEYS + ("randomization_rank_corr",)
#: Keys where a lower value is better.
LOWER_IS_BETTER = frozenset({"deletion", "road_morf", "avg_drop", "randomization_rank_corr"})

DEFAULT_STEPS = 50
DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
DEFAULT_NOISE = 0.01
#: Relative residual at which ROAD's imputation stops: imputed values within ~1e-4 of the exact
#: solution (in input units), far below ROAD's noise of 0.01; 1e-6 gives ~1e-5 (parity tests).
DEFAULT_IMPUTE_TOL = 1e-4
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0




# ------------------------------------------------------------------------------------------------
# inputs


def _check_x(x: torch.Tensor) -> None:
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
    _check_x(x)
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


def resolve_targets(model_fn: ModelFn, x: torch.Tensor, targets: TargetsArg = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (B,) long, p (B,) softmax probability of each target on ``x``) with one forward.
    ``targets=None`` picks the predicted classes; an int applies to every image.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> resolve_targets(model, torch.ones(2, 3, 4, 4))[0].tolist()
        [0, 0]
    """
    _check_x(x)
    logits = _logits(model_fn, x)
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
    return t, _prob(logits, t)


def _logits(model_fn: ModelFn, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model_fn(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"invalid value for model_fn: expected logits of shape ({x.shape[0]}, C), "
                         f"got {got}")
    return out


def _prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, 1)
    return p.gather(1, targets.to(p.device)[:, None])[:, 0]


def _probs(model_fn: ModelFn, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _prob(_logits(model_fn, x), targets)


def _reference(model_fn: ModelFn, x: torch.Tensor, targets: TargetsArg,
               reference: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return reference if reference is not None else resolve_targets(model_fn, x, targets)


# ------------------------------------------------------------------------------------------------
# baselines and reference maps


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
    _check_x(x)
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


# ------------------------------------------------------------------------------------------------
# deletion / insertion (RISE)


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve: ``fractions`` (S+1,) of pixels changed, ``probs`` (B, S+1)
    probability of the target at each, ``auc`` (B,) trapezoidal area over ``fractions`` in [0, 1]."""

    fractions: torch.Tensor
    probs: torch.Tensor
    auc: torch.Tensor


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


def _curve(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg, *,
           steps: int, baseline: Baseline, insert: bool,
           reference: Optional[tuple[torch.Tensor, torch.Tensor]]) -> Curve:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"invalid value for steps: {short_repr(steps)} (an int >= 1)")
    m = resize_maps(maps, x)
    t, p0 = _reference(model_fn, x, targets, reference)
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
            probs.append(_probs(model_fn, img, t))
    pr = torch.stack(probs, dim=1)
    frac = torch.tensor(counts, dtype=pr.dtype, device=pr.device) / n
    auc = torch.trapezoid(pr, frac, dim=1)
    return Curve(fractions=frac, probs=pr, auc=auc)


def deletion_curve(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None,
                   *, steps: int = DEFAULT_STEPS, baseline: Baseline = "mean",
                   reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Curve:
    """Deletion (RISE, Petsiuk et al. 2018): replace the pixels by the baseline in decreasing order
    of the map, ``k * H * W // steps`` of them at step k = 0..steps, and record the target's
    softmax probability; the AUC (trapezoidal over the fraction removed, in [0, 1]) is low when the
    map ranks the decisive pixels first.

    Cost: ``steps + 1`` forward passes per image (``steps`` when ``reference``, the
    ``(targets, p)`` pair of :func:`resolve_targets`, is given).

    Example::

        >>> model = lambda t: torch.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], 1)
        >>> x = torch.zeros(1, 3, 4, 4); x[0, :, 0, 0] = 5.0
        >>> good = torch.zeros(1, 4, 4); good[0, 0, 0] = 1.0
        >>> c = deletion_curve(model, x, good, [0], steps=4, baseline=0.0)
        >>> c.probs.shape, round(float(c.auc), 3)
        (torch.Size([1, 5]), 0.562)
    """
    return _curve(model_fn, x, maps, targets, steps=steps, baseline=baseline, insert=False,
                  reference=reference)


def insertion_curve(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None,
                    *, steps: int = DEFAULT_STEPS, baseline: Baseline = "mean",
                    reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Curve:
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
    return _curve(model_fn, x, maps, targets, steps=steps, baseline=baseline, insert=True,
                  reference=reference)


def deletion(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None,
             **kwargs) -> torch.Tensor:
    """Deletion AUC (B,) of :func:`deletion_curve` (same arguments); lower is better.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> deletion(model, torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), steps=4).shape
        torch.Size([2])
    """
    return deletion_curve(model_fn, x, maps, targets, **kwargs).auc


def insertion(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None,
              **kwargs) -> torch.Tensor:
    """Insertion AUC (B,) of :func:`insertion_curve` (same arguments); higher is better.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> insertion(model, torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), steps=4).shape
        torch.Size([2])
    """
    return insertion_curve(model_fn, x, maps, targets, **kwargs).auc


# ------------------------------------------------------------------------------------------------
# ROAD (Rong et al. 2022)


def _neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the 8 neighbours of every pixel of (N, 1, H, W), zero outside the image, with
    ROAD's weights (Rong et al. 2022): 1/6 for the 4 edge neighbours, 1/12 for the 4 corners (they
    sum to 1). The kernel is ``([1, 2, 1]^T [1, 2, 1] - 4 delta) / 12``: two separable passes of
    in-place slice additions, cheaper on CPU than a 3×3 convolution in float64."""
    v = t * 2
    v[..., 1:, :] += t[..., :-1, :]
    v[..., :-1, :] += t[..., 1:, :]
    out = v * 2
    out[..., :, 1:] += v[..., :, :-1]
    out[..., :, :-1] += v[..., :, 1:]
    return out.sub_(t, alpha=4).div_(12)


_OFFSETS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
            (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


class _CoarseCorrection:
    """Two-level additive preconditioner for ROAD's system: Jacobi plus an exact solve on a coarse
    space of ``block``×``block`` aggregates (``P^T A P``, dense, Cholesky per image). It keeps
    conjugate gradients at a few tens of iterations whatever the size of the holes (plain CG needs
    hundreds for 96×96 images); with ``block`` = 1 it is a direct solve."""

    def __init__(self, mask: torch.Tensor, s: torch.Tensor, block: int) -> None:
        b, h, w = mask.shape
        self.block, self.h, self.w = block, h, w
        self.gh, self.gw = -(-h // block), -(-w // block)
        k = self.gh * self.gw
        dev = mask.device
        kid = (torch.arange(h, device=dev) // block)[:, None] * self.gw + \
              (torch.arange(w, device=dev) // block)[None, :]
        ac = torch.zeros(b, k * k, dtype=mask.dtype, device=dev)
        ac.scatter_add_(1, (kid * (k + 1)).reshape(1, -1).expand(b, -1), (s[0, 0] * mask).reshape(b, -1))
        for dy, dx, wt in _OFFSETS:
            y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
            pair = mask[:, y0:y1, x0:x1] * mask[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
            idx = kid[y0:y1, x0:x1] * k + kid[y0 + dy:y1 + dy, x0 + dx:x1 + dx]
            ac.scatter_add_(1, idx.reshape(1, -1).expand(b, -1), (-wt * pair).reshape(b, -1))
        ac = ac.view(b, k, k)
        ac = ac + torch.diag_embed((ac.diagonal(dim1=1, dim2=2) <= 0).to(ac.dtype))   # empty blocks
        chol, info = torch.linalg.cholesky_ex(ac)
        self.ok = bool((info == 0).all())
        self.inv = torch.cholesky_inverse(chol) if self.ok else None
        if not self.ok:
            log.warning("impute_linear: coarse system not positive definite; Jacobi only")

    def __call__(self, r: torch.Tensor, m: torch.Tensor, dinv: torch.Tensor) -> torch.Tensor:
        z = dinv * r
        if self.inv is None:
            return z
        n, b, bl = r.shape[0], self.inv.shape[0], self.block
        rc = F.avg_pool2d(r, bl, ceil_mode=True, divisor_override=1)
        ec = torch.bmm(self.inv, rc.reshape(b, n // b, -1).transpose(1, 2)).transpose(1, 2)
        ec = ec.reshape(n, 1, self.gh, 1, self.gw, 1).expand(n, 1, self.gh, bl, self.gw, bl)
        ec = ec.reshape(n, 1, self.gh * bl, self.gw * bl)[..., :self.h, :self.w]
        return z.addcmul_(m, ec)


def impute_linear(x: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.0,
                  generator: Optional[torch.Generator] = None, tol: float = 1e-6,
                  max_iter: int = 1000) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels (B, H, W bool) of ``x``.

    Each removed pixel becomes the weighted mean of its in-image 8 neighbours (weights 1/6 for the
    edge and 1/12 for the corner neighbours, renormalised at the border), removed neighbours being
    unknowns too: one sparse symmetric positive definite linear system per image and channel,
    solved here in float64 on the device by batched preconditioned conjugate gradients (a 3×3
    stencil, Jacobi plus a coarse-grid correction on at most 16×16 blocks) until every relative
    residual is below ``tol``; imputed values then agree with a direct sparse solve to about 1e-5.
    Then ``noise * N(0, 1)`` is added to the imputed pixels (ROAD: 0.01, in ``x``'s units; drawn
    from ``generator`` when given). Kept pixels are returned unchanged.

    Example::

        >>> x = torch.zeros(1, 1, 3, 3); x[0, 0, :, 0] = 1.0
        >>> removed = torch.zeros(1, 3, 3, dtype=torch.bool); removed[0, 1, 1] = True
        >>> round(float(impute_linear(x, removed)[0, 0, 1, 1]), 4)
        0.3333
    """
    _check_x(x)
    b, c, h, w = x.shape
    if not isinstance(removed, torch.Tensor) or removed.shape != (b, h, w):
        got = tuple(removed.shape) if isinstance(removed, torch.Tensor) else type(removed).__name__
        raise ValueError(f"invalid value for removed: expected shape {(b, h, w)}, got {got}")
    dt = torch.float64
    conv = _neighbour_sum
    xx = x.detach().to(dt).reshape(b * c, 1, h, w)
    mask = removed.to(device=x.device, dtype=dt)
    m = mask[:, None].expand(b, c, h, w).reshape(b * c, 1, h, w)
    s = conv(torch.ones(1, 1, h, w, dtype=dt, device=x.device))   # in-image neighbour weights
    dinv = m / s
    prec = _CoarseCorrection(mask, s, block=-(-max(h, w) // 16))
    rhs = m * conv(xx * (1 - m))
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    z = prec(r, m, dinv)
    p = z.clone()
    rz = (r * z).sum((1, 2, 3), keepdim=True)
    scale = (rhs * rhs).sum((1, 2, 3), keepdim=True).clamp_min(1e-300)
    tiny = torch.finfo(dt).tiny
    for it in range(1, max_iter + 1):
        ap = conv(p).sub_(s * p).mul_(m).neg_()                  # A p = m (s p - N p)
        alpha = rz / (p * ap).sum((1, 2, 3), keepdim=True).clamp_min(tiny)
        u.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        if it % 5 == 0 and bool((((r * r).sum((1, 2, 3), keepdim=True) / scale).max().sqrt() < tol)):
            break
        z = prec(r, m, dinv)
        rz_new = (r * z).sum((1, 2, 3), keepdim=True)
        p = z.addcmul_(rz_new / rz.clamp_min(tiny), p)
        rz = rz_new
    else:
        log.warning("impute_linear: no convergence to %g in %d iterations", tol, max_iter)
    out = xx * (1 - m) + u
    if noise:
        eps = torch.randn(out.shape, generator=generator, dtype=dt,
                          device="cpu" if generator is None else generator.device).to(x.device)
        out = out + m * noise * eps
    return out.reshape(b, c, h, w).to(x.dtype)


def road_masks(maps: torch.Tensor, percent: float, order: str) -> torch.Tensor:
    """Pixels ROAD removes at ``percent`` % (B, H, W bool): the ``k = floor((N - 1) * percent /
    100) + 1`` first of the N pixels in the map's order, most relevant first for ``"morf"``, least
    relevant first for ``"lerf"``, ties in raster order (:func:`relevance_rank`).

    ``k`` is the number of values at or above ``numpy.percentile(map, 100 - percent)``, the
    threshold pytorch-grad-cam uses (its ``ROADMostRelevantFirst(q)`` removes ``percent = 100 - q``
    here), so both remove the same pixels when no tie straddles the threshold. With ties (the zeros
    of a ReLU'd CAM) that threshold removes every tied pixel — up to the whole image, a singular
    imputation — while here exactly ``k`` are removed.

    Example::

        >>> m = torch.arange(10.).view(1, 2, 5)
        >>> road_masks(m, 20, "morf").sum().item(), road_masks(m, 20, "lerf")[0, 0, :2].tolist()
        (2, [True, True])
        >>> road_masks(torch.zeros(1, 4, 5), 90, "morf").sum().item()
        18
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"invalid value for order: {short_repr(order)} (allowed: 'morf', 'lerf')")
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent < 100:
        raise ValueError(f"invalid value for percentile: {short_repr(percent)} (0 < p < 100)")
    n = maps.shape[-2] * maps.shape[-1]
    k = math.floor((n - 1) * percent / 100) + 1
    return relevance_rank(maps if order == "morf" else -maps) < k


@dataclass(frozen=True)
class RoadResult:
    """ROAD at several percentiles: ``percentiles`` (% of pixels removed), ``probs`` (B, P) target
    probability after imputation, ``reference`` (B,) on the intact image, and ``score`` (B,) the
    mean over percentiles of ``probs - reference`` (pytorch-grad-cam's ``return_diff`` score)."""

    order: str
    percentiles: tuple[float, ...]
    probs: torch.Tensor
    reference: torch.Tensor
    score: torch.Tensor


def road(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None, *,
         order: str = "morf", percentiles: Sequence[float] = DEFAULT_PERCENTILES,
         noise: float = DEFAULT_NOISE, generator: Optional[torch.Generator] = None,
         tol: float = DEFAULT_IMPUTE_TOL,
         reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> RoadResult:
    """ROAD, RemOve And Debias (Rong et al. 2022): for each percentile, remove that percent of the
    pixels (:func:`road_masks`: most relevant first for ``"morf"``, least relevant first for
    ``"lerf"``), fill them by :func:`impute_linear` with ``noise``, and score the target's softmax
    probability against the intact image's. MoRF: a faithful map makes the probability fall
    (lower is better); LeRF: it keeps it (higher is better).

    Parity: equals pytorch-grad-cam 1.5.7's ``PerturbationConfidenceMetric(RemoveMostRelevantFirst(
    100 - p, NoisyLinearImputer(noise=0)))`` with ``ClassifierOutputSoftmaxTarget`` (and the LeRF
    pair) to 1e-5 in probability with noise 0 and ``tol=1e-6`` (``tol``: see :func:`impute_linear`;
    the default 1e-4 saves a third of the iterations) for maps without ties at the thresholds (its sparse
    direct solve vs conjugate gradients here; tested); with noise the two differ by their random
    draws; with ties see :func:`road_masks` (pytorch-grad-cam may then remove the whole image).

    Cost: ``len(percentiles) + 1`` forward passes per image (``len(percentiles)`` with
    ``reference``) plus the imputation: a few tens of preconditioned conjugate-gradient steps (a
    3×3 stencil over the batch in float64) per percentile, which dominates the cost on CPU.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> res = road(model, torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), percentiles=(20, 80))
        >>> res.probs.shape, res.score.shape
        (torch.Size([2, 2]), torch.Size([2]))
    """
    m = resize_maps(maps, x)
    pcts = tuple(float(p) for p in percentiles)
    if not pcts:
        raise ValueError("invalid value for percentiles: empty (give values in (0, 100))")
    t, p0 = _reference(model_fn, x, targets, reference)
    probs = []
    for pct in pcts:
        removed = road_masks(m, pct, order)
        img = impute_linear(x, removed, noise=noise, generator=generator, tol=tol)
        probs.append(_probs(model_fn, img, t))
    pr = torch.stack(probs, dim=1)
    return RoadResult(order=order, percentiles=pcts, probs=pr, reference=p0,
                      score=(pr - p0[:, None]).mean(dim=1))


# ------------------------------------------------------------------------------------------------
# average drop / increase in confidence (Grad-CAM++)


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


def confidence_change(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None,
                      *, reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> ConfidenceChange:
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
    t, y = _reference(model_fn, x, targets, reference)
    o = _probs(model_fn, x * m[:, None], t)
    drop = (y - o).clamp_min(0) / y.clamp_min(torch.finfo(y.dtype).tiny) * 100
    return ConfidenceChange(drop=drop, increase=(o > y).to(y.dtype))


def avg_drop(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None,
             **kwargs) -> torch.Tensor:
    """Per-image drop in percent (B,) of :func:`confidence_change`; its mean is the average drop.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> avg_drop(model, torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8)).tolist()
        [0.0, 0.0]
    """
    return confidence_change(model_fn, x, maps, targets, **kwargs).drop


def avg_increase(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None,
                 **kwargs) -> torch.Tensor:
    """Per-image increase indicator (B,) of :func:`confidence_change`; its mean is the fraction.

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> avg_increase(model, torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8)).tolist()
        [0.0, 0.0]
    """
    return confidence_change(model_fn, x, maps, targets, **kwargs).increase


# ------------------------------------------------------------------------------------------------
# localisation against ground-truth boxes


def _boxes(boxes: object, b: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(boxes, device=device)
    if t.shape != (b, 4) or t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"invalid value for boxes: expected ({b}, 4) [x0, y0, x1, y1] per image, got "
                         f"shape {tuple(t.shape)}")
    return t


def _box_grid(boxes: torch.Tensor, h: int, w: int, grow: float = 0) -> torch.Tensor:
    ys = torch.arange(h, device=boxes.device)[None, :, None]
    xs = torch.arange(w, device=boxes.device)[None, None, :]
    bx = boxes[:, :, None, None]
    return (xs >= bx[:, 0] - grow) & (xs < bx[:, 2] + grow) & (ys >= bx[:, 1] - grow) & (ys < bx[:, 3] + grow)


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
    if maps.dim() != 3:
        raise ValueError(f"invalid value for maps: expected (B, H, W), got {tuple(maps.shape)}")
    b, h, w = maps.shape
    inside = _box_grid(_boxes(boxes, b, maps.device), h, w)
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
    if maps.dim() != 3:
        raise ValueError(f"invalid value for maps: expected (B, H, W), got {tuple(maps.shape)}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"invalid value for tolerance: {short_repr(tolerance)} (an int >= 0)")
    b, h, w = maps.shape
    bx = _boxes(boxes, b, maps.device)
    peak = maps.reshape(b, -1).argmax(dim=1)
    ys, xs = peak // w, peak % w
    hit = (xs >= bx[:, 0] - tolerance) & (xs < bx[:, 2] + tolerance) & \
          (ys >= bx[:, 1] - tolerance) & (ys < bx[:, 3] + tolerance)
    return hit.to(maps.dtype if maps.is_floating_point() else torch.float32)


# ------------------------------------------------------------------------------------------------
# model-parameter randomisation (Adebayo et al. 2018)


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks of each row of (B, N), ties sharing their mean rank (as scipy's rankdata)."""
    b, n = v.shape
    sv, order = torch.sort(v, dim=1, stable=True)
    new = torch.ones_like(sv, dtype=torch.bool)
    new[:, 1:] = sv[:, 1:] != sv[:, :-1]
    group = torch.cumsum(new.to(torch.long), dim=1) - 1 + torch.arange(b, device=v.device)[:, None] * n
    pos = torch.arange(n, dtype=torch.float64, device=v.device).expand(b, n).reshape(-1)
    sums = torch.zeros(b * n, dtype=torch.float64, device=v.device).index_add_(0, group.reshape(-1), pos)
    counts = torch.zeros(b * n, dtype=torch.float64, device=v.device).index_add_(
        0, group.reshape(-1), torch.ones_like(pos))
    mean_rank = (sums / counts.clamp_min(1))[group.reshape(-1)].view(b, n)
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(1, order, mean_rank)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of rows (B, ...) -> (B,) float64, ties at their mean
    rank. Identical rows give exactly 1; a row with no rank variation (a constant map) gives 0.

    Example::

        >>> a = torch.tensor([[1., 2., 3., 4.]])
        >>> spearman(a, a).item(), round(spearman(a, -a).item(), 6), spearman(a, torch.zeros(1, 4)).item()
        (1.0, -1.0, 0.0)
    """
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"invalid shapes for spearman: {tuple(a.shape)} and {tuple(b.shape)} "
                         f"(equal, (B, ...))")
    ra = _average_ranks(a.reshape(a.shape[0], -1).to(torch.float64))
    rb = _average_ranks(b.reshape(b.shape[0], -1).to(torch.float64))
    da = ra - ra.mean(dim=1, keepdim=True)
    db = rb - rb.mean(dim=1, keepdim=True)
    den = (da * da).sum(1).sqrt() * (db * db).sum(1).sqrt()
    r = torch.where(den > 0, (da * db).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))
    r = r.clamp(-1.0, 1.0)
    return torch.where((ra == rb).all(dim=1) & (den > 0), torch.ones_like(r), r)


def parameterised_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, in registration order (the last ones are
    the top of the network for sequential models).

    Example::

        >>> parameterised_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)))
        ['0', '2']
    """
    return [name for name, mod in model.named_modules()
            if any(True for _ in mod.parameters(recurse=False))]


def randomize_top_layers(model: nn.Module, top_k: int, *, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose last ``top_k`` parameterised layers
    (:func:`parameterised_layers`) are re-initialised: ``reset_parameters()`` where the module has
    it (PyTorch's own random init; batch norm layers go back to identity), otherwise each parameter
    is redrawn from a normal distribution with its own mean and standard deviation. Seeded;
    the original is untouched. ``top_k=0`` gives an identical copy (the control).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> r = randomize_top_layers(net, 1)
        >>> torch.equal(r[0].weight, net[0].weight), torch.equal(r[1].weight, net[1].weight)
        (True, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"invalid value for model: expected an nn.Module, got {type(model).__name__}")
    names = parameterised_layers(model)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= len(names):
        raise ValueError(f"invalid value for top_k: {short_repr(top_k)} (0..{len(names)}, the model's "
                         f"parameterised layers)")
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    chosen = names[len(names) - top_k:]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name in chosen:
            mod = modules[name]
            if callable(getattr(mod, "reset_parameters", None)):
                mod.reset_parameters()
            else:
                for p in mod.parameters(recurse=False):
                    std = float(p.std()) if p.numel() > 1 else 1.0
                    p.copy_(torch.randn(p.shape, dtype=p.dtype).to(p.device) * std + float(p.mean()))
            if callable(getattr(mod, "reset_running_stats", None)):
                mod.reset_running_stats()
    log.debug("randomised layers %s", chosen)
    return clone


def randomization_rank_corr(model: nn.Module, x: torch.Tensor, targets: TargetsArg,
                            explain: ExplainFn, *, top_k: int = 1, seed: int = 0,
                            maps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Model-parameter randomisation test (Adebayo et al. 2018): explain ``x`` with ``model`` and
    with :func:`randomize_top_layers` ``(model, top_k)``, and return the per-image Spearman rank
    correlation (B,) of the two maps (:func:`spearman`, both at the larger map size). A method
    that depends on the model decorrelates: lower is better; ``top_k=0`` gives exactly 1.

    ``explain(model, x, targets) -> maps (B, h, w)`` supplies the method, for example
    ``lambda m, x, t: CamEngine(m, "features")(x, t).cams``; it runs with autograd enabled.
    ``targets`` must be explicit class indices, so both models explain the same class.
    ``maps``: the original model's maps when already computed.

    Cost: 2 explanations per image (1 with ``maps``), each one forward and one backward for the
    CAM methods, plus a deep copy of the model.

    Example::

        >>> from camserve import CamEngine
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
        >>> explain = lambda m, x, t: CamEngine(m, "2")(x, t).cams
        >>> x = torch.randn(2, 3, 16, 16)
        >>> randomization_rank_corr(net, x, [0, 1], explain, top_k=0).tolist()
        [1.0, 1.0]
    """
    _check_x(x)
    if targets is None:
        raise ValueError("invalid value for targets: None (give the class indices, so the original "
                         "and the randomised model explain the same classes)")
    t = torch.as_tensor(targets, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    rnd = randomize_top_layers(model, top_k, seed=seed)
    before = explain(model, x, t) if maps is None else maps
    after = explain(rnd, x, t)
    before, after = before.detach(), after.detach().to(before.device)
    if before.dim() != 3 or after.dim() != 3 or before.shape[0] != after.shape[0]:
        raise ValueError(f"invalid maps from explain: expected (B, h, w) twice, got "
                         f"{tuple(before.shape)} and {tuple(after.shape)}")
    size = max(tuple(before.shape[-2:]), tuple(after.shape[-2:]))
    if tuple(before.shape[-2:]) != size:
        before = F.interpolate(before[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]
    if tuple(after.shape[-2:]) != size:
        after = F.interpolate(after[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return spearman(before, after)


# ------------------------------------------------------------------------------------------------
# front door


def check_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """Metric keys (a list or a comma-separated string) checked against :data:`METRIC_KEYS`."""
    return parse_choices(keys if isinstance(keys, str) else list(keys), METRIC_KEYS, key="keys",
                         normalize=str.strip)


def cost(keys: Iterable[str], *, steps: int = DEFAULT_STEPS,
         percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, int]:
    """Forward passes per image that :func:`compute_metrics` spends for ``keys``: one shared
    ``reference`` pass on the intact images (when any model-based key is asked), then per key
    (``deletion``/``insertion``: ``steps``; ``road_*``: ``len(percentiles)``; ``avg_drop`` and
    ``avg_increase`` together: 1; box keys: 0; ``randomization_rank_corr``: 1, the explanation by
    the randomised copy, one forward plus one backward for CAM methods — the original model's
    explanation is the ``maps`` given). Accepts a comma-separated string too.

    Example::

        >>> c = cost("deletion,road_morf,avg_drop,avg_increase,pointing_game", steps=20)
        >>> c, sum(c.values())
        ({'reference': 1, 'deletion': 20, 'road_morf': 9, 'avg_drop': 1, 'avg_increase': 0, 'pointing_game': 0}, 31)
    """
    ks = check_keys(keys)
    out: dict[str, int] = {}
    if any(k in _REFERENCE_KEYS for k in ks):
        out["reference"] = 1
    confidence_counted = False
    for k in ks:
        if k in ("deletion", "insertion"):
            out[k] = steps
        elif k in ("road_morf", "road_lerf"):
            out[k] = len(tuple(percentiles))
        elif k in ("avg_drop", "avg_increase"):
            out[k] = 0 if confidence_counted else 1
            confidence_counted = True
        elif k in BOX_KEYS:
            out[k] = 0
        else:
            out[k] = 1
    return out


def compute_metrics(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg = None,
                    keys: Iterable[str] = PER_IMAGE_KEYS, boxes: object = None, *,
                    steps: int = DEFAULT_STEPS, baseline: Baseline = "mean",
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES, noise: float = DEFAULT_NOISE,
                    generator: Optional[torch.Generator] = None, impute_tol: float = DEFAULT_IMPUTE_TOL,
                    tolerance: int = 0,
                    explain: Optional[ExplainFn] = None, top_k: int = 1, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """The metrics named in ``keys`` (any of :data:`METRIC_KEYS`, or a comma-separated string) for
    a batch, as ``{key: tensor (B,)}`` on ``x``'s device, in the order of ``keys``; average with
    ``.mean()`` (``avg_increase``'s mean is the fraction with an increase). One reference forward
    on ``x`` is shared by all model-based keys (``targets=None`` explains the predicted classes);
    :func:`cost` gives the forward passes per image.

    Settings: ``steps``/``baseline`` for deletion and insertion; ``percentiles`` (% removed),
    ``noise``, ``generator``, ``impute_tol`` for ROAD; ``boxes`` (B, 4) in input pixels and ``tolerance`` for the
    box keys (the maps are resized to the input size first); ``explain``, ``top_k``, ``seed`` for
    ``randomization_rank_corr`` (``model_fn`` must then be an ``nn.Module``, and ``maps`` must be
    ``explain``'s maps for it: they are compared with ``explain`` on the randomised copy).

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> x = torch.rand(2, 3, 8, 8)
        >>> out = compute_metrics(model, x, torch.rand(2, 4, 4), keys="road_morf,pointing_game",
        ...                       boxes=[[0, 0, 8, 8], [0, 0, 1, 1]], percentiles=(50,))
        >>> list(out), out["road_morf"].shape
        (['road_morf', 'pointing_game'], torch.Size([2]))
    """
    ks = check_keys(keys)
    m = resize_maps(maps, x)
    if any(k in BOX_KEYS for k in ks) and boxes is None:
        raise ValueError(f"invalid value for boxes: None, but {', '.join(k for k in ks if k in BOX_KEYS)} "
                         f"need(s) one ground-truth box per image")
    ref = resolve_targets(model_fn, x, targets) if any(k in _REFERENCE_KEYS for k in ks) else None
    out: dict[str, torch.Tensor] = {}
    change: Optional[ConfidenceChange] = None
    for k in ks:
        if k in ("deletion", "insertion"):
            curve = _curve(model_fn, x, m, None, steps=steps, baseline=baseline,
                           insert=k == "insertion", reference=ref)
            out[k] = curve.auc
        elif k in ("road_morf", "road_lerf"):
            out[k] = road(model_fn, x, m, None, order=k[5:], percentiles=percentiles, noise=noise,
                          generator=generator, tol=impute_tol, reference=ref).score
        elif k in ("avg_drop", "avg_increase"):
            if change is None:
                change = confidence_change(model_fn, x, m, None, reference=ref)
            out[k] = change.drop if k == "avg_drop" else change.increase
        elif k == "energy_in_box":
            out[k] = energy_in_box(m, boxes)
        elif k == "pointing_game":
            out[k] = pointing_game(m, boxes, tolerance)
        else:
            out[k] = _randomization(model_fn, x, maps, targets, ref, explain, top_k, seed)
    return out


def _randomization(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: TargetsArg,
                   ref: Optional[tuple[torch.Tensor, torch.Tensor]], explain: Optional[ExplainFn],
                   top_k: int, seed: int) -> torch.Tensor:
    if not isinstance(model_fn, nn.Module) or explain is None:
        raise ValueError("randomization_rank_corr needs model_fn to be an nn.Module and an "
                         "explain(model, x, targets) -> maps callable")
    t = ref[0] if ref is not None else resolve_targets(model_fn, x, targets)[0]
    return randomization_rank_corr(model_fn, x, t, explain, top_k=top_k, seed=seed,
                                   maps=maps).to(x.device)


def summarize(per_image: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Means of :func:`compute_metrics`' per-image values as plain floats (NaN-free input assumed).

    Example::

        >>> summarize({"deletion": torch.tensor([0.25, 0.75])})
        {'deletion': 0.5}
    """
    return {k: float(v.double().mean()) for k, v in per_image.items()}
