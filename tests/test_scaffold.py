"""Scaffolding: a timm folder and a Hugging Face folder go from a checkpoint to a loaded,
explained model folder; labels from text or JSON; exit statuses 0 / 2 (usage) / 1 (load)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from camserve.engine import CamEngine
from camserve.scaffold import load_folder, main, read_labels, synthetic_image


def _timm_checkpoint(tmp_path: Path) -> Path:
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                          img_size=(32, 48), depth=1)
    path = tmp_path / "ft.pth"
    torch.save({"model": {f"module.{k}": v for k, v in m.state_dict().items()}}, path)
    return path


def test_timm_folder(tmp_path: Path, capsys) -> None:
    ckpt = _timm_checkpoint(tmp_path)
    (tmp_path / "labels.txt").write_text("cat\ndog\n\nbird\n")
    folder = tmp_path / "pets"
    rc = main([str(folder), "--arch", "timm:vit_tiny_patch16_224", "--weights", str(ckpt),
               "--labels", str(tmp_path / "labels.txt"), "--arch-arg", "img_size=[32, 48]",
               "--arch-arg", "depth=1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    cfg = yaml.safe_load((folder / "model-config.yaml").read_text())["handler"]
    assert cfg == {"arch": "timm:vit_tiny_patch16_224", "arch_args": {"img_size": [32, 48], "depth": 1},
                   "num_classes": 3, "weights": "ft.pth", "labels": "index_to_name.json"}
    assert json.loads((folder / "index_to_name.json").read_text()) == {"0": "cat", "1": "dog", "2": "bird"}
    assert (folder / "ft.pth").is_file()
    assert "layer:  blocks.0.norm1 (tokens" in out and "grid:   2x3 at input 32x48" in out
    assert "labels: cat, dog, bird" in out
    assert f"make archive MODEL={folder}" in out and f"make serve MODEL={folder}" in out
    assert f"python -m export.onnx_export {folder} --out" in out
    # the folder loads again on its own and explains with the checkpoint's weights
    model, choice, labels, size, mean, std = load_folder(folder)
    assert (choice.name, choice.grid, labels, size, mean) == ("blocks.0.norm1", (2, 3),
                                                              ["cat", "dog", "bird"], (32, 48),
                                                              (0.5, 0.5, 0.5))
    sd = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(model.head.weight, sd["module.head.weight"])
    res = CamEngine(model, choice.name, reshape=choice.reshape)(synthetic_image(size)[None], targets=[2])
    assert res.cams.shape == (1, 2, 3)


def test_hf_folder(tmp_path: Path, capsys) -> None:
    tr = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    cfg = tr.SwinConfig(image_size=(32, 64), patch_size=4, embed_dim=8, depths=[1, 1, 1],
                        num_heads=[1, 1, 1], window_size=2, num_labels=2,
                        id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    saved = tmp_path / "saved"
    tr.SwinForImageClassification(cfg).save_pretrained(saved)
    tr.ViTImageProcessor(size={"height": 32, "width": 64}, image_mean=[0.4, 0.4, 0.4],
                         image_std=[0.2, 0.2, 0.2]).save_pretrained(saved)
    folder = tmp_path / "swin"
    assert main([str(folder), "--arch", f"hf:{saved}"]) == 0
    out = capsys.readouterr().out
    cfg_doc = yaml.safe_load((folder / "model-config.yaml").read_text())["handler"]
    assert cfg_doc == {"arch": "hf:saved"}
    assert (folder / "saved" / "model.safetensors").is_file()
    assert "layer:  swin.layernorm (tokens" in out and "grid:   2x4 at input 32x64" in out
    assert "labels: cat, dog" in out
    model, choice, labels, size, mean, std = load_folder(folder)
    assert (labels, size, mean, std) == (["cat", "dog"], (32, 64), (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    # scaffolding again over an existing config needs --force; the hf folder already inside DIR
    assert main([str(folder), "--arch", "hf:saved", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([str(folder), "--arch", "hf:saved", "--force", "--quiet", "--layer",
                 "swin.encoder.layers.2"]) == 1  # a named layer that returns no tensor map


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "a")]) == 2  # --arch missing
    assert main([str(tmp_path / "b"), "--arch", "torchvision.models.resnet18",
                 "--input-size", "big"]) == 2
    assert "--input-size" in capsys.readouterr().err
    assert main([str(tmp_path / "c"), "--arch", "torchvision.models.resnet18",
                 "--weights", str(tmp_path / "none.pt")]) == 2
    assert main([str(tmp_path / "d"), "--arch", "hf:/nowhere"]) == 2
    (tmp_path / "l.txt").write_text("a\nb\n")
    assert main([str(tmp_path / "e"), "--arch", "torchvision.models.resnet18", "--labels",
                 str(tmp_path / "l.txt"), "--num-classes", "3"]) == 2
    assert main([str(tmp_path / "f"), "--arch", "torchvision.models.resnet18", "--arch-arg", "oops"]) == 2


def test_load_failures_exit_1(tmp_path: Path, capsys) -> None:
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "w.pt")
    rc = main([str(tmp_path / "m"), "--arch", "torchvision.models.resnet18", "--num-classes", "2",
               "--weights", str(tmp_path / "w.pt"), "--input-size", "32"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "does not fit torchvision.models.resnet18" in err and "missing keys: conv1.weight" in err


def test_file_class_is_copied_and_named_layer(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.py").write_text(
        "from torch import nn\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self, num_classes=2):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())\n"
        "        self.fc = nn.Linear(4, num_classes)\n"
        "    def forward(self, x):\n"
        "        return {'logits': self.fc(self.body(x).mean((2, 3)))}\n")
    folder = tmp_path / "tiny"
    assert main([str(folder), "--arch", f"{src / 'tiny.py'}:Tiny", "--num-classes", "2",
                 "--input-size", "24,40", "--layer", "body"]) == 0
    out = capsys.readouterr().out
    assert (folder / "tiny.py").is_file()
    assert yaml.safe_load((folder / "model-config.yaml").read_text())["handler"]["arch"] == "tiny:Tiny"
    assert "layer:  body (nchw" in out and "grid:   24x40" in out


def test_layout_for_a_layer_that_cannot_be_probed(tmp_path: Path, capsys) -> None:
    """A fixed-size model whose map comes from a Linear (B, H, W, C): the error asks for
    ``layout:``, ``--layout nhwc`` writes it and the folder explains; ``--layout`` needs a layer
    and one of the known layouts."""
    src = tmp_path / "fixed.py"
    src.write_text(
        "from torch import nn\n"
        "class Fixed(nn.Module):\n"
        "    def __init__(self, num_classes=2):\n"
        "        super().__init__()\n"
        "        self.mix = nn.Linear(3, 8)\n"
        "        self.fc = nn.Linear(8, num_classes)\n"
        "    def forward(self, x):\n"
        "        if tuple(x.shape[-2:]) != (16, 24):\n"
        "            raise ValueError('fixed input size')\n"
        "        return self.fc(self.mix(x.permute(0, 2, 3, 1)).mean((1, 2)))\n")
    base = ["--arch", f"{src}:Fixed", "--num-classes", "2", "--input-size", "16,24", "--layer", "mix"]
    assert main([str(tmp_path / "a"), *base, "--quiet"]) == 1
    assert "set layout: nchw or nhwc" in capsys.readouterr().err
    assert main([str(tmp_path / "b"), *base, "--layout", "nhwc"]) == 0
    out = capsys.readouterr().out
    assert "layer:  mix (nhwc, layout nhwc from the config)" in out and "grid:   16x24" in out
    cfg = yaml.safe_load((tmp_path / "b" / "model-config.yaml").read_text())["handler"]
    assert (cfg["target_layer"], cfg["layout"]) == ("mix", "nhwc")
    assert load_folder(tmp_path / "b")[1].grid == (16, 24)
    assert main([str(tmp_path / "c"), *base[:-2], "--layout", "nhwc"]) == 2
    assert "pass --layer too" in capsys.readouterr().err
    assert main([str(tmp_path / "d"), *base, "--layout", "chw"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_read_labels(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"1": "dog", "0": ["n0", "cat"]}))
    assert read_labels(tmp_path / "a.json") == ["cat", "dog"]
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(ValueError, match="without gaps"):
        read_labels(tmp_path / "gap.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no labels"):
        read_labels(tmp_path / "empty.txt")
