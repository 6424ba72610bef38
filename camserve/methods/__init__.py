"""CAM methods: one registry, split by family. The manual: docs/methods.md.

* :mod:`.registry` — :class:`Method`, :class:`MethodSpec`, :class:`Cost`, :class:`Option`,
  :func:`register_method`, :func:`get_method`, :func:`available_methods`;
* :mod:`.gradient` — Grad-CAM, Grad-CAM++, HiResCAM, XGrad-CAM, LayerCAM, Grad-CAM element-wise
  (pure functions of activations and gradients, channel sums: ``eigen_smooth`` applies);
* :mod:`.projection` — EigenCAM, EigenGradCAM, KPCA-CAM, RandomCAM (principal projections in an
  SVD form and an ONNX-exportable form);
* :mod:`.perturbation` — ScoreCAM, SS-CAM, IS-CAM, AblationCAM, ReciproCAM, ViT-ReciproCAM
  (masked forwards in bounded chunks, through the task's scores);
* :mod:`.composite` — ShapleyCAM (Hessian-vector products), FullGrad (every bias layer),
  FinerCAM (any gradient method on a comparison score), SmoothGrad-CAM++ (noisy gradients);
* :mod:`.smoothing` — the ``aug_smooth`` modifier every method takes.

Example::

    >>> import torch
    >>> from camserve.methods import get_method
    >>> A = torch.rand(2, 8, 7, 7); G = torch.randn(2, 8, 7, 7)
    >>> get_method("gradcam")(A, G).shape
    torch.Size([2, 7, 7])
    >>> "scorecam" in available_methods(cheap=False), "gradcam" in available_methods(cheap=True)
    (True, True)
"""
from .registry import (NEEDS, Cost, LayerSize, Method, MethodError, MethodSpec, Option, as_spec,
                       available_methods, get_method, method_option_names, register_method)
from . import gradient, projection, perturbation, composite  # noqa: F401  (registration order)

__all__ = ["NEEDS", "Cost", "LayerSize", "Method", "MethodError", "MethodSpec", "Option", "as_spec",
           "available_methods", "get_method", "method_option_names", "register_method"]
