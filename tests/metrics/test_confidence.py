"""camserve.metrics.confidence: average drop and increase in confidence on a one-pixel model."""
from __future__ import annotations

import torch

from camserve import metrics as M
from tests.metrics.cases import PIXEL, H, OnePixel, W, pixel_images


def test_avg_drop_and_increase():
    model, x = OnePixel(), pixel_images()
    t = [0, 0, 0]
    ones = torch.ones(3, H, W)
    assert M.avg_drop(model, x, ones, t).tolist() == [0.0, 0.0, 0.0]
    assert M.avg_increase(model, x, ones, t).tolist() == [0.0, 0.0, 0.0]
    # a map that is 0 at the decisive pixel dims it to 0: the probability falls to ~0, drop ~100 %
    hole = torch.ones(3, H, W)
    hole[:, PIXEL[0], PIXEL[1]] = 0.0
    assert (M.avg_drop(model, x, hole, t) > 99.9).all()
    # class 1 likes the pixel dimmed: its confidence increases
    cc = M.confidence_change(model, x, hole, [1, 1, 1])
    assert cc.increase.tolist() == [1.0, 1.0, 1.0] and cc.drop.tolist() == [0.0, 0.0, 0.0]
    # min-max normalisation: scale and offset of the map do not matter
    m = torch.rand(3, H, W)
    torch.testing.assert_close(M.avg_drop(model, x, m, t), M.avg_drop(model, x, 5 * m + 2, t))


# ------------------------------------------------------------------------------------------------
# boxes
