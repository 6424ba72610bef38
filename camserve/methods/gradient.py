"""Pure gradient methods: functions of the layer's activations ``A`` and gradients ``G``.

Each is a channel sum (``terms``), so ``eigen_smooth`` applies to every one; the formulas follow
pytorch-grad-cam 1.5.x (GradCAM, GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM,
GradCAMElementWise, EigenGradCAM). Only negative dimensions are used: the same function serves a
batch, a batch of targets and the traced ONNX graph.

Example::

    >>> import torch
    >>> from camserve.methods import get_method
    >>> A = torch.rand(2, 8, 7, 7); G = torch.randn(2, 8, 7, 7)
    >>> get_method("gradcam")(A, G).shape, get_method("gradcam")(A, G, eigen_smooth=True).shape
    (torch.Size([2, 7, 7]), torch.Size([2, 7, 7]))
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .registry import register_method

SPATIAL = (-2, -1)
CHANNEL = -3


def channel_sum(terms: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The map of a channel-sum method: ``ReLU(sum_C terms(A, G, **options))``."""
    def fn(A: torch.Tensor, G: Optional[torch.Tensor], **options: Any) -> torch.Tensor:
        return torch.relu(terms(A, G, **options).sum(dim=CHANNEL))
    fn.__doc__ = terms.__doc__
    return fn


def register_channel_sum(name: str, **kw: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a channel-sum method by its ``terms`` function (see
    :func:`camserve.methods.register_method`; ``eigen_smooth`` and ``sign`` come with it)."""
    def deco(terms: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        register_method(name, terms=terms, **kw)(channel_sum(terms))
        return terms
    return deco


@register_channel_sum("gradcam")
def gradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""Grad-CAM: :math:`\mathrm{ReLU}(\sum_k \bar{G}_k A_k)`, :math:`\bar{G}_k` the spatial mean of
    :math:`G_k` (Selvaraju et al., 2017)."""
    return G.mean(dim=SPATIAL, keepdim=True) * A


def gradcam_plus_plus_weights(A: torch.Tensor, G: torch.Tensor, G2: torch.Tensor,
                              G3: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights from the first three derivatives (``G2``, ``G3``: the second and
    third, or their estimates ``G**2``, ``G**3``)."""
    sum_a = A.sum(dim=SPATIAL, keepdim=True)
    alpha = G2 / (2 * G2 + sum_a * G3 + 1e-6)
    alpha = torch.where(G != 0, alpha, torch.zeros_like(alpha))
    return (torch.relu(G) * alpha).sum(dim=SPATIAL, keepdim=True)


@register_channel_sum("gradcam++")
def gradcam_plus_plus(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""Grad-CAM++: weights :math:`w_k = \sum_{ij} \mathrm{ReLU}(G_{kij})\,\alpha_{kij}` with
    :math:`\alpha = G^2 / (2G^2 + \sum_{ij} A_k \cdot G^3 + \epsilon)`, :math:`\alpha=0` where
    :math:`G=0` (Chattopadhyay et al., 2018; :math:`\epsilon=10^{-6}`)."""
    g2 = G * G
    return gradcam_plus_plus_weights(A, G, g2, g2 * G) * A


@register_channel_sum("hirescam")
def hirescam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""HiResCAM: :math:`\mathrm{ReLU}(\sum_k G_k \odot A_k)` (Draelos & Carin, 2020)."""
    return G * A


@register_channel_sum("xgradcam")
def xgradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""XGrad-CAM: weights :math:`w_k = \sum_{ij} G_{kij} A_{kij} / (\sum_{ij} A_{kij} + \epsilon)`
    (Fu et al., 2020; :math:`\epsilon=10^{-7}`)."""
    sum_a = A.sum(dim=SPATIAL, keepdim=True)
    return (G * A / (sum_a + 1e-7)).sum(dim=SPATIAL, keepdim=True) * A


@register_channel_sum("layercam")
def layercam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""LayerCAM: :math:`\mathrm{ReLU}(\sum_k \mathrm{ReLU}(G_k) \odot A_k)` (Jiang et al., 2021)."""
    return torch.relu(G) * A


@register_channel_sum("gradcamelementwise")
def gradcam_elementwise(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    r"""Grad-CAM element-wise: :math:`\mathrm{ReLU}(\sum_k \mathrm{ReLU}(G_k \odot A_k))`
    (pytorch-grad-cam's GradCAMElementWise)."""
    return torch.relu(G * A)
