"""camserve.tasks.multilabel: sigmoid labels, threshold, per-label maps (parity with
pytorch-grad-cam's BinaryClassifierOutputTarget), through the engine and the serving core."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from camserve import CamEngine
from camserve.errors import OptionError
from camserve.models import ConfigError, LoadedModel, ModelSpec
from camserve.serving import CamService
from camserve.tasks import Geometry, Multilabel, TaskError
from camserve.testing.nets import TINY_LABELS, TinyNet, frozen, tiny_spec

LABELS = list(TINY_LABELS)
GEOM = Geometry((32, 32), (32, 32))


def test_threshold_from_the_config_and_the_request():
    assert Multilabel(LABELS).threshold == 0.5
    task = Multilabel(LABELS, {"threshold": 0.25})
    assert task.parse_options({}, max_targets=16).threshold == 0.25
    assert task.parse_options({"threshold": "0.75"}, max_targets=16).threshold == 0.75
    for bad in ("1.5", "-0.1", "nan", "x", "1e999", True, "9" * 500):
        with pytest.raises(OptionError, match="invalid value for threshold") as info:
            task.parse_options({"threshold": bad}, max_targets=16)
        assert len(str(info.value)) < 200
    with pytest.raises(TaskError, match="handler.threshold"):
        Multilabel(LABELS, {"threshold": 2})


def test_model_config_takes_threshold_only_for_multilabel():
    spec = ModelSpec.from_config({"arch": "x:Y", "task": "multilabel", "threshold": 0.3})
    assert spec.task == "multilabel" and spec.task_settings == {"threshold": 0.3}
    with pytest.raises(ConfigError, match="handler.threshold: it is a key of another task"):
        ModelSpec.from_config({"arch": "x:Y", "threshold": 0.3})
    with pytest.raises(ConfigError, match="handler.task: 'segmentaton' .known: classification"):
        ModelSpec.from_config({"arch": "x:Y", "task": "segmentaton"})


def test_default_targets_are_the_predicted_labels_capped_by_topk():
    task = Multilabel(["a", "b", "c", "d"])
    logits = torch.tensor([[3.0, -2.0, 1.0, 2.0], [-5.0, -5.0, -5.0, -5.0]])
    p = task.parse_options({}, max_targets=16)
    tb = task.request_targets(logits, [p, p], [GEOM, GEOM], [2, 2])
    assert tb.index[0].tolist() == [0, 3] and tb.count == (2, 0)
    named = task.parse_options({"target": "b"}, max_targets=16)
    assert task.request_targets(logits, [named], [GEOM], [2]).index.tolist() == [[1]]
    body = task.answer(logits[0], p, 2, GEOM, None)
    assert [q["label"] for q in body["labels"]] == ["a", "d", "c"]
    assert body["threshold"] == 0.5 and len(body["predictions"]) == 2


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"])
def test_per_label_maps_equal_pytorch_grad_cam(method):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    ref_cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
               "xgradcam": XGradCAM, "layercam": LayerCAM}[method]
    net = TinyNet(len(LABELS), seed=5).double().eval()
    x = torch.randn(2, 3, 40, 24, dtype=torch.float64)  # non-square
    labels = [[1, 4], [0, 2]]
    eng = CamEngine(net, "features", task=Multilabel(LABELS))
    res = eng(x, targets=torch.tensor(labels), method=method)
    ours = res.heatmaps((40, 24))
    for k in range(2):
        class One(torch.nn.Module):  # the label's own output: a binary classifier
            def __init__(self, lab):
                super().__init__()
                self.net, self.lab = net, lab

            def forward(self, t):
                return self.net(t)[:, self.lab:self.lab + 1]

        for r in range(2):
            with ref_cls(model=One(labels[r][k]), target_layers=[net.features]) as cam:
                ref = cam(x[r:r + 1], targets=[BinaryClassifierOutputTarget(1)])
            np.testing.assert_allclose(ours[r, k].numpy(), ref[0], atol=1e-6)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_served_rows_with_a_bad_threshold_beside_good_ones():
    spec = tiny_spec(task="multilabel", threshold=0.0)
    loaded = LoadedModel(model=frozen(TinyNet(len(LABELS), seed=0)), spec=spec, labels=LABELS,
                         layer="features", device=torch.device("cpu"))
    svc = CamService(loaded)
    rows = [{"data": _png(1), "explain": "true", "topk": "2"},
            {"data": _png(2), "threshold": "2"},
            {"data": _png(3), "explain": "true", "target": "[0, 3]", "outputs": "bbox"},
            {"data": _png(4), "explain": "true", "threshold": "1"}]
    out = svc.handle_batch(rows)
    assert [r.status for r in out.results] == [200, 422, 200, 200]
    first = json.loads(out.results[0].to_json())
    assert len(first["labels"]) == len(LABELS)  # threshold 0: every label is predicted
    assert [e["target"] for e in first["explanations"]] == [p["index"] for p in first["labels"][:2]]
    assert all(0 <= e["score"] <= 1 for e in first["explanations"])
    assert [e["target"] for e in json.loads(out.results[2].to_json())["explanations"]] == [0, 3]
    assert json.loads(out.results[3].to_json())["explanations"] == []  # nothing above 1.0
    assert "threshold" in json.loads(out.results[1].to_json())["message"]
    assert svc.describe()["task"] == "multilabel" and "threshold" in svc.describe()["options"]



def _hf_classifier(root) -> str:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(
        image_size=[48, 32], patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=5)).eval().save_pretrained(root / "vit")
    return "hf:vit"


#: every classifier family camserve loads, declared multi-label: handler keys, located layer
FAMILIES = {
    "file": ({"arch": "model:TinyNet", "num_classes": 5}, "features.6"),
    "torchvision": ({"arch": "torchvision.models.resnet18", "num_classes": 5}, "layer4"),
    "timm": ({"arch": "timm:resnet10t", "num_classes": 5}, "layer4"),
    "hf": ({"arch": "hf"}, "vit.layers.1.layernorm_before"),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_classifier_family_can_be_multilabel(name, tmp_path) -> None:
    """Declared ``task: multilabel``, each family loads with its own layer, serves sigmoid labels
    and its per-label maps equal pytorch-grad-cam's BinaryClassifierOutputTarget (float64,
    non-square input)."""
    import copy

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    from camserve.models import load_model

    (tmp_path / "model.py").write_text("from camserve.testing.nets import TinyNet\n")
    cfg = {**FAMILIES[name][0], "task": "multilabel", "threshold": 0.4, "input_size": [48, 32]}
    if cfg["arch"] == "hf":
        cfg["arch"] = _hf_classifier(tmp_path)
    lm = load_model(ModelSpec.from_config(cfg), tmp_path, calibrate=True)
    assert lm.layer == FAMILIES[name][1] and lm.num_classes == 5
    svc = CamService(lm)
    body = json.loads(svc.handle_batch([{"data": _png(7), "explain": "true", "target": "[1, 3]"}])
                      .results[0].to_json())
    assert body["threshold"] == 0.4 and [e["target"] for e in body["explanations"]] == [1, 3]
    assert all(p["score"] >= 0.4 for p in body["labels"])
    model64 = copy.deepcopy(lm.model).double()
    for p in model64.parameters():  # pytorch-grad-cam backpropagates through the parameters
        p.requires_grad_(True)
    x = torch.randn(2, 3, 48, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eng = CamEngine(model64, lm.layer, task=Multilabel(lm.labels), reshape=lm.reshape)
    ours = eng(x, targets=torch.tensor([[1, 3], [0, 4]]), method="gradcam").heatmaps((48, 32))
    module = model64.get_submodule(lm.layer)
    transform = None if lm.layout == "nchw" else lm.reshape
    for k in range(2):
        labels = [[1, 3], [0, 4]]

        class One(torch.nn.Module):  # the label's own output: a binary classifier
            def __init__(self, lab: int) -> None:
                super().__init__()
                self.net, self.lab = model64, lab

            def forward(self, t: torch.Tensor) -> torch.Tensor:
                return self.net(t)[:, self.lab:self.lab + 1]

        for r in range(2):
            with GradCAM(model=One(labels[r][k]), target_layers=[module],
                         reshape_transform=transform) as cam:
                ref = cam(x[r:r + 1], targets=[BinaryClassifierOutputTarget(1)])
            np.testing.assert_allclose(ours[r, k].numpy(), ref[0], atol=1e-6)
