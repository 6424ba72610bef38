"""ROAD, RemOve And Debias (Rong et al. 2022): remove a share of the pixels in the map's order,
fill them by noisy linear imputation (so the model sees no holes), and score the target's
probability against the intact image's (MoRF: lower is better; LeRF: higher is better).

* :func:`road` — the score at several percentiles (:class:`RoadResult`);
* :func:`road_masks` — the pixels removed at a percentile;
* :func:`impute_linear` — the imputation: one sparse linear system per image and channel, solved
  on the device by preconditioned conjugate gradients.

Protocol, parity with pytorch-grad-cam and costs: docs/metrics.md.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..parsing import short_repr
from .base import (ClassTargets, ModelFn, Reference, check_x, ensure_reference, relevance_rank,
                   resize_maps, target_probs)

log = logging.getLogger(__name__)

DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
DEFAULT_NOISE = 0.01
#: Relative residual at which ROAD's imputation stops: imputed values within ~1e-4 of the exact
#: solution (in input units), far below ROAD's noise of 0.01; 1e-6 gives ~1e-5 (parity tests).
DEFAULT_IMPUTE_TOL = 1e-4


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


def _conjugate_gradients(apply_a: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                         precondition: Callable[[torch.Tensor], torch.Tensor], tol: float,
                         max_iter: int) -> torch.Tensor:
    """Solve ``A u = rhs`` for every (N, 1, H, W) system of the batch at once by preconditioned
    conjugate gradients, until every relative residual is below ``tol`` (checked every 5 steps);
    a warning when ``max_iter`` steps do not get there."""
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum((1, 2, 3), keepdim=True)
    scale = (rhs * rhs).sum((1, 2, 3), keepdim=True).clamp_min(1e-300)
    tiny = torch.finfo(rhs.dtype).tiny
    for it in range(1, max_iter + 1):
        ap = apply_a(p)
        alpha = rz / (p * ap).sum((1, 2, 3), keepdim=True).clamp_min(tiny)
        u.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        if it % 5 == 0 and bool((((r * r).sum((1, 2, 3), keepdim=True) / scale).max().sqrt() < tol)):
            break
        z = precondition(r)
        rz_new = (r * z).sum((1, 2, 3), keepdim=True)
        p = z.addcmul_(rz_new / rz.clamp_min(tiny), p)
        rz = rz_new
    else:
        log.warning("impute_linear: no convergence to %g in %d iterations", tol, max_iter)
    return u


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
    check_x(x)
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
    u = _conjugate_gradients(lambda p: conv(p).sub_(s * p).mul_(m).neg_(),  # A p = m (s p - N p)
                             rhs, lambda r: prec(r, m, dinv), tol, max_iter)
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


def road(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None, *,
         order: str = "morf", percentiles: Sequence[float] = DEFAULT_PERCENTILES,
         noise: float = DEFAULT_NOISE, generator: Optional[torch.Generator] = None,
         tol: float = DEFAULT_IMPUTE_TOL,
         reference: Optional[Reference] = None) -> RoadResult:
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
    t, p0 = ensure_reference(model_fn, x, targets, reference)
    probs = []
    for pct in pcts:
        removed = road_masks(m, pct, order)
        img = impute_linear(x, removed, noise=noise, generator=generator, tol=tol)
        probs.append(target_probs(model_fn, img, t))
    pr = torch.stack(probs, dim=1)
    return RoadResult(order=order, percentiles=pcts, probs=pr, reference=p0,
                      score=(pr - p0[:, None]).mean(dim=1))
