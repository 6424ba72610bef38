"""Methods with work of their own beyond one backward: ShapleyCAM, FullGrad, FinerCAM,
SmoothGrad-CAM++.

* ShapleyCAM (Cai, 2025; pytorch-grad-cam): channel weights the spatial mean of
  :math:`G - \\tfrac12 H A` (H the Hessian of the score in the activations: one more backward
  through the first one's graph per target).
* FullGrad (Srinivas & Fleuret, 2019; pytorch-grad-cam): every Conv2d / BatchNorm2d with a bias
  (BatchNorm's folded bias), :math:`|b \\odot \\partial s / \\partial z|` per channel normalised,
  upsampled and summed, plus :math:`|x \\odot \\partial s / \\partial x|`: a backward to the input;
  the map is at the input's resolution and ignores the target layer.
* FinerCAM (Zhang et al., 2025; pytorch-grad-cam): a gradient method (``base``) on the score
  :math:`\\sum_j p_j (s_t - \\alpha s_j) / \\sum_j p_j` against the ``comparisons`` classes whose
  logits are closest to the target's (:math:`p` the softmax): tasks whose output is one score
  vector per row.
* SmoothGrad-CAM++ (Omeiza et al., 2019): Grad-CAM++ weights from the first three derivatives
  averaged over ``samples`` noisy copies of the input (``std``, ``seed``), combined with the
  clean activations.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .gradient import SPATIAL
from .registry import (EIGEN_SMOOTH, SIGN, Cost, LayerSize, Option, float_in, get_method, int_in,
                       one_of, register_method)

if TYPE_CHECKING:
    from ..engine import CamContext


def reduce_terms(terms: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    """ReLU of the channel sum of ``terms`` (..., C, h, w), or of their first principal
    component with ``eigen_smooth``."""
    if options.get("eigen_smooth"):
        from .projection import principal_projection
        return torch.relu(principal_projection(terms, options.get("sign", "max")))
    return torch.relu(terms.sum(dim=-3))


def _hvp_cost(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
    return Cost(backwards=float(k), hvp=float(k))


@register_method("shapleycam", needs=("activations", "gradients", "hvp"), cost=_hvp_cost,
                 options=(EIGEN_SMOOTH, SIGN))
def shapleycam(ctx: "CamContext") -> torch.Tensor:
    r"""ShapleyCAM: :math:`\mathrm{ReLU}(\sum_k w_k A_k)` with :math:`w_k` the spatial mean of
    :math:`G_k - \frac12 (\nabla^2 s\, A)_k` (Cai, 2025)."""
    G, HA = ctx.hvp()
    w = (G - 0.5 * HA).mean(dim=SPATIAL, keepdim=True)
    return reduce_terms(w * ctx.activations[:, None], ctx.options)


def bias_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """FullGrad's layers: Conv2d and BatchNorm2d modules (exactly those types) with a bias."""
    return [(n, m) for n, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.BatchNorm2d) and getattr(m, "bias", None) is not None]


def folded_bias(m: nn.Module) -> torch.Tensor:
    """A layer's bias; BatchNorm's with its running statistics folded in."""
    if isinstance(m, nn.BatchNorm2d):
        return -(m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)) + m.bias
    return m.bias


def _normalise_eps(t: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's per-map scaling: ``t - min``, divided by ``1e-7 + max``."""
    t = t - t.flatten(-2).amin(dim=-1)[..., None, None]
    return t / (1e-7 + t.flatten(-2).amax(dim=-1)[..., None, None])


def _fullgrad_cost(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
    return Cost(forwards=1.0, full_backwards=float(k))


@register_method("fullgrad", needs=("layers", "gradients"), cost=_fullgrad_cost, input_resolution=True)
def fullgrad(ctx: "CamContext") -> torch.Tensor:
    r"""FullGrad: :math:`|x \odot \nabla_x s| + \sum_{\ell} \sum_c \mathrm{norm}(|b_c
    \nabla_{z_c} s|)` over every biased Conv2d / BatchNorm2d (Srinivas & Fleuret, 2019)."""
    from contextlib import ExitStack

    from ..layers import capture_layer

    model = ctx.engine.model
    layers = bias_layers(model)
    x = ctx.x.detach().clone().requires_grad_(True)
    size = tuple(int(s) for s in x.shape[-2:])
    with ExitStack() as stack:
        caps = [stack.enter_context(capture_layer(model, m, "record")) for _, m in layers]
        with torch.enable_grad():
            out = ctx.task.output(model(x))
    outs = [c.output for c in caps]
    scores = ctx.task.scores(out, ctx.targets)
    maps = []
    for k in range(scores.shape[1]):
        grads = torch.autograd.grad(scores[:, k].sum(), [x] + outs, retain_graph=True,
                                    allow_unused=True)
        gx = grads[0]
        total = _normalise_eps((x.detach() * gx).abs()).sum(dim=1)  # (R, H, W)
        for (_, m), g in zip(layers, grads[1:]):
            if g is None:
                continue
            b = folded_bias(m).detach().to(g.dtype)
            t = _normalise_eps((b[None, :, None, None] * g).abs()).sum(dim=1, keepdim=True)
            if tuple(t.shape[-2:]) != size:
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            total = total + t[:, 0]
        maps.append(total)
    return torch.stack(maps, dim=1).detach()


def finer_scores(out: torch.Tensor, index: torch.Tensor, comparisons: int, alpha: float) -> torch.Tensor:
    """(R, K) FinerCAM scores of logits ``out`` (R, classes) for target classes ``index``
    (R, K): the target against the ``comparisons`` classes whose logits are nearest to its own."""
    n = out.shape[1]
    k = min(int(comparisons), max(n - 1, 0))
    t = out.gather(1, index)  # (R, K)
    dist = (out.detach()[:, None, :] - t.detach()[:, :, None]).abs()  # (R, K, n)
    order = dist.argsort(dim=-1, stable=True)[..., 1:1 + k]  # (R, K, k)
    prob = torch.softmax(out, dim=-1)
    p = prob[:, None, :].expand(-1, index.shape[1], -1).gather(2, order)
    s = out[:, None, :].expand(-1, index.shape[1], -1).gather(2, order)
    return (p * (t[:, :, None] - alpha * s)).sum(-1) / (p.sum(-1) + 1e-9)


def _finer_cost(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
    return Cost(backwards=float(k))


def _gradient_bases() -> tuple[str, ...]:
    return ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "gradcamelementwise")


@register_method("finercam", needs=("activations", "gradients", "scores"), cost=_finer_cost,
                 options=(EIGEN_SMOOTH, SIGN,
                          Option("base", "gradcam", one_of(*_gradient_bases()), "the gradient method"),
                          Option("alpha", 1.0, float_in(0.0, 100.0), "weight of the compared scores"),
                          Option("comparisons", 3, int_in(1, 64), "classes compared with the target")))
def finercam(ctx: "CamContext") -> torch.Tensor:
    r"""FinerCAM: a gradient method on :math:`\sum_j p_j (s_t - \alpha s_j) / \sum_j p_j` over the
    classes nearest to the target (Zhang et al., 2025)."""
    out = ctx.output
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"method 'finercam' needs one score vector per row; the "
                         f"{ctx.task.name} task's output is not one")
    o = ctx.options
    scores = finer_scores(out, ctx.targets.index.to(out.device), o["comparisons"], o["alpha"])
    G = ctx.gradients_of(scores)
    base = get_method(o["base"])
    return base.apply(ctx.activations[:, None], G, {"eigen_smooth": o["eigen_smooth"], "sign": o["sign"]})


def _smooth_cost(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
    n = float(options["samples"])
    return Cost(forwards=n, backwards=n * k)


@register_method("smoothgradcam++", needs=("activations", "gradients", "forward"), cost=_smooth_cost,
                 options=(Option("samples", 4, int_in(1, 1000), "noisy copies of the input"),
                          Option("std", 0.3, float_in(0.0, 1e3), "standard deviation of the input noise"),
                          Option("seed", 0, int_in(0, 2**63 - 1), "seed of the noise")))
def smoothgradcam_pp(ctx: "CamContext") -> torch.Tensor:
    r"""SmoothGrad-CAM++: Grad-CAM++ with :math:`D^{(p)} = \frac1n \sum_m G_m^p` over noisy
    inputs, :math:`\alpha = D^{(2)} / (2 D^{(2)} + \sum_{ab} A_{ab} D^{(3)} + \epsilon)`,
    :math:`w = \sum_{ij} \alpha\, \mathrm{ReLU}(D^{(1)})` (Omeiza et al., 2019; :math:`\epsilon=10^{-8}`)."""
    o = ctx.options
    gen = torch.Generator().manual_seed(int(o["seed"]))
    n = int(o["samples"])
    x = ctx.x
    d1 = d2 = d3 = None
    for _ in range(n):
        noise = torch.randn(x.shape, generator=gen) * float(o["std"])
        G = ctx.gradients_at(x + noise.to(device=x.device, dtype=x.dtype))
        g2 = G * G
        d1, d2, d3 = (G, g2, g2 * G) if d1 is None else (d1 + G, d2 + g2, d3 + g2 * G)
    assert d1 is not None and d2 is not None and d3 is not None
    d1, d2, d3 = d1 / n, d2 / n, d3 / n
    A = ctx.activations[:, None]
    alpha = d2 / (2 * d2 + A.sum(dim=SPATIAL, keepdim=True) * d3 + 1e-8)
    w = (alpha * torch.relu(d1)).sum(dim=SPATIAL, keepdim=True)
    return torch.relu((w * A).sum(dim=-3))
