"""camserve.metrics.compute, the front door: keys and their errors, cost = forward passes, batch =
row by row, dtypes and devices, and the default model's Grad-CAM against the random baseline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from camserve import CamEngine
from camserve import metrics as M
from tests.metrics.cases import gradcam, small_cnn

ROOT = Path(__file__).resolve().parents[2]
SHAPES_DIR = ROOT / "models" / "shapes"
MODEL_KEYS = ("deletion", "insertion", "road_morf", "road_lerf", "avg_drop", "avg_increase")
SETTINGS = dict(steps=6, percentiles=(30, 70), noise=0.0)


def test_unknown_key_names_it_and_the_allowed_ones():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"invalid value for keys: 'delation' \(allowed: deletion, insertion"):
        M.compute_metrics(small_cnn(), x, torch.rand(1, 8, 8), keys=("delation",))
    with pytest.raises(ValueError, match="invalid value for keys"):
        M.cost("deletion,nope")
    with pytest.raises(ValueError, match="boxes"):
        M.compute_metrics(small_cnn(), x, torch.rand(1, 8, 8), keys=("pointing_game",))
    with pytest.raises(ValueError, match="maps"):
        M.compute_metrics(small_cnn(), x, torch.rand(2, 8, 8), keys=("deletion",))
    with pytest.raises(ValueError, match="baseline"):
        M.deletion(small_cnn(), x, torch.rand(1, 8, 8), baseline="zeros")
    with pytest.raises(ValueError, match="targets"):
        M.deletion(small_cnn(), x, torch.rand(1, 8, 8), targets=[9])


def test_cost_is_the_forward_count():
    model = small_cnn()
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
    model = small_cnn(seed=3)
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
    m32 = small_cnn(seed=5)
    m64 = small_cnn(seed=5).double()
    out32 = M.compute_metrics(m32, x, maps, keys=MODEL_KEYS, **SETTINGS)
    out64 = M.compute_metrics(m64, x.double(), maps, keys=MODEL_KEYS, **SETTINGS)
    for k in MODEL_KEYS:
        assert out32[k].dtype == torch.float32 and out64[k].dtype == torch.float64
        torch.testing.assert_close(out64[k].float(), out32[k], atol=1e-4, rtol=0)


def test_plain_callable_model_and_cpu_results():
    model = small_cnn()
    x, maps = torch.randn(2, 3, 16, 16), torch.rand(2, 16, 16, dtype=torch.float64)
    as_module = M.compute_metrics(model, x, maps, keys=MODEL_KEYS, **SETTINGS)
    as_fn = M.compute_metrics(lambda t: model(t), x, maps, keys=MODEL_KEYS, **SETTINGS)
    for k in MODEL_KEYS:
        assert as_module[k].device.type == "cpu"
        torch.testing.assert_close(as_module[k], as_fn[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = small_cnn()
    g = torch.Generator().manual_seed(1)
    x, maps = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    cpu = M.compute_metrics(model, x, maps, keys=MODEL_KEYS, **SETTINGS)
    dev = M.compute_metrics(model.to("cuda"), x.to("cuda"), maps, keys=MODEL_KEYS, **SETTINGS)
    for k in MODEL_KEYS:
        assert dev[k].device.type == "cuda"
        torch.testing.assert_close(dev[k].cpu(), cpu[k], atol=1e-4, rtol=0)
    rho = M.compute_metrics(model.to("cuda"), x.to("cuda"), maps, [0, 1, 2],
                            keys=("randomization_rank_corr",), explain=gradcam, top_k=2)
    assert rho["randomization_rank_corr"].device.type == "cuda"


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
