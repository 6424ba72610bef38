"""camserve.metrics.curves: deletion and insertion, known answers on a one-pixel model, the
curve's shape and the perturbation baselines."""
from __future__ import annotations

import pytest
import torch

from camserve import metrics as M
from tests.metrics.cases import OnePixel, perfect_map, pixel_images, trapz


@pytest.mark.parametrize("steps", [4, 12])
def test_deletion_insertion_one_pixel_known_answers(steps):
    model, x = OnePixel(), pixel_images()
    good = perfect_map()
    t = torch.zeros(3, dtype=torch.long)
    p_img = torch.softmax(model(x), 1)[:, 0]
    base = M.baseline_image(x, "mean")
    p_base = torch.softmax(model(base), 1)[:, 0]
    assert (p_img > 0.999).all() and (p_base < 1e-4).all()
    best_del = [trapz([float(p_img[i])] + [float(p_base[i])] * steps, steps) for i in range(3)]
    worst_del = [trapz([float(p_img[i])] * steps + [float(p_base[i])], steps) for i in range(3)]
    best_ins = [trapz([float(p_base[i])] + [float(p_img[i])] * steps, steps) for i in range(3)]
    worst_ins = [trapz([float(p_base[i])] * steps + [float(p_img[i])], steps) for i in range(3)]

    d_good = M.deletion(model, x, good, t, steps=steps)
    d_bad = M.deletion(model, x, -good, t, steps=steps)
    i_good = M.insertion(model, x, good, t, steps=steps)
    i_bad = M.insertion(model, x, -good, t, steps=steps)
    torch.testing.assert_close(d_good, torch.tensor(best_del), atol=1e-6, rtol=0)
    torch.testing.assert_close(d_bad, torch.tensor(worst_del), atol=1e-6, rtol=0)
    torch.testing.assert_close(i_good, torch.tensor(best_ins), atol=1e-6, rtol=0)
    torch.testing.assert_close(i_bad, torch.tensor(worst_ins), atol=1e-6, rtol=0)
    assert (d_good < 0.5 / steps + 1e-3).all() and (d_bad > 1 - 0.5 / steps - 1e-3).all()
    assert (i_good > 1 - 0.5 / steps - 1e-3).all() and (i_bad < 0.5 / steps + 1e-3).all()


def test_curve_shape_fractions_and_baselines():
    model, x = OnePixel(), pixel_images()
    c = M.deletion_curve(model, x, perfect_map(), [0, 0, 0], steps=5)
    assert c.probs.shape == (3, 6)
    assert c.fractions[0] == 0 and c.fractions[-1] == 1 and (c.fractions.diff() > 0).all()
    # a constant baseline of 4 in every channel keeps the one pixel as it is: flat curve at p(x)
    flat = M.deletion_curve(model, x, perfect_map(), [0, 0, 0], steps=5, baseline=4.0)
    torch.testing.assert_close(flat.probs, flat.probs[:, :1].expand(3, 6))
    # blur keeps a constant image constant
    const = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(M.baseline_image(const, "blur"), const)
    tensor_base = M.baseline_image(x, torch.zeros(1, 3, 1, 1))
    assert tensor_base.shape == x.shape and not tensor_base.any()
