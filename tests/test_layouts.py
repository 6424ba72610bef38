"""camserve.layouts: the reshapes of each layout to (B, C, h, w), the square-grid guess, and the
converter's errors (never a layout guessed from a shape)."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, strategies as st

from camserve.layouts import (LAYOUTS, ChannelsFirst, ChannelsLast, LayoutError, TokenGrid,
                              check_layout, converter, grid_of, reshape_for, square_grid, to_nchw)

NCHW = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # (B, C, h, w)


def _tokens(prefix: int, nchw: torch.Tensor = NCHW) -> torch.Tensor:
    """``nchw`` as ViT tokens (B, prefix + h*w, C), the prefix tokens filled with -1."""
    b, c, _, _ = nchw.shape
    grid = nchw.flatten(2).transpose(1, 2)
    return torch.cat([torch.full((b, prefix, c), -1.0), grid], dim=1)


@pytest.mark.parametrize("layout,tensor", [
    ("nchw", NCHW), ("nhwc", NCHW.permute(0, 2, 3, 1)), ("tokens", _tokens(0, NCHW[..., :4])),
])
def test_every_layout_comes_back_to_nchw(layout: str, tensor: torch.Tensor) -> None:
    expected = NCHW[..., :4] if layout == "tokens" else NCHW  # tokens: a square 4x4 grid
    out = to_nchw(tensor, layout)
    assert torch.equal(out, expected)
    if layout != "tokens":  # a view: gradients and in-place writes reach the layer's output
        assert out.data_ptr() == tensor.data_ptr()


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_token_grid_drops_the_prefix_tokens(prefix: int) -> None:
    out = TokenGrid(prefix, (4, 5))(_tokens(prefix))
    assert torch.equal(out, NCHW)
    with pytest.raises(LayoutError, match=r"is not \(B, 1 \+ 4x4 tokens, C\)") as exc:
        TokenGrid(1, (4, 4))(_tokens(2, NCHW[..., :4]))
    assert exc.value.shape == (2, 18, 3)


def test_reshapes_are_small_picklable_values() -> None:
    for r in (ChannelsFirst(), ChannelsLast(), TokenGrid(1, (7, 7))):
        back = pickle.loads(pickle.dumps(r))  # they travel to Ray actors and pool workers
        assert repr(back) == repr(r)
    assert repr(reshape_for("nchw")) == "ChannelsFirst()"
    assert repr(reshape_for("tokens", 197)) == "TokenGrid(prefix=1, grid=(14, 14))"


@pytest.mark.parametrize("layout,tensor", [("nchw", torch.zeros(2, 5)), ("nhwc", torch.zeros(2, 3, 4)),
                                           ("tokens", torch.zeros(2, 3, 4, 5))])
def test_a_tensor_of_the_wrong_rank_is_a_layout_error(layout: str, tensor: torch.Tensor) -> None:
    with pytest.raises(LayoutError) as exc:
        to_nchw(tensor, layout)
    assert exc.value.shape == tuple(tensor.shape)


@given(st.integers(min_value=0, max_value=10 ** 6), st.integers(min_value=0, max_value=8))
def test_square_grid_reads_a_prefix_and_the_largest_square(n: int, max_prefix: int) -> None:
    guess = square_grid(n, max_prefix)
    if guess is None:
        side = math.isqrt(n)
        assert side < 2 or n - side * side > max_prefix
    else:
        prefix, side = guess
        assert side >= 2 and 0 <= prefix <= max_prefix and prefix + side * side == n
        assert (side + 1) ** 2 > n  # the largest square: never a prefix made of grid tokens


def test_tokens_without_a_grid_guess_at_most_one_prefix_token() -> None:
    assert tuple(to_nchw(torch.zeros(1, 50, 8), "tokens").shape) == (1, 8, 7, 7)
    with pytest.raises(LayoutError, match="cannot arrange 52 tokens on a square grid"):
        to_nchw(torch.zeros(1, 52, 8), "tokens")  # 3 prefix tokens: a model's grid is needed
    assert square_grid(52) == (3, 7)  # what a config's explicit ``layout: tokens`` accepts


def test_grid_of_each_gridless_layout() -> None:
    assert grid_of((1, 64, 7, 5), "nchw") == (7, 5) == grid_of((1, 7, 5, 64), "nhwc")


def test_converter_asks_for_a_layout_instead_of_guessing() -> None:
    ambiguous = torch.zeros(2, 64, 64, 32)  # NCHW 64x32 or NHWC 64x64? the shape cannot tell
    with pytest.raises(LayoutError, match=r"not known; pass layout= \(nchw, nhwc, tokens\)"):
        converter()(ambiguous)
    with pytest.raises(LayoutError, match="not a spatial map in layout 'nchw'"):
        converter("nchw")(torch.zeros(2, 5))
    assert converter("nhwc")(ambiguous).shape == (2, 32, 64, 64)


def test_converter_prefers_the_reshape_and_keys_its_errors() -> None:
    def refuse(t: torch.Tensor) -> torch.Tensor:
        raise ValueError("not my shape")

    with pytest.raises(LayoutError, match="not my shape; pass layout= / reshape=") as exc:
        converter("nchw", refuse)(NCHW)
    assert exc.value.shape == tuple(NCHW.shape)
    assert torch.equal(converter("nchw", TokenGrid(2, (4, 5)))(_tokens(2)), NCHW)


def test_layout_names_are_checked_with_a_bounded_message() -> None:
    assert [check_layout(name) for name in (None, *LAYOUTS)] == [None, *LAYOUTS]
    with pytest.raises(LayoutError, match=r"invalid value for layout: 'NCHW' \(known: nchw, nhwc, tokens\)"):
        converter("NCHW")
    with pytest.raises(ValueError) as exc:
        check_layout("x" * 10_000)
    assert len(str(exc.value)) < 120
