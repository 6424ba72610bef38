"""Registry of CAM methods: each a small function with what it needs and what it costs.

A method is registered with :func:`register_method` as a :class:`Method`: its name, what it
``needs`` (activations, gradients, more forward passes, the suffix of the network, several layers,
Hessian-vector products) and its :class:`Cost` per explained target as a function of the layer's
channels and the options; budgets and ``describe`` read that declaration. Methods that need at
most activations and gradients are pure functions ``f(A, G) -> cam`` where

* ``A`` is the target layer's activation, shape ``(..., C, h, w)``;
* ``G`` is d score / d A, the same shape as ``A`` or broadcastable against it (the engine passes
  ``A`` as ``(B, 1, C, h, w)`` and ``G`` as ``(B, K, C, h, w)`` for K targets per row);
* the result is ``(..., h, w)``: post-ReLU and not normalised.

Only negative dimensions are used, so the same function serves a batch, a batch of targets, and the
ONNX exporter, which traces these very functions into the graph. The other methods are functions of
a :class:`camserve.engine.CamContext` (perturbed forwards run through it, in bounded chunks). The
formulas follow pytorch-grad-cam 1.5.x (GradCAM, GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM,
EigenCAM).

Example::

    >>> import torch
    >>> from camserve.methods import get_method
    >>> A = torch.rand(2, 8, 7, 7); G = torch.randn(2, 8, 7, 7)
    >>> get_method("gradcam")(A, G).shape
    torch.Size([2, 7, 7])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

if TYPE_CHECKING:
    from .engine import CamContext

CamMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: What a method may need: the layer's ``activations``; the ``gradients`` of the target scores
#: to them; more ``forward`` passes of the whole model (perturbed inputs); forward passes of the
#: ``suffix`` (the layers after the target layer, on perturbed activations); several ``layers``;
#: Hessian-vector products (``hvp``).
NEEDS = ("activations", "gradients", "forward", "suffix", "layers", "hvp")

_SPATIAL = (-2, -1)
_CHANNEL = -3


@dataclass(frozen=True)
class Cost:
    """What a method spends per explained target beyond the shared forward pass: whole-model
    ``forwards``, ``suffix`` forwards (the layers after the target layer), ``backwards`` to the
    layer, ``hvp`` Hessian-vector products. Budgets and ``describe`` read it.

    Example::

        >>> Cost(backwards=1).units(suffix_share=0.5), Cost(forwards=32).units(0.5)
        (1.0, 32.0)
    """

    forwards: float = 0.0
    suffix: float = 0.0
    backwards: float = 0.0
    hvp: float = 0.0

    def units(self, suffix_share: float = 1.0) -> float:
        """The cost in forward-pass units: a backward counts as two forwards (of the suffix,
        which is where a backward to the layer stops, hence ``suffix_share`` <= 1 scaled), an
        HVP as four."""
        return float(self.forwards + suffix_share * (self.suffix + 2 * self.backwards + 4 * self.hvp))

    def to_json(self) -> dict[str, float]:
        """The non-zero parts, for ``describe``."""
        return {k: v for k, v in (("forwards", self.forwards), ("suffix", self.suffix),
                                  ("backwards", self.backwards), ("hvp", self.hvp)) if v}


def _one_backward(channels: int, options: Mapping[str, Any]) -> Cost:
    return Cost(backwards=1.0)


def _free(channels: int, options: Mapping[str, Any]) -> Cost:
    return Cost()


@dataclass(frozen=True)
class Method:
    """A registered CAM method: its ``name``, what it ``needs`` (a subset of :data:`NEEDS`), its
    ``cost(channels, options)`` per explained target, and its function: ``fn(A, G) -> cam`` when it
    needs at most activations and gradients (a pure function the ONNX exporter can trace), else
    ``fn(ctx) -> cam`` over a :class:`camserve.engine.CamContext` (perturbation methods, several
    layers). ``doc``: one line for ``describe``."""

    name: str
    fn: Callable[..., torch.Tensor]
    needs: frozenset[str]
    cost: Callable[[int, Mapping[str, Any]], Cost] = _one_backward
    doc: str = ""
    #: the ONNX exporter can trace it into the CAM graph
    exportable: bool = True

    @property
    def pure(self) -> bool:
        """A function of (activations, gradients) only: traceable into the ONNX graph."""
        return self.needs <= {"activations", "gradients"}

    @property
    def gradients(self) -> bool:
        """Needs the gradients of the target scores (a backward pass)."""
        return "gradients" in self.needs

    def __call__(self, A: torch.Tensor, G: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.pure:
            raise TypeError(f"method {self.name!r} needs {', '.join(sorted(self.needs))}; run it "
                            f"through CamEngine, not as f(A, G)")
        return self.fn(A, G)

    def describe(self, channels: Optional[int] = None,
                 options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """``{"name", "needs", "cost", "doc"}`` (the cost for ``channels`` when given)."""
        out: dict[str, Any] = {"name": self.name, "needs": sorted(self.needs), "doc": self.doc}
        if channels is not None:
            out["cost"] = self.cost(int(channels), dict(options or {})).to_json()
        return out


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, *, needs: tuple[str, ...] = ("activations", "gradients"),
                    cost: Callable[[int, Mapping[str, Any]], Cost] = _one_backward,
                    doc: str = "", exportable: Optional[bool] = None
                    ) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register ``fn`` under ``name`` (lower case) with what it ``needs``, its
    ``cost`` and whether the ONNX graph can carry it (default: when it is a pure ``f(A, G)``);
    the function itself is returned unchanged (it stays a plain function)."""
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"invalid value for needs: {bad[0]!r} (allowed: {', '.join(NEEDS)})")

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"invalid value for name: {name!r} is already registered")
        first = (fn.__doc__ or "").strip().splitlines()
        pure = frozenset(needs) <= {"activations", "gradients"}
        _REGISTRY[key] = Method(key, fn, frozenset(needs), cost, doc or (first[0] if first else ""),
                                pure if exportable is None else bool(exportable) and pure)
        return fn

    return deco


def available_methods(*, exportable: Optional[bool] = None,
                      gradients: Optional[bool] = None) -> list[str]:
    """Names of the registered CAM methods, in registration order; ``exportable`` /
    ``gradients``: only those the ONNX graph can (or cannot) carry, that need (or do not need)
    gradients."""
    return [n for n, m in _REGISTRY.items()
            if (exportable is None or m.exportable == exportable)
            and (gradients is None or m.gradients == gradients)]


def get_method(name: str | Method) -> Method:
    """The method registered under ``name``; ValueError listing the known names otherwise."""
    if isinstance(name, Method):
        return name
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


def _principal_projection(X: torch.Tensor) -> torch.Tensor:
    """Each map of ``X`` (..., C, h, w) projected on its first principal component over positions
    (positions centred), (..., h, w); the sign is the SVD's, as in pytorch-grad-cam."""
    flat = X.flatten(-2).transpose(-1, -2)  # (..., hw, C)
    flat = flat - flat.mean(dim=-2, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ vh[..., 0, :, None]
    return proj.squeeze(-1).reshape(X.shape[:-3] + X.shape[-2:])


@register_method("eigencam", needs=("activations",), cost=_free, exportable=False)
def eigencam(A: torch.Tensor, G: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""EigenCAM: the activations projected on their first principal component,
    :math:`\mathrm{ReLU}(\tilde{A} v_1)` with :math:`\tilde{A}` the (positions x channels) matrix
    centred over positions (Muhammad & Yeasin, 2020). Gradient-free: the same map for every target."""
    return torch.relu(_principal_projection(A))
