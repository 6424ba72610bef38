"""Layer output layouts and the one way from each to ``(B, C, h, w)``.

Convolutional layers give channels-first maps ``(B, C, h, w)``; torchvision's Swin stages give
channels-last maps ``(B, h, w, C)``; ViT blocks give tokens ``(B, N, C)``: prefix tokens (class,
distillation, register) followed by a grid of patches. Every CAM method sees ``(..., C, h, w)``;
this module owns the conversion (as timm keeps its ``layers/format.py``):

* :class:`ChannelsFirst`, :class:`ChannelsLast`, :class:`TokenGrid` — small picklable reshapes,
  what :func:`camserve.families.choose_layer` hands the engine and the ONNX trace;
* :func:`square_grid` — the guess of a square patch grid behind a few prefix tokens, for a layout
  given as ``tokens`` without a grid;
* :func:`reshape_for` / :func:`to_nchw` — a layout name to its reshape;
* :func:`converter` — the function the engine, the traced graph and verification apply to a
  layer's outputs and gradients (:func:`camserve.layers.nchw_converter` names the layer in its
  errors).

A layout is never guessed from a shape alone (``(B, 64, 64, 32)`` may be either):
:mod:`camserve.families` decides it. Which layer and layout each model family gets:
docs/byom.md.

Example::

    >>> import torch
    >>> to_nchw(torch.zeros(2, 7, 5, 8), "nhwc").shape
    torch.Size([2, 8, 7, 5])
    >>> TokenGrid(1, (2, 3))(torch.zeros(4, 7, 5)).shape  # 1 class token + 2 x 3 patches
    torch.Size([4, 5, 2, 3])
    >>> square_grid(50)  # (prefix tokens, side)
    (1, 7)
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch

from .parsing import short_repr

Layout = Literal["nchw", "nhwc", "tokens"]
#: Every layout name, as ``layout=`` and ``handler.layout`` take them.
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc", "tokens")
#: The layouts whose conversion needs nothing but the name (tokens need a grid).
GRIDLESS_LAYOUTS: tuple[str, ...] = ("nchw", "nhwc")
#: Prefix tokens :func:`square_grid` accepts when the layout comes without a grid.
MAX_GUESSED_PREFIX = 8
Reshape = Callable[[torch.Tensor], torch.Tensor]


class LayoutError(ValueError):
    """A tensor that does not fit a layout: ``shape`` of the tensor (None when there is none),
    ``reason`` what is wrong (also the message)."""

    def __init__(self, reason: str, shape: Optional[tuple[int, ...]] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.shape = shape


def check_layout(layout: object) -> Optional[str]:
    """``layout`` when it is None or one of :data:`LAYOUTS`, else a :class:`LayoutError` naming
    them."""
    if layout is not None and layout not in LAYOUTS:
        raise LayoutError(f"invalid value for layout: {short_repr(layout, 40)} "
                          f"(known: {', '.join(LAYOUTS)})")
    return layout  # type: ignore[return-value]


class ChannelsFirst:
    """``(B, C, h, w)`` as is (checked)."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 4:
            raise LayoutError(f"layer output of shape {tuple(t.shape)} is not (B, C, h, w)",
                              tuple(t.shape))
        return t

    def __repr__(self) -> str:
        return "ChannelsFirst()"


class ChannelsLast:
    """``(B, h, w, C)`` -> ``(B, C, h, w)`` (a view)."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 4:
            raise LayoutError(f"layer output of shape {tuple(t.shape)} is not (B, h, w, C)",
                              tuple(t.shape))
        return t.permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return "ChannelsLast()"


class TokenGrid:
    """Tokens ``(B, prefix + gh*gw, C)`` -> ``(B, C, gh, gw)``, the ``prefix`` leading tokens
    (class, distillation, register) dropped.

    Example::

        >>> TokenGrid(1, (2, 3))(torch.zeros(4, 7, 5)).shape
        torch.Size([4, 5, 2, 3])
    """

    def __init__(self, prefix: int, grid: tuple[int, int]) -> None:
        self.prefix = int(prefix)
        self.grid = (int(grid[0]), int(grid[1]))

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        if t.dim() != 3 or t.shape[1] != self.prefix + gh * gw:
            raise LayoutError(f"layer output of shape {tuple(t.shape)} is not (B, {self.prefix} + "
                              f"{gh}x{gw} tokens, C): was the input resized to the model's input "
                              f"size?", tuple(t.shape))
        b, _, c = t.shape
        return t[:, self.prefix:, :].reshape(b, gh, gw, c).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"TokenGrid(prefix={self.prefix}, grid={self.grid})"


def square_grid(n_tokens: int, max_prefix: int = MAX_GUESSED_PREFIX) -> Optional[tuple[int, int]]:
    """``(prefix, side)``: ``n_tokens`` read as ``prefix`` leading tokens and a ``side`` x ``side``
    grid (side >= 2, the largest that fits, ``prefix <= max_prefix``), else None. A guess, used only
    where a layout is given as ``tokens`` without the model's own grid.

    Example::

        >>> square_grid(49), square_grid(197), square_grid(52, max_prefix=1), square_grid(3)
        ((0, 7), (1, 14), None, None)
    """
    side = math.isqrt(max(int(n_tokens), 0))
    prefix = int(n_tokens) - side * side
    return (prefix, side) if side >= 2 and prefix <= max_prefix else None


def grid_of(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """The (h, w) grid of a 4-D ``shape`` in a gridless layout (``nchw`` or ``nhwc``).

    Example::

        >>> grid_of((1, 64, 7, 5), "nchw"), grid_of((1, 7, 5, 64), "nhwc")
        ((7, 5), (7, 5))
    """
    return (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])


def reshape_for(layout: str, n_tokens: Optional[int] = None) -> Reshape:
    """The reshape of a layout name: :class:`ChannelsFirst` for ``nchw``, :class:`ChannelsLast`
    for ``nhwc``; for ``tokens`` a :class:`TokenGrid` guessed from ``n_tokens`` by
    :func:`square_grid` with at most one prefix token (a :class:`LayoutError` when none fits).

    Example::

        >>> reshape_for("nhwc"), reshape_for("tokens", 50)
        (ChannelsLast(), TokenGrid(prefix=1, grid=(7, 7)))
    """
    check_layout(layout)
    if layout == "tokens":
        guess = None if n_tokens is None else square_grid(n_tokens, max_prefix=1)
        if guess is None:
            raise LayoutError(f"cannot arrange {n_tokens} tokens on a square grid; pass reshape= "
                              f"to CamEngine")
        prefix, side = guess
        return TokenGrid(prefix, (side, side))
    return ChannelsLast() if layout == "nhwc" else ChannelsFirst()


def to_nchw(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Reshape a layer output of the given layout to ``(B, C, h, w)`` (a view where possible);
    tokens without a grid as :func:`reshape_for` guesses it.

    Example::

        >>> to_nchw(torch.zeros(2, 50, 8), "tokens").shape  # 1 class token + 7 x 7 patches
        torch.Size([2, 8, 7, 7])
    """
    if layout == "tokens" and t.dim() != 3:
        raise LayoutError(f"layer output of shape {tuple(t.shape)} is not (B, tokens, C)",
                          tuple(t.shape))
    return reshape_for(layout, t.shape[1] if t.dim() == 3 else None)(t)


def converter(layout: Optional[str] = None, reshape: Optional[Reshape] = None) -> Reshape:
    """The function that brings a layer's outputs (and their gradients) to ``(B, C, h, w)``:
    ``reshape`` when given (e.g. :attr:`camserve.families.LayerChoice.reshape`), else
    :func:`to_nchw` with ``layout``. Without either, or for a tensor that does not fit, a
    :class:`LayoutError` asks for ``layout=`` / ``reshape=`` (a layout is not guessed from a shape).

    Example::

        >>> tuple(converter(reshape=TokenGrid(1, (7, 7)))(torch.zeros(2, 50, 8)).shape)
        (2, 8, 7, 7)
        >>> converter("nchw")(torch.zeros(2, 8))
        Traceback (most recent call last):
        ...
        camserve.layouts.LayoutError: it gives output of shape (2, 8), which is not a spatial map in layout 'nchw'; choose an earlier layer, or pass layout= / reshape=
    """
    check_layout(layout)

    def convert(t: torch.Tensor) -> torch.Tensor:
        shape = tuple(t.shape)
        if reshape is not None:
            try:
                return reshape(t)
            except ValueError as exc:
                raise LayoutError(f"{exc}; pass layout= / reshape=", shape) from None
        if layout is None:
            raise LayoutError(f"the layout of its output {shape} is not known; pass layout= "
                              f"(nchw, nhwc, tokens) or reshape= (camserve.families.choose_layer "
                              f"decides both)", shape)
        try:
            return to_nchw(t, layout)
        except LayoutError:
            raise LayoutError(f"it gives output of shape {shape}, which is not a spatial map in "
                              f"layout {layout!r}; choose an earlier layer, or pass layout= / "
                              f"reshape=", shape) from None

    return convert
