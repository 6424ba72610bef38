"""camserve.metrics.base: maps resized to the inputs, and the reference maps of a comparison."""
from __future__ import annotations

import torch

from camserve import metrics as M
from tests.metrics.cases import small_cnn


def test_maps_upsampled_to_input_size():
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    small = torch.rand(2, 4, 4)
    big = M.resize_maps(small, x)
    assert big.shape == (2, 16, 16)
    torch.testing.assert_close(M.deletion(model, x, small, steps=6), M.deletion(model, x, big, steps=6))


# ------------------------------------------------------------------------------------------------
# ROAD


def test_baseline_maps():
    r = M.random_map((2, 5, 7), torch.Generator().manual_seed(0))
    assert r.shape == (2, 5, 7) and (r >= 0).all() and (r < 1).all()
    assert torch.equal(r, M.random_map((2, 5, 7), torch.Generator().manual_seed(0)))
    c = M.center_map((2, 9, 9))
    assert c.shape == (2, 9, 9) and int(c[1].argmax()) == 40
    torch.testing.assert_close(c[0], c[0].flip(0).flip(1))


# ------------------------------------------------------------------------------------------------
# the default model
