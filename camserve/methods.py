"""Registry of CAM methods: pure torch functions of (activations, gradients).

Every method has the signature ``f(A, G) -> cam`` where

* ``A`` is the target layer's activation, shape ``(..., C, h, w)``;
* ``G`` is d score / d A, the same shape as ``A`` or broadcastable against it (the engine passes
  ``A`` as ``(B, 1, C, h, w)`` and ``G`` as ``(B, K, C, h, w)`` for K targets per row);
* the result is ``(..., h, w)``: post-ReLU and not normalised.

Only negative dimensions are used, so the same function serves a batch, a batch of targets, and the
ONNX exporter, which traces these very functions into the graph. The formulas follow
pytorch-grad-cam 1.5.x (GradCAM, GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM).

Example::

    >>> import torch
    >>> from camserve.methods import get_method
    >>> A = torch.rand(2, 8, 7, 7); G = torch.randn(2, 8, 7, 7)
    >>> get_method("gradcam")(A, G).shape
    torch.Size([2, 7, 7])
"""
from __future__ import annotations

from typing import Callable

import torch

CamMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_REGISTRY: dict[str, CamMethod] = {}

_SPATIAL = (-2, -1)
_CHANNEL = -3


def register_method(name: str) -> Callable[[CamMethod], CamMethod]:
    """Decorator: register ``fn(A, G) -> cam`` under ``name`` (lower case)."""

    def deco(fn: CamMethod) -> CamMethod:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"invalid value for name: {name!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return deco


def available_methods() -> list[str]:
    """Names of the registered CAM methods, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> CamMethod:
    """The method registered under ``name``; ValueError listing the known names otherwise."""
    key = str(name).lower()
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ValueError(
            f"invalid value for method: {name!r} (known: {', '.join(available_methods())})"
        ) from None


def _weighted_sum(weights: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """relu(sum_k w_k * A_k) over the channel dimension."""
    return torch.relu((weights * A).sum(dim=_CHANNEL))


@register_method("gradcam")
def gradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""Grad-CAM: :math:`\mathrm{ReLU}(\sum_k \bar{G}_k A_k)`, :math:`\bar{G}_k` the spatial mean of
    :math:`G_k` (Selvaraju et al., 2017)."""
    return _weighted_sum(G.mean(dim=_SPATIAL, keepdim=True), A)


@register_method("gradcam++")
def gradcam_plus_plus(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""Grad-CAM++: weights :math:`w_k = \sum_{ij} \mathrm{ReLU}(G_{kij})\,\alpha_{kij}` with
    :math:`\alpha = G^2 / (2G^2 + \sum_{ij} A_k \cdot G^3 + \epsilon)`, :math:`\alpha=0` where
    :math:`G=0` (Chattopadhyay et al., 2018; :math:`\epsilon=10^{-6}`)."""
    g2 = G * G
    g3 = g2 * G
    sum_a = A.sum(dim=_SPATIAL, keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = torch.where(G != 0, alpha, torch.zeros_like(alpha))
    weights = (torch.relu(G) * alpha).sum(dim=_SPATIAL, keepdim=True)
    return _weighted_sum(weights, A)


@register_method("hirescam")
def hirescam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""HiResCAM: :math:`\mathrm{ReLU}(\sum_k G_k \odot A_k)` (Draelos & Carin, 2020)."""
    return torch.relu((G * A).sum(dim=_CHANNEL))


@register_method("xgradcam")
def xgradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""XGrad-CAM: weights :math:`w_k = \sum_{ij} G_{kij} A_{kij} / (\sum_{ij} A_{kij} + \epsilon)`
    (Fu et al., 2020; :math:`\epsilon=10^{-7}`)."""
    sum_a = A.sum(dim=_SPATIAL, keepdim=True)
    weights = (G * A / (sum_a + 1e-7)).sum(dim=_SPATIAL, keepdim=True)
    return _weighted_sum(weights, A)


@register_method("layercam")
def layercam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""LayerCAM: :math:`\mathrm{ReLU}(\sum_k \mathrm{ReLU}(G_k) \odot A_k)` (Jiang et al., 2021)."""
    return torch.relu((torch.relu(G) * A).sum(dim=_CHANNEL))
