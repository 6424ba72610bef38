"""camserve.metrics: known answers on constructed models and maps, ROAD parity with
pytorch-grad-cam, batch = row by row, dtypes and devices, the randomisation check, the front door's
keys and cost, and the default model's Grad-CAM against the random baseline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from camserve import CamEngine
from camserve import metrics as M

ROOT = Path(__file__).resolve().parents[1]
SHAPES_DIR = ROOT / "models" / "shapes"
H = W = 12
PIXEL = (4, 7)


class OnePixel(nn.Module):
    """Logits depend only on pixel PIXEL (mean over channels): class 0 is sure when it is near 4,
    class 1 when it is near 0 (logit 0 = 3 (v - 2))."""

    def __init__(self, i: int = PIXEL[0], j: int = PIXEL[1]) -> None:
        super().__init__()
        self.i, self.j = i, j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :, self.i, self.j].mean(1)
        return torch.stack([3 * (v - 2), -3 * (v - 2)], dim=1)


def _pixel_images(b: int = 3, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(b, 3, H, W, generator=g, dtype=torch.float64) - 0.5) * 0.2
    x[:, :, PIXEL[0], PIXEL[1]] = 4.0
    return x.to(dtype)


def _perfect(b: int = 3) -> torch.Tensor:
    """Ranks PIXEL first, the rest in a fixed random order."""
    g = torch.Generator().manual_seed(1)
    m = torch.rand(b, H, W, generator=g) * 0.5
    m[:, PIXEL[0], PIXEL[1]] = 1.0
    return m


def _small_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    ).eval()


def _trapz(values: list[float], steps: int) -> float:
    return float(np.trapezoid(values, np.linspace(0, 1, steps + 1)))


# ------------------------------------------------------------------------------------------------
# deletion / insertion


@pytest.mark.parametrize("steps", [4, 12])
def test_deletion_insertion_one_pixel_known_answers(steps):
    model, x = OnePixel(), _pixel_images()
    good = _perfect()
    t = torch.zeros(3, dtype=torch.long)
    p_img = torch.softmax(model(x), 1)[:, 0]
    base = M.baseline_image(x, "mean")
    p_base = torch.softmax(model(base), 1)[:, 0]
    assert (p_img > 0.999).all() and (p_base < 1e-4).all()
    best_del = [_trapz([float(p_img[i])] + [float(p_base[i])] * steps, steps) for i in range(3)]
    worst_del = [_trapz([float(p_img[i])] * steps + [float(p_base[i])], steps) for i in range(3)]
    best_ins = [_trapz([float(p_base[i])] + [float(p_img[i])] * steps, steps) for i in range(3)]
    worst_ins = [_trapz([float(p_base[i])] * steps + [float(p_img[i])], steps) for i in range(3)]

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
    model, x = OnePixel(), _pixel_images()
    c = M.deletion_curve(model, x, _perfect(), [0, 0, 0], steps=5)
    assert c.probs.shape == (3, 6)
    assert c.fractions[0] == 0 and c.fractions[-1] == 1 and (c.fractions.diff() > 0).all()
    # a constant baseline of 4 in every channel keeps the one pixel as it is: flat curve at p(x)
    flat = M.deletion_curve(model, x, _perfect(), [0, 0, 0], steps=5, baseline=4.0)
    torch.testing.assert_close(flat.probs, flat.probs[:, :1].expand(3, 6))
    # blur keeps a constant image constant
    const = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(M.baseline_image(const, "blur"), const)
    tensor_base = M.baseline_image(x, torch.zeros(1, 3, 1, 1))
    assert tensor_base.shape == x.shape and not tensor_base.any()


def test_maps_upsampled_to_input_size():
    model, x = _small_cnn(), torch.randn(2, 3, 16, 16)
    small = torch.rand(2, 4, 4)
    big = M.resize_maps(small, x)
    assert big.shape == (2, 16, 16)
    torch.testing.assert_close(M.deletion(model, x, small, steps=6), M.deletion(model, x, big, steps=6))


# ------------------------------------------------------------------------------------------------
# ROAD


def test_road_perfect_and_inverted_map():
    model, x = OnePixel(), _pixel_images()
    good, t = _perfect(), [0, 0, 0]
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

    model = _small_cnn(seed=2)
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


def test_avg_drop_and_increase():
    model, x = OnePixel(), _pixel_images()
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


def test_energy_in_box_hand_made():
    m = torch.zeros(3, 6, 6)
    m[0, 1, 1] = 2.0
    m[0, 4, 4] = 2.0                      # half inside
    m[1, 0:2, 0:3] = 1.0                  # all inside
    m[1, 5, 5] = -7.0                     # negative mass is ignored
    boxes = [[0, 0, 3, 3], [0, 0, 3, 2], [0, 0, 3, 2]]   # third map: all zeros -> uniform
    torch.testing.assert_close(M.energy_in_box(m, boxes), torch.tensor([0.5, 1.0, 6 / 36]))
    with pytest.raises(ValueError, match="boxes"):
        M.energy_in_box(m, [[0, 0, 3, 3]])


def test_pointing_game_with_tolerance():
    m = torch.zeros(3, 10, 10)
    m[0, 2, 2] = 1.0                      # inside [1, 1, 4, 4)
    m[1, 5, 4] = 1.0                      # x = 4 is the exclusive end: 1 px outside
    m[2, 8, 8] = 1.0                      # far away
    boxes = torch.tensor([[1, 1, 4, 4]] * 3)
    assert M.pointing_game(m, boxes).tolist() == [1.0, 0.0, 0.0]
    assert M.pointing_game(m, boxes, tolerance=2).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="tolerance"):
        M.pointing_game(m, boxes, tolerance=-1)


# ------------------------------------------------------------------------------------------------
# randomisation


def _gradcam(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return CamEngine(model, "4")(x, targets).cams


def test_randomization_decorrelates_and_control_is_one():
    model = _small_cnn(seed=4)
    x = torch.randn(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    control = M.randomization_rank_corr(model, x, t, _gradcam, top_k=0)
    assert control.tolist() == [1.0] * 6
    rho = M.randomization_rank_corr(model, x, t, _gradcam, top_k=2, seed=1)
    assert rho.shape == (6,) and (rho <= 1).all() and (rho >= -1).all()
    assert rho.mean() < 0.5, rho
    # the caller's model is untouched
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    # reproducible for a seed
    assert torch.equal(rho, M.randomization_rank_corr(model, x, t, _gradcam, top_k=2, seed=1))


def test_randomize_top_layers_picks_the_last_layers():
    model = _small_cnn()
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

MODEL_KEYS = ("deletion", "insertion", "road_morf", "road_lerf", "avg_drop", "avg_increase")
SETTINGS = dict(steps=6, percentiles=(30, 70), noise=0.0)


def test_unknown_key_names_it_and_the_allowed_ones():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"invalid value for keys: 'delation' \(allowed: deletion, insertion"):
        M.compute_metrics(_small_cnn(), x, torch.rand(1, 8, 8), keys=("delation",))
    with pytest.raises(ValueError, match="invalid value for keys"):
        M.cost("deletion,nope")
    with pytest.raises(ValueError, match="boxes"):
        M.compute_metrics(_small_cnn(), x, torch.rand(1, 8, 8), keys=("pointing_game",))
    with pytest.raises(ValueError, match="maps"):
        M.compute_metrics(_small_cnn(), x, torch.rand(2, 8, 8), keys=("deletion",))
    with pytest.raises(ValueError, match="baseline"):
        M.deletion(_small_cnn(), x, torch.rand(1, 8, 8), baseline="zeros")
    with pytest.raises(ValueError, match="targets"):
        M.deletion(_small_cnn(), x, torch.rand(1, 8, 8), targets=[9])


def test_cost_is_the_forward_count():
    model = _small_cnn()
    seen = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape[0])
        return model(t)

    x, maps = torch.randn(4, 3, 16, 16), torch.rand(4, 16, 16)
    keys = MODEL_KEYS + ("pointing_game",)
    out = M.compute_metrics(counted, x, maps, keys=keys, boxes=[[0, 0, 8, 8]] * 4, **SETTINGS)
    assert list(out) == list(keys) and all(v.shape == (4,) for v in out.values())
    assert set(seen) == {4}                  # every forward covers the whole batch
    assert len(seen) == sum(M.cost(keys, steps=6, percentiles=(30, 70)).values())


def test_batch_equals_row_by_row():
    model = _small_cnn(seed=3)
    g = torch.Generator().manual_seed(2)
    x, maps = torch.randn(4, 3, 16, 16, generator=g), torch.rand(4, 8, 8, generator=g)
    boxes = torch.tensor([[0, 0, 8, 8], [4, 4, 12, 12], [8, 0, 16, 8], [0, 8, 8, 16]])
    keys = MODEL_KEYS + ("energy_in_box", "pointing_game")
    batch = M.compute_metrics(model, x, maps, keys=keys, boxes=boxes, **SETTINGS)
    rows = [M.compute_metrics(model, x[i:i + 1], maps[i:i + 1], keys=keys, boxes=boxes[i:i + 1],
                              **SETTINGS) for i in range(4)]
    for k in keys:
        torch.testing.assert_close(batch[k], torch.cat([r[k] for r in rows]), atol=1e-5, rtol=0)


def test_float64_and_float32_agree():
    g = torch.Generator().manual_seed(9)
    x, maps = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    m32 = _small_cnn(seed=5)
    m64 = _small_cnn(seed=5).double()
    out32 = M.compute_metrics(m32, x, maps, keys=MODEL_KEYS, **SETTINGS)
    out64 = M.compute_metrics(m64, x.double(), maps, keys=MODEL_KEYS, **SETTINGS)
    for k in MODEL_KEYS:
        assert out32[k].dtype == torch.float32 and out64[k].dtype == torch.float64
        torch.testing.assert_close(out64[k].float(), out32[k], atol=1e-4, rtol=0)


def test_plain_callable_model_and_cpu_results():
    model = _small_cnn()
    x, maps = torch.randn(2, 3, 16, 16), torch.rand(2, 16, 16, dtype=torch.float64)
    as_module = M.compute_metrics(model, x, maps, keys=MODEL_KEYS, **SETTINGS)
    as_fn = M.compute_metrics(lambda t: model(t), x, maps, keys=MODEL_KEYS, **SETTINGS)
    for k in MODEL_KEYS:
        assert as_module[k].device.type == "cpu"
        torch.testing.assert_close(as_module[k], as_fn[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = _small_cnn()
    g = torch.Generator().manual_seed(1)
    x, maps = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    cpu = M.compute_metrics(model, x, maps, keys=MODEL_KEYS, **SETTINGS)
    dev = M.compute_metrics(model.to("cuda"), x.to("cuda"), maps, keys=MODEL_KEYS, **SETTINGS)
    for k in MODEL_KEYS:
        assert dev[k].device.type == "cuda"
        torch.testing.assert_close(dev[k].cpu(), cpu[k], atol=1e-4, rtol=0)
    rho = M.compute_metrics(model.to("cuda"), x.to("cuda"), maps, [0, 1, 2],
                            keys=("randomization_rank_corr",), explain=_gradcam, top_k=2)
    assert rho["randomization_rank_corr"].device.type == "cuda"


def test_baseline_maps():
    r = M.random_map((2, 5, 7), torch.Generator().manual_seed(0))
    assert r.shape == (2, 5, 7) and (r >= 0).all() and (r < 1).all()
    assert torch.equal(r, M.random_map((2, 5, 7), torch.Generator().manual_seed(0)))
    c = M.center_map((2, 9, 9))
    assert c.shape == (2, 9, 9) and int(c[1].argmax()) == 40
    torch.testing.assert_close(c[0], c[0].flip(0).flip(1))


# ------------------------------------------------------------------------------------------------
# the default model


def _load_shapes():
    from camserve import models

    if hasattr(models, "load_model_dir"):
        loaded = models.load_model_dir(SHAPES_DIR)
        return loaded.model, loaded.spec
    spec = models.ModelSpec.from_config(models.load_model_config(SHAPES_DIR)["handler"])
    return models.build_model(spec, SHAPES_DIR), spec


def _shapes_samples(spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from PIL import Image

    meta = json.loads((SHAPES_DIR / "samples" / "boxes.json").read_text())
    names = json.loads((SHAPES_DIR / "index_to_name.json").read_text())
    index = {v: int(k) for k, v in names.items()}
    imgs = [np.asarray(Image.open(SHAPES_DIR / "samples" / f).convert("RGB")) for f in sorted(meta)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    labels = torch.tensor([index[meta[f]["label"]] for f in sorted(meta)])
    boxes = torch.tensor([meta[f]["box"] for f in sorted(meta)])
    return x, labels, boxes


@pytest.mark.slow
def test_gradcam_beats_random_on_the_default_model():
    model, spec = _load_shapes()
    x, labels, boxes = _shapes_samples(spec)
    cams = CamEngine(model, spec.target_layer)(x, labels).cams
    rnd = M.random_map(cams.shape, torch.Generator().manual_seed(0))
    keys = ("deletion", "insertion", "energy_in_box", "pointing_game")
    ours = M.summarize(M.compute_metrics(model, x, cams, labels, keys=keys, boxes=boxes, steps=16))
    base = M.summarize(M.compute_metrics(model, x, rnd, labels, keys=keys, boxes=boxes, steps=16))
    assert ours["deletion"] < base["deletion"] and ours["insertion"] > base["insertion"], (ours, base)
    assert ours["energy_in_box"] > base["energy_in_box"] and ours["pointing_game"] >= 0.75


def test_road_with_tied_zeros_removes_the_stated_share():
    """A ReLU'd CAM is mostly zeros: thresholding at a percentile would remove every tied pixel
    (the whole image at 90 %); ROAD here removes exactly the stated share and stays finite."""
    m = torch.zeros(2, 10, 10)
    m[:, 2:4, 2:4] = torch.rand(2, 2, 2) + 0.5
    removed = M.road_masks(m, 90, "morf")
    assert removed.sum(dim=(1, 2)).tolist() == [90, 90]
    assert removed[:, 2:4, 2:4].all()
    x = torch.randn(2, 3, 10, 10)
    res = M.road(_small_cnn(), x, m, [0, 1], order="morf", noise=0.0)
    assert torch.isfinite(res.probs).all()
