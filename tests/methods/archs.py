"""The architectures the method contract tests run over: a tiny CNN and resnet18 (fast tier),
torchvision CNNs and transformers, a timm CNN and ViT, Hugging Face ResNet and ViT (zoo tier);
random weights (BatchNorm calibrated), float64, non-square inputs for the CNNs.

Cost: a method that runs a forward per channel or per augmentation (Score-CAM, Ablation-CAM,
SS-CAM, IS-CAM, ``aug_smooth``) is the same code on every architecture of a layout, so it runs on
the small cases, which cover every layout (NCHW: tinybn, hf_resnet; tokens: timm_vit_tiny, hf_vit;
NHWC: swin_small), and not on the full-size torchvision/timm networks (``large``: resnet18's 512
channels already cost 30 s for one Score-CAM and three minutes with ``aug_smooth`` in float64)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch import nn

from camserve.testing.nets import TinyBNNet, calibrate_bn
from camserve.testing.zoo import ARCH_BY_NAME, reshape_for_reference


class Logits(nn.Module):
    """A Hugging Face classifier returning its logits tensor (what pytorch-grad-cam needs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return calibrate_bn(TinyBNNet(num_classes=10), (40, 56))


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: ARCH_BY_NAME[name].build(torch.float64)


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.02)
        return calibrate_bn(model, kw.get("img_size", 64))
    return build


def _swin_small() -> nn.Module:
    """A torchvision Swin of one block per stage (NHWC stages, shifted windows, patch merging)."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                           window_size=[4, 4], num_classes=10).eval()


def _hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                       layer_type="basic", num_labels=10)
    return calibrate_bn(Logits(ResNetForImageClassification(cfg)), (48, 64))


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    model = Logits(ViTForImageClassification(cfg))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.2)
    return model.eval()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    layer: str
    size: tuple[int, int]
    layout: Optional[str] = None
    zoo: bool = True
    large: bool = False  #: a full-size network: no per-channel / per-augmentation methods

    @property
    def reshape_ref(self):
        return reshape_for_reference(self.layout)

    def input(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, *self.size, generator=g).to(torch.float64)


@functools.lru_cache(maxsize=None)
def model_of(case: Case) -> nn.Module:
    """The float64 eval model, parameters frozen, kept for the session."""
    model = case.build().to(torch.float64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


CASES: list[Case] = [
    Case("tinybn", _tiny, "features.3", (40, 56), zoo=False),
    Case("resnet18", _tv("resnet18"), "layer4", (48, 64), zoo=False, large=True),
    Case("resnet50", _tv("resnet50"), "layer3", (48, 80), large=True),
    Case("densenet121", _tv("densenet121"), "features.denseblock4", (96, 64), large=True),  # a 3×2 map
    Case("convnext_tiny", _tv("convnext_tiny"), "features.5", (64, 96), large=True),
    Case("vit_b_16", _tv("vit_b_16"), "encoder.layers.encoder_layer_10.ln_1", (64, 64), "tokens",
         large=True),
    Case("swin_t", _tv("swin_t"), "features.5", (64, 64), "nhwc", large=True),
    Case("swin_small", _swin_small, "features.5", (64, 64), "nhwc"),
    Case("timm_resnet26d", _timm("resnet26d"), "layer4", (64, 96), large=True),
    Case("timm_vit_tiny", _timm("vit_tiny_patch16_224", img_size=64), "blocks.10.norm1", (64, 64), "tokens"),
    Case("hf_resnet", _hf_resnet, "model.resnet.encoder.stages.3", (48, 64)),
    Case("hf_vit", _hf_vit, "model.vit.layers.2.layernorm_before", (32, 32), "tokens"),
]
CASE_BY_NAME = {c.name: c for c in CASES}


def params(cases, methods, *, fast_cases=("tinybn", "resnet18"), slow_methods=()):
    """pytest params (case, method); zoo marks for zoo cases, and for ``slow_methods`` on any case
    but the first fast one. ``slow_methods`` (a forward per channel or augmentation) are left out
    on ``large`` cases (see the module's docstring)."""
    out = []
    for c in cases:
        for m in methods:
            if m in slow_methods and c.large:
                continue
            zoo = c.zoo or (m in slow_methods and c.name != fast_cases[0])
            out.append(pytest.param(c, m, id=f"{c.name}-{m}", marks=[pytest.mark.zoo] if zoo else []))
    return out
