"""camserve.tasks.embedding: cosine similarity to a reference over embedding families (parity in
float64 with an independent hand-written Grad-CAM of the cosine, and with pytorch-grad-cam run on
the SimilarityToConceptTarget of its embedding tutorial), references as images (companion rows: each image the other's target) or
vectors, hostile references beside good rows."""
from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from camserve import CamEngine
from camserve.errors import OptionError
from camserve.models import ConfigError, LoadedModel, ModelSpec, load_model
from camserve.options import ServingLimits
from camserve.serving import CamService
from camserve.tasks import Embedding, TaskError
from camserve.testing.hostile import hostile_corpus
from camserve.testing.nets import TinyEmbedNet, frozen, write_model_folder

SIZE = (48, 32)  # H, W: non-square


def _vit_folder(root: Path) -> str:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=list(SIZE), patch_size=8, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32)).eval().save_pretrained(root / "vit")
    return "hf:vit"


#: family -> (handler keys, the layer located automatically)
FAMILIES = {
    "tensor": ({"arch": "model:TinyEmbedNet"}, "features.2"),
    "named": ({"arch": "model:TinyEmbedNet", "arch_args": {"named": True},
               "embedding_output": "embedding"}, "features.2"),
    "timm": ({"arch": "timm:resnet10t", "arch_args": {"num_classes": 0}}, "layer4"),  # pooled
    "torchvision": ({"arch": "torchvision.models.resnet18", "num_classes": 12}, "layer4"),
    "hf_vit": ({"arch": "hf"}, "layers.1.layernorm_before"),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], LoadedModel]:
    root = tmp_path_factory.mktemp("embfamilies")
    (root / "model.py").write_text("from camserve.testing.nets import TinyEmbedNet\n")
    cache: dict[str, LoadedModel] = {}

    def load(name: str) -> LoadedModel:
        if name not in cache:
            cfg = {**FAMILIES[name][0], "task": "embedding", "input_size": list(SIZE)}
            if cfg["arch"] == "hf":
                cfg["arch"] = _vit_folder(root)
            cache[name] = load_model(ModelSpec.from_config(cfg), root, calibrate=True)
        return cache[name]

    return load


def _hand_written_gradcam(model: torch.nn.Module, layer: torch.nn.Module, reshape, x: torch.Tensor,
                          reference: torch.Tensor, task: Embedding) -> torch.Tensor:
    """Grad-CAM of ``v.r / (|v| |r|)`` written out: a forward hook keeps the layer's output, the
    cosine is spelled out, autograd gives the gradient, weights = its spatial mean."""
    kept = []
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        with torch.enable_grad():
            v = task.output(model(x))
            cos = (v * reference).sum(1) / (v.norm(dim=1) * reference.norm(dim=1))
            (g,) = torch.autograd.grad(cos.sum(), kept[0])
    finally:
        handle.remove()
    a, g = reshape(kept[0].detach()), reshape(g)
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))
    cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    return (cam - lo) / (cam.amax(dim=(1, 2), keepdim=True) - lo).clamp_min(1e-30)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_layer_and_parity(name: str, family) -> None:
    from pytorch_grad_cam import GradCAM

    class SimilarityToConceptTarget:  # as pytorch-grad-cam's embedding tutorial defines it
        def __init__(self, features: torch.Tensor) -> None:
            self.features = features

        def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
            return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)

    lm = family(name)
    assert lm.layer == FAMILIES[name][1]
    task = Embedding(lm.labels, lm.spec.task_settings)
    model64 = copy.deepcopy(lm.model).double()
    for p in model64.parameters():  # pytorch-grad-cam backpropagates through the parameters
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64, generator=gen)
    ref = torch.randn(2, lm.num_classes, dtype=torch.float64, generator=gen)
    eng = CamEngine(model64, lm.layer, task=task, reshape=lm.reshape)
    res = eng(x, targets=ref, method="gradcam")
    ours = res.heatmaps(SIZE)
    module = model64.get_submodule(lm.layer)
    hand = _hand_written_gradcam(model64, module, lm.reshape, x, ref, task)
    np.testing.assert_allclose(ours.numpy(), hand.detach().numpy(), atol=1e-6, rtol=0)

    class Vector(torch.nn.Module):  # pytorch-grad-cam reads a tensor output
        def __init__(self) -> None:
            super().__init__()
            self.net = model64

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return task.output(self.net(t))

    transform = None if lm.layout == "nchw" else (lambda t: lm.reshape(t))
    with GradCAM(model=Vector(), target_layers=[module], reshape_transform=transform) as cam:
        pgc = cam(input_tensor=x, targets=[SimilarityToConceptTarget(ref[r]) for r in range(2)])
    np.testing.assert_allclose(ours.numpy(), pgc, atol=1e-6, rtol=0)


def test_outputs_by_name_and_config_keys(family) -> None:
    lm = family("named")
    assert lm.num_classes == 8 and lm.spec.task_settings == {"embedding_output": "embedding"}
    task = Embedding(lm.labels, {"embedding_output": "tokens"})
    with pytest.raises(TaskError, match="output 'tokens' .handler.embedding_output. is \\(1, 16, 384\\)"):
        task.output(lm.model(torch.zeros(1, 3, *SIZE)))
    assert Embedding(lm.labels).output({"embedding": torch.zeros(2, 8)}).shape == (2, 8)
    with pytest.raises(TaskError, match="set handler.embedding_output"):
        Embedding().output({"feats": torch.zeros(2, 8)})
    for bad in (True, [1], "x" * 200):
        with pytest.raises(ConfigError, match="handler.embedding_output"):
            ModelSpec.from_config({"arch": "x:Y", "task": "embedding", "embedding_output": bad})


@pytest.mark.parametrize("value,match", [
    ([1, 2], "2 values .8 finite numbers"), ("[1, 2, 3, 4, 5, 6, 7, nan]", "8 finite numbers"),
    ([0] * 8, "all zeros"), ([True] * 8, "8 finite numbers"), ("[[[[", "8 finite numbers"),
    ({"a": 1}, "8 finite numbers"), ("1,2,3", "3 values"),
])
def test_bad_reference_embeddings(value, match: str) -> None:
    task = Embedding([str(i) for i in range(8)])
    with pytest.raises(OptionError, match=match) as info:
        task.parse_options({"reference_embedding": value}, max_targets=16)
    assert len(str(info.value)) < 300
    with pytest.raises(OptionError, match="not both"):
        task.parse_options({"reference_embedding": [1] * 8, "reference": b"x"}, max_targets=16)
    assert task.parse_options({"reference_embedding": "1,2,3,4,5,6,7,8"},
                              max_targets=16).vector == tuple(range(1, 9))


def _png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def service() -> CamService:
    spec = ModelSpec.from_config({"arch": "x:TinyEmbedNet", "task": "embedding", "input_size": [32, 32],
                                  "mean": [0.5] * 3, "std": [0.25] * 3, "target_layer": "features"})
    return CamService(LoadedModel(model=frozen(TinyEmbedNet(8, seed=2)), spec=spec,
                                  labels=[str(i) for i in range(8)], layer="features",
                                  device=torch.device("cpu")))


def _vector(svc: CamService, data: bytes) -> torch.Tensor:
    body = svc.handle_batch([{"data": data}]).results[0].body
    return torch.tensor(body["embedding"])


def test_served_references_beside_hostile_ones(service: CamService) -> None:
    corpus = hostile_corpus()
    big = _png(9, (300, 200))  # longer than the option text limit: a reference is an image
    assert len(big) > service.limits.max_option_length
    rows = [
        {"data": _png(1), "explain": "true", "reference": base64.b64encode(_png(2)).decode(),
         "outputs": "heatmap,overlay,bbox"},
        {"data": _png(3), "explain": "true", "reference": _png(4)},  # a form file
        {"data": _png(5), "explain": "true", "reference_embedding": json.dumps([1.0] * 8)},
        {"data": _png(6), "reference_embedding": [1.0] * 3},
        {"data": _png(7), "reference": corpus["png_truncated_half"].data},
        {"data": _png(8), "reference": corpus["png_declares_65535"].data},
        {"data": _png(10), "reference": "%%% not base64"},
        {"data": _png(11), "explain": "true", "reference": big},
        {"data": _png(12)},
        {"data": _png(13), "explain": "true"},
    ]
    out = service.handle_batch(rows)
    status = [r.status for r in out.results]
    assert status == [200, 200, 200, 422, 400, 413, 400, 200, 200, 200], status
    for r in out.results[4:6]:  # decoded as a companion image: its errors name it
        assert r.body["message"].startswith("reference: ")
    assert "reference is not valid base64" in out.results[6].body["message"]
    first = out.results[0].body
    assert [e["image"] for e in first["explanations"]] == ["input", "reference"]
    assert first["explanations"][1]["width"] == 40 and "overlay" in first["explanations"][1]
    expected = F.cosine_similarity(_vector(service, _png(1)), _vector(service, _png(2)), dim=0)
    assert first["similarity"] == pytest.approx(float(expected), abs=1e-5)
    assert first["explanations"][0]["score"] == pytest.approx(float(expected), abs=1e-5)
    assert first["reference"] == "image" and len(first["embedding"]) == 8
    third = out.results[2].body
    assert third["reference"] == "embedding" and len(third["explanations"]) == 1
    assert out.results[8].body["similarity"] is None and "explanations" not in out.results[8].body
    assert out.results[9].body["explanations"] == []  # nothing to explain without a reference
    assert out.stats.error_rows == 4


def test_each_image_is_the_others_target(service: CamService) -> None:
    """The reference's map of (A, B) is the image's map of (B, A): one forward, both targets."""
    a, b = _png(21), _png(22)
    out = service.handle_batch([
        {"data": a, "explain": "true", "reference": b, "outputs": "raw"},
        {"data": b, "explain": "true", "reference": a, "outputs": "raw"}]).results
    ab, ba = out[0].body["explanations"], out[1].body["explanations"]
    np.testing.assert_allclose(ab[1]["raw"]["data"], ba[0]["raw"]["data"], atol=1e-5)
    np.testing.assert_allclose(ab[0]["raw"]["data"], ba[1]["raw"]["data"], atol=1e-5)
    assert out[0].body["similarity"] == pytest.approx(out[1].body["similarity"], abs=1e-6)


def test_the_reference_image_counts_in_the_work_budget(service: CamService) -> None:
    """The reference's maps are planned after the image's, from what the batch has left: here
    its maps no longer fit at full size and are made at the capped size (and say so)."""
    svc = copy.copy(service)
    svc.limits = ServingLimits(max_map_side=64, max_row_work=1, max_batch_work=1)
    small, large = _png(1, (500, 500)), _png(2, (900, 900))
    vector = json.dumps([1.0] * 8)
    out = svc.handle_batch([{"data": small, "explain": "true", "reference": large},
                            {"data": small, "explain": "true", "reference_embedding": vector}]).results
    assert [r.status for r in out] == [200, 200]
    image, reference = out[0].body["explanations"]
    assert "scaled" not in image and reference["scaled"] is True and reference["map_width"] == 64
    assert "scaled" not in out[1].body["explanations"][0]
