"""camserve.models: config validation names the key; arch forms; weights_only loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from camserve.models import ConfigError, ModelSpec, build_model, load_labels


@pytest.mark.parametrize("cfg,key", [
    (None, "handler block"),
    ({}, "handler.arch"),
    ({"arch": "x:Y", "num_classes": 0}, "handler.num_classes"),
    ({"arch": "x:Y", "input_size": [3]}, "handler.input_size"),
    ({"arch": "x:Y", "mean": [0.5, 0.5]}, "handler.mean"),
    ({"arch": "x:Y", "std": [1, 0, 1]}, "handler.std"),
    ({"arch": "x:Y", "method": "gradcam3"}, "handler.method"),
    ({"arch": "x:Y", "topk": -1}, "handler.topk"),
    ({"arch": "x:Y", "outputs": "heatmap,svg"}, "handler.outputs"),
    ({"arch": "x:Y", "layout": "chw"}, "handler.layout"),
])
def test_config_errors_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelSpec.from_config(cfg)


def test_spec_defaults_and_values():
    spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "input_size": 64,
                                  "outputs": ["overlay", "bbox", "overlay"], "method": "LayerCAM"})
    assert spec.input_size == (64, 64) and spec.outputs == ("overlay", "bbox")
    assert spec.method == "layercam" and spec.topk == 5


def test_torchvision_arch_with_state_dict(tmp_path):
    ref = torchvision.models.resnet18(num_classes=3)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "num_classes": 3,
                                  "weights": "w.pt"})
    model = build_model(spec, tmp_path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.fc.weight, ref.fc.weight)


def test_file_class_arch_and_labels(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes=2):\n"
        "        super().__init__(); self.conv = torch.nn.Conv2d(3, num_classes, 3)\n"
        "    def forward(self, x): return self.conv(x).mean((2, 3))\n")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "cat", "1": ["n01", "dog"]}))
    spec = ModelSpec.from_config({"arch": "net:Net", "num_classes": 2, "labels": "labels.json"})
    model = build_model(spec, tmp_path)
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 2)
    assert load_labels(spec, tmp_path, 2) == ["cat", "dog"]


def test_weights_that_do_not_fit(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "w.pt")
    spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "num_classes": 3,
                                  "weights": "w.pt"})
    with pytest.raises(ConfigError, match="handler.weights: w.pt does not fit"):
        build_model(spec, tmp_path)


def test_weights_only_refuses_pickled_code(tmp_path):
    torch.save({"fc.weight": torch.zeros(1), "obj": ConfigError("x")}, tmp_path / "w.pt")
    spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "weights": "w.pt"})
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        build_model(spec, tmp_path)


@pytest.mark.parametrize("arch,match", [
    ("torchvision.models.resnet999", "unknown torchvision model"),
    ("nofile:Net", "no file nofile.py"),
])
def test_bad_arch(tmp_path, arch, match):
    with pytest.raises(ConfigError, match=match):
        build_model(ModelSpec.from_config({"arch": arch}), tmp_path)


def test_outputs_key():
    assert ModelSpec.from_config({"arch": "x:Y", "outputs": "heatmap, raw"}).outputs == ("heatmap", "raw")
    with pytest.raises(ConfigError, match="handler.outputs: 'png' .allowed: heatmap, overlay, raw, bbox"):
        ModelSpec.from_config({"arch": "x:Y", "outputs": "png"})


def test_unknown_handler_key_is_refused_with_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown key handler\.taget_layer \(did you mean 'target_layer'"):
        ModelSpec.from_config({"arch": "x:Y", "taget_layer": "layer4"})
    with pytest.raises(ConfigError, match=r"unknown key handler\.zzz \(known: arch"):
        ModelSpec.from_config({"arch": "x:Y", "zzz": 1})


def test_labels_default_to_index_to_name(tmp_path):
    from camserve.models import load_model_dir

    (tmp_path / "model-config.yaml").write_text(
        "handler:\n  arch: torchvision.models.resnet18\n  num_classes: 2\n  input_size: 64\n")
    (tmp_path / "index_to_name.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    loaded = load_model_dir(tmp_path)
    assert loaded.labels == ["cat", "dog"] and loaded.layer == "layer4" and loaded.num_classes == 2
    over = load_model_dir(tmp_path, overrides={"target_layer": "layer3"})
    assert over.layer == "layer3" and over.spec.target_layer == "layer3"
    with pytest.raises(ConfigError, match=r"handler\.target_layer"):
        load_model_dir(tmp_path, overrides={"target_layer": "layer9"})


def test_from_module_and_calibrated_random_model():
    from torch import nn

    from camserve.models import from_module, load_model, recalibrate_batchnorm

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2)).eval()
    lm = from_module(net, ModelSpec(arch="tiny", input_size=(16, 16)), labels=["a", "b"])
    assert (lm.layer, lm.labels, lm.num_classes) == ("2", ["a", "b"], 2)
    with pytest.raises(ConfigError, match="handler.labels: 3 labels for a model with 2 classes"):
        from_module(net, ModelSpec(arch="tiny", input_size=(16, 16)), labels=["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"invalid value for handler\.target_layer: '9' \(no '9'"):
        from_module(net, ModelSpec(arch="tiny", input_size=(16, 16), target_layer="9"))
    bn = net[1]
    recalibrate_batchnorm(net, (16, 16))
    assert not net.training and bn.momentum == 0.1 and not torch.equal(bn.running_var, torch.ones(4))
    spec = ModelSpec.from_config({"arch": "torchvision.models.mobilenet_v3_small", "num_classes": 3,
                                  "input_size": 64, "target_layer": "features.12"})
    raw = load_model(spec)
    calibrated = load_model(spec, calibrate=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert calibrated.model(x).std() > 100 * raw.model(x).std()  # random BN stats: ~1e-10 logits


def test_model_source_keys_and_defaults() -> None:
    """arch_args/interpolation/crop are validated; the model's own preprocessing fills in only the
    keys the config does not set."""
    from camserve.models import apply_source_defaults
    from camserve.sources import SourceDefaults

    spec = ModelSpec.from_config({"arch": "timm:resnet18", "arch_args": {"drop_rate": 0.1},
                                  "interpolation": "BICUBIC", "crop": 0.9, "mean": [0.5] * 3})
    assert spec.arch_args == {"drop_rate": 0.1} and spec.interpolation == "bicubic" and spec.crop == 0.9
    assert spec.given == {"arch", "arch_args", "interpolation", "crop", "mean"}
    for bad, match in (({"arch_args": [1]}, "handler.arch_args"), ({"arch_args": {1: 2}}, "handler.arch_args"),
                       ({"interpolation": "lanczos"}, "known: nearest, bilinear, bicubic"),
                       ({"crop": 0}, r"handler.crop"), ({"crop": 1.5}, r"handler.crop"),
                       ({"crop": True}, r"handler.crop")):
        with pytest.raises(ConfigError, match=match):
            ModelSpec.from_config({"arch": "timm:resnet18", **bad})
    with pytest.raises(ConfigError, match="timm:<name>.*hf:<subfolder>"):
        ModelSpec.from_config({"arch": ""})
    d = SourceDefaults(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), input_size=(176, 176),
                       interpolation="bicubic", crop=0.95)
    s = apply_source_defaults(spec, d)
    assert s.mean == (0.5, 0.5, 0.5) and s.std == (0.4, 0.5, 0.6) and s.input_size == (176, 176)
    assert s.interpolation == "bicubic" and s.crop == 0.9  # the config's
    assert apply_source_defaults(ModelSpec.from_config({"arch": "x:Y"}), d).crop == 0.95


def test_labels_from_the_model_and_outputs_that_are_not_tensors(tmp_path: Path) -> None:
    """load_labels: file > model's id2label > indices; a model returning {"logits": ...} is made to
    return the logits tensor (class count, layer choice)."""
    from camserve.models import from_module

    spec = ModelSpec(arch="tiny", input_size=(16, 16))
    assert load_labels(spec, tmp_path, 2, ["cat", "dog"]) == ["cat", "dog"]
    assert load_labels(spec, tmp_path, 3, ["cat", "dog"]) == ["0", "1", "2"]
    (tmp_path / "index_to_name.json").write_text('{"0": "a", "1": "b"}')
    assert load_labels(spec, tmp_path, 2, ["cat", "dog"]) == ["a", "b"]

    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def forward(self, x):
            return {"logits": self.head(self.features(x))}

    net = Dict().eval()
    lm = from_module(net, spec, model_labels=["cat", "dog"])
    assert lm.labels == ["cat", "dog"] and lm.layer == "features" and lm.grid == (14, 14)
    assert isinstance(net(torch.zeros(1, 3, 16, 16)), torch.Tensor)
    assert list(net.state_dict()) == ["features.0.weight", "features.0.bias", "head.2.weight", "head.2.bias"]
