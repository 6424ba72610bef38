"""camserve.metrics.road: ROAD on a one-pixel model, the pixels removed (ties included), the
imputation against a direct sparse solve, and parity with pytorch-grad-cam."""
from __future__ import annotations

import pytest
import torch

from camserve import metrics as M
from tests.metrics.cases import OnePixel, perfect_map, pixel_images, small_cnn


def test_road_perfect_and_inverted_map():
    model, x = OnePixel(), pixel_images()
    good, t = perfect_map(), [0, 0, 0]
    kw = dict(percentiles=(10, 50, 90), noise=0.01, generator=torch.Generator().manual_seed(0))
    morf_good = M.road(model, x, good, t, order="morf", **kw)
    morf_bad = M.road(model, x, -good, t, order="morf", **kw)
    lerf_good = M.road(model, x, good, t, order="lerf", **kw)
    lerf_bad = M.road(model, x, -good, t, order="lerf", **kw)
    # removing the one pixel first: the probability collapses at every percentile
    assert (morf_good.probs < 1e-3).all() and (morf_good.score < -0.99).all()
    assert (morf_bad.score.abs() < 1e-3).all()
    assert (lerf_good.score.abs() < 1e-3).all()
    assert (lerf_bad.probs < 1e-3).all() and (lerf_bad.score < -0.99).all()


def test_road_masks_remove_the_stated_share():
    m = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(3))
    for pct in (10, 35, 90):
        for order in ("morf", "lerf"):
            removed = M.road_masks(m, pct, order)
            share = removed.float().mean(dim=(1, 2))
            assert ((share - pct / 100).abs() <= 1 / 400 + 1e-9).all()
            for i in range(2):
                gone, kept = m[i][removed[i]], m[i][~removed[i]]
                if order == "morf":
                    assert gone.min() > kept.max()
                else:
                    assert gone.max() < kept.min()
    with pytest.raises(ValueError, match="order"):
        M.road_masks(m, 10, "middle")
    with pytest.raises(ValueError, match="percentile"):
        M.road_masks(m, 100, "morf")


def test_road_with_tied_zeros_removes_the_stated_share():
    """A ReLU'd CAM is mostly zeros: thresholding at a percentile would remove every tied pixel
    (the whole image at 90 %); ROAD here removes exactly the stated share and stays finite."""
    m = torch.zeros(2, 10, 10)
    m[:, 2:4, 2:4] = torch.rand(2, 2, 2) + 0.5
    removed = M.road_masks(m, 90, "morf")
    assert removed.sum(dim=(1, 2)).tolist() == [90, 90]
    assert removed[:, 2:4, 2:4].all()
    x = torch.randn(2, 3, 10, 10)
    res = M.road(small_cnn(), x, m, [0, 1], order="morf", noise=0.0)
    assert torch.isfinite(res.probs).all()


def test_impute_linear_matches_sparse_solve():
    imputation = pytest.importorskip("pytorch_grad_cam.metrics.road")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 20, 20, generator=g)
    m = torch.rand(2, 20, 20, generator=g)
    for pct in (10, 50, 90):
        removed = M.road_masks(m, pct, "morf")
        ours = M.impute_linear(x, removed)
        ref = torch.stack([imputation.NoisyLinearImputer(noise=0)(x[i], (~removed[i]).float())
                           for i in range(2)])
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        assert torch.equal(ours[~removed[:, None].expand_as(x)], x[~removed[:, None].expand_as(x)])
    # noise goes to the removed pixels only, reproducibly
    removed = M.road_masks(m, 50, "morf")
    n1 = M.impute_linear(x, removed, noise=0.5, generator=torch.Generator().manual_seed(1))
    n2 = M.impute_linear(x, removed, noise=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(n1, n2)
    keep = ~removed[:, None].expand_as(x)
    assert torch.equal(n1[keep], x[keep]) and not torch.allclose(n1, M.impute_linear(x, removed))


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_parity_with_pytorch_grad_cam(order):
    """Maps without ties: pytorch-grad-cam's percentile thresholds and the pixel counts here remove
    the same pixels; the imputations agree to the solver's tolerance."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                  RemoveLeastRelevantFirst,
                                                                  RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = small_cnn(seed=2)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 20, 20, generator=g)
    cams = torch.rand(3, 20, 20, generator=g)
    targets = [1, 3, 4]
    remover = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    pcts = (10, 30, 50, 70, 90)
    ref = []
    for p in pcts:
        metric = PerturbationConfidenceMetric(remover(100 - p, NoisyLinearImputer(noise=0)))
        ref.append(torch.from_numpy(metric(x, cams.numpy(), [ClassifierOutputSoftmaxTarget(t)
                                                              for t in targets], model)))
    ref = torch.stack(ref, dim=1)
    ours = M.road(model, x, cams, targets, order=order, percentiles=pcts, noise=0.0, tol=1e-6)
    torch.testing.assert_close(ours.probs - ours.reference[:, None], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.score, ref.mean(dim=1), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# confidence change
