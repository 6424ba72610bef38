"""Projection methods and the random baseline: EigenCAM, EigenGradCAM, KPCA-CAM, RandomCAM.

A principal projection maps the (positions x channels) matrix of a layer, centred over positions,
onto its first principal component. Two forms compute it:

* the engine's: an SVD (``torch.linalg.svd``, LAPACK, the decomposition numpy uses too);
* the graph's (:func:`exportable_form`): the Gram matrix raised to the power 2^``POWER_STEPS`` by
  repeated squaring (MatMul and norms only, which ONNX has), its largest column as the component —
  the same component to float precision wherever the first eigenvalue is not (nearly) repeated.

A component's sign is arbitrary. ``sign="max"`` (the default) flips a map whose largest magnitude
is negative, ``|min| > |max|`` (the rule of pytorch-grad-cam's Seg-Eigen-CAM), so every form gives
the same map; ``sign="svd"`` keeps the sign of numpy's SVD (pytorch-grad-cam's EigenCAM, exactly; LAPACK
builds differ in the signs they give, so this form runs numpy's, on the CPU, and is not exported).

Example::

    >>> import torch
    >>> A = torch.rand(2, 16, 5, 6, dtype=torch.float64)
    >>> with exportable_form():
    ...     p = principal_projection(A)
    >>> torch.allclose(p, principal_projection(A), atol=1e-8)
    True
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch

from .registry import SIGN, Cost, LayerSize, Option, float_in, int_in, one_of, register_method, free

#: Squarings of the Gram matrix in the exportable form (its 1024th power).
POWER_STEPS = 10
_EXPORTABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("camserve_exportable_projection",
                                                                   default=False)


@contextlib.contextmanager
def exportable_form() -> Iterator[None]:
    """Within the block, projections use the ONNX-exportable form (the CAM graph's trace)."""
    token = _EXPORTABLE.set(True)
    try:
        yield
    finally:
        _EXPORTABLE.reset(token)


def _normalise(M: torch.Tensor) -> torch.Tensor:
    norm = M.flatten(-2).norm(dim=-1)[..., None, None]
    return M / torch.where(norm > 0, norm, torch.ones_like(norm))


def top_eigenvector(M: torch.Tensor) -> torch.Tensor:
    """The unit eigenvector of the largest eigenvalue of symmetric PSD matrices ``M`` (..., n, n),
    by repeated squaring (exportable: MatMul, ReduceL2, ArgMax, Gather); its sign is the sign of
    the column it comes from."""
    P = _normalise(M)
    for _ in range(POWER_STEPS):
        P = _normalise(P @ P)
    norms = (P * P).sum(dim=-2)  # (..., n): squared column norms
    j = norms.argmax(dim=-1)
    col = torch.gather(P, -1, j[..., None, None].expand(*P.shape[:-1], 1))[..., 0]
    n = col.norm(dim=-1, keepdim=True)
    return col / torch.where(n > 0, n, torch.ones_like(n))


def sign_max(p: torch.Tensor) -> torch.Tensor:
    """``p`` (..., h, w) flipped where ``|min| > |max|`` (per map)."""
    flat = p.flatten(-2)
    flip = flat.amin(dim=-1).abs() > flat.amax(dim=-1).abs()
    return torch.where(flip[..., None, None], -p, p)


def principal_projection(X: torch.Tensor, sign: str = "max") -> torch.Tensor:
    """Each map of ``X`` (..., C, h, w) projected on its first principal component over positions
    (positions centred), (..., h, w); ``sign`` see the module docstring."""
    flat = X.flatten(-2).transpose(-1, -2)  # (..., hw, C)
    flat = flat - flat.mean(dim=-2, keepdim=True)
    flat = torch.nan_to_num(flat, nan=0.0)
    if _EXPORTABLE.get():
        if sign != "max":
            raise ValueError("invalid value for sign: 'svd' has no exportable form (use 'max')")
        hw, c = flat.shape[-2], flat.shape[-1]
        if c <= hw:
            v = top_eigenvector(flat.transpose(-1, -2) @ flat)  # (..., C)
            proj = (flat @ v[..., None])[..., 0]
        else:
            gram = flat @ flat.transpose(-1, -2)  # (..., hw, hw)
            u = top_eigenvector(gram)
            lam = (u[..., None, :] @ gram @ u[..., :, None])[..., 0, 0]
            proj = u * lam.clamp_min(0).sqrt()[..., None]
    elif sign == "svd":  # numpy's SVD, whose sign pytorch-grad-cam keeps (LAPACK builds differ)
        vh = np.linalg.svd(flat.detach().cpu().numpy(), full_matrices=False)[2]
        v = torch.from_numpy(np.ascontiguousarray(vh[..., 0, :])).to(flat.device, flat.dtype)
        proj = (flat @ v[..., None])[..., 0]
    else:
        _, _, vh = torch.linalg.svd(flat, full_matrices=False)
        proj = (flat @ vh[..., 0, :, None])[..., 0]
    proj = proj.reshape(X.shape[:-3] + X.shape[-2:])
    return sign_max(proj) if sign == "max" else proj


@register_method("eigencam", needs=("activations",), cost=free, options=(SIGN,))
def eigencam(A: torch.Tensor, G: Optional[torch.Tensor] = None, sign: str = "max") -> torch.Tensor:
    r"""EigenCAM: the activations projected on their first principal component,
    :math:`\mathrm{ReLU}(\tilde{A} v_1)` with :math:`\tilde{A}` the (positions x channels) matrix
    centred over positions (Muhammad & Yeasin, 2020). Gradient-free: the same map for every target."""
    return torch.relu(principal_projection(A, sign))


@register_method("eigengradcam", options=(SIGN,), exportable=False)
def eigengradcam(A: torch.Tensor, G: torch.Tensor, sign: str = "max") -> torch.Tensor:
    r"""Eigen-Grad-CAM: the first principal component of :math:`G \odot A` over positions,
    ReLU (pytorch-grad-cam's EigenGradCAM)."""
    return torch.relu(principal_projection(G * A, sign))


# -- kernel PCA -------------------------------------------------------------------------------------

KERNELS = ("sigmoid", "rbf", "linear", "poly", "cosine")


def kernel_matrix(X: torch.Tensor, kernel: str, gamma: Optional[float], degree: int = 3,
                  coef0: float = 1.0) -> torch.Tensor:
    """scikit-learn's pairwise kernels of the rows of ``X`` (..., n, d) (``gamma`` 0: 1/d)."""
    g = float(gamma) if gamma else 1.0 / X.shape[-1]
    dot = X @ X.transpose(-1, -2)
    if kernel == "linear":
        return dot
    if kernel == "sigmoid":
        return torch.tanh(g * dot + coef0)
    if kernel == "poly":
        return (g * dot + coef0) ** degree
    if kernel == "rbf":
        sq = (X * X).sum(dim=-1)
        return torch.exp(-g * (sq[..., :, None] + sq[..., None, :] - 2 * dot).clamp_min(0))
    if kernel == "cosine":
        n = X.norm(dim=-1)
        n = torch.where(n > 0, n, torch.ones_like(n))
        return dot / (n[..., :, None] * n[..., None, :])
    raise ValueError(f"invalid value for kernel: {kernel!r} (known: {', '.join(KERNELS)})")


def kernel_projection(X: torch.Tensor, kernel: str = "sigmoid", gamma: float = 0.0) -> torch.Tensor:
    """scikit-learn's ``KernelPCA(n_components=1, kernel=kernel, gamma=gamma or None)
    .fit_transform`` of each map of ``X`` (..., C, h, w) as (positions x channels) rows, centred
    over positions: the top eigenvector of the centred kernel, its largest entry positive (svd_flip),
    times the square root of its eigenvalue; (..., h, w)."""
    flat = X.flatten(-2).transpose(-1, -2)
    flat = torch.nan_to_num(flat - flat.mean(dim=-2, keepdim=True), nan=0.0)
    K = kernel_matrix(flat, kernel, gamma)
    K = K - K.mean(dim=-2, keepdim=True) - K.mean(dim=-1, keepdim=True) \
        + K.mean(dim=(-2, -1), keepdim=True)
    if _EXPORTABLE.get():
        v = top_eigenvector(K)
        lam = (v[..., None, :] @ K @ v[..., :, None])[..., 0, 0]
    else:
        vals, vecs = torch.linalg.eigh(K)
        v, lam = vecs[..., -1], vals[..., -1]
    idx = v.abs().argmax(dim=-1, keepdim=True)
    s = torch.sign(torch.gather(v, -1, idx))
    proj = v * s * lam.clamp_min(0).sqrt()[..., None]
    return proj.reshape(X.shape[:-3] + X.shape[-2:])


@register_method("kpcacam", needs=("activations",), cost=free, options=(
    Option("kernel", "sigmoid", one_of(*KERNELS), "kernel of the kernel PCA"),
    Option("gamma", 0.0, float_in(0.0, 1e6), "kernel coefficient; 0: 1/channels")))
def kpcacam(A: torch.Tensor, G: Optional[torch.Tensor] = None, kernel: str = "sigmoid",
            gamma: float = 0.0) -> torch.Tensor:
    r"""KPCA-CAM: the first kernel principal component of the activations over positions, ReLU
    (Karmani et al., 2024; pytorch-grad-cam's KPCA_CAM, scikit-learn's KernelPCA)."""
    return torch.relu(kernel_projection(A, kernel, gamma))


# -- the random baseline ----------------------------------------------------------------------------

def _random_terms(A: torch.Tensor, G: Optional[torch.Tensor] = None, seed: int = 0) -> torch.Tensor:
    r"""RandomCAM: channel weights drawn uniformly from [-1, 1]: :math:`\mathrm{ReLU}(\sum_k w_k
    A_k)`, a baseline that any method worth its cost should beat (pytorch-grad-cam's RandomCAM;
    numpy's ``RandomState(seed)``, so a seed gives the same weights)."""
    w = np.random.RandomState(int(seed)).uniform(-1, 1, size=tuple(A.shape[:-2]))
    return torch.as_tensor(w, dtype=A.dtype, device=A.device)[..., None, None] * A


def _random(A: torch.Tensor, G: Optional[torch.Tensor] = None, seed: int = 0) -> torch.Tensor:
    return torch.relu(_random_terms(A, G, seed).sum(dim=-3))


_random.__doc__ = _random_terms.__doc__
register_method("randomcam", needs=("activations",), cost=free, exportable=False,
                terms=_random_terms,
                options=(Option("seed", 0, int_in(0, 2**32 - 1), "seed of the random weights"),))(_random)
