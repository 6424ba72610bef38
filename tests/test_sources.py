"""Model sources: arch strings, arch_args, checkpoints (wrapped, DDP, safetensors, refused
pickles, mismatches), model defaults, logits of any output."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from camserve.sources import (SourceError, build_from_source, ensure_logits, load_state, logits_of,
                              read_state)


class DictNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return {"logits": self.fc(self.features(x).mean(dim=(2, 3))), "aux": x.mean()}


MODEL_PY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=2, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        f = self.conv(x)
        return self.fc(f.mean(dim=(2, 3))), f
'''


def test_logits_of_every_output_kind() -> None:
    t = torch.ones(2, 3)

    class Out:
        logits = t

    assert logits_of(t) is t
    assert logits_of((t, "x")) is t and logits_of([t]) is t
    assert logits_of({"logits": t}) is t
    assert logits_of(Out()) is t
    with pytest.raises(TypeError, match="mapping without a 'logits'"):
        logits_of({"scores": t})
    with pytest.raises(TypeError, match="holds no logits"):
        logits_of("nope")


def test_ensure_logits_keeps_names_state_and_copies() -> None:
    m = DictNet().eval()
    names = [n for n, _ in m.named_modules()]
    keys = list(m.state_dict())
    assert ensure_logits(m, torch.zeros(1, 3, 8, 8)) is m
    out = m(torch.zeros(2, 3, 8, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    assert [n for n, _ in m.named_modules()] == names and list(m.state_dict()) == keys
    assert isinstance(m, DictNet) and type(m).__name__ == "DictNet"
    c = copy.deepcopy(m).double()
    assert c(torch.zeros(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
    assert ensure_logits(m, torch.zeros(1, 3, 8, 8)) is m  # idempotent
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    assert type(ensure_logits(plain, torch.zeros(1, 3, 2, 2))) is nn.Sequential  # tensor: untouched


def test_file_class_with_arch_args_and_tuple_output(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(MODEL_PY)
    m, d = build_from_source("net:Net", num_classes=5, arch_args={"width": 6}, model_dir=tmp_path,
                             input_size=(8, 8))
    assert m.conv.out_channels == 6
    assert m(torch.zeros(1, 3, 8, 8)).shape == (1, 5)  # (logits, features) -> logits
    assert d.mean is None and d.labels is None
    with pytest.raises(SourceError, match="handler.arch_args") as e:
        build_from_source("net:Net", arch_args={"depth": 3}, model_dir=tmp_path)
    assert e.value.key == "arch_args"


def test_arch_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"handler.arch: .*unknown torchvision model 'resnet5'"):
        build_from_source("torchvision.models.resnet5")
    with pytest.raises(SourceError, match="handler.arch: .*no file nope.py"):
        build_from_source("nope:Net", model_dir=tmp_path)
    with pytest.raises(SourceError, match="handler.arch: .*expected"):
        build_from_source("just.a.dotted.name")
    with pytest.raises(SourceError, match="save_pretrained folder with config.json"):
        build_from_source("hf:missing", model_dir=tmp_path)
    with pytest.raises(SourceError) as e:
        build_from_source("x" * 500)
    assert len(str(e.value)) < 400


def test_timm_source_and_pretrained_cfg_defaults() -> None:
    pytest.importorskip("timm")
    m, d = build_from_source("timm:resnet10t", num_classes=4)
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert d.input_size == (176, 176) and d.interpolation == "bicubic" and d.crop == 0.875
    assert d.mean == pytest.approx((0.485, 0.456, 0.406)) and d.std == pytest.approx((0.229, 0.224, 0.225))
    v, dv = build_from_source("timm:vit_tiny_patch16_224", num_classes=2,
                              arch_args={"img_size": [32, 48], "depth": 1})
    assert dv.input_size == (32, 48) and dv.mean == (0.5, 0.5, 0.5) and len(v.blocks) == 1
    with pytest.raises(SourceError, match="handler.arch: 'timm:resnet_nope' is not a timm model"):
        build_from_source("timm:resnet_nope")
    with pytest.raises(SourceError, match="handler.arch_args"):
        build_from_source("timm:resnet10t", arch_args={"no_such_arg": 1})


@pytest.fixture()
def sd_model() -> nn.Module:
    torch.manual_seed(0)
    return DictNet(num_classes=3)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp", "ddp_in_model"])
def test_checkpoint_wrappings(wrap: str, sd_model: nn.Module, tmp_path: Path) -> None:
    sd = sd_model.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3},
           "model": {"model": sd, "optimizer_lr": torch.tensor(0.1)},
           "ddp": {f"module.{k}": v for k, v in sd.items()},
           "ddp_in_model": {"model": {f"module.{k}": v for k, v in sd.items()}}}[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    fresh = DictNet(num_classes=3)
    load_state(fresh, path, "net:DictNet")
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_safetensors_checkpoint(sd_model: nn.Module, tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in sd_model.state_dict().items()}, str(path))
    fresh = load_state(DictNet(num_classes=3), path)
    assert torch.equal(fresh.fc.weight, sd_model.fc.weight)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SourceError, match="not a safetensors file"):
        read_state(tmp_path / "bad.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(SourceError, match="weights_only=True"):
        read_state(path)
    assert "unpickled!" not in capsys.readouterr().out
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")  # a whole model, not a state_dict
    with pytest.raises(SourceError, match=r"save model.state_dict\(\)"):
        read_state(tmp_path / "whole.pt")
    torch.save({"a": 1}, tmp_path / "nosd.pt")
    with pytest.raises(SourceError, match="holds no state_dict"):
        read_state(tmp_path / "nosd.pt")
    with pytest.raises(SourceError, match="does not exist"):
        read_state(tmp_path / "missing.pt")


def test_mismatch_names_keys_and_arch(sd_model: nn.Module, tmp_path: Path) -> None:
    sd = dict(sd_model.state_dict())
    sd.pop("fc.bias")
    sd["head.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(SourceError) as e:
        load_state(DictNet(num_classes=3), tmp_path / "w.pt", "net:DictNet")
    msg = str(e.value)
    assert msg.startswith("invalid value for handler.weights: w.pt does not fit net:DictNet")
    assert "missing keys: fc.bias" in msg and "unexpected keys: head.extra" in msg
    torch.save(sd_model.state_dict(), tmp_path / "w3.pt")
    with pytest.raises(SourceError, match=r"shape mismatch: fc.weight \(3, 4\) vs \(5, 4\)"):
        load_state(DictNet(num_classes=5), tmp_path / "w3.pt", "net:DictNet")
    many = {f"k{i}": torch.zeros(1) for i in range(50)}
    torch.save(many, tmp_path / "many.pt")
    with pytest.raises(SourceError, match=r"\(50 in all\)"):
        load_state(DictNet(num_classes=3), tmp_path / "many.pt")


def test_hf_folder_labels_and_preprocessing(tmp_path: Path) -> None:
    tr = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    cfg = tr.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    tr.ResNetForImageClassification(cfg).save_pretrained(tmp_path / "hf")
    tr.ViTImageProcessor(size={"height": 40, "width": 56}, image_mean=[0.1, 0.2, 0.3],
                         image_std=[0.4, 0.5, 0.6], resample=3).save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    m, d = build_from_source("hf:hf", model_dir=tmp_path)
    assert d.labels == ["cat", "dog"] and d.input_size == (40, 56) and d.interpolation == "bicubic"
    assert d.mean == (0.1, 0.2, 0.3) and d.std == (0.4, 0.5, 0.6)
    out = m(torch.zeros(1, 3, 40, 56))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2)
    assert all(not k.startswith("model.") for k in m.state_dict())
    with pytest.raises(SourceError, match="handler.num_classes: 5 but hf:hf has 2 labels"):
        build_from_source("hf:hf", num_classes=5, model_dir=tmp_path)
    # default names (LABEL_0...) are no labels
    cfg2 = tr.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=3)
    tr.ResNetForImageClassification(cfg2).save_pretrained(tmp_path / "hf2")
    _, d2 = build_from_source("hf:hf2", model_dir=tmp_path)
    assert d2.labels is None and d2.mean is None
    (tmp_path / "hf2" / "preprocessor_config.json").write_text("{nope")
    with pytest.raises(SourceError, match="not JSON"):
        build_from_source("hf:hf2", model_dir=tmp_path)
    json.loads((tmp_path / "hf" / "config.json").read_text())
