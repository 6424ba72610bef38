"""Decompositions of backward operations that have no ONNX translation, for ``make_fx``.

A CAM graph records the backward pass to the target layer as ordinary ATen operations. Some of
them have no ONNX translation (or only a stateful/strided one); :func:`backward_decompositions`
replaces them while tracing:

* ``convolution_backward`` (input gradient) is the transposed convolution with the same weight,
  stride, padding, dilation and groups and the ``output_padding`` that restores the input size
  (:func:`conv_input_grad`); the adjoint of a transposed convolution is a convolution;
* ``_adaptive_avg_pool2d_backward`` and ``avg_pool2d_backward`` use that average pooling is
  separable, ``y = P_h x P_w^T`` with row-stochastic pooling matrices built from the static
  spatial size, so the gradient is ``P_h^T g P_w`` (:func:`adaptive_avg_pool2d_grad`,
  :func:`avg_pool2d_grad`);
* the others use :mod:`torch._decomp`'s decompositions.

Example::

    >>> import torch, torch.nn.functional as F
    >>> x = torch.randn(1, 2, 7, 5, requires_grad=True)
    >>> gy = torch.randn(1, 2, 3, 2)
    >>> ref, = torch.autograd.grad(F.adaptive_avg_pool2d(x, (3, 2)), x, gy)
    >>> torch.allclose(adaptive_avg_pool2d_grad(gy, x.detach()), ref, atol=1e-6)
    True
    >>> torch.ops.aten.convolution_backward.default in backward_decompositions()
    True
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

aten = torch.ops.aten

__all__ = ["adaptive_avg_pool2d_grad", "avg_pool2d_grad", "backward_decompositions",
           "conv_input_grad"]


def conv_input_grad(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                     bias_sizes: Any, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                     groups: int, output_mask: Sequence[bool]) -> Any:
    """``convolution_backward`` for the input gradient: the adjoint of a convolution is the
    transposed convolution with the same weight (and vice versa)."""
    if output_mask[1] or output_mask[2]:
        return NotImplemented  # parameter gradients: keep the original op (never needed for CAMs)
    if not output_mask[0]:
        return (None, None, None)
    n = weight.dim() - 2
    if transposed:
        gi = aten.convolution.default(grad_output, weight, None, stride, padding, dilation, False,
                                      [0] * n, groups)
    else:
        k = weight.shape[2:]
        out_pad = [input.shape[2 + d] - ((grad_output.shape[2 + d] - 1) * stride[d] - 2 * padding[d]
                                         + dilation[d] * (k[d] - 1) + 1) for d in range(n)]
        gi = aten.convolution.default(grad_output, weight, None, stride, padding, dilation, True,
                                      out_pad, groups)
    return (gi, None, None)


def _static(v: Any) -> int:
    """A size as a Python int (specialising a symbolic size: spatial sizes are static in export)."""
    from torch.fx.experimental.symbolic_shapes import guard_int

    return int(guard_int(v))


def _pool_matrix(size_in: int, size_out: int, windows: Sequence[tuple[int, int, float]],
                 like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) matrix with ``1/div`` on each output row's window ``[start, end)``.

    Built in numpy from static sizes, so a trace records one constant rather than the ops that
    fill it."""
    m = np.zeros((size_out, size_in), dtype=np.float64)
    for i, (s, e, div) in enumerate(windows):
        if e > s:
            m[i, s:e] = 1.0 / div
    return torch.tensor(m, dtype=like.dtype, device=like.device)


def _separable_pool_grad(grad_output: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``P_h^T g P_w`` over the last two dimensions."""
    return torch.matmul(torch.matmul(rows.t(), grad_output), cols)


def _adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int, float]]:
    """Adaptive pooling windows: ``[floor(i*n/m), ceil((i+1)*n/m))``, divided by their length."""
    out = []
    for i in range(n_out):
        s = (i * n_in) // n_out
        e = -((-(i + 1) * n_in) // n_out)
        out.append((s, e, float(e - s)))
    return out


def adaptive_avg_pool2d_grad(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``_adaptive_avg_pool2d_backward`` via the separable pooling matrices."""
    h, w = _static(input.shape[-2]), _static(input.shape[-1])
    oh, ow = _static(grad_output.shape[-2]), _static(grad_output.shape[-1])
    rows = _pool_matrix(h, oh, _adaptive_windows(h, oh), grad_output)
    cols = _pool_matrix(w, ow, _adaptive_windows(w, ow), grad_output)
    return _separable_pool_grad(grad_output, rows, cols)


def _avg_windows(n_in: int, n_out: int, k: int, s: int, p: int, count_include_pad: bool,
                 override: Optional[float]) -> list[tuple[int, int, float]]:
    """Per output index: the window ``[start, end)`` clipped to the input, and its divisor (the
    window length within the padded input, or within the input, or ``override``)."""
    out = []
    for i in range(n_out):
        start = i * s - p
        end = min(start + k, n_in + p)
        padded_len = end - start
        start_c, end_c = max(start, 0), min(end, n_in)
        if override is not None:
            div = float(override)
        else:
            div = float(padded_len if count_include_pad else end_c - start_c)
        out.append((start_c, end_c, div))
    return out


def avg_pool2d_grad(grad_output: torch.Tensor, input: torch.Tensor, kernel_size: Sequence[int],
                     stride: Sequence[int], padding: Sequence[int], ceil_mode: bool,
                     count_include_pad: bool, divisor_override: Optional[int]) -> Any:
    """``avg_pool2d_backward`` via the separable pooling matrices (the divisor of a window is a
    product of a row and a column length, so it factorises as well; ``divisor_override`` is split
    as ``sqrt(d) * sqrt(d)``)."""
    kh, kw = (list(kernel_size) * 2)[:2] if len(kernel_size) == 1 else kernel_size
    st = list(stride) or [kh, kw]
    sh, sw = (st * 2)[:2] if len(st) == 1 else st
    ph, pw = (list(padding) * 2)[:2] if len(padding) == 1 else padding
    h, w = _static(input.shape[-2]), _static(input.shape[-1])
    oh, ow = _static(grad_output.shape[-2]), _static(grad_output.shape[-1])
    ov = None if divisor_override is None else math.sqrt(divisor_override)
    rows = _pool_matrix(h, oh, _avg_windows(h, oh, kh, sh, ph, count_include_pad, ov), grad_output)
    cols = _pool_matrix(w, ow, _avg_windows(w, ow, kw, sw, pw, count_include_pad, ov), grad_output)
    return _separable_pool_grad(grad_output, rows, cols)


def backward_decompositions() -> dict[Any, Callable[..., Any]]:
    """Decomposition table for :func:`make_fx` that leaves no backward operation without an ONNX
    translation: PyTorch's own backward decompositions plus the ones of this module."""
    from torch._decomp import core_aten_decompositions, get_decompositions

    table = {op: fn for op, fn in core_aten_decompositions().items() if "backward" in str(op)}
    table.update(get_decompositions([aten.max_pool2d_with_indices_backward, aten.as_strided_scatter,
                                     aten.slice_scatter, aten.select_scatter,
                                     aten.diagonal_scatter]))
    table[aten.convolution_backward.default] = conv_input_grad
    table[aten._adaptive_avg_pool2d_backward.default] = adaptive_avg_pool2d_grad
    table[aten.avg_pool2d_backward.default] = avg_pool2d_grad
    return table

