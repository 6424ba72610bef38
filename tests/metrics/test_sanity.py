"""camserve.metrics.sanity: model-parameter randomisation decorrelates Grad-CAM (the control is
exactly 1), the layers it re-initialises, and Spearman with ties against scipy."""
from __future__ import annotations

import pytest
import torch

from camserve import metrics as M
from tests.metrics.cases import gradcam, small_cnn


def test_randomization_decorrelates_and_control_is_one():
    model = small_cnn(seed=4)
    x = torch.randn(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    control = M.randomization_rank_corr(model, x, t, gradcam, top_k=0)
    assert control.tolist() == [1.0] * 6
    rho = M.randomization_rank_corr(model, x, t, gradcam, top_k=2, seed=1)
    assert rho.shape == (6,) and (rho <= 1).all() and (rho >= -1).all()
    assert rho.mean() < 0.5, rho
    # the caller's model is untouched
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    # reproducible for a seed
    assert torch.equal(rho, M.randomization_rank_corr(model, x, t, gradcam, top_k=2, seed=1))


def test_randomize_top_layers_picks_the_last_layers():
    model = small_cnn()
    assert M.parameterised_layers(model) == ["0", "2", "4", "8"]
    r = M.randomize_top_layers(model, 2)
    assert torch.equal(r[0].weight, model[0].weight) and torch.equal(r[2].weight, model[2].weight)
    assert not torch.equal(r[4].weight, model[4].weight) and not torch.equal(r[8].weight, model[8].weight)
    with pytest.raises(ValueError, match="top_k"):
        M.randomize_top_layers(model, 5)


def test_spearman_ties_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 50), generator=g).double()     # many ties, like ReLU'd maps
    b = torch.randint(0, 6, (3, 50), generator=g).double()
    ref = [stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(3)]
    torch.testing.assert_close(M.spearman(a, b), torch.tensor(ref, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# front door: keys, cost, batching, dtypes, devices
